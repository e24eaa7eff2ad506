"""`ShadowModel`: the ShadowPEFT tuner -- a small trainable shadow network riding a frozen decoder.

Per call, for the active adapter a:

    s0 = projection_a(backbone_a(x))                  (model pre-hook; backbone fed the base embeddings
                                                        when `share_embeddings` and the widths allow)
    for each wrapped block l (consecutive):  (h, s) -> ShadowLayer_l -> (h', s')   (see layers.py)
    loss = task_loss + auxiliary_loss_weight * loss(head_a(s0), labels)            (when labels are given)

The tuner holds what is per adapter but not per block: `shadow_backbone[a]`, `shadow_projection[a]`
(a bias-free Linear when the backbone is narrower, else Identity) and, for sequence
classification, `shadow_head[a]` (a trained copy of the classifier); a causal LM's shadow head
is the base model's output layer. Checkpoints are peft's, the adapter segment always `default`:

    base_model.model.<block>.shadow_down.default.weight          (per block, see layers.py)
    base_model.shadow_backbone.default.<backbone state dict key>
    base_model.shadow_projection.default.weight                   (a narrower backbone only)
    base_model.shadow_head.default.<head state dict key>          (sequence classification only)

With `use_cache=True` the model returns a `ShadowCache` (base cache, backbone cache), so
`generate` advances both. One adapter is active at a time; nothing merges (the update depends on
the input, it is no weight delta).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from copy import deepcopy
from typing import Any, Optional, Union

import torch
from torch import nn

from ...errors import ConfigError, NotMergeableError, TargetModulesError
from ...utils.adapter_names import adapter_name_list
from ...utils.hf_compat import CACHE_ARGUMENT_NAMES, get_cache, output_cache_name, put_cache
from ...utils.peft_types import TaskType
from .._core.matching import is_targeted
from .._core.modules_to_save import ModulesToSaveWrapper
from .._core.tuner import BaseTuner
from .._core.tuner_keys import TUNER_KEY_PREFIX, tuner_keys_as_peft
from .backbone import build_mirror_backbone, decoder_block_names, hidden_size, is_diffusers_model
from .cache import ShadowCache
from .config import ShadowConfig
from .detached import DetachedShadowModel, last_token, sequence_classification_loss, shifted_lm_loss
from .layers import CHECKPOINT_ADAPTER, ShadowLayer, ShadowRun, dispatch_shadow

#: The tuner's per-adapter containers (saved under `base_model.<name>.default.`).
CONTAINERS = ("shadow_backbone", "shadow_projection", "shadow_head")

NOT_MERGEABLE = (
    "ShadowPEFT cannot be merged into the base model: the adaptation is an input-dependent, layer-space "
    "trajectory, not a static weight-space delta. Use `unload()` to recover the plain base model, or "
    "`unload_shadow()` for a standalone shadow model."
)


class ShadowModel(BaseTuner):
    """Creates ShadowPEFT adapters on a decoder-only transformers model (see the module docstring).

    Usually built through `get_peft_model(model, ShadowConfig(task_type="CAUSAL_LM"))`. After a
    call with labels, `last_shadow_loss` (and the output's `shadow_loss`) holds the shadow path's
    own loss, detached, for logging.
    """

    prefix = "shadow_"
    layer_cls = ShadowLayer
    dispatchers = (dispatch_shadow,)
    display_name = "ShadowPEFT"
    supported_layers = "whole decoder blocks (consecutive entries of the model's block list)"
    # As peft: not flagged, so `inject_adapter_in_model` works; the model's hooks keep the tuner (and
    # with it the backbone) alive. Its state dict then holds the block tensors only.
    uses_shared_state = False

    # ------------------------------------------------------------------ adding adapters
    def _prepare_adapter_config(self, config: ShadowConfig) -> ShadowConfig:
        """None target_modules: every decoder block (the shadow state rides the whole loop); the model
        kind was refused in `add_adapter` already."""
        if config.target_modules is None:
            config = dataclasses.replace(config, target_modules=set(decoder_block_names(self.model)))
        return config

    def _check_new_adapter_config(self, config: ShadowConfig) -> None:
        if self.peft_config and TaskType.SEQ_CLS in {config.task_type, *(c.task_type for c in self.peft_config.values())}:
            raise ConfigError(
                "ShadowPEFT does not support multiple adapters when any adapter uses sequence classification because "
                "the sequence classification adapter requires both a classifier in `modules_to_save` and a separate "
                "`shadow_head`."
            )
        _check_consecutive_blocks(self.model, config)

    def add_adapter(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        """Build the adapter's backbone / projection / head, then wrap its blocks; a failure removes all."""
        self._ensure_state()
        fresh = adapter_name not in self.peft_config
        if fresh and isinstance(config, ShadowConfig):
            _refuse_model(self.model)
            self._build_shadow_network(adapter_name, config)
        try:
            super().add_adapter(adapter_name, config, **kwargs)
        except BaseException:
            if fresh:
                self._drop_shadow_network(adapter_name)
            raise
        self._mark_boundaries()
        if not self._hooks:  # once the model holds a shadow adapter: s0 before the call, the cache after
            self._hooks = [
                self.model.register_forward_pre_hook(self._begin_call, with_kwargs=True),
                self.model.register_forward_hook(self._end_call, with_kwargs=True),
            ]

    def layer_kwargs(self, config: ShadowConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {
            "r": config.r,
            "shadow_alpha": config.shadow_alpha,
            "shadow_dropout": config.shadow_dropout,
            "init_weights": config.init_weights,
            "update_hidden_size": config.update_hidden_size,
        }

    def new_layer_kwargs(self, config: ShadowConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {"hidden_size": hidden_size(self.model.config), "run": self._run}

    def _ensure_state(self) -> None:
        """The containers and the per-call state (created with the first adapter)."""
        if "shadow_backbone" in self._modules:
            return
        for name in CONTAINERS:
            setattr(self, name, nn.ModuleDict())
        self._run = ShadowRun()
        self._shares_embeddings: dict[str, bool] = {}
        self._entries: dict[str, ShadowLayer] = {}
        self.last_shadow_loss: Optional[torch.Tensor] = None
        self._hooks: list[Any] = []

    def _build_shadow_network(self, adapter_name: str, config: ShadowConfig) -> None:
        """backbone (mirror or pretrained), projection to the base width, and the task head.

        Built in peft's order (backbone, projection, head, then the blocks), so one seed gives
        the same fresh adapter in both libraries.
        """
        base_width = hidden_size(self.model.config)
        if config.shadow_model == "mirror":
            backbone, projection = build_mirror_backbone(self.model, config), None
        else:
            backbone, projection = _load_pretrained_backbone(config.shadow_model)
        width = hidden_size(backbone.config)
        if projection is not None and (projection.in_features, projection.out_features) != (width, base_width):
            raise ConfigError(
                f"The loaded shadow projection maps {projection.in_features}->{projection.out_features}, but the "
                f"shadow/base hidden sizes are {width}/{base_width}."
            )
        if projection is None:
            projection = nn.Linear(width, base_width, bias=False) if width != base_width else nn.Identity()
        share = (
            config.share_embeddings
            and config.shadow_model == "mirror"
            and width == base_width
            and "inputs_embeds" in inspect.signature(backbone.forward).parameters
        )
        if share and isinstance(getattr(backbone, "embed_tokens", None), nn.Module):
            del backbone.embed_tokens  # fed the frozen base embeddings instead
        head = self._copy_classifier() if config.task_type == TaskType.SEQ_CLS else None
        reference = self._base_tensor()
        for module in (backbone, projection, head):
            if module is not None and reference is not None:
                module.to(device=reference.device, dtype=reference.dtype)
        self.shadow_backbone[adapter_name] = backbone
        self.shadow_projection[adapter_name] = projection
        if head is not None:
            self.shadow_head[adapter_name] = head
        self._shares_embeddings[adapter_name] = share

    def _copy_classifier(self) -> Optional[nn.Module]:
        """A trainable copy of the model's `score` / `classifier` head (the shadow path's own head)."""
        for attr in ("score", "classifier"):
            head = getattr(self.model, attr, None)
            if isinstance(head, ModulesToSaveWrapper):
                head = head.original_module
            if isinstance(head, nn.Module):
                return deepcopy(head)
        return None

    def _base_tensor(self) -> Optional[torch.Tensor]:
        """Where and in which dtype the shadow network lives: the base model's input embeddings'."""
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        weight = getattr(embeddings, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            return weight
        return next((p for p in self.model.parameters() if p.is_floating_point()), None)

    def _drop_shadow_network(self, adapter_name: str) -> None:
        for name in CONTAINERS:
            container = self._modules[name]
            if adapter_name in container:
                del container[adapter_name]
        self._shares_embeddings.pop(adapter_name, None)

    def _mark_boundaries(self) -> None:
        """Tell each adapter's first and last wrapped block that they open and close its shadow path."""
        layers = [layer for _, layer in self.tuner_layers()]
        for layer in layers:
            layer.entry_for, layer.exit_for = set(), set()
        self._entries: dict[str, ShadowLayer] = {}
        for adapter_name in self.peft_config:
            holding = [layer for layer in layers if adapter_name in layer.shadow_down]
            if holding:
                holding[0].entry_for.add(adapter_name)
                holding[-1].exit_for.add(adapter_name)
                self._entries[adapter_name] = holding[0]

    # ------------------------------------------------------------------ the call
    def _shadow_adapter(self) -> Optional[str]:
        """The adapter whose shadow path this call runs, or None (adapters disabled, or no blocks)."""
        active = self.active_adapters
        if not active or active[0] not in self.shadow_backbone:
            return None
        entry = self._entries.get(active[0])
        return None if entry is None or entry.disable_adapters else active[0]

    def _begin_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """Model pre-hook: hand the base model its own cache, and compute s0 from the raw inputs."""
        run = self._run
        run.seed, run.shadow_past, run.pack_cache = None, None, False
        cache = get_cache(kwargs)
        shadow_past = None
        if isinstance(cache, ShadowCache):
            kwargs = dict(kwargs)
            for name in CACHE_ARGUMENT_NAMES:
                if kwargs.get(name) is cache:
                    kwargs[name] = cache.base
            shadow_past = cache.shadow
        adapter_name = self._shadow_adapter()
        if adapter_name is None:
            return args, kwargs
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        inputs_embeds = kwargs.get("inputs_embeds")
        if input_ids is None and inputs_embeds is None:
            raise ValueError("ShadowPEFT computes its initial shadow state from `input_ids` or `inputs_embeds`; pass one.")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(getattr(self.model, "config", None), "use_cache", False))
        run.seed, run.shadow_past = self._initial_state(
            adapter_name, input_ids, inputs_embeds, kwargs.get("attention_mask"), kwargs.get("position_ids"),
            shadow_past, use_cache,
        )
        run.pack_cache = bool(use_cache)
        return args, kwargs

    def _initial_state(
        self,
        adapter_name: str,
        input_ids: Optional[torch.Tensor],
        inputs_embeds: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor],
        shadow_past: Any,
        use_cache: bool,
    ) -> tuple[torch.Tensor, Any]:
        """(s0, the backbone's cache): s0 = projection(backbone(x))."""
        backbone = self.shadow_backbone[adapter_name]
        kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": use_cache, "return_dict": True}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if shadow_past is not None:
            put_cache(kwargs, shadow_past, backbone)
        if self._shares_embeddings.get(adapter_name):
            if inputs_embeds is None:
                inputs_embeds = self.model.get_input_embeddings()(input_ids)
            out = backbone(inputs_embeds=inputs_embeds, **kwargs)
        elif input_ids is not None:  # the backbone's own embedding table
            out = backbone(input_ids=input_ids, **kwargs)
        elif inputs_embeds.shape[-1] == hidden_size(backbone.config):
            out = backbone(inputs_embeds=inputs_embeds, **kwargs)
        else:
            raise ValueError(
                f"This shadow backbone has its own {hidden_size(backbone.config)}-wide embeddings and cannot read "
                f"{inputs_embeds.shape[-1]}-wide `inputs_embeds`; pass `input_ids` (or use a backbone of the base width "
                "with share_embeddings=True)."
            )
        name = output_cache_name(out)
        return self.shadow_projection[adapter_name](out.last_hidden_state), getattr(out, name) if name else None

    def _end_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        """Model post-hook: pack (base cache, backbone cache) into the output's ShadowCache."""
        run = self._run
        run.last_seed, run.seed = run.seed, None
        if run.pack_cache:
            run.pack_cache = False
            name = output_cache_name(output)
            if name is not None:
                setattr(output, name, ShadowCache(base=getattr(output, name), shadow=run.shadow_past))
        run.shadow_past = None
        return output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's output; with labels, its loss plus `auxiliary_loss_weight` times the shadow loss."""
        labels = kwargs.get("labels")
        output = self.model(*args, **kwargs)
        self.last_shadow_loss = None
        adapter_name = self._shadow_adapter()
        if labels is None or getattr(output, "loss", None) is None or adapter_name is None:
            return output
        shadow_loss = self.shadow_auxiliary_loss(labels, attention_mask=kwargs.get("attention_mask"))
        if shadow_loss is not None:
            self.last_shadow_loss = shadow_loss.detach()
            output.shadow_loss = self.last_shadow_loss
            weight = self.peft_config[adapter_name].auxiliary_loss_weight
            if weight > 0:
                output.loss = output.loss + weight * shadow_loss
        return output

    def _shadow_head(self, adapter_name: str) -> Optional[nn.Module]:
        if adapter_name in self.shadow_head:
            return self.shadow_head[adapter_name]
        if self.peft_config[adapter_name].task_type == TaskType.CAUSAL_LM:
            return self.model.get_output_embeddings()
        return None

    def shadow_auxiliary_loss(
        self, labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
    ) -> Optional[torch.Tensor]:
        """The shadow path's own loss on s0 of the last call (unweighted): `loss(head(s0), labels)`.

        On s0, not on the final shadow state, because s0 is what the standalone shadow network
        (`unload_shadow()`) computes. None without a head (task types other than LM / SEQ_CLS).
        """
        adapter_name = self.active_adapters[0]
        seed, head = self._run.last_seed, self._shadow_head(adapter_name)
        if seed is None or head is None:
            return None
        if self.peft_config[adapter_name].task_type == TaskType.SEQ_CLS:
            return sequence_classification_loss(head(last_token(seed, attention_mask)), labels)
        return shifted_lm_loss(head(seed), labels)

    # ------------------------------------------------------------------ trainability and switching
    def _mark_only_adapters_as_trainable(self) -> None:
        super()._mark_only_adapters_as_trainable()
        frozen = getattr(self, "_active_inference_mode", False)
        for name in CONTAINERS:
            for adapter_name, module in self._modules.get(name, {}).items():
                config = self.peft_config.get(adapter_name)
                trains = adapter_name in self.active_adapters and not frozen and not getattr(config, "inference_mode", True)
                module.requires_grad_(trains)
        for adapter_name, backbone in self._modules.get("shadow_backbone", {}).items():
            config = self.peft_config.get(adapter_name)
            if config is not None and config.shadow_model != "mirror":
                _freeze_embeddings(backbone)  # a pretrained table: training it is not parameter-efficient

    def set_requires_grad(self, adapter_names: Union[str, list[str]], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad)
        for adapter_name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            for name in CONTAINERS:
                if adapter_name in self._modules[name]:
                    self._modules[name][adapter_name].requires_grad_(requires_grad)

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        names = adapter_name_list(adapter_name, self.peft_config)
        if len(names) != 1:
            raise ConfigError(f"ShadowPEFT requires exactly one active adapter, but got {len(names)} adapters.")
        super().set_adapter(names[0], inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)  # its network goes in `_remove_adapter_from_layers`
        self._mark_boundaries()

    def _remove_adapter_from_layers(self, adapter_name: str) -> None:
        super()._remove_adapter_from_layers(adapter_name)
        if adapter_name not in self.peft_config:
            self._drop_shadow_network(adapter_name)

    # ------------------------------------------------------------------ merging and unloading
    def _check_merge_allowed(self) -> None:
        raise NotMergeableError(NOT_MERGEABLE)

    def _unload(self, merge: bool, progressbar: bool = False, safe_merge: bool = False,
                adapter_names: Optional[list[str]] = None) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        return super()._unload(merge=False, progressbar=progressbar)

    def unload_shadow(self, adapter_name: Optional[str] = None, copy: bool = False) -> DetachedShadowModel:
        """The shadow network alone, `head(projection(backbone(x)))`, as a transformers model.

        `copy=False` shares the modules with this model (as `merge_and_unload` reuses modules);
        `copy=True` deep-copies them and gives a backbone that reads the base embeddings its own
        copy of the table, so the result saves completely with `save_pretrained`.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        if adapter_name not in self.shadow_backbone:
            raise ValueError(f"No shadow backbone found for adapter '{adapter_name}'.")
        take = deepcopy if copy else (lambda module: module)
        backbone = take(self.shadow_backbone[adapter_name])
        head = self._shadow_head(adapter_name)
        shared = None
        if self._shares_embeddings.get(adapter_name):
            if copy:
                backbone.embed_tokens = deepcopy(self.model.get_input_embeddings())
            else:
                shared = self.model.get_input_embeddings()
        return DetachedShadowModel(
            backbone,
            take(self.shadow_projection[adapter_name]),
            None if head is None else take(head),
            is_classification=self.peft_config[adapter_name].task_type == TaskType.SEQ_CLS,
            input_embeddings=shared,
        )

    # ------------------------------------------------------------------ checkpoints
    def extra_adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """`base_model.<container>.default.<key>` -> tensor for the backbone, projection and head."""
        state = dict(super().extra_adapter_state(adapter_name))
        for name in CONTAINERS:
            container = self._modules.get(name, {})
            if adapter_name in container:
                for key, tensor in container[adapter_name].state_dict(keep_vars=True).items():
                    state[f"{TUNER_KEY_PREFIX}{name}.{CHECKPOINT_ADAPTER}.{key}"] = tensor
        return state

    def state_for_save(self, adapter_name: str, state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        return tuner_keys_as_peft(state, prefix)


def _refuse_model(model: nn.Module) -> None:
    """Architectures peftkit's ShadowPEFT does not run on, refused before anything is built."""
    if is_diffusers_model(model):
        raise ConfigError(
            f"ShadowPEFT in peftkit supports decoder-only transformers models; {type(model).__name__} is a Diffusers "
            "transformer, which peft's ShadowPEFT backends cover but peftkit does not yet."
        )
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ConfigError(
            f"ShadowPEFT rides a single decoder loop; {type(model).__name__} is an encoder-decoder model. "
            "Use a decoder-only model, or another method (e.g. LoRA)."
        )


def _check_consecutive_blocks(model: nn.Module, config: ShadowConfig) -> None:
    """The targets must be consecutive entries of one block list: the shadow state passes from each to the next."""
    keys = [name for name, _ in model.named_modules() if name and ".base_layer" not in name and is_targeted(config, name)]
    if not keys:
        return  # BaseTuner reports what matched nothing
    parents = {key.rpartition(".")[0] for key in keys}
    indices = sorted(int(key.rpartition(".")[2]) if key.rpartition(".")[2].isdigit() else -1 for key in keys)
    parent = parents.pop() if len(parents) == 1 else None
    blocks = _module_at(model, parent) if parent is not None else None
    if not isinstance(blocks, nn.ModuleList) or indices[0] < 0 or indices != list(range(indices[0], indices[-1] + 1)):
        raise TargetModulesError(
            f"ShadowPEFT wraps whole decoder blocks, which must be consecutive entries of one block list; "
            f"target_modules selects {sorted(keys)[:6]}{' ...' if len(keys) > 6 else ''}. Target e.g. "
            r"r'.*\.layers\.\d+$' (or leave target_modules unset for every block), and use layers_to_transform "
            "for a consecutive range."
        )


def _module_at(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def _freeze_embeddings(backbone: nn.Module) -> None:
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            table = getattr(backbone, getter)()
        except (AttributeError, NotImplementedError):
            continue
        if isinstance(table, nn.Module):
            table.requires_grad_(False)


def _load_pretrained_backbone(source: str) -> tuple[nn.Module, Optional[nn.Linear]]:
    """A pretrained shadow backbone (`AutoModel`), or a "projected" one (`causal_lm_with_hidden_projection`:
    a small backbone plus its trained shadow -> base projection, in one safetensors file)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel
    from transformers.utils import cached_file

    with open(cached_file(source, "config.json"), encoding="utf-8") as handle:
        raw = json.load(handle)
    if raw.get("model_type") != "causal_lm_with_hidden_projection":
        return AutoModel.from_pretrained(source), None
    inner = dict(raw["shadow_model_config"])
    backbone = AutoModel.from_config(AutoConfig.for_model(inner.pop("model_type"), **inner))
    weights = load_file(cached_file(source, "model.safetensors"))
    marker = "shadow_model."
    backbone.load_state_dict({k[len(marker):]: v for k, v in weights.items() if k.startswith(marker)}, strict=True)
    weight = weights.get("shadow_hidden_projection.weight")
    if weight is None:
        raise ConfigError(
            f"{os.fspath(source)!r} is a projected shadow checkpoint but has no 'shadow_hidden_projection.weight'."
        )
    projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        projection.weight.copy_(weight)
    return backbone, projection
