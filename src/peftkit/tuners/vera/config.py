"""`VeraConfig`: fields, defaults and validation of VeRA, as in Hugging Face peft."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import (
    as_name_set,
    check_bool,
    check_dropout,
    check_finite,
    check_layer_selection,
    check_rank,
)
from .._core.bias import check_bias


def save_projection_warning(projections: str) -> str:
    """peft's warning when a config leaves the shared projections out of checkpoints."""
    return (
        f"Specified to not save {projections} within the state dictionary, instead they will be restored "
        "using the PRNG key store in `config.projection_prng_key`. Consider setting `config.save_projection` "
        "to `True` to guarantee restoring the checkpoint correctly on all system configurations."
    )


def check_projection_fields(config: Any, dropout_field: str, bias_prefix: str, projections: str) -> None:
    """The checks VeRA and PVeRA share (rank, PRNG key, dropout, d_initial, flags, layer selection)."""
    config.target_modules = as_name_set(config.target_modules)
    check_rank(config.r, "r")
    key = config.projection_prng_key
    if isinstance(key, bool) or not isinstance(key, int):
        raise ConfigError(f"projection_prng_key={key!r} is invalid; pass an integer seed such as 0.")
    check_dropout(getattr(config, dropout_field), dropout_field)
    check_finite(config.d_initial, "d_initial")
    for name in ("save_projection", "fan_in_fan_out", "init_weights"):
        check_bool(getattr(config, name), name)
    check_bias(config.bias, bias_prefix)
    check_layer_selection(config)
    if isinstance(config.modules_to_save, str):
        config.modules_to_save = [config.modules_to_save]
    if not config.save_projection:
        warnings.warn(save_projection_warning(projections), stacklevel=4)


@dataclass
class VeraConfig(PeftConfig):
    """Configuration of a VeRA adapter: `delta_W = diag(lambda_b) B diag(lambda_d) A`, A and B frozen and shared.

    Args:
        r: Rows of the shared projection A (columns of B); VeRA trains only `r + out` numbers per layer,
            so choose it higher than a LoRA rank (peft's default 256).
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks peft's per-architecture default.
        projection_prng_key: Seed of the CPU generator that draws A and B (Kaiming-uniform); an adapter
            saved without them is rebuilt from it.
        save_projection: Save A and B in the checkpoint (`base_model.vera_A` / `base_model.vera_B`).
        vera_dropout: Dropout on the adapter's input.
        d_initial: Initial value of every entry of `vera_lambda_d` (lambda_b starts at zero).
        fan_in_fan_out: True when the base stores its weight as (in, out), e.g. GPT-2 `Conv1D`.
        bias: "none", "all" or "vera_only": which biases train with the adapter.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        init_weights: True: lambda_b = 0, lambda_d = d_initial (a no-op adapter). False: lambda_b = 1,
            lambda_d ~ N(0, 1) (the adapter changes the output -- for tests).
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices.
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.VERA
    r: int = field(default=256, metadata={"help": "Vera attention dimension"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    projection_prng_key: int = field(default=0, metadata={"help": "Vera PRNG init key"})
    save_projection: bool = field(default=True, metadata={"help": "Save vera_A / vera_B in the state dict"})
    vera_dropout: float = field(default=0.0, metadata={"help": "Vera dropout"})
    d_initial: float = field(default=0.1, metadata={"help": "Initial init value for d vector."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored (in, out)"})
    bias: str = field(default="none", metadata={"help": "Bias type for Vera. Can be 'none', 'all' or 'vera_only'"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    init_weights: bool = field(default=True, metadata={"help": "True: the new adapter is a no-op"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(getattr(self.peft_type, "value", self.peft_type)) != PeftType.VERA.value:
            raise ConfigError(f"VeraConfig has peft_type {self.peft_type!r}; it must be 'VERA'.")
        self.peft_type = PeftType.VERA
        check_projection_fields(self, "vera_dropout", "vera_", "vera_A and vera_B")
