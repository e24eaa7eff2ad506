"""Entry points: `get_peft_model`, `inject_adapter_in_model`, `get_peft_config`."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from .checkpoint.adapter_folder import base_model_name
from .config import PeftConfig
from .errors import ConfigError
from .peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel
from .registry import method_spec


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: Optional[str] = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap `model` with a new adapter described by `peft_config`; only the adapter trains.

    The wrapper class follows `peft_config.task_type` (`PeftModelForCausalLM`, ...), or is a plain
    `PeftModel` when no task type is set. The user's config object is not modified.

    `autocast_adapter_dtype=False` keeps adapters in the dtype of fp16/bf16 base layers instead of
    fp32. `low_cpu_mem_usage=True` creates the adapter on the meta device, for weights loaded next
    with `set_peft_model_state_dict` (as in peft, not for training from scratch).
    """
    if not isinstance(peft_config, PeftConfig):
        raise ConfigError(f"peft_config must be a PeftConfig such as LoraConfig(...), got {type(peft_config).__name__}.")
    if isinstance(model, PeftModel):
        raise ConfigError("This model is a PeftModel already; add more adapters with model.add_adapter(name, config).")
    if mixed:
        raise ConfigError("mixed=True (PeftMixedModel) is not supported yet; use one method per model.")
    updates: dict[str, Any] = {"base_model_name_or_path": base_model_name(model)}
    if revision is not None:
        updates["revision"] = revision
    peft_config = dataclasses.replace(peft_config, **updates)
    wrapper_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(peft_config.task_type, PeftModel)
    if low_cpu_mem_usage and not peft_config.is_prompt_learning:
        warnings.warn(
            "get_peft_model(low_cpu_mem_usage=True): the new adapter's weights are on the meta device until "
            "set_peft_model_state_dict loads them; do not train or run the model before that.",
            stacklevel=2,
        )
    return wrapper_cls(
        model,
        peft_config,
        adapter_name=adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: Optional[Mapping[str, torch.Tensor]] = None,
) -> nn.Module:
    """Inject adapter layers into `model` in place, without a PeftModel wrapper; returns `model`.

    `low_cpu_mem_usage=True` creates the adapter tensors on the meta device; load them with
    `set_peft_model_state_dict(model, state_dict)`. With `state_dict`, the modules its keys name
    (`<module path>.<prefix>...`, e.g. `...q_proj.lora_A.weight`) are wrapped instead of those
    `target_modules` selects; a RuntimeWarning lists the modules where the two disagree (as peft).
    Only the keys are used.
    """
    if peft_config.is_prompt_learning:
        raise ConfigError("inject_adapter_in_model does not support prompt learning; use get_peft_model.")
    tuner_cls = method_spec(peft_config.peft_type).tuner_cls
    tuner = tuner_cls(
        model, peft_config, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict
    )
    return tuner.model


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """Build the right config class from a dict holding `peft_type`."""
    return PeftConfig.from_peft_type(**config_dict)
