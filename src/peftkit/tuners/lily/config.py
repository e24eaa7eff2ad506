"""`LilyConfig`: fields, defaults and validation of Lily (low-rank interconnected adaptation across layers), as in Hugging Face peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import (
    as_name_set,
    check_bool,
    check_layer_indices,
    check_optional_name_list,
    check_rank,
)


@dataclass
class LilyConfig(PeftConfig):
    """Configuration of a Lily adapter: A shared by `stride_A` neighbouring layers, `num_B` Bs shared by all, a router.

        y = W0 x + scaling * (A x) (sum_e p_e B_e)     p = mean over tokens of softmax(R A x)

    Args:
        r: Rank: A is r x in, each B_e is r x out.
        stride_A: Consecutive layers (of one target) sharing one A; 1 gives each layer its own.
        num_B: Number of Bs every layer of one target shares, mixed by the layer's router (>= 2).
        scaling: Direct multiplier of the update (no alpha / r).
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks the query/value projections of known architectures. Sharing happens
            within each target name (and weight shape), never across them.
        exclude_modules: Names or a regex of modules never to wrap.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices (list targets only).
        init_weights: True -- Kaiming-uniform A and router, zero Bs (a no-op); False -- random Bs too.
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.LILY
    r: int = field(default=32, metadata={"help": "Lily's rank"})
    stride_A: int = field(default=1, metadata={"help": "Consecutive layers sharing one A"})
    num_B: int = field(default=2, metadata={"help": "Number of shared Bs mixed by the router"})
    scaling: float = field(default=1.0, metadata={"help": "Multiplier of the update"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})
    init_weights: bool = field(default=True, metadata={"help": "True: zero Bs (a no-op); False: random"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.LILY.value:
            raise ConfigError(f"LilyConfig has peft_type {self.peft_type!r}; it must be 'LILY'.")
        self.peft_type = PeftType.LILY
        self.target_modules = as_name_set(self.target_modules)
        self.exclude_modules = as_name_set(self.exclude_modules, "exclude_modules")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        check_layer_indices(self.layers_to_transform)
        check_rank(self.r, "r")
        if isinstance(self.stride_A, bool) or not isinstance(self.stride_A, int) or self.stride_A < 1:
            raise ConfigError(f"`stride_A` must be at least 1 (got {self.stride_A!r}).")
        if isinstance(self.num_B, bool) or not isinstance(self.num_B, int) or self.num_B < 2:
            raise ConfigError(f"`num_B` must be at least 2 for the router to be trained (got {self.num_B!r}).")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise ConfigError(f"scaling={self.scaling!r} is invalid; it must be a number such as 1.0.")
        check_bool(self.init_weights, "init_weights")
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
