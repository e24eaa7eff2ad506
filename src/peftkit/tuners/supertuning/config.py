"""`SupertuningConfig`: fields, defaults and validation of Super-Tuning (sparse support, optional LoRA), as in peft."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import as_name_set, check_bool, check_finite, check_optional_name_list


@dataclass
class SupertuningConfig(PeftConfig):
    """Configuration of a Super-Tuning adapter: train a magnitude-selected sparse support of the weight.

        W' = W + scatter(indices, values) [+ (lora_alpha / r) B A]      (the LoRA part: "Supra", when r is set)

    Args:
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks peft's per-architecture default (LoRA's). Only `nn.Linear` layers.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        sparsity: In [0, 1): the fraction of each weight's entries that stay frozen (0.99: 1% train).
        select_top: True trains the largest-magnitude entries, False the smallest.
        r: Rank of the optional LoRA part (None: sparse support only).
        lora_alpha: LoRA scaling numerator; 2 * r when r is set and this is None.
        lora_dropout: Dropout on the LoRA part's input.
        init_weights: True: values = 0 and B = 0 (a no-op); False: values ~ N(0, 1), B Kaiming-uniform.
        save_precomputed_indices: Save the support's positions (int32) with the adapter; False
            recomputes them from the base weight magnitudes when loading.
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.SUPERTUNING
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    sparsity: float = field(default=0.99, metadata={"help": "Fraction of frozen weight entries, in [0, 1)"})
    select_top: bool = field(default=True, metadata={"help": "Train the largest (True) or smallest entries"})
    r: Optional[int] = field(default=None, metadata={"help": "Rank of the optional LoRA part (Supra)"})
    lora_alpha: Optional[float] = field(default=None, metadata={"help": "LoRA scaling; 2 * r when None"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (Supra only)"})
    init_weights: bool = field(default=True, metadata={"help": "True: a no-op adapter; False: random"})
    save_precomputed_indices: bool = field(default=True, metadata={"help": "Save the support's indices"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(getattr(self.peft_type, "value", self.peft_type)) != PeftType.SUPERTUNING.value:
            raise ConfigError(f"SupertuningConfig has peft_type {self.peft_type!r}; it must be 'SUPERTUNING'.")
        self.peft_type = PeftType.SUPERTUNING
        self.target_modules = as_name_set(self.target_modules)
        check_finite(self.sparsity, "sparsity")
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0.0, 1.0), got {self.sparsity}")
        if self.r is not None:
            if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
                raise ConfigError(f"r must be a positive integer or None, got {self.r!r}")
            if self.lora_alpha is None:
                self.lora_alpha = 2 * self.r
            check_finite(self.lora_alpha, "lora_alpha")
        elif self.lora_alpha is not None:
            raise ConfigError("lora_alpha is set but r is None — Supra mode requires an explicit r.")
        check_finite(self.lora_dropout, "lora_dropout")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0.0, 1.0), got {self.lora_dropout}")
        for name in ("select_top", "init_weights", "save_precomputed_indices"):
            check_bool(getattr(self, name), name)
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
        if not self.save_precomputed_indices:
            warnings.warn(
                "save_precomputed_indices=False: sparse-support indices will be recomputed from base weight "
                "magnitudes at load time. This assumes the base model is identical to training time; "
                "numerical drift can cause topk tie-breaks to differ.",
                stacklevel=3,
            )
