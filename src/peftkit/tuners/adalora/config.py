"""`AdaLoraConfig`: the LoRA fields plus AdaLoRA's rank-budget schedule, as in Hugging Face peft.

Training runs in three phases over `total_step` steps:

    step:   0 ........ tinit ..................... total_step - tfinal ........ total_step
    budget: init_r * n (warm-up)  cubic decrease to target_r * n     target_r * n (fine-tune)

where `n` is the number of wrapped modules. During the decrease, every `deltaT` steps the least
important singular values are masked until the total kept rank fits the budget.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import (
    as_name_set,
    check_dropout,
    check_finite,
    check_layer_selection,
    check_positive_number,
    check_rank,
    check_size_bound,
)
from ..lora.config import LoraConfig

_DEFAULT_R = 8  # LoraConfig's default `r`; AdaLoRA ignores `r` and warns when it was changed


@dataclass
class AdaLoraConfig(LoraConfig):
    """Configuration of an AdaLoRA adapter: `y = W x + B (A * E) x * lora_alpha / ranknum`.

    Every LoRA field is accepted (same names and defaults); `r` is ignored in favour of `init_r`.

    Args:
        target_r: Target average rank per module once the budget has shrunk.
        init_r: Initial rank of every module (rows of A, entries of E, columns of B).
        tinit: Warm-up steps before any rank is pruned.
        tfinal: Final steps during which the ranks stay fixed.
        deltaT: Prune every `deltaT` steps during the budget decrease.
        beta1: EMA factor of the importance (sensitivity) scores, in (0, 1).
        beta2: EMA factor of their uncertainty, in (0, 1).
        orth_reg_weight: Weight of the orthogonality penalty `|A A^T - I| + |B^T B - I|` added to
            the training loss.
        total_step: Total number of training steps (epochs * steps per epoch); required.
        rank_pattern: Which ranks each module keeps, as boolean masks of length `init_r` keyed by
            `<module path>.lora_E`; filled by `update_and_allocate` and saved with the adapter.
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.ADALORA
    target_r: int = field(default=8, metadata={"help": "Target average rank"})
    init_r: int = field(default=12, metadata={"help": "Initial rank"})
    tinit: int = field(default=0, metadata={"help": "Warm-up steps"})
    tfinal: int = field(default=0, metadata={"help": "Final fine-tuning steps"})
    deltaT: int = field(default=1, metadata={"help": "Steps between two budget allocations"})
    beta1: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity"})
    beta2: float = field(default=0.85, metadata={"help": "EMA factor of the uncertainty"})
    orth_reg_weight: float = field(default=0.5, metadata={"help": "Orthogonal regularisation weight"})
    total_step: Optional[int] = field(default=None, metadata={"help": "Total training steps"})
    rank_pattern: Optional[dict] = field(default=None, metadata={"help": "Kept-rank masks per module"})

    def __post_init__(self) -> None:
        # Checked before the generic "unsupported field" check so the message names AdaLoRA.
        if self.use_dora:
            raise ConfigError("AdaLoRA does not support DoRA; set use_dora=False or use LoraConfig.")
        if self.lora_bias:  # peft ignores it for AdaLoRA; refused here rather than silently dropped
            raise ConfigError("AdaLoRA does not support lora_bias=True; set lora_bias=False or use LoraConfig.")
        if self.loftq_config:
            raise ConfigError("AdaLoRA does not support LoftQ; leave loftq_config empty or use LoraConfig.")
        # LoraConfig.__post_init__ is skipped on purpose: it fixes peft_type to LORA and checks
        # rank_pattern as ranks, while AdaLoRA's rank_pattern holds boolean masks.
        PeftConfig.__post_init__(self)
        if str(self.peft_type) != PeftType.ADALORA.value:
            raise ConfigError(f"AdaLoraConfig has peft_type {self.peft_type!r}; it must be 'ADALORA'.")
        self.peft_type = PeftType.ADALORA
        self.target_modules = as_name_set(self.target_modules)
        self.exclude_modules = as_name_set(self.exclude_modules, "exclude_modules")
        check_layer_selection(self)
        check_dropout(self.lora_dropout, "lora_dropout")
        if self.bias not in ("none", "all", "lora_only", "adalora_only"):  # peft: any "<method>_only" is "lora_only"
            raise ConfigError(f"bias={self.bias!r} is not valid; use 'none', 'all' or 'lora_only'.")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.r != _DEFAULT_R:
            warnings.warn(
                "Note that `r` is not used in AdaLoRA and will be ignored; set the initial rank with `init_r`.",
                stacklevel=3,
            )
        check_rank(self.init_r, "init_r")
        if isinstance(self.target_r, bool) or not isinstance(self.target_r, int) or self.target_r < 0:
            raise ConfigError(f"target_r={self.target_r!r} is invalid; it must be an integer >= 0 such as 8.")
        check_size_bound(self.target_r, "target_r")
        check_positive_number(self.lora_alpha, "lora_alpha")
        self._check_schedule()
        for name in ("beta1", "beta2", "orth_reg_weight"):
            check_finite(getattr(self, name), name)
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight={self.orth_reg_weight!r} is invalid; it must be >= 0 (default 0.5).")
        _check_rank_pattern(self.rank_pattern)

    def _check_schedule(self) -> None:
        if self.total_step is None or isinstance(self.total_step, bool) or not isinstance(self.total_step, int):
            raise ConfigError(
                f"AdaLoraConfig needs `total_step` (got {self.total_step!r}): the total number of training steps, "
                "i.e. num_epochs * steps per epoch, e.g. AdaLoraConfig(..., total_step=len(train_dataloader) * num_epochs)."
            )
        if self.total_step <= 0:
            raise ConfigError(
                f"total_step={self.total_step} is invalid; pass the number of training steps "
                "(num_epochs * steps per epoch), which must be > 0."
            )
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} is invalid; it must be an integer >= 0.")
        if isinstance(self.deltaT, bool) or not isinstance(self.deltaT, int) or self.deltaT <= 0:
            raise ConfigError(f"deltaT={self.deltaT!r} is invalid; it must be an integer >= 1.")
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(
                f"tinit={self.tinit}, tfinal={self.tfinal} and total_step={self.total_step} leave no steps to prune "
                "ranks; decrease tinit/tfinal or increase total_step so that tinit + tfinal < total_step."
            )


def _check_rank_pattern(rank_pattern: Optional[dict]) -> None:
    if not rank_pattern:
        return
    if not isinstance(rank_pattern, dict):
        raise ConfigError(f"rank_pattern must be a dict of boolean masks, got {type(rank_pattern).__name__}.")
    for key, mask in rank_pattern.items():
        if not isinstance(mask, (list, tuple)) or not all(isinstance(kept, bool) for kept in mask):
            raise ConfigError(
                f"rank_pattern[{key!r}] must be a list of booleans (the ranks kept), got {mask!r}; "
                "AdaLoRA fills rank_pattern itself during update_and_allocate."
            )
