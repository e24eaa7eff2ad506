r"""X-LoRA's forward for one LoRA layer holding the experts: each expert's update weighted per token.

    y = W x + g * sum_e  s_e(t) * scaling_e * B_e A_e x      s: the classifier's scalings for this layer
                                                              g: global_scaling_weight

With `top_k_lora` only the k largest s_e(t) of each token are kept (and with `enable_softmax_topk`
renormalised by a softmax over them). Linear layers scale the input (x * s_e, as peft); embeddings
scale the looked-up low-rank rows, which is the same for a scalar per token. The layer's own
`forward` is replaced per instance (peft does the same), so the LoRA layer keeps its type, weights
and checkpoint keys; disabled or merged, it runs its normal forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from ...errors import ConfigError
from ..lora.layer import Embedding, Linear, LoraLayer

if TYPE_CHECKING:
    from .model import XLoraModel


def layer_scalings(scalings: torch.Tensor, layer_number: int, config: Any) -> torch.Tensor:
    """This layer's (batch, seq, E) scalings, top-k masked (and renormalised) as configured."""
    chosen = scalings[:, :, layer_number, :]
    if config.top_k_lora is not None:
        _, top = torch.topk(chosen, k=config.top_k_lora, dim=-1)
        mask = torch.zeros_like(chosen, dtype=torch.bool).scatter_(-1, top, True)
        chosen = chosen * mask.to(chosen.dtype)
    if config.enable_softmax_topk:
        kept = chosen != 0
        chosen = torch.softmax(chosen.masked_fill(~kept, float("-inf")), dim=-1).masked_fill(~kept, 0.0)
    return chosen


def xlora_forward(owner: "XLoraModel", layer: LoraLayer, layer_number: int) -> Callable[..., torch.Tensor]:
    """The forward that replaces `layer.forward` (module docstring)."""
    normal = type(layer).forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if layer._disable_adapters or layer.merged:
            return normal(layer, x, *args, **kwargs)
        if owner.in_scaling_pass:  # the pass that feeds the classifier sees the base model
            return layer.base_layer(x, *args, **kwargs)
        result = layer.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        scalings = owner.internal_xlora_scalings
        config = owner.xlora_config
        chosen: Optional[torch.Tensor] = None
        if scalings is not None:
            chosen = layer_scalings(scalings, layer_number, config)
        weight = 1.0 if chosen is None else config.global_scaling_weight
        for index, name in enumerate(layer.active_adapters):
            if name not in layer.r:
                continue
            if name in layer.lora_variant:
                raise ConfigError("X-LoRA currently does not support LoRA layers with DoRA (or another LoRA variant); "
                                  "use plain LoRA experts.")
            weight_e = None if chosen is None else chosen[..., index : index + 1]
            if isinstance(layer, Embedding):
                delta = layer.low_rank_output(x, name)
                if weight_e is not None:
                    delta = delta * weight_e.to(delta.dtype)
            else:
                x_e = x if weight_e is None else x * weight_e.to(x.dtype)
                delta = layer._lora_delta_output(x_e, name)
            result = result + delta * weight
        return result.to(dtype)

    return forward


def xlora_layers(model: torch.nn.Module) -> list[LoraLayer]:
    """The LoRA layers X-LoRA drives, in module order (their index is the scalings' layer axis)."""
    layers = []
    for module in model.modules():
        if isinstance(module, (Linear, Embedding)):
            layers.append(module)
        elif isinstance(module, LoraLayer):
            raise ConfigError(f"X-LoRA supports LoRA experts on Linear / Conv1D and Embedding layers, not on "
                              f"{type(module.get_base_layer()).__name__}; train the experts without those targets.")
    return layers
