r"""`XLoraModel`: X-LoRA (https://arxiv.org/abs/2402.07148), a mixture of LoRA experts with a learned router.

Every forward of the model runs twice:

    1. scaling pass  (no grad): the base model alone, output_hidden_states=True
    2. h = last hidden state  ->  scalings = classifier(h)        (batch, seq, L, E), see classifier.py
    3. real pass: every LoRA layer adds  g * sum_e s_e(t) * scaling_e * B_e A_e x   (layer.py)

The experts are ordinary LoRA adapters, loaded from the folders in `XLoraConfig.adapters` into
the model's LoRA layers (named as the dict's keys; peft uses "0", "1", ...) and frozen unless
`use_trainable_adapters`; the classifier is what trains. A forward pre-hook on the model runs
steps 1-2 for each of its forwards, so `generate` (with `use_cache=False`, which X-LoRA needs:
the scalings cover the whole sequence) routes every step.

Checkpoints are peft's: `save_pretrained` writes the X-LoRA config and the classifier
(`base_model.internal_xlora_classifier.*`) in the folder and each expert, as a LoRA adapter, in a
subfolder of its name. Not mergeable: the weights depend on the input.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional, Union

import torch
from torch import nn

from ...errors import AdapterNameError, AdapterStateError, ConfigError
from .._core.tuner import BaseTuner
from ..lora.model import LoraModel
from .classifier import XLoraClassifier
from .config import XLoraConfig
from .layer import xlora_forward, xlora_layers

CLASSIFIER = "internal_xlora_classifier"


class XLoraModel(BaseTuner):
    """The X-LoRA tuner (module docstring). `peft_config` holds the X-LoRA config and, under their
    names, the experts' LoRA configs (as in peft: each is saved as its own adapter)."""

    prefix = "internal_xlora_classifier"  # what its checkpoint keys hold (peft's registry says "xlora_")
    display_name = "X-LoRA"
    #: The last forward's scalings; True while the scaling pass runs; True inside disable_adapter().
    internal_xlora_scalings: Optional[torch.Tensor] = None
    in_scaling_pass = False
    disabled = False

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str = "default",
                 experts: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        """`experts`: {name: expert} as `checkpoint.experts.read_lora_experts` reads them (each has a
        `config` and `load_into(tuner, name)`); `PeftModel` / `get_peft_model` pass them."""
        object.__setattr__(self, "_experts", None)  # a LoraModel over the same model: not a submodule
        object.__setattr__(self, "_expert_sources", experts)
        super().__init__(model, peft_config, adapter_name, **kwargs)

    # ------------------------------------------------------------------ building
    def add_adapter(self, adapter_name: str, config: Any, low_cpu_mem_usage: bool = False,
                    state_dict: Optional[Any] = None) -> None:
        """Load the experts into the model's LoRA layers, route their layers, build the classifier."""
        if self.peft_config:
            raise AdapterNameError("An X-LoRA model holds one X-LoRA adapter; create another PeftModel for a second.")
        if not isinstance(config, XLoraConfig):
            raise TypeError(f"Expected 'XLoraConfig', got '{type(config).__name__}' instead.")
        if getattr(getattr(self.model, "config", None), "use_cache", False):
            raise ValueError("`use_cache` must be False")
        if not config.adapters:
            raise ConfigError("XLoraConfig.adapters is empty: pass {name: LoRA adapter folder} for each expert.")
        sources = self._expert_sources
        if sources is None or list(sources) != list(config.adapters):
            raise ConfigError("X-LoRA's experts are read from their folders by get_peft_model / PeftModel; build the "
                              "model with one of those (inject_adapter_in_model cannot load them).")
        experts = None
        try:
            for name, source in sources.items():
                source.config.inference_mode = False
                if experts is None:
                    experts = LoraModel(self.model, {name: source.config}, name, low_cpu_mem_usage=low_cpu_mem_usage)
                else:
                    experts.add_adapter(name, source.config, low_cpu_mem_usage=low_cpu_mem_usage)
                source.load_into(experts, name)
            experts.set_adapter(list(sources))
            layers = xlora_layers(self.model)
        except BaseException:
            if experts is not None:
                experts.unload()
            raise
        object.__setattr__(self, "_experts", experts)
        self.xlora_config = config
        self.peft_config[adapter_name] = config
        self.peft_config.update(experts.peft_config)
        self.targeted_module_names = list(experts.targeted_module_names)
        for number, layer in enumerate(layers):
            layer.forward = xlora_forward(self, layer, number)
        device = next(layers[0].adapter_params()).device
        dtype = next(self.model.parameters()).dtype
        self.internal_xlora_classifier = XLoraClassifier(config, len(config.adapters), len(layers), device, dtype)
        self._hook = self.model.register_forward_pre_hook(self._route, with_kwargs=True)
        self._mark_only_adapters_as_trainable()

    # ------------------------------------------------------------------ routing
    def _route(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Before each forward of the model: the scaling pass, then the classifier's scalings."""
        if self.in_scaling_pass or self.disabled:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        inputs_embeds = kwargs.get("inputs_embeds")
        self.in_scaling_pass = True
        try:
            with torch.no_grad():
                output = module(*args, **{**kwargs, "output_hidden_states": True, "return_dict": True})
        finally:
            self.in_scaling_pass = False
        self.internal_xlora_scalings = self.internal_xlora_classifier(
            output, input_ids=input_ids, inputs_embeds=inputs_embeds)
        return None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["use_cache"] = False  # every step's scalings cover the whole sequence
        return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ switching and training
    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """The X-LoRA adapter is the only one to activate; its experts stay active inside it."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if names != [self.xlora_name]:
            raise AdapterNameError(f"X-LoRA model: only its adapter {self.xlora_name!r} can be set, not {names}; "
                                   "the experts are always active together.")
        self.active_adapter = self.xlora_name
        self._active_inference_mode = bool(inference_mode)
        self._mark_only_adapters_as_trainable()

    @property
    def xlora_name(self) -> str:
        return next(name for name, config in self.peft_config.items() if isinstance(config, XLoraConfig))

    def _mark_only_adapters_as_trainable(self) -> None:
        """The classifier trains; the experts only with `use_trainable_adapters`; the base never."""
        self.model.requires_grad_(False)
        frozen = getattr(self, "_active_inference_mode", False) or self.xlora_config.inference_mode
        self.internal_xlora_classifier.requires_grad_(not frozen)
        if self.xlora_config.use_trainable_adapters and not frozen:
            for _, layer in self.tuner_layers():
                for param in layer.trainable_adapter_params(list(self.xlora_config.adapters)):
                    param.requires_grad_(True)

    def _set_adapter_layers(self, enabled: bool) -> None:
        self.disabled = not enabled
        for _, module in self.adapter_modules():
            module.enable_adapters(enabled)
        if enabled:
            self._mark_only_adapters_as_trainable()

    def _check_merge_allowed(self) -> None:
        raise AdapterStateError("X-LoRA cannot be merged: its experts' weights depend on each token's input.")

    def delete_adapter(self, adapter_name: str) -> None:
        raise AdapterStateError("X-LoRA's adapter and experts cannot be deleted one by one; use unload().")

    def _unload(self, merge: bool, progressbar: bool = False, safe_merge: bool = False,
                adapter_names: Optional[list[str]] = None) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        self._hook.remove()
        for _, layer in self.tuner_layers():
            vars(layer).pop("forward", None)
        return super()._unload(merge=False, progressbar=progressbar)

    # ------------------------------------------------------------------ checkpoints
    def extra_adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The classifier's tensors, under pseudo-keys of the model prefix (renamed on save / load)."""
        if adapter_name != self.xlora_name:
            return {}
        return {f"{CLASSIFIER}.{key}": value for key, value in self.internal_xlora_classifier.state_dict(keep_vars=True).items()}

    def state_for_save(self, adapter_name: str, state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """peft's keys: `base_model.internal_xlora_classifier.*` (the classifier hangs on the tuner)."""
        if adapter_name != self.xlora_name:
            return state
        return {_tuner_key(key, prefix): value for key, value in state.items()}

    def checkpoint_for_load(self, adapter_name: str, state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        if adapter_name != self.xlora_name:
            return state
        # peft's `base_model.internal_xlora_classifier.*` arrives as `<prefix>base_model.internal_...` (every
        # key gets the model prefix) or as written; both mean the classifier's pseudo-keys.
        renamed = {}
        for key, value in state.items():
            bare = key.removeprefix(prefix).removeprefix("base_model.")
            renamed[prefix + bare if bare.startswith(CLASSIFIER) else key] = value
        live = self.extra_adapter_state(adapter_name)
        missing = [key for key in live if prefix + key not in renamed]
        if missing:
            warnings.warn(
                f"The X-LoRA checkpoint lacks classifier tensors {missing}: they keep their initial values. peft "
                "0.21.2 leaves out the classifier layers whose key contains an expert's name (e.g. 'layers.0' with an "
                "expert named '0'); retrain the classifier, or save it with peftkit.",
                stacklevel=4,
            )
            for key in missing:
                renamed[prefix + key] = live[key].detach().clone()
        return renamed

    # ------------------------------------------------------------------ peft's X-LoRA API
    def set_topk_lora(self, value: Optional[int]) -> None:
        """Use only the top-k experts per token (None: all); kept in the config."""
        self.internal_xlora_classifier.config.top_k_lora = value

    def set_global_scaling_weight(self, weight: float) -> None:
        self.internal_xlora_classifier.config.global_scaling_weight = weight

    def set_scaling_pass_value(self, value: Optional[float]) -> None:
        """The scaling pass's expert weight (None: 1 / number of experts)."""
        self.internal_xlora_classifier._set_override_scaling_pass_value(value)

    def get_global_scaling_weight(self) -> float:
        return self.internal_xlora_classifier.config.global_scaling_weight

    def get_latest_scalings(self) -> Optional[torch.Tensor]:
        """The last forward's scalings, (batch, seq, n_layers, n_experts), or None before any."""
        return self.internal_xlora_scalings

    def get_scalings_log(self) -> list[torch.Tensor]:
        return list(self.internal_xlora_classifier.log_scalings)

    def enable_scalings_logging(self) -> None:
        self.internal_xlora_classifier.scalings_logging = True

    def disable_scalings_logging(self) -> None:
        self.internal_xlora_classifier.scalings_logging = False

    def clear_scalings_log(self) -> None:
        self.internal_xlora_classifier.log_scalings.clear()

    def get_bucketed_scalings_log(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        return self.internal_xlora_classifier._get_bucketed_scalings()


def _tuner_key(key: str, prefix: str) -> str:
    """`base_model.model.internal_xlora_classifier.x` -> `base_model.internal_xlora_classifier.x`."""
    if key.startswith(prefix + CLASSIFIER):
        return prefix.removesuffix("model.") + key[len(prefix):]
    return key


def expert_locations(config: XLoraConfig, model_id: Union[str, os.PathLike], adapters: Optional[dict[str, str]]) -> dict[str, str]:
    """Where the experts of a saved X-LoRA adapter are: `adapters` if given (peft's keyword), else
    the subfolders of `model_id` named after them (what save_pretrained writes), else the saved paths."""
    if adapters is not None:
        return dict(adapters)
    folder = os.fspath(model_id)
    found = {name: os.path.join(folder, name) for name in config.adapters
             if os.path.isfile(os.path.join(folder, name, "adapter_config.json"))}
    return found if len(found) == len(config.adapters) else dict(config.adapters)

