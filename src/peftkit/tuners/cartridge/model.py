"""`CartridgeEncoder` and its tuner: the KV-cache prefix as parameters, split into a frozen head and the rest.

    table = [frozen_embedding ; trainable_embedding]      (num_frozen_tokens + rest) x (num_layers * 2 * token_dim)

laid out per position as prefix tuning's: [layer 0 key, layer 0 value, layer 1 key, ...], each
`num_attention_heads * head_dim` wide (key/value heads under grouped-query attention). The checkpoint
holds the whole table as `prompt_embeddings`, as peft writes it; loading splits it again.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import nn

from ...errors import CheckpointError
from .._prompt.model import PromptLearningModel
from .config import CartridgeConfig


class CartridgeEncoder(nn.Module):
    """`frozen_embedding` (the first `num_frozen_tokens` positions, or None) and `trainable_embedding`."""

    def __init__(self, config: CartridgeConfig, word_embeddings: Optional[nn.Module] = None) -> None:
        super().__init__()
        width = config.num_layers * 2 * config.token_dim
        self.num_frozen_tokens = int(config.num_frozen_tokens)
        self.num_trainable_tokens = config.num_virtual_tokens - self.num_frozen_tokens
        self.frozen_embedding = (
            nn.Parameter(torch.empty(self.num_frozen_tokens, width), requires_grad=False) if self.num_frozen_tokens else None
        )
        self.trainable_embedding = nn.Parameter(torch.empty(self.num_trainable_tokens, width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 1) entries, as `nn.Embedding` starts (frozen part drawn first)."""
        with torch.no_grad():
            for param in (self.frozen_embedding, self.trainable_embedding):
                if param is not None:
                    nn.init.normal_(param)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table, frozen positions first."""
        if self.frozen_embedding is None:
            return self.trainable_embedding
        return torch.cat((self.frozen_embedding, self.trainable_embedding), dim=0)

    @property
    def embedding(self) -> SimpleNamespace:
        """`embedding.weight`, the interface every prompt encoder offers (a read-only view here)."""
        return SimpleNamespace(weight=self.weight)

    def frozen_parameters(self) -> tuple[nn.Parameter, ...]:
        return () if self.frozen_embedding is None else (self.frozen_embedding,)

    def load_prompt_embeddings(self, prompt_embeddings: torch.Tensor) -> None:
        """Copy a whole `(num_virtual_tokens, num_layers * 2 * token_dim)` table into the two parts."""
        expected = (self.num_frozen_tokens + self.num_trainable_tokens, self.trainable_embedding.shape[1])
        if tuple(prompt_embeddings.shape) != expected:
            raise CheckpointError(
                f"Invalid `prompt_embeddings` shape: expected {expected}, got {tuple(prompt_embeddings.shape)}. "
                "Check num_virtual_tokens and that the prefix comes from this base model."
            )
        with torch.no_grad():
            if self.frozen_embedding is not None:
                self.frozen_embedding.copy_(prompt_embeddings[: self.num_frozen_tokens])
            self.trainable_embedding.copy_(prompt_embeddings[self.num_frozen_tokens :])

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """The table for each row of `indices` (the ids themselves are not needed): (batch, n, width)."""
        return self.weight.unsqueeze(0).expand(indices.shape[0], -1, -1)


class CartridgeModel(PromptLearningModel):
    """The prompt-learning tuner whose adapters are `CartridgeEncoder`s (served as a KV-cache prefix)."""

    encoder_cls = CartridgeEncoder
    display_name = "cartridge"
