"""`PromptEncoder`: P-tuning's reparameterised prompt.

    MLP:  embedding (n, d) -> Linear d->h, ReLU, Linear h->h, ReLU, Linear h->d
    LSTM: embedding (n, d) -> bidirectional LSTM (h per direction) -> Linear 2h->2h, ReLU, Linear 2h->d

A frozen (inference-mode) encoder is the plain `(n, d)` table that checkpoints hold.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .._prompt.model import PromptLearningModel
from .config import PromptEncoderConfig, PromptEncoderReparameterizationType


class PromptEncoder(nn.Module):
    """Maps virtual token indices to `(batch, n, token_dim)` prompt embeddings."""

    def __init__(self, config: PromptEncoderConfig, word_embeddings: nn.Module = None) -> None:
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(config.num_virtual_tokens * config.num_transformer_submodules, dim)
        self.reparameterize = not config.inference_mode
        if not self.reparameterize:
            return
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout, bidirectional=True, batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            if config.encoder_num_layers != 2:
                warnings.warn("encoder_num_layers is ignored for the MLP encoder, which always has 3 linears.", stacklevel=4)
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)
            )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(indices)
        if not self.reparameterize:
            return embedded
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            embedded = self.lstm_head(embedded)[0]
        return self.mlp_head(embedded)


class PromptEncoderModel(PromptLearningModel):
    """The prompt-learning tuner whose adapters are `PromptEncoder`s."""

    encoder_cls = PromptEncoder
    display_name = "P-tuning"
