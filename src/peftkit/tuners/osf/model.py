"""`OSFModel`: the OSF tuner -- wraps targeted dense `nn.Linear` modules; merges, never unmerges."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Union

from torch import nn

from ...quantization.weights import is_quantized
from .._core.base_layers import base_of
from .._core.tuner import BaseTuner
from .config import OSFConfig
from .layer import SUPPORTED_LAYERS, OSFLayer, dispatch_linear

_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]

#: peft's OSF defaults per architecture; other models get every linear layer ("all-linear").
OSF_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = {
    **dict.fromkeys(
        ("llama", "llama4", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "phi"),
        _PROJECTIONS,
    ),
    "gpt2": ["c_attn", "c_proj"],
    "bloom": ["query_key_value", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "gpt_bigcode": ["c_attn", "c_proj"],
}

UNMERGE_ERROR = "OSF models do not support unmerging"


def resolve_effective_rank(value: Optional[Union[int, float]], min_dim: int) -> int:
    """peft's rule: None -> min_dim // 2; a float in (0, 1] -> int(min_dim * value); else int(value).

    The result is clipped to [0, min_dim]; a layer refuses 0 (nothing would be frozen).
    """
    if value is None:
        return max(min_dim // 2, 0)
    rank = int(min_dim * value) if isinstance(value, float) and 0 < value <= 1 else int(value)
    return max(min(min_dim, rank), 0)


class OSFModel(BaseTuner):
    """Creates OSF adapters on a model: `OSFModel(model, OSFConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    Targets that are not `nn.Linear` (or have no 2-D weight) are passed over silently, as in peft.
    """

    prefix = "osf_"
    default_target_modules = OSF_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = OSFLayer
    dispatchers = (dispatch_linear,)
    display_name = "OSF"
    supported_layers = SUPPORTED_LAYERS

    def _prepare_adapter_config(self, config: OSFConfig) -> OSFConfig:
        """No target_modules and no default for the architecture: every linear layer (peft's fallback)."""
        if config.target_modules is None and self._model_type() not in self.default_target_modules:
            config = dataclasses.replace(config, target_modules="all-linear")
        return super()._prepare_adapter_config(config)

    def layer_kwargs(self, config: OSFConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        weight = getattr(target, "weight", None)
        min_dim = min(weight.shape) if weight is not None and weight.dim() == 2 else 0
        effective_rank = resolve_effective_rank(config.effective_rank, min_dim)
        for pattern, value in (config.rank_pattern or {}).items():
            if re.search(pattern, key):  # peft: searched in the module path, the first match wins
                effective_rank = resolve_effective_rank(value, min_dim)
                break
        return {"effective_rank": effective_rank, "init_weights": config.init_weights}

    def _create_and_replace(
        self, config: Any, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module, current_key: str
    ) -> None:
        """As peft: a target without a 2-D weight, or one that is not a dense Linear, is left as it is."""
        weight = getattr(target, "weight", None)
        if weight is None or weight.dim() != 2:
            return
        base = base_of(target)
        if not isinstance(base, nn.Linear) and not is_quantized(base):
            return  # a quantized base reaches the dispatcher, which refuses it with a clear error
        super()._create_and_replace(config, adapter_name, target, target_name, parent, current_key)

    def unmerge_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Refused: OSF writes the merged weights in place and keeps no way back (peft's error)."""
        raise NotImplementedError(UNMERGE_ERROR)

