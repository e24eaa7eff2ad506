"""`LNTuningConfig`: fields, defaults and validation of LN tuning (training copies of chosen layers), as in peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import as_name_set, check_optional_name_list


@dataclass
class LNTuningConfig(PeftConfig):
    """Configuration of LN tuning: each targeted layer (usually a LayerNorm / RMSNorm) runs as a trained copy.

    Args:
        target_modules: Module names (suffix match) or a regex over full paths. None picks the norm
            layers of known architectures (peft's table); other models need explicit names.
        exclude_modules: Names or a regex of modules never to wrap.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.LN_TUNING
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to tune"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    modules_to_save: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Fully trained modules"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.LN_TUNING.value:
            raise ConfigError(f"LNTuningConfig has peft_type {self.peft_type!r}; it must be 'LN_TUNING'.")
        self.peft_type = PeftType.LN_TUNING
        # peft keeps the names as given (a list stays a list); only their form is checked here.
        as_name_set(self.target_modules)
        as_name_set(self.exclude_modules, "exclude_modules")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
