"""`BeftModel`: the BEFT tuner -- wraps targeted `nn.Linear` modules (by default the value projections)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .._core.tuner import BaseTuner
from .config import BeftConfig
from .layer import SUPPORTED_LAYERS, BeftLayer, dispatch_linear

#: peft's BEFT defaults: the value projection per architecture.
BEFT_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = {
    "t5": ["v"],
    "mt5": ["v"],
    "roberta": ["value"],
    "opt": ["v_proj"],
    "gptj": ["v_proj"],
    "gpt_neo": ["v_proj"],
    "bart": ["v_proj"],
    "llama": ["v_proj"],
    "llama4": ["v_proj"],
    "mistral": ["v_proj"],
    "mixtral": ["v_proj"],
    "bert": ["value"],
    "deberta-v2": ["value_proj"],
    "phi": ["v_proj"],
    "gemma": ["v_proj"],
    "gemma2": ["v_proj"],
    "gemma3_text": ["v_proj"],
    "qwen2": ["v_proj"],
    "qwen3": ["v_proj"],
}


class BeftModel(BaseTuner):
    """Creates BEFT adapters on a model: `BeftModel(model, BeftConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "beft_"
    default_target_modules = BEFT_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = BeftLayer
    dispatchers = (dispatch_linear,)
    display_name = "BEFT"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: BeftConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {"init_weights": config.init_weights}
