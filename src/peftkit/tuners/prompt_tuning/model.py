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
        text_ids = None
        if not config.inference_mode and config.prompt_tuning_init == PromptTuningInit.TEXT:
            text_ids = _text_token_ids(config, total, word_embeddings)  # refused before anything is allocated
        self.embedding = nn.Embedding(total, config.token_dim)
        if config.inference_mode:
            return
        if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
            ids = torch.randint(0, word_embeddings.num_embeddings, (total,), device=word_embeddings.weight.device)
            self._copy_rows(word_embeddings, ids)
        elif text_ids is not None:
            self._copy_rows(word_embeddings, text_ids.to(word_embeddings.weight.device))

    def _copy_rows(self, word_embeddings: nn.Module, ids: torch.Tensor) -> None:
        with torch.no_grad():
            rows = word_embeddings(ids).detach().clone().to(torch.float32)
        self.embedding.weight = nn.Parameter(rows)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


def _text_token_ids(config: PromptTuningConfig, total: int, word_embeddings: nn.Module) -> torch.Tensor:
    """Token ids of the init text, repeated to fill `total` virtual tokens; a longer text is refused,
    and so are ids beyond the model's embedding rows (a tokenizer of another model)."""
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
    rows = word_embeddings.weight.shape[0]
    outside = sorted({i for i in ids if not 0 <= i < rows})
    if outside:
        raise ConfigError(
            f"The tokenizer {config.tokenizer_name_or_path!r} (vocabulary of {len(tokenizer)} tokens) turns "
            f"prompt_tuning_init_text into token ids {outside[:5]} that the model's input embedding "
            f"({rows} rows) does not have: it is not this model's tokenizer. Set tokenizer_name_or_path to the "
            "base model's tokenizer (or resize the model's embeddings to the tokenizer first)."
        )
    ids = (ids * math.ceil(total / len(ids)))[:total]
    return torch.tensor(ids, dtype=torch.long)


class PromptTuningModel(PromptLearningModel):
    """The prompt-learning tuner whose adapters are `PromptEmbedding`s."""

    encoder_cls = PromptEmbedding
    display_name = "prompt tuning"
