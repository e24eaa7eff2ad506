"""Reading an adapter folder (config + weights) for `peftkit merge` and `peftkit inspect`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .errors import CliError

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
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


def read_adapter(path: str) -> AdapterFolder:
    """Parse `adapter_config.json` and the weights of a local adapter folder; one-line errors."""
    from peftkit.checkpoint.io import read_weights_file

    if not os.path.isdir(path):
        raise CliError(f"adapter folder not found: {path}")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise CliError(f"no {CONFIG_FILE} in {path}; is it an adapter folder written by save_pretrained?")
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except json.JSONDecodeError as exc:
        raise CliError(f"{config_path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    weights_path = next((os.path.join(path, n) for n in WEIGHT_FILES if os.path.isfile(os.path.join(path, n))), None)
    if weights_path is None:
        raise CliError(f"no adapter weights ({' or '.join(WEIGHT_FILES)}) in {path}")
    return AdapterFolder(path, config, weights_path, read_weights_file(weights_path))
