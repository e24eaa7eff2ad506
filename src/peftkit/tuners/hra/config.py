"""`HRAConfig`: fields, defaults and validation of HRA (Householder reflection adaptation), as in peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import as_name_set, check_bool, check_layer_selection, check_rank

BIAS_CHOICES = ("none", "all", "hra_only")


@dataclass
class HRAConfig(PeftConfig):
    """Configuration of an HRA adapter: `W' = W H`, H a product of r Householder reflections.

    Args:
        r: Number of reflections per layer. Keep it even: the default init pairs equal reflections
            (which cancel); an odd r cannot be paired and starts as a random, non-identity H (warned).
        apply_GS: Orthogonalise the r vectors (Gram-Schmidt) first, `H = I - 2 Q Q^T`.
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks the query/value projections of known architectures.
        exclude_modules: Names or a regex of modules never to wrap.
        init_weights: True makes a new adapter a no-op (for even r, without apply_GS); False draws
            every vector at random (the adapter changes the output -- for tests).
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices.
        bias: "none", "all" (every bias of the model trains and is saved) or "hra_only" (the
            biases of wrapped layers).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.HRA
    r: int = field(default=8, metadata={"help": "Number of Householder reflections per layer (even)."})
    apply_GS: bool = field(default=False, metadata={"help": "Gram-Schmidt orthogonalisation of the vectors"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    init_weights: bool = field(default=True, metadata={"help": "True: the new adapter is a no-op"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})
    bias: str = field(default="none", metadata={"help": "Bias type for HRA: 'none', 'all' or 'hra_only'"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.HRA.value:
            raise ConfigError(f"HRAConfig has peft_type {self.peft_type!r}; it must be 'HRA'.")
        self.peft_type = PeftType.HRA
        self.target_modules = as_name_set(self.target_modules)
        self.exclude_modules = as_name_set(self.exclude_modules, "exclude_modules")
        check_layer_selection(self)
        check_rank(self.r, "r")
        check_bool(self.apply_GS, "apply_GS")
        check_bool(self.init_weights, "init_weights")
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"bias={self.bias!r} is not supported; use one of {', '.join(map(repr, BIAS_CHOICES))}.")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
