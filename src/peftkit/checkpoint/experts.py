"""Saved LoRA adapters read as experts for methods that mix them (X-LoRA).

The tuner (`tuners/xlora/`) builds the experts' layers from their configs and asks each expert to
load itself into them; reading folders (local or hub) and loading state dicts is checkpoint work,
so it happens here, above the tuners.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PeftConfig
from ..errors import ConfigError
from .adapter_folder import read_adapter
from .state_dict import set_peft_model_state_dict


@dataclass
class LoraExpert:
    """One saved LoRA adapter: its config and its tensors (checkpoint keys)."""

    location: str
    config: PeftConfig
    weights: dict[str, torch.Tensor]

    def load_into(self, tuner: nn.Module, adapter_name: str) -> None:
        """Copy the tensors into `tuner`'s adapter `adapter_name` (every key must fit)."""
        set_peft_model_state_dict(tuner, self.weights, adapter_name=adapter_name, strict=True)


def read_lora_experts(locations: Mapping[str, str]) -> dict[str, LoraExpert]:
    """{name: LoraExpert} for {name: folder or hub id}; every one must be a LoRA adapter."""
    experts = {}
    for name, location in locations.items():
        checkpoint = read_adapter(location, read_config=True)
        config = PeftConfig.from_dict(checkpoint.config)
        if str(config.peft_type) != "LORA":
            raise ConfigError(f"Expert {name!r} at {location!r} is a {config.peft_type} adapter; experts must be LoRA.")
        experts[name] = LoraExpert(str(location), config, checkpoint.weights)
    return experts
