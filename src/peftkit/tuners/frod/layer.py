r"""FRoD layers: the adapted weight itself is trained, as a rotation-like decomposition over a shared basis.

    W' = U (S + diag(lambda_l)) V^T          U: out x in (frozen)   V: in x in (frozen, shared per category)
                                             S: in x in, sparse, zero diagonal (trained: its COO values)
                                             lambda_l: (in,) (trained)
    y  = W' x + b

V is shared by the targeted modules that play the same role in every block (e.g. all `q_proj`);
the tuner computes it from their weights (see `model.py`). Each layer then solves `B = W V^-T`
and splits it column-wise into directions and lengths, `U = B / ||B||_col`, `lambda_l = ||B||_col`,
so that with S = 0 the adapted weight is the base weight again (up to rounding):

    W = B V^T = U diag(lambda_l) V^T

Checkpoints hold `<module>.frod_lambda_l` (in,) and `<module>.frod_lambda_s_values` (nnz,); U is
recomputed from the base weight (a non-persistent buffer), V and S's pattern belong to the tuner.

Forward. With one active adapter and no active dropout the base matmul is not needed at all:
`y = ((x V) (S + diag(lambda_l))^T) U^T + b`. Otherwise each adapter adds its difference to the
base output, `U M V^T h - W h` with `h = dropout(x)` (peft's rule for several adapters).

Merging adds `W' - W0` (W0: the weight before the first merge, kept on the CPU while anything is
merged); unmerging the last merged adapter gives W0 back exactly.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import AdapterStateError, ConfigError
from .._core.base_layers import is_transposed, linear_features, wraps
from .._core.buffer_dict import BufferDict
from .._core.layer import BaseTunerLayer

SUPPORTED_LAYERS = "`torch.nn.Linear`, `transformers.pytorch_utils.Conv1D`"


def directions_and_lengths(basis: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, lambda_l) with `weight = U diag(lambda_l) basis^T`: B = W V^-T split into unit columns and norms.

    Computed in float64 on the CPU; a singular basis falls back to the pseudo-inverse (as peft).
    """
    w = weight.detach().to("cpu", torch.float64)
    v = basis.detach().to("cpu", torch.float64)
    try:
        coefficients = torch.linalg.solve(v, w.T).T
    except RuntimeError:
        coefficients = w @ torch.linalg.pinv(v, rtol=1e-6).T
    lengths = torch.linalg.norm(coefficients, dim=0)
    directions = torch.zeros_like(coefficients)
    nonzero = lengths > 1e-12
    directions[:, nonzero] = coefficients[:, nonzero] / lengths[nonzero]
    return directions.float(), lengths.float()


def _dropout_active(dropout: nn.Module) -> bool:
    return isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0


class FrodLayer(BaseTunerLayer, nn.Module):
    """FRoD over an `nn.Linear` or a GPT-2 `Conv1D`: per adapter lambda_l, S's values, U and its dropout."""

    adapter_layer_names = ("frod_lambda_l", "frod_lambda_s_values")
    other_param_names = ("r", "frod_U", "frod_dropout", "runtime_offload_base_weight")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        base = self.get_base_layer()
        self.in_features, self.out_features = linear_features(base)
        self.fan_in_fan_out = is_transposed(base)
        self.is_target_conv_1d_layer = isinstance(base, Conv1D)
        self.r: dict[str, int] = {}
        self.runtime_offload_base_weight: dict[str, bool] = {}
        self.frod_dropout = nn.ModuleDict({})
        self.frod_lambda_l = nn.ParameterDict({})
        self.frod_lambda_s_values = nn.ParameterDict({})
        self.frod_U = BufferDict(persistent=False)
        # The tuner's per-category containers, referenced, not registered: the tuner alone owns (and saves) them.
        for name in ("frod_V", "frod_s_indices", "frod_s_size"):
            object.__setattr__(self, name, None)
        self._base_weight_before_merge: Optional[torch.Tensor] = None
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    # ------------------------------------------------------------------ adapters
    def _base_weight(self) -> torch.Tensor:
        """The base weight as (out, in)."""
        weight = self.get_base_layer().weight
        return weight.T if self.fan_in_fan_out else weight

    def update_layer(
        self,
        adapter_name: str,
        frod_V: BufferDict,
        frod_s_indices: BufferDict,
        frod_s_size: BufferDict,
        frod_dropout: float = 0.0,
        init_weights: bool = True,
        runtime_offload_base_weight: bool = False,
    ) -> None:
        """Add `adapter_name`: U and lambda_l from the base weight and V; S = 0 (init_weights) or N(0, 0.1)."""
        if frod_V is None or frod_s_indices is None or frod_s_size is None or not len(frod_V):
            raise ConfigError("The FRoD projection buffers are missing; add the adapter through FrodModel.")
        if adapter_name not in frod_V:  # as peft: a category without this adapter's entry reuses the first one's
            # Copies, not views (peft aliases them): loading this adapter's checkpoint must not rewrite the first's.
            reference = next(iter(frod_V))
            frod_V[adapter_name] = frod_V[reference].to("cpu", copy=True)
            frod_s_indices[adapter_name] = frod_s_indices[reference].to("cpu", torch.long, copy=True)
            frod_s_size[adapter_name] = frod_s_size[reference].to("cpu", torch.long, copy=True)
        weight = self._base_weight()
        if tuple(frod_V[adapter_name].shape) != (self.in_features, self.in_features):
            raise ConfigError(
                f"The FRoD basis of adapter {adapter_name!r} is {tuple(frod_V[adapter_name].shape)}, but this layer has "
                f"{self.in_features} input features; modules sharing a category must have the same input size."
            )
        self.r[adapter_name] = self.out_features
        self.runtime_offload_base_weight[adapter_name] = bool(runtime_offload_base_weight)
        self.frod_dropout[adapter_name] = nn.Dropout(p=frod_dropout) if frod_dropout > 0 else nn.Identity()
        for name, container in (("frod_V", frod_V), ("frod_s_indices", frod_s_indices), ("frod_s_size", frod_s_size)):
            object.__setattr__(self, name, container)
        nnz = frod_s_indices[adapter_name].shape[1]
        dtype = weight.dtype
        self.frod_lambda_s_values[adapter_name] = nn.Parameter(torch.zeros(nnz, dtype=dtype, device=weight.device))
        directions, lengths = directions_and_lengths(frod_V[adapter_name], weight)
        self.frod_lambda_l[adapter_name] = nn.Parameter(lengths.to(weight.device, dtype))
        if init_weights:
            self.reset_frod_parameters(adapter_name)
        else:
            with torch.no_grad():  # drawn in peft's order: S's values, then lambda_l's noise
                nn.init.normal_(self.frod_lambda_s_values[adapter_name], std=0.1)
                self.frod_lambda_l[adapter_name].add_(torch.randn_like(self.frod_lambda_l[adapter_name]) * 0.1)
        self.frod_U[adapter_name] = directions.to(weight.device if not weight.is_meta else "cpu", dtype)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def reset_frod_parameters(self, adapter_name: str) -> None:
        """S = 0 (peft's name): the adapted weight is the base weight."""
        if adapter_name in self.frod_lambda_s_values:
            with torch.no_grad():
                nn.init.zeros_(self.frod_lambda_s_values[adapter_name])

    # ------------------------------------------------------------------ the adapted weight
    def _factors(
        self, adapter_name: str, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U (out, in), V (in, in), M = S + diag(lambda_l) (in, in)) in `dtype` on `device`."""
        if self.frod_V is None or adapter_name not in self.frod_V:
            raise AdapterStateError(f"The FRoD projection buffers of adapter {adapter_name!r} are missing.")
        directions = self.frod_U[adapter_name].to(device, dtype)
        basis = self.frod_V[adapter_name].to(device, dtype)
        rows, cols = self.frod_s_indices[adapter_name].to(device, torch.long)
        values = self.frod_lambda_s_values[adapter_name].to(device, dtype)
        lengths = self.frod_lambda_l[adapter_name].to(device, dtype)
        mixing = torch.diag_embed(lengths).index_put((rows, cols), values, accumulate=True)
        return directions, basis, mixing

    def adapted_weight(self, adapter_name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """W' = U (S + diag(lambda_l)) V^T, (out, in)."""
        directions, basis, mixing = self._factors(adapter_name, device, dtype)
        return directions @ mixing @ basis.T

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W = W' - W0 (W0: the weight before merging), laid out like the base weight."""
        weight = self.get_base_layer().weight
        compute = torch.promote_types(weight.dtype, torch.float32)
        reference = self._base_weight_before_merge if self._base_weight_before_merge is not None else weight.detach()
        reference = reference.to(weight.device, compute)
        reference = reference.T if self.fan_in_fan_out else reference
        delta = self.adapted_weight(adapter_name, weight.device, compute) - reference
        return (delta.T if self.fan_in_fan_out else delta).to(weight.dtype)

    def fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- W + (W'_a - W0), W0 remembered from before the first merge."""
        if not self.merged_adapters or self._base_weight_before_merge is None:
            self._base_weight_before_merge = weight.detach().to("cpu", copy=True)
        return weight + self.get_delta_weight(adapter_name).to(weight.device, weight.dtype), bias

    def unfold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- W - (W'_a - W0); unfolding the last merged adapter gives back W0 exactly."""
        if self._base_weight_before_merge is None:
            raise AdapterStateError(
                f"FRoD adapter {adapter_name!r} is marked merged but the weight from before merging is gone; "
                "it cannot be unmerged. Reload the base model."
            )
        if self.merged_adapters == [adapter_name]:
            return self._base_weight_before_merge.to(weight.device, weight.dtype, copy=True), bias
        return weight - self.get_delta_weight(adapter_name).to(weight.device, weight.dtype), bias

    def _forget_merge(self, adapter_name: str) -> None:
        if not self.merged_adapters:
            self._base_weight_before_merge = None

    # ------------------------------------------------------------------ forward
    def _frod_output(self, h: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """U (S + diag(lambda_l)) V^T h, through (in)-sized intermediates: z = h V, (z S^T + z * lambda_l) U^T.

        S and lambda_l are applied separately (as peft does), so low-precision inputs round as in peft.
        """
        device, dtype = h.device, h.dtype
        directions = self.frod_U[adapter_name].to(device, dtype)
        basis = self.frod_V[adapter_name].to(device, dtype)
        lengths = self.frod_lambda_l[adapter_name].to(device, dtype)
        z = h @ basis
        rows, cols = self.frod_s_indices[adapter_name].to(device, torch.long)
        values = self.frod_lambda_s_values[adapter_name].to(device, dtype)
        sparse = torch.zeros(basis.shape[0], basis.shape[0], device=device, dtype=dtype).index_put((rows, cols), values, accumulate=True)
        return F.linear(F.linear(z, sparse) + z * lengths, directions)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            self._move_base_weight_to(x.device)
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            self._move_base_weight_to(x.device)
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.frod_lambda_s_values]
        if not active:
            self._move_base_weight_to(x.device)
            return self.base_layer(x, *args, **kwargs)
        bias = getattr(self.get_base_layer(), "bias", None)
        if len(active) == 1 and not _dropout_active(self.frod_dropout[active[0]]):
            # The adapted weight replaces the base weight: the base matmul is not needed.
            if self.runtime_offload_base_weight.get(active[0], False):
                self._offload_base_weight()
            result = self._frod_output(x, active[0])
            result = result if bias is None else result + bias.to(result.dtype)
            return result.to(previous_dtype)
        self._move_base_weight_to(x.device)
        result = self.base_layer(x, *args, **kwargs)
        base_out = result if bias is None else result - bias
        base_weight = None
        for name in active:
            dropout = self.frod_dropout[name]
            h = dropout(x)
            if _dropout_active(dropout):
                if base_weight is None:
                    base_weight = self._base_weight().to(x.device, x.dtype)
                subtracted = F.linear(h, base_weight)
            else:
                subtracted = base_out
            result = result + self._frod_output(h, name) - subtracted
        return result.to(previous_dtype)

    # ------------------------------------------------------------------ runtime_offload_base_weight
    def _move_base_weight_to(self, device: torch.device) -> None:
        weight = self.get_base_layer().weight
        if not weight.is_meta and weight.device != device:
            weight.data = weight.data.to(device)

    def _offload_base_weight(self) -> None:
        self._move_base_weight_to(torch.device("cpu"))

    def unwrapped(self) -> nn.Module:
        """The base layer, its weight back beside its bias (runtime offloading may have left it on the CPU)."""
        base = self.get_base_layer()
        lengths = next(iter(self.frod_lambda_l.values()), None)
        bias = getattr(base, "bias", None)
        device = bias.device if bias is not None else (lengths.device if lengths is not None else None)
        if device is not None and not device.type == "meta":
            self._move_base_weight_to(device)
        return self.base_layer

    def __repr__(self) -> str:
        return "frod." + super().__repr__()


#: Linear / Conv1D (peft's FRoD wraps nothing else).
Linear = FrodLayer
dispatch_linear = wraps((nn.Linear, Conv1D), FrodLayer)
