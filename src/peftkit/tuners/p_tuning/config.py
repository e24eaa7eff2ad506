"""`PromptEncoderConfig`: P-tuning (Liu et al., 2021) -- virtual token embeddings produced by an MLP or LSTM."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ...config import _as_enum
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from .._prompt.config import PromptLearningConfig


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The network that turns the raw virtual token embeddings into the prompt."""

    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: input prompts computed by a small encoder; only its output is saved.

    Args:
        encoder_reparameterization_type: MLP (three linears, ReLU) or LSTM (bidirectional LSTM + MLP head).
        encoder_hidden_size: Hidden size of the encoder; defaults to `token_dim`.
        encoder_num_layers: LSTM layers (the MLP always has 3 linears).
        encoder_dropout: LSTM dropout between layers.
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.P_TUNING

    encoder_reparameterization_type: Union[str, PromptEncoderReparameterizationType] = field(
        default=PromptEncoderReparameterizationType.MLP, metadata={"help": "MLP or LSTM"}
    )
    encoder_hidden_size: int = field(default=None, metadata={"help": "The hidden size of the prompt encoder"})
    encoder_num_layers: int = field(default=2, metadata={"help": "The number of layers of the prompt encoder"})
    encoder_dropout: float = field(default=0.0, metadata={"help": "The dropout of the prompt encoder"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.P_TUNING.value:
            raise ConfigError(f"PromptEncoderConfig has peft_type {self.peft_type!r}; it must be 'P_TUNING'.")
        self.peft_type = PeftType.P_TUNING
        self.encoder_reparameterization_type = _as_enum(
            PromptEncoderReparameterizationType, self.encoder_reparameterization_type, "encoder_reparameterization_type"
        )
        if not 0.0 <= float(self.encoder_dropout) < 1.0:
            raise ConfigError(f"encoder_dropout={self.encoder_dropout!r} is invalid; use a value in [0, 1).")

    def encoder_updates(self) -> dict[str, Any]:
        return {} if self.encoder_hidden_size is not None else {"encoder_hidden_size": self.token_dim}
