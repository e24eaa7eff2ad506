"""`ShiraConfig`: fields, defaults and validation of SHiRA (sparse high-rank adapters), as in Hugging Face peft."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import as_name_set, check_bool, check_optional_name_list, check_rank
from .mask_functions import random_mask


@dataclass
class ShiraConfig(PeftConfig):
    """Configuration of a SHiRA adapter: `W' = W + scaling * S`, S sparse with K = r (out + in) trained entries.

    Args:
        r: Sets the number of trained entries per layer, `r * (out + in)` (a rank-r LoRA's count);
            the update itself is sparse and of high rank.
        mask_type: "random" (a seeded random sparse mask, `mask_functions.random_mask`). Any other
            value expects your own mask function: `config.mask_fn = fn` with
            `fn(base_layer, r, **kwargs) -> (out x in) 0/1 mask` holding `r * (out + in)` ones.
        random_seed: Seed of the random mask (None: the generator's fixed default seed).
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear";
            None picks the query/value projections of known architectures. Only `nn.Linear`
            (and quantized linear) layers are supported.
        fan_in_fan_out: Kept for peft compatibility; linear weights are (out, in), so True is
            reset to False with peft's warning.
        init_weights: True: the trained values start at 0 (a no-op); False: N(0, 1) (for tests).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).

    `mask_fn` (set from `mask_type`, or by you) is never saved. Unlike peft it is a field, so the
    copies that `get_peft_model` and the tuner make of a config keep a custom mask function.
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.SHIRA
    r: int = field(default=32, metadata={"help": "Trained entries per layer: r * (in + out)"})
    mask_type: Literal["random"] = field(default="random", metadata={"help": "Mask function ('random')"})
    random_seed: Optional[int] = field(default=None, metadata={"help": "Seed of the random mask"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored (in, out)"})
    init_weights: bool = field(default=True, metadata={"help": "True: zero values (a no-op); False: random"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    mask_fn: Optional[Callable[..., Any]] = field(
        default=None, repr=False, compare=False, metadata={"help": "Mask function (run time only, never saved)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.SHIRA.value:
            raise ConfigError(f"ShiraConfig has peft_type {self.peft_type!r}; it must be 'SHIRA'.")
        self.peft_type = PeftType.SHIRA
        self.target_modules = as_name_set(self.target_modules)
        check_rank(self.r, "r")
        check_bool(self.fan_in_fan_out, "fan_in_fan_out")
        if self.random_seed is not None and (isinstance(self.random_seed, bool) or not isinstance(self.random_seed, int)):
            raise ConfigError(f"random_seed={self.random_seed!r} is invalid; pass an integer or None.")
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
        if self.mask_fn is None and self.mask_type == "random":
            self.mask_fn = random_mask
        elif self.mask_fn is None:
            if not self.inference_mode:
                warnings.warn(
                    f"Argument self.mask_type={self.mask_type!r} is not recognized, please supply your own masking "
                    "function by calling `config.mask_fn = my_mask_fn`.",
                    stacklevel=3,
                )
        elif not callable(self.mask_fn):
            raise ConfigError(f"mask_fn={self.mask_fn!r} is invalid; pass a function (base_layer, r, **kwargs) -> mask.")

    def to_dict(self) -> dict[str, Any]:
        """The saved fields: all but the run-time `mask_fn` (as peft, whose mask_fn is no field)."""
        fields = super().to_dict()
        fields.pop("mask_fn", None)
        return fields
