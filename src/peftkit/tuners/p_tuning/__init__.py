"""p_tuning: config and encoder; `METHOD` declares it to the registry."""

from ...registry import MethodSpec
from ...utils.peft_types import PeftType
from .config import PromptEncoderConfig, PromptEncoderReparameterizationType
from .model import PromptEncoder, PromptEncoderModel

#: Checkpoints hold one table, `prompt_embeddings` (the encoder's output), so that is the key prefix.
METHOD = MethodSpec(
    peft_type=PeftType.P_TUNING,
    config_cls=PromptEncoderConfig,
    tuner_cls=PromptEncoderModel,
    prefix="prompt_embeddings",
    cli_names=("ptuning",),
    cli_defaults={"num_virtual_tokens": 8, "encoder_hidden_size": 32},
    fsdp_wrap_classes=(PromptEncoder,),
)

__all__ = ["METHOD", "PromptEncoderModel", "PromptEncoderConfig", "PromptEncoderReparameterizationType", "PromptEncoder"]
