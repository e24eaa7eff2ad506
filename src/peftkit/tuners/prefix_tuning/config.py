"""`PrefixTuningConfig`: prefix tuning (Li & Liang, 2021), also known as P-tuning v2 (Liu et al., 2022).

Learned key/value vectors are put in front of every layer's attention cache ("deep prompts").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import check_size
from .._prompt.config import PromptLearningConfig


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning / P-tuning v2: per-layer key/value prefixes of `num_virtual_tokens` positions.

    Args:
        init_weights: None (random) or "zero" (the prefix starts as zeros).
        encoder_hidden_size: Hidden size of the projection MLP; defaults to `token_dim`.
        prefix_projection: Train the prefix through a two-layer MLP (tanh) over `token_dim` embeddings;
            only the MLP's output is saved.
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.PREFIX_TUNING

    init_weights: Optional[str] = field(default=None, metadata={"help": 'None or "zero"'})
    encoder_hidden_size: int = field(default=None, metadata={"help": "The hidden size of the encoder"})
    prefix_projection: bool = field(default=False, metadata={"help": "Whether to project the prefix tokens"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.PREFIX_TUNING.value:
            raise ConfigError(f"PrefixTuningConfig has peft_type {self.peft_type!r}; it must be 'PREFIX_TUNING'.")
        self.peft_type = PeftType.PREFIX_TUNING
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights={self.init_weights!r} is invalid; use None (random) or 'zero'.")
        check_size(self.encoder_hidden_size, "encoder_hidden_size", example="128", allow_none=True)

    def uses_kv_heads(self) -> bool:
        return True

    def encoder_updates(self) -> dict[str, Any]:
        return {} if self.encoder_hidden_size is not None else {"encoder_hidden_size": self.token_dim}

    def adapter_elements(self) -> int:
        """Key/value prefixes `n x 2*L*d`, or with `prefix_projection` the table `n x d` and the MLP
        `d*h + h*2*L*d` (n virtual tokens, L layers, d token_dim, h encoder_hidden_size)."""
        n, d, layers = self.num_virtual_tokens, self.token_dim or 1, self.num_layers or 1
        if not self.prefix_projection:
            return n * 2 * layers * d
        h = self.encoder_hidden_size or d
        return n * d + d * h + h * 2 * layers * d

    def size_fields(self) -> dict[str, Any]:
        return {**super().size_fields(), "num_layers": self.num_layers, "encoder_hidden_size": self.encoder_hidden_size}
