"""`DeloraConfig`: fields, defaults and validation of DeLoRA (decoupled low-rank adaptation), as in Hugging Face peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import (
    as_name_set,
    check_bool,
    check_dropout,
    check_layer_indices,
    check_optional_name_list,
    check_pattern_dict,
)
from .._core.bias import check_bias


def _check_positive_rank(value: object, name: str) -> None:
    """A rank: a positive int (peft's message for `r`)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"`{name}` must be a positive integer; got {value!r}.")


def _check_number(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r} is invalid; it must be a number such as 15.")


@dataclass
class DeloraConfig(PeftConfig):
    """Configuration of a DeLoRA adapter: a normalised low-rank update with a learned norm bound.

        delta_W = (lambda / r) * B diag(1 / (|A_i| |B^i|)) A diag(|W0^j|)

    Args:
        r: Rank of A (r x in) and B (out x r).
        delora_lambda: Initial value of the trained boundary lambda: ||delta_W||_F stays below
            lambda * max_j |W0^j| whatever A and B become.
        module_dropout: Dropout on the adapter's input while training.
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks the query/value projections of known architectures.
        exclude_modules: Names or a regex of modules never to wrap.
        bias: "none", "all" (train every bias) or "delora_only" (the wrapped layers' biases); the
            trained biases are saved with the adapter.
        init_weights: True -- Kaiming-uniform A, zero B (a no-op); False -- both Kaiming-uniform
            (the adapter changes the output at once: for tests).
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices (list targets only).
        rank_pattern: Per-module rank, keyed by a module name or a regex of the path end.
        lambda_pattern: Per-module initial lambda, keyed the same way.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.DELORA
    r: int = field(default=8, metadata={"help": "DeLoRA rank"})
    delora_lambda: int = field(default=15, metadata={"help": "Initial boundary of the update's norm"})
    module_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    bias: Literal["none", "all", "delora_only"] = field(default="none", metadata={"help": "Biases to train"})
    init_weights: bool = field(default=True, metadata={"help": "True: a no-op adapter (B = 0); False: random"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})
    rank_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module ranks"})
    lambda_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module initial lambdas"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.DELORA.value:
            raise ConfigError(f"DeloraConfig has peft_type {self.peft_type!r}; it must be 'DELORA'.")
        self.peft_type = PeftType.DELORA
        self.target_modules = as_name_set(self.target_modules)
        self.exclude_modules = as_name_set(self.exclude_modules, "exclude_modules")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        check_layer_indices(self.layers_to_transform)
        _check_positive_rank(self.r, "r")
        _check_number(self.delora_lambda, "delora_lambda")
        check_dropout(self.module_dropout, "module_dropout")
        check_bool(self.init_weights, "init_weights")
        check_bias(self.bias, "delora_")
        self.rank_pattern = check_pattern_dict(self.rank_pattern, "rank_pattern")
        for key, rank in self.rank_pattern.items():
            _check_positive_rank(rank, f"rank_pattern[{key!r}]")
        self.lambda_pattern = check_pattern_dict(self.lambda_pattern, "lambda_pattern")
        for key, value in self.lambda_pattern.items():
            _check_number(value, f"lambda_pattern[{key!r}]")
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
