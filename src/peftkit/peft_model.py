"""`PeftModel` and its task wrappers: a frozen base model plus named adapters, peft's public API.

`PeftModel.base_model` is the method's tuner (e.g. `LoraModel`), whose `.model` is the user's
model with adapter layers injected; checkpoint keys therefore start with `base_model.model.`.
Task wrappers differ only in the heads they train in full and in their forward signature (which
`transformers.Trainer` reads to pick dataset columns).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Optional, Union

import torch
from torch import nn

from .checkpoint.adapter_folder import adapter_config_to_save, read_adapter, read_adapter_weights, write_adapter
from .checkpoint.io import hub_kwargs_of
from .checkpoint.state_dict import get_peft_model_state_dict, set_peft_model_state_dict
from .config import PeftConfig
from .errors import AdapterNameError, CheckpointError, ConfigError
from .registry import method_spec
from .tuners._core.base_journal import restoring_base_weights_on_failure
from .tuners._core.call_state import call_scope
from .utils.adapter_names import validate_adapter_name
from .utils.constants import CLASSIFIER_MODULE_NAMES, QA_MODULE_NAMES
from .utils.hf_compat import enable_activation_checkpointing
from .utils.peft_types import PeftType, TaskType



class PeftModel(nn.Module):
    """Base model + adapters. Build with `get_peft_model` or load with `PeftModel.from_pretrained`."""

    #: Heads trained in full for this task (added to `modules_to_save`, as peft does).
    task_modules_to_save: tuple[str, ...] = ()

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        validate_adapter_name(adapter_name)
        peft_config = self._with_task_modules(peft_config)
        self.peft_type = peft_config.peft_type
        self.special_peft_forward_args = {"adapter_names"}
        tuner_cls = method_spec(peft_config.peft_type).tuner_cls
        on_meta = _on_meta(peft_config, low_cpu_mem_usage)
        extra: dict[str, Any] = {}
        if peft_config.peft_type == PeftType.XLORA:  # X-LoRA mixes saved LoRA adapters: read them here
            from .checkpoint.experts import read_lora_experts

            extra["experts"] = read_lora_experts(peft_config.adapters)
        self.base_model = tuner_cls(model, {adapter_name: peft_config}, adapter_name, low_cpu_mem_usage=on_meta, **extra)
        self.base_model.cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if _is_checkpointing(model):
            self._enable_input_require_grads()

    def __getattr__(self, name: str) -> Any:
        """Attributes PeftModel lacks come from the tuner, then the base model (`.config`, ...)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ adapters
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapters[0]]

    def get_base_model(self) -> nn.Module:
        """The user's model (with adapter layers injected)."""
        return self.base_model.model

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """The names every adapter trains in full (`modules_to_save` of all configs), None when there are none."""
        names = {name for config in self.peft_config.values() for name in getattr(config, "modules_to_save", None) or ()}
        return names or None

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Turn gradients of the named adapters' tensors on (default) or off, leaving the others as they are.

        Unlike `set_adapter`, this does not change which adapters are active (e.g. to train an
        inactive adapter's tensors too). Not for prompt learning (as peft: a TypeError).
        """
        if self.active_peft_config.is_prompt_learning:
            raise TypeError(
                "Setting `requires_grad` is not supported for prompt learning methods like "
                f"{self.active_peft_config.peft_type.value}."
            )
        self.base_model.set_requires_grad(adapter_names, requires_grad=requires_grad)

    def _with_task_modules(self, config: PeftConfig) -> PeftConfig:
        if not self.task_modules_to_save or not hasattr(config, "modules_to_save"):
            return config
        names = list(config.modules_to_save or [])
        names += [name for name in self.task_modules_to_save if name not in names]
        return dataclasses.replace(config, modules_to_save=names)

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new (inactive) adapter; on failure the model is unchanged.

        `low_cpu_mem_usage=True` creates its tensors on the meta device, for weights loaded next
        (`set_peft_model_state_dict`); `autocast_adapter_dtype=False` keeps them in the dtype of
        fp16/bf16 base layers instead of fp32.
        """
        if str(peft_config.peft_type) != str(self.peft_type):
            raise ConfigError(
                f"Cannot add a {peft_config.peft_type} adapter to a {self.peft_type} model; "
                "one PeftModel holds adapters of one method."
            )
        on_meta = _on_meta(peft_config, low_cpu_mem_usage)
        self.base_model.add_adapter(adapter_name, self._with_task_modules(peft_config), low_cpu_mem_usage=on_meta)
        self.base_model.cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        self.base_model.set_adapter(self.active_adapters)

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activate `adapter_name`; with `inference_mode=True` it stays frozen (requires_grad False), as in peft.

        An adapter whose config has `inference_mode` set (loaded with `is_trainable=False`) stays frozen too.
        """
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: inside it the model computes the base model's output."""
        with self.base_model._adapters_disabled():
            yield

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[list[str]] = None
    ) -> nn.Module:
        return self.base_model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as peft counts them."""
        trainable = total = 0
        for param in self.parameters():
            count = param.numel() * getattr(param, "peftkit_numel_factor", 1)
            total += count
            if param.requires_grad:
                trainable += count
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ training helpers
    def _enable_input_require_grads(self) -> None:
        """Make the embeddings' output require grad, so reentrant checkpointing reaches the adapters."""
        model = self.get_base_model()
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings"):
            model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None, **kwargs: Any) -> None:
        """Turn on activation checkpointing in the base model, with gradients reaching the adapters.

        Same signature as transformers 5's `PreTrainedModel.activation_checkpointing_enable`
        (extra keywords such as `every_n_layers` pass through).
        """
        enable_activation_checkpointing(self.get_base_model(), activation_checkpointing_kwargs, **kwargs)
        self._enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None, **kwargs: Any) -> None:
        """peft's / transformers 4's name for `activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._call_context(args, kwargs):
            return self.base_model(*args, **kwargs)

    def _forward_named(self, **kwargs: Any) -> Any:
        """Call the base model with the named arguments that were given (None ones dropped)."""
        with self._call_context((), kwargs):
            return self.base_model(**{k: v for k, v in kwargs.items() if v is not None})

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """`generate` of the base model; `adapter_names=[...]` picks an adapter per row."""
        with self._call_context(args, kwargs):
            return self.base_model.generate(*args, **kwargs)  # prompt learning adds its virtual tokens

    @contextmanager
    def _call_context(self, args: tuple, kwargs: dict[str, Any]) -> Iterator[None]:
        """Per-call state, popped from `kwargs` on entering: `adapter_names` (a per-row adapter, for methods
        with "mixed_batch") and what the tuner reads per call (`per_call_context`, e.g. LoRA's `alora_offsets`).

        The state travels with the call (`tuners/_core/call_state.py`: per thread, seen by generate's
        forwards), never on the shared layers, so one model can serve concurrent calls."""
        adapter_names = kwargs.pop("adapter_names", None)
        with ExitStack() as stack:
            if adapter_names is None:  # this call is no mixed batch, even inside another model's mixed call
                stack.enter_context(call_scope(adapter_names=None))
            else:
                spec = method_spec(self.peft_type)
                if "mixed_batch" not in spec.capabilities:
                    raise ConfigError(
                        f"adapter_names (mixed-adapter batches) is not supported for {spec.display_name} adapters."
                    )
                stack.enter_context(self.base_model.mixed_batch(adapter_names))
            per_call = getattr(self.base_model, "per_call_context", None)
            if per_call is not None:
                stack.enter_context(per_call(args, kwargs))
            yield

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory: str,
        safe_serialization: bool = True,
        selected_adapters: Optional[list[str]] = None,
        save_embedding_layers: Union[str, bool] = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as `adapter_config.json` + `adapter_model.safetensors` (peft's layout).

        Adapter "default" goes in `save_directory`, any other adapter `X` in `save_directory/X`.
        Only the main process writes (`is_main_process`); every file is written atomically.
        """
        if os.path.isfile(save_directory):
            raise CheckpointError(f"save_directory {save_directory!r} is a file; pass a directory path.")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        self.base_model._check_adapter_exists(names)
        for name in names:
            validate_adapter_name(name)
            state = get_peft_model_state_dict(
                self, state_dict=kwargs.get("state_dict"), adapter_name=name, save_embedding_layers=save_embedding_layers
            )
            if not is_main_process:
                continue
            fields = adapter_config_to_save(self.peft_config[name], self.get_base_model())
            state, fields = self.base_model.prepare_save(
                name,
                state,
                fields,
                path_initial_model_for_weight_conversion=path_initial_model_for_weight_conversion,
                read_weights=read_adapter_weights,
            )
            out_dir = save_directory if name == "default" else os.path.join(save_directory, name)
            write_adapter(out_dir, fields, state, safe_serialization, model_card=self._model_card_info())

    def _model_card_info(self) -> Any:
        """What the `README.md` beside a saved adapter says (see `checkpoint.model_card`)."""
        from .checkpoint.model_card import model_card_info

        return model_card_info(
            self.get_base_model(), self.active_peft_config.peft_type, causal_lm=isinstance(self, PeftModelForCausalLM)
        )

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Write or update `output_dir/README.md` with peft's metadata (`save_pretrained` does this itself)."""
        from .checkpoint.model_card import README_NAME, model_card_text, read_existing_card
        from .utils.files import atomic_write_text

        os.makedirs(output_dir, exist_ok=True)
        text = model_card_text(self._model_card_info(), read_existing_card(output_dir))
        atomic_write_text(os.path.join(output_dir, README_NAME), text)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: Optional[str] = None,
        commit_description: Optional[str] = None,
        private: Optional[bool] = None,
        token: Union[bool, str, None] = None,
        revision: Optional[str] = None,
        create_pr: bool = False,
        max_shard_size: Union[int, str, None] = "50GB",
        tags: Optional[list[str]] = None,
        **save_kwargs: Any,
    ) -> Any:
        """Upload the adapter folder `save_pretrained` writes to the hub repo `repo_id` (created if missing).

        transformers' `PushToHubMixin.push_to_hub` signature, which peft inherits; `save_kwargs`
        (`selected_adapters`, `safe_serialization`, ...) go to `save_pretrained`, and `tags` are added to
        the model card. `max_shard_size` is accepted for compatibility (adapters are one file).
        Refuses with `OfflineModeIsEnabled` when `HF_HUB_OFFLINE` is set. Returns the commit info.
        """
        from .checkpoint.hub import push_adapter_folder

        return push_adapter_folder(
            lambda folder: self.save_pretrained(folder, **save_kwargs),
            repo_id,
            commit_message=commit_message,
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            tags=tags,
        )

    # ------------------------------------------------------------------ status
    def get_layer_status(self) -> list[Any]:
        """One `TunerLayerStatus` per adapter layer (name, type, enabled, active / merged / available
        adapters, requires_grad and devices per adapter, quantization backend), as peft reports it."""
        from .status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self) -> Any:
        """`TunerModelStatus`: the adapter state of the whole model ("irregular" where layers disagree)."""
        from .status import get_model_status

        return get_model_status(self)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: Union[str, os.PathLike],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[PeftConfig] = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> "PeftModel":
        """Wrap `model` and load an adapter saved by peftkit or peft (local folder or hub id).

        `low_cpu_mem_usage=True` creates the adapter on the meta device and assigns the loaded
        tensors to it (no random init first); `autocast_adapter_dtype=False` keeps the adapter in
        the dtype of fp16/bf16 base layers instead of fp32. Keywords: hub arguments (`revision`,
        `subfolder`, `token`, ...) and `torch_device` (see `load_adapter`).
        """

        expert_folders = kwargs.pop("adapters", None)  # X-LoRA's experts (peft's keyword)

        def build(loaded: PeftConfig) -> PeftModel:
            if hasattr(loaded, "runtime_config"):  # peft's LoRA run-time option (see LoraRuntimeConfig)
                loaded.runtime_config.ephemeral_gpu_offload = ephemeral_gpu_offload
            if str(loaded.peft_type) == PeftType.XLORA.value:
                from .tuners.xlora.model import expert_locations

                loaded.adapters = expert_locations(loaded, model_id, expert_folders)
            wrapper_cls = cls if cls is not PeftModel else MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(loaded.task_type, PeftModel)
            return wrapper_cls(
                model, loaded, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage
            )

        return _load(build, model_id, adapter_name, is_trainable, config, kwargs)[0]

    def load_adapter(
        self,
        model_id: Union[str, os.PathLike],
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: Optional[str] = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Load another adapter into this model under `adapter_name` (it stays inactive).

        If anything fails (bad config, missing file, shape mismatch) the model is left unchanged.
        `torch_device` is the device the checkpoint's tensors are read onto (default "cpu"); they end
        up where the adapter lives (the base layers' device), as in peft. Other options as `from_pretrained`.
        """
        validate_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterNameError(f"An adapter named {adapter_name!r} is loaded already; pick another name.")

        def build(loaded: PeftConfig) -> PeftModel:
            self.add_adapter(
                adapter_name, loaded, low_cpu_mem_usage=low_cpu_mem_usage, autocast_adapter_dtype=autocast_adapter_dtype
            )
            return self

        kwargs = {**kwargs, "torch_device": torch_device}
        return _load(build, model_id, adapter_name, is_trainable, None, kwargs)[1]


def _load(
    build: Callable[[PeftConfig], PeftModel],
    model_id: Union[str, os.PathLike],
    adapter_name: str,
    is_trainable: bool,
    config: Optional[PeftConfig],
    kwargs: dict[str, Any],
) -> tuple[PeftModel, Any]:
    """What `from_pretrained` and `load_adapter` share: read the adapter (config unless given, and
    weights: one location, one set of hub arguments), check the config, `build(config)` (inject it),
    load the weights -- removing the adapter again if that fails -- and switch to eval unless trainable.

    A `config` given is kept, as in peft: `peft_config[adapter_name] is config` afterwards, with
    `inference_mode = not is_trainable` and the fields the model resolves (target_modules, ...) set on it.
    """
    validate_adapter_name(adapter_name)
    if config is not None and not isinstance(config, PeftConfig):
        raise ConfigError(f"The input config must be a PeftConfig, got {config.__class__}")
    given = config
    checkpoint = read_adapter(
        model_id, read_config=config is None, device=kwargs.get("torch_device"), **hub_kwargs_of(kwargs)
    )
    config = PeftConfig.from_dict(checkpoint.config) if config is None else config
    if config.is_prompt_learning and is_trainable:
        raise ConfigError("Cannot set a prompt learning adapter to trainable when loading pretrained adapter.")
    with restoring_base_weights_on_failure():  # an init such as PiSSA rewrote base weights: put them back too
        peft_model = build(dataclasses.replace(config, inference_mode=not is_trainable))
        try:
            if given is not None:
                # The model holds a resolved copy; move its fields onto the caller's object and keep that one.
                given.__dict__.update(vars(peft_model.peft_config[adapter_name]))
                peft_model.peft_config[adapter_name] = given
            result = set_peft_model_state_dict(
                peft_model,
                checkpoint.weights,
                adapter_name=adapter_name,
                strict=True,
                ignore_mismatched_sizes=bool(kwargs.get("ignore_mismatched_sizes", False)),
            )
        except BaseException:
            peft_model.base_model.delete_adapter(adapter_name)
            raise
    if not is_trainable:
        peft_model.eval()
    return peft_model, result


def _on_meta(config: PeftConfig, low_cpu_mem_usage: bool) -> bool:
    """Whether a new adapter is created on the meta device: prompt learning never is (as in peft)."""
    return low_cpu_mem_usage and not config.is_prompt_learning


def _is_checkpointing(model: nn.Module) -> bool:
    flag = getattr(type(model), "is_activation_checkpointing", None)
    if flag is not None:
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


# ---------------------------------------------------------------------- task wrappers
class _TaskModel(PeftModel):
    """Most tasks share one forward signature: ids, mask, embeddings, labels (read by `Trainer`)."""

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> Any:
        return self._forward_named(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels, **kwargs
        )


class PeftModelForCausalLM(_TaskModel):
    """Decoder-only language models (`AutoModelForCausalLM`)."""


class PeftModelForSequenceClassification(_TaskModel):
    """Sequence classification: the `classifier` / `score` head is trained in full and saved."""

    task_modules_to_save = CLASSIFIER_MODULE_NAMES


class PeftModelForTokenClassification(_TaskModel):
    """Token classification: the `classifier` / `score` head is trained in full and saved."""

    task_modules_to_save = CLASSIFIER_MODULE_NAMES


class PeftModelForFeatureExtraction(_TaskModel):
    """Encoders used for embeddings (`AutoModel`)."""


class PeftModelForSeq2SeqLM(PeftModel):
    """Encoder-decoder models (`AutoModelForSeq2SeqLM`, e.g. T5)."""

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        decoder_input_ids: Optional[torch.Tensor] = None,
        decoder_attention_mask: Optional[torch.Tensor] = None,
        decoder_inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> Any:
        return self._forward_named(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            decoder_inputs_embeds=decoder_inputs_embeds,
            labels=labels,
            **kwargs,
        )


class PeftModelForQuestionAnswering(PeftModel):
    """Extractive QA: the `qa_outputs` head is trained in full and saved."""

    task_modules_to_save = QA_MODULE_NAMES

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        start_positions: Optional[torch.Tensor] = None,
        end_positions: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> Any:
        return self._forward_named(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            start_positions=start_positions,
            end_positions=end_positions,
            **kwargs,
        )


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}
