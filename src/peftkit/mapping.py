"""Entry points: `get_peft_model`, `inject_adapter_in_model`, `get_peft_config`, and peft's public
`PEFT_TYPE_TO_*_MAPPING` tables (read-only views of the registry)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional

import torch
from torch import nn

from .checkpoint.adapter_folder import base_model_name
from .config import PeftConfig
from .errors import ConfigError
from .peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel
from .registry import MethodSpec, method_spec, registered_methods
from .utils.peft_types import PeftType


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
        from .mixed_model import PeftMixedModel

        return PeftMixedModel(model, dataclasses.replace(peft_config, base_model_name_or_path=base_model_name(model)),
                              adapter_name=adapter_name)
    updates: dict[str, Any] = {"base_model_name_or_path": base_model_name(model)}
    if revision is not None:
        updates["revision"] = revision
    peft_config = dataclasses.replace(peft_config, **updates)
    wrapper_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(peft_config.task_type, PeftModel)
    eva_init = getattr(peft_config, "init_lora_weights", None) == "eva" and str(peft_config.peft_type) == "LORA"
    if eva_init and not low_cpu_mem_usage:
        warnings.warn(  # as peft: EVA's statistics pass never needs the adapter's weights
            "lora with eva initialization used with low_cpu_mem_usage=False. Setting low_cpu_mem_usage=True can "
            "improve the maximum batch size possible for eva initialization.",
            stacklevel=2,
        )
    if low_cpu_mem_usage and not peft_config.is_prompt_learning and not eva_init:
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
    if getattr(tuner_cls, "uses_shared_state", False):  # e.g. VeRA's projections live on the tuner
        raise ConfigError(
            f"`inject_adapter_in_model` does not support {peft_config.peft_type} because it uses shared state "
            "stored on the tuner. Please use `get_peft_model` instead."
        )
    tuner = tuner_cls(
        model, peft_config, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict
    )
    return tuner.model


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """Build the right config class from a dict holding `peft_type`."""
    return PeftConfig.from_peft_type(**config_dict)


# ---------------------------------------------------------------------- peft's public mappings
class RegistryMapping(Mapping):
    """A read-only `peft_type -> value` view of the registry (peft's `PEFT_TYPE_TO_*_MAPPING` dicts).

    Filled lazily: a lookup imports only the method asked for; iterating imports every built-in
    method. Methods registered later (`register_method`) appear too. Keys are `PeftType` members
    (plain strings for third-party methods); `"LORA"` and `PeftType.LORA` find the same entry.
    """

    def __init__(self, name: str, value: Callable[[MethodSpec], Any], include: Callable[[MethodSpec], bool] = lambda _: True):
        self._name = name
        self._value = value
        self._include = include

    @staticmethod
    def _key(spec: MethodSpec) -> Any:
        try:
            return PeftType(spec.peft_type)
        except ValueError:
            return spec.peft_type

    def __getitem__(self, peft_type: Any) -> Any:
        try:
            spec = method_spec(peft_type)
        except ConfigError:
            raise KeyError(peft_type) from None
        if not self._include(spec):
            raise KeyError(peft_type)
        return self._value(spec)

    def __iter__(self) -> Iterator[Any]:
        return iter([self._key(spec) for spec in registered_methods() if self._include(spec)])

    def __len__(self) -> int:
        return sum(1 for spec in registered_methods() if self._include(spec))

    def __repr__(self) -> str:
        return f"{self._name}({dict(self)!r})"


#: peft_type -> config class (`LoraConfig`, ...).
PEFT_TYPE_TO_CONFIG_MAPPING: Mapping[Any, type] = RegistryMapping("PEFT_TYPE_TO_CONFIG_MAPPING", lambda s: s.config_cls)
#: peft_type -> tuner class (`LoraModel`, ...; prompt-learning methods: their prompt tuner).
PEFT_TYPE_TO_TUNER_MAPPING: Mapping[Any, type] = RegistryMapping("PEFT_TYPE_TO_TUNER_MAPPING", lambda s: s.tuner_cls)
#: peft_type -> checkpoint-key prefix of the method's tensors (`"lora_"`, ...).
PEFT_TYPE_TO_PREFIX_MAPPING: Mapping[Any, str] = RegistryMapping("PEFT_TYPE_TO_PREFIX_MAPPING", lambda s: s.prefix)
#: peft_type -> tuner class usable in a `PeftMixedModel` (LoRA, LoHa, LoKr; see mixed_model.py).
PEFT_TYPE_TO_MIXED_MODEL_MAPPING: Mapping[Any, type] = RegistryMapping(
    "PEFT_TYPE_TO_MIXED_MODEL_MAPPING", lambda s: s.tuner_cls,
    include=lambda s: str(s.peft_type) in ("LORA", "LOHA", "LOKR"),
)
