"""Cartridge helpers (peft's top-level names): a KV prefix from a prefill, and composition.

A prefill of the base model on some text leaves, per layer, keys and values of shape
(1, heads, seq, head_dim). Their first n positions, flattened per position as

    row_j = [K_0[:, j], V_0[:, j], K_1[:, j], V_1[:, j], ...]      (each heads * head_dim wide)

are exactly a cartridge's (or a projection-free prefix tuning's) `prompt_embeddings` table.
Composing cartridges concatenates their tables along the positions.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ...utils.peft_types import PeftType

_KV_PREFIX_TYPES = (PeftType.CARTRIDGE, PeftType.PREFIX_TUNING)


def _layers_of(past_key_values: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer from a transformers cache or a legacy tuple of pairs."""
    if isinstance(past_key_values, (tuple, list)):
        return [(layer[0], layer[1]) for layer in past_key_values]
    layers = getattr(past_key_values, "layers", None)
    if layers is not None and all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        return [(layer.keys, layer.values) for layer in layers]
    to_legacy = getattr(past_key_values, "to_legacy_cache", None)
    if callable(to_legacy):
        return _layers_of(to_legacy())
    raise TypeError(
        f"Unsupported past_key_values of type {type(past_key_values).__name__}: pass a transformers Cache "
        "(e.g. DynamicCache) or a tuple of (key, value) pairs per layer."
    )


def prompt_embeddings_from_past_key_values(past_key_values: Any, *, num_virtual_tokens: int) -> torch.Tensor:
    """The first `num_virtual_tokens` cached positions of a batch-1 prefill as a flat KV-prefix table,
    `(num_virtual_tokens, num_layers * 2 * heads * head_dim)` (layout in the module docstring)."""
    layers = _layers_of(past_key_values)
    if not layers:
        raise ValueError("Empty `past_key_values`: run a prefill with use_cache=True first.")
    first_key = layers[0][0]
    if first_key.ndim != 4:
        raise ValueError(f"Expected key/value tensors of rank 4 (batch, heads, seq, head_dim), got rank {first_key.ndim}.")
    if first_key.shape[0] != 1:
        raise ValueError(f"Expected the cache of a single-sequence prefill (batch 1), got batch {first_key.shape[0]}.")
    shape = (1, first_key.shape[1], first_key.shape[3])
    rows = []
    for index, (key, value) in enumerate(layers):
        for tensor in (key, value):
            if (tensor.shape[0], tensor.shape[1], tensor.shape[3]) != shape:
                raise ValueError(
                    f"Layer {index} of past_key_values has shape {tuple(tensor.shape)}; every layer must have "
                    f"(1, {shape[1]}, seq, {shape[2]}) (equal heads and head_dim)."
                )
            if tensor.shape[2] < num_virtual_tokens:
                raise ValueError(f"Need at least {num_virtual_tokens} cached tokens, got {tensor.shape[2]} (layer {index}).")
            rows.append(tensor[0, :, :num_virtual_tokens].transpose(0, 1))  # (n, heads, head_dim)
    # (n, layers * 2, heads, head_dim), flattened per position
    return torch.stack(rows, dim=1).reshape(num_virtual_tokens, -1)


def _kv_prefix_config(model: Any, adapter_name: Optional[str]) -> tuple[str, Any]:
    name = adapter_name if adapter_name is not None else model.active_adapter
    config = model.peft_config[name]
    if config.peft_type not in _KV_PREFIX_TYPES:
        raise ValueError(f"Adapter '{name}' must be a CARTRIDGE or PREFIX_TUNING adapter (got {config.peft_type}).")
    if getattr(config, "prefix_projection", False):
        raise ValueError("Initialization from KV cache is not supported for prefix tuning with `prefix_projection=True`.")
    return name, config


def _load_table(encoder: Any, table: torch.Tensor) -> None:
    encoder.load_prompt_embeddings(table)  # CartridgeEncoder's and PrefixEncoder's, as in peft


@torch.no_grad()
def initialize_kv_prefix_from_past_key_values(
    model: Any, *, adapter_name: Optional[str] = None, past_key_values: Any, num_virtual_tokens: Optional[int] = None
) -> torch.Tensor:
    """Load the first positions of a prefill's cache into a cartridge / prefix-tuning adapter; returns the table."""
    name, config = _kv_prefix_config(model, adapter_name)
    count = config.num_virtual_tokens if num_virtual_tokens is None else num_virtual_tokens
    table = prompt_embeddings_from_past_key_values(past_key_values, num_virtual_tokens=count)
    _load_table(model.prompt_encoder[name], table)
    return table


@torch.no_grad()
def initialize_kv_prefix_from_text(
    model: Any,
    tokenizer: Any,
    *,
    text: str,
    adapter_name: Optional[str] = None,
    num_virtual_tokens: Optional[int] = None,
    use_chat_template: bool = True,
    max_length: Optional[int] = None,
) -> torch.Tensor:
    """Prefill the base model (adapter off) on `text` -- as a system message through the tokenizer's chat
    template when it has one and `use_chat_template`, else plainly tokenized -- and load the cache's first
    positions into the adapter (`initialize_kv_prefix_from_past_key_values`). Returns the table."""
    name, _ = _kv_prefix_config(model, adapter_name)
    input_ids = None
    if use_chat_template and hasattr(tokenizer, "apply_chat_template"):
        try:
            input_ids = tokenizer.apply_chat_template(
                [{"role": "system", "content": text}], tokenize=True, add_generation_prompt=False,
                return_dict=False, return_tensors="pt",
            )
        except (TypeError, ValueError):  # no chat template, or an older signature
            input_ids = None
        if input_ids is not None and max_length is not None:
            input_ids = input_ids[:, :max_length]
    if input_ids is None:
        input_ids = tokenizer(text, return_tensors="pt", truncation=max_length is not None, max_length=max_length)["input_ids"]
    input_ids = input_ids.to(model.device)
    with model.disable_adapter():
        outputs = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True)
    return initialize_kv_prefix_from_past_key_values(
        model, adapter_name=name, past_key_values=outputs.past_key_values, num_virtual_tokens=num_virtual_tokens
    )
