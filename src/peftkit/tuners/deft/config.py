"""`DeftConfig`: fields, defaults and validation of DEFT (decompositional efficient fine-tuning), as in peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

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
    check_rank,
)
from .._core.bias import check_bias

DECOMPOSITION_METHODS = ("qr", "relu")


@dataclass
class DeftConfig(PeftConfig):
    """Configuration of a DEFT adapter: `W' = (I - P_proj) W + Q_P (s R)`, a subspace of W replaced.

    Args:
        r: Rank of the projection direction P (out x r) and the injection R (r x in); capped at
            each target's output size.
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks the query/value projections of known architectures.
        exclude_modules: Names or a regex of modules never to wrap.
        decomposition_method: "relu" (`Q_P = P`, `P_proj = P relu(P)^T`) or "qr" (`Q_P = qr(P)`,
            `P_proj = Q_P Q_P^T`, an orthogonal projector).
        init_scale: With init_weights=False, R ~ N(0, (0.02 * init_scale)^2).
        alpha: The injection is scaled by `s = alpha / r`; None (or 0): s = 1.
        para: PaRa, pure subspace removal `delta_W = -P_proj W` (no R; not a no-op at init).
        fan_in_fan_out: Kept for peft compatibility; the layout follows the base layer (transposed
            for transformers' `Conv1D`), with peft's warning and fix-up when this disagrees.
        deft_dropout: Dropout on the injection's input.
        init_weights: True sets R = right^T W / s, so the adapter starts as a no-op; False draws R.
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices (list targets only).
        bias: "none", "all" (train every bias) or "deft_only" (the targets' biases).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.DEFT
    r: int = field(default=8, metadata={"help": "The rank of the DEFT projection/injection across layers."})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    decomposition_method: Literal["relu", "qr"] = field(default="relu", metadata={"help": "'relu' or 'qr'"})
    init_scale: float = field(default=1.0, metadata={"help": "Std scale of a random R (init_weights=False)"})
    alpha: Optional[int] = field(default=None, metadata={"help": "Injection scaling alpha / r; None: 1"})
    para: bool = field(default=False, metadata={"help": "PaRa: subspace removal only, no injection"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored (in, out)"})
    deft_dropout: float = field(default=0.0, metadata={"help": "Dropout on the injection's input"})
    init_weights: bool = field(default=True, metadata={"help": "True: a no-op adapter at init"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})
    bias: str = field(default="none", metadata={"help": "Bias type: 'none', 'all' or 'deft_only'"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.DEFT.value:
            raise ConfigError(f"DeftConfig has peft_type {self.peft_type!r}; it must be 'DEFT'.")
        self.peft_type = PeftType.DEFT
        self.target_modules = as_name_set(self.target_modules)
        self.exclude_modules = as_name_set(self.exclude_modules, "exclude_modules")
        if self.decomposition_method not in DECOMPOSITION_METHODS:
            raise ConfigError(
                f"Unknown decomposition_method '{self.decomposition_method}', must be one of "
                f"{sorted(DECOMPOSITION_METHODS)}."
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        check_layer_indices(self.layers_to_transform)
        check_rank(self.r, "r")
        check_finite(self.init_scale, "init_scale")
        if self.alpha is not None:
            check_finite(self.alpha, "alpha")
        check_bool(self.para, "para")
        check_bool(self.fan_in_fan_out, "fan_in_fan_out")
        check_bool(self.init_weights, "init_weights")
        check_dropout(self.deft_dropout, "deft_dropout")
        check_bias(self.bias, "deft_")
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
