"""cpt: context-aware prompt tuning (projected deltas on a few-shot context, weighted loss); `METHOD` declares it."""

from ...registry import MethodSpec
from ...utils.peft_types import PeftType
from .config import CPTConfig
from .model import CPTEmbedding, CPTModel

#: Checkpoints hold one table, `prompt_embeddings` (context + projected delta), so that is the key prefix.
METHOD = MethodSpec(
    peft_type=PeftType.CPT,
    config_cls=CPTConfig,
    tuner_cls=CPTModel,
    prefix="prompt_embeddings",
    cli_names=("cpt",),
    fsdp_wrap_classes=(CPTEmbedding,),
)

__all__ = ["METHOD", "CPTConfig", "CPTEmbedding", "CPTModel"]
