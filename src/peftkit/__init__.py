"""peftkit: parameter-efficient fine-tuning with Hugging Face peft's API and checkpoint format.

    from peftkit import LoraConfig, get_peft_model, PeftModel, TaskType
"""

from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .checkpoint.state_dict import get_peft_model_state_dict, set_peft_model_state_dict
from .config import PeftConfig
from .errors import AdapterNameError, AdapterStateError, CheckpointError, ConfigError, PeftkitError, TargetModulesError
from .mapping import get_peft_config, get_peft_model, inject_adapter_in_model
from .peft_model import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .tuners.lora import LoraConfig, LoraModel
from .utils.peft_types import PeftType, TaskType

__version__ = "0.1.0"

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "AdapterNameError",
    "AdapterStateError",
    "CheckpointError",
    "ConfigError",
    "LoraConfig",
    "LoraModel",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PeftkitError",
    "TargetModulesError",
    "TaskType",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "set_peft_model_state_dict",
]
