"""`LoHaConfig`: fields, defaults and validation of LoHa, as in Hugging Face peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...utils.peft_types import PeftType
from .._lycoris import LycorisConfig


@dataclass
class LoHaConfig(LycorisConfig):
    """Configuration of a LoHa adapter: `delta_W = (W1a W1b) * (W2a W2b) * alpha / r`.

    Args:
        r: Rank of each of the two factor pairs (the update has rank up to r^2).
        alpha: Numerator of `scaling = alpha / r`.
        rank_dropout: During training, drop each output row of delta_W with this probability.
        module_dropout: During training, skip the whole adapter with this probability.
        use_effective_conv2d: For Conv1d/Conv2d with a kernel larger than 1, factor the kernel with a
            small core tensor (`hada_t1`, `hada_t2`; "Proposition 3" of the FedPara paper).
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks the query/value projections of known architectures.
        exclude_modules: Names or a regex of modules never to wrap.
        init_weights: True makes a new adapter a no-op (`W2b` zero); False initialises every
            factor randomly (the adapter changes the output -- for tests).
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        rank_pattern / alpha_pattern: Per-module rank / alpha, keyed by a regex of the module path.
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.LOHA
    r: int = field(default=8, metadata={"help": "LoHa rank"})
    alpha: int = field(default=8, metadata={"help": "LoHa alpha"})
    rank_dropout: float = field(default=0.0, metadata={"help": "Rank dropout during training"})
    module_dropout: float = field(default=0.0, metadata={"help": "Module dropout during training"})
    use_effective_conv2d: bool = field(default=False, metadata={"help": "CP-factor conv kernels"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    init_weights: bool = field(default=True, metadata={"help": "True: the new adapter is a no-op"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_lycoris_fields(PeftType.LOHA)
