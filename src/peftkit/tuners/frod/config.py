"""`FrodConfig`: fields, defaults and validation of FRoD (full-rank rotation decomposition), as in Hugging Face peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import as_name_set, check_bool, check_dropout, check_finite, check_layer_selection, check_optional_name_list
from .._core.bias import check_bias


@dataclass
class FrodConfig(PeftConfig):
    """Configuration of a FRoD adapter: the adapted weight `W' = U (S + diag(lambda_l)) V^T` is trained directly.

    Args:
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks peft's per-architecture default. Only Linear / GPT-2 Conv1D layers.
        projection_prng_key: Seed of the generator that picks the off-diagonal positions of S.
        save_projection: Save the shared bases V and the sparse pattern of S with the adapter
            (bigger files; reloading does not depend on recomputing them from the base weights).
        frod_dropout: Dropout on the adapter's input.
        fan_in_fan_out: True when the base stores its weight as (in, out), e.g. GPT-2 `Conv1D`.
        bias: "none", "all" or "frod_only": which biases train with the adapter.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        init_weights: True: S = 0, so the adapted weight equals the base weight (up to rounding);
            False: S and lambda_l perturbed by N(0, 0.1) noise (for tests).
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices.
        sparse_rate: Fraction of the in x in entries of S that train (off-diagonal positions only).
        regularization_alpha: Ridge term that keeps the inverses of the joint decomposition stable.
        progressbar: Show a progress bar while the shared bases are computed.
        runtime_offload_base_weight: Keep the target base weights on the CPU while the FRoD path
            does not read them (peft's option; it breaks the rule that base weights follow the model).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.FROD
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    projection_prng_key: int = field(default=0, metadata={"help": "Seed of the sparse pattern of S"})
    save_projection: bool = field(default=True, metadata={"help": "Save V and the pattern of S in checkpoints"})
    frod_dropout: float = field(default=0.0, metadata={"help": "Dropout in the FRoD adapter layers"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored (in, out)"})
    bias: str = field(default="none", metadata={"help": "Bias type for FRoD. Can be 'none', 'all' or 'frod_only'"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    init_weights: bool = field(default=True, metadata={"help": "True: S = 0 (the base weight); False: random"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})
    sparse_rate: float = field(default=0.01, metadata={"help": "Fraction of trained off-diagonal entries of S"})
    regularization_alpha: float = field(default=1e-3, metadata={"help": "Ridge term of the joint decomposition"})
    progressbar: bool = field(default=True, metadata={"help": "Progress bar while building the bases"})
    runtime_offload_base_weight: bool = field(default=False, metadata={"help": "Keep base weights on the CPU"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(getattr(self.peft_type, "value", self.peft_type)) != PeftType.FROD.value:
            raise ConfigError(f"FrodConfig has peft_type {self.peft_type!r}; it must be 'FROD'.")
        self.peft_type = PeftType.FROD
        self.target_modules = as_name_set(self.target_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        check_layer_selection(self)
        check_finite(self.sparse_rate, "sparse_rate")
        if self.sparse_rate < 0 or self.sparse_rate > 1:
            raise ConfigError(f"`sparse_rate` should be between 0 and 1, got {self.sparse_rate}.")
        check_finite(self.regularization_alpha, "regularization_alpha")
        check_dropout(self.frod_dropout, "frod_dropout")
        for name in ("save_projection", "fan_in_fan_out", "progressbar", "runtime_offload_base_weight"):
            check_bool(getattr(self, name), name)
        check_bias(self.bias, "frod_")
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
