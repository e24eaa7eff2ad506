r"""Activated LoRA (aLoRA, peft's `alora_invocation_tokens`): the adapter acts only from an invocation on.

A causal LM with an aLoRA adapter computes the base model up to the last occurrence of the
adapter's invocation token sequence, and the adapted model from there:

    y_t = W x_t + m_t * s B A x_t,     m_t = 1 for the last `offset` positions of the row, else 0
    offset = (sequence length) - (start of the last invocation sequence)      (no invocation: 0)

So the KV cache of the prompt before the invocation is the base model's, and can be shared with
it. Offsets are found once per call from `input_ids` (`calculate_offsets`), or passed as
`alora_offsets=[...]`; during generation each new token lies after the invocation, so a step of
T new tokens adapts the last min(offset, T) of them. aLoRA works on Linear layers (Embedding
layers keep plain LoRA, as in peft), cannot be merged, and is not mixed with other adapters in
one batch. The offsets of a call travel with it (`_core/call_state.py`), not on the layers, so
concurrent calls with different offsets do not mix.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch

from .._core.call_state import alora_offsets

if TYPE_CHECKING:
    from .layer import LoraLayer


def calculate_offsets(
    configs: Mapping[str, Any], active_adapter: str, input_ids: torch.Tensor, adapter_names: Optional[Sequence[str]] = None
) -> list[Optional[int]]:
    """Per row: positions from the start of the last invocation sequence to the end (None: none found
    or the row's adapter is no aLoRA). `adapter_names` gives each row's adapter (default: the active one)."""
    offsets: list[Optional[int]] = []
    for row, sequence in enumerate(input_ids):
        name = adapter_names[row] if adapter_names is not None and row < len(adapter_names) else active_adapter
        tokens = getattr(configs.get(name), "alora_invocation_tokens", None) if name != "__base__" else None
        if name != "__base__" and name not in configs:
            warnings.warn(f"Adapter '{name}' not found in peft_config. Using base model for row {row}.", stacklevel=3)
        offsets.append(None if not tokens else _offset(sequence, tokens))
    return offsets


def _offset(sequence: torch.Tensor, tokens: Sequence[int]) -> Optional[int]:
    invocation = torch.tensor(list(tokens), dtype=sequence.dtype, device=sequence.device)
    length = len(invocation)
    if length > len(sequence):
        return None
    windows = sequence.unfold(0, length, 1)  # (positions, length): every window of the invocation's length
    starts = (windows == invocation).all(dim=1).nonzero()
    return None if starts.numel() == 0 else len(sequence) - int(starts[-1])


def token_mask(offsets: Optional[Sequence[Optional[int]]], output: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, 1) mask of the positions an aLoRA adapter acts on, for an output (batch, [tokens,] dim)."""
    batch = output.shape[0]
    tokens = output.shape[1] if output.dim() == 3 else 1
    if offsets is None:
        return output.new_zeros((batch, tokens, 1)) if output.dim() == 3 else output.new_zeros((batch, 1))
    counts = torch.tensor([0 if o is None else min(int(o), tokens) for o in offsets], device=output.device)
    mask = torch.arange(tokens, device=output.device).unsqueeze(0) >= (tokens - counts).unsqueeze(1)
    mask = mask.to(output.dtype)
    return mask.unsqueeze(-1) if output.dim() == 3 else mask.view(batch, 1)


class ALoraVariant:
    """aLoRA as a strategy object for `LoraLayer` (like DoRA's): the masked term; no merging."""

    @staticmethod
    def init(layer: "LoraLayer", adapter_name: str) -> None:
        """Nothing to create: aLoRA has plain LoRA's A and B."""

    @staticmethod
    def adapter_output(
        layer: "LoraLayer", x: torch.Tensor, adapter_name: str, base_output: Optional[torch.Tensor]
    ) -> torch.Tensor:
        delta = layer._lora_delta_output(x, adapter_name)
        return delta * token_mask(alora_offsets(), delta)

    @staticmethod
    def merge_factor(layer: "LoraLayer", adapter_name: str, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError(
            "aLoRA does not support merging: its update applies from the invocation tokens on, not to every "
            "position. Keep the PeftModel (or unload() without merging)."
        )

    @staticmethod
    def merged_delta(layer: "LoraLayer", adapter_name: str, *_: Any) -> torch.Tensor:
        return ALoraVariant.merge_factor(layer, adapter_name)
