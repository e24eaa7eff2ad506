"""prompt_tuning: config and encoder; `METHOD` declares it to the registry."""

from ...registry import MethodSpec
from ...utils.peft_types import PeftType
from .config import PromptTuningConfig, PromptTuningInit
from .model import PromptEmbedding, PromptTuningModel

#: Checkpoints hold one table, `prompt_embeddings` (the encoder's output), so that is the key prefix.
METHOD = MethodSpec(
    peft_type=PeftType.PROMPT_TUNING,
    config_cls=PromptTuningConfig,
    tuner_cls=PromptTuningModel,
    prefix="prompt_embeddings",
    cli_names=("prompt",),
    cli_defaults={"num_virtual_tokens": 8},
    fsdp_wrap_classes=(PromptEmbedding,),
)

__all__ = ["METHOD", "PromptTuningModel", "PromptTuningConfig", "PromptTuningInit", "PromptEmbedding"]
