"""`LNTuningModel`: the LN tuning tuner -- each targeted module runs as a trained copy of itself."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from ...errors import AdapterStateError
from .._core.tuner import BaseTuner
from .layer import LNTuningLayer, dispatch_any

_DECODER_NORMS = ["input_layernorm", "post_attention_layernorm", "norm"]
_GEMMA2_NORMS = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "norm"]

#: peft's LN tuning defaults per architecture (the norm layers).
LN_TUNING_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = {
    "llama": _DECODER_NORMS,
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "llava": [
        "multi_modal_projector", "input_layernorm", "post_attention_layernorm", "norm", "embed_tokens", "lm_head",
    ],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "gptj": ["ln_1", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "mistral": _DECODER_NORMS,
    "phi": ["input_layernorm", "final_layernorm"],
    "gemma": _DECODER_NORMS,
    "gemma2": _GEMMA2_NORMS,
    "gemma3_text": _GEMMA2_NORMS,
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
}


class LNTuningModel(BaseTuner):
    """Creates LN tuning adapters on a model: `LNTuningModel(model, LNTuningConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "ln_tuning_"
    default_target_modules = LN_TUNING_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = LNTuningLayer
    dispatchers = (dispatch_any,)
    display_name = "LN tuning"
    supported_layers = "any module"

    def layer_kwargs(self, config: Any, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {"inference_mode": config.inference_mode}

    def cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Never: the copies must keep the dtype of the layer they replace (as peft)."""

    def _unload(
        self,
        merge: bool,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        """peft's check first: one adapter at a time when any of them has modules_to_save."""
        considered = adapter_names or self.active_adapters
        if len(considered) > 1 and any(self.peft_config[name].modules_to_save for name in considered):
            raise AdapterStateError("Cannot unload multiple adapters that specify `modules_to_save`.")
        return super()._unload(merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
