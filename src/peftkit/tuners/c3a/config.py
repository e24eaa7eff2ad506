"""`C3AConfig`: fields, defaults and validation of C3A, as in Hugging Face peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import as_name_set, check_layer_indices, check_optional_name_list, check_size_bound

BIAS_CHOICES = ("none", "all", "c3a_only")
INIT_CHOICES = ("gaussian", "kaiming_uniform", "xavier_uniform")  # or a bool


def check_block_size(value: object, name: str = "block_size") -> None:
    """A block size: a positive int (peft's message)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(
            f"`{name}` should be a positive integer value but the value passed is {value}; "
            "use a common divisor of the targets' input and output sizes, e.g. 64."
        )
    check_size_bound(value, name)


@dataclass
class C3AConfig(PeftConfig):
    """Configuration of a C3A adapter (circular convolution adaptation, arXiv:2407.19342).

    The update of each target is a block-circulant matrix: `delta_W` is made of
    (out / block_size) x (in / block_size) circulant blocks, each defined by one trained vector of
    `block_size` numbers, and applied with FFTs.

    Args:
        block_size: Size of the circulant blocks; must divide the input and output size of every
            target. Larger blocks mean fewer parameters ((out * in) / block_size per target).
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks the query/value projections of known architectures.
        bias: "none", "all" (train every bias) or "c3a_only" (the targets' biases).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices (list
            targets only).
        block_size_pattern: Per-module block size, keyed by a module name or a regex of the path end.
        init_weights: "xavier_uniform" (default; also False), "kaiming_uniform", "gaussian" (N(0, 1)),
            or True for zeros (a no-op adapter).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.C3A
    block_size: int = field(default=256, metadata={"help": "Circulant block size (divides in and out sizes)"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    bias: str = field(default="none", metadata={"help": "Bias type: 'none', 'all' or 'c3a_only'"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})
    block_size_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module block sizes"})
    init_weights: Optional[Union[bool, Literal["gaussian", "kaiming_uniform", "xavier_uniform"]]] = field(
        default="xavier_uniform", metadata={"help": "Kernel init; True gives zeros (a no-op)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.C3A.value:
            raise ConfigError(f"C3AConfig has peft_type {self.peft_type!r}; it must be 'C3A'.")
        self.peft_type = PeftType.C3A
        self.target_modules = as_name_set(self.target_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError("`layers_pattern` cannot be used when `target_modules` is a str.")
        check_layer_indices(self.layers_to_transform)
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
        check_block_size(self.block_size)
        if self.block_size_pattern is None:
            self.block_size_pattern = {}
        pattern = self.block_size_pattern
        if not isinstance(pattern, dict) or not all(isinstance(key, str) for key in pattern):
            raise ConfigError(
                f"block_size_pattern={self.block_size_pattern!r} is invalid; pass a dict of module name/regex -> "
                "block size, e.g. {'q_proj': 64}."
            )
        for key, value in self.block_size_pattern.items():
            check_block_size(value, f"block_size_pattern[{key!r}]")
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"bias={self.bias!r} is invalid; use one of {list(BIAS_CHOICES)}.")
        init = self.init_weights
        if not (isinstance(init, bool) or (isinstance(init, str) and init in INIT_CHOICES)):
            raise ConfigError(
                f"Unknown init_weights: {self.init_weights!r}; use 'xavier_uniform' (default), 'kaiming_uniform', "
                "'gaussian', or True for zeros (a no-op adapter)."
            )
