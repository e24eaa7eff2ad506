"""`BeftConfig`: fields, defaults and validation of BEFT (bias-efficient fine-tuning), as in Hugging Face peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import as_name_set, check_bool, check_optional_name_list


@dataclass
class BeftConfig(PeftConfig):
    """Configuration of a BEFT adapter: a trained bias vector added to the output of frozen Linear layers,

        y = W0 x + b0 + beft_bias

    (by default on the value projections, where the paper finds the added bias most effective).

    Args:
        target_modules: Module names (suffix match) or a regex over full paths; None picks the value
            projection of known architectures. Only `nn.Linear` layers can be wrapped.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        init_weights: True: the bias starts at zero (a no-op); False: N(0, 1) (for tests).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.BEFT
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    init_weights: bool = field(default=True, metadata={"help": "Whether to initialize the vectors in the BEFT layers."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.BEFT.value:
            raise ConfigError(f"BeftConfig has peft_type {self.peft_type!r}; it must be 'BEFT'.")
        self.peft_type = PeftType.BEFT
        self.target_modules = as_name_set(self.target_modules)
        check_bool(self.init_weights, "init_weights")
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
