"""`LoHaModel`: the LoHa tuner -- wraps targeted Linear / Conv1D / Conv1d / Conv2d modules."""

from __future__ import annotations

from .._lycoris import LycorisTuner, lycoris_dispatcher
from .config import LoHaConfig
from .layer import LoHaLayer


class LoHaModel(LycorisTuner):
    """Creates LoHa adapters on a model: `LoHaModel(model, LoHaConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "hada_"
    layer_cls = LoHaLayer
    dispatchers = (lycoris_dispatcher(LoHaLayer),)
    display_name = "LoHa"

