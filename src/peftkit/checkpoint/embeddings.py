"""Whole embedding matrices saved beside an adapter, as peft's `save_embedding_layers` does.

When `embed_tokens` / `lm_head` are LoRA targets (or the vocabulary was resized), peft also stores
the full base weights of the input/output embeddings: `<layer>.base_layer.weight` for a wrapped
layer, `<layer>.weight` for a plain one. We write the same keys and accept them on load.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Union

import torch
from torch import nn

from ..tuners._core.layer import BaseTunerLayer
from ..tuners._core.matching import key_matches

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _embedding_layers(model: nn.Module) -> list[nn.Module]:
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(model, getter)() if hasattr(model, getter) else None
        except (AttributeError, NotImplementedError):
            layer = None
        if layer is not None and all(layer is not seen for seen in layers):
            layers.append(layer)
    return layers


def embedding_is_targeted(config: Any, model: nn.Module) -> bool:
    """True if `config.target_modules` selects an `embed_tokens` / `lm_head` module."""
    targets = getattr(config, "target_modules", None)
    if not targets:
        return False
    if isinstance(targets, str):
        names = [n for n, _ in model.named_modules() if n.rpartition(".")[2] in EMBEDDING_LAYER_NAMES]
        return any(key_matches(name, targets) for name in names)
    return any(name in targets for name in EMBEDDING_LAYER_NAMES)


def _vocab_was_resized(config: Any, model: nn.Module) -> bool:
    """The base model's saved config (local folders only: no hub call) has another vocab size."""
    base = getattr(config, "base_model_name_or_path", None)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    path = os.path.join(base, "config.json") if base else ""
    if not vocab_size or not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as handle:
        return json.load(handle).get("vocab_size", vocab_size) != vocab_size


def embedding_state_to_save(model: nn.Module, config: Any, save_embedding_layers: Union[bool, str]) -> dict[str, torch.Tensor]:
    """Keys (no prefix) -> live tensors of the embedding matrices to save with the adapter."""
    targeted = embedding_is_targeted(config, model)
    # peft's rule: trainable token rows are saved as the adapter's own tensors, not as the whole matrix.
    uses_token_rows = getattr(config, "trainable_token_indices", None) is not None or str(getattr(config, "peft_type", "")) == "TRAINABLE_TOKENS"
    if save_embedding_layers == "auto":
        if targeted and not uses_token_rows:
            warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.")
        save_embedding_layers = (targeted and not uses_token_rows) or _vocab_was_resized(config, model)
    if not save_embedding_layers:
        return {}
    if not hasattr(model, "get_input_embeddings"):  # peft's rule: only transformers models name their embeddings
        warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model.")
        return {}
    state = {}
    for layer in _embedding_layers(model):
        if targeted and not isinstance(layer, BaseTunerLayer):
            continue
        state.update(_layer_tensors(model, layer.base_layer if targeted else layer))
    return state


def embedding_state_accepted(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every embedding-matrix key a checkpoint may carry, in both forms (loaded when present)."""
    state = {}
    for layer in _embedding_layers(model):
        state.update(_layer_tensors(model, layer))
        if isinstance(layer, BaseTunerLayer):
            state.update(_layer_tensors(model, layer.base_layer))
    return {key: tensor for key, tensor in state.items() if ".lora_" not in key and ".trainable_tokens_" not in key}


def _layer_tensors(model: nn.Module, layer: nn.Module) -> dict[str, torch.Tensor]:
    for name, module in model.named_modules():
        if module is layer:
            return {f"{name}.{key}": tensor for key, tensor in layer.state_dict(keep_vars=True).items()}
    return {}
