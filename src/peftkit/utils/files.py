"""Files: read weights safely, write atomically -- for adapters (`checkpoint/`) and quantized models alike.

Loading never unpickles arbitrary objects: safetensors, or `torch.load(weights_only=True)` for
`.bin` files. Every write goes to a temporary file in the target folder and is renamed into
place, so a crash never leaves a half-written file; `commit_files` makes several files change
together.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError


def read_weights_file(path: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors or weights-only torch file, naming the file when it is damaged."""
    try:
        if path.endswith(".safetensors"):
            return load_file(path, device=device)
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path!r} holds pickled Python objects besides tensors; peftkit loads weights only "
            "(torch.load(weights_only=True)) and never runs code from a checkpoint. Re-save it as safetensors."
        ) from exc
    except Exception as exc:  # safetensors, pickle and OS errors all mean the same to the user
        raise CheckpointError(
            f"Adapter weights {path!r} are corrupt or truncated ({type(exc).__name__}: {exc}); "
            "re-save or re-download the adapter."
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path!r} does not hold a flat dict of tensors; it is not an adapter weights file.")
    return state


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(handle)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; use the usual umask mode
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` via a temporary file and a rename."""
    _atomic_write(path, text_writer(text))


def weights_writer(tensors: Mapping[str, torch.Tensor], safe_serialization: bool = True) -> Callable[[str], None]:
    """A function writing the tensors to a path: safetensors with `{"format": "pt"}`, or torch .bin."""
    plain = _unshare(tensors)
    if safe_serialization:
        return lambda path: save_file(plain, path, metadata={"format": "pt"})
    return lambda path: torch.save(plain, path)


def text_writer(text: str) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    return write


def _unshare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous, detached tensors; those sharing storage are cloned (safetensors refuses aliases)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach()
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        if pointer in seen or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        seen.add(pointer)
        out[key] = tensor
    return out


# ---------------------------------------------------------------------- whole-adapter commits
_JOURNAL = ".peftkit-commit.json"
_PENDING_SUFFIX = ".peftkit-pending"


def commit_files(directory: str, writers: Mapping[str, Callable[[str], None]]) -> None:
    """Write several files so that the folder shows either all old or all new versions.

    Each file is first written completely to `<name>.peftkit-pending`; then a journal naming them
    is written atomically (the commit point); then each pending file is renamed into place and the
    journal removed. A crash before the commit point leaves the old files (pending ones are swept
    on the next access); a crash after it is rolled forward by `recover_interrupted_save`.
    """
    os.makedirs(directory, exist_ok=True)
    recover_interrupted_save(directory)
    for name, write in writers.items():
        _atomic_write(os.path.join(directory, name + _PENDING_SUFFIX), write)
    atomic_write_text(os.path.join(directory, _JOURNAL), json.dumps(sorted(writers)))
    _roll_forward(directory, sorted(writers))


def recover_interrupted_save(directory: str) -> None:
    """Finish a committed save (journal present) or drop the leftovers of an uncommitted one."""
    if not os.path.isdir(directory):
        return
    journal = os.path.join(directory, _JOURNAL)
    if os.path.isfile(journal):
        try:
            with open(journal, encoding="utf-8") as handle:
                names = json.load(handle)
        except (OSError, ValueError):
            names = []
        _roll_forward(directory, [n for n in names if isinstance(n, str) and os.sep not in n and "/" not in n])
    for entry in os.listdir(directory):
        if entry.endswith(_PENDING_SUFFIX) or entry.startswith(".tmp-"):
            os.remove(os.path.join(directory, entry))


def _roll_forward(directory: str, names: list[str]) -> None:
    for name in names:
        pending = os.path.join(directory, name + _PENDING_SUFFIX)
        if os.path.exists(pending):
            os.replace(pending, os.path.join(directory, name))
    journal = os.path.join(directory, _JOURNAL)
    if os.path.exists(journal):
        os.remove(journal)
