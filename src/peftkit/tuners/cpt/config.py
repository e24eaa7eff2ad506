"""`CPTConfig`: context-aware prompt tuning (Blau et al., 2024, arXiv:2410.17222).

The virtual tokens are the embeddings of real few-shot examples (`cpt_token_ids`), each token typed
by `cpt_tokens_type_mask`: for example i, 4i+1 = input template, 4i+2 = input, 4i+3 = output
template, 4i+4 = output (a label). Training moves only the template and input tokens, by a delta kept
inside an epsilon ball, and the loss is taken on every output token, the context's included:

    prompt_j = embed(cpt_token_ids[j]) + delta_j,    |delta_j| <= eps_j * sqrt(token_dim / 2048)
    loss     = mean over label positions of CE_t * w_t,   w_t = decay ** (examples after t's)   ("decay")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from ...errors import ConfigError
from ...utils.peft_types import PeftType, TaskType
from ...utils.validation import check_finite
from .._prompt.config import PromptLearningConfig

LOSS_TYPES = ("none", "decay")


@dataclass
class CPTConfig(PromptLearningConfig):
    """Context-aware prompt tuning; causal language models only.

    `num_virtual_tokens` is always `len(cpt_token_ids)`; the shape fields come from the model.

    Args:
        cpt_token_ids: Token ids of the context (the few-shot examples); default `[0]`.
        cpt_mask: Mask over the context tokens (kept for peft's format; default all ones).
        cpt_tokens_type_mask: Type of each context token (see the module docstring); default all 1.
        opt_weighted_loss_type: "none" (plain mean) or "decay" (earlier examples weigh less).
        opt_loss_decay_factor: Weight factor per later example with "decay".
        opt_projection_epsilon: Radius for input tokens (type 4i+2), times sqrt(token_dim / 2048).
        opt_projection_format_epsilon: Radius for template tokens (4i+1, 4i+3), times sqrt(token_dim / 2048).
        tokenizer_name_or_path: Tokenizer of the context (for reference; nothing is loaded).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.CPT

    cpt_token_ids: Optional[list[int]] = field(default=None, metadata={"help": "Token ids of the CPT context"})
    cpt_mask: Optional[list[int]] = field(default=None, metadata={"help": "Mask over the CPT context tokens"})
    cpt_tokens_type_mask: Optional[list[int]] = field(default=None, metadata={"help": "Type of each CPT token"})
    opt_weighted_loss_type: Optional[Literal["none", "decay"]] = field(
        default="none", metadata={"help": "Type of weighted loss: 'none' or 'decay'."}
    )
    opt_loss_decay_factor: Optional[float] = field(default=1.0, metadata={"help": "Decay factor of the loss weights"})
    opt_projection_epsilon: Optional[float] = field(default=0.1, metadata={"help": "Epsilon of input tokens"})
    opt_projection_format_epsilon: Optional[float] = field(default=0.1, metadata={"help": "Epsilon of template tokens"})
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "Tokenizer of the context"})

    def __post_init__(self) -> None:
        if str(self.peft_type) != PeftType.CPT.value:
            raise ConfigError(f"CPTConfig has peft_type {self.peft_type!r}; it must be 'CPT'.")
        self.peft_type = PeftType.CPT
        if self.cpt_token_ids is None:
            self.cpt_token_ids = [0]
        self.cpt_token_ids = _int_list(self.cpt_token_ids, "cpt_token_ids")
        if not self.cpt_token_ids:
            raise ConfigError("cpt_token_ids is empty; pass the token ids of the context (at least one).")
        length = len(self.cpt_token_ids)
        self.cpt_mask = [1] * length if self.cpt_mask is None else _int_list(self.cpt_mask, "cpt_mask")
        if self.cpt_tokens_type_mask is None:
            self.cpt_tokens_type_mask = [1] * length
        self.cpt_tokens_type_mask = _int_list(self.cpt_tokens_type_mask, "cpt_tokens_type_mask")
        if not len(self.cpt_mask) == len(self.cpt_tokens_type_mask) == length:
            raise ConfigError(
                "cpt_token_ids, cpt_mask and cpt_tokens_type_mask must have the same length; got "
                f"{length}, {len(self.cpt_mask)} and {len(self.cpt_tokens_type_mask)}."
            )
        self.num_virtual_tokens = length  # the context is the prompt
        self.num_transformer_submodules = 1
        super().__post_init__()
        if self.task_type != TaskType.CAUSAL_LM:
            raise ConfigError(f"CPTConfig only supports task_type = {TaskType.CAUSAL_LM.value}, got {self.task_type!r}.")
        if self.opt_weighted_loss_type not in LOSS_TYPES:
            raise ConfigError(f"opt_weighted_loss_type={self.opt_weighted_loss_type!r} is invalid; use 'none' or 'decay'.")
        check_finite(self.opt_loss_decay_factor, "opt_loss_decay_factor")
        for name in ("opt_projection_epsilon", "opt_projection_format_epsilon"):
            check_finite(getattr(self, name), name)
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid; a ball radius must be >= 0.")


def _int_list(values: Any, name: str) -> list[int]:
    """`values` as a list of ints >= 0 (token ids, mask values), refused otherwise."""
    if hasattr(values, "tolist"):  # a tensor or array
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"{name}={values!r} is invalid; pass a list of integers.")
    values = list(values)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise ConfigError(f"{name} holds {bad[:3]}; every entry must be an integer >= 0.")
    return values
