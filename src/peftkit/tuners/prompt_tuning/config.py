"""`PromptTuningConfig`: soft prompt tuning (Lester et al., 2021) -- learned embeddings prepended to the input."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import _as_enum
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from .._prompt.config import PromptLearningConfig


class PromptTuningInit(str, enum.Enum):
    """How the virtual token embeddings start: random, copies of random vocabulary rows, or a text's tokens."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: `num_virtual_tokens` trainable input embeddings put before the input's.

    Args:
        prompt_tuning_init: RANDOM, SAMPLE_VOCAB or TEXT (embeddings of `prompt_tuning_init_text`,
            repeated or cut to `num_virtual_tokens`).
        prompt_tuning_init_text: The text for TEXT init.
        tokenizer_name_or_path: Tokenizer (local path or hub id) for TEXT init.
        tokenizer_kwargs: Extra `AutoTokenizer.from_pretrained` arguments for TEXT init.
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.PROMPT_TUNING

    prompt_tuning_init: Union[PromptTuningInit, str] = field(default=PromptTuningInit.RANDOM, metadata={"help": "Init"})
    prompt_tuning_init_text: Optional[str] = field(default=None, metadata={"help": "Text for TEXT init"})
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "Tokenizer for TEXT init"})
    tokenizer_kwargs: Optional[dict] = field(default=None, metadata={"help": "AutoTokenizer kwargs for TEXT init"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.PROMPT_TUNING.value:
            raise ConfigError(f"PromptTuningConfig has peft_type {self.peft_type!r}; it must be 'PROMPT_TUNING'.")
        self.peft_type = PeftType.PROMPT_TUNING
        self.prompt_tuning_init = _as_enum(PromptTuningInit, self.prompt_tuning_init, "prompt_tuning_init")
        if self.prompt_tuning_init == PromptTuningInit.TEXT:
            if not self.tokenizer_name_or_path:
                raise ConfigError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a local path or hub id).")
            if not self.prompt_tuning_init_text:
                raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text, the text to start from.")
        elif self.tokenizer_kwargs:
            raise ConfigError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'; remove it or use TEXT init.")
