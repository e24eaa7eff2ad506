"""`OFTModel`: the OFT tuner -- wraps targeted Linear / Conv2d / Embedding (and quantized linear) modules."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from .._core.modules_to_save import ModulesToSaveWrapper
from .._core.tuner import BaseTuner
from ..lora.constants import LORA_TARGET_MODULES_BY_MODEL_TYPE
from .config import OFTConfig
from .layer import SUPPORTED_LAYERS, OFTLayer, dispatch_conv2d, dispatch_embedding, dispatch_linear

#: peft's OFT defaults are LoRA's: the query/value projections per architecture.
OFT_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = dict(LORA_TARGET_MODULES_BY_MODEL_TYPE)

FAN_IN_FAN_OUT_WARNING = (
    "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False."
)


class OFTModel(BaseTuner):
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

    # ------------------------------------------------------------------ bias="all" / "oft_only"
    def _check_new_adapter_config(self, config: OFTConfig) -> None:
        with_bias = [name for name, other in self.peft_config.items() if other.bias != "none"]
        if with_bias and config.bias != "none":
            other = self.peft_config[with_bias[0]].bias
            raise ConfigError(
                f"{type(self).__name__} supports only 1 adapter with bias. When using multiple adapters, "
                f"set bias to 'none' for all adapters (adapter {with_bias[0]!r} has bias={other!r})."
            )

    def _bias_parameters(self, config: OFTConfig) -> dict[str, nn.Parameter]:
        """Biases that `bias="all"` / `"oft_only"` train and save, keyed by their module path."""
        if config.bias == "none":
            return {}
        if config.bias == "oft_only":
            wanted = {
                id(bias)
                for module in self.model.modules()
                if isinstance(module, OFTLayer) and (bias := getattr(module.get_base_layer(), "bias", None)) is not None
            }
            return {
                name.replace("_fsdp_wrapped_module.", ""): param
                for name, param in self.model.named_parameters()
                if id(param) in wanted
            }
        wrappers = [name for name, module in self.model.named_modules() if isinstance(module, ModulesToSaveWrapper)]
        return {
            name.replace("_fsdp_wrapped_module.", ""): param
            for name, param in self.model.named_parameters()
            if name.endswith("bias") and not any(name.startswith(w + ".") for w in wrappers)
        }

    def _mark_extra_trainable(self, config: OFTConfig) -> None:
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
