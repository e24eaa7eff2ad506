"""multitask_prompt_tuning: a shared prompt scaled per task, `prompt_t = P * (C_t @ R_t)`; `METHOD` declares it."""

from ...registry import MethodSpec
from ...utils.peft_types import PeftType
from .config import MultitaskPromptTuningConfig, MultitaskPromptTuningInit
from .model import MultitaskPromptEmbedding, MultitaskPromptTuningModel

#: Checkpoints hold `prompt_embeddings` (the shared prompt) besides the task factors; that key is the prefix.
METHOD = MethodSpec(
    peft_type=PeftType.MULTITASK_PROMPT_TUNING,
    config_cls=MultitaskPromptTuningConfig,
    tuner_cls=MultitaskPromptTuningModel,
    prefix="prompt_embeddings",
    cli_names=("multitask_prompt", "mpt"),
    cli_defaults={"num_virtual_tokens": 8},
    fsdp_wrap_classes=(MultitaskPromptEmbedding,),
)

__all__ = [
    "METHOD",
    "MultitaskPromptEmbedding",
    "MultitaskPromptTuningConfig",
    "MultitaskPromptTuningInit",
    "MultitaskPromptTuningModel",
]
