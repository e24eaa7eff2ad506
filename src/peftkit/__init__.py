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
from .distributed import fsdp_auto_wrap_policy
from .errors import AdapterNameError, AdapterStateError, CheckpointError, ConfigError, PeftkitError, TargetModulesError
from .mapping import get_peft_config, get_peft_model, inject_adapter_in_model
from .optimizers import create_loraplus_optimizer
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
from .quantization import QuantizationConfig, prepare_model_for_kbit_training, quantize_model
from .tuners.adalora import AdaLoraConfig, AdaLoraModel
from .tuners.bottleneck import AdapterConfig, BottleneckConfig, BottleneckModel
from .tuners.ia3 import IA3Config, IA3Model
from .tuners.loha import LoHaConfig, LoHaModel
from .tuners.lokr import LoKrConfig, LoKrModel
from .tuners.lora import LoraConfig, LoraModel
from .tuners.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from .tuners.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .tuners.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit
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
    "AdaLoraConfig",
    "AdaLoraModel",
    "AdapterConfig",
    "AdapterNameError",
    "AdapterStateError",
    "BottleneckConfig",
    "BottleneckModel",
    "CheckpointError",
    "ConfigError",
    "IA3Config",
    "IA3Model",
    "LoHaConfig",
    "LoHaModel",
    "LoKrConfig",
    "LoKrModel",
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
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptTuningConfig",
    "PromptTuningInit",
    "PeftkitError",
    "QuantizationConfig",
    "TargetModulesError",
    "TaskType",
    "create_loraplus_optimizer",
    "fsdp_auto_wrap_policy",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "prepare_model_for_kbit_training",
    "quantize_model",
    "set_peft_model_state_dict",
]
