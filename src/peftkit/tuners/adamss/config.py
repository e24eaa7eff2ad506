"""`AdamssConfig`: fields, defaults and validation of AdaMSS (adaptive multi-subspaces), as in peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import as_name_set, check_optional_name_list


@dataclass
class AdamssConfig(PeftConfig):
    """Configuration of an AdaMSS adapter: SVD the weight, cluster its output rows into subspaces,
    learn a small B_k A_k per subspace on the projected input.

        delta_W[rows_k, :] = B_k A_k V_r^T          (k = 1..K; V_r^T: the top-r right singular vectors)

    Args:
        r: Total SVD rank R (clamped to min(r, out, in[+1])).
        num_subspaces: Number of subspaces K (KMeans clusters of the left singular vectors' rows).
        subspace_rank: Rank r_k of each subspace's B_k A_k.
        target_modules: Module names (suffix match), a regex, or "all-linear"; `nn.Linear` only.
        init_weights: "orthogonal" (B = 0, a no-op) or None/False (B ~ 0.01 N(0, 1), non-identity).
        modules_to_save: Modules trained in full and saved with the adapter.
        layers_to_transform, layers_pattern: Restrict to these layer indices.
        use_asa, asa_target_subspaces, init_warmup, final_warmup, mask_interval, asa_importance_beta,
        asa_uncertainty_beta, asa_schedule_exponent: Adaptive Subspace Allocation (see
            `AdamssModel.update_and_allocate`).
        use_dynamic_rank, svd_threshold: Per-subspace rank from the singular values above
            `svd_threshold * max` (capped by `subspace_rank`).
        random_seed: Seed of the randomized SVD (so loading rebuilds the same subspaces).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.ADAMSS
    r: int = field(default=100, metadata={"help": "Total SVD rank R"})
    num_subspaces: int = field(default=5, metadata={"help": "Number of subspaces K"})
    subspace_rank: int = field(default=1, metadata={"help": "Rank of each subspace"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    init_weights: Optional[Literal["orthogonal"]] = field(
        default="orthogonal", metadata={"help": "'orthogonal' (B = 0) or None (random B)"}
    )
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})
    use_asa: bool = field(default=False, metadata={"help": "Adaptive Subspace Allocation"})
    asa_target_subspaces: int = field(default=50, metadata={"help": "Active subspaces kept by ASA"})
    init_warmup: int = field(default=50, metadata={"help": "First ASA step"})
    final_warmup: int = field(default=1000, metadata={"help": "Last ASA pruning step"})
    mask_interval: int = field(default=100, metadata={"help": "Steps between ASA masks"})
    asa_importance_beta: float = field(default=0.85, metadata={"help": "EMA of importance"})
    asa_uncertainty_beta: float = field(default=0.85, metadata={"help": "EMA of uncertainty"})
    asa_schedule_exponent: float = field(default=3.0, metadata={"help": "ASA schedule exponent"})
    use_dynamic_rank: bool = field(default=False, metadata={"help": "Rank per subspace from singular values"})
    svd_threshold: float = field(default=0.1, metadata={"help": "Relative singular value threshold"})
    random_seed: int = field(default=0, metadata={"help": "Seed of the randomized SVD"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(getattr(self.peft_type, "value", self.peft_type)) != PeftType.ADAMSS.value:
            raise ConfigError(f"AdamssConfig has peft_type {self.peft_type!r}; it must be 'ADAMSS'.")
        self.peft_type = PeftType.ADAMSS
        self.target_modules = as_name_set(self.target_modules)
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
        if self.init_weights is False:  # peft: False means None (random B)
            self.init_weights = None
        if self.init_weights not in ("orthogonal", None):
            raise ConfigError(f"init_weights must be 'orthogonal' or None, got {self.init_weights}")
        for name in ("r", "num_subspaces", "subspace_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.use_asa:
            if self.mask_interval <= 0:
                raise ConfigError(
                    f"`mask_interval` must be a positive integer when `use_asa=True`, got {self.mask_interval}."
                )
            if self.init_warmup >= self.final_warmup:
                raise ConfigError(
                    "`init_warmup` must be smaller than `final_warmup` when `use_asa=True` so that ASA has a "
                    f"non-empty pruning ramp, got init_warmup={self.init_warmup} and final_warmup={self.final_warmup}."
                )
            if self.asa_target_subspaces <= 0:
                raise ConfigError(
                    "`asa_target_subspaces` must be a positive integer when `use_asa=True`, got "
                    f"{self.asa_target_subspaces}."
                )
            if self.asa_schedule_exponent <= 0:
                raise ConfigError(
                    "`asa_schedule_exponent` must be a positive number when `use_asa=True`, got "
                    f"{self.asa_schedule_exponent}."
                )
        try:
            import sklearn  # noqa: F401
        except ImportError:
            raise ImportError("scikit-learn is required for AdaMSS. Please install it with: pip install scikit-learn")
