"""`HRAModel`: the HRA tuner -- wraps targeted Linear / Conv2d (and quantized linear) modules."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from .._core.modules_to_save import ModulesToSaveWrapper
from .._core.tuner import BaseTuner
from .._lycoris import LYCORIS_TARGET_MODULES_BY_MODEL_TYPE
from .config import HRAConfig
from .layer import SUPPORTED_LAYERS, HRALayer, dispatch_conv2d, dispatch_linear

#: peft's HRA defaults are a copy of its LoRA table: the query/value projections per architecture
#: (peft's table has no "distilbert" entry).
HRA_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = {
    model_type: targets for model_type, targets in LYCORIS_TARGET_MODULES_BY_MODEL_TYPE.items() if model_type != "distilbert"
}


class HRAModel(BaseTuner):
    """Creates HRA adapters on a model: `HRAModel(model, HRAConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "hra_"
    default_target_modules = HRA_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = HRALayer
    dispatchers = (dispatch_conv2d, dispatch_linear)
    display_name = "HRA"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: HRAConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        """Per-adapter settings every HRA layer receives."""
        return {"r": config.r, "apply_GS": config.apply_GS, "init_weights": config.init_weights}

    # ------------------------------------------------------------------ bias="all" / "hra_only"
    def _check_new_adapter_config(self, config: HRAConfig) -> None:
        with_bias = [name for name, other in self.peft_config.items() if other.bias != "none"]
        if with_bias and config.bias != "none":
            raise ConfigError(
                f"{type(self).__name__} supports only 1 adapter with bias. When using multiple adapters, "
                f"set bias to 'none' for all adapters (adapter {with_bias[0]!r} has "
                f"bias={self.peft_config[with_bias[0]].bias!r})."
            )

    def _bias_parameters(self, config: HRAConfig) -> dict[str, nn.Parameter]:
        """Biases that `bias="all"` / `"hra_only"` train and save, keyed by their module path."""
        if config.bias == "none":
            return {}
        if config.bias == "hra_only":
            wanted = {
                id(bias)
                for _, layer in self.tuner_layers()
                if (bias := getattr(layer.get_base_layer(), "bias", None)) is not None
            }
        else:
            wrappers = [name for name, module in self.adapter_modules() if isinstance(module, ModulesToSaveWrapper)]
            wanted = {
                id(param)
                for name, param in self.model.named_parameters()
                if name.rpartition(".")[2] == "bias" and not any(name.startswith(w + ".") for w in wrappers)
            }
        return {
            name.replace("_fsdp_wrapped_module.", ""): param
            for name, param in self.model.named_parameters()
            if id(param) in wanted
        }

    def _mark_extra_trainable(self, config: HRAConfig) -> None:
        for param in self._bias_parameters(config).values():
            param.requires_grad_(True)

    def extra_adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return dict(self._bias_parameters(self.peft_config[adapter_name]))

    def tolerated_checkpoint_keys(self, adapter_name: str) -> tuple[str, ...]:
        # With bias="all", peft also writes a head's `original_module.bias` and `modules_to_save.bias`,
        # which the forward never reads (the copy's `<head>.bias` is).
        if self.peft_config[adapter_name].bias == "all":
            return (r".*\.original_module\.bias$", r".*\.modules_to_save\.bias$")
        return ()
