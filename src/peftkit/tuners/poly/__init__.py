"""Poly (Polytropon) and MHR: per-task routed mixtures of LoRA skills,
`y = W0 x + x A_t B_t / r` with `A_t = sum_s w_t[s] A_s` (w_t from the router for the row's task id)."""

from ...registry import MethodSpec
from ...utils.peft_types import PeftType
from .config import PolyConfig
from .layer import Linear, PolyLayer
from .model import PolyModel

METHOD = MethodSpec(
    peft_type=PeftType.POLY,
    config_cls=PolyConfig,
    tuner_cls=PolyModel,
    cli_names=("poly",),
    capabilities=set(),
    rank_dims={"poly_lora_A": 3, "poly_lora_B": 2},
)

__all__ = ["METHOD", "Linear", "PolyConfig", "PolyLayer", "PolyModel"]
