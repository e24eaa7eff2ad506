"""peft's `bias` option, shared by every tuner that has it: `"none"`, `"all"` or `"<method>_only"`.

    bias="none"           no bias trains (the default)
    bias="all"            every bias of the model trains (those inside modules-to-save copies excepted:
                          the copy trains as a whole)
    bias="<method>_only"  the biases of the wrapped (adapted) layers train

The trained biases are saved under their module paths (`encoder.layer.0.query.bias`), as peft saves
them, and only one adapter per model may train biases (they are the model's, not the adapter's).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from .modules_to_save import ModulesToSaveWrapper

#: With bias="all", peft also writes a head's `original_module.bias` and an adapter-less
#: `modules_to_save.bias`; neither is read by the forward (the copy's `<head>.bias` is).
HEAD_BIAS_KEYS = (r".*\.original_module\.bias$", r".*\.modules_to_save\.bias$")


def _checkpoint_name(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "")  # checkpoint keys have no FSDP1 segments


def bias_parameters(model: nn.Module, layer_cls: type, bias: str) -> dict[str, nn.Parameter]:
    """The biases `bias` trains and saves, keyed by their module path (empty for "none")."""
    if bias == "none":
        return {}
    if bias == "all":
        wrappers = [name for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)]
        return {
            _checkpoint_name(name): param
            for name, param in model.named_parameters()
            if name.rpartition(".")[2] == "bias" and not any(name.startswith(w + ".") for w in wrappers)
        }
    # "<method>_only": every wrapped layer's base bias, nested layers (MHA's out_proj) included
    wanted = {
        id(found)
        for module in model.modules()
        if isinstance(module, layer_cls) and (found := getattr(module.get_base_layer(), "bias", None)) is not None
    }
    return {_checkpoint_name(name): param for name, param in model.named_parameters() if id(param) in wanted}


class BiasOptions:
    """Mixin for a `BaseTuner` whose config has peft's `bias` field (put it before `BaseTuner`).

    It fills the tuner's hooks: one adapter with bias per model, the biases trainable, saved with
    the adapter, and a head's unused bias copies tolerated in peft's checkpoints.
    """

    model: nn.Module
    layer_cls: type
    peft_config: dict[str, Any]

    def _bias_parameters(self, config: Any) -> dict[str, nn.Parameter]:
        return bias_parameters(self.model, self.layer_cls, getattr(config, "bias", "none"))

    def _check_new_adapter_config(self, config: Any) -> None:
        super()._check_new_adapter_config(config)  # type: ignore[misc]
        with_bias = [name for name, other in self.peft_config.items() if getattr(other, "bias", "none") != "none"]
        if with_bias and getattr(config, "bias", "none") != "none":
            raise ConfigError(
                f"{type(self).__name__} supports only 1 adapter with bias. When using multiple adapters, set bias "
                f"to 'none' for all adapters (adapter {with_bias[0]!r} has bias={self.peft_config[with_bias[0]].bias!r})."
            )

    def _mark_extra_trainable(self, config: Any) -> None:
        super()._mark_extra_trainable(config)  # type: ignore[misc]
        for param in self._bias_parameters(config).values():
            param.requires_grad_(True)

    def extra_adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        state = super().extra_adapter_state(adapter_name)  # type: ignore[misc]
        return {**state, **self._bias_parameters(self.peft_config[adapter_name])}

    def tolerated_checkpoint_keys(self, adapter_name: str) -> tuple[str, ...]:
        tolerated = super().tolerated_checkpoint_keys(adapter_name)  # type: ignore[misc]
        if getattr(self.peft_config[adapter_name], "bias", "none") == "all":
            tolerated += HEAD_BIAS_KEYS
        return tolerated


def check_bias(value: Any, method_prefix: str) -> None:
    """`bias` is "none", "all" or "<prefix>only" (e.g. "vblora_only")."""
    choices = ("none", "all", f"{method_prefix}only")
    if value not in choices:
        raise ConfigError(f"bias={value!r} is invalid; use one of {', '.join(map(repr, choices))}.")
