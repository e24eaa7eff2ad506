"""`ShiraModel`: the SHiRA tuner -- wraps targeted `nn.Linear` (and quantized linear) modules."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._core.base_layers import base_of
from .._core.tuner import BaseTuner
from ..hira.model import HIRA_TARGET_MODULES_BY_MODEL_TYPE
from .config import ShiraConfig
from .layer import SUPPORTED_LAYERS, ShiraLayer, dispatch_linear, is_supported, refuse_other_layers

#: peft's SHiRA defaults: its copy of the LoRA table (the query/value projections per architecture),
#: with phi reduced to its attention projections.
SHIRA_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = {**HIRA_TARGET_MODULES_BY_MODEL_TYPE, "phi": ["q_proj", "v_proj"]}


class ShiraModel(BaseTuner):
    """Creates SHiRA adapters on a model: `ShiraModel(model, ShiraConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "shira_"
    default_target_modules = SHIRA_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = ShiraLayer
    dispatchers = (dispatch_linear, refuse_other_layers)
    display_name = "SHiRA"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: ShiraConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        base = base_of(target)
        mask = None
        if config.mask_fn is not None and is_supported(base):  # other layers are refused by the dispatchers
            extra = {"random_seed": config.random_seed} if config.mask_type == "random" else {}
            mask = config.mask_fn(base, config.r, bias=getattr(base, "bias", None) is not None, **extra)
        return {"mask": mask, "r": config.r, "init_weights": config.init_weights}

    def new_layer_kwargs(self, config: ShiraConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        # As peft: linear weights are (out, in); the adapter's (private) config records fan_in_fan_out=False.
        if isinstance(base_of(target), nn.Linear) and config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                "Setting fan_in_fan_out to False.",
                stacklevel=5,
            )
            config.fan_in_fan_out = False
        return {}

    def fit_to_checkpoint(self, adapter_name: str, state: Mapping[str, torch.Tensor], prefix: str) -> None:
        """Take each layer's positions from the checkpoint (`<module>.shira_indices`), as peft does.

        They replace the ones the mask function drew (a checkpoint trained with another seed or a
        custom mask loads as trained); float indices (peft on Windows) become int32 again.
        """
        for name, layer in self.tuner_layers():
            if adapter_name not in layer.shira_weight:
                continue
            key = prefix + name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
            saved = state.get(key + ".shira_indices")
            if saved is not None and saved.dim() == 2 and saved.shape[0] == 2:
                layer.set_indices(adapter_name, saved.to(torch.int))
                if isinstance(state, dict):
                    state[key + ".shira_indices"] = layer.shira_indices[adapter_name]
