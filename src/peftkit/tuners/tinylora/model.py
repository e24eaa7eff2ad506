"""`TinyLoraModel`: the TinyLoRA tuner -- owns the trainable vectors v and wraps Linear / Conv1D / Embedding.

Targets are numbered in module order (peft's rule, over every module the config selects); number
i seeds its projection with `projection_seed + i` and, with `weight_tying`, falls in group
`min(i // group_size, groups - 1)`, `groups = max(1, round(n * (1 - weight_tying)))`. The groups'
vectors live in `self.tinylora_v[adapter][str(group)]` and are saved once each, as peft does:
`base_model.tinylora_v.<group>`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._core.base_layers import correct_fan_in_fan_out
from .._core.matching import is_targeted
from .._core.bias import BiasOptions
from .._core.tuner import BaseTuner
from ..lora.constants import LORA_TARGET_MODULES_BY_MODEL_TYPE
from .config import TinyLoraConfig
from .layer import SUPPORTED_LAYERS, TinyLoraLayer, dispatch_embedding, dispatch_linear

#: peft's TinyLoRA defaults are LoRA's: the query/value projections per architecture.
TINYLORA_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = dict(LORA_TARGET_MODULES_BY_MODEL_TYPE)

#: Checkpoint key of a group's vector, below the PeftModel (not below the wrapped model).
VECTOR_KEY = "base_model.tinylora_v."

_NUMBERED_KINDS = (nn.Linear, Conv1D, nn.Embedding, TinyLoraLayer)


def group_of(index: int, num_targets: int, weight_tying: float) -> int:
    """The vector group of target number `index` of `num_targets` (peft's rounding: Python's round)."""
    num_groups = max(1, round(num_targets * (1.0 - weight_tying)))
    group_size = max(1, num_targets // num_groups)
    return min(index // group_size, num_groups - 1)


class TinyLoraModel(BiasOptions, BaseTuner):
    """Creates TinyLoRA adapters on a model: `TinyLoraModel(model, TinyLoraConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "tinylora_"
    uses_shared_state = True  # the shared v vectors live on the tuner
    default_target_modules = TINYLORA_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = TinyLoraLayer
    dispatchers = (dispatch_embedding, dispatch_linear)
    display_name = "TinyLoRA"
    supported_layers = SUPPORTED_LAYERS

    # ------------------------------------------------------------------ the shared vectors
    def _vector_dicts(self) -> nn.ModuleDict:
        """adapter name -> ParameterDict(group -> v); made on first use (the core injects in __init__)."""
        if "tinylora_v" not in self._modules:
            self.tinylora_v = nn.ModuleDict({})
        return self._modules["tinylora_v"]

    def _target_numbers(self, config: TinyLoraConfig, adapter_name: str, key: str) -> dict[str, int]:
        """Module path -> number of every module `config` selects (rebuilt when `key` is new, as peft)."""
        cache: dict[str, dict[str, int]] = self.__dict__.setdefault("_target_key_to_idx", {})
        numbers = cache.get(adapter_name)
        if numbers is None or key not in numbers:
            numbers = {}
            for name, module in self.model.named_modules():
                if name and isinstance(module, _NUMBERED_KINDS) and is_targeted(config, name):
                    numbers[name] = len(numbers)
            numbers.setdefault(key, len(numbers))  # a target named by a state_dict only
            cache[adapter_name] = numbers
        return numbers

    def _new_vector(self, config: TinyLoraConfig, target: nn.Module) -> nn.Parameter:
        """v of one group, in the target's weight dtype: zeros, uniform, or left empty (init_weights=False)."""
        weight = getattr(target, "weight", None)
        dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else None
        vector = torch.empty(config.u, dtype=dtype)
        if config.init_weights is True:
            nn.init.zeros_(vector)
        elif config.init_weights == "uniform":
            nn.init.uniform_(vector, -config.init_v_bound, config.init_v_bound)
        return nn.Parameter(vector)

    def _init_tinylora_v(self, config: TinyLoraConfig, adapter_name: str) -> None:
        """Draw every vector of `adapter_name` again from U(-init_v_bound, init_v_bound) (peft's name)."""
        for vector in self._vector_dicts()[adapter_name].values() if adapter_name in self._vector_dicts() else ():
            with torch.no_grad():
                nn.init.uniform_(vector, -config.init_v_bound, config.init_v_bound)

    # ------------------------------------------------------------------ the method contract
    def layer_kwargs(self, config: TinyLoraConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        numbers = self._target_numbers(config, adapter_name, key)
        group = str(group_of(numbers[key], len(numbers), config.weight_tying))
        dicts = self._vector_dicts()
        if adapter_name not in dicts:
            dicts[adapter_name] = nn.ParameterDict({})
        if group not in dicts[adapter_name]:
            dicts[adapter_name][group] = self._new_vector(config, target)
        return {
            "vectors": dicts[adapter_name],
            "v_key": group,
            "r": config.r,
            "u": config.u,
            "projection_seed": config.projection_seed,
            "save_projection": config.save_projection,
            "tinylora_dropout": config.tinylora_dropout,
        }

    def new_layer_kwargs(
        self, config: TinyLoraConfig, adapter_name: str, key: str, target: nn.Module
    ) -> dict[str, Any]:
        correct_fan_in_fan_out(config, target)  # as peft: the base decides the layout
        return {"layer_idx": self._target_numbers(config, adapter_name, key)[key]}

    def _check_new_adapter_config(self, config: TinyLoraConfig) -> None:
        super()._check_new_adapter_config(config)
        values = sorted({other.save_projection for other in self.peft_config.values()} | {config.save_projection})
        if len(values) > 1:
            raise TypeError(
                "TinyLoRA projection tensors must be saved for all adapters or none, but got multiple different "
                f"values: {values}"
            )

    def _remove_adapter_from_layers(self, adapter_name: str) -> None:
        """Also drop the adapter's vectors and target numbering (delete_adapter, or a failed add_adapter)."""
        super()._remove_adapter_from_layers(adapter_name)
        dicts = self._vector_dicts()
        if adapter_name in dicts:
            del dicts[adapter_name]
        self.__dict__.get("_target_key_to_idx", {}).pop(adapter_name, None)

    # ------------------------------------------------------------------ checkpoints
    def extra_adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The group vectors (`base_model.tinylora_v.<group>`, see `state_for_save`) and trained biases."""
        dicts = self._vector_dicts()
        state = super().extra_adapter_state(adapter_name)
        if adapter_name in dicts:
            state.update({VECTOR_KEY + group: vector for group, vector in dicts[adapter_name].items()})
        return state

    def state_for_save(self, adapter_name: str, state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        # The vectors belong to the tuner, not to the wrapped model: their keys drop the model's prefix.
        marker = prefix + VECTOR_KEY
        return {(key[len(prefix):] if key.startswith(marker) else key): value for key, value in state.items()}

    def tolerated_checkpoint_keys(self, adapter_name: str) -> tuple[str, ...]:
        config = self.peft_config[adapter_name]
        # peft regenerates P from the seed when save_projection=False, ignoring saved ones.
        tolerated = () if config.save_projection else (r".*\.tinylora_P$",)
        return super().tolerated_checkpoint_keys(adapter_name) + tolerated
