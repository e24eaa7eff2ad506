"""`PrefixEncoder`: per-layer key/value prefixes, optionally trained through an MLP (`prefix_projection`).

    embedding (n, d) --[Linear d->h, tanh, Linear h->2*L*d]--> prefix (n, 2*L*d)   (projection)
    embedding (n, 2*L*d) ---------------------------------------> prefix             (no projection)

with n virtual tokens, L layers and d = token_dim. A frozen (inference-mode) encoder is always the
plain table: checkpoints hold the projected prefix, never the MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import CheckpointError, ConfigError
from .._prompt.model import PromptLearningModel
from .config import PrefixTuningConfig


class PrefixEncoder(nn.Module):
    """Maps virtual token indices to `(batch, n, num_layers * 2 * token_dim)` key/value prefixes."""

    def __init__(self, config: PrefixTuningConfig, word_embeddings: nn.Module = None) -> None:
        super().__init__()
        out_dim = config.num_layers * 2 * config.token_dim
        self.prefix_projection = config.prefix_projection and not config.inference_mode
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size), nn.Tanh(), nn.Linear(config.encoder_hidden_size, out_dim)
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, out_dim)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(indices)
        return self.transform(embedded) if self.prefix_projection else embedded

    def load_prompt_embeddings(self, prompt_embeddings: torch.Tensor) -> None:
        """Copy a whole `(num_virtual_tokens, num_layers * 2 * token_dim)` key/value table in (peft's method).

        Only without `prefix_projection`: then the table is the parameter; with it, the parameters are
        token embeddings and an MLP, which no flattened prefix can be inverted into.
        """
        if self.prefix_projection:
            raise ConfigError("Cannot load flattened prompt embeddings when `prefix_projection=True`.")
        weight = self.embedding.weight
        if tuple(prompt_embeddings.shape) != tuple(weight.shape):
            raise CheckpointError(
                f"Invalid `prompt_embeddings` shape. Expected {tuple(weight.shape)}, got "
                f"{tuple(prompt_embeddings.shape)}; check num_virtual_tokens and that the table comes from this base model."
            )
        with torch.no_grad():
            weight.copy_(prompt_embeddings.to(weight.device))


class PrefixTuningModel(PromptLearningModel):
    """The prompt-learning tuner whose adapters are `PrefixEncoder`s."""

    encoder_cls = PrefixEncoder
    display_name = "prefix tuning"
