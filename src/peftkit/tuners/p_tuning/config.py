"""`PromptEncoderConfig`: P-tuning (Liu et al., 2021) -- virtual token embeddings produced by an MLP or LSTM."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ...config import _as_enum
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import check_dropout, check_size
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
        check_dropout(self.encoder_dropout, "encoder_dropout")
        check_size(self.encoder_hidden_size, "encoder_hidden_size", example="128", allow_none=True)
        check_size(self.encoder_num_layers, "encoder_num_layers", example="2")

    def encoder_updates(self) -> dict[str, Any]:
        return {} if self.encoder_hidden_size is not None else {"encoder_hidden_size": self.token_dim}

    def adapter_elements(self) -> int:
        """The token table plus the encoder: MLP `d*h + h*h + h*d`, or LSTM (4 gates per direction and
        layer, `8h(d+h)` for the first, `8h(2h+h)` for the others) and its `2h` MLP head."""
        d, h = self.token_dim or 1, self.encoder_hidden_size or self.token_dim or 1
        if self.encoder_reparameterization_type == PromptEncoderReparameterizationType.LSTM:
            encoder = 8 * h * (d + h) + 8 * h * 3 * h * (self.encoder_num_layers - 1) + 4 * h * h + 2 * h * d
        else:
            encoder = 2 * d * h + h * h
        return super().adapter_elements() + encoder

    def size_fields(self) -> dict[str, Any]:
        return {**super().size_fields(), "encoder_hidden_size": self.encoder_hidden_size}
