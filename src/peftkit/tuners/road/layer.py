r"""RoAd layers: a frozen linear layer whose output is rotated pair by pair (`rotation.py`).

    y = R (W x + b)        R: 2 x 2 blocks over pairs (k, k + group_size/2) of each output group
                           saved as `<module>.road_theta` and `<module>.road_alpha` (vectors)

A new adapter starts at theta = 0, alpha = 1 (R = I, a no-op). Several active adapters apply in
turn, R_n ... R_1 (W x + b), which is also what merging them in that order gives. The update is
multiplicative, so merging rotates the base weight's rows and its bias:

    W <- R W,   b <- R b           (unmerge: R^-1, in the same 2 x 2 form; no dense inverse)

Mixed-adapter batches (`adapter_names=[...]`): the rows' (f, s) factors are gathered from a stack
[identity, adapter 1, ...] and the whole batch is rotated at once.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ...errors import ConfigError
from ...quantization.weights import is_quantized
from .._core.base_layers import wraps
from .._core.call_state import batch_adapter_names
from .._core.layer import BaseTunerLayer
from ..lora.mixed_batch import expand_to_batch
from .rotation import inverse_coefficients, rotate_pairs, rotation_coefficients

SUPPORTED_LAYERS = "torch.nn.Linear and quantized linear layers"
#: Number of learned angles (and scales) per layer, as a multiple of out_features / 2.
_SIZE_FACTOR = {"road_1": 1, "road_2": 2, "road_4": 4}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merging arithmetic runs in float32 at least."""
    return torch.promote_types(dtype, torch.float32)


class RoadLayer(BaseTunerLayer, nn.Module):
    """What every RoAd layer holds: per adapter a `road_theta` and a `road_alpha` vector, its variant and group size."""

    adapter_layer_names = ("road_theta", "road_alpha")
    other_param_names = ("variant", "group_size")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.road_theta = nn.ParameterDict({})
        self.road_alpha = nn.ParameterDict({})
        self.variant: dict[str, str] = {}
        self.group_size: dict[str, int] = {}
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    @property
    def _available_adapters(self) -> set[str]:
        return set(self.road_theta)

    def update_layer(
        self,
        adapter_name: str,
        variant: str = "road_1",
        group_size: int = 64,
        init_weights: bool = True,
        inference_mode: bool = False,
    ) -> None:
        """Add (or replace) adapter `adapter_name`: out/2, out or 2*out angles and as many scales."""
        if self.out_features % group_size != 0:
            raise ConfigError(
                f"The out_features of the base layer must be divisible by group_size ({group_size}) when using "
                f"RoadLayer; this layer has out_features={self.out_features}. Pick a group_size that divides it."
            )
        if variant not in _SIZE_FACTOR:
            raise ConfigError(
                f"Unsupported variant {variant} for RoadLayer. Supported variants are road_1, road_2, and road_4."
            )
        size = self.out_features // 2 * _SIZE_FACTOR[variant]
        self.variant[adapter_name] = variant
        self.group_size[adapter_name] = group_size
        self.road_theta[adapter_name] = nn.Parameter(torch.empty(size))
        self.road_alpha[adapter_name] = nn.Parameter(torch.empty(size))
        self.reset_parameters(adapter_name, init_weights)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name], inference_mode=inference_mode)

    def reset_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """True: theta = 0, alpha = 1 (R = I); False: theta ~ N(0, 0.5^2), alpha ~ N(1, 0.5^2)."""
        theta, alpha = self.road_theta[adapter_name], self.road_alpha[adapter_name]
        with torch.no_grad():
            if init_weights is False:
                nn.init.normal_(theta, mean=0.0, std=0.5)
                nn.init.normal_(alpha, mean=1.0, std=0.5)
            else:
                nn.init.zeros_(theta)
                nn.init.ones_(alpha)

    def coefficients(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(f, s) of `adapter_name`'s R, each (out_features,)."""
        return rotation_coefficients(
            self.variant[adapter_name],
            self.group_size[adapter_name],
            self.road_theta[adapter_name],
            self.road_alpha[adapter_name],
        )

    def _active_here(self) -> list[str]:
        return [name for name in self._active_adapter if name in self.road_theta]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """R_n ... R_1 base(x) over the active adapters (or, in a mixed batch, each row's adapter)."""
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        names = batch_adapter_names()
        if names is not None:
            return self._mixed_rows(result, names)
        out_dtype = result.dtype
        for name in self._active_here():
            f, s = self.coefficients(name)
            result = rotate_pairs(result.to(f.dtype), f, s, self.group_size[name])
        return result.to(out_dtype)

    def _mixed_rows(self, result: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """Row i rotated by adapter names[i] ("__base__" or an adapter this layer lacks: unchanged)."""
        names = expand_to_batch(names, result.shape[0])
        distinct = list(dict.fromkeys(name for name in names if name in self.road_theta))
        if not distinct:
            return result
        out_dtype = result.dtype
        by_group: dict[int, list[str]] = {}
        for name in distinct:  # rows of one group size are rotated together
            by_group.setdefault(self.group_size[name], []).append(name)
        for group_size, members in by_group.items():
            factors = [self.coefficients(name) for name in members]
            dtype = factors[0][0].dtype
            ones = torch.ones(self.out_features, dtype=dtype, device=result.device)
            f_all = torch.stack([ones] + [f.to(dtype) for f, _ in factors])
            s_all = torch.stack([torch.zeros_like(ones)] + [s.to(dtype) for _, s in factors])
            lookup = {name: i + 1 for i, name in enumerate(members)}
            index = torch.tensor([lookup.get(name, 0) for name in names], device=result.device)
            shape = (result.shape[0],) + (1,) * (result.dim() - 2) + (self.out_features,)
            result = rotate_pairs(
                result.to(dtype), f_all[index].view(shape), s_all[index].view(shape), group_size
            )
        return result.to(out_dtype)

    # ------------------------------------------------------------------ merging (multiplicative)
    def _rotate_base(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor], inverse: bool
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(R W, R b), or with `inverse` (R^-1 W, R^-1 b); W is (out, in), R acts on its rows' index."""
        group_size = self.group_size[adapter_name]
        dtype = _compute_dtype(self.road_theta[adapter_name].dtype)
        f, s = (t.detach().to(dtype) for t in self.coefficients(adapter_name))
        if inverse:
            f, s = inverse_coefficients(f, s, group_size, adapter_name)
        new_weight = rotate_pairs(weight.to(dtype).T, f, s, group_size).T.to(weight.dtype)
        new_bias = None if bias is None else rotate_pairs(bias.to(dtype), f, s, group_size).to(bias.dtype)
        return new_weight, new_bias

    def fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- R W, b <- R b."""
        return self._rotate_base(adapter_name, weight, bias, inverse=False)

    def unfold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- R^-1 W, b <- R^-1 b (pairwise 2 x 2 inverses)."""
        return self._rotate_base(adapter_name, weight, bias, inverse=True)

    def __repr__(self) -> str:
        return "road." + super().__repr__()


class Linear(RoadLayer):
    """RoAd on `nn.Linear` or a quantized linear layer: `y = R base(x)`."""


def _is_linear(base: nn.Module) -> bool:
    return isinstance(base, nn.Linear) or is_quantized(base)


# ---------------------------------------------------------------------- dispatcher (RoadModel.dispatchers)
dispatch_linear = wraps(_is_linear, Linear)
