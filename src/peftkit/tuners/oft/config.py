"""`OFTConfig`: fields, defaults and validation of OFT (orthogonal fine-tuning), as in Hugging Face peft."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from packaging.version import InvalidVersion, Version

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import (
    as_name_set,
    check_bool,
    check_dropout,
    check_finite,
    check_layer_selection,
    check_size_bound,
)

BIAS_CHOICES = ("none", "all", "oft_only")

#: peft's texts for checkpoints written by older OFT versions (read in `OFTConfig.check_kwargs`).
OLD_FORMAT_MESSAGE = (
    "OFT has been updated since PEFT 0.14.0. Your trained adapter weights are incompatible "
    "with the latest version of OFT. Please retrain your adapter weights with newer PEFT versions. "
    "Alternatively, downgrade PEFT to version 0.13.0 to use the old adapter weights."
)
OLD_NEUMANN_MESSAGE = (
    "The cayley-neumann parameterization has been slightly changed to be more numerically stable in "
    "PEFT 0.18.0. Please retrain your adapter weights with newer PEFT versions. Alternatively, "
    "downgrade PEFT to version 0.17.0 to use the old parameterization."
)


@dataclass
class OFTConfig(PeftConfig):
    """Configuration of an OFT adapter: `W' = W R^T` with R block-diagonal and (near) orthogonal.

    Exactly one of `r` (number of blocks) and `oft_block_size` is non-zero; per layer the other is
    `in_features / given` (for Conv2d, `in_features = in_channels * kh * kw`). A value that does
    not divide a layer's `in_features` is moved to the nearest divisor, with a warning.

    Args:
        r: Number of rotation blocks per layer (0: derive it from `oft_block_size`).
        oft_block_size: Size of each rotation block (0: derive it from `r`). Default 32.
        module_dropout: Recorded as in peft; peft 0.21.2 does not apply it in the forward pass and
            neither does peftkit.
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks the query/value projections of known architectures.
        fan_in_fan_out: Must be False for the layers OFT wraps (True is corrected, with a warning).
        bias: "none", "all" (every bias of the model trains and is saved) or "oft_only" (the
            biases of wrapped layers).
        exclude_modules: Names or a regex of modules never to wrap.
        init_weights: True makes a new adapter a no-op (R = I); False draws the skew-symmetric
            parameters from N(0, 0.1^2) (for tests).
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        coft: Constrained OFT: before each use, each block's skew matrix Q is scaled back so that
            ||Q||_F <= eps / sqrt(number of stored blocks) (the parameters are updated in place).
        eps: COFT's radius (only used with `coft=True`).
        block_share: One rotation block shared by all blocks of a layer.
        use_cayley_neumann: Build R from Q with a truncated Neumann series (cheap, approximately
            orthogonal) instead of the exact Cayley transform (a small linear solve per block).
        num_cayley_neumann_terms: Terms of that series (1: R = I).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.OFT
    r: int = field(default=0, metadata={"help": "OFT rank, number of OFT blocks per injected layer."})
    oft_block_size: int = field(default=32, metadata={"help": "OFT block size across different layers."})
    module_dropout: float = field(default=0.0, metadata={"help": "OFT multiplicative dropout (unused, as in peft)"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored (in, out)"})
    bias: Literal["none", "all", "oft_only"] = field(default="none", metadata={"help": "Biases to train"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    init_weights: bool = field(default=True, metadata={"help": "True: the new adapter is a no-op"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    coft: bool = field(default=False, metadata={"help": "Constrained OFT"})
    eps: float = field(default=6e-5, metadata={"help": "COFT's radius"})
    block_share: bool = field(default=False, metadata={"help": "Share one block per layer"})
    use_cayley_neumann: bool = field(default=True, metadata={"help": "Neumann-series Cayley transform"})
    num_cayley_neumann_terms: int = field(default=5, metadata={"help": "Terms of the Neumann series"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.OFT.value:
            raise ConfigError(f"OFTConfig has peft_type {self.peft_type!r}; it must be 'OFT'.")
        self.peft_type = PeftType.OFT
        self.target_modules = as_name_set(self.target_modules)
        self.exclude_modules = as_name_set(self.exclude_modules, "exclude_modules")
        check_layer_selection(self)
        for name in ("r", "oft_block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} is invalid; it must be a non-negative integer (0: derived).")
            check_size_bound(value, name)
        if self.r == 0 and self.oft_block_size == 0:
            raise ConfigError(
                f"Either `r` or `oft_block_size` must be non-zero. Currently, r = {self.r} and "
                f"oft_block_size = {self.oft_block_size}."
            )
        if self.r != 0 and self.oft_block_size != 0:
            raise ConfigError(
                f"You can only specify either r ({self.r}) or oft_block_size ({self.oft_block_size}), but not both "
                "simultaneously, because r x oft_block_size == in_features."
            )
        self._check_other_fields()

    def _check_other_fields(self) -> None:
        check_dropout(self.module_dropout, "module_dropout")
        for name in ("fan_in_fan_out", "init_weights", "coft", "block_share", "use_cayley_neumann"):
            check_bool(getattr(self, name), name)
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"bias={self.bias!r} is not supported; use one of {', '.join(map(repr, BIAS_CHOICES))}.")
        check_finite(self.eps, "eps")
        if self.eps <= 0:
            raise ConfigError(f"eps={self.eps!r} is invalid; COFT's radius must be > 0 (peft's default is 6e-5).")
        terms = self.num_cayley_neumann_terms
        if isinstance(terms, bool) or not isinstance(terms, int) or terms < 1:
            raise ConfigError(f"num_cayley_neumann_terms={terms!r} is invalid; pass a positive integer such as 5.")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]

    # ------------------------------------------------------------------ loading
    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """peft's checks of a saved config before it is built: OFT files older than peft 0.14 (no
        `oft_block_size`) are refused; Cayley-Neumann adapters from before peft 0.18 are warned about."""
        if "oft_block_size" not in kwargs:
            raise ConfigError(OLD_FORMAT_MESSAGE)
        if kwargs.get("use_cayley_neumann", False) and _older_than(kwargs.get("peft_version"), "0.18.0"):
            warnings.warn(OLD_NEUMANN_MESSAGE, stacklevel=3)
        return kwargs

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PeftConfig":
        """Build from a saved `adapter_config.json` (see `check_kwargs`)."""
        if isinstance(data, dict):
            cls.check_kwargs(**data)
        return super().from_dict(data)


def _older_than(version: Any, minimum: str) -> bool:
    """Whether a config's `peft_version` (missing: very old; "X@commit" allowed) is below `minimum`."""
    text = str(version or "0.0.0").partition("@")[0]
    try:
        return Version(text) < Version(minimum)
    except InvalidVersion:
        return False
