r"""LoRA on `nn.MultiheadAttention`: low-rank updates of the packed q/k/v projection and of out_proj.

`nn.MultiheadAttention` has no `nn.Linear` to hook for q/k/v (it holds one packed parameter,
`in_proj_weight`, shape (3 E, E)) and never calls `out_proj.forward` (it reads `out_proj.weight`).
So the adapted weights are computed and passed into the unchanged base forward:

    W_in'  = W_in  + s * B_in A_in          A_in: (r, E),  B_in: (3 E, r)
    W_out' = W_out + s * B_out A_out        out_proj becomes a LoRA `Linear` (its own A, B)
    y = MHA(query, key, value; W_in', W_out')

by swapping them in for the call (`_core.base_layers.tensors_swapped`), so the base weights are never modified by a
forward and the gradients reach A and B. The swap holds a lock per module: concurrent calls of one model run this
attention one at a time (each with its own weights); re-implementing `nn.MultiheadAttention.forward` on the
functional op to avoid the lock would copy torch's code. As in peft, both projections are adapted (one target, "mha"), only when
q, k and v share the embedding size, and without dropout on the adapter path (peft merges the
weights for the forward, which skips `lora_dropout` the same way). The checkpoint keys are peft's:
`<mha>.lora_A.<name>.weight` and `<mha>.base_layer.out_proj.lora_A.<name>.weight`.

peft's quirk, kept for interop: peft adds out_proj's update twice (its forward and its merge both
fold `s B_out A_out` into out_proj's weight, then merge out_proj once more), so an adapter means
`W_out + 2 s B_out A_out` there. peftkit computes the same, so adapters give the same outputs in
both libraries (`OutProjLinear`); docs/COMPATIBILITY.md lists it.

The out_proj layer is nested inside this one, so the tuner's walk (outermost layers only) never
sees it: this layer forwards every state change (add, switch, enable, delete, merge) to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Optional, Union

import torch
from torch import nn

from ...errors import ConfigError
from .._core.base_layers import swap_guard, tensors_swapped, wraps
from .._core.call_state import batch_adapter_names
from .extra_variants import FIELDS, LABELS
from .layer import Linear, LoraLayer


def _refuse_variant(lora_kwargs: dict) -> None:
    """VeLoRA / BD-LoRA / MonteCLoRA / KaSA do not adapt MultiheadAttention (checked before out_proj is wrapped)."""
    request = lora_kwargs.get("variant")
    if request is not None:
        field = FIELDS[request[0]]
        raise ConfigError(
            f"MultiheadAttention does not support {LABELS[request[0]]}, please set `{field}=None` "
            "(or exclude this module via exclude_modules)."
        )


class OutProjLinear(Linear):
    """out_proj's LoRA layer: `delta_W = 2 s B A`, what peft's MultiheadAttention applies (see above).

    Only its delta is used (the attention reads `out_proj.weight`, never calls its forward)."""

    #: How many times peft's MultiheadAttention adds out_proj's update.
    peft_delta_factor = 2.0

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return super().get_delta_weight(adapter_name) * self.peft_delta_factor

    def _get_name(self) -> str:
        return "Linear"  # printed as peft prints it: lora.Linear


class MultiheadAttention(LoraLayer, nn.Module):
    """LoRA on `nn.MultiheadAttention` (packed q/k/v weights and out_proj); see the module docstring."""

    supports_lora_bias = False

    def __init__(self, base_layer: nn.MultiheadAttention, adapter_name: str, **lora_kwargs: Any):
        if not getattr(base_layer, "_qkv_same_embed_dim", True):
            raise ConfigError(
                "Only same embed for query/key/value is supported as of now for MultiheadAttention "
                "(kdim/vdim differ from embed_dim here); exclude this module via exclude_modules."
            )
        if lora_kwargs.get("use_dora"):
            raise ConfigError("MultiheadAttention does not support DoRA (yet), please set use_dora to False.")
        if lora_kwargs.get("use_alora"):
            raise ConfigError("MultiheadAttention does not support aLoRA (yet), please drop alora_invocation_tokens.")
        _refuse_variant(lora_kwargs)
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TypeError("out_proj must be an instance of nn.Linear for MultiheadAttention.")
        super().__init__()
        self._init_lora_layer(base_layer, base_layer.embed_dim, 3 * base_layer.embed_dim)
        self.fan_in_fan_out = False
        base_layer.out_proj = OutProjLinear(base_layer.out_proj, adapter_name, **lora_kwargs)
        self._active_adapter = [adapter_name]
        LoraLayer.update_layer(self, adapter_name, **lora_kwargs)

    @property
    def out_proj_layer(self) -> "OutProjLinear":
        """The LoRA layer around the base's out_proj."""
        return self.get_base_layer().out_proj

    # Same factor shapes and delta as a Linear of (E -> 3 E).
    _create_adapter_weights = Linear._create_adapter_weights
    get_delta_weight = Linear.get_delta_weight

    def update_layer(self, adapter_name: str, **lora_kwargs: Any) -> None:
        _refuse_variant(lora_kwargs)
        if lora_kwargs.get("use_dora"):
            raise ConfigError("MultiheadAttention does not support DoRA (yet), please set use_dora to False.")
        super().update_layer(adapter_name, **lora_kwargs)
        self.out_proj_layer.update_layer(adapter_name, **lora_kwargs)

    # ------------------------------------------------------------------ forward
    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if batch_adapter_names() is not None:
            raise TypeError("lora.MultiheadAttention does not support mixed adapter batches.")
        base = self.get_base_layer()
        if self._disable_adapters and self.merged:
            self.unmerge()
        active = [] if self._disable_adapters or self.merged else self._active_here()
        if not active:
            return base(query, *args, **kwargs)
        out_proj = self.out_proj_layer
        with swap_guard(base):  # the base weights read here are never another call's swapped-in ones
            in_weight, out_weight = base.in_proj_weight, out_proj.base_layer.weight
            for name in active:
                in_weight = in_weight + self.get_delta_weight(name).to(in_weight.dtype)
                if name in out_proj.r:
                    out_weight = out_weight + out_proj.get_delta_weight(name).to(out_weight.dtype)
            with tensors_swapped([(base, "in_proj_weight", in_weight), (out_proj.base_layer, "weight", out_weight)]):
                return base(query, *args, **kwargs)

    # ------------------------------------------------------------------ merging
    def _read_base(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.get_base_layer().in_proj_weight, None  # the in_proj bias is not adapted

    def _write_base(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        param = self.get_base_layer().in_proj_weight
        if weight is not param:
            with torch.no_grad():
                param.copy_(weight)

    def _merge_names(self, names: list[str], safe_merge: bool) -> None:
        """Both projections or neither: the packed weight first; put back exactly if out_proj then fails."""
        out_proj = self.out_proj_layer
        snapshot = self.get_base_layer().in_proj_weight.detach().clone()
        done = len(self.merged_adapters)
        super()._merge_names(names, safe_merge)
        try:
            out_proj._merge_names(self._out_proj_names(names), safe_merge)
        except BaseException:
            self._write_base(snapshot, None)
            del self.merged_adapters[done:]
            raise

    def _check_merge(self, names: list[str], safe_merge: bool) -> None:
        """The tuner's check before merging anything covers both projections."""
        super()._check_merge(names, safe_merge)
        self.out_proj_layer._check_merge(self._out_proj_names(names), safe_merge)

    def _out_proj_names(self, names: list[str]) -> list[str]:
        """Of `names`, those out_proj's layer holds and has not merged yet."""
        out_proj = self.out_proj_layer
        return [n for n in names if n in out_proj.r and n not in out_proj.merged_adapters]

    def unmerge(self) -> None:
        super().unmerge()
        if self.out_proj_layer.merged:
            self.out_proj_layer.unmerge()

    def unwrapped(self) -> nn.Module:
        """The base attention with its original out_proj back in place."""
        base = self.get_base_layer()
        base.out_proj = self.out_proj_layer.base_layer
        return base

    def _restore_weights(self) -> None:
        """peft's hook to re-register weights its merge-based forward replaced; ours never replaces them."""

    # ------------------------------------------------------------------ the nested out_proj layer follows
    def adapter_params(self, adapter_names: Optional[Iterable[str]] = None) -> Iterator[nn.Parameter]:
        names = None if adapter_names is None else list(adapter_names)
        yield from super().adapter_params(names)
        yield from self.out_proj_layer.adapter_params(names)

    def trainable_adapter_params(self, adapter_names: Iterable[str]) -> Iterator[nn.Parameter]:
        names = list(adapter_names)
        yield from super().trainable_adapter_params(names)
        yield from self.out_proj_layer.trainable_adapter_params(names)

    def adapter_state(self, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
        state = super().adapter_state(adapter_name, prefix)
        state.update(self.out_proj_layer.adapter_state(adapter_name, f"{prefix}.base_layer.out_proj"))
        return state

    def set_adapter(self, adapter_names: Union[str, list[str]], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode)
        self.out_proj_layer.set_adapter(adapter_names, inference_mode)

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self.out_proj_layer.enable_adapters(enabled)

    def _move_adapter_to_base(self, adapter_name: str, keep_fp32: bool = True) -> None:
        super()._move_adapter_to_base(adapter_name, keep_fp32)
        if adapter_name in self.out_proj_layer.r:
            self.out_proj_layer._move_adapter_to_base(adapter_name, keep_fp32)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.out_proj_layer.delete_adapter(adapter_name)


dispatch_mha = wraps(nn.MultiheadAttention, MultiheadAttention)
