r"""LoRA layers: a frozen base layer plus a low-rank update per adapter.

    y = W x + scaling * B A dropout(x),   scaling = lora_alpha / r   (lora_alpha / sqrt(r) with rsLoRA)

         x ──────────────┬──────────────┐
                         │              │ dropout
                   ┌─────▼─────┐   ┌────▼────┐
                   │  W (frozen)│   │ A: r x in│  Kaiming-uniform(a=sqrt 5)
                   └─────┬─────┘   └────┬────┘
                         │         ┌────▼────┐
                         │         │ B: out x r│  zeros -> a new adapter is a no-op
                         │         └────┬────┘
                         └──── + ◄──────┘ * scaling

Layers exist for `nn.Linear`, GPT-2's `Conv1D` (weight stored (in, out): `fan_in_fan_out`),
`nn.Embedding` and `nn.Conv1d/2d/3d`. Each adapter lives in `lora_A[name]` / `lora_B[name]`
(`lora_embedding_A/B[name]` for embeddings), the attribute layout peft and its ecosystem read.

Speed: a Linear / Conv1D layer with one active plain adapter on a stock, unhooked base runs as
one autograd function (`fused.py`: the low-rank product accumulated into the base output, the
input gradients summed inside one matmul, a cheap dropout mask); everything else takes the module
path below, which computes the same thing.

Variants change the per-adapter term, not the loop: an adapter with an entry in `lora_variant`
(DoRA `dora.py`, aLoRA `alora.py`; on Linear layers VeLoRA, BD-LoRA, MonteCLoRA, KaSA, see
`extra_variants.py`) computes its own term and merge delta. PiSSA / OLoRA (`init.py`) only change
how A, B -- and the base weight -- are initialised.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError, PeftWarning
from ...quantization.weights import is_quantized, read_weight
from .._core.base_layers import (
    base_of,
    is_linear_like,
    is_plain_linear,
    is_transposed,
    linear_features,
    unobserved,
    wraps,
)
from .._core.call_state import batch_adapter_names
from .._core.layer import BaseTunerLayer
from ...utils.validation import check_rank
from .alora import ALoraVariant
from .dora import DoraVariant
from .extra_variants import build_variant, forget_variant_tensors
from .fused import fast_dropout, fast_mask_supported, lora_linear, low_rank_delta
from .mixed_batch import linear_delta, looped_delta, uniform_adapter
from .init import init_from_base_weight, rewrites_base_weight

InitChoice = Union[bool, str]


class LoraLayer(BaseTunerLayer):
    """What every LoRA layer shares: per-adapter rank, alpha, scaling, dropout and init."""

    def __init__(self, base_layer: Optional[nn.Module] = None, **kwargs: Any) -> None:
        """peft's signature, for custom layers (`LoraLayer.__init__(self, base_layer, **kwargs)`): the
        per-adapter containers around `base_layer`. peftkit's own layers call `_init_lora_layer`."""
        super().__init__()
        if base_layer is not None:
            self._init_lora_layer(base_layer, getattr(base_layer, "in_features", None),
                                  getattr(base_layer, "out_features", None))

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = (
        "r", "lora_alpha", "scaling", "lora_dropout", "lora_variant", "merge_factors", "lora_bias", "frozen_factors"
    )
    #: Whether `lora_dropout` acts on this layer's input (not on the token ids of an embedding).
    drops_input: ClassVar[bool] = True
    #: Whether B may carry a bias (`lora_bias=True`, peft's option): B is a module with a bias here.
    supports_lora_bias: ClassVar[bool] = True
    #: What `use_alora=True` (aLoRA, `alora.py`) does here: "variant" (masked per token), "plain"
    #: (ignored, as peft does for embeddings) or None (refused).
    alora_support: ClassVar[Optional[str]] = None
    lora_convertible = True  # plain LoRA is its own B A (see supports_lora_conversion for variants)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """As every additive layer; an adapter with a variant (DoRA, aLoRA, ...) only where the
        variant says its update is a fixed W + delta_W (`variant.supports_lora_conversion()`)."""
        variant = self.lora_variant.get(adapter_name)
        if variant is not None and not getattr(variant, "supports_lora_conversion", lambda: False)():
            return False
        return super().supports_lora_conversion(adapter_name)

    def _init_lora_layer(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        self._init_tuner_layer(base_layer)
        self.in_features = in_features
        self.out_features = out_features
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict({})
        self.lora_A = nn.ModuleDict({})
        self.lora_B = nn.ModuleDict({})
        self.lora_embedding_A = nn.ParameterDict({})
        self.lora_embedding_B = nn.ParameterDict({})
        self.lora_magnitude_vector = nn.ModuleDict({})  # DoRA's m, one DoraMagnitude per adapter
        self.lora_variant: dict[str, Any] = {}  # adapter -> its variant object (DoRA, aLoRA, VeLoRA, ...)
        # Per merged variant adapter, what unmerging needs again (DoRA: its factor m / ||W + dW||).
        self.merge_factors: dict[str, torch.Tensor] = {}
        # Per adapter: whether B has a bias b_B, so that the update is scaling * (B A x + b_B).
        self.lora_bias: dict[str, bool] = {}
        # Per adapter: factors that stay frozen while it trains (MiCA's B), see `BaseTunerLayer.is_frozen`.
        self.frozen_factors: dict[str, tuple[str, ...]] = {}
        # A call's row adapters (mixed batches) and aLoRA offsets are not kept here: they travel with
        # the call (`_core/call_state.py`), so that concurrent calls of one model do not mix them.

    def _create_adapter_weights(self, adapter_name: str, r: int) -> None:
        raise NotImplementedError

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: InitChoice = True,
        use_rslora: bool = False,
        use_dora: bool = False,
        lora_bias: bool = False,
        use_alora: bool = False,
        init_config: Optional[dict[str, Any]] = None,
        variant: Optional[tuple[str, Any]] = None,
    ) -> None:
        """Add (or replace) adapter `adapter_name` on this layer.

        "pissa" / "pissa_niter_N" / "olora" / "loftq" inits also rewrite the base weight (see `init.py`;
        `init_config` is the init's own options, e.g. the `loftq_config` dict).
        `lora_bias`: B gets a bias (zero at init), so the update is `scaling * (B A x + b_B)`;
        merging adds `scaling * b_B` to the base bias.
        `variant`: VeLoRA / BD-LoRA / MonteCLoRA / KaSA, a request built by `extra_variants.variant_request`.
        """
        check_rank(r, "r")
        extra = None if variant is None else build_variant(self, variant, lora_bias)
        self._check_options(use_alora, use_dora, lora_bias)
        self.lora_bias[adapter_name] = bool(lora_bias)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        # No dropout op at all when p == 0: it would cost a copy of x per step for nothing.
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._create_adapter_weights(adapter_name, r)
        if rewrites_base_weight(init_lora_weights):
            self._init_from_base_weight(adapter_name, init_lora_weights, init_config)
        else:
            self.reset_lora_parameters(adapter_name, init_lora_weights)
        self._move_adapter_to_base(adapter_name)
        self._set_variant(adapter_name, extra, use_dora, use_alora)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _check_options(self, use_alora: bool, use_dora: bool, lora_bias: bool) -> None:
        """aLoRA and `lora_bias` on layers that cannot take them are refused (before anything is created)."""
        base = type(self.get_base_layer()).__name__
        if use_alora and (use_dora or self.alora_support is None):
            what = "DoRA adapters" if use_dora else f"{base} layers"
            raise ConfigError(
                f"aLoRA (alora_invocation_tokens) does not support adapting {what}; exclude this module "
                "via exclude_modules, or drop alora_invocation_tokens."
            )
        if lora_bias and not self.supports_lora_bias:
            raise ConfigError(f"lora_bias=True is not supported for {type(self).__name__} layers; exclude this module.")
        if lora_bias and getattr(self.get_base_layer(), "bias", None) is None:
            warnings.warn(
                f"`lora_bias=True` was passed but the targeted layer of type {base} "
                "has no bias. This means that merging LoRA weights won't be possible.",
                PeftWarning,
                stacklevel=7,
            )

    def _set_variant(self, adapter_name: str, extra: Any, use_dora: bool, use_alora: bool) -> None:
        """The adapter's variant, built after its init (DoRA's magnitude is the norm of the initialised
        weight; KaSA truncates W, BD-LoRA replaces a factor); a re-added adapter keeps no stale variant
        tensors (lora_diag / sampler / vector / magnitude)."""
        self.lora_variant.pop(adapter_name, None)
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        forget_variant_tensors(self, adapter_name)
        if extra is not None:
            self.lora_variant[adapter_name] = extra
            extra.init(self, adapter_name)
            self._move_adapter_to_base(adapter_name)
        elif use_dora:
            self.lora_variant[adapter_name] = DoraVariant()
            self.lora_variant[adapter_name].init(self, adapter_name)
        elif use_alora and self.alora_support == "variant":
            self.lora_variant[adapter_name] = ALoraVariant()

    def _init_from_base_weight(
        self, adapter_name: str, init_lora_weights: str, init_config: Optional[dict[str, Any]] = None
    ) -> None:
        """PiSSA / OLoRA / LoftQ: only Linear layers (and Conv1D) take A and B from their base weight."""
        raise ConfigError(
            f"init_lora_weights={init_lora_weights!r} works on Linear layers only, not on "
            f"{type(self.get_base_layer()).__name__}; exclude this module via exclude_modules."
        )

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: InitChoice) -> None:
        """A Kaiming-uniform (or N(0, 1/r) for "gaussian") and B zero, so delta_W starts at 0.

        Embeddings are the other way round (A zero, B normal), as in peft. `False` keeps the random
        init of both factors, which makes the adapter a non-trivial function (useful in tests).
        """
        self.frozen_factors.pop(adapter_name, None)
        if init_lora_weights is False:
            return
        if init_lora_weights == "eva":  # B zero; A is set from the data later (`eva.py`)
            if adapter_name in self.lora_B:
                nn.init.zeros_(self.lora_B[adapter_name].weight)
            return
        if init_lora_weights == "orthogonal":
            self._orthogonal_init(adapter_name)
            return
        if init_lora_weights == "mica":
            self._mica_init(adapter_name)
            return
        if adapter_name in self.lora_A:
            weight_a = self.lora_A[adapter_name].weight
            if init_lora_weights == "gaussian":
                nn.init.normal_(weight_a, std=1 / self.r[adapter_name])
            else:
                nn.init.kaiming_uniform_(weight_a, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[adapter_name].weight)
            if self.lora_B[adapter_name].bias is not None:
                nn.init.zeros_(self.lora_B[adapter_name].bias)
        if adapter_name in self.lora_embedding_A:
            nn.init.zeros_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])

    def _orthogonal_init(self, adapter_name: str) -> None:
        """peft's "orthogonal" init (Linear layers): A and B from the odd and even rows of one random
        orthogonal r x r matrix, scaled by 1/10. B A is not zero, so unlike the default init the new
        adapter changes the output from the start (as in peft)."""
        rank = self.r[adapter_name]
        if not isinstance(self, Linear):
            raise ConfigError(
                f"init_lora_weights='orthogonal' works on Linear layers only, not on {type(self.get_base_layer()).__name__}; "
                "exclude this module via exclude_modules."
            )
        if rank % 2:
            raise ConfigError(f"Orthogonal initialization requires the LoRA rank to be even, got {rank} instead.")
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(rank, rank))
            weight_a = (torch.randn(self.in_features, rank // 2) @ q[0::2, :]).T / 10.0
            weight_b = torch.randn(rank // 2, self.out_features).T @ q[1::2, :] / 10.0
            self.lora_A[adapter_name].weight.copy_(weight_a)
            self.lora_B[adapter_name].weight.copy_(weight_b)

    def _mica_init(self, adapter_name: str) -> None:
        """MiCA (minor component adaptation, peft's "mica"): B = the r left singular vectors of W with the
        smallest singular values, A = 0, and B frozen (only A trains). B A = 0, so W is left as it is.

            W = U S V^T  (S descending)     B = U[:, -r:]      A = 0
        """
        names = {Linear: ("lora_A", "lora_B"), Embedding: ("lora_embedding_A", "lora_embedding_B")}
        factor_names = next((v for cls, v in names.items() if isinstance(self, cls)), None)
        if factor_names is None:
            raise ConfigError(
                f"init_lora_weights='mica' works on Linear and Embedding layers only, not on "
                f"{type(self.get_base_layer()).__name__}; exclude this module via exclude_modules."
            )
        rank = self.r[adapter_name]
        self.frozen_factors[adapter_name] = (factor_names[1],)
        factor_a, factor_b = (getattr(self, attr)[adapter_name] for attr in factor_names)
        weight_a = factor_a if isinstance(factor_a, torch.Tensor) else factor_a.weight
        weight_b = factor_b if isinstance(factor_b, torch.Tensor) else factor_b.weight
        if weight_b.is_meta:  # low_cpu_mem_usage: the checkpoint fills both
            return
        weight = self.out_in_layout(self.base_weight()).float()
        if rank > min(weight.shape):
            raise ConfigError(
                f"MiCA requires `r` <= min(in_features, out_features) but got r={rank} for a layer with weight shape "
                f"{tuple(weight.shape)} (max usable r is {min(weight.shape)}); lower r for this module."
            )
        left, _, _ = torch.linalg.svd(weight, full_matrices=False)
        with torch.no_grad():
            weight_b.copy_(left[:, -rank:])
            weight_a.zero_()

    def adapter_state(self, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
        """As the base class, but DoRA's magnitude is saved as `<prefix>.lora_magnitude_vector` (peft's key)."""
        state = super().adapter_state(adapter_name, prefix)
        variant_state = getattr(self.lora_variant.get(adapter_name), "adapter_state", None)
        if variant_state is not None:  # e.g. VeLoRA's projection vector (a buffer)
            state.update(variant_state(self, adapter_name, prefix))
        dora_key = f"{prefix}.lora_magnitude_vector.weight"
        if dora_key in state:
            state[dora_key.removesuffix(".weight")] = state.pop(dora_key)
        return state

    def out_in_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (or a delta) seen as (out, in, ...); its own inverse. Layers stored otherwise override."""
        return weight

    def dora_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The `s B A` (stored layout) whose sum with W DoRA normalises: the merge delta, for most layers."""
        return self.get_delta_weight(adapter_name)

    def dora_channel_shape(self) -> tuple[int, ...]:
        """Shape of DoRA's magnitude: one entry per output channel, broadcastable against the output."""
        return (self.out_features,)

    def base_weight(self) -> torch.Tensor:
        """The base weight as a dense tensor in its stored layout (quantized bases dequantize)."""
        return read_weight(self.get_base_layer())

    def base_output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """W x: the base layer's output without its bias (DoRA rescales only this part)."""
        raise NotImplementedError

    def low_rank_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """scaling * B(A(x)) for module-form adapters (Linear, Conv); no dropout."""
        lora_a = self.lora_A[adapter_name]
        return self.lora_B[adapter_name](lora_a(x.to(lora_a.weight.dtype))) * self.scaling[adapter_name]

    def rescaled_low_rank_output(self, x: torch.Tensor, adapter_name: str, channel_scale: torch.Tensor) -> torch.Tensor:
        """channel_scale * scaling * B(A(x)), `channel_scale` shaped like DoRA's magnitude; no dropout."""
        return channel_scale * self.low_rank_output(x, adapter_name)

    def _lora_delta_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """scaling * B(A(dropout(x))): a plain LoRA adapter's term."""
        if self.drops_input:
            x = self.apply_dropout(x, adapter_name)
        return self.low_rank_output(x, adapter_name)

    def apply_dropout(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """`lora_dropout[adapter_name](x)`; a stock, unhooked `nn.Dropout` runs as `fast_dropout` (same
        distribution, a cheaper mask: ~0.1 ms instead of ~3 ms per 0.5 M inputs here)."""
        dropout = self.lora_dropout[adapter_name]
        if type(dropout) is nn.Dropout and dropout.training and _plain_dropout(dropout) and unobserved(dropout):
            return fast_dropout(x, dropout.p)
        return dropout(x)

    def _active_here(self) -> list[str]:
        return [name for name in self._active_adapter if name in self.r]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus each active adapter's update (none when disabled or merged)."""
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        base_output = result
        result_dtype = result.dtype
        names = batch_adapter_names()
        if names is not None:
            return (result + self._mixed_batch_delta(x, names)).to(result_dtype)
        for adapter_name in self._active_here():
            result = result + self._adapter_output(x, adapter_name, base_output)
        return result.to(result_dtype)

    def _adapter_output(
        self, x: torch.Tensor, adapter_name: str, base_output: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """What `adapter_name` adds to the base output `base_output` (= base_layer(x); DoRA reuses it)."""
        variant = self.lora_variant.get(adapter_name)
        if variant is not None:
            return variant.adapter_output(self, x, adapter_name, base_output)
        return self._lora_delta_output(x, adapter_name)

    def _mixed_batch_delta(self, x: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """Each row's own adapter update (`names`: the call's row adapters, see `mixed_batch.py`);
        Linear overrides with a batched form."""
        return looped_delta(self, x, names, self._lora_delta_output)

    # ------------------------------------------------------------------ merging
    def fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W + scaling * B A, or DoRA's `W + (f - 1) W0 + f s B A` (remembering f for `unfold`)."""
        variant = self.lora_variant.get(adapter_name)
        if variant is None or not hasattr(variant, "merge_factor"):  # plain LoRA, or an additive variant
            weight, _ = super().fold(adapter_name, weight, bias)
            return weight, self._bias_moved(adapter_name, bias, +1)
        factor = variant.merge_factor(self, adapter_name, weight)
        self.merge_factors[adapter_name] = factor
        return weight + variant.merged_delta(self, adapter_name, factor, weight).to(weight.dtype), bias

    def unfold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        factor = self.merge_factors.get(adapter_name)
        if factor is None:
            weight, _ = super().unfold(adapter_name, weight, bias)
            return weight, self._bias_moved(adapter_name, bias, -1)
        delta = self.lora_variant[adapter_name].merged_delta(self, adapter_name, factor, weight)
        return weight - delta.to(weight.dtype), bias

    def _forget_merge(self, adapter_name: str) -> None:
        self.merge_factors.pop(adapter_name, None)

    def _bias_moved(self, adapter_name: str, bias: Optional[torch.Tensor], sign: int) -> Optional[torch.Tensor]:
        """The base bias plus (sign +1) or minus (-1) `scaling * b_B` of a `lora_bias` adapter."""
        if not self.lora_bias.get(adapter_name):
            return bias
        if bias is None:
            raise RuntimeError(
                "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias; "
                "keep the adapter unmerged on this layer."
            )
        lora_bias = self.lora_B[adapter_name].bias.detach() * self.scaling[adapter_name]
        return bias + sign * lora_bias.to(bias.dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class Linear(LoraLayer, nn.Module):
    """LoRA on `nn.Linear` or transformers' `Conv1D` (`fan_in_fan_out=True`, weight stored (in, out))."""

    alora_support = "variant"
    #: VeLoRA / BD-LoRA / MonteCLoRA / KaSA adapt Linear layers only (`extra_variants.py`).
    supports_extra_variants = True

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, fan_in_fan_out: Optional[bool] = None, **lora_kwargs: Any
    ):
        super().__init__()
        self._init_lora_layer(base_layer, *linear_features(base_layer))
        # The layout is the base's (see `record_layout`); an explicit value is for tests of the layer alone.
        self.fan_in_fan_out = is_transposed(base_of(base_layer)) if fan_in_fan_out is None else fan_in_fan_out
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **lora_kwargs)

    def _create_adapter_weights(self, adapter_name: str, r: int) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=self.lora_bias.get(adapter_name, False))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """As `LoraLayer.forward`; one plain adapter on a plain base runs as one fused function."""
        adapter_name = None if args or kwargs else self._fusable_adapter(x)
        if adapter_name is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        dropout = self.lora_dropout[adapter_name]
        return lora_linear(x, self.out_in_layout(base.weight), base.bias, self.lora_A[adapter_name].weight,
                           self.lora_B[adapter_name].weight, self.scaling[adapter_name],
                           getattr(dropout, "p", 0.0), dropout.training)

    def _fusable_adapter(self, x: torch.Tensor) -> Optional[str]:
        """The one active adapter when base and adapter can run as `lora_linear`, else None.

        That is: adapters on and unmerged, exactly one active plain (non-DoRA) adapter,
        a stock `nn.Linear` / `Conv1D` base, no hook on any of the modules the fused call skips, one
        dtype throughout and no autocast. A mixed batch qualifies when all its rows use one adapter.
        """
        if self._disable_adapters or self.merged:
            return None
        names = batch_adapter_names()
        if names is None:
            active = self._active_here()
        else:  # a mixed batch whose rows all use one adapter is that adapter's plain forward
            active = [name for name in (uniform_adapter(self, x, names),) if name is not None]
        if len(active) != 1 or active[0] in self.lora_variant:
            return None
        name = active[0]
        base, lora_a, lora_b = self.base_layer, self.lora_A[name], self.lora_B[name]
        if not is_plain_linear(base) or not _plain_modules(lora_a, lora_b, self.lora_dropout[name], base):
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        dtypes = {x.dtype, base.weight.dtype, lora_a.weight.dtype, lora_b.weight.dtype}
        return name if len(dtypes) == 1 and (base.bias is None or base.bias.dtype == x.dtype) else None

    def _mixed_batch_delta(self, x: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        if self.lora_variant.keys() & set(names):  # variant terms are not two stacked matmuls
            return looped_delta(self, x, names, self._adapter_output)
        if any(self.lora_bias.values()):  # the batched form stacks B's weights only
            return super()._mixed_batch_delta(x, names)
        return linear_delta(self, x, names)

    def rescaled_low_rank_output(self, x: torch.Tensor, adapter_name: str, channel_scale: torch.Tensor) -> torch.Tensor:
        """As the base class, with the per-channel scale folded into B's rows: (out, r) work, not (tokens, out)."""
        lora_a, lora_b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        if not _plain_modules(lora_a, lora_b) or torch.is_autocast_enabled(x.device.type):
            return super().rescaled_low_rank_output(x, adapter_name, channel_scale)
        weight_b = lora_b.weight * channel_scale.view(-1, 1).to(lora_b.weight.dtype)
        return low_rank_delta(x.to(lora_a.weight.dtype), lora_a.weight, weight_b, self.scaling[adapter_name], 0.0, False)

    def _lora_delta_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """scaling * B(A(dropout(x))), through the fused `LowRankDelta` where nothing observes the modules."""
        lora_a, lora_b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        dropout = self.lora_dropout[adapter_name]
        if not _plain_modules(lora_a, lora_b, dropout) or torch.is_autocast_enabled(x.device.type):
            return super()._lora_delta_output(x, adapter_name)
        weight_a = lora_a.weight
        return low_rank_delta(x.to(weight_a.dtype), weight_a, lora_b.weight, self.scaling[adapter_name],
                              getattr(dropout, "p", 0.0), dropout.training)

    def _init_from_base_weight(
        self, adapter_name: str, init_lora_weights: str, init_config: Optional[dict[str, Any]] = None
    ) -> None:
        if is_quantized(self.get_base_layer()):
            fix = ("call replace_lora_weights_loftq(peft_model) on the quantized model instead"
                   if init_lora_weights == "loftq" else "use init_lora_weights=True or 'gaussian'")
            raise ConfigError(
                f"init_lora_weights={init_lora_weights!r} rewrites the base weight, which is quantized here; {fix}."
            )
        init_from_base_weight(self, adapter_name, init_lora_weights, init_config)

    def out_in_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    def base_output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.out_in_layout(self.base_weight())
        return F.linear(x.to(weight.dtype), weight)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W = scaling * B A, transposed for (in, out)-stored bases (an additive variant's own delta)."""
        variant_delta = getattr(self.lora_variant.get(adapter_name), "delta_weight", None)
        if variant_delta is not None:
            delta = variant_delta(self, adapter_name)
            return delta.T if self.fan_in_fan_out else delta
        delta = self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight * self.scaling[adapter_name]
        return delta.T if self.fan_in_fan_out else delta


def _plain_dropout(dropout: nn.Module) -> bool:
    """A stock `nn.Identity`, or a stock out-of-place `nn.Dropout` whose rate the fast mask can draw."""
    if type(dropout) is nn.Dropout:
        return not dropout.inplace and fast_mask_supported(dropout.p)
    return type(dropout) is nn.Identity


def _plain_modules(
    lora_a: nn.Module, lora_b: nn.Module, dropout: Optional[nn.Module] = None, base: Optional[nn.Module] = None
) -> bool:
    """Whether A, B (the dropout, the base) are stock modules, with no hooks that the fused path would skip."""
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_a.bias is not None or lora_b.bias is not None:
        return False
    if dropout is not None and not _plain_dropout(dropout):
        return False
    return unobserved(*(m for m in (lora_a, lora_b, dropout, base) if m is not None))


class Embedding(LoraLayer, nn.Module):
    """LoRA on `nn.Embedding`: the update is a low-rank table `(B A)^T` looked up by token id."""

    drops_input = False
    supports_lora_bias = False  # A and B are bare tables, as in peft
    alora_support = "plain"  # as peft: an embedding's LoRA acts at every position

    def __init__(self, base_layer: nn.Embedding, adapter_name: str, **lora_kwargs: Any):
        super().__init__()
        self._init_lora_layer(base_layer, base_layer.num_embeddings, base_layer.embedding_dim)
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **lora_kwargs)

    def _create_adapter_weights(self, adapter_name: str, r: int) -> None:
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r))

    def _init_from_base_weight(
        self, adapter_name: str, init_lora_weights: str, init_config: Optional[dict[str, Any]] = None
    ) -> None:
        if init_lora_weights == "loftq":
            super()._init_from_base_weight(adapter_name, init_lora_weights, init_config)
        # As peft: with PiSSA / OLoRA embeddings keep the standard init (A zero, B normal) and the base as it is.
        self.reset_lora_parameters(adapter_name, True)

    def out_in_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T  # the table is (num_embeddings, dim): "out" is the embedding dimension

    def base_output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)

    def _active_here(self) -> list[str]:
        return [name for name in self._active_adapter if name in self.lora_embedding_A]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.lora_embedding_B[adapter_name] @ self.lora_embedding_A[adapter_name]
        return delta.T * self.scaling[adapter_name]

    def low_rank_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """scaling * (row x of A^T) B^T: the low-rank table looked up like the base table."""
        base = self.get_base_layer()
        after_a = F.embedding(
            x,
            self.lora_embedding_A[adapter_name].T,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )
        return (after_a @ self.lora_embedding_B[adapter_name].T) * self.scaling[adapter_name]


class Conv(LoraLayer, nn.Module):
    """LoRA on `nn.Conv1d/2d/3d`: A is a conv with the base kernel, B a 1x1 conv.

    On a grouped base (groups = G > 1) B is grouped too, as in peft: A maps all inputs to r channels,
    B maps r / G of them to each group's outputs (so r must be a multiple of G). The update is then
    no longer one weight of the base's shape, so such adapters cannot be merged. DoRA works there
    (unmerged) with peft's normaliser, see `dora_delta_weight`.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, **lora_kwargs: Any):
        super().__init__()
        self._init_lora_layer(base_layer, base_layer.in_channels, base_layer.out_channels)
        if base_layer.groups > 1:
            warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.", stacklevel=6)
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **lora_kwargs)

    def _create_adapter_weights(self, adapter_name: str, r: int) -> None:
        base = self.get_base_layer()
        if r % base.groups:
            raise ConfigError(
                f"Targeting a {type(base).__name__} with groups={base.groups} and rank {r}: LoRA on a grouped "
                "convolution needs a rank divisible by groups. Choose another r (or rank_pattern entry), "
                "or exclude this module via exclude_modules."
            )
        conv_cls = type(base)
        ones = (1,) * len(base.kernel_size)
        self.lora_A[adapter_name] = conv_cls(
            self.in_features, r, base.kernel_size, base.stride, base.padding, dilation=base.dilation, bias=False
        )
        bias = self.lora_bias.get(adapter_name, False)
        self.lora_B[adapter_name] = conv_cls(r, self.out_features, ones, ones, groups=base.groups, bias=bias)

    def dora_channel_shape(self) -> tuple[int, ...]:
        # (1, out, 1, ...) as peft stores it, which also broadcasts against the (N, out, ...) output.
        return (1, self.out_features) + (1,) * (self.get_base_layer().weight.dim() - 2)

    def base_output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return base._conv_forward(x.to(base.weight.dtype), base.weight, None)

    def _get_name(self) -> str:
        return type(self.get_base_layer()).__name__  # printed as peft prints it: lora.Conv2d

    def dora_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """As the base class; on a grouped base (no true delta of the base's shape exists) peft's
        normaliser: `s * (B.view(-1, r) @ A.view(r, -1))` reshaped to the kernel's shape."""
        base = self.get_base_layer()
        if base.groups == 1:
            return self.get_delta_weight(adapter_name)
        rank = self.r[adapter_name]
        weight_a, weight_b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        product = weight_b.reshape(-1, rank) @ weight_a.reshape(rank, -1)
        return product.reshape(base.weight.shape) * self.scaling[adapter_name]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W[o, i, k] = scaling * sum_r B[o, r] A[r, i, k] (B is 1x1, so it is a matmul)."""
        groups = self.get_base_layer().groups
        if groups > 1:
            raise NotImplementedError(
                f"Merging is not supported for _ConvNd layers with groups > 1 (groups={groups}): a LoRA update "
                "on a grouped convolution is not a weight of the base's shape. Keep the PeftModel, or unload()."
            )
        weight_a = self.lora_A[adapter_name].weight
        weight_b = self.lora_B[adapter_name].weight
        delta = weight_b.flatten(1) @ weight_a.flatten(1)
        return delta.view(self.get_base_layer().weight.shape) * self.scaling[adapter_name]


# ---------------------------------------------------------------------- dispatchers (LoraModel.dispatchers)
dispatch_embedding = wraps(nn.Embedding, Embedding)
dispatch_conv = wraps((nn.Conv1d, nn.Conv2d, nn.Conv3d), Conv)
dispatch_linear = wraps(is_linear_like, Linear)  # Linear, Conv1D and quantized linear bases
SUPPORTED_LAYERS = (
    "torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d/2d/3d, torch.nn.MultiheadAttention, transformers' Conv1D "
    "and quantized linear layers"
)
