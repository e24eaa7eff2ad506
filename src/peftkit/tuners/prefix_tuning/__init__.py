"""prefix_tuning: config and encoder; `METHOD` declares it to the registry."""

from ...registry import MethodSpec
from ...utils.peft_types import PeftType
from .config import PrefixTuningConfig
from .model import PrefixEncoder, PrefixTuningModel

#: Checkpoints hold one table, `prompt_embeddings` (the encoder's output), so that is the key prefix.
METHOD = MethodSpec(
    peft_type=PeftType.PREFIX_TUNING,
    config_cls=PrefixTuningConfig,
    tuner_cls=PrefixTuningModel,
    prefix="prompt_embeddings",
    cli_names=("prefix",),
    cli_defaults={"num_virtual_tokens": 8},
    fsdp_wrap_classes=(PrefixEncoder,),
)

__all__ = ["METHOD", "PrefixTuningModel", "PrefixTuningConfig", "PrefixEncoder"]
