"""`LoHaModel`: the LoHa tuner -- wraps targeted Linear / Conv1D / Conv1d / Conv2d modules."""

from __future__ import annotations

from ...registry import register_method
from ...utils.peft_types import PeftType
from .._lycoris import LycorisTuner
from .config import LoHaConfig
from .layer import LoHaLayer


class LoHaModel(LycorisTuner):
    """Creates LoHa adapters on a model: `LoHaModel(model, LoHaConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "hada_"
    layer_cls = LoHaLayer


register_method(PeftType.LOHA, LoHaConfig, LoHaModel, prefix="hada_")
