"""`PveraConfig`: fields, defaults and validation of PVeRA, as in Hugging Face peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import check_bool
from ..vera.config import check_projection_fields


@dataclass
class PveraConfig(PeftConfig):
    """Configuration of a PVeRA adapter: probabilistic VeRA, `z ~ N(mu, exp(logvar))` between the shared projections.

    Args:
        r: Columns of the shared projection B; A has 2 r rows (mean and log-variance halves).
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks peft's per-architecture default.
        projection_prng_key: Seed of the CPU generator that draws A and B (Kaiming-uniform).
        save_projection: Save A and B in the checkpoint (`base_model.pvera_A` / `base_model.pvera_B`).
        pvera_dropout: Dropout on the adapter's input.
        d_initial: Initial value of every entry of `pvera_lambda_d` (lambda_b starts at zero).
        fan_in_fan_out: True when the base stores its weight as (in, out), e.g. GPT-2 `Conv1D`.
        bias: "none", "all" or "pvera_only": which biases train with the adapter.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        init_weights: True: lambda_b = 0, lambda_d = d_initial (a no-op adapter). False: lambda_b = 1,
            lambda_d ~ N(0, 1).
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices.
        sample_at_inference: Sample z in eval mode too (training always samples); False uses the mean.
        generator_seed: Seed of a per-adapter CPU generator for the samples (None: the global RNG).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.PVERA
    r: int = field(default=256, metadata={"help": "PVeRA parameter dimension"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    projection_prng_key: int = field(default=0, metadata={"help": "PVeRA PRNG init key"})
    save_projection: bool = field(default=True, metadata={"help": "Save pvera_A / pvera_B in the state dict"})
    pvera_dropout: float = field(default=0.0, metadata={"help": "The dropout probability for PVeRA layers."})
    d_initial: float = field(default=0.1, metadata={"help": "Initial value for d vector. Default is 0.1."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored (in, out)"})
    bias: str = field(default="none", metadata={"help": "Bias type for PVeRA: 'none', 'all' or 'pvera_only'"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    init_weights: bool = field(default=True, metadata={"help": "True: the new adapter is a no-op"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})
    sample_at_inference: bool = field(default=False, metadata={"help": "Sample from the learned distribution in eval"})
    generator_seed: Optional[int] = field(
        default=None, metadata={"help": "Random seed for the generator used to sample from the learned distribution."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(getattr(self.peft_type, "value", self.peft_type)) != PeftType.PVERA.value:
            raise ConfigError(f"PveraConfig has peft_type {self.peft_type!r}; it must be 'PVERA'.")
        self.peft_type = PeftType.PVERA
        check_bool(self.sample_at_inference, "sample_at_inference")
        seed = self.generator_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"generator_seed={seed!r} is invalid; pass an integer seed or None.")
        check_projection_fields(self, "pvera_dropout", "pvera_", "pvera_A and pvera_B")
