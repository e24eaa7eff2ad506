"""Cartridges composed on disk: several saved cartridges (KV-cache prefixes) become one (peft's helper).

It reads and writes adapter folders, so it lives with the checkpoint code, above the method folder
(`tuners/cartridge/`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import torch

from ..config import PeftConfig
from ..errors import ConfigError
from ..utils.peft_types import PeftType
from .adapter_folder import write_adapter
from .state_dict import load_peft_weights


def compose_cartridge_adapters(
    adapter_paths: Sequence[Union[str, Path]], *, output_path: Union[str, Path], safe_serialization: bool = True
) -> None:
    """Write one cartridge whose table is the saved cartridges' tables one after the other (the paper's
    composition by concatenation); it keeps the first one's `num_frozen_tokens`."""
    paths = [str(path) for path in adapter_paths]
    if len(paths) < 2:
        raise ValueError("Need at least 2 adapters to compose.")
    configs = [PeftConfig.from_pretrained(path) for path in paths]
    for path, config in zip(paths, configs):
        if config.peft_type != PeftType.CARTRIDGE:
            raise ValueError(f"Adapter at '{path}' is not a CARTRIDGE adapter (got {config.peft_type}).")
    first = configs[0]
    for path, config in zip(paths[1:], configs[1:]):
        for attr in ("task_type", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"):
            if getattr(config, attr) != getattr(first, attr):
                raise ConfigError(
                    f"Incompatible CARTRIDGE configs for attribute '{attr}': {getattr(first, attr)!r} in "
                    f"'{paths[0]}', {getattr(config, attr)!r} in '{path}'; compose cartridges of one base model."
                )
    tables = [load_peft_weights(path, device="cpu")["prompt_embeddings"] for path in paths]
    composed = torch.cat(tables, dim=0)
    config = dataclasses.replace(first, num_virtual_tokens=composed.shape[0], num_frozen_tokens=first.num_frozen_tokens)
    write_adapter(str(output_path), config.to_dict(), {"prompt_embeddings": composed}, safe_serialization)
