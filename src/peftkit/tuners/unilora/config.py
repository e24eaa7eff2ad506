"""`UniLoraConfig`: fields, defaults and validation of Uni-LoRA, as in Hugging Face peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import as_name_set, check_bool, check_finite, check_layer_selection, check_rank, check_size
from .._core.bias import check_bias


@dataclass
class UniLoraConfig(PeftConfig):
    """Configuration of a Uni-LoRA adapter: every LoRA entry of the model is one entry of a single vector.

    Args:
        r: Rank of each layer's update `B A`.
        proj_seed: Seed of the (fixed, balanced) assignment of LoRA entries to `theta_d` entries.
        theta_d_length: Length of the one trained vector `theta_d` shared by every wrapped layer.
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks peft's per-architecture default (the LoRA table).
        unilora_dropout: Dropout on the adapter's input, in [0, 1].
        fan_in_fan_out: True when the base stores its weight as (in, out), e.g. GPT-2 `Conv1D`.
        bias: "none", "all" or "unilora_only": which biases train with the adapter.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        init_theta_d_bound: With `init_weights`, `theta_d` starts uniform in [-bound, bound] (bound > 0).
        init_weights: True: the uniform init above; False: `theta_d` ~ N(0, 1) (for tests).
        save_indices: Also save each layer's indices and scales (bigger checkpoints, independent
            of how indices are generated).
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices.
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.UNILORA
    r: int = field(default=4, metadata={"help": "Rank of the low-rank adaptation."})
    proj_seed: int = field(default=42, metadata={"help": "Seed of the fixed index assignment."})
    theta_d_length: int = field(default=256, metadata={"help": "Length of the shared vector theta_d."})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    unilora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability used inside UniLora layers."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored (in, out)"})
    bias: str = field(default="none", metadata={"help": "Bias handling: 'none', 'all', or 'unilora_only'."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    init_theta_d_bound: float = field(default=0.02, metadata={"help": "Bound of the uniform theta_d init"})
    init_weights: bool = field(default=True, metadata={"help": "Uniform theta_d init (False: normal)"})
    save_indices: bool = field(default=False, metadata={"help": "Save the index and scale buffers too"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.UNILORA.value:
            raise ConfigError(f"UniLoraConfig has peft_type {self.peft_type!r}; it must be 'UNILORA'.")
        self.peft_type = PeftType.UNILORA
        self.target_modules = as_name_set(self.target_modules)
        check_rank(self.r, "r")
        check_size(self.theta_d_length, "theta_d_length", "256")
        if isinstance(self.proj_seed, bool) or not isinstance(self.proj_seed, int) or self.proj_seed < 0:
            raise ConfigError(f"proj_seed={self.proj_seed!r} is invalid; it must be a non-negative integer seed.")
        check_finite(self.unilora_dropout, "unilora_dropout")
        if not 0.0 <= self.unilora_dropout <= 1.0:
            raise ConfigError(f"unilora_dropout={self.unilora_dropout!r} is invalid; it must lie in [0, 1].")
        check_finite(self.init_theta_d_bound, "init_theta_d_bound")
        if self.init_theta_d_bound <= 0:
            raise ConfigError(f"init_theta_d_bound={self.init_theta_d_bound!r} is invalid; it must be > 0, e.g. 0.02.")
        check_bias(self.bias, "unilora_")
        for name in ("fan_in_fan_out", "init_weights", "save_indices"):
            check_bool(getattr(self, name), name)
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError("layers_pattern cannot be used when target_modules is a regex string; pass a list of names.")
        check_layer_selection(self)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
