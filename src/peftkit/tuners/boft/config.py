"""`BOFTConfig`: fields, defaults and validation of BOFT (butterfly orthogonal fine-tuning), as in peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import as_name_set, check_bool, check_dropout, check_layer_selection, check_size_bound

BIAS_CHOICES = ("none", "all", "boft_only")


@dataclass
class BOFTConfig(PeftConfig):
    """Configuration of a BOFT adapter: `W' = (W R^T) * s`, R a product of butterfly rotations.

    Exactly one of `boft_block_size` and `boft_block_num` is non-zero; per layer the other is
    `in_features / given` (for Conv2d, `in_features = in_channels * kh * kw`), which must divide
    evenly (checked when the adapter is added, with peft's messages).

    Args:
        boft_block_size: Size H of each rotation block (0: derive it from `boft_block_num`). Default 4.
        boft_block_num: Number D of blocks per factor (0: derive it from `boft_block_size`).
        boft_n_butterfly_factor: Number N of butterfly factors; 1 is block-diagonal OFT. With N > 1,
            H and D must be even and `in_features` a multiple of `H * 2^(N-1)`.
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks the query/value projections of known architectures.
        exclude_modules: Names or a regex of modules never to wrap.
        boft_dropout: Multiplicative dropout: in training, this fraction of one factor's blocks is
            set to the identity.
        fan_in_fan_out: Must be False for the layers BOFT wraps (True is corrected, with a warning).
        bias: "none", "all" (every bias of the model trains and is saved) or "boft_only" (the
            biases of wrapped layers).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        init_weights: True makes a new adapter a no-op (R = I, s = 1); False draws the blocks from
            N(0, 0.1^2) and s from N(1, 0.1^2) (for tests).
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices.
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.BOFT
    boft_block_size: int = field(default=4, metadata={"help": "BOFT block size across different layers."})
    boft_block_num: int = field(default=0, metadata={"help": "Number of BOFT blocks per injected layer."})
    boft_n_butterfly_factor: int = field(default=1, metadata={"help": "Number of butterfly factors."})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    boft_dropout: float = field(default=0.0, metadata={"help": "BOFT multiplicative dropout"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored (in, out)"})
    bias: Literal["none", "all", "boft_only"] = field(default="none", metadata={"help": "Biases to train"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    init_weights: bool = field(default=True, metadata={"help": "True: the new adapter is a no-op"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.BOFT.value:
            raise ConfigError(f"BOFTConfig has peft_type {self.peft_type!r}; it must be 'BOFT'.")
        self.peft_type = PeftType.BOFT
        self.target_modules = as_name_set(self.target_modules)
        self.exclude_modules = as_name_set(self.exclude_modules, "exclude_modules")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        check_layer_selection(self)
        for name in ("boft_block_size", "boft_block_num"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} is invalid; it must be a non-negative integer (0: derived).")
            check_size_bound(value, name)
        if self.boft_block_size == 0 and self.boft_block_num == 0:
            raise ConfigError(
                "Either `boft_block_size` or `boft_block_num` must be non-zero. Currently, boft_block_size = "
                f"{self.boft_block_size} and boft_block_num = {self.boft_block_num}."
            )
        if self.boft_block_size != 0 and self.boft_block_num != 0:
            raise ConfigError(
                f"You can only specify either boft_block_size ({self.boft_block_size}) or boft_block_num "
                f"({self.boft_block_num}), but not both simultaneously, because boft_block_size x boft_block_num "
                "== in_features."
            )
        factors = self.boft_n_butterfly_factor
        if isinstance(factors, bool) or not isinstance(factors, int) or factors < 1:
            # peft raises this when the adapter is added (with its CUDA extension); here at once.
            raise ConfigError(f"You can only specify boft_n_butterfly_factor {factors} to be a positive integer number.")
        check_size_bound(factors, "boft_n_butterfly_factor")
        check_dropout(self.boft_dropout, "boft_dropout")
        for name in ("fan_in_fan_out", "init_weights"):
            check_bool(getattr(self, name), name)
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"bias={self.bias!r} is not supported; use one of {', '.join(map(repr, BIAS_CHOICES))}.")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
