"""`PveraModel`: the PVeRA tuner -- VeRA's shared frozen pair (here pvera_A: 2r x in_max, pvera_B: out_max x r).

Checkpoints (as peft writes them):

    <module>.pvera_lambda_b (out,)   <module>.pvera_lambda_d (2r,)
    base_model.pvera_A (2r, in_max)  base_model.pvera_B (out_max, r)      only with save_projection=True
"""

from __future__ import annotations

from typing import Any

from ..vblora.shared import BufferDict, refuse_unsupported
from ..vera.model import VERA_TARGET_MODULES_BY_MODEL_TYPE
from ..vera.projection import ProjectionTuner
from .config import PveraConfig
from .layer import SUPPORTED_LAYERS, PveraLayer, dispatch_linear

#: peft's table: VeRA's, plus DINOv2's attention.
PVERA_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = {**VERA_TARGET_MODULES_BY_MODEL_TYPE, "dinov2": ["query", "value"]}


class PveraModel(ProjectionTuner):
    """Creates PVeRA adapters on a model: `PveraModel(model, PveraConfig(...), "default")`.

    `pvera_A[adapter]` / `pvera_B[adapter]` are the shared projections (the same tensors for every adapter).
    """

    prefix = "pvera_lambda_"
    layer_cls = PveraLayer
    dispatchers = (dispatch_linear, refuse_unsupported("PVeRA", SUPPORTED_LAYERS))
    default_target_modules = PVERA_TARGET_MODULES_BY_MODEL_TYPE
    display_name = "PVeRA"
    supported_layers = SUPPORTED_LAYERS
    shared_containers = {"pvera_A": True, "pvera_B": True}
    dropout_field = "pvera_dropout"
    save_projection_values_as_set = True

    @property
    def pvera_A(self) -> BufferDict:
        return self.shared("pvera_A")

    @property
    def pvera_B(self) -> BufferDict:
        return self.shared("pvera_B")

    def _method_layer_kwargs(self, config: PveraConfig) -> dict[str, Any]:
        return {"sample_at_inference": config.sample_at_inference, "generator_seed": config.generator_seed}
