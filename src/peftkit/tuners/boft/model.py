"""`BOFTModel`: the BOFT tuner -- wraps targeted Linear / Conv2d (and quantized linear) modules."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._core.bias import BiasOptions
from .._core.tuner import BaseTuner
from ..lora.constants import LORA_TARGET_MODULES_BY_MODEL_TYPE
from .config import BOFTConfig
from .layer import SUPPORTED_LAYERS, BOFTLayer, dispatch_conv2d, dispatch_linear

#: peft's BOFT defaults are LoRA's: the query/value projections per architecture.
BOFT_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = dict(LORA_TARGET_MODULES_BY_MODEL_TYPE)

FAN_IN_FAN_OUT_WARNING = (
    "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False."
)
REFIT_WARNING = (
    "The BOFT checkpoint holds {saved} butterfly factor(s) per layer but its config says boft_n_butterfly_factor="
    "{configured}; loading it as saved ({saved}). peft without its CUDA extension (fbd) always trains with 1."
)


class BOFTModel(BiasOptions, BaseTuner):
    """Creates BOFT adapters on a model: `BOFTModel(model, BOFTConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "boft_"
    default_target_modules = BOFT_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = BOFTLayer
    dispatchers = (dispatch_conv2d, dispatch_linear)
    display_name = "BOFT"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: BOFTConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        """Per-adapter settings every BOFT layer receives (block size / count are resolved per layer)."""
        return {
            "boft_block_size": config.boft_block_size,
            "boft_block_num": config.boft_block_num,
            "boft_n_butterfly_factor": config.boft_n_butterfly_factor,
            "boft_dropout": config.boft_dropout,
            "init_weights": config.init_weights,
        }

    def new_layer_kwargs(self, config: BOFTConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        # As peft: a Linear target corrects fan_in_fan_out=True (convolutions ignore it).
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        if config.fan_in_fan_out and not isinstance(base, nn.Conv2d):
            warnings.warn(FAN_IN_FAN_OUT_WARNING, stacklevel=5)
            config.fan_in_fan_out = False
        return {}

    # ------------------------------------------------------------------ loading
    def fit_to_checkpoint(self, adapter_name: str, state: Mapping[str, torch.Tensor], prefix: str) -> None:
        """Give each layer the number of butterfly factors its checkpoint `boft_R` has.

        peft without its CUDA extension trains with one factor whatever `boft_n_butterfly_factor`
        says (and saves that config); such checkpoints load as they were trained.
        """
        configured = self.peft_config[adapter_name].boft_n_butterfly_factor
        warned = False
        for name, layer in self.tuner_layers():
            if adapter_name not in layer.boft_R:
                continue
            key = prefix + name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
            saved = state.get(key + ".boft_R")
            live = layer.boft_R[adapter_name]
            if saved is None or saved.dim() != 4 or saved.shape == live.shape or saved.shape[1:] != live.shape[1:]:
                continue  # absent, or a mismatch the loader reports
            if not warned:
                warnings.warn(REFIT_WARNING.format(saved=saved.shape[0], configured=configured), stacklevel=4)
                warned = True
            layer.refit_factors(adapter_name, int(saved.shape[0]))
