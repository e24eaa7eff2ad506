"""Hub arguments, and shortcuts to one file of an adapter folder (`adapter_folder` does the work).

The file primitives (safe reads, atomic writes, whole-folder commits) are in `utils/files.py`,
shared with `quantization/`'s model files.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch


#: huggingface_hub arguments users pass through `from_pretrained(..., **kwargs)`: the one list every
#: loader (PeftConfig, PeftModel, the AutoPeftModel classes) filters by.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "repo_type", "subfolder")


def hub_kwargs_of(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The hub arguments among a loader's keyword arguments."""
    return {key: value for key, value in kwargs.items() if key in HUB_KWARGS}


def resolve_adapter_file(
    model_id: str, filename: str, subfolder: Optional[str] = None, **kwargs: Any
) -> str:
    """Local path of `filename` for a local adapter folder or a hub repo id (see `adapter_folder`)."""
    from .adapter_folder import locate_adapter

    return locate_adapter(model_id, subfolder=subfolder, **kwargs).file(filename)


def load_adapter_weights(model_id: str, device: Optional[str] = None, subfolder: Optional[str] = None, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Read `adapter_model.safetensors` (or `adapter_model.bin`, weights only) into a dict (see `adapter_folder`)."""
    from .adapter_folder import read_adapter_weights

    return read_adapter_weights(model_id, device=device, subfolder=subfolder, **kwargs)
