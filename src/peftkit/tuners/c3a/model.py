"""`C3AModel`: the C3A tuner -- wraps targeted Linear (and GPT-2 Conv1D) modules."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ...errors import ConfigError
from .._core.modules_to_save import ModulesToSaveWrapper
from .._core.tuner import BaseTuner
from ..lora.constants import LORA_TARGET_MODULES_BY_MODEL_TYPE
from .config import C3AConfig
from .layer import SUPPORTED_LAYERS, C3ALayer, dispatch_linear

#: peft's C3A defaults: LoRA's, except GPT-2-style models, whose default is the MLP output.
C3A_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = {
    **LORA_TARGET_MODULES_BY_MODEL_TYPE,
    "gpt2": ["mlp.c_proj"],
    "gpt_bigcode": ["mlp.c_proj"],
}


def block_size_at(config: C3AConfig, key: str) -> int:
    """peft's lookup: the first `block_size_pattern` key matching `.*\\.<key>$`, else the exact module path."""
    patterns = config.block_size_pattern or {}
    found = next((pattern for pattern in patterns if re.match(rf".*\.{pattern}$", key)), key)
    return patterns.get(found, config.block_size)


class C3AModel(BaseTuner):
    """Creates C3A adapters on a model: `C3AModel(model, C3AConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "c3a_"
    default_target_modules = C3A_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = C3ALayer
    dispatchers = (dispatch_linear,)
    display_name = "C3A"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: C3AConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {"block_size": block_size_at(config, key), "init_weights": config.init_weights}

    # ------------------------------------------------------------------ bias="all" / "c3a_only"
    def _check_new_adapter_config(self, config: C3AConfig) -> None:
        with_bias = [name for name, other in self.peft_config.items() if other.bias != "none"]
        if with_bias and config.bias != "none":
            raise ConfigError(
                f"{type(self).__name__} supports only 1 adapter with bias. When using multiple adapters, "
                f"set bias to 'none' for all adapters (adapter {with_bias[0]!r} has "
                f"bias={self.peft_config[with_bias[0]].bias!r})."
            )

    def _bias_parameters(self, config: C3AConfig) -> dict[str, nn.Parameter]:
        """Biases that `bias="all"` / `"c3a_only"` train and save, keyed by their module path."""
        if config.bias == "none":
            return {}
        wrappers = [name for name, module in self.model.named_modules() if isinstance(module, ModulesToSaveWrapper)]
        own = {
            id(module.get_base_layer().bias)
            for module in self.model.modules()
            if isinstance(module, C3ALayer) and getattr(module.get_base_layer(), "bias", None) is not None
        }
        return {
            name.replace("_fsdp_wrapped_module.", ""): param
            for name, param in self.model.named_parameters()
            if name.endswith("bias")
            and (id(param) in own if config.bias == "c3a_only" else not any(name.startswith(w + ".") for w in wrappers))
        }

    def _mark_extra_trainable(self, config: C3AConfig) -> None:
        for param in self._bias_parameters(config).values():
            param.requires_grad_(True)

    def extra_adapter_state(self, adapter_name: str) -> dict[str, Any]:
        return dict(self._bias_parameters(self.peft_config[adapter_name]))

    def tolerated_checkpoint_keys(self, adapter_name: str) -> tuple[str, ...]:
        # With bias="all", peft also writes a head's unused `original_module.bias` / `modules_to_save.bias`.
        if self.peft_config[adapter_name].bias == "all":
            return (r".*\.original_module\.bias$", r".*\.modules_to_save\.bias$")
        return ()
