r"""LoRA on an output layer tied to the input embedding (`ensure_weight_tying=True`, peft's option).

With `tie_word_embeddings`, `lm_head.weight` *is* `embed_tokens.weight` (vocab x dim). A LoRA
update of the embedding changes that one matrix, so the output layer must see the same update:

    embedding:   delta_E = s * (B_e A_e)^T          A_e: (r, vocab),  B_e: (dim, r)
    lm_head:     y = W x + s * A_e^T (B_e^T x)      i.e. delta = delta_E, no factors of its own

`TiedLinear` holds no adapter tensors: it reads the embedding layer's. Merging is the embedding's
(the weight is shared, so merging it once updates both); this layer only follows. Checkpoints carry
peft's keys for it too (`lm_head.lora_A.weight` = B_e^T, `lm_head.lora_B.weight` = A_e^T), views
of the embedding's tensors, so files move between the libraries and loading either key fills both.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ...errors import ConfigError
from .._core.matching import key_matches
from .._core.module_tree import get_submodules, input_embedding_name, replace_module, tied_module_names
from .layer import Embedding, LoraLayer


class TiedLinear(LoraLayer, nn.Module):
    """LoRA of an output `nn.Linear` whose weight is the input embedding's; see the module docstring."""

    supports_lora_bias = False

    def __init__(self, base_layer: nn.Linear, adapter_name: str, embedding_layer: Embedding, **lora_kwargs: Any):
        super().__init__()
        self._init_lora_layer(base_layer, base_layer.in_features, base_layer.out_features)
        self.fan_in_fan_out = False
        self._tied = [embedding_layer]  # a list: not a submodule (its tensors belong to the embedding)
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **lora_kwargs)

    @property
    def embedding_layer(self) -> Embedding:
        return self._tied[0]

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0, **kwargs: Any) -> None:
        if kwargs.get("use_dora") or kwargs.get("lora_bias") or kwargs.get("use_alora") or kwargs.get("variant"):
            raise ConfigError(
                "ensure_weight_tying: the tied output layer shares the embedding's LoRA factors, which have no DoRA "
                "magnitude, bias, aLoRA mask or other variant; use plain LoRA there, or ensure_weight_tying=False."
            )
        embedding = self.embedding_layer
        if adapter_name not in embedding.lora_embedding_A:
            raise ConfigError(
                f"ensure_weight_tying: adapter {adapter_name!r} has no LoRA on the input embedding to tie to."
            )
        self.r[adapter_name] = embedding.r[adapter_name]
        self.lora_alpha[adapter_name] = embedding.lora_alpha[adapter_name]
        self.scaling[adapter_name] = embedding.scaling[adapter_name]
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_bias[adapter_name] = False
        self.set_adapter(self.active_adapters or [adapter_name])

    def adapter_names(self) -> list[str]:
        return list(self.r)

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as this layer's LoRA factors: A = B_e^T (r, dim), B = A_e^T (vocab, r) -- views."""
        embedding = self.embedding_layer
        return embedding.lora_embedding_B[adapter_name].T, embedding.lora_embedding_A[adapter_name].T

    def low_rank_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        weight_a, weight_b = self._factors(adapter_name)
        return (x.to(weight_a.dtype) @ weight_a.T) @ weight_b.T * self.scaling[adapter_name]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight_a, weight_b = self._factors(adapter_name)
        return weight_b @ weight_a * self.scaling[adapter_name]

    def _active_here(self) -> list[str]:
        # Adapters merged into the (shared) weight by the embedding layer are in the base output already.
        merged = set(self.embedding_layer.merged_adapters)
        return [name for name in self._active_adapter if name in self.r and name not in merged]

    # ------------------------------------------------------------------ merging: the embedding's
    def _merge_names(self, names: list[str], safe_merge: bool) -> None:
        self.merged_adapters.extend(names)  # nothing to write: the shared weight is the embedding's to merge

    def _check_merge(self, names: list[str], safe_merge: bool) -> None:
        """Nothing to check: the embedding layer merges the shared weight (and checks it)."""

    def unmerge(self) -> None:
        self.merged_adapters.clear()

    def _unmerge_to(self, keep: int) -> None:
        del self.merged_adapters[keep:]

    #: Checkpoints may lack this layer's keys (its tensors are the embedding's): loading does not require them.
    optional_in_checkpoints = True

    def adapter_state(self, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
        """peft's keys for the tied layer: views of the embedding's factors (saving or loading either fills both)."""
        if adapter_name not in self.r:
            return {}
        weight_a, weight_b = self._factors(adapter_name)
        return {f"{prefix}.lora_A.weight": weight_a, f"{prefix}.lora_B.weight": weight_b}

    def unwrapped(self) -> nn.Module:
        return self.base_layer

    def __repr__(self) -> str:
        return "lora.TiedLinear(" + repr(self.base_layer) + ")"



# ---------------------------------------------------------------------- planning and applying the tie
TIED_WARNING = (
    "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but `ensure_weight_tying` is not "
    "set to True. This can lead to complications, for example when merging the adapter or converting your model to "
    "formats other than safetensors. Check the discussion here: https://github.com/huggingface/peft/issues/2777"
)


@dataclass
class TiePlan:
    """What `ensure_weight_tying` changes for one injection (peft's rule): the config to inject with
    (the embedding targeted / saved, the tied output layers not) and the tied layers to follow it."""

    config: Any
    embedding: Optional[str] = None
    tied_targets: list[str] = field(default_factory=list)  # get a TiedLinear
    tied_copies: list[str] = field(default_factory=list)  # get a modules_to_save copy sharing the embedding's


#: The names by which peft recognises an embedding in target_modules / modules_to_save (not `wte`,
#: for example). Followed exactly, so that a config ties in peftkit exactly when it ties in peft.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _names_an_embedding(names: Any) -> bool:
    if not names:
        return False
    if isinstance(names, str):
        return any(re.fullmatch(names, name) for name in EMBEDDING_LAYER_NAMES)
    return any(name.split(".")[-1] in EMBEDDING_LAYER_NAMES for name in names)


def tied_output_names(model: nn.Module) -> list[str]:
    """Module paths of the output layers tied to `model`'s input embedding (none for other models)."""
    if input_embedding_name(model) is None:
        return []
    return tied_module_names(model, model.get_input_embeddings())


def plan_weight_tying(model: nn.Module, config: Any) -> TiePlan:
    """Resolve `ensure_weight_tying` for `config` on `model`; warn as peft where tying is asked for but
    impossible, or needed but not asked for."""
    embedding_name = input_embedding_name(model)
    tied = tied_output_names(model)
    saved = _names_an_embedding(config.modules_to_save)
    targeted = _names_an_embedding(config.target_modules)
    if not config.ensure_weight_tying:
        if tied and (saved or targeted):
            warnings.warn(TIED_WARNING, stacklevel=5)
        return TiePlan(config)
    if not tied:
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model", stacklevel=5)
        return TiePlan(config)
    if saved:
        kept = [name for name in config.modules_to_save if not any(key_matches(key, [name]) for key in tied)]
        if embedding_name not in kept:
            kept.append(embedding_name)
        return TiePlan(dataclasses.replace(config, modules_to_save=kept), embedding_name, tied_copies=tied)
    if targeted:
        targets = config.target_modules
        if isinstance(targets, str):
            targets = rf"(?:{targets}|^{re.escape(embedding_name)}$)"
        else:
            targets = {name for name in targets if not any(key_matches(key, [name]) for key in tied)} | {embedding_name}
        return TiePlan(dataclasses.replace(config, target_modules=targets), embedding_name, tied_targets=tied)
    warnings.warn(
        "You have requested `ensure_weight_tying`, but no tied modules are added in either `modules_to_save` or "
        "`target_modules`",
        stacklevel=5,
    )
    return TiePlan(config)


def apply_weight_tying(tuner: Any, adapter_name: str, plan: TiePlan) -> None:
    """After injection: tied output layers follow the embedding's LoRA (or share its modules_to_save copy)."""
    if not plan.embedding:
        return
    embedding = tuner.model.get_submodule(plan.embedding)
    for key in plan.tied_targets:
        if not isinstance(embedding, Embedding):
            raise ConfigError(
                f"ensure_weight_tying: the input embedding {plan.embedding!r} has no LoRA layer to tie "
                f"{key!r} to; target it with target_modules."
            )
        parent, target, name = get_submodules(tuner.model, key)
        kwargs = tuner.layer_kwargs(plan.config, adapter_name, key, target)
        if isinstance(target, TiedLinear):
            target.update_layer(adapter_name, **kwargs)
        else:
            replace_module(parent, name, TiedLinear(target, adapter_name, embedding, **kwargs))
    for key in plan.tied_copies:
        tuner._wrap_module_to_save(key, adapter_name)
        copy = tuner.model.get_submodule(key).modules_to_save[adapter_name]
        copy.weight = embedding.modules_to_save[adapter_name].weight  # one matrix, as in the base model
