"""`VeraModel`: the VeRA tuner -- one shared frozen pair (vera_A, vera_B), wrapping Linear / Conv1D modules.

Checkpoints (as peft writes them):

    <module>.vera_lambda_b (out,)   <module>.vera_lambda_d (r,)
    base_model.vera_A (r, in_max)   base_model.vera_B (out_max, r)      only with save_projection=True
"""

from __future__ import annotations

from typing import Any

from ..lora.constants import LORA_TARGET_MODULES_BY_MODEL_TYPE
from ..vblora.shared import BufferDict, refuse_unsupported
from .layer import SUPPORTED_LAYERS, VeraLayer, dispatch_linear
from .projection import ProjectionTuner

#: peft's table: LoRA's defaults, with phi's attention projections only.
VERA_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = {**LORA_TARGET_MODULES_BY_MODEL_TYPE, "phi": ["q_proj", "v_proj"]}


class VeraModel(ProjectionTuner):
    """Creates VeRA adapters on a model: `VeraModel(model, VeraConfig(...), "default")`.

    `vera_A[adapter]` / `vera_B[adapter]` are the shared projections (the same tensors for every adapter).
    """

    prefix = "vera_lambda_"
    layer_cls = VeraLayer
    dispatchers = (dispatch_linear, refuse_unsupported("VeRA", SUPPORTED_LAYERS))
    default_target_modules = VERA_TARGET_MODULES_BY_MODEL_TYPE
    display_name = "VeRA"
    supported_layers = SUPPORTED_LAYERS
    shared_containers = {"vera_A": True, "vera_B": True}
    dropout_field = "vera_dropout"

    @property
    def vera_A(self) -> BufferDict:
        return self.shared("vera_A")

    @property
    def vera_B(self) -> BufferDict:
        return self.shared("vera_B")
