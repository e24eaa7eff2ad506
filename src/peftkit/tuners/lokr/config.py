"""`LoKrConfig`: fields, defaults and validation of LoKr, as in Hugging Face peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Union

from ...errors import ConfigError
from ...utils.peft_types import PeftType
from .._lycoris import LycorisConfig


@dataclass
class LoKrConfig(LycorisConfig):
    """Configuration of a LoKr adapter: `delta_W = kron(W1, W2) * alpha / r`.

    `out = a * b` and `in = c * d` are split by `factorization` (near the square root, or by
    `decompose_factor`); W1 is a x c, W2 is b x d (x kernel for convolutions).

    Args:
        r: Rank of the low-rank forms of W2 (and of W1 with `decompose_both`); a factor is kept
            full when r >= half its larger side, as in LyCORIS.
        alpha: Numerator of `scaling = alpha / r`.
        rank_dropout: During training, drop each output row of delta_W with this probability.
        module_dropout: During training, skip the whole adapter with this probability.
        use_effective_conv2d: For Conv1d/Conv2d with a kernel larger than 1, CP-factor W2's kernel
            with a core tensor `lokr_t2`.
        decompose_both: Also write W1 as a low-rank product `W1a W1b`.
        decompose_factor: Split sizes so one factor is this number (-1: near the square root).
        rank_dropout_scale: Rescale by the kept fraction under rank dropout.
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks the query/value projections of known architectures.
        exclude_modules: Names or a regex of modules never to wrap.
        init_weights: True makes a new adapter a no-op (W1 zero); "lycoris" zeroes W2 instead,
            as the LyCORIS repository does; False initialises every factor randomly (for tests).
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        rank_pattern / alpha_pattern: Per-module rank / alpha, keyed by a regex of the module path.
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.LOKR
    r: int = field(default=8, metadata={"help": "LoKr rank"})
    alpha: int = field(default=8, metadata={"help": "LoKr alpha"})
    rank_dropout: float = field(default=0.0, metadata={"help": "Rank dropout during training"})
    module_dropout: float = field(default=0.0, metadata={"help": "Module dropout during training"})
    use_effective_conv2d: bool = field(default=False, metadata={"help": "CP-factor conv kernels"})
    decompose_both: bool = field(default=False, metadata={"help": "Low-rank W1 too"})
    decompose_factor: int = field(default=-1, metadata={"help": "Kronecker split factor"})
    rank_dropout_scale: bool = field(default=False, metadata={"help": "Rescale under rank dropout"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    init_weights: Union[bool, Literal["lycoris"]] = field(default=True, metadata={"help": "Initialisation"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})

    init_choices: ClassVar[tuple[Any, ...]] = (True, False, "lycoris")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_lycoris_fields(PeftType.LOKR)
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or factor > 0):
            raise ConfigError(
                f"decompose_factor={factor!r} is invalid; use -1 (split near the square root) or a positive integer."
            )
        for name in ("decompose_both", "rank_dropout_scale"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False.")
