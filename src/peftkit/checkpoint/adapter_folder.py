"""The adapter folder, both directions: the one place that reads and writes `adapter_config.json` + weights.

Reading: `read_adapter(model_id, ...)` locates the adapter once -- a local folder or a hub repo --
and takes config and weights from that location, with one set of hub arguments (`io.HUB_KWARGS`).
A local folder is read as one snapshot (`utils.commits.read_snapshot`): config and weights of one
save even while another process saves there, and reading never writes to the folder.

Writing: `adapter_config_to_save` is peft's rule for the saved config (`inference_mode: true`,
`base_model_name_or_path` filled from the model, `auto_mapping` when there is no task type),
`config_text` is the only producer of `adapter_config.json` text (keys sorted, indent 2), and
`write_adapter` commits config, weights and the model card `README.md` (`model_card.py`) together
through `utils.commits.commit_files` (and deletes a weights file of the other format).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, TypeVar

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from ..utils.commits import commit_files, read_snapshot
from ..utils.files import read_weights_file, text_writer, weights_writer
from .io import hub_kwargs_of
from .model_card import README_NAME, ModelCardInfo, model_card_text, read_existing_card

if TYPE_CHECKING:
    from ..config import PeftConfig

T = TypeVar("T")
MAX_CONFIG_BYTES = 16 * 2**20  # peft's configs are a few KB; a larger file is not an adapter config
MAX_CONFIG_DEPTH = 32


# ---------------------------------------------------------------------- reading
class AdapterSource(NamedTuple):
    """Where an adapter lives, decided once: a local folder, or a hub repo with its hub arguments."""

    model_id: str
    local_dir: Optional[str]  # None: a hub repo
    subfolder: Optional[str]
    hub_kwargs: dict[str, Any]

    def file(self, filename: str) -> str:
        """Local path of `filename` (downloaded, or taken from the hub cache, for a hub repo)."""
        if self.local_dir is not None:
            path = os.path.join(self.local_dir, filename)
            if not os.path.isfile(path):
                raise CheckpointError(
                    f"No {filename} in {self.local_dir!r}; is this an adapter folder written by save_pretrained?"
                )
            return path
        return _hub_download(self, filename)

    def weights_file(self) -> str:
        """`adapter_model.safetensors`, else `adapter_model.bin` (the safetensors error if neither exists)."""
        try:
            return self.file(SAFETENSORS_WEIGHTS_NAME)
        except CheckpointError as safetensors_missing:
            try:
                return self.file(WEIGHTS_NAME)
            except CheckpointError:
                raise safetensors_missing from None

    def read(self, read: Callable[["AdapterSource"], T]) -> T:
        """`read(self)`, seeing the files of one save of a local folder (a hub repo's cache is read as is)."""
        if self.local_dir is None:
            return read(self)
        return read_snapshot(self.local_dir, lambda: read(self))


def locate_adapter(model_id: Any, subfolder: Optional[str] = None, **kwargs: Any) -> AdapterSource:
    """Resolve `model_id` (a local adapter folder or a hub repo id) once; `kwargs` may hold hub arguments."""
    model_id = os.fspath(model_id)
    hub_kwargs = hub_kwargs_of(kwargs)
    given = hub_kwargs.pop("subfolder", None)
    subfolder = given if subfolder is None else subfolder
    local_dir = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(local_dir):
        return AdapterSource(model_id, local_dir, subfolder, {})
    if model_id.count("/") > 1 or model_id.startswith((".", "/", "~")) or os.path.exists(model_id):
        raise CheckpointError(f"Adapter path {model_id!r} is not a folder; pass the folder holding {CONFIG_NAME}.")
    return AdapterSource(model_id, None, subfolder, {k: v for k, v in hub_kwargs.items() if v is not None})


def _hub_download(source: AdapterSource, filename: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(source.model_id, filename, subfolder=source.subfolder, **source.hub_kwargs)
    except Exception as exc:  # huggingface_hub raises many types (offline, 404, bad id, ...)
        raise CheckpointError(
            f"Could not find {filename} for {source.model_id!r}: not a local folder, and the hub gave "
            f"{type(exc).__name__}: {exc}. Pass a local adapter folder, or go online once to fill the cache."
        ) from exc


class AdapterCheckpoint(NamedTuple):
    """What `read_adapter` returns: the config as read from JSON (None if not asked for) and the tensors."""

    config: Optional[dict[str, Any]]
    weights: dict[str, torch.Tensor]


def read_adapter(
    model_id: Any, read_config: bool = True, device: Optional[str] = None, **kwargs: Any
) -> AdapterCheckpoint:
    """Config dict (unless `read_config=False`) and weights of an adapter, both from one location.

    `device` is where the tensors are loaded (default "cpu"); `kwargs` may hold hub arguments.
    """
    device = check_load_device(device)
    def read(source: AdapterSource) -> AdapterCheckpoint:
        config = read_config_file(source.file(CONFIG_NAME)) if read_config else None
        return AdapterCheckpoint(config, read_weights_file(source.weights_file(), device=device))

    return locate_adapter(model_id, **kwargs).read(read)


def read_adapter_config(model_id: Any, subfolder: Optional[str] = None, **kwargs: Any) -> dict[str, Any]:
    """The `adapter_config.json` of a local folder or hub repo, as a dict."""
    source = locate_adapter(model_id, subfolder=subfolder, **kwargs)
    return source.read(lambda located: read_config_file(located.file(CONFIG_NAME)))


def read_adapter_weights(
    model_id: Any, device: Optional[str] = None, subfolder: Optional[str] = None, **kwargs: Any
) -> dict[str, torch.Tensor]:
    """The tensors of a local folder or hub repo (safetensors, or weights-only `adapter_model.bin`)."""
    device = check_load_device(device)
    source = locate_adapter(model_id, subfolder=subfolder, **kwargs)
    return source.read(lambda located: read_weights_file(located.weights_file(), device=device))


def read_config_file(path: str) -> dict[str, Any]:
    """Read a config JSON file into a dict, with a clear error for a damaged or oversized file.

    Untrusted input: the file is capped at MAX_CONFIG_BYTES before it is read and its nesting at
    MAX_CONFIG_DEPTH (peft's configs are a few KB, four levels deep at most).
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError as exc:
        raise CheckpointError(f"No adapter config at {path!r}.") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise CheckpointError(
            f"{path!r} is larger than {MAX_CONFIG_BYTES // 2**20} MiB, far beyond any adapter config; "
            "it is not an adapter_config.json (restore the file or re-save the adapter)."
        )
    too_deep = False
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path!r} is not valid JSON ({exc}); re-save the adapter or restore the file.") from exc
    except RecursionError:  # nested beyond Python's recursion limit
        too_deep = True
    if too_deep or _json_depth(data) > MAX_CONFIG_DEPTH:
        raise CheckpointError(
            f"{path!r} nests JSON more than {MAX_CONFIG_DEPTH} levels deep; an adapter config is a flat object "
            "of fields. Restore the file or re-save the adapter."
        )
    if not isinstance(data, dict):
        raise CheckpointError(f"{path!r} must hold a JSON object, found {type(data).__name__}.")
    return data


def _json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (iterative: the value may be deeper than the recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_CONFIG_DEPTH:
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def check_load_device(device: Any) -> str:
    """`device` ("cpu" when None) as a string, if tensors can be loaded onto it on this machine."""
    if device is None:
        return "cpu"
    try:
        parsed = torch.device(device)
        if parsed.type == "meta":
            raise RuntimeError("the meta device holds no data")
        torch.empty(0, device=parsed)
    except (RuntimeError, TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(
            f"torch_device={device!r} cannot hold the adapter weights here ({type(exc).__name__}: {exc}); "
            "pass a device this machine has, e.g. 'cpu' or 'cuda:0', or leave it None."
        ) from None
    return str(parsed)


# ---------------------------------------------------------------------- writing
def base_model_name(model: nn.Module) -> Optional[str]:
    """`config._name_or_path` of a transformers model (None when empty or absent)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name if isinstance(name, str) and name else None  # a config stand-in may hold anything


def adapter_config_to_save(config: "PeftConfig", model: nn.Module) -> dict[str, Any]:
    """The fields `save_pretrained` writes for an adapter of `model` (peft's rule).

    `inference_mode` is true, `base_model_name_or_path` falls back to the model's name, and a config
    without task type gets `auto_mapping` (the base model's class and module).
    """
    base_name = config.base_model_name_or_path or base_model_name(model)
    fields = dataclasses.replace(config, inference_mode=True, base_model_name_or_path=base_name).to_dict()
    if fields.get("task_type") is None:
        fields["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    return fields


def config_text(fields: Mapping[str, Any]) -> str:
    """`adapter_config.json` text: keys sorted, indent 2 (peft's layout)."""
    return json.dumps(fields, indent=2, sort_keys=True)


def write_adapter(
    directory: str,
    config_fields: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    safe_serialization: bool = True,
    model_card: Optional[ModelCardInfo] = None,
) -> None:
    """Commit `adapter_config.json`, the weights file and the model card `README.md` into `directory`
    together (atomically).

    The card says what `model_card` (`model_card.model_card_info(...)`) holds; without it, it is
    built from the config (`base_model_name_or_path`, `peft_type`). A `README.md` already in
    `directory` keeps its text and its other metadata.
    """
    if model_card is None:
        base_name = config_fields.get("base_model_name_or_path")
        model_card = ModelCardInfo(
            base_model=base_name,
            tags=("lora",) if config_fields.get("peft_type") == "LORA" else (),
            pipeline_tag="text-generation" if config_fields.get("task_type") == "CAUSAL_LM" else None,
            quantization_config=None,
        )
    weights_name, other_format = (
        (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME) if safe_serialization else (WEIGHTS_NAME, SAFETENSORS_WEIGHTS_NAME)
    )
    card = model_card_text(model_card, read_existing_card(directory))
    commit_files(
        directory,
        {
            weights_name: weights_writer(tensors, safe_serialization),
            CONFIG_NAME: text_writer(config_text(config_fields)),
            README_NAME: text_writer(card),
        },
        remove=[other_format],  # else a reader, which prefers safetensors, would load the older weights
    )


def write_adapter_config(directory: str, config_fields: Mapping[str, Any]) -> None:
    """Write `adapter_config.json` alone (PeftConfig.save_pretrained), atomically."""
    if os.path.isfile(directory):
        raise ConfigError(f"save_directory {directory!r} is a file; pass a directory path.")
    commit_files(directory, {CONFIG_NAME: text_writer(config_text(config_fields))})
