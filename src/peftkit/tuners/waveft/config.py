"""`WaveFTConfig`: fields, defaults and validation of WaveFT, as in Hugging Face peft."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

from ...errors import ConfigError
from ...config import PeftConfig
from ...utils.peft_types import PeftType
from ...utils.validation import check_bool
from ..fourierft.config import check_spectral_fields
from .wavelets import WAVELET_REDUCTIONS

#: Families whose filters in peft 0.21.2 are not the standard (orthogonal) ones: peft's coif4 table
#: differs by up to 1e-2, and its coif5 has 48 taps and fails in the forward. peftkit uses the standard filters.
PEFT_DIFFERENT_FILTERS = ("coif4", "coif5")


@dataclass
class WaveFTConfig(PeftConfig):
    """Configuration of a WaveFT adapter: `delta_W = scaling * IDWT2(S)`, S sparse wavelet coefficients.

    Args:
        n_frequency: Trained wavelet coefficients per layer (the layer's trainable parameters);
            at most `in_features * out_features`.
        scaling: Factor on delta_W (like LoRA's alpha; 25 for SDXL personalisation).
        wavelet_family: The orthogonal wavelet of the inverse DWT: 'db1' (Haar) ... 'db38',
            'sym2' ... 'sym20', 'coif1' ... 'coif17'. Longer filters cost more.
        use_idwt: True reconstructs delta_W with the inverse DWT; False uses the coefficients as
            a sparse delta_W directly (faster, worse in the paper's SDXL experiments).
        random_loc_seed: Seed of the fixed random coefficient locations (drawn as peft draws
            them; checkpoints hold only the coefficients).
        fan_in_fan_out: True when the base stores its weight as (in, out), e.g. GPT-2 `Conv1D`
            (corrected from the base layer, with peft's warning).
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks peft's per-architecture default.
        exclude_modules: Names or a regex of modules never to wrap.
        bias: "none", "all" or "waveft_only": which biases train with the adapter.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices.
        n_frequency_pattern: Per-module n_frequency, keyed by a regex of the module path.
        proportional_parameters: Share `n_frequency * number of targets` among the targets in
            proportion to their `in * out` (at least 1 each), instead of n_frequency each.
        init_weights: True (the default) starts the coefficients at zero (a no-op); False draws
            them from N(0, 0.01^2).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.WAVEFT
    n_frequency: int = field(default=2592, metadata={"help": "Learnable wavelet coefficients per layer"})
    scaling: float = field(default=25.0, metadata={"help": "Scaling of delta W"})
    wavelet_family: str = field(default="db1", metadata={"help": "Wavelet family of the inverse DWT"})
    use_idwt: bool = field(default=True, metadata={"help": "Reconstruct delta W with the inverse DWT"})
    random_loc_seed: int = field(default=777, metadata={"help": "Seed of the coefficient locations"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored (in, out)"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    bias: str = field(default="none", metadata={"help": "Bias type: 'none', 'all' or 'waveft_only'"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})
    n_frequency_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module n_frequency"})
    proportional_parameters: bool = field(default=False, metadata={"help": "n_frequency in proportion to layer size"})
    init_weights: bool = field(default=True, metadata={"help": "True: zero coefficients (no-op); False: N(0, 0.01^2)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_spectral_fields(self, PeftType.WAVEFT)
        check_bool(self.use_idwt, "use_idwt")
        check_bool(self.proportional_parameters, "proportional_parameters")
        if self.wavelet_family not in WAVELET_REDUCTIONS:
            raise ConfigError(
                f"Wavelet family {self.wavelet_family} not supported. Supported wavelet families are: "
                f"{list(WAVELET_REDUCTIONS.keys())}"
            )
        if self.wavelet_family in PEFT_DIFFERENT_FILTERS and self.use_idwt:
            warnings.warn(
                f"wavelet_family={self.wavelet_family!r}: peftkit uses the standard {self.wavelet_family} filters; "
                "peft 0.21.2's differ, so such adapters do not give the same outputs in both libraries.",
                stacklevel=3,
            )
