"""`LoKrModel`: the LoKr tuner -- wraps targeted Linear / Conv1D / Conv1d / Conv2d modules."""

from __future__ import annotations

from typing import Any

from torch import nn

from .._lycoris import LycorisTuner, lycoris_dispatcher
from .config import LoKrConfig
from .layer import LoKrLayer


class LoKrModel(LycorisTuner):
    """Creates LoKr adapters on a model: `LoKrModel(model, LoKrConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "lokr_"
    layer_cls = LoKrLayer
    dispatchers = (lycoris_dispatcher(LoKrLayer),)
    display_name = "LoKr"

    def layer_kwargs(self, config: LoKrConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {
            **super().layer_kwargs(config, adapter_name, key, target),
            "rank_dropout_scale": config.rank_dropout_scale,
            "decompose_both": config.decompose_both,
            "decompose_factor": config.decompose_factor,
        }

