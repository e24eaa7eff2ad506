"""`HiraConfig`: fields, defaults and validation of HiRA (Hadamard high-rank adaptation), as in Hugging Face peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

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
    check_rank,
)


def is_known_init(value: Any) -> bool:
    """True, False, None (peft accepts all three) or "gaussian" in any letter case."""
    return value is None or isinstance(value, bool) or (isinstance(value, str) and value.lower() == "gaussian")


@dataclass
class HiraConfig(PeftConfig):
    """Configuration of a HiRA adapter: `delta_W = W0 * (B A)`, the Hadamard product with the frozen weight.

    Args:
        r: Rank of the factors A (r x in) and B (out x r); the update itself is high-rank, because
            it is modulated element-wise by the full-rank base weight.
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks the query/value projections of known architectures.
        exclude_modules: Names or a regex of modules never to wrap.
        hira_dropout: Dropout on the adapter's input.
        fan_in_fan_out: Kept for peft compatibility; the layout always follows the base layer
            (transposed for transformers' `Conv1D`), with peft's warning when this disagrees.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        init_weights: True (Kaiming-uniform A, zero B: a no-op), "gaussian" (A ~ N(0, 1/r^2),
            zero B), False (both random: the adapter changes the output -- for tests). Embeddings
            start with A = 0 and B ~ N(0, 1) unless False.
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices (list targets only).
        rank_pattern: Per-module rank, keyed by a module name or a regex of the path end. As in
            peft 0.21.2 it applies when a second adapter is added to an already wrapped module;
            a module wrapped by the adapter gets `r` (so checkpoints stay loadable by peft).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.HIRA
    r: int = field(default=32, metadata={"help": "HiRA intermediate r configuration"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    hira_dropout: float = field(default=0.0, metadata={"help": "HiRA dropout"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored (in, out)"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    init_weights: Union[bool, Literal["gaussian"], None] = field(
        default=True, metadata={"help": "True: a no-op adapter (B = 0); 'gaussian'; False: random"}, repr=False
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})
    rank_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module ranks"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.HIRA.value:
            raise ConfigError(f"HiraConfig has peft_type {self.peft_type!r}; it must be 'HIRA'.")
        self.peft_type = PeftType.HIRA
        self.target_modules = as_name_set(self.target_modules)
        self.exclude_modules = as_name_set(self.exclude_modules, "exclude_modules")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError("`layers_pattern` cannot be used when `target_modules` is a str.")
        check_layer_indices(self.layers_to_transform)
        check_rank(self.r, "r")
        check_dropout(self.hira_dropout, "hira_dropout")
        check_bool(self.fan_in_fan_out, "fan_in_fan_out")
        if not is_known_init(self.init_weights):
            raise ConfigError(
                f"Unknown initialization init_weights={self.init_weights!r}; use True, False or 'gaussian'."
            )
        self.rank_pattern = check_pattern_dict(self.rank_pattern, "rank_pattern")
        for key, rank in self.rank_pattern.items():
            check_rank(rank, f"rank_pattern[{key!r}]")
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
