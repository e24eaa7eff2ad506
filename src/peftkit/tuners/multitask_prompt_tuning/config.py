"""`MultitaskPromptTuningConfig`: multitask prompt tuning (Wang et al., 2023, arXiv:2303.02861).

One prompt `P` (n x d) is shared by all tasks; task `t` scales it elementwise by a rank-r matrix:

    prompt_t = P * (C_t @ R_t)        C_t = prefix_task_cols[t] (n x r), R_t = prefix_task_rows[t] (r x d)

Training a target task can start from a source-task checkpoint (`prompt_tuning_init_state_dict_path`):
its shared prompt, and the average or one task's `C`/`R`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ...config import _as_enum
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import check_size
from .._prompt.config import PromptLearningConfig
from ..prompt_tuning.config import PromptTuningConfig


class MultitaskPromptTuningInit(str, enum.Enum):
    """How the prompt starts: a text's tokens, random, or from a source-task checkpoint."""

    TEXT = "TEXT"
    RANDOM = "RANDOM"
    #: shared prompt of the source, and the mean of its tasks' C and R
    AVERAGE_SOURCE_TASKS = "AVERAGE_SOURCE_TASKS"
    #: shared prompt of the source, and C and R of its task `prompt_tuning_init_task`
    EXACT_SOURCE_TASK = "EXACT_SOURCE_TASK"
    #: shared prompt of the source only (C and R random)
    ONLY_SOURCE_SHARED = "ONLY_SOURCE_SHARED"


#: Inits that read `prompt_tuning_init_state_dict_path`.
FROM_SOURCE = (
    MultitaskPromptTuningInit.AVERAGE_SOURCE_TASKS,
    MultitaskPromptTuningInit.EXACT_SOURCE_TASK,
    MultitaskPromptTuningInit.ONLY_SOURCE_SHARED,
)
#: Inits that also take the source's per-task C and R (one task's worth).
FROM_SOURCE_TASKS = (MultitaskPromptTuningInit.AVERAGE_SOURCE_TASKS, MultitaskPromptTuningInit.EXACT_SOURCE_TASK)


@dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """Multitask prompt tuning: a shared prompt times a per-task low-rank matrix, picked by `task_ids`.

    Forward and generate take `task_ids` (one task index per batch row).

    Args:
        prompt_tuning_init: TEXT, RANDOM, AVERAGE_SOURCE_TASKS, EXACT_SOURCE_TASK or ONLY_SOURCE_SHARED.
        prompt_tuning_init_state_dict_path: Source-task adapter weights (safetensors, or a weights-only
            torch file) for the three source inits.
        prompt_tuning_init_task: The source task EXACT_SOURCE_TASK copies.
        num_ranks: Rank r of each task's matrix `C_t @ R_t`.
        num_tasks: Number of tasks (rows of `prefix_task_cols` / `prefix_task_rows`).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.MULTITASK_PROMPT_TUNING

    prompt_tuning_init: Union[MultitaskPromptTuningInit, str] = field(
        default=MultitaskPromptTuningInit.RANDOM,
        metadata={"help": "TEXT, RANDOM, AVERAGE_SOURCE_TASKS, EXACT_SOURCE_TASK or ONLY_SOURCE_SHARED"},
    )
    prompt_tuning_init_state_dict_path: Optional[str] = field(
        default=None, metadata={"help": "Source-task weights file, for the source inits"}
    )
    prompt_tuning_init_task: Optional[int] = field(default=0, metadata={"help": "Source task id for initialization"})
    num_ranks: Optional[int] = field(default=1, metadata={"help": "Rank of each task's matrix"})
    num_tasks: Optional[int] = field(default=1, metadata={"help": "Number of tasks"})

    def __post_init__(self) -> None:
        # The prompt-tuning checks, with this method's own peft_type and init choices.
        PromptLearningConfig.__post_init__(self)
        if str(self.peft_type) != PeftType.MULTITASK_PROMPT_TUNING.value:
            raise ConfigError(
                f"MultitaskPromptTuningConfig has peft_type {self.peft_type!r}; it must be 'MULTITASK_PROMPT_TUNING'."
            )
        self.peft_type = PeftType.MULTITASK_PROMPT_TUNING
        self.prompt_tuning_init = _as_enum(MultitaskPromptTuningInit, self.prompt_tuning_init, "prompt_tuning_init")
        init = self.prompt_tuning_init
        if init == MultitaskPromptTuningInit.TEXT:
            if not self.tokenizer_name_or_path:
                raise ConfigError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a local path or hub id).")
            if not self.prompt_tuning_init_text:
                raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text, the text to start from.")
        elif self.tokenizer_kwargs:
            raise ConfigError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'; remove it or use TEXT init.")
        check_size(self.num_ranks, "num_ranks", example="1")
        check_size(self.num_tasks, "num_tasks", example="4")
        task = self.prompt_tuning_init_task
        if (task is not None or init == MultitaskPromptTuningInit.EXACT_SOURCE_TASK) and (
            isinstance(task, bool) or not isinstance(task, int) or task < 0
        ):
            raise ConfigError(f"prompt_tuning_init_task={task!r} is invalid; pass the source task's index (an int >= 0).")
        if init in FROM_SOURCE and not self.prompt_tuning_init_state_dict_path:
            raise ConfigError(
                f"prompt_tuning_init={init.value!r} starts from a source-task checkpoint; set "
                "prompt_tuning_init_state_dict_path to its adapter_model.safetensors."
            )
        if init in FROM_SOURCE_TASKS and self.num_tasks != 1:
            raise ConfigError(
                f"prompt_tuning_init={init.value!r} gives one task's prefix_task_cols/rows, but num_tasks="
                f"{self.num_tasks}; use num_tasks=1 (a target task) or prompt_tuning_init='ONLY_SOURCE_SHARED'."
            )

    def adapter_elements(self) -> int:
        """The shared table `n x d` plus the task matrices `T x n x r` and `T x r x d` (n = all virtual tokens)."""
        total = self.num_virtual_tokens * (self.num_transformer_submodules or 1)
        dim = self.token_dim or 1
        return total * dim + self.num_tasks * self.num_ranks * (total + dim)

    def size_fields(self) -> dict[str, Any]:
        return {**super().size_fields(), "num_tasks": self.num_tasks, "num_ranks": self.num_ranks}
