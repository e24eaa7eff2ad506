"""`MultitaskPromptEmbedding` and its tuner: a shared prompt scaled per task by a low-rank matrix.

    prompt_t = P * (C_t @ R_t)        (elementwise product; P: n x d, C_t: n x r, R_t: r x d)

`P` is `embedding.weight`, `C = prefix_task_cols` (T x n x r), `R = prefix_task_rows` (T x r x d), with
n = num_virtual_tokens * num_transformer_submodules and T = num_tasks. Each batch row names its task
in `task_ids`. Checkpoints hold `prompt_embeddings` (P itself, not a task's product), `prefix_task_cols`
and `prefix_task_rows`, as peft writes them.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ...errors import CheckpointError, ConfigError
from ...utils.files import read_weights_file
from .._prompt.model import PROMPT_EMBEDDINGS_KEY, PromptLearningModel
from ..prompt_tuning.model import PromptEmbedding
from .config import FROM_SOURCE, FROM_SOURCE_TASKS, MultitaskPromptTuningConfig, MultitaskPromptTuningInit

COLS_KEY = "prefix_task_cols"
ROWS_KEY = "prefix_task_rows"


class MultitaskPromptEmbedding(PromptEmbedding):
    """The shared prompt `embedding` (n x d) and the per-task factors `prefix_task_cols` / `prefix_task_rows`."""

    def __init__(self, config: MultitaskPromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__(config, word_embeddings)  # P: RANDOM or TEXT init
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.num_tasks = config.num_tasks
        # N(0, 0.02) factors, drawn after P (the order peft draws them in, so equal seeds give equal tensors).
        self.prefix_task_cols = nn.Parameter(torch.normal(0.0, 0.02, size=(config.num_tasks, total, config.num_ranks)))
        self.prefix_task_rows = nn.Parameter(torch.normal(0.0, 0.02, size=(config.num_tasks, config.num_ranks, config.token_dim)))
        # A loaded adapter gets its tensors from its own checkpoint: the source file is read only to train.
        if config.prompt_tuning_init in FROM_SOURCE and not config.inference_mode:
            self._start_from_source(config, word_embeddings.weight.device)

    def _start_from_source(self, config: MultitaskPromptTuningConfig, device: torch.device) -> None:
        path = config.prompt_tuning_init_state_dict_path
        source = read_weights_file(path, device=str(device))  # safetensors or weights-only torch.load
        wanted = {PROMPT_EMBEDDINGS_KEY: self.embedding.weight}
        if config.prompt_tuning_init in FROM_SOURCE_TASKS:
            cols, rows = _source_tensor(source, COLS_KEY, path), _source_tensor(source, ROWS_KEY, path)
            if config.prompt_tuning_init == MultitaskPromptTuningInit.EXACT_SOURCE_TASK:
                task = config.prompt_tuning_init_task
                if not task < cols.shape[0]:
                    raise ConfigError(
                        f"prompt_tuning_init_task={task} but the source checkpoint {path!r} holds {cols.shape[0]} "
                        f"task(s); pick a task index below {cols.shape[0]}."
                    )
                cols, rows = cols[task : task + 1], rows[task : task + 1]
            else:
                cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
            source = {**source, COLS_KEY: cols, ROWS_KEY: rows}
            wanted.update({COLS_KEY: self.prefix_task_cols, ROWS_KEY: self.prefix_task_rows})
        values = {key: _source_tensor(source, key, path) for key in wanted}
        for key, target in wanted.items():  # all shapes checked before anything is copied
            if values[key].shape != target.shape:
                raise ConfigError(
                    f"The source checkpoint {path!r} has {key} of shape {tuple(values[key].shape)}, this adapter "
                    f"needs {tuple(target.shape)}: match num_virtual_tokens, num_ranks and the base model to the source's."
                )
        with torch.no_grad():
            for key, target in wanted.items():
                target.copy_(values[key].to(target.dtype))

    def forward(self, indices: torch.Tensor, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`(batch, n)` indices and `(batch,)` task ids (or one id for all rows) -> `(batch, n, d)` prompts."""
        if task_ids is None:
            raise ValueError("task_ids cannot be None: multitask prompt tuning needs each row's task (task_ids=...).")
        shared = self.embedding(indices)
        task_matrix = self.prefix_task_cols[task_ids] @ self.prefix_task_rows[task_ids]  # (batch, n, d)
        return shared * task_matrix


def _source_tensor(source: dict[str, torch.Tensor], key: str, path: str) -> torch.Tensor:
    if key not in source:
        raise CheckpointError(
            f"The source checkpoint {path!r} has no {key!r} (it holds {sorted(source)[:5]}); point "
            "prompt_tuning_init_state_dict_path at a multitask prompt tuning adapter_model.safetensors."
        )
    return source[key]


class MultitaskPromptTuningModel(PromptLearningModel):
    """The prompt-learning tuner whose adapters are `MultitaskPromptEmbedding`s; forward takes `task_ids`."""

    encoder_cls = MultitaskPromptEmbedding
    display_name = "multitask prompt tuning"
    prompts_the_decoder = True  # peft's layout: encoder-decoder models get prompts on both sides in forward

    def prompt_table(
        self, adapter_name: str, batch_size: int = 1, cast: bool = True, task_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Each row's task prompt `P * (C_t @ R_t)`, (batch_size, n, d)."""
        encoder = self.prompt_encoder[adapter_name]
        task_ids = _checked_task_ids(task_ids, batch_size, encoder.num_tasks, encoder.embedding.weight.device)
        weight = encoder.embedding.weight
        indices = torch.arange(weight.shape[0], device=weight.device).expand(batch_size, -1)
        return encoder(indices, task_ids)

    def saved_prompt_embeddings(self, adapter_name: str) -> torch.Tensor:
        return self.prompt_encoder[adapter_name].embedding.weight

    def encoder_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        encoder = self.prompt_encoder[adapter_name]
        return {COLS_KEY: encoder.prefix_task_cols, ROWS_KEY: encoder.prefix_task_rows}


def _checked_task_ids(task_ids: Any, batch_size: int, num_tasks: int, device: torch.device) -> torch.Tensor:
    """`task_ids` as a long tensor on `device`: one id per row (or one for the whole batch), each in [0, num_tasks)."""
    if task_ids is None:
        raise ValueError(
            "task_ids cannot be None: multitask prompt tuning needs each row's task; pass task_ids=torch.tensor([...]) "
            "(one task index per batch row) to forward / generate."
        )
    ids = torch.as_tensor(task_ids, device=device)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() > 1 or ids.numel() not in (1, batch_size):
        raise ValueError(
            f"task_ids must hold one integer task index per batch row ({batch_size}), got shape "
            f"{tuple(ids.shape)} of {ids.dtype}."
        )
    ids = ids.long().reshape(-1)
    if not torch.compiler.is_compiling() and (ids.min() < 0 or ids.max() >= num_tasks):
        raise ValueError(f"task_ids {ids.tolist()} are out of range: this adapter has num_tasks={num_tasks} (ids 0..{num_tasks - 1}).")
    return ids
