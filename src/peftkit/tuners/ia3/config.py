"""`IA3Config`: fields, defaults and validation of (IA)^3, as in Hugging Face peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import as_name_set


@dataclass
class IA3Config(PeftConfig):
    """Configuration of an (IA)^3 adapter: one learned vector per targeted module.

    Args:
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks peft's per-architecture default (attention keys/values and the MLP output).
        exclude_modules: Names or a regex of modules never to wrap.
        feedforward_modules: The targets whose *input* is scaled (the rest have their output
            scaled). Names must be a subset of `target_modules` (or select some of them when the
            targets are full paths); None picks the architecture's default. A module counts as
            feed-forward when its path ends with one of the names (or fully matches the regex),
            as in peft.
        fan_in_fan_out: True when the base stores its weight as (in, out), e.g. GPT-2 `Conv1D`.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        init_ia3_weights: True starts every vector at ones (a no-op); False draws them from
            N(0, 1) (for tests).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.IA3
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    feedforward_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Targets scaled at their input"}
    )
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored (in, out)"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    init_ia3_weights: bool = field(default=True, metadata={"help": "Start the vectors at ones"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.IA3.value:
            raise ConfigError(f"IA3Config has peft_type {self.peft_type!r}; it must be 'IA3'.")
        self.peft_type = PeftType.IA3
        self.target_modules = as_name_set(self.target_modules)
        self.exclude_modules = as_name_set(self.exclude_modules, "exclude_modules")
        self.feedforward_modules = as_name_set(self.feedforward_modules, "feedforward_modules")
        if isinstance(self.feedforward_modules, set) and isinstance(self.target_modules, set):
            # peft's rule is a plain subset test; a name that selects targets given as full paths
            # also counts, so configs with "all-linear" expanded (as peft saves them) load again.
            extra = {
                name
                for name in self.feedforward_modules
                if not any(target == name or target.endswith("." + name) for target in self.target_modules)
            }
            if extra:
                raise ConfigError(
                    f"feedforward_modules {sorted(extra)} are not in target_modules {sorted(self.target_modules)}; "
                    "every feed-forward module must also be a target -- add it to target_modules."
                )
        for name in ("fan_in_fan_out", "init_ia3_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False.")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
