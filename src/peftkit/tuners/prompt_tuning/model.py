"""`PromptEmbedding`: the virtual token table of prompt tuning, with RANDOM / SAMPLE_VOCAB / TEXT init."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import ConfigError
from .._prompt.model import PromptLearningModel
from .config import PromptTuningConfig, PromptTuningInit


class PromptEmbedding(nn.Module):
    """`(num_virtual_tokens * num_transformer_submodules, token_dim)` trainable input embeddings."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total, config.token_dim)
        if config.inference_mode:
            return
        if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
            ids = torch.randint(0, word_embeddings.num_embeddings, (total,), device=word_embeddings.weight.device)
            self._copy_rows(word_embeddings, ids)
        elif config.prompt_tuning_init == PromptTuningInit.TEXT:
            self._copy_rows(word_embeddings, _text_token_ids(config, total).to(word_embeddings.weight.device))

    def _copy_rows(self, word_embeddings: nn.Module, ids: torch.Tensor) -> None:
        with torch.no_grad():
            rows = word_embeddings(ids).detach().clone().to(torch.float32)
        self.embedding.weight = nn.Parameter(rows)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


def _text_token_ids(config: PromptTuningConfig, total: int) -> torch.Tensor:
    """Token ids of the init text, repeated to fill `total` virtual tokens; a longer text is refused."""
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # never run hub code to initialise a prompt
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ConfigError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} has no tokens; pass a non-empty text.")
    if len(ids) > total:
        # peft silently cuts the text; a cut prompt is rarely what the user meant, so say so.
        raise ConfigError(
            f"prompt_tuning_init_text has {len(ids)} tokens but there are only {total} virtual tokens, so it is "
            f"unclear which part to keep. Raise num_virtual_tokens to at least {len(ids)} or shorten the text."
        )
    ids = (ids * math.ceil(total / len(ids)))[:total]
    return torch.tensor(ids, dtype=torch.long)


class PromptTuningModel(PromptLearningModel):
    """The prompt-learning tuner whose adapters are `PromptEmbedding`s."""

    encoder_cls = PromptEmbedding
    display_name = "prompt tuning"
