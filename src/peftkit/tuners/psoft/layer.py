r"""PSOFT layers: a frozen Linear plus a low-rank update confined to the weight's principal subspace.

    W = U S V^T (SVD, at creation)        A = V_r^T (r x in),  B = U_r S_r / scaling (out x r)   ("psoft_init")
                                          A = sqrt(S_r/scaling) V_r^T,  B = U_r sqrt(S_r/scaling) ("pissa_init")
    y = W x + b + scaling * B (R - I) A dropout(x)          scaling = psoft_alpha / r
    delta_W = scaling * B (R - I) A                          (additive: merging adds it)

A and B are frozen and *not saved*: they are rebuilt from the base weight when the adapter is
created or loaded (peft's format; `psoft_svd="lowrank"` is seeded by `random_seed` so the rebuild
is exact). Only R (`orthogonal.py`) trains. With R = I (the default init) the update is zero.

The forward costs tokens * r * (in + r + out): x is projected to r dimensions, rotated, and
lifted back; the (out x in) delta is only formed for merging.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from .._core.base_layers import wraps
from .._core.layer import BaseTunerLayer
from .._core.buffer_dict import BufferDict
from .orthogonal import PsoftRotation

SUPPORTED_LAYERS = "torch.nn.Linear (dense float weights)"


class PsoftLayer(BaseTunerLayer, nn.Module):
    """What every PSOFT layer holds: per adapter an R (`psoft_R`) and the frozen, unsaved A and B."""

    adapter_layer_names = ("psoft_R",)
    other_param_names = (
        "r", "psoft_alpha", "scaling", "psoft_dropout", "psoft_svd", "psoft_svd_lowrank_niter", "random_seed",
        "ab_svd_init", "_psoft_A_cache", "_psoft_B_cache",
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.psoft_R = nn.ModuleDict({})
        self.psoft_dropout = nn.ModuleDict({})
        self._psoft_A_cache = BufferDict(persistent=False)
        self._psoft_B_cache = BufferDict(persistent=False)
        self.r: dict[str, int] = {}
        self.psoft_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.psoft_svd: dict[str, str] = {}
        self.psoft_svd_lowrank_niter: dict[str, int] = {}
        self.random_seed: dict[str, int] = {}
        self.ab_svd_init: dict[str, str] = {}
        self.fan_in_fan_out = False
        self.cast_input_dtype_enabled = True
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    def update_layer(
        self,
        adapter_name: str,
        r: int = 32,
        psoft_alpha: float = 32,
        psoft_dropout: float = 0.0,
        ab_svd_init: str = "psoft_init",
        psoft_svd: str = "full",
        psoft_svd_lowrank_niter: int = 10,
        random_seed: int = 0,
        init_weights: bool = True,
        inference_mode: bool = False,
        **rotation_kwargs: Any,
    ) -> None:
        """Add (or replace) adapter `adapter_name`: R (r x r) trainable, A and B from the base weight's SVD."""
        if r > min(self.in_features, self.out_features):
            raise ConfigError(
                f"`r` ({r}) must be less than or equal to min(in_features, out_features) "
                f"({self.in_features}, {self.out_features})"
            )
        self.r[adapter_name] = r
        self.psoft_alpha[adapter_name] = psoft_alpha
        self.scaling[adapter_name] = psoft_alpha / r
        self.psoft_dropout[adapter_name] = nn.Dropout(p=psoft_dropout) if psoft_dropout > 0.0 else nn.Identity()
        self.ab_svd_init[adapter_name] = ab_svd_init
        self.psoft_svd[adapter_name] = psoft_svd
        self.psoft_svd_lowrank_niter[adapter_name] = psoft_svd_lowrank_niter
        self.random_seed[adapter_name] = random_seed
        self.psoft_R[adapter_name] = PsoftRotation(r, **rotation_kwargs)
        self._move_adapter_to_base(adapter_name)
        self.psoft_R[adapter_name].reset_parameters(init_weights)
        self._build_basis(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name], inference_mode=inference_mode)

    def _build_basis(self, adapter_name: str) -> None:
        """A (r x in) and B (out x r), float32, from the top-r singular triplets of the base weight."""
        weight = self.get_base_layer().weight
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(
                f"PSOFT init requires float32/float16/bfloat16. Re-quantize after init if needed "
                f"(the base weight is {weight.dtype})."
            )
        scaling = self.scaling[adapter_name]
        with torch.no_grad():
            left, values, right = self._svd(weight.detach().to(torch.float32), adapter_name)
            values = values / scaling
            if self.ab_svd_init[adapter_name] == "psoft_init":
                factor_a, factor_b = right, left @ torch.diag(values)
            else:  # pissa_init
                root = torch.sqrt(values)
                factor_a, factor_b = torch.diag(root) @ right, left @ torch.diag(root)
        self._psoft_A_cache[adapter_name] = factor_a.contiguous()
        self._psoft_B_cache[adapter_name] = factor_b.contiguous()

    def _svd(self, weight: torch.Tensor, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_r (out x r), S_r (r,), V_r^T (r x in)) of the (out x in) weight."""
        r = self.r[adapter_name]
        if self.psoft_svd[adapter_name] == "full":
            left, values, right = torch.linalg.svd(weight, full_matrices=False)
            return left[:, :r], values[:r], right[:r, :]
        # torch.svd_lowrank draws a random projection: seed it (in a forked RNG, leaving the caller's
        # RNG untouched) so that loading the adapter rebuilds exactly the same A and B.
        on_cpu = weight.device.type == "cpu"
        fork = {"devices": []} if on_cpu else {"devices": [weight.device], "device_type": weight.device.type}
        with torch.random.fork_rng(**fork):
            torch.manual_seed(self.random_seed[adapter_name])
            left, values, right = torch.svd_lowrank(weight, q=r, niter=self.psoft_svd_lowrank_niter[adapter_name])
        return left[:, :r], values[:r], right[:, :r].T

    def basis(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of `adapter_name` (peft's `_get_psoft_ab_cache_buffers`)."""
        return self._psoft_A_cache[adapter_name], self._psoft_B_cache[adapter_name]

    _get_psoft_ab_cache_buffers = basis

    def _active_here(self) -> list[str]:
        return [name for name in self._active_adapter if name in self.psoft_R]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W = scaling * B (R - I) A, (out, in), in the base weight's dtype."""
        factor_a, factor_b = self.basis(adapter_name)
        weight = self.get_base_layer().weight
        half_on_cpu = weight.device.type == "cpu" and weight.dtype in (torch.float16, torch.bfloat16)
        dtype = torch.float32 if half_on_cpu else weight.dtype
        rotation = self.psoft_R[adapter_name].get_matrix().to(weight.device, dtype)
        rotation = rotation - torch.eye(self.r[adapter_name], device=weight.device, dtype=dtype)
        delta = factor_b.to(weight.device, dtype) @ rotation @ factor_a.to(weight.device, dtype)
        return (delta * self.scaling[adapter_name]).to(weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """W x + b + sum over active adapters of scaling * B (R A x' - A x'), x' = dropout(x)."""
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        active = [] if self.merged else self._active_here()
        if not active:
            return result
        out_dtype = result.dtype
        for name in active:
            factor_a, factor_b = self.basis(name)
            hidden = self.psoft_dropout[name](x.to(factor_a.dtype) if self.cast_input_dtype_enabled else x)
            projected = hidden @ factor_a.to(hidden.device, hidden.dtype).T
            update = (self.psoft_R[name](projected) - projected) @ factor_b.to(hidden.device, hidden.dtype).T
            result = result + update * self.scaling[name]
        return result.to(out_dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def __repr__(self) -> str:
        return "psoft." + super().__repr__()


class Linear(PsoftLayer):
    """PSOFT on a dense `nn.Linear`."""


def _is_dense_linear(base: nn.Module) -> bool:
    return isinstance(base, nn.Linear) and base.weight.is_floating_point()


# ---------------------------------------------------------------------- dispatcher (PsoftModel.dispatchers)
dispatch_linear = wraps(_is_dense_linear, Linear)
