"""`AutoPeftModelFor...`: load base model and adapter from the adapter folder alone.

The adapter's `base_model_name_or_path` names the base model; it is loaded with the matching
transformers Auto class, then the adapter is loaded on top (`PeftModel.from_pretrained`).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Optional, Union

import transformers

from .checkpoint.io import HUB_KWARGS, hub_kwargs_of
from .config import PeftConfig
from .errors import ConfigError
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)


#: Options of the adapter load (`PeftModel.from_pretrained`), not passed to the base model's loader.
_ADAPTER_OPTIONS = ("autocast_adapter_dtype", "low_cpu_mem_usage", "torch_device")


class AutoPeftModel:
    """Base of the auto classes; `auto_model_name` is the transformers Auto class to use."""

    auto_model_name: ClassVar[str] = "AutoModel"
    peft_model_cls: ClassVar[type[PeftModel]] = PeftModel

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[PeftConfig] = None,
        revision: Optional[str] = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load `base_model_name_or_path` with the Auto class, then the adapter onto it.

        Keywords: hub arguments (for the adapter), the adapter options `autocast_adapter_dtype`,
        `low_cpu_mem_usage` and `torch_device`, and anything else for the base model's `from_pretrained`.
        """
        path = os.fspath(pretrained_model_name_or_path)
        hub_kwargs = hub_kwargs_of(kwargs)
        peft_config = config or PeftConfig.from_pretrained(path, **hub_kwargs)
        base_name = peft_config.base_model_name_or_path
        if not base_name:
            raise ConfigError(
                f"The adapter at {path!r} does not name its base model (base_model_name_or_path is empty); "
                "load the base model yourself and use PeftModel.from_pretrained(model, adapter_path)."
            )
        adapter_kwargs = {k: v for k, v in kwargs.items() if k in _ADAPTER_OPTIONS}
        model_kwargs = {k: v for k, v in kwargs.items() if k not in HUB_KWARGS and k not in _ADAPTER_OPTIONS}
        auto_cls = getattr(transformers, cls.auto_model_name)
        base_model = auto_cls.from_pretrained(base_name, revision=peft_config.revision, **model_kwargs)
        return cls.peft_model_cls.from_pretrained(
            base_model,
            path,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            config=peft_config,  # read once above
            **hub_kwargs,
            **adapter_kwargs,
        )


class AutoPeftModelForCausalLM(AutoPeftModel):
    auto_model_name = "AutoModelForCausalLM"
    peft_model_cls = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    auto_model_name = "AutoModelForSeq2SeqLM"
    peft_model_cls = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    auto_model_name = "AutoModelForSequenceClassification"
    peft_model_cls = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(AutoPeftModel):
    auto_model_name = "AutoModelForTokenClassification"
    peft_model_cls = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    auto_model_name = "AutoModelForQuestionAnswering"
    peft_model_cls = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    auto_model_name = "AutoModel"
    peft_model_cls = PeftModelForFeatureExtraction
