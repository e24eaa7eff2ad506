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
from .checkpoint.state_dict import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from .config import PeftConfig
from .distributed import fsdp_auto_wrap_policy
from .errors import (
    AdapterNameError,
    AdapterStateError,
    CheckpointError,
    ConfigError,
    NoMatchingPeftModuleError,
    PeftError,
    PeftkitError,
    PeftWarning,
    TargetModulesError,
)
from .helpers import find_kappa_target_modules
from .mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    get_peft_config,
    get_peft_model,
    inject_adapter_in_model,
)
from .mixed_model import PeftMixedModel
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
from .tuners.lora import LoraConfig, LoraModel, LoraRuntimeConfig
from .tuners.lora import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig  # LoRA variants
from .checkpoint.cartridge import compose_cartridge_adapters
from .checkpoint.to_lora import convert_to_lora, save_as_lora
from .routing import create_arrow_model
from .tuners.lora.arrow import ArrowConfig
from .tuners.lora.corda import CordaConfig, preprocess_corda
from .tuners.lora.eva import EvaConfig, get_eva_state_dict, initialize_lora_eva_weights
from .tuners.lora.loftq import LoftQConfig, replace_lora_weights_loftq
from .tuners.lora.loraga import LoraGAConfig, preprocess_loraga
from .tuners.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from .tuners.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from .tuners.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit
from .utils.other import cast_mixed_precision_params, shift_tokens_right
from .utils.peft_types import PeftType, TaskType
from .integrations.recognition import install as _install_trainer_recognition

# transformers' Trainer treats peftkit models as peft models from here on (integrations/recognition.py).
_install_trainer_recognition()

__version__ = "0.1.0"

# Methods of the catalog are imported when first named (`peftkit.OFTConfig`), so `import peftkit`
# does not import every method folder.
_CATALOG = {
    "oft": ("OFTConfig", "OFTModel"),
    "boft": ("BOFTConfig", "BOFTModel"),
    "hra": ("HRAConfig", "HRAModel"),
    "road": ("RoadConfig", "RoadModel"),
    "psoft": ("PsoftConfig", "PsoftModel"),
    "vera": ("VeraConfig", "VeraModel"),
    "pvera": ("PveraConfig", "PveraModel"),
    "vblora": ("VBLoRAConfig", "VBLoRAModel"),
    "randlora": ("RandLoraConfig", "RandLoraModel"),
    "unilora": ("UniLoraConfig", "UniLoraModel"),
    "tinylora": ("TinyLoraConfig", "TinyLoraModel"),
    "fourierft": ("FourierFTConfig", "FourierFTModel"),
    "waveft": ("WaveFTConfig", "WaveFTModel"),
    "c3a": ("C3AConfig", "C3AModel"),
    "hira": ("HiraConfig", "HiraModel"),
    "miss": ("MissConfig", "MissModel"),
    "osf": ("OSFConfig", "OSFModel"),
    "ln_tuning": ("LNTuningConfig", "LNTuningModel"),
    "deft": ("DeftConfig", "DeftModel"),
    "gralora": ("GraloraConfig", "GraloraModel"),
    "glora": ("GloraConfig", "GloraModel"),
    "beft": ("BeftConfig", "BeftModel"),
    "delora": ("DeloraConfig", "DeloraModel"),
    "lily": ("LilyConfig", "LilyModel"),
    "shira": ("ShiraConfig", "ShiraModel"),
    "peanut": ("PeanutConfig", "PeanutModel"),
    "frod": ("FrodConfig", "FrodModel"),
    "supertuning": ("SupertuningConfig", "SupertuningModel"),
    "trainable_tokens": ("TrainableTokensConfig", "TrainableTokensModel"),
    "adamss": ("AdamssConfig", "AdamssModel"),
    "xlora": ("XLoraConfig", "XLoraModel"),
    "poly": ("PolyConfig", "PolyModel"),
    "adaption_prompt": ("AdaptionPromptConfig", "AdaptionPromptModel"),
    "shadow": ("ShadowConfig", "ShadowModel", "ShadowCache", "DetachedShadowModel"),
    "multitask_prompt_tuning": ("MultitaskPromptTuningConfig", "MultitaskPromptTuningModel", "MultitaskPromptTuningInit",
                                "MultitaskPromptEmbedding"),
    "cpt": ("CPTConfig", "CPTEmbedding", "CPTModel"),
    "cartridge": ("CartridgeConfig", "CartridgeEncoder", "CartridgeModel",
                  "initialize_kv_prefix_from_past_key_values", "initialize_kv_prefix_from_text",
                  "prompt_embeddings_from_past_key_values"),
}
_LAZY_NAMES = {name: folder for folder, names in _CATALOG.items() for name in names}


def __getattr__(name: str):
    folder = _LAZY_NAMES.get(name)
    if folder is None:
        raise AttributeError(f"module 'peftkit' has no attribute {name!r}")
    import importlib

    try:
        module = importlib.import_module(f".tuners.{folder}", __name__)
    except ModuleNotFoundError as exc:  # hasattr() must see "no such attribute", not an import error
        if exc.name != f"{__name__}.tuners.{folder}":
            raise
        raise AttributeError(f"module 'peftkit' has no attribute {name!r}") from exc
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES))


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
    "LoraRuntimeConfig",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "NoMatchingPeftModuleError",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
    "PEFT_TYPE_TO_PREFIX_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "PeftConfig",
    "PeftError",
    "PeftMixedModel",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PeftWarning",
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
    "TunerLayerStatus",
    "TunerModelStatus",
    "cast_mixed_precision_params",
    "create_loraplus_optimizer",
    "fsdp_auto_wrap_policy",
    "find_kappa_target_modules",
    "get_base_model_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "quantize_model",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "shift_tokens_right",
]
__all__ += sorted(_LAZY_NAMES)
__all__ += ["compose_cartridge_adapters"]  # checkpoint/cartridge.py
__all__ += ["ArrowConfig", "CordaConfig", "EvaConfig", "LoftQConfig", "LoraGAConfig", "get_eva_state_dict", "initialize_lora_eva_weights",
            "convert_to_lora", "create_arrow_model", "preprocess_corda", "preprocess_loraga", "replace_lora_weights_loftq", "save_as_lora"]  # LoRA initialisations (tuners/lora/)
__all__ += ["BdLoraConfig", "KasaConfig", "MontecloraConfig", "VeloraConfig"]  # LoRA variants (tuners/lora/)
