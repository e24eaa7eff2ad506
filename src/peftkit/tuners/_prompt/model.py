"""`PromptLearningModel`: the tuner shared by prompt tuning, prefix tuning (P-tuning v2) and P-tuning.

It leaves the user's model untouched and owns one prompt encoder per adapter
(`self.prompt_encoder[name]`). Every task wrapper calls the same `forward` / `generate`, which
route the inputs through `inputs.py`; the methods differ only in their encoder (each method's subclass sets `encoder_cls`).
Checkpoints hold one tensor, `prompt_embeddings` (the encoder's output over all virtual tokens),
plus any trained classifier head.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, ClassVar, Iterator, Optional, Union

import torch
from torch import nn

from ...errors import AdapterStateError, CheckpointError, ConfigError
from ...utils.adapter_names import adapter_name_list
from ...utils.hf_compat import cache_argument, pop_cache, put_cache, rename_cache
from .._core.matching import key_matches
from .._core.size_limits import check_prompt_adapter_size
from .._core.tuner import BaseTuner
from .config import PromptLearningConfig, fill_from_model_config
from .inputs import prepare_forward_inputs, prepare_generation_step

PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"
_HEAD_PREFIXES = ("base_model.model.", "base_model.")


class PromptLearningModel(BaseTuner):
    """Holds the untouched base model (`.model`) and a prompt encoder per adapter (`.prompt_encoder`)."""

    prefix = "prompt_encoder"
    is_prompt_learning = True
    #: Each method's subclass names its encoder: `encoder_cls(config, word_embeddings)`.
    encoder_cls: ClassVar[Callable[[Any, nn.Module], nn.Module]]
    #: Encoder-decoder models: the table's second half also goes before the decoder input (`inputs.py`).
    prompts_the_decoder: ClassVar[bool] = False

    # ------------------------------------------------------------------ adapters
    def _prepare_adapter_config(self, config: PromptLearningConfig) -> PromptLearningConfig:
        return fill_from_model_config(config, self.model)

    def _check_new_adapter_config(self, config: PromptLearningConfig) -> None:
        if config.uses_kv_heads() and any(
            getattr(module, "gradient_checkpointing", False) for module in self.model.modules()
        ):
            raise ConfigError(
                f"{config.peft_type.value} (a prefix in the KV cache) does not work with gradient checkpointing; "
                "turn it off before adding the adapter."
            )

    def _inject(self, adapter_name: str, config: PromptLearningConfig) -> None:
        check_prompt_adapter_size(config, self.model)  # before anything is allocated or wrapped
        if "prompt_encoder" not in self._modules:
            self.prompt_encoder = nn.ModuleDict()
            self._prompts_enabled = True
        for key in [name for name, _ in self.model.named_modules() if name]:
            if key_matches(key, config.modules_to_save):
                self._wrap_module_to_save(key, adapter_name)
        encoder = self.encoder_cls(config, self.word_embeddings())
        device = self.word_embeddings().weight.device
        self.prompt_encoder[adapter_name] = encoder.to(device)

    def _remove_adapter_from_layers(self, adapter_name: str) -> None:
        super()._remove_adapter_from_layers(adapter_name)
        if "prompt_encoder" in self._modules and adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]

    def _mark_only_adapters_as_trainable(self) -> None:
        super()._mark_only_adapters_as_trainable()
        if "prompt_encoder" not in self._modules:
            return
        self.prompt_encoder.requires_grad_(False)
        if getattr(self, "_active_inference_mode", False):
            return
        for name in self.active_adapters:
            if name in self.prompt_encoder and not self.peft_config[name].inference_mode:
                encoder = self.prompt_encoder[name]
                encoder.requires_grad_(True)
                # Parts an encoder never trains (CPT's context, a cartridge's attention-sink tokens).
                for param in getattr(encoder, "frozen_parameters", tuple)():
                    param.requires_grad_(False)

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        if len(adapter_name_list(adapter_name, self.peft_config)) != 1:
            raise ConfigError(f"Prompt learning uses one adapter at a time; got {adapter_name!r}. Pass one name.")
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def _set_adapter_layers(self, enabled: bool) -> None:
        super()._set_adapter_layers(enabled)
        self._prompts_enabled = enabled

    def _enabled_flags(self) -> list[bool]:
        return [*super()._enabled_flags(), getattr(self, "_prompts_enabled", True)]

    def _check_merge_allowed(self) -> None:
        raise AdapterStateError("Prompt-learning adapters add virtual tokens, not weight deltas; they cannot be merged.")

    def word_embeddings(self) -> nn.Module:
        """The base model's input embedding table."""
        return self.model.get_input_embeddings()

    # ------------------------------------------------------------------ prompts
    def prompt_table(
        self, adapter_name: str, batch_size: int = 1, cast: bool = True, task_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The encoder's output over all virtual tokens, (batch_size, total, dim).

        With `cast`, prefixes take the model's dtype (prompts are cast where they meet the embeddings).
        `task_ids` (one task per row) is for methods whose prompt depends on the task; ignored here, as in peft.

        Computed once for a batch of one and repeated, so an LSTM encoder sees the whole sequence.
        """
        encoder = self.prompt_encoder[adapter_name]
        weight = encoder.embedding.weight
        indices = torch.arange(weight.shape[0], device=weight.device).unsqueeze(0)
        table = encoder(indices)
        dtype = getattr(self.model, "dtype", None)
        if cast and dtype is not None and table.dtype != dtype and self.peft_config[adapter_name].uses_kv_heads():
            table = table.to(dtype)
        return table.repeat(batch_size, 1, 1)

    def _active_prompt_adapter(self) -> Optional[str]:
        if not self._prompts_enabled or not self.active_adapters:
            return None
        return self.active_adapters[0]

    # ------------------------------------------------------------------ forward / generate
    def forward(self, input_ids: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        kwargs["input_ids"] = input_ids
        task_ids = kwargs.pop("task_ids", None)  # consumed here, never passed to the base model (as peft)
        name = self._active_prompt_adapter()
        if name is not None:
            kwargs = prepare_forward_inputs(self, name, kwargs, task_ids=task_ids)
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        with self._cache_reaches_backbone(kwargs):
            return self.model(**kwargs)

    @contextmanager
    def _cache_reaches_backbone(self, kwargs: dict[str, Any]) -> Iterator[None]:
        """Pass the KV cache under the name the model takes (`hf_compat`); heads whose forward
        takes none (e.g. BERT classifiers) get it on their backbone."""
        cache = pop_cache(kwargs)
        if cache is None:
            yield
            return
        if cache_argument(self.model) is not None:
            put_cache(kwargs, cache, self.model)
            yield
            return
        backbone, backbone_name = _backbone_of(self.model)
        handle = backbone.register_forward_pre_hook(
            lambda _module, args, module_kwargs: (args, {**module_kwargs, backbone_name: cache}), with_kwargs=True
        )
        try:
            yield
        finally:
            handle.remove()

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """`generate` of the base model, with the virtual tokens added on the first step."""
        task_ids = kwargs.pop("task_ids", None)
        name = self._active_prompt_adapter()
        if name is None:
            return self.model.generate(*args, **kwargs)
        config = self.peft_config[name]
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        if config.task_type == "SEQ_2_SEQ_LM" and not config.uses_kv_heads():
            # The encoder sees the prompt once; generate() then runs the decoder as usual.
            encoder_inputs = {k: kwargs.pop(k, None) for k in ("input_ids", "attention_mask", "inputs_embeds")}
            encoder_inputs = prepare_forward_inputs(self, name, encoder_inputs, task_ids=task_ids)
            kwargs.update({k: v for k, v in encoder_inputs.items() if v is not None})
        model = self.model
        original = model.prepare_inputs_for_generation
        had_instance_attribute = "prepare_inputs_for_generation" in model.__dict__

        def prepare_inputs_for_generation(*args: Any, **kwargs: Any) -> dict[str, Any]:
            # Every step, not only the first: transformers names the cache its own way (hf_compat).
            return rename_cache(prepare_generation_step(self, name, original(*args, **kwargs), task_ids), model)

        model.prepare_inputs_for_generation = prepare_inputs_for_generation
        try:
            return model.generate(*args, **kwargs)
        finally:
            if had_instance_attribute:
                model.prepare_inputs_for_generation = original
            else:
                del model.prepare_inputs_for_generation

    # ------------------------------------------------------------------ checkpoints
    def prompt_learning_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """peft's file content: `prompt_embeddings` (encoder output) and `base_model.<head>.<param>` tensors."""
        state = {PROMPT_EMBEDDINGS_KEY: self.saved_prompt_embeddings(adapter_name).detach().cpu()}
        state.update({key: tensor.detach().cpu() for key, tensor in self.encoder_tensors(adapter_name).items()})
        for key, tensor in self._head_tensors(adapter_name).items():
            state["base_model." + key] = tensor.detach()
        return state

    def saved_prompt_embeddings(self, adapter_name: str) -> torch.Tensor:
        """What the checkpoint's `prompt_embeddings` holds: the encoder's output over all virtual tokens."""
        return self.prompt_table(adapter_name, cast=False)[0]

    def encoder_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Encoder tensors saved besides `prompt_embeddings`, under their own top-level keys (none here;
        e.g. multitask prompt tuning's `prefix_task_cols`). Loading copies into these very tensors."""
        return {}

    def _head_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for name, module in self.adapter_modules():
            state.update(module.adapter_state(adapter_name, name))
        return state

    def load_prompt_learning_state_dict(
        self, incoming: dict[str, torch.Tensor], adapter_name: str, ignore_mismatched_sizes: bool = False
    ) -> tuple[list[str], list[str]]:
        """Copy a checkpoint into the adapter; returns (missing keys, unexpected keys)."""
        targets = {"base_model." + key: tensor for key, tensor in self._head_tensors(adapter_name).items()}
        own = self.encoder_tensors(adapter_name)
        targets.update(own)
        encoder = self.prompt_encoder[adapter_name]
        normalised = {}
        for key, tensor in incoming.items():
            bare = next((key[len(p):] for p in _HEAD_PREFIXES if key.startswith(p)), key)
            normalised[key if key == PROMPT_EMBEDDINGS_KEY or key in own else "base_model." + bare] = tensor
        missing = sorted(k for k in [PROMPT_EMBEDDINGS_KEY, *targets] if k not in normalised)
        unexpected = sorted(k for k in normalised if k != PROMPT_EMBEDDINGS_KEY and k not in targets)
        if PROMPT_EMBEDDINGS_KEY in normalised:
            if getattr(encoder, "prefix_projection", False) or getattr(encoder, "reparameterize", False):
                raise CheckpointError(
                    "Saved prompt_embeddings hold the encoder's output and cannot be loaded into a trainable "
                    "encoder; load the adapter with is_trainable=False (inference_mode=True)."
                )
            targets[PROMPT_EMBEDDINGS_KEY] = encoder.embedding.weight
        with torch.no_grad():
            for key, target in targets.items():
                if key not in normalised:
                    continue
                value = normalised[key]
                if value.shape != target.shape:
                    if ignore_mismatched_sizes:
                        continue
                    raise CheckpointError(
                        f"Shape mismatch for {key}: the checkpoint has {tuple(value.shape)}, the model expects "
                        f"{tuple(target.shape)}. Check num_virtual_tokens and that the adapter was trained on this base model."
                    )
                if key == PROMPT_EMBEDDINGS_KEY and hasattr(encoder, "load_prompt_embeddings"):
                    encoder.load_prompt_embeddings(value)  # an encoder that keeps the table in parts (cartridges)
                else:
                    target.copy_(value.to(target.dtype))
        return missing, unexpected


def _backbone_of(model: nn.Module) -> tuple[nn.Module, str]:
    """The first child that is itself a transformers model (e.g. `bert` of BertForSequenceClassification),
    and the name under which its forward takes the KV cache."""
    from transformers import PreTrainedModel

    for _, child in model.named_children():
        if isinstance(child, PreTrainedModel):
            name = cache_argument(child)
            if name is None:
                break
            return child, name
    raise ConfigError(
        f"{type(model).__name__} takes no KV cache (neither its forward nor its backbone's has a cache argument); "
        "prefix tuning needs one. Use prompt tuning or P-tuning with this model, or a model whose forward takes a cache."
    )
