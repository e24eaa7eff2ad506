"""`PeanutConfig`: fields, defaults and validation of PEANuT (weight-aware neural tweakers), as in Hugging Face peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from transformers.activations import ACT2FN

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import as_name_set, check_finite, check_layer_indices, check_optional_name_list


@dataclass
class PeanutConfig(PeftConfig):
    """Configuration of a PEANuT adapter: a small network of the frozen weight gives the update,
    `delta_W = scaling * (B f(... f(W^T A^T) ...))^T`.

    Args:
        r: Hidden width of the adapter network (A: out -> r, B: r -> out, hidden layers r -> r).
        depth: Hidden layers per side: `depth` encoders, then `depth` decoders with residual
            connections (0: just A and B).
        act_fn: The non-linearity f, any key of `transformers.activations.ACT2FN` ("relu").
        scaling: Multiplier of the update.
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks the query/value projections of known architectures. Only `nn.Linear`.
        exclude_modules: Names or a regex of modules never to wrap.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices.
        init_weights: True: Kaiming-uniform A and hidden layers, B = 0 (a no-op); False: B
            Kaiming-uniform too (the adapter changes the output).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.PEANUT
    r: int = field(default=32, metadata={"help": "Hidden width of the PEANuT network"})
    depth: int = field(default=0, metadata={"help": "Hidden encoder/decoder layers per side"})
    act_fn: str = field(default="relu", metadata={"help": "Activation, a key of transformers' ACT2FN"})
    scaling: float = field(default=1.0, metadata={"help": "Multiplier of the update"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})
    init_weights: bool = field(default=True, metadata={"help": "True: B = 0 (a no-op); False: B random"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.PEANUT.value:
            raise ConfigError(f"PeanutConfig has peft_type {self.peft_type!r}; it must be 'PEANUT'.")
        self.peft_type = PeftType.PEANUT
        self.target_modules = as_name_set(self.target_modules)
        self.exclude_modules = as_name_set(self.exclude_modules, "exclude_modules")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        check_layer_indices(self.layers_to_transform)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"`r` must be a positive integer. Got r={self.r!r}; use e.g. r=8.")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 0:
            raise ConfigError(f"`depth` can only be a non-negative integer. Got depth={self.depth!r}.")
        if self.act_fn not in ACT2FN:
            raise ConfigError(f"Unsupported `act_fn`: {self.act_fn}. Must be one of {sorted(ACT2FN.keys())}.")
        check_finite(self.scaling, "scaling")
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
