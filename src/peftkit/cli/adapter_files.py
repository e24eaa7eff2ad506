"""Reading an adapter folder (config + weights) for `peftkit merge` and `peftkit inspect`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from peftkit.utils.constants import CONFIG_NAME

from .errors import CliError

#: Last key parts of a sequence-classification head saved through modules_to_save.
HEAD_NAMES = ("classifier", "score")


@dataclass
class AdapterFolder:
    """The parsed files of one saved adapter."""

    path: str
    config: dict[str, Any]
    weights_path: str
    weights: dict[str, torch.Tensor]

    @property
    def spec(self) -> Any:
        """The registry's `MethodSpec` for the config's peft_type, or None when no method has that type."""
        from peftkit.errors import ConfigError
        from peftkit.registry import method_spec

        try:
            return method_spec(self.config.get("peft_type"))
        except ConfigError:
            return None

    @property
    def task(self) -> Optional[str]:
        return {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls"}.get(self.config.get("task_type") or "")

    def num_labels(self) -> Optional[int]:
        """Rows of the saved classification head's weight (None when there is no head)."""
        for key, tensor in self.weights.items():
            parts = key.split(".")
            if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in HEAD_NAMES + ("out_proj",) and tensor.dim() == 2:
                if parts[-2] != "out_proj" or any(h in parts for h in HEAD_NAMES):
                    return int(tensor.shape[0])
        return None


    def label_names(self) -> Optional[list[str]]:
        """Class names `peftkit train` recorded beside the adapter (`metrics.json` "labels"), if any."""
        import json

        try:
            with open(os.path.join(self.path, "metrics.json"), encoding="utf-8") as handle:
                names = json.load(handle).get("labels")
        except (OSError, ValueError, AttributeError):
            return None
        return [str(name) for name in names] if isinstance(names, list) and names else None

    def base_model(self) -> Optional[str]:
        """`base_model_name_or_path`; a relative path is read relative to the adapter folder first."""
        base = self.config.get("base_model_name_or_path")
        if not base or os.path.isabs(base):
            return base
        beside = os.path.join(self.path, base)
        return beside if os.path.isdir(beside) else base


def read_adapter(path: str) -> AdapterFolder:
    """Config and weights of a local adapter folder, read by `checkpoint.adapter_folder`; one-line errors."""
    from peftkit.checkpoint.adapter_folder import locate_adapter, read_config_file
    from peftkit.errors import CheckpointError
    from peftkit.utils.files import read_weights_file

    if not os.path.isdir(path):
        raise CliError(f"adapter folder not found: {path}")
    try:
        def read(source: Any) -> AdapterFolder:  # config and weights of one save, even mid-save
            weights_path = source.weights_file()
            return AdapterFolder(path, read_config_file(source.file(CONFIG_NAME)), weights_path, read_weights_file(weights_path))

        return locate_adapter(path).read(read)
    except CheckpointError as exc:
        raise CliError(str(exc).splitlines()[0]) from exc
