"""`UniLoraModel`: the Uni-LoRA tuner -- one trained vector `theta_d` per adapter, indexed by every wrapped layer.

Checkpoints (as peft writes them): `base_model.unilora_theta_d`, plus with `save_indices` each
layer's `unilora_indices_A/_B` and `unilora_scales_A/_B`. Without them the indices are generated
again from `proj_seed` on loading, over the wrapped layers in module order, exactly as peft does.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ...errors import ConfigError
from ..vblora.constants import lora_table
from ..vblora.shared import SharedTensorsTuner, refuse_unsupported
from .config import UniLoraConfig
from .layer import UniLoraLayer, dispatch_linear

SUPPORTED_LAYERS = "`torch.nn.Linear`, `transformers.pytorch_utils.Conv1D`"


def generate_index(lora_param_count: int, theta_d_length: int, proj_seed: int) -> torch.Tensor:
    """A balanced, shuffled assignment of `lora_param_count` LoRA entries to `theta_d_length` entries.

    Every index appears floor(D/d) times, `D mod d` distinct ones once more; numpy's
    `default_rng(proj_seed)` picks those and shuffles, so the result is peft's for the same seed.
    """
    if lora_param_count < 0:
        raise ConfigError(f"`lora_param_count` must be non-negative, got {lora_param_count}.")
    if theta_d_length <= 0:
        raise ConfigError(f"`theta_d_length` must be positive, got {theta_d_length}.")
    rng = np.random.default_rng(proj_seed)
    data = np.repeat(np.arange(theta_d_length), lora_param_count // theta_d_length)
    remaining = lora_param_count % theta_d_length
    if remaining:
        data = np.concatenate([data, rng.choice(theta_d_length, size=remaining, replace=False)])
    rng.shuffle(data)
    return torch.as_tensor(data, dtype=torch.long)


class UniLoraModel(SharedTensorsTuner):
    """Creates Uni-LoRA adapters on a model: `UniLoraModel(model, UniLoraConfig(...), "default")`.

    `unilora_theta_d[adapter]` is the adapter's one trained vector.
    """

    prefix = "unilora_"
    layer_cls = UniLoraLayer
    dispatchers = (dispatch_linear, refuse_unsupported("UniLora", SUPPORTED_LAYERS))
    default_target_modules = lora_table()
    display_name = "UniLora"
    supported_layers = SUPPORTED_LAYERS
    shared_containers = {"unilora_theta_d": False}
    uses_shared_state = True
    generate_index = staticmethod(generate_index)

    @property
    def unilora_theta_d(self) -> nn.ParameterDict:
        return self.shared("unilora_theta_d")

    def _create_shared(self, adapter_name: str, config: UniLoraConfig) -> None:
        if config.init_weights:
            theta = torch.empty(config.theta_d_length)
            nn.init.uniform_(theta, -config.init_theta_d_bound, config.init_theta_d_bound)
        else:
            theta = torch.randn(config.theta_d_length)
        self.unilora_theta_d[adapter_name] = nn.Parameter(theta)

    def layer_kwargs(self, config: UniLoraConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {
            "unilora_theta_d": self.unilora_theta_d,
            "r": config.r,
            "unilora_dropout": config.unilora_dropout,
            "save_indices": config.save_indices,
        }

    def _inject(self, adapter_name: str, config: UniLoraConfig, targets: Optional[set[str]] = None) -> None:
        super()._inject(adapter_name, config, targets)
        self._assign_unilora_indices_and_scales(adapter_name)

    def _assign_unilora_indices_and_scales(self, adapter_name: str) -> None:
        """Deal one balanced index draw over the adapter's layers in module order (A, then B, per layer)."""
        layers = [m for m in self.model.modules() if isinstance(m, UniLoraLayer) and adapter_name in m.unilora_indices_A]
        sizes = [(m.unilora_indices_A[adapter_name].shape, m.unilora_indices_B[adapter_name].shape) for m in layers]
        total = sum(a.numel() + b.numel() for a, b in sizes)
        if total == 0:
            return
        config = self.peft_config[adapter_name]
        indices = generate_index(total, config.theta_d_length, config.proj_seed)
        counts = torch.bincount(indices, minlength=config.theta_d_length)
        inv_sqrt_counts = torch.zeros(config.theta_d_length, dtype=torch.float32)
        used = counts > 0
        inv_sqrt_counts[used] = counts[used].float().rsqrt()
        chunks = iter(torch.split(indices, [n for a, b in sizes for n in (a.numel(), b.numel())]))
        for layer, (shape_a, shape_b) in zip(layers, sizes):
            layer.assign(adapter_name, next(chunks).view(shape_a), next(chunks).view(shape_b), inv_sqrt_counts)
