"""`OSFConfig`: fields, defaults and validation of OSF (orthogonal subspace fine-tuning), as in peft."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import as_name_set, check_optional_name_list, check_pattern_dict


@dataclass
class OSFConfig(PeftConfig):
    """Configuration of an OSF adapter: `W = U_high S_high V_high + U_low S_low V_low`, only the low part trained.

    Args:
        effective_rank: How many of the largest singular directions of each weight stay frozen (the
            "high" subspace); the other `min(out, in) - effective_rank` are trained. An int, or a float in
            (0, 1] read as a fraction of `min(out, in)`; None keeps half of `min(out, in)`. This is not
            LoRA's `r`: the trained rank is what is left.
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear". None picks
            the attention and MLP projections of known architectures, else every linear layer.
        rank_pattern: Regex (searched in the module path) -> effective_rank (int or fraction) for the
            modules it matches; the first matching entry wins.
        init_weights: True: the trained factors start as the weight's own low singular triplets (the
            adapter is a no-op); False: they start random (the adapter changes the output -- for tests).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        target_svd_config: Accepted for compatibility with peft, which ignores it too.
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.OSF
    effective_rank: Optional[Union[int, float]] = field(
        default=None, metadata={"help": "Frozen (high) SVD rank; int, fraction in (0, 1], or None for half"}
    )
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    rank_pattern: Optional[dict[str, Union[int, float]]] = field(
        default=None, metadata={"help": "Regex -> effective_rank overrides"}
    )
    init_weights: Optional[bool] = field(default=True, metadata={"help": "True: a no-op adapter; False: random"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    target_svd_config: Optional[dict[str, int]] = field(default=None, metadata={"help": "Ignored (as in peft)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.OSF.value:
            raise ConfigError(f"OSFConfig has peft_type {self.peft_type!r}; it must be 'OSF'.")
        self.peft_type = PeftType.OSF
        # peft keeps a list of names as a list here (no set), so the config reads back as given.
        names = as_name_set(self.target_modules)
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        elif not isinstance(self.target_modules, (list, set)):
            self.target_modules = names
        _check_rank_value(self.effective_rank, "effective_rank")
        if self.rank_pattern is not None:
            check_pattern_dict(self.rank_pattern, "rank_pattern")
            for key, value in self.rank_pattern.items():
                _check_rank_value(value, f"rank_pattern[{key!r}]", allow_none=False)
        if self.init_weights is not None and not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights={self.init_weights!r} is invalid; it must be True or False.")
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
        if self.target_svd_config is not None and not isinstance(self.target_svd_config, dict):
            raise ConfigError(
                f"target_svd_config={self.target_svd_config!r} is invalid; "
                "pass a dict such as {'lin0.weight': 8} or None."
            )


def _check_rank_value(value: Any, name: str, allow_none: bool = True) -> None:
    """A number (not a bool) that is finite; whether it leaves a positive rank is checked per layer, as in peft."""
    if value is None and allow_none:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(
            f"{name}={value!r} is invalid; pass an int (frozen singular directions) or a fraction in (0, 1]."
        )
