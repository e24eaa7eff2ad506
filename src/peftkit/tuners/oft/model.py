"""`OFTModel`: the OFT tuner -- wraps targeted Linear / Conv2d / Embedding (and quantized linear) modules."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from .._core.bias import BiasOptions
from .._core.tuner import BaseTuner
from ..lora.constants import LORA_TARGET_MODULES_BY_MODEL_TYPE
from .config import OFTConfig
from .layer import SUPPORTED_LAYERS, OFTLayer, dispatch_conv2d, dispatch_embedding, dispatch_linear

#: peft's OFT defaults are LoRA's: the query/value projections per architecture.
OFT_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = dict(LORA_TARGET_MODULES_BY_MODEL_TYPE)

FAN_IN_FAN_OUT_WARNING = (
    "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False."
)


class OFTModel(BiasOptions, BaseTuner):
    """Creates OFT adapters on a model: `OFTModel(model, OFTConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "oft_"
    default_target_modules = OFT_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = OFTLayer
    dispatchers = (dispatch_embedding, dispatch_conv2d, dispatch_linear)
    display_name = "OFT"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: OFTConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        """Per-adapter settings every OFT layer receives (r / block size are resolved per layer)."""
        return {
            "r": config.r,
            "oft_block_size": config.oft_block_size,
            "module_dropout": config.module_dropout,
            "coft": config.coft,
            "eps": config.eps,
            "block_share": config.block_share,
            "init_weights": config.init_weights,
            "use_cayley_neumann": config.use_cayley_neumann,
            "num_cayley_neumann_terms": config.num_cayley_neumann_terms,
        }

    def new_layer_kwargs(self, config: OFTConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        # As peft: a Linear target corrects fan_in_fan_out=True (embeddings and convs ignore it).
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        if config.fan_in_fan_out and not isinstance(base, (nn.Embedding, nn.Conv2d)):
            warnings.warn(FAN_IN_FAN_OUT_WARNING, stacklevel=5)
            config.fan_in_fan_out = False
        return {}
