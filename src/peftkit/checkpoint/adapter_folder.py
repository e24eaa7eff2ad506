"""The adapter folder, both directions: the one place that reads and writes `adapter_config.json` + weights.

Reading: `read_adapter(model_id, ...)` locates the adapter once -- a local folder (an interrupted
save there is rolled forward) or a hub repo -- and takes config and weights from that location,
with one set of hub arguments (`io.HUB_KWARGS`).

Writing: `adapter_config_to_save` is peft's rule for the saved config (`inference_mode: true`,
`base_model_name_or_path` filled from the model, `auto_mapping` when there is no task type),
`config_text` is the only producer of `adapter_config.json` text (keys sorted, indent 2), and
`write_adapter` commits config, weights and the model card `README.md` (`model_card.py`) together
through `utils.files.commit_files`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from ..utils.files import (
    atomic_write_text,
    commit_files,
    read_weights_file,
    recover_interrupted_save,
    text_writer,
    weights_writer,
)
from .io import hub_kwargs_of
from .model_card import README_NAME, ModelCardInfo, model_card_text, read_existing_card

if TYPE_CHECKING:
    from ..config import PeftConfig


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


def locate_adapter(model_id: Any, subfolder: Optional[str] = None, **kwargs: Any) -> AdapterSource:
    """Resolve `model_id` (a local adapter folder or a hub repo id) once; `kwargs` may hold hub arguments."""
    model_id = os.fspath(model_id)
    hub_kwargs = hub_kwargs_of(kwargs)
    given = hub_kwargs.pop("subfolder", None)
    subfolder = given if subfolder is None else subfolder
    local_dir = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(local_dir):
        try:
            recover_interrupted_save(local_dir)
        except OSError:  # a read-only folder: read what is there
            pass
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
    source = locate_adapter(model_id, **kwargs)
    config = read_config_file(source.file(CONFIG_NAME)) if read_config else None
    return AdapterCheckpoint(config, read_weights_file(source.weights_file(), device=device))


def read_adapter_config(model_id: Any, subfolder: Optional[str] = None, **kwargs: Any) -> dict[str, Any]:
    """The `adapter_config.json` of a local folder or hub repo, as a dict."""
    return read_config_file(locate_adapter(model_id, subfolder=subfolder, **kwargs).file(CONFIG_NAME))


def read_adapter_weights(
    model_id: Any, device: Optional[str] = None, subfolder: Optional[str] = None, **kwargs: Any
) -> dict[str, torch.Tensor]:
    """The tensors of a local folder or hub repo (safetensors, or weights-only `adapter_model.bin`)."""
    device = check_load_device(device)
    return read_weights_file(locate_adapter(model_id, subfolder=subfolder, **kwargs).weights_file(), device=device)


def read_config_file(path: str) -> dict[str, Any]:
    """Read a config JSON file into a dict, with a clear error for a damaged file."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError as exc:
        raise CheckpointError(f"No adapter config at {path!r}.") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path!r} is not valid JSON ({exc}); re-save the adapter or restore the file.") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path!r} must hold a JSON object, found {type(data).__name__}.")
    return data


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
    weights_name = SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
    card = model_card_text(model_card, read_existing_card(directory))
    commit_files(
        directory,
        {
            weights_name: weights_writer(tensors, safe_serialization),
            CONFIG_NAME: text_writer(config_text(config_fields)),
            README_NAME: text_writer(card),
        },
    )


def write_adapter_config(directory: str, config_fields: Mapping[str, Any]) -> None:
    """Write `adapter_config.json` alone (PeftConfig.save_pretrained), atomically."""
    if os.path.isfile(directory):
        raise ConfigError(f"save_directory {directory!r} is a file; pass a directory path.")
    os.makedirs(directory, exist_ok=True)
    atomic_write_text(os.path.join(directory, CONFIG_NAME), config_text(config_fields))
