"""`MissModel`: the MiSS tuner -- wraps targeted Linear (and quantized linear) modules."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._core.modules_to_save import ModulesToSaveWrapper
from .._core.tuner import BaseTuner
from ..hira.model import HIRA_TARGET_MODULES_BY_MODEL_TYPE
from .config import MissConfig
from .layer import SUPPORTED_LAYERS, MissLayer, dispatch_linear

#: peft's MiSS defaults: the same copy of its LoRA table as HiRA's.
MISS_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = dict(HIRA_TARGET_MODULES_BY_MODEL_TYPE)


class MissModel(BaseTuner):
    """Creates MiSS adapters on a model: `MissModel(model, MissConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "miss_"
    default_target_modules = MISS_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = MissLayer
    dispatchers = (dispatch_linear,)
    display_name = "MiSS"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: MissConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {"r": config.r, "mini_r": config.mini_r, "miss_dropout": config.miss_dropout,
                "init_weights": config.init_weights}

    def _bias_parameters(self, config: MissConfig) -> dict[str, nn.Parameter]:
        """Biases that bias="all" / "..._only" train and save (as peft), keyed by their module path."""
        if config.bias == "none":
            return {}
        if config.bias == "all":
            wanted = None
        else:
            wanted = {id(b) for _, layer in self.tuner_layers() if (b := getattr(layer.get_base_layer(), "bias", None)) is not None}
        wrappers = [name for name, module in self.model.named_modules() if isinstance(module, ModulesToSaveWrapper)]
        return {
            name.replace("_fsdp_wrapped_module.", ""): param
            for name, param in self.model.named_parameters()
            if name.endswith("bias") and (wanted is None or id(param) in wanted)
            and not any(name.startswith(w + ".") for w in wrappers)
        }

    def _mark_extra_trainable(self, config: MissConfig) -> None:
        for param in self._bias_parameters(config).values():
            param.requires_grad_(True)

    def tolerated_checkpoint_keys(self, adapter_name: str) -> tuple[str, ...]:
        # With bias="all", peft also writes the head's `original_module.bias` and an adapter-less
        # `modules_to_save.bias`; neither is used in forward (the copy's `<head>.bias` is).
        if self.peft_config[adapter_name].bias == "all":
            return (r".*\.original_module\.bias$", r".*\.modules_to_save\.bias$")
        return ()

    def extra_adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return dict(self._bias_parameters(self.peft_config[adapter_name]))
