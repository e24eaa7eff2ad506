"""`GraloraConfig`: fields, defaults and validation of GraLoRA (granular low-rank adaptation), as in peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import (
    as_name_set,
    check_bool,
    check_dropout,
    check_finite,
    check_layer_indices,
    check_optional_name_list,
    check_size_bound,
)
from .._core.bias import check_bias


def check_count(value: object, name: str, allow_zero: bool = False) -> None:
    """A positive (or, with `allow_zero`, non-negative) int, not a bool; peft's message."""
    kind = "non-negative" if allow_zero else "positive"
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ConfigError(f"`{name}` should be a {kind} integer value but the value passed is {value}")
    check_size_bound(value, name)


@dataclass
class GraloraConfig(PeftConfig):
    """Configuration of a GraLoRA adapter: the weight is cut into k x k blocks, each with its own rank-(r/k) LoRA.

    Args:
        r: Total rank; the same parameter count as a LoRA of rank r, but every one of the
            k^2 blocks of delta_W has rank r / k (so the whole update can reach rank k * r).
            Must be divisible by `gralora_k`.
        hybrid_r: Rank of an extra plain LoRA over the whole weight (Hybrid GraLoRA); 0 disables it.
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks the query/value projections of known architectures.
        alpha: Scale numerator: the update is multiplied by `alpha / (r + hybrid_r)`.
        gralora_dropout: Dropout on the adapter's input.
        gralora_k: Number of blocks per dimension; it must divide in_features and out_features
            of every target (and r).
        fan_in_fan_out: Kept for peft compatibility; the layout always follows the base layer
            (transposed for transformers' `Conv1D`), with peft's warning when this disagrees.
        bias: "none", "all" (train every bias) or "gralora_only" (the wrapped layers' biases).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        init_weights: True -- A Kaiming-uniform, B = 0 (a no-op); False -- both Kaiming-uniform
            (the adapter changes the output; for tests).
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices (list targets only).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.GRALORA
    r: int = field(default=32, metadata={"help": "Total GraLoRA rank (divisible by gralora_k)"})
    hybrid_r: int = field(default=0, metadata={"help": "Rank of the plain LoRA part (Hybrid GraLoRA)"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    alpha: int = field(default=64, metadata={"help": "Scale numerator: alpha / (r + hybrid_r)"})
    gralora_dropout: float = field(default=0.0, metadata={"help": "GraLoRA dropout"})
    gralora_k: int = field(default=2, metadata={"help": "Number of blocks per dimension"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored (in, out)"})
    bias: str = field(default="none", metadata={"help": "Bias type: 'none', 'all' or 'gralora_only'"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    init_weights: bool = field(default=True, metadata={"help": "True: a no-op adapter (B = 0); False: random"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[str] = field(default=None, metadata={"help": "Layer list name"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.GRALORA.value:
            raise ConfigError(f"GraloraConfig has peft_type {self.peft_type!r}; it must be 'GRALORA'.")
        self.peft_type = PeftType.GRALORA
        self.target_modules = as_name_set(self.target_modules)
        check_layer_indices(self.layers_to_transform)
        check_count(self.r, "r")
        check_count(self.hybrid_r, "hybrid_r", allow_zero=True)
        check_count(self.gralora_k, "gralora_k")
        if self.r % self.gralora_k != 0:
            raise ConfigError(
                f"r should be divisible by gralora_k, but got {self.r} and {self.gralora_k}; "
                "pick r as a multiple of gralora_k (e.g. r=32, gralora_k=2)."
            )
        check_finite(self.alpha, "alpha")
        check_dropout(self.gralora_dropout, "gralora_dropout")
        check_bool(self.fan_in_fan_out, "fan_in_fan_out")
        check_bool(self.init_weights, "init_weights")
        check_bias(self.bias, "gralora_")
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
