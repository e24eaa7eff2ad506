"""`LoKrModel`: the LoKr tuner -- wraps targeted Linear / Conv1D / Conv1d / Conv2d modules."""

from __future__ import annotations

from typing import Any

from ...registry import register_method
from ...utils.peft_types import PeftType
from .._lycoris import LycorisTuner
from .config import LoKrConfig
from .layer import LoKrLayer


class LoKrModel(LycorisTuner):
    """Creates LoKr adapters on a model: `LoKrModel(model, LoKrConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "lokr_"
    layer_cls = LoKrLayer

    def _layer_kwargs(self, config: LoKrConfig) -> dict[str, Any]:
        return {
            **super()._layer_kwargs(config),
            "rank_dropout_scale": config.rank_dropout_scale,
            "decompose_both": config.decompose_both,
            "decompose_factor": config.decompose_factor,
        }


register_method(PeftType.LOKR, LoKrConfig, LoKrModel, prefix="lokr_")
