"""`GloraConfig`: fields, defaults and validation of GLoRA (generalized LoRA), as in Hugging Face peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import as_name_set, check_bool, check_optional_name_list, check_rank
from .._core.bias import check_bias

#: What each of GLoRA's paths may be (peft's choices).
A_B_CHOICES = ("lora", "vector", "constant", "none")
C_CHOICES = ("lora", "vector", "none")
D_E_CHOICES = ("vector", "constant", "none")


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> None:
    """peft's message: "Invalid config_A_B value: 'x'. Valid values are: constant, lora, none, vector."."""
    if value not in choices:
        raise ConfigError(f"Invalid {name} value: {value!r}. Valid values are: {', '.join(sorted(choices))}.")


@dataclass
class GloraConfig(PeftConfig):
    """Configuration of a GLoRA adapter on a frozen Linear layer (W0, b0):

        W_eff = W0 + W0 * A + B                 * : element-wise (broadcast) product
        b_eff = b0 + b0 * D + E + W0 @ C

    Each path is parameterised on its own: "lora" (a rank-r product Xd @ Xu), "vector" (one value
    per output row, or per input for C), "constant" (one scalar) or "none" (zeros, no parameters).
    The bias paths C, D, E exist only over a base that has a bias.

    Args:
        r: Rank of the "lora" paths.
        target_modules: Module names (suffix match) or a regex over full paths; None picks the
            query/value projections of known architectures. Only plain `nn.Linear` can be wrapped.
        bias: "none", "all" or "glora_only": which biases train with the adapter.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        config_A_B: Path of A and B (weight scale and shift): "lora", "vector", "constant" or "none".
        config_C: Path of C (weight-to-bias coupling, in x 1): "lora", "vector" or "none".
        config_D_E: Path of D and E (bias scale and shift): "vector", "constant" or "none".
        init_weights: True: a no-op adapter (zero Xd, X); False: random paths (for tests).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.GLORA
    r: int = field(
        default=8, metadata={"help": "Default rank of the LoRA matrices if the config contains lora parametrization."}
    )
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    bias: str = field(default="none", metadata={"help": "Bias handling: 'none', 'all', or 'glora_only'."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    config_A_B: Literal["lora", "vector", "constant", "none"] = field(
        default="lora", metadata={"help": "Parameterization of A and B: W_eff = W0 + W0*A + B"}
    )
    config_C: Literal["lora", "vector", "none"] = field(
        default="lora", metadata={"help": "Parameterization of C: b += W0 @ C"}
    )
    config_D_E: Literal["vector", "constant", "none"] = field(
        default="constant", metadata={"help": "Parameterization of D and E: b_eff = b0 + b0*D + E"}
    )
    init_weights: bool = field(default=True, metadata={"help": "True: a no-op adapter; False: random"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.GLORA.value:
            raise ConfigError(f"GloraConfig has peft_type {self.peft_type!r}; it must be 'GLORA'.")
        self.peft_type = PeftType.GLORA
        self.target_modules = as_name_set(self.target_modules)
        check_rank(self.r, "r")
        check_bias(self.bias, "glora_")
        check_bool(self.init_weights, "init_weights")
        _check_choice(self.config_A_B, "config_A_B", A_B_CHOICES)
        _check_choice(self.config_C, "config_C", C_CHOICES)
        _check_choice(self.config_D_E, "config_D_E", D_E_CHOICES)
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
