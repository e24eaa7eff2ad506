r"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, https://arxiv.org/abs/2402.09353).

DoRA splits the adapted weight into a direction and a trained magnitude `m`, one entry per output
channel:

    W' = m * (W + s B A) / ||W + s B A||          (norm of each output channel's row)

The norm is treated as a constant (detached from the graph), as section 4.3 of the paper
suggests. With `f = m / ||W + s B A||`, the layer output is the base output plus

    (f - 1) * (W x) + f * s * B A x               (the bias is not rescaled)

so DoRA plugs into the additive LoRA forward as one more term per adapter. `m` starts at
`||W + s B A||`, i.e. `f = 1`, so a fresh DoRA adapter computes exactly what plain LoRA does.

Merging uses the same form, `W <- W + (f - 1) W0 + f s B A`, where `W0` is the base weight with
every merged adapter taken out again. That keeps merged == unmerged even with several adapters
merged at once, and unmerging is exact subtraction given the remembered `f`.

`m` lives in `layer.lora_magnitude_vector[adapter]` (a `DoraMagnitude` holding `weight`); peft's
checkpoint key is `<module>.lora_magnitude_vector` without the `.weight` (see `LoraLayer.adapter_state`).
Shapes are peft's: `(out,)` for Linear / Embedding, `(1, out, 1, ...)` for convolutions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from .layer import LoraLayer


class DoraMagnitude(nn.Module):
    """The trained magnitude `m` of one adapter, plus a cache of the weight norm for inference.

    In eval mode `||W + s B A||` is remembered and reused while the tensors it was computed from
    are unchanged (same storage, same version counter), so generation does not redo a full-weight
    reduction per token. Training always recomputes it.
    """

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)
        self._norm_key: Optional[tuple] = None
        self._norm: Optional[torch.Tensor] = None

    def train(self, mode: bool = True) -> "DoraMagnitude":
        self._norm_key = self._norm = None
        return super().train(mode)

    def channel_norm(self, layer: "LoraLayer", adapter_name: str) -> torch.Tensor:
        """`||W + s B A||` per output channel, shaped like `weight` (detached)."""
        key = None if self.training else _cache_key(layer, adapter_name)
        if key is not None and key == self._norm_key:
            return self._norm
        norm = weight_norm(layer, adapter_name).view(self.weight.shape)
        if key is not None:
            self._norm_key, self._norm = key, norm
        return norm

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"


def _cache_key(layer: "LoraLayer", adapter_name: str) -> Optional[tuple]:
    """Identity of every tensor the norm depends on; None where versions are not tracked.

    The inference-mode flag is part of it: a norm made under `torch.inference_mode` must not be
    reused where autograd may need to save it.
    """
    tensors = [layer.get_base_layer().weight, *layer.adapter_params([adapter_name])]
    try:
        versions = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
    except RuntimeError:  # inference-mode tensors have no version counter
        return None
    return (layer.scaling[adapter_name], torch.is_inference_mode_enabled(), versions)


def weight_norm(layer: "LoraLayer", adapter_name: str, base_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`||W + s B A||` of each output channel, flat `(out,)`, computed without autograd.

    `base_weight` is W in (out, in, ...) layout; by default the layer's current base weight.
    """
    with torch.no_grad():
        delta = layer.out_in_layout(layer.dora_delta_weight(adapter_name))
        if base_weight is None:
            base_weight = layer.out_in_layout(layer.base_weight())
        return (base_weight.to(delta.dtype) + delta).flatten(1).norm(dim=1)


def unmerged_base_weight(layer: "LoraLayer", weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W0, the base weight as the unmerged forward sees it, in (out, in, ...) layout.

    `weight` is the current (dense, stored-layout) base weight, by default the layer's; the
    adapters in `layer.merged_adapters` are the ones merged into it. Each merged adapter added `delta` (plain LoRA) or `(f - 1) W0 + f delta` (DoRA), so the
    current weight is `g W0 + sum(f delta)` with `g = 1 + sum(f - 1)`; solve for W0 row by row.
    """
    with torch.no_grad():
        weight = layer.out_in_layout(layer.base_weight() if weight is None else weight)
        offset: Optional[torch.Tensor] = None
        gain: Optional[torch.Tensor] = None
        for name in layer.merged_adapters:
            delta = layer.out_in_layout(layer.get_delta_weight(name))
            factor = layer.merge_factors.get(name)
            if factor is not None:
                factor = _per_row(factor, delta)
                delta = factor * delta
                gain = factor if gain is None else gain + factor - 1
            offset = delta if offset is None else offset + delta
        if offset is None:
            return weight
        weight = weight.to(offset.dtype) - offset
        return weight if gain is None else weight / gain


def _per_row(factor: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return factor.reshape(-1, *(1,) * (weight.dim() - 1))


class DoraVariant:
    """DoRA as a strategy object: `LoraLayer` asks it for the forward term and the merge delta."""

    @staticmethod
    def init(layer: "LoraLayer", adapter_name: str) -> None:
        """Create `m = ||W + s B A||` (after any init that changed W, A or B).

        With A and B on the meta device (`low_cpu_mem_usage=True`) m is created there too, empty:
        the checkpoint being loaded fills all three.
        """
        factors = list(layer.adapter_params([adapter_name]))
        if factors and all(factor.is_meta for factor in factors):
            norm = torch.empty(layer.dora_channel_shape(), device="meta", dtype=factors[0].dtype)
        else:
            norm = weight_norm(layer, adapter_name).view(layer.dora_channel_shape())
        layer.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm)

    @staticmethod
    def adapter_output(
        layer: "LoraLayer", x: torch.Tensor, adapter_name: str, base_output: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """`(f - 1) * W x + f * s B A x` for the (un-merged) layer; `base_output` is `W x + b`."""
        magnitude = layer.lora_magnitude_vector[adapter_name]
        factor = magnitude.weight / magnitude.channel_norm(layer, adapter_name)
        dropout = layer.lora_dropout[adapter_name]
        if base_output is None or (layer.training and layer.drops_input and not isinstance(dropout, nn.Identity)):
            # peft's rule: with active dropout both terms see the dropped input, so W x is recomputed.
            if layer.drops_input:
                x = layer.apply_dropout(x, adapter_name)
            base_without_bias = layer.base_output_without_bias(x)
        else:
            bias = layer.bias
            base_without_bias = base_output if bias is None else base_output - bias.view(factor.shape)
        # f * (s B A x) with f folded into B's rows where the layer can (an (out, r) multiply
        # instead of one over the whole output, forward and backward); then one addcmul.
        low_rank = layer.rescaled_low_rank_output(x, adapter_name, factor)
        return torch.addcmul(low_rank, factor - 1, base_without_bias)

    @staticmethod
    def merge_factor(layer: "LoraLayer", adapter_name: str, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`f = m / ||W0 + s B A||` (flat, detached), with W0 the unmerged base weight (of `weight`)."""
        base = unmerged_base_weight(layer, weight)
        magnitude = layer.lora_magnitude_vector[adapter_name].weight.detach().flatten()
        return magnitude / weight_norm(layer, adapter_name, base)

    @staticmethod
    def merged_delta(
        layer: "LoraLayer", adapter_name: str, factor: torch.Tensor, weight: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """`(f - 1) W0 + f s B A` in the base weight's layout; W' = W + this equals `m * V / ||V||`."""
        with torch.no_grad():
            base = unmerged_base_weight(layer, weight)
            delta = layer.out_in_layout(layer.get_delta_weight(adapter_name))
            factor = _per_row(factor, delta)
            return layer.out_in_layout((factor - 1) * base.to(delta.dtype) + factor * delta)
