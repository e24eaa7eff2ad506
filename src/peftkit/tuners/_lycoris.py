r"""What LoHa and LoKr (the "LyCORIS" family) share: config fields, the layer skeleton, the tuner.

Both methods learn a structured update of a base weight W (out x in, or out x in x k x k for a
convolution), scaled by `alpha / r`:

    LoHa:  delta_W = (W1a W1b) * (W2a W2b) * alpha / r          (* is the Hadamard product)
    LoKr:  delta_W = kron(W1, W2) * alpha / r

A layer computes `y = base(x) + delta(x)`. The delta can be applied three ways, which agree up to
rounding:

- materialised: build delta_W, then `F.linear(x, delta_W)` / `F.convNd(x, delta_W)` (what peft does);
- factored: push x through the factors without ever forming delta_W (cheaper in most real shapes);
- fused (Linear / Conv1D bases, one active adapter): `y = x (W + delta_W)^T + b`, one matmul in
  place of the base's; backward needs one extra matmul (`G = grad^T x`, the gradient of delta_W)
  and rebuilds delta_W from the factors instead of keeping it (`_FusedDeltaLinear`).

Each method gives cost estimates (multiply-adds: building delta_W, and the factored product) and
`delta_mode="auto"` picks the cheapest path per call, counting the backward when autograd is on;
`"factored"` / `"materialized"` / `"fused"` force one (tests and benchmarks use that).

Rank dropout zeroes whole output rows of delta_W during training; since a zeroed row only zeroes
one output channel, it is applied to the delta's output, so both paths support it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import PeftConfig
from ..errors import ConfigError
from ..utils.validation import (
    as_name_set,
    check_dropout,
    check_layer_selection,
    check_pattern_dict,
    check_positive_number,
    check_rank,
)
from ._core.base_layers import is_linear_like, is_plain_linear, unobserved, wraps
from ._core.layer import BaseTunerLayer
from ._core.matching import pattern_value
from ._core.tuner import BaseTuner
from .lora.constants import LORA_TARGET_MODULES_BY_MODEL_TYPE

# peft uses a copy of its LoRA table for LoHa and LoKr. Ours lacks a few architectures of peft's
# LoRA table (it predates them); they are added here so `target_modules=None` resolves as in peft.
LYCORIS_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = {
    **LORA_TARGET_MODULES_BY_MODEL_TYPE,
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

DELTA_MODES = ("auto", "factored", "materialized", "fused")
SUPPORTED_LAYERS = "torch.nn.Linear, transformers' Conv1D, torch.nn.Conv1d, torch.nn.Conv2d and quantized linear layers"


@dataclass
class LycorisConfig(PeftConfig):
    """Fields LoHa and LoKr share (peft's `LycorisConfig`): per-module rank and alpha overrides.

    Args:
        rank_pattern: Per-module rank, keyed by a regex matched against the end of the module path.
        alpha_pattern: Per-module alpha, keyed the same way.
    """

    rank_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module rank"})
    alpha_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module alpha"})

    #: Values `init_weights` may take.
    init_choices: ClassVar[tuple[Any, ...]] = (True, False)

    def _check_lycoris_fields(self, expected: Any) -> None:
        """Normalise and validate the fields both methods have; `expected` is the PeftType."""
        if str(self.peft_type) != expected.value:
            raise ConfigError(f"{type(self).__name__} has peft_type {self.peft_type!r}; it must be {expected.value!r}.")
        self.peft_type = expected
        self.target_modules = as_name_set(self.target_modules)
        self.exclude_modules = as_name_set(self.exclude_modules, "exclude_modules")
        check_rank(self.r, "r")
        check_positive_number(self.alpha, "alpha")
        check_dropout(self.rank_dropout, "rank_dropout")
        check_dropout(self.module_dropout, "module_dropout")
        self.rank_pattern = check_pattern_dict(self.rank_pattern, "rank_pattern")
        self.alpha_pattern = check_pattern_dict(self.alpha_pattern, "alpha_pattern")
        for key, rank in self.rank_pattern.items():
            check_rank(rank, f"rank_pattern[{key!r}]")
        for key, alpha in self.alpha_pattern.items():
            check_positive_number(alpha, f"alpha_pattern[{key!r}]")
        # `is` for the booleans, so 1 or 0 are refused rather than read as True / False.
        value = self.init_weights
        if not any(value is c if isinstance(c, bool) else value == c for c in self.init_choices):
            choices = ", ".join(repr(choice) for choice in self.init_choices)
            raise ConfigError(f"init_weights={self.init_weights!r} is not supported; use one of {choices}.")
        if not isinstance(self.use_effective_conv2d, bool):
            raise ConfigError(f"use_effective_conv2d={self.use_effective_conv2d!r} must be True or False.")
        check_layer_selection(self)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]


# ---------------------------------------------------------------------------------------------- layer
class LycorisLayer(BaseTunerLayer, nn.Module):
    """A frozen base layer plus, per adapter, factors whose product is a weight update.

    Subclasses name their factor attributes in `adapter_layer_names` and implement
    `_create_adapter`, `_delta_kernel` (delta_W laid out like an `(out, in, *kernel)` weight) with
    its cost `_build_cost` and, where cheaper, `_factored_output` with its cost `_factored_cost`.
    """

    lora_convertible = True  # delta_W is additive: convert_to_lora applies

    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "rank_dropout_scale", "module_dropout")
    #: LoHa always rescales rank dropout by the kept fraction; LoKr only with `rank_dropout_scale`.
    always_scale_rank_dropout: ClassVar[bool] = False
    #: Lower-case prefix of the repr (as peft prints it) and the name used in messages.
    method_name: ClassVar[str] = ""
    display_name: ClassVar[str] = ""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **adapter_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        base = self.get_base_layer()
        self.is_conv1d_layer = isinstance(base, Conv1D)  # weight stored (in, out): transpose deltas
        self.is_conv = isinstance(base, (nn.Conv1d, nn.Conv2d))
        if self.is_conv:
            self.in_features, self.out_features = base.in_channels, base.out_channels
        elif self.is_conv1d_layer:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        self.delta_mode = "auto"
        for name in self.other_param_names:
            setattr(self, name, {})
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict({}))
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **adapter_kwargs)

    # ------------------------------------------------------------------ geometry
    @property
    def kernel_size(self) -> tuple[int, ...]:
        """The base convolution's kernel size; `()` for linear layers."""
        return tuple(self.get_base_layer().kernel_size) if self.is_conv else ()

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """(out, in / groups, *kernel): the layout every delta is computed in."""
        base = self.get_base_layer()
        if self.is_conv:
            return (self.out_features, self.in_features // base.groups, *self.kernel_size)
        return (self.out_features, self.in_features)

    def _wants_effective_conv(self, use_effective_conv2d: bool) -> bool:
        """peft ignores use_effective_conv2d for linear layers and 1x1 kernels (nothing to factor)."""
        return bool(use_effective_conv2d) and self.is_conv and math.prod(self.kernel_size) > 1

    # ------------------------------------------------------------------ adapters
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        alpha: float,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        init_weights: Any = True,
        rank_dropout_scale: bool = False,
        **method_kwargs: Any,
    ) -> None:
        """Add (or replace) adapter `adapter_name` on this layer."""
        check_rank(r, "r")
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = rank_dropout
        self.rank_dropout_scale[adapter_name] = rank_dropout_scale
        self.module_dropout[adapter_name] = module_dropout
        self._create_adapter(adapter_name, r, init_weights, **method_kwargs)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _create_adapter(self, adapter_name: str, r: int, init_weights: Any, **method_kwargs: Any) -> None:
        raise NotImplementedError

    def _active_here(self) -> list[str]:
        return [name for name in self._active_adapter if name in self.r]

    def _adapter_dtype(self, adapter_name: str) -> torch.dtype:
        """The dtype the adapter computes in (fp32 over a low-precision base, see _move_adapter_to_base)."""
        return next(iter(self.adapter_params([adapter_name]))).dtype

    # ------------------------------------------------------------------ the update
    def _delta_kernel(self, adapter_name: str) -> torch.Tensor:
        """scaling * delta_W shaped `weight_shape` (out first, even for Conv1D bases)."""
        raise NotImplementedError

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W laid out like the base weight (transposed for transformers' Conv1D)."""
        delta = self._delta_kernel(adapter_name)
        return delta.T if self.is_conv1d_layer else delta

    def _factored_output(self, x: torch.Tensor, adapter_name: str) -> Optional[torch.Tensor]:
        """delta(x) computed from the factors, or None where this layer has no factored path."""
        return None

    def _build_cost(self, adapter_name: str) -> float:
        """Multiply-adds to form delta_W from the factors."""
        raise NotImplementedError

    def _factored_cost(self, adapter_name: str, positions: int) -> float:
        """Multiply-adds of `_factored_output` for `positions` input rows / output pixels (inf: no such path)."""
        return math.inf

    def _path(self, x: torch.Tensor, adapter_name: str, fusable: bool = False) -> str:
        """"fused", "factored" or "materialized": the forced `delta_mode`, or the cheapest estimate.

        With autograd on, a path's backward counts too: materialised applies delta_W twice more
        (input and weight gradients) and differentiates the build; factored about doubles; fused
        adds one full matmul (the gradient of delta_W) and rebuilds delta_W once.
        """
        mode = self.delta_mode
        if mode not in DELTA_MODES:
            raise ValueError(f"delta_mode={mode!r} is not one of {DELTA_MODES}.")
        if mode == "fused":
            return "fused" if fusable else "materialized"
        if mode != "auto":
            return mode
        positions = x.numel() // max(self.in_features, 1)
        apply = positions * math.prod(self.weight_shape)
        build = self._build_cost(adapter_name)
        backward = int(torch.is_grad_enabled())
        costs = {
            "materialized": build + apply + backward * (2 * apply + 2 * build),
            "factored": self._factored_cost(adapter_name, positions) * (1 + 2 * backward),
        }
        if fusable:
            costs["fused"] = build + backward * (apply + 3 * build)
        return min(costs, key=costs.__getitem__)

    def _materialized_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        kernel = self._delta_kernel(adapter_name)
        if not self.is_conv:
            return F.linear(x, kernel)
        base = self.get_base_layer()
        return conv_fn(self)(
            x, kernel, stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups
        )

    def delta_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """delta_W applied to x (no bias), by the factored path when it is cheaper."""
        out = self._factored_output(x, adapter_name) if self._path(x, adapter_name) == "factored" else None
        return self._materialized_output(x, adapter_name) if out is None else out

    def _rank_dropout_mask(self, adapter_name: str, out: torch.Tensor) -> torch.Tensor:
        """Keep each output channel with probability 1 - rank_dropout (rescaled like peft)."""
        keep = (torch.rand(self.out_features, device=out.device) > self.rank_dropout[adapter_name]).to(out.dtype)
        if (self.always_scale_rank_dropout or self.rank_dropout_scale[adapter_name]) and keep.any():
            keep = keep / keep.mean()
        channel_dim = out.dim() - 1 - len(self.kernel_size)  # last for linear; before the spatial dims for convs
        shape = [1] * out.dim()
        shape[channel_dim] = self.out_features
        return keep.view(shape)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus each active adapter's delta (none when disabled or merged)."""
        previous_dtype = x.dtype
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        fusable = self._fusable_adapter(x) if not (args or kwargs) else None
        if fusable is not None and self._path(x, fusable, fusable=True) == "fused":
            return self._fused_forward(x, fusable)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter_name in self._active_here():
            if self._module_dropped(adapter_name):
                continue
            delta = self.delta_output(x.to(self._adapter_dtype(adapter_name)), adapter_name)
            if self.training and self.rank_dropout[adapter_name] > 0:
                delta = delta * self._rank_dropout_mask(adapter_name, delta)
            result = result + delta
        return result.to(previous_dtype)

    def _module_dropped(self, adapter_name: str) -> bool:
        """Module dropout: skip the whole adapter for this step."""
        return self.training and torch.rand(1).item() <= self.module_dropout[adapter_name]

    # ------------------------------------------------------------------ fused
    def _fusable_adapter(self, x: torch.Tensor) -> Optional[str]:
        """The one active adapter when base and delta can run as one matmul, else None.

        That is: unmerged, exactly one active adapter, a stock unhooked `nn.Linear` / `Conv1D` base,
        one dtype throughout, no autocast, and not while compiling (the function rebuilds delta_W
        through the layer in backward, which the compiler does not trace).
        """
        active = self._active_here()
        if self.merged or len(active) != 1 or self.is_conv:
            return None
        base = self.base_layer
        if not is_plain_linear(base) or not unobserved(base) or torch.compiler.is_compiling():
            return None
        if torch.is_autocast_enabled(x.device.type) or not x.dtype == base.weight.dtype == self._adapter_dtype(active[0]):
            return None
        return active[0]

    def _fused_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        base = self.base_layer
        if self._module_dropped(adapter_name):
            return base(x)
        row_scale = None
        if self.training and self.rank_dropout[adapter_name] > 0:
            row_scale = self._rank_dropout_mask(adapter_name, x).reshape(-1, 1)
        weight = base.weight.t() if self.is_conv1d_layer else base.weight
        factors = tuple(self.adapter_params([adapter_name]))
        return _FusedDeltaLinear.apply(x, weight, base.bias, row_scale, self, adapter_name, *factors)

    def fused_effective_weight(
        self, adapter_name: str, weight: torch.Tensor, row_scale: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """`W + delta_W` as (out, in), delta_W's rows scaled by the rank-dropout mask if any (no autograd)."""
        with torch.no_grad():
            return weight + self._scaled_delta(adapter_name, row_scale)

    def fused_backward(
        self, adapter_name: str, weight: torch.Tensor, row_scale: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], list[Optional[torch.Tensor]]]]:
        """(`W + delta_W`, a function from dL/d delta_W to each factor's gradient in `adapter_params` order).

        Two steps so that backward can drop `W + delta_W` (after the input gradient) before the
        (out, in) dL/d delta_W exists. Generic form: rebuild delta_W under autograd and
        differentiate it; methods with a closed form (LoHa) override this to skip the autograd rebuild.
        """
        factors = list(self.adapter_params([adapter_name]))
        with torch.enable_grad():
            delta = self._scaled_delta(adapter_name, row_scale)
        effective = weight + delta.detach()

        def factor_grads(grad_delta: torch.Tensor) -> list[Optional[torch.Tensor]]:
            wanted = [f for f in factors if f.requires_grad]
            found = iter(torch.autograd.grad(delta, wanted, grad_delta))
            return [next(found) if f.requires_grad else None for f in factors]

        return effective, factor_grads

    def _scaled_delta(self, adapter_name: str, row_scale: Optional[torch.Tensor]) -> torch.Tensor:
        delta = self._delta_kernel(adapter_name)
        return delta if row_scale is None else delta * row_scale

    def __repr__(self) -> str:
        return f"{self.method_name}." + super().__repr__()


class _FusedDeltaLinear(torch.autograd.Function):
    """`y = x (W + delta_W)^T + b`, delta_W rebuilt from the layer's factors in backward, not saved.

    Inputs after `layer, adapter_name` are the adapter's factor parameters, so autograd routes
    their gradients here; the layer turns `G = grad^T x` (dL/d delta_W) into them
    (`LycorisLayer.fused_backward`). Saves x only (the factors are parameters, alive anyway).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], row_scale: Optional[torch.Tensor],
        layer: LycorisLayer, adapter_name: str, *factors: torch.Tensor,
    ) -> torch.Tensor:
        effective = layer.fused_effective_weight(adapter_name, weight, row_scale)
        rows = x.reshape(-1, x.shape[-1])
        out = torch.mm(rows, effective.t()) if bias is None else torch.addmm(bias, rows, effective.t())
        ctx.layer, ctx.adapter_name = layer, adapter_name
        ctx.save_for_backward(x, weight, row_scale)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        x, weight, row_scale = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])
        effective, factor_grads_of = ctx.layer.fused_backward(ctx.adapter_name, weight, row_scale)
        grad_x = grad_rows.mm(effective).view(x.shape) if needs_x else None
        factor_grads: list[Optional[torch.Tensor]] = [None] * (len(ctx.needs_input_grad) - 6)
        grad_delta = None
        if needs_weight or any(ctx.needs_input_grad[6:]):
            # G = grad^T x (dL/d delta_W) overwrites W + delta_W, done with, unless G is W's gradient too.
            reuse = not needs_weight and effective.is_contiguous()
            grad_delta = torch.mm(grad_rows.t(), x.reshape(-1, x.shape[-1]), out=effective if reuse else None)
            factor_grads = [grad if need else None
                            for grad, need in zip(factor_grads_of(grad_delta), ctx.needs_input_grad[6:])]
        grad_bias = grad_rows.sum(0) if needs_bias else None
        return (grad_x, grad_delta if needs_weight else None, grad_bias, None, None, None, *factor_grads)


def kaiming_(tensor: torch.Tensor) -> None:
    """The default init of `nn.Linear` weights (Kaiming-uniform, a=sqrt(5)), as LyCORIS uses."""
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


def cp_rebuild(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """A CP-factored kernel: R[o, i, k...] = sum_ab core[a, b, k...] out_factor[a, o] in_factor[b, i]."""
    return torch.einsum("ab...,ao,bi->oi...", core, out_factor, in_factor)


def conv_fn(layer: LycorisLayer) -> Any:
    """F.conv2d or F.conv1d, matching the layer's base convolution."""
    return F.conv2d if isinstance(layer.get_base_layer(), nn.Conv2d) else F.conv1d


# ---------------------------------------------------------------------------------------------- tuner
def _wrappable(base: nn.Module) -> bool:
    return is_linear_like(base) or isinstance(base, (nn.Conv1d, nn.Conv2d))


def lycoris_dispatcher(layer_cls: type[LycorisLayer]) -> Callable[..., Optional[LycorisLayer]]:
    """The dispatcher of a LyCORIS method: `layer_cls` for Linear, Conv1D, Conv1d, Conv2d and quantized linear bases."""
    return wraps(_wrappable, layer_cls)


class LycorisTuner(BaseTuner):
    """Wraps targeted Linear / Conv1D / Conv1d / Conv2d (and quantized linear) modules in `layer_cls`."""

    default_target_modules = LYCORIS_TARGET_MODULES_BY_MODEL_TYPE
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: Any, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        """Per-adapter settings from the config that every layer of this method receives."""
        return {
            "r": pattern_value(config.rank_pattern or {}, key, config.r),
            "alpha": pattern_value(config.alpha_pattern or {}, key, config.alpha),
            "rank_dropout": config.rank_dropout,
            "module_dropout": config.module_dropout,
            "init_weights": config.init_weights,
            "use_effective_conv2d": config.use_effective_conv2d,
        }
