"""Files: read weights safely, write atomically -- for adapters (`checkpoint/`) and quantized models alike.

Loading never unpickles arbitrary objects: safetensors, or `torch.load(weights_only=True)` for
`.bin` files. Writers are functions `write(path)`; `commits.commit_files` runs them into a private
stage and renames the results into place together, so a crash never leaves a half-written file
or a folder mixing two saves.
"""

from __future__ import annotations

import os
import pickle
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


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` as one commit of its folder (see `commits.commit_files`)."""
    from .commits import commit_files

    commit_files(os.path.dirname(os.path.abspath(path)), {os.path.basename(path): text_writer(text)})


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
