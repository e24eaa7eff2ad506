r"""DEFT layers: a learned rank-r subspace of the frozen weight is removed and new content injected.

    W' = (I - P_proj) W + Q_P (s R)          P: out x r    R: r x in    (saved as `deft_P`, `deft_R`)
    delta_W = W' - W = Q_P (s R - right^T W)                             s = alpha / r (1 if alpha is None)

The projector comes from P by `decomposition_method`, always in float32:

    relu:  Q_P = P,        right = relu(P)    ->  P_proj = P relu(P)^T   (non-orthogonal)
    qr:    Q_P = qr(P).Q,  right = Q_P        ->  P_proj = Q_P Q_P^T     (orthogonal)

PaRa (`para=True`) keeps the removal only: `delta_W = -Q_P right^T W`, and there is no R.

Initialisation: P ~ N(0, 0.02^2). With `init_weights=True`, R = right^T W / s, so delta_W = 0 and
the adapter starts as a no-op; with False, R ~ N(0, (0.02 * init_scale)^2). r is capped at
out_features (QR gives at most that many orthonormal columns).

Forward, on the activations (never the out x out projector):

    y = base(x) - ((x W^T) right) Q_P^T + (dropout(x) (s R)^T) Q_P^T     x W^T = base(x) - b

Merging. The removal term depends on W, so `delta_W` is not recoverable from the merged weight.
`fold` keeps the small factor `M = right^T W` (r x in, float32) of the weight it merged into, and
`unfold` subtracts exactly `Q_P (s R - M)` again. Adapters merged in one call all take M from the
weight before that call (their deltas add up, as in the forward), as in peft.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import ConfigError
from .._core.base_layers import is_transposed, linear_features, wraps
from .._core.layer import BaseTunerLayer

SUPPORTED_LAYERS = "`torch.nn.Linear` and `transformers.pytorch_utils.Conv1D`"
#: Std of P at init, and of a random R (times `init_scale`), as in peft.
INIT_STD = 0.02
SCALE_WARNING = "Scaling operation for DEFT not supported! Automatically set scale to 1."
UNSCALE_WARNING = "Unscaling operation for DEFT not supported! Keeping scale at 1."


def project(P: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(Q_P, right)` in float32 with `P_proj = Q_P right^T` (see the module docstring)."""
    P = P.to(torch.float32)  # QR (and the projection) are unreliable in half precision
    if method == "relu":
        return P, torch.relu(P)
    if method == "qr":
        Q_P, _ = torch.linalg.qr(P)
        return Q_P, Q_P
    raise ConfigError(f"Unknown decomposition_method '{method}'; use 'relu' or 'qr'.")


class DeftLayer(BaseTunerLayer, nn.Module):
    """DEFT on `nn.Linear` or transformers' `Conv1D`: `y = W' x + b`, W' the subspace-replaced weight."""

    adapter_layer_names = ("deft_P", "deft_R")
    other_param_names = (
        "deft_r",
        "deft_decomposition",
        "deft_init_scale",
        "deft_para",
        "deft_scaling",
        "deft_dropout",
        "_cached_merge_factor",
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        base = self.get_base_layer()
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(f"Unsupported layer type {type(base)}")
        self.fan_in_fan_out = is_transposed(base)
        self.in_features, self.out_features = linear_features(base)
        self.deft_r: dict[str, int] = {}
        self.deft_decomposition: dict[str, str] = {}
        self.deft_init_scale: dict[str, float] = {}
        self.deft_para: dict[str, bool] = {}
        self.deft_scaling: dict[str, float] = {}
        self.deft_dropout = nn.ModuleDict({})
        self.deft_P = nn.ParameterDict({})
        self.deft_R = nn.ParameterDict({})
        #: adapter -> M = right^T W (r x in, float32) of the weight it was merged into; not saved.
        self._cached_merge_factor: dict[str, torch.Tensor] = {}
        #: factors of the adapters being merged by the current `merge` call (see `_folded`).
        self._pending_factors: dict[str, torch.Tensor] = {}
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    # ------------------------------------------------------------------ adapters
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        decomposition_method: str = "relu",
        init_scale: float = 1.0,
        alpha: Optional[float] = None,
        para: bool = False,
        deft_dropout: float = 0.0,
        init_weights: bool = True,
    ) -> None:
        """Add (or replace) adapter `adapter_name`: P (out x r') and, unless PaRa, R (r' x in), r' = min(r, out)."""
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        project(torch.zeros(1, 1), decomposition_method)  # refuse an unknown method before changing anything
        r = min(r, self.out_features)
        self.deft_r[adapter_name] = r
        self.deft_decomposition[adapter_name] = decomposition_method
        self.deft_init_scale[adapter_name] = init_scale
        self.deft_para[adapter_name] = para
        self.deft_scaling[adapter_name] = alpha / r if alpha else 1.0
        self.deft_dropout[adapter_name] = nn.Dropout(p=deft_dropout) if deft_dropout > 0.0 else nn.Identity()
        # created in this order (P, then R) and drawn in it, as peft: the same seed gives the same adapter
        self.deft_P[adapter_name] = nn.Parameter(torch.empty(self.out_features, r))
        if para and adapter_name in self.deft_R:
            del self.deft_R[adapter_name]
        elif not para:
            self.deft_R[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        self.reset_deft_parameters(adapter_name, init_weights)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def reset_deft_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """P ~ N(0, 0.02^2); R = right^T W / s (a no-op adapter) or, with False, R ~ N(0, (0.02 init_scale)^2)."""
        if adapter_name not in self.deft_P:
            return
        P = self.deft_P[adapter_name]
        with torch.no_grad():
            nn.init.normal_(P, mean=0.0, std=INIT_STD)
            if self.deft_para[adapter_name]:
                return  # PaRa: no R; the removal cannot be a no-op
            R = self.deft_R[adapter_name]
            weight = self.get_base_layer().weight
            if P.is_meta or R.is_meta or weight.is_meta:
                return  # low_cpu_mem_usage: the values come from the checkpoint
            if init_weights:
                factor = self._merge_factor(adapter_name, weight.detach())
                R.copy_((factor / self.deft_scaling[adapter_name]).to(R.device, R.dtype))
            else:
                nn.init.normal_(R, mean=0.0, std=INIT_STD * self.deft_init_scale[adapter_name])

    def _active_here(self) -> list[str]:
        return [name for name in self._active_adapter if name in self.deft_P]

    # ------------------------------------------------------------------ the maths
    def _logical(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as out x in in float32 (a `Conv1D` stores it in x out)."""
        weight = weight.to(torch.float32)
        return weight.T if self.fan_in_fan_out else weight

    def _merge_factor(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """M = right^T W (r x in, float32): the only part of delta_W that depends on the base weight."""
        P = self.deft_P[adapter_name]
        _, right = project(P.to(weight.device), self.deft_decomposition[adapter_name])
        return right.T @ self._logical(weight)

    def _delta_from_factor(self, adapter_name: str, factor: torch.Tensor) -> torch.Tensor:
        """delta_W = Q_P (s R - M), or -Q_P M for PaRa, in float32 and the base's storage layout."""
        Q_P, _ = project(self.deft_P[adapter_name].to(factor.device), self.deft_decomposition[adapter_name])
        if self.deft_para[adapter_name]:
            delta = -(Q_P @ factor)
        else:
            injection = self.deft_R[adapter_name].to(factor.device, torch.float32) * self.deft_scaling[adapter_name]
            delta = Q_P @ (injection - factor)
        return delta.T if self.fan_in_fan_out else delta

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`delta_W = W' - W` for the current base weight, laid out and typed like it."""
        weight = self.get_base_layer().weight
        return self._delta_from_factor(adapter_name, self._merge_factor(adapter_name, weight)).to(weight.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`base(x) + sum_a [(dropout_a(x) (s R_a)^T) - (x W^T) right_a] Q_a^T`, computed in float32."""
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = self._active_here()
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        previous_dtype = x.dtype
        result = self.base_layer(x, *args, **kwargs).to(torch.float32)
        bias = self.get_base_layer().bias
        base_product = result if bias is None else result - bias.to(torch.float32)  # x W^T
        inputs = x.to(torch.float32)
        for name in active:
            Q_P, right = project(self.deft_P[name], self.deft_decomposition[name])
            result = result - (base_product @ right) @ Q_P.T
            if not self.deft_para[name]:
                injection = self.deft_R[name].to(torch.float32) * self.deft_scaling[name]
                result = result + F.linear(self.deft_dropout[name](inputs), injection) @ Q_P.T
        return result.to(previous_dtype)

    # ------------------------------------------------------------------ merging
    def _folded(self, names: list[str], safe_merge: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Every adapter of one merge call takes M from the weight before the call (as peft)."""
        weight, _ = self._read_base()
        self._pending_factors = {name: self._merge_factor(name, weight) for name in names}
        try:
            return super()._folded(names, safe_merge)
        except BaseException:
            for name in names:  # a fold that failed its check was never recorded as merged
                if name not in self.merged_adapters:
                    self._forget_merge(name)
            raise
        finally:
            self._pending_factors = {}

    def fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- W + Q_P (s R - M); M is kept for `unfold`."""
        factor = self._pending_factors.get(adapter_name)
        if factor is None:
            factor = self._merge_factor(adapter_name, weight)
        self._cached_merge_factor[adapter_name] = factor
        delta = self._delta_from_factor(adapter_name, factor.to(weight.device))
        return weight + delta.to(weight.dtype), bias

    def unfold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- W - Q_P (s R - M), with the M kept by `fold` (recomputed from W if it is gone)."""
        factor = self._cached_merge_factor.get(adapter_name)
        factor = self._merge_factor(adapter_name, weight) if factor is None else factor.to(weight.device)
        return weight - self._delta_from_factor(adapter_name, factor).to(weight.dtype), bias

    def _forget_merge(self, adapter_name: str) -> None:
        self._cached_merge_factor.pop(adapter_name, None)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """False, as peft (delta_W depends on the base weight)."""
        return False

    # ------------------------------------------------------------------ peft's scaling API (a no-op for DEFT)
    def scale_layer(self, scale: float) -> None:
        if scale != 1 and self._active_here():
            warnings.warn(SCALE_WARNING, stacklevel=2)

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        if self._active_here():
            warnings.warn(UNSCALE_WARNING, stacklevel=2)

    def __repr__(self) -> str:
        return "deft." + super().__repr__()


#: peft's name for the layer.
DeftLinear = DeftLayer

# ---------------------------------------------------------------------- dispatchers (DeftModel.dispatchers)
dispatch_linear = wraps((nn.Linear, Conv1D), DeftLayer)
