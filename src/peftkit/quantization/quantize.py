"""`QuantizationConfig` and `quantize_model`: swap a model's `nn.Linear` layers for quantized ones.

The config mirrors transformers' `BitsAndBytesConfig` field names, and `quantize_model` accepts a
`BitsAndBytesConfig` as it is, so code written for bitsandbytes keeps its config object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from ..errors import ConfigError
from .formats import BLOCKSIZE_4BIT, QUANT_TYPES
from .linear import DTypeLike, Linear4bit, Linear8bit, QuantizedLinearBase, as_dtype


@dataclass(frozen=True)
class QuantizationConfig:
    """How to quantize a model's linear layers (4-bit NF4/FP4 or 8-bit int8).

    Args:
        load_in_4bit: quantize to 4 bits (`bnb_4bit_quant_type`, blocks of 64).
        load_in_8bit: quantize to int8 with one absmax per output row.
        bnb_4bit_quant_type: "nf4" (QLoRA's NormalFloat) or "fp4".
        bnb_4bit_use_double_quant: also quantize the per-block absmax constants to 8 bits.
        bnb_4bit_compute_dtype: dtype the weight is dequantized to for the matmul.
        llm_int8_skip_modules: module names (or name suffixes) kept in full precision; the output
            head is always kept.
    """

    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_compute_dtype: DTypeLike = torch.float32
    llm_int8_skip_modules: Optional[list[str]] = field(default=None)
    blocksize: int = BLOCKSIZE_4BIT

    def __post_init__(self) -> None:
        if self.load_in_4bit == self.load_in_8bit:
            raise ConfigError(
                f"load_in_4bit={self.load_in_4bit} and load_in_8bit={self.load_in_8bit}: set exactly one of them to True."
            )
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise ConfigError(f"bnb_4bit_quant_type={self.bnb_4bit_quant_type!r} is not supported; use 'nf4' or 'fp4'.")
        object.__setattr__(self, "bnb_4bit_compute_dtype", as_dtype(self.bnb_4bit_compute_dtype))

    @classmethod
    def from_any(cls, config: Any) -> "QuantizationConfig":
        """A `QuantizationConfig` from itself, a transformers `BitsAndBytesConfig` or a dict of the same fields."""
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            values = config
        else:
            values = {name: getattr(config, name) for name in cls.__dataclass_fields__ if hasattr(config, name)}
        known = {name: value for name, value in values.items() if name in cls.__dataclass_fields__}
        return cls(**known)


def _output_head_names(model: nn.Module) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def _is_skipped(name: str, skip: list[str]) -> bool:
    parts = name.split(".")
    return any(name == entry or name.endswith("." + entry) or entry in parts for entry in skip)


def quantize_model(model: nn.Module, config: Union[QuantizationConfig, Any]) -> nn.Module:
    """Replace every `nn.Linear` of `model` (in place) by a `Linear4bit` / `Linear8bit`.

    Skipped: the output head (`get_output_embeddings()`) and modules named in
    `llm_int8_skip_modules`. Sets `model.is_loaded_in_4bit` / `is_loaded_in_8bit` as transformers does.
    """
    config = QuantizationConfig.from_any(config)
    skip = list(config.llm_int8_skip_modules or [])
    heads = _output_head_names(model)
    targets = [
        (name, module) for name, module in model.named_modules()
        if type(module) is nn.Linear and name not in heads and not _is_skipped(name, skip)
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized(module, config))
    model.is_loaded_in_4bit = config.load_in_4bit
    model.is_loaded_in_8bit = config.load_in_8bit
    model.peftkit_quantization_config = config
    return model


def _quantized(linear: nn.Linear, config: QuantizationConfig) -> QuantizedLinearBase:
    if config.load_in_8bit:
        return Linear8bit.from_linear(linear, compute_dtype=config.bnb_4bit_compute_dtype)
    return Linear4bit.from_linear(
        linear, compute_dtype=config.bnb_4bit_compute_dtype, quant_type=config.bnb_4bit_quant_type,
        double_quant=config.bnb_4bit_use_double_quant, blocksize=config.blocksize,
    )


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every `Linear4bit` / `Linear8bit` (also under adapter layers) by a dense `nn.Linear`, in place.

    On a PEFT model, call it before `merge_and_unload()` to merge into dense weights (no re-quantization).
    """
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, QuantizedLinearBase)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.to_linear(dtype))
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    return model
