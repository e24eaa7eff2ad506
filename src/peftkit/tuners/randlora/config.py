"""`RandLoraConfig`: fields, defaults and validation of RandLoRA, as in Hugging Face peft."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import as_name_set, check_bool, check_dropout, check_finite, check_layer_selection, check_rank
from .._core.bias import check_bias


@dataclass
class RandLoraConfig(PeftConfig):
    """Configuration of a RandLoRA adapter: full-rank updates from shared random bases and trained scalings.

    Args:
        r: Rank of each random basis; a layer uses ceil(min(in, out) / r) bases, so a *smaller* r
            trains more parameters.
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks peft's per-architecture default (the LoRA table).
        projection_prng_key: Seed of the shared bases (identical in peft and peftkit).
        save_projection: Save the bases in the checkpoint (else they are drawn again from the seed on loading).
        sparse: Ternary bases (-1, 0, 1 with probabilities 1/6, 2/3, 1/6).
        very_sparse: Ternary bases with non-zero probability 1/sqrt(min dimension).
        randlora_dropout: Dropout on the adapter's input.
        fan_in_fan_out: True when the base stores its weight as (in, out), e.g. GPT-2 `Conv1D`.
        randlora_alpha: Numerator of `scaling = randlora_alpha / r` (typically 20 r).
        bias: "none", "all" or "randlora_only": which biases train with the adapter.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        init_weights: True: lambda starts at zero (a no-op adapter); False: lambda ~ N(0, 1) (for tests).
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices.
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.RANDLORA
    r: int = field(default=32, metadata={"help": "RandLora random basis rank"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    projection_prng_key: int = field(default=0, metadata={"help": "Seed of the random bases"})
    save_projection: bool = field(default=True, metadata={"help": "Save the random bases in the checkpoint"})
    sparse: bool = field(default=False, metadata={"help": "Ternary sparse random bases"})
    very_sparse: bool = field(default=False, metadata={"help": "Very sparse ternary random bases"})
    randlora_dropout: float = field(default=0.0, metadata={"help": "Dropout in the adapter layers"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored (in, out)"})
    randlora_alpha: int = field(default=640, metadata={"help": "Scaling numerator (scaling = alpha / r)"})
    bias: str = field(default="none", metadata={"help": "Bias type: 'none', 'all' or 'randlora_only'"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    init_weights: bool = field(default=True, metadata={"help": "Start as a no-op (lambda = 0)"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[str] = field(default=None, metadata={"help": "Layer list name"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.RANDLORA.value:
            raise ConfigError(f"RandLoraConfig has peft_type {self.peft_type!r}; it must be 'RANDLORA'.")
        self.peft_type = PeftType.RANDLORA
        self.target_modules = as_name_set(self.target_modules)
        check_rank(self.r, "r")
        key = self.projection_prng_key
        if isinstance(key, bool) or not isinstance(key, int):
            raise ConfigError(f"projection_prng_key={key!r} is invalid; it must be an integer seed.")
        for name in ("save_projection", "sparse", "very_sparse", "fan_in_fan_out", "init_weights"):
            check_bool(getattr(self, name), name)
        check_dropout(self.randlora_dropout, "randlora_dropout")
        check_finite(self.randlora_alpha, "randlora_alpha")
        check_bias(self.bias, "randlora_")
        check_layer_selection(self)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if not self.save_projection:
            warnings.warn(
                "Specified to not save basis_A and basis_B within the state dictionary, instead they will be restored "
                "using the PRNG key store in `config.projection_prng_key`. Consider setting `config.save_projection` "
                "to `True` to guarantee restoring the checkpoint correctly on all system configurations.",
                stacklevel=3,
            )
