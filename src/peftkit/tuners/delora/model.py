"""`DeloraModel`: the DeLoRA tuner -- wraps targeted `nn.Linear` modules."""

from __future__ import annotations

from typing import Any

from torch import nn

from .._core.bias import BiasOptions
from .._core.matching import pattern_value
from .._core.tuner import BaseTuner
from ..hira.model import HIRA_TARGET_MODULES_BY_MODEL_TYPE
from .config import DeloraConfig
from .layer import SUPPORTED_LAYERS, DeloraLayer, dispatch_linear

#: peft's DeLoRA defaults: a copy of its LoRA table (the query/value projections per architecture), as HiRA's.
DELORA_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = dict(HIRA_TARGET_MODULES_BY_MODEL_TYPE)
#: peft's name for the same table (the same object: changing one changes the other).
TRANSFORMERS_MODELS_TO_DELORA_TARGET_MODULES_MAPPING = DELORA_TARGET_MODULES_BY_MODEL_TYPE


class DeloraModel(BiasOptions, BaseTuner):
    """Creates DeLoRA adapters on a model: `DeloraModel(model, DeloraConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "delora_"
    default_target_modules = DELORA_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = DeloraLayer
    dispatchers = (dispatch_linear,)
    display_name = "DeLoRA"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: DeloraConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {
            "r": pattern_value(config.rank_pattern, key, config.r, "rank_pattern"),
            "delora_lambda": pattern_value(config.lambda_pattern, key, config.delora_lambda, "lambda_pattern"),
            "module_dropout": config.module_dropout,
            "init_weights": config.init_weights,
            "inference_mode": config.inference_mode,
        }
