"""`MissConfig`: fields, defaults and validation of MiSS (matrix shard sharing, formerly Bone), as in Hugging Face peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import (
    as_name_set,
    check_dropout,
    check_layer_indices,
    check_optional_name_list,
    check_rank,
)

INIT_CHOICES: tuple = (True, False, "bat", "mini")


@dataclass
class MissConfig(PeftConfig):
    """Configuration of a MiSS adapter: one shared shard `D` (r x out) added to every r-column block of W.

    Args:
        r: Shard size along in_features: `delta_W[o, i] = D[i mod r, o]` (in_features need not be
            divisible by r; the last block is cut). With "bat", r must divide both dimensions.
        miss_dropout: Dropout on the adapter's input (not used by "bat").
        mini_r: With `init_weights="mini"`, the shard is r x mini_r, repeated along out_features
            (which mini_r must divide): fewer parameters.
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks the query/value projections of known architectures.
        exclude_modules: Names or a regex of modules never to wrap.
        init_weights: True -- the default MiSS, a zero shard (a no-op); False -- a Kaiming-uniform
            shard (for tests); "bat" -- per out-block r x r matrices B with `W <- W (I + B) + B`
            blockwise (non-linear across shards, zero init); "mini" -- see `mini_r`.
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices (list targets only).
        bias: "none", "all" (train every bias) or "MiSS_only" (the wrapped layers' biases); the
            trained biases are saved with the adapter.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.MISS
    r: int = field(default=64, metadata={"help": "Shard size along in_features"})
    miss_dropout: float = field(default=0.0, metadata={"help": "MiSS dropout"})
    mini_r: int = field(default=1, metadata={"help": "Shard size along out_features for init_weights='mini'"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    init_weights: Union[bool, Literal["bat", "mini"]] = field(
        default=True, metadata={"help": "True (MiSS, no-op), False (random), 'bat' or 'mini'"}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[str] = field(default=None, metadata={"help": "Layer list name"})
    bias: str = field(default="none", metadata={"help": "Bias type for MiSS. Can be 'none', 'all' or 'MiSS_only'"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.MISS.value:
            raise ConfigError(f"MissConfig has peft_type {self.peft_type!r}; it must be 'MISS'.")
        self.peft_type = PeftType.MISS
        self.target_modules = as_name_set(self.target_modules)
        self.exclude_modules = as_name_set(self.exclude_modules, "exclude_modules")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError("`layers_pattern` cannot be used when `target_modules` is a str.")
        check_layer_indices(self.layers_to_transform)
        check_rank(self.r, "r")
        check_rank(self.mini_r, "mini_r")
        check_dropout(self.miss_dropout, "miss_dropout")
        if not any(self.init_weights is c if isinstance(c, bool) else self.init_weights == c for c in INIT_CHOICES):
            raise ConfigError(f"init_weights={self.init_weights!r} is not supported; use True, False, 'bat' or 'mini'.")
        if not isinstance(self.bias, str) or not (self.bias in ("none", "all") or self.bias.endswith("_only")):
            raise ConfigError(f"bias={self.bias!r} is invalid; use 'none', 'all' or 'MiSS_only'.")
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
