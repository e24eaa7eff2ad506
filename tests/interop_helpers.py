"""What the peft <-> peftkit interop tests share: tiny models by case name, outputs, the saved files.

A case name is a tiny architecture of `tests/tiny_models.py` (`"llama"`), optionally with `-bf16`
for the same model in bfloat16.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file
from torch import nn

from tests.tiny_models import MODEL_FACTORIES

#: Config fields whose list order carries no meaning (sets saved as lists).
UNORDERED_CONFIG_FIELDS = ("target_modules", "modules_to_save", "exclude_modules")


def make_model(name: str) -> nn.Module:
    """A fresh tiny model for case `name` (`<arch>` or `<arch>-bf16`)."""
    if name.endswith("-bf16"):
        return MODEL_FACTORIES[name.removesuffix("-bf16")].make_model().to(torch.bfloat16)
    return MODEL_FACTORIES[name].make_model()


def make_inputs(name: str) -> dict:
    """The tiny model's example batch for case `name`."""
    return MODEL_FACTORIES[name.removesuffix("-bf16")].make_inputs()


def output(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The model's logits (or its output, when it returns a tensor), without gradients."""
    with torch.no_grad():
        result = model(**inputs)
    return result if isinstance(result, torch.Tensor) else result.logits


def read_weights(directory: str) -> dict[str, torch.Tensor]:
    """The tensors of `directory/adapter_model.safetensors`."""
    return load_file(os.path.join(directory, "adapter_model.safetensors"))


def read_config(directory: str, comparable: bool = False) -> dict:
    """`directory/adapter_config.json`; with `comparable`, without `peft_version` and with set-like lists sorted."""
    with open(os.path.join(directory, "adapter_config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    if comparable:
        config.pop("peft_version", None)
        for key in UNORDERED_CONFIG_FIELDS:
            if isinstance(config.get(key), list):
                config[key] = sorted(config[key])
    return config
