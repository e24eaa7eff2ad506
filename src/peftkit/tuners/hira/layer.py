r"""HiRA layers: a low-rank product modulates the frozen weight element-wise (a high-rank update).

    y = W0 x + b + (W0 * (B A)) x            * : Hadamard (element-wise) product
                                              A: r x in    B: out x r    (saved as `hira_A`, `hira_B`)

      W0 (out x in, frozen)      B (out x r)   A (r x in)
      +-----------------+         +--+        +-----------+
      |                 |    *    |  |   @    |           |      = delta_W, rank up to rank(W0) * r
      |                 |         |  |        +-----------+
      +-----------------+         +--+

`B A` is the *modulation* (peft's `get_delta_weight`); the update is `W0 * (B A)`. For a GPT-2
`Conv1D` (weight stored in x out) the modulation is transposed to match. Convolutions use
A: r x in x k..., B: out x r x 1... with `(B A)[o, i, k] = sum_r B[o, r] A[r, i, k]`; embeddings
hold `hira_embedding_A` (r x num_embeddings) and `hira_embedding_B` (dim x r), modulation `(B A)^T`.

Initialisation (`init_weights`): True -- A Kaiming-uniform, B = 0 (a no-op); "gaussian" -- A ~
N(0, 1/r^2), B = 0; False -- both N(0, 1). Embeddings: A = 0, B ~ N(0, 1) unless False.

Merging is multiplicative in W0: with adapters 1..n merged, `W = W0 + W0 * (M_1 + ... + M_n)`.
Every fold uses the weight from before the first merge (kept, on the CPU, while anything is
merged); unmerging the last adapter restores that copy exactly.

Forward. The dense product `W0 * M` is formed once per call (cheaper than pushing x through r
rescaled copies of W0). Over a plain Linear / Conv1D / conv base without active dropout, the
base matmul and the adapter's are one: `y = (W0 + W0 * M) x + b`. Embeddings never form it:
the looked-up rows are `W0[ids] * (A^T[ids] B^T)`, O(tokens * r * dim).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import AdapterStateError, TargetModulesError
from ...quantization.weights import is_quantized, read_weight
from .._core.base_layers import base_of, is_transposed, linear_features, unobserved
from .._core.layer import BaseTunerLayer

SUPPORTED_LAYERS = (
    "`torch.nn.Linear`, `torch.nn.Embedding`, `torch.nn.Conv1d`, `torch.nn.Conv2d`, `torch.nn.Conv3d`, "
    "`transformers.pytorch_utils.Conv1D` and quantized linear layers"
)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class GroupedConvError(TargetModulesError, NotImplementedError):
    """HiRA cannot wrap a grouped convolution (peft raises NotImplementedError)."""


def _dropout_active(dropout: nn.Module) -> bool:
    return isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0


class HiraLayer(BaseTunerLayer, nn.Module):
    """What every HiRA layer holds: per adapter its rank, its input dropout and the factors A, B."""

    adapter_layer_names = ("hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B")
    other_param_names = ("r", "hira_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.r: dict[str, int] = {}
        self.hira_dropout = nn.ModuleDict({})
        self.hira_A = nn.ParameterDict({})
        self.hira_B = nn.ParameterDict({})
        self.hira_embedding_A = nn.ParameterDict({})
        self.hira_embedding_B = nn.ParameterDict({})
        self._base_weight_before_merge: Optional[torch.Tensor] = None
        self.in_features, self.out_features = self._features(self.get_base_layer())
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    @staticmethod
    def _features(base: nn.Module) -> tuple[int, int]:
        if isinstance(base, nn.Embedding):
            return base.num_embeddings, base.embedding_dim
        if isinstance(base, _CONV_TYPES):
            return base.in_channels, base.out_channels
        return linear_features(base)

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, r: int, hira_dropout: float = 0.0, init_weights: Any = True) -> None:
        """Add (or replace) adapter `adapter_name` with rank `r`."""
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self._check_base()
        self.r[adapter_name] = r
        self.hira_dropout[adapter_name] = nn.Dropout(p=hira_dropout) if hira_dropout > 0.0 else nn.Identity()
        self._create_factors(adapter_name, r, init_weights)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _check_base(self) -> None:
        """Hook: refuse base layers this layer type cannot adapt."""

    def _create_factors(self, adapter_name: str, r: int, init_weights: Any) -> None:
        """A (r x in), B (out x r), initialised as `init_weights` says (see the module docstring)."""
        self.hira_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features))
        self.hira_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r))
        self.reset_hira_parameters(adapter_name, init_weights)

    def reset_hira_parameters(self, adapter_name: str, init_weights: Any) -> None:
        """True: Kaiming-uniform A, zero B; "gaussian": A ~ N(0, 1/r^2), zero B; False / None: left random."""
        if not init_weights or adapter_name not in self.hira_A:
            return
        with torch.no_grad():
            if init_weights is True:
                nn.init.kaiming_uniform_(self.hira_A[adapter_name], a=math.sqrt(5))
            elif isinstance(init_weights, str) and init_weights.lower() == "gaussian":
                nn.init.normal_(self.hira_A[adapter_name], std=1 / self.r[adapter_name])
            else:
                raise ValueError(f"Unknown initialization {init_weights=}")
            nn.init.zeros_(self.hira_B[adapter_name])

    def _active_here(self) -> list[str]:
        return [name for name in self._active_adapter if name in self.r]

    # ------------------------------------------------------------------ the modulation
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The modulation `B A`, laid out like the base weight (peft's name; the update is `W0 * B A`)."""
        modulation = self.hira_B[adapter_name] @ self.hira_A[adapter_name]
        return modulation.T if is_transposed(self.get_base_layer()) else modulation

    def _dense_weight(self) -> torch.Tensor:
        """W0 laid out like the modulation (out x in, or out x in x k...): dequantized if need be."""
        base = self.get_base_layer()
        weight = read_weight(base)
        return weight.T if is_transposed(base) else weight

    def _summed_modulation(self, names: list[str]) -> torch.Tensor:
        modulation = self._modulation(names[0])
        for name in names[1:]:
            modulation = modulation + self._modulation(name)
        return modulation

    def _modulation(self, adapter_name: str) -> torch.Tensor:
        """`B A` as out x in (or out x in x k...), whatever the base's storage layout."""
        return self.hira_B[adapter_name] @ self.hira_A[adapter_name]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`base(x) + sum_n (W0 * B_n A_n)(dropout_n(x))` over the active adapters."""
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = self._active_here()
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        dropped = [name for name in active if _dropout_active(self.hira_dropout[name])]
        plain = [name for name in active if name not in dropped]
        if not dropped and not args and not kwargs and self._can_fuse(plain):
            return self._fused_forward(x, plain)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        weight = self._dense_weight()
        groups = ([plain] if plain else []) + [[name] for name in dropped]
        for names in groups:
            dtype = self.hira_A[names[0]].dtype
            inputs = self.hira_dropout[names[0]](x.to(dtype))
            effective = weight.to(dtype) * self._summed_modulation(names).to(dtype)
            result = result + self._with_weight(inputs, effective)
        return result.to(out_dtype)

    def _can_fuse(self, names: list[str]) -> bool:
        """One matmul for base and adapters: a stock base, nothing observing it, adapters in its dtype."""
        base = self.get_base_layer()
        if type(base) not in (nn.Linear, Conv1D, *_CONV_TYPES) or not unobserved(self.base_layer, base):
            return False
        dtype = base.weight.dtype
        return all(self.hira_A[name].dtype == dtype for name in names)

    def _fused_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        weight = self._dense_weight()
        effective = torch.addcmul(weight, weight, self._summed_modulation(names))
        return self._with_weight(x, effective, self.get_base_layer().bias)

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The base layer's operation with `weight` (out x in layout) in place of its own."""
        return F.linear(x, weight, bias)

    # ------------------------------------------------------------------ merging (multiplicative in W0)
    def fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- W + W0 * M (W0: the weight before the first merge, remembered while anything is merged)."""
        if not self.merged_adapters or self._base_weight_before_merge is None:
            self._base_weight_before_merge = weight.detach().to("cpu", copy=True)
        return self._shifted(adapter_name, weight, sign=1.0), bias

    def unfold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- W - W0 * M; unfolding the last merged adapter gives back W0 exactly."""
        if self._base_weight_before_merge is None:
            raise AdapterStateError(
                f"HiRA adapter {adapter_name!r} is marked merged but the weight from before merging is gone; "
                "it cannot be unmerged. Reload the base model."
            )
        if self.merged_adapters == [adapter_name]:
            return self._base_weight_before_merge.to(weight.device, weight.dtype, copy=True), bias
        return self._shifted(adapter_name, weight, sign=-1.0), bias

    def _shifted(self, adapter_name: str, weight: torch.Tensor, sign: float) -> torch.Tensor:
        base = self._base_weight_before_merge.to(weight.device)
        compute = torch.promote_types(weight.dtype, torch.float32)
        modulation = self.get_delta_weight(adapter_name).detach().to(weight.device, compute)
        return torch.addcmul(weight.to(compute), base.to(compute), modulation, value=sign).to(weight.dtype)

    def _forget_merge(self, adapter_name: str) -> None:
        if not self.merged_adapters:
            self._base_weight_before_merge = None

    def __repr__(self) -> str:
        return "hira." + super().__repr__()


class Linear(HiraLayer):
    """HiRA on `nn.Linear`, transformers' `Conv1D` or a quantized linear layer: `y = base(x) + (W0 * B A) x`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, **layer_kwargs)
        self.is_target_conv_1d_layer = is_transposed(self.get_base_layer())

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """False: the update `W0 * B A` is not a fixed low-rank additive delta (as peft)."""
        return False


class Embedding(HiraLayer):
    """HiRA on `nn.Embedding`: `y = E0[ids] + E0[ids] * (A^T[ids] B^T)`, never forming the full table."""

    def _create_factors(self, adapter_name: str, r: int, init_weights: Any) -> None:
        self.hira_embedding_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features))
        self.hira_embedding_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r))
        if init_weights is not False:
            with torch.no_grad():
                nn.init.zeros_(self.hira_embedding_A[adapter_name])
                nn.init.normal_(self.hira_embedding_B[adapter_name])

    def _modulation(self, adapter_name: str) -> torch.Tensor:
        return (self.hira_embedding_B[adapter_name] @ self.hira_embedding_A[adapter_name]).T

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The modulation `(B A)^T`, shaped like the table (num_embeddings x dim)."""
        return self._modulation(adapter_name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        active = self._active_here()
        if self.merged or not active:
            return result
        out_dtype = result.dtype
        table = self.get_base_layer().weight
        for name in active:
            factor_a, factor_b = self.hira_embedding_A[name], self.hira_embedding_B[name]
            rows = F.embedding(x, table).to(factor_a.dtype)
            result = result + rows * (F.embedding(x, factor_a.T) @ factor_b.T)
        return result.to(out_dtype)


class _ConvNd(HiraLayer):
    """HiRA on a convolution: `y = base(x) + conv(x, W0 * B A)` (same stride, padding, dilation)."""

    def _check_base(self) -> None:
        base = self.get_base_layer()
        if base.groups > 1:
            raise GroupedConvError(
                f"HiRA does not support {type(base).__name__} layers with groups > 1 (got groups={base.groups}). "
                "This applies to both the forward pass and to merging; exclude the module via exclude_modules."
            )

    def _create_factors(self, adapter_name: str, r: int, init_weights: Any) -> None:
        base = self.get_base_layer()
        pointwise = (1,) * len(base.kernel_size)
        self.hira_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features, *base.kernel_size))
        self.hira_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r, *pointwise))
        if init_weights:
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.hira_A[adapter_name], a=math.sqrt(5))
                nn.init.zeros_(self.hira_B[adapter_name])

    def _modulation(self, adapter_name: str) -> torch.Tensor:
        factor_a, factor_b = self.hira_A[adapter_name], self.hira_B[adapter_name]
        return torch.einsum("or,ri...->oi...", factor_b.flatten(1), factor_a)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The modulation `B A`, shaped like the kernel (out x in x k...)."""
        return self._modulation(adapter_name)

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.get_base_layer()._conv_forward(x, weight, bias)


class Conv1d(_ConvNd):
    """HiRA on `nn.Conv1d`."""


class Conv2d(_ConvNd):
    """HiRA on `nn.Conv2d`."""


class Conv3d(_ConvNd):
    """HiRA on `nn.Conv3d`."""


# ---------------------------------------------------------------------- dispatcher (HiraModel.dispatchers)
_LAYER_FOR = ((nn.Embedding, Embedding), (nn.Conv2d, Conv2d), (nn.Conv3d, Conv3d), (nn.Conv1d, Conv1d))


def dispatch_default(target: nn.Module, adapter_name: str, **layer_kwargs: Any) -> Optional[nn.Module]:
    """The HiRA layer for `target`'s base: embedding, conv, or linear-like (dense, Conv1D, quantized)."""
    base = base_of(target)
    for base_type, layer_cls in _LAYER_FOR:
        if isinstance(base, base_type):
            return layer_cls(target, adapter_name, **layer_kwargs)
    if isinstance(base, (nn.Linear, Conv1D)) or is_quantized(base):
        return Linear(target, adapter_name, **layer_kwargs)
    return None
