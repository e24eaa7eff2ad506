"""`QuantizationConfig` and `quantize_model`: swap a model's `nn.Linear` layers for quantized ones.

The config mirrors transformers' `BitsAndBytesConfig` field names, and `quantize_model` accepts a
`BitsAndBytesConfig` as it is, so code written for bitsandbytes keeps its config object.

A quantized model's state dict holds everything its layers need (packed codes, absmax constants,
biases), and its shapes follow from the layer sizes and the config alone, so a saved model comes
back exactly by quantizing a fresh model of the same architecture and loading the state dict:

    save_quantized_model(model, "out")               # weights + quantization config (+ model config)
    model = load_quantized_model(LlamaForCausalLM, "out")      # or a fresh model instance

    # by hand, the same thing:
    torch.save(model.state_dict(), "q.pt")
    fresh = quantize_model(make_model(), config)
    fresh.load_state_dict(torch.load("q.pt"))
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from ..utils.commits import commit_files, read_snapshot
from ..utils.files import read_weights_file, text_writer, weights_writer
from ..errors import CheckpointError, ConfigError
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


QUANTIZED_WEIGHTS_NAME = "quantized_model.safetensors"
QUANTIZATION_CONFIG_NAME = "peftkit_quantization_config.json"
MODEL_CONFIG_NAME = "config.json"


def _config_to_dict(config: QuantizationConfig) -> dict[str, Any]:
    values = dataclasses.asdict(config)
    values["bnb_4bit_compute_dtype"] = str(config.bnb_4bit_compute_dtype).removeprefix("torch.")
    return values


def save_quantized_model(model: nn.Module, save_directory: str) -> None:
    """Save a `quantize_model`-ed model: its whole state dict, its `QuantizationConfig` and its
    transformers `config` (when it has one), as `load_quantized_model` reads them back.
    """
    config = getattr(model, "peftkit_quantization_config", None)
    if config is None:
        raise ConfigError(
            f"{type(model).__name__} was not quantized by peftkit.quantization.quantize_model; "
            "call quantize_model(model, config) first, or save it with its own save_pretrained()."
        )
    writers = {
        QUANTIZED_WEIGHTS_NAME: weights_writer(model.state_dict()),
        QUANTIZATION_CONFIG_NAME: text_writer(json.dumps(_config_to_dict(config), indent=2, sort_keys=True)),
    }
    model_config = getattr(model, "config", None)
    if hasattr(model_config, "to_json_string"):
        writers[MODEL_CONFIG_NAME] = text_writer(model_config.to_json_string())
    commit_files(save_directory, writers)


def load_quantized_model(model: Union[nn.Module, type], save_directory: str) -> nn.Module:
    """Rebuild a model saved by `save_quantized_model`, with exactly its codes and constants.

    Args:
        model: a fresh, not yet quantized model of the saved architecture (its weights are
            replaced), or a transformers model class, built from the saved `config.json`.
        save_directory: the folder `save_quantized_model` wrote.
    """
    config_path = os.path.join(save_directory, QUANTIZATION_CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise CheckpointError(
            f"{save_directory!r} has no {QUANTIZATION_CONFIG_NAME}; it was not written by save_quantized_model()."
        )

    def read() -> tuple[Any, dict[str, torch.Tensor]]:  # one save's config and weights, even mid-save
        with open(config_path, encoding="utf-8") as handle:
            fields = json.load(handle)
        return fields, read_weights_file(os.path.join(save_directory, QUANTIZED_WEIGHTS_NAME))

    fields, state = read_snapshot(save_directory, read)
    config = QuantizationConfig.from_any(fields)
    if isinstance(model, type):
        config_class = getattr(model, "config_class", None)
        if config_class is None:
            raise ConfigError(
                f"{model.__name__} is not a transformers model class; pass a fresh model instance instead."
            )
        model = model(config_class.from_pretrained(save_directory))
    if getattr(model, "peftkit_quantization_config", None) is None:
        quantize_model(model, config)
    elif model.peftkit_quantization_config != config:
        raise ConfigError(
            f"The model is already quantized with {model.peftkit_quantization_config}, not the saved {config}; "
            "pass a model that is not quantized yet."
        )
    model.load_state_dict(state, strict=True)
    return model
