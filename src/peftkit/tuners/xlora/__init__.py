"""X-LoRA: a mixture of LoRA experts, weighted per token by a learned classifier,
`y = W x + g * sum_e s_e(x) * scaling_e * B_e A_e x`."""

from ...registry import MethodSpec
from ...utils.peft_types import PeftType
from .classifier import XLoraClassifier
from .config import XLoraConfig
from .model import XLoraModel

METHOD = MethodSpec(
    peft_type=PeftType.XLORA,
    config_cls=XLoraConfig,
    tuner_cls=XLoraModel,
    cli_names=("xlora",),
    capabilities=set(),
)

__all__ = ["METHOD", "XLoraClassifier", "XLoraConfig", "XLoraModel"]
