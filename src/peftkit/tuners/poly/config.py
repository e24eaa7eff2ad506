"""`PolyConfig`: fields, defaults and validation of Poly (Polytropon) / MHR, as in Hugging Face peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import as_name_set, check_bool, check_optional_name_list, check_rank, check_size

#: The router variants peft 0.21.2 knows (only Polytropon's).
POLY_TYPES = ("poly",)


@dataclass
class PolyConfig(PeftConfig):
    """Configuration of a Poly adapter: an inventory of LoRA "skills" per layer, mixed per task by a router.

        w_t      = normalise(sigmoid(Z[t]))             Z: n_tasks x (n_splits * n_skills), per layer
        A_t, B_t = sum_s w_t[q, s] A[q, s], ... per split q
        y        = W0 x + (x A_t B_t) / r               t: the row's task id (`task_ids=` in the call)

    n_splits > 1 is Multi-Head Routing (MHR): input and output features are cut into n_splits
    blocks, each with its own mixture of skills.

    Args:
        r: Rank of each skill's LoRA.
        target_modules: Module names (suffix match) or a regex; None picks the query/value
            projections of known architectures.
        exclude_modules: Names or a regex of modules never to wrap.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        init_weights: True -- B = 0 (a no-op adapter); False -- B Kaiming-uniform too (for tests).
        poly_type: The router: only "poly" (Polytropon) exists.
        n_tasks: Number of tasks; task ids run from 0 to n_tasks - 1.
        n_skills: Number of LoRA skills per layer.
        n_splits: Number of blocks each skill is cut into (1: Poly, > 1: MHR); must divide the
            wrapped layers' input and output sizes.
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.POLY
    r: int = field(default=8, metadata={"help": "Rank of each skill's LoRA"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    init_weights: bool = field(default=True, metadata={"help": "True: a no-op adapter (B = 0); False: random B"})
    poly_type: Literal["poly"] = field(default="poly", metadata={"help": 'The router; only "poly"'})
    n_tasks: int = field(default=1, metadata={"help": "Number of tasks"})
    n_skills: int = field(default=4, metadata={"help": "Number of skills (LoRAs) per layer"})
    n_splits: int = field(default=1, metadata={"help": "Blocks per skill (> 1: Multi-Head Routing)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.POLY.value:
            raise ConfigError(f"PolyConfig has peft_type {self.peft_type!r}; it must be 'POLY'.")
        self.peft_type = PeftType.POLY
        self.target_modules = as_name_set(self.target_modules)
        self.exclude_modules = as_name_set(self.exclude_modules, "exclude_modules")
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
        check_rank(self.r, "r")
        check_bool(self.init_weights, "init_weights")
        if self.poly_type not in POLY_TYPES:
            raise ConfigError(
                f"Unsupported poly_type: {self.poly_type!r}. Currently, only the following types are supported: "
                "`poly`."
            )
        check_size(self.n_tasks, "n_tasks", example="4")
        check_size(self.n_skills, "n_skills", example="4")
        check_size(self.n_splits, "n_splits", example="1")
