"""`TinyLoraConfig`: fields, defaults and validation of TinyLoRA, as in Hugging Face peft."""

from __future__ import annotations

import warnings
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
    check_layer_selection,
    check_optional_name_list,
    check_size_bound,
)

#: peft's warning when the projections P are left out of checkpoints.
SAVE_PROJECTION_WARNING = (
    "Specified to not save projection tensors P within the state dictionary. They will be restored "
    "using the PRNG key stored in `config.projection_seed`. Consider setting `config.save_projection` "
    "to `True` to guarantee restoring the checkpoint correctly on all system configurations."
)

BIAS_CHOICES = ("none", "all", "tinylora_only")


@dataclass
class TinyLoraConfig(PeftConfig):
    """Configuration of a TinyLoRA adapter ("Learning to Reason in 13 Parameters", arXiv:2602.04118).

    Each target keeps a frozen rank-r SVD of its weight, `W ~ B A`, and learns only the r x r mixing
    matrix `R = sum_i v[i] P[i]`: `delta_W = B R A`, with P fixed random (u, r, r) tensors and v a
    trainable vector of u numbers, possibly shared between targets (`weight_tying`).

    Args:
        r: Rank of the frozen SVD factors (capped at min(out, in) per module).
        u: Length of each trainable vector v.
        weight_tying: 0.0 gives every target its own v, 1.0 one v for all targets; in between,
            consecutive targets share a v in `round(n * (1 - weight_tying))` groups.
        projection_seed: Seed of the fixed projections P (module number i uses seed + i).
        save_projection: Save P in checkpoints (True) or regenerate it from the seed on loading.
        init_v_bound: Bound of the uniform init of v (`init_weights="uniform"`).
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks the query/value projections of known architectures.
        tinylora_dropout: Dropout on the input of the adapter path.
        fan_in_fan_out: True when the base stores its weight as (in, out), e.g. GPT-2 `Conv1D`.
        bias: "none", "all" (train every bias) or "tinylora_only" (the targets' biases).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        init_weights: True starts v at zeros (a no-op), "uniform" draws it from
            [-init_v_bound, init_v_bound], False leaves it uninitialised.
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices.
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.TINYLORA
    r: int = field(default=2, metadata={"help": "TinyLoRA SVD rank (frozen)"})
    u: int = field(default=64, metadata={"help": "Trainable vector dimension per group"})
    weight_tying: float = field(default=0.0, metadata={"help": "Share v across targets: 0.0 none, 1.0 all"})
    projection_seed: int = field(default=42, metadata={"help": "Seed of the fixed projections P"})
    save_projection: bool = field(default=True, metadata={"help": "Save the projections P in checkpoints"})
    init_v_bound: float = field(default=0.02, metadata={"help": "Uniform init bound for v in [-bound, bound]"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    tinylora_dropout: float = field(default=0.0, metadata={"help": "TinyLoRA dropout"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored (in, out)"})
    bias: str = field(default="none", metadata={"help": "Bias type: 'none', 'all' or 'tinylora_only'"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    init_weights: Union[bool, str] = field(default=True, metadata={"help": "True: zeros, 'uniform', False: empty"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.TINYLORA.value:
            raise ConfigError(f"TinyLoraConfig has peft_type {self.peft_type!r}; it must be 'TINYLORA'.")
        self.peft_type = PeftType.TINYLORA
        self.target_modules = as_name_set(self.target_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        check_layer_selection(self)
        check_layer_indices(self.layers_to_transform)
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
        for name in ("r", "u"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"`{name}` should be a positive integer value but the value passed is {value}; "
                    f"pass e.g. {name}={2 if name == 'r' else 64}."
                )
            check_size_bound(value, name)
        check_finite(self.weight_tying, "weight_tying")
        if not 0.0 <= self.weight_tying <= 1.0:
            raise ConfigError(
                f"`weight_tying` should be a float between 0.0 and 1.0 but the value passed is {self.weight_tying}"
            )
        if isinstance(self.projection_seed, bool) or not isinstance(self.projection_seed, int):
            raise ConfigError(f"projection_seed={self.projection_seed!r} is invalid; it must be an integer such as 42.")
        check_bool(self.save_projection, "save_projection")
        check_bool(self.fan_in_fan_out, "fan_in_fan_out")
        check_finite(self.init_v_bound, "init_v_bound")
        check_dropout(self.tinylora_dropout, "tinylora_dropout")
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"bias={self.bias!r} is invalid; use one of {list(BIAS_CHOICES)}.")
        if self.init_weights not in (True, False, "uniform") or not isinstance(self.init_weights, (bool, str)):
            raise ConfigError(f"init_weights={self.init_weights!r} is invalid; use True (zeros), 'uniform' or False.")
        if not self.save_projection:
            warnings.warn(SAVE_PROJECTION_WARNING, stacklevel=3)
