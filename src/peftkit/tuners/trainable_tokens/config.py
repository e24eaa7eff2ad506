"""`TrainableTokensConfig`: fields, defaults and validation of the Trainable Tokens method, as in peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import check_bool


@dataclass
class TrainableTokensConfig(PeftConfig):
    """Configuration of a Trainable Tokens adapter: train only some rows (tokens) of an embedding.

        W'[i] = T[k]   for the k-th index i of `token_indices`,   W'[i] = W[i] otherwise

    Args:
        token_indices: The rows (token ids) to train, e.g. `tokenizer("<new>")["input_ids"]`. The closer
            their number to the vocabulary size, the less this saves over training the whole matrix.
        target_modules: Module names (suffix match) or a regex over full paths of the embeddings to wrap.
            None: the model's input embedding (`get_input_embeddings()`), else "embed_tokens"; written
            to the saved config as that module's path (a regex), as peft does.
        init_weights: True (the default): the rows start as copies of the embedding's rows, a no-op
            until trained; False: random rows (N(0, 1)), for tests.
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.TRAINABLE_TOKENS
    token_indices: list[int] = field(default_factory=list, metadata={"help": "Rows (token ids) to train"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Embeddings to wrap; None: the input embedding"}
    )
    init_weights: bool = field(default=True, metadata={"help": "True: copies of the rows (no-op); False: random"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(getattr(self.peft_type, "value", self.peft_type)) != PeftType.TRAINABLE_TOKENS.value:
            raise ConfigError(
                f"TrainableTokensConfig has peft_type {self.peft_type!r}; it must be 'TRAINABLE_TOKENS'."
            )
        self.peft_type = PeftType.TRAINABLE_TOKENS
        indices = self.token_indices
        if not isinstance(indices, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in indices):
            raise ConfigError(
                f"token_indices={indices!r} is invalid; pass a list of token ids (rows of the embedding), e.g. [0, 5]."
            )
        if any(i < 0 for i in indices):
            raise ConfigError(f"token_indices={indices!r} is invalid; token ids are rows, so >= 0.")
        self.token_indices = list(indices)
        targets = self.target_modules
        if targets is not None and not isinstance(targets, str):
            if not isinstance(targets, (list, tuple, set)) or not all(isinstance(t, str) for t in targets):
                raise ConfigError(
                    f"target_modules={targets!r} is invalid; pass module names such as ['embed_tokens'], a regex, or None."
                )
            self.target_modules = list(targets) if not isinstance(targets, set) else targets
        check_bool(self.init_weights, "init_weights")
