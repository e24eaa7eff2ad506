"""`PolyModel`: the Poly tuner -- wraps targeted `nn.Linear` modules; each call routes rows by `task_ids`.

The task ids of a call reach the layers as per-call state (`_core/call_state.py`), not through the
base model's forward signature: `PeftModel` hands the call's keywords to `per_call_context`, which
pops `task_ids`; `PolyModel.forward` / `generate` take them as keywords too (peft's signatures).
Every forward of a `generate` loop, and every layer, sees the same ids; concurrent calls in other
threads keep their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Optional

import torch
from torch import nn

from ...errors import ConfigError, NotMergeableError
from .._core.base_layers import base_of
from .._core.call_state import task_ids_scope
from .._core.size_limits import ELEMENTS_FACTOR, element_limit
from .._core.tuner import BaseTuner
from ..hira.model import HIRA_TARGET_MODULES_BY_MODEL_TYPE
from .config import PolyConfig
from .layer import SUPPORTED_LAYERS, PolyLayer, dispatch_linear

#: peft's Poly defaults: its copy of the LoRA table (the query/value projections per architecture), as HiRA's.
POLY_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = dict(HIRA_TARGET_MODULES_BY_MODEL_TYPE)
#: peft's name for the same table (the same object).
TRANSFORMERS_MODELS_TO_POLY_TARGET_MODULES_MAPPING = POLY_TARGET_MODULES_BY_MODEL_TYPE

NOT_MERGEABLE = (
    "Poly adapters cannot be merged into the base weights: the router mixes the skills per row, by each "
    "row's task id, so the update is not one fixed weight. Keep the PeftModel for inference, or call "
    "unload() to get the base model back."
)


class PolyMergeError(NotMergeableError):
    """Merging a Poly adapter (peft raises NotImplementedError)."""


class PolyModel(BaseTuner):
    """Creates Poly adapters on a model: `PolyModel(model, PolyConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    Call with `task_ids=` (one id per batch row): `model(**batch, task_ids=ids)`, `model.generate(..., task_ids=ids)`.
    """

    prefix = "poly_"
    default_target_modules = POLY_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = PolyLayer
    dispatchers = (dispatch_linear,)
    display_name = "Poly"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: PolyConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        """The layer's arguments; called for every target before any is wrapped, so the checks here
        (n_splits divides the features, a plausible size) leave the model unchanged when they fail."""
        base = base_of(target)
        if isinstance(base, nn.Linear):
            _check_fits(config, key, base)
        return {
            "r": config.r,
            "n_tasks": config.n_tasks,
            "n_skills": config.n_skills,
            "n_splits": config.n_splits,
            "poly_type": config.poly_type,
            "init_weights": config.init_weights,
            "inference_mode": config.inference_mode,
        }

    # ------------------------------------------------------------------ task ids per call
    @contextmanager
    def per_call_context(self, args: tuple, kwargs: dict[str, Any]) -> Iterator[None]:
        """For one `PeftModel` forward / generate call: `kwargs["task_ids"]` (popped; None clears
        what an enclosing call set) is what every Poly layer routes by."""
        with task_ids_scope(kwargs.pop("task_ids", None)):
            yield

    def _task_scope(self, task_ids: Optional[torch.Tensor]) -> Any:
        # None keeps the ids of an enclosing call (`PeftModel` popped them into the scope already).
        return nullcontext() if task_ids is None else task_ids_scope(task_ids)

    def forward(self, *args: Any, task_ids: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        with self._task_scope(task_ids):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, task_ids: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        with self._task_scope(task_ids):
            return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ no merging (as peft)
    def _check_merge_allowed(self) -> None:
        raise PolyMergeError(NOT_MERGEABLE)

    def unmerge_adapter(self) -> None:
        raise PolyMergeError(NOT_MERGEABLE)


def _check_fits(config: PolyConfig, key: str, base: nn.Linear) -> None:
    """ConfigError when n_splits does not divide the layer's features or the adapter is implausibly large."""
    n_in, n_out, splits = base.in_features, base.out_features, config.n_splits
    if n_in % splits or n_out % splits:
        raise ConfigError(
            f"n_splits={splits} must divide the in_features ({n_in}) and out_features ({n_out}) of {key!r}: each "
            "skill is cut into n_splits equal blocks. Pick a common divisor of the wrapped layers' sizes (1 always "
            "works), or narrow target_modules."
        )
    added = config.n_skills * config.r * (n_in + n_out) + config.n_tasks * config.n_skills * splits
    base_elements = sum(p.numel() for p in base.parameters())
    limit = element_limit(base_elements)
    if added > limit:
        raise ConfigError(
            f"r={config.r}, n_skills={config.n_skills}, n_tasks={config.n_tasks} would add about {added:,} adapter "
            f"elements to {key!r} ({base_elements:,} elements); peftkit refuses more than max({ELEMENTS_FACTOR} x "
            f"the base layer, 2**26) = {limit:,} as implausible (an untrusted or damaged config?). Use realistic "
            "sizes (r 2 to 64, a few skills)."
        )
