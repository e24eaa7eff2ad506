"""`FourierFTConfig`: fields, defaults and validation of FourierFT, as in Hugging Face peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import (
    as_name_set,
    check_bool,
    check_finite,
    check_layer_selection,
    check_pattern_dict,
    check_size,
)


def check_spectral_fields(config: Any, expected: PeftType) -> None:
    """What FourierFT and WaveFT configs share: peft_type, targets, n_frequency(_pattern), scaling,
    random_loc_seed, fan_in_fan_out, bias, init_weights and the layer selection."""
    if str(config.peft_type) != expected.value:
        raise ConfigError(f"{type(config).__name__} has peft_type {config.peft_type!r}; it must be {expected.value!r}.")
    config.peft_type = expected
    config.target_modules = as_name_set(config.target_modules)
    config.exclude_modules = as_name_set(config.exclude_modules, "exclude_modules")
    check_size(config.n_frequency, "n_frequency", "1000")
    config.n_frequency_pattern = check_pattern_dict(config.n_frequency_pattern, "n_frequency_pattern")
    for key, value in config.n_frequency_pattern.items():
        check_size(value, f"n_frequency_pattern[{key!r}]", "1000")
    check_finite(config.scaling, "scaling")
    seed = config.random_loc_seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"random_loc_seed={seed!r} is invalid; pass an integer seed such as 777.")
    check_bool(config.fan_in_fan_out, "fan_in_fan_out")
    check_bool(config.init_weights, "init_weights")
    # peft trains biases for "all" and for any "<name>_only" (its docs say "fourier_only" / "waveft_only").
    bias = config.bias
    if not isinstance(bias, str) or not (bias in ("none", "all") or bias.endswith("_only")):
        raise ConfigError(f"bias={bias!r} is invalid; use 'none', 'all' or '{expected.value.lower()}_only'.")
    check_layer_selection(config)
    if isinstance(config.modules_to_save, str):
        config.modules_to_save = [config.modules_to_save]


@dataclass
class FourierFTConfig(PeftConfig):
    """Configuration of a FourierFT adapter: `delta_W = scaling * Re(ifft2(S))`, S sparse.

    Args:
        n_frequency: Trained spectral coefficients per layer (the layer's trainable parameters);
            at most `in_features * out_features`.
        scaling: Factor on delta_W (like LoRA's alpha; 100-150 for RoBERTa, 300 for LLaMA / ViT).
        random_loc_seed: Seed of the fixed random frequency locations. Checkpoints hold only the
            coefficients: the locations are drawn again from this seed, as peft draws them.
        fan_in_fan_out: True when the base stores its weight as (in, out), e.g. GPT-2 `Conv1D`
            (corrected from the base layer, with peft's warning).
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks peft's per-architecture default.
        exclude_modules: Names or a regex of modules never to wrap.
        bias: "none", "all" or "fourier_only": which biases train with the adapter.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices.
        n_frequency_pattern: Per-module n_frequency, keyed by a module name or regex.
        init_weights: False (peft's default) draws the coefficients from N(0, 1): the new adapter
            changes the output. True starts them at zero (a no-op).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.FOURIERFT
    n_frequency: int = field(default=1000, metadata={"help": "Learnable frequencies per layer"})
    scaling: float = field(default=150.0, metadata={"help": "Scaling of delta W"})
    random_loc_seed: Optional[int] = field(default=777, metadata={"help": "Seed of the frequency locations"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored (in, out)"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    bias: str = field(default="none", metadata={"help": "Bias type: 'none', 'all' or 'fourier_only'"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})
    n_frequency_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module n_frequency"})
    init_weights: bool = field(default=False, metadata={"help": "True: zero spectrum (no-op); False: N(0, 1)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_spectral_fields(self, PeftType.FOURIERFT)
