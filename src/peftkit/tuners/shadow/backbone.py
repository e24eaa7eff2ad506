"""Where a decoder-only model keeps its blocks, and the "mirror" shadow backbone built from it.

The mirror backbone is the base model's own backbone class (e.g. `LlamaModel` inside
`LlamaForCausalLM`) built from a copy of its config, reduced to `shadow_num_hidden_layers` blocks
(1 by default) and optionally narrower (`shadow_hidden_size`, heads, FFN width). It is freshly
initialised and trained; its output, projected to the base width when narrower, is s0.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from torch import nn

from ...errors import ConfigError

#: Attributes of a task model that hold its backbone (OPT nests the blocks one level deeper).
BACKBONE_ATTRS = ("model", "transformer", "base_model", "decoder")
#: Attributes of a backbone that hold its list of decoder blocks.
BLOCK_LIST_ATTRS = ("layers", "h")

_DEPTH = ("num_hidden_layers", "n_layer", "num_layers")
_WIDTH = ("hidden_size", "n_embd", "d_model")
_FFN = ("intermediate_size", "ffn_dim", "n_inner")
_HEADS = ("num_attention_heads", "n_head", "num_heads")


def is_diffusers_model(model: nn.Module) -> bool:
    """A Diffusers transformer (blocks in `transformer_blocks`), which peftkit's ShadowPEFT does not support."""
    if type(model).__module__.startswith("diffusers"):
        return True
    stacks = ("transformer_blocks", "single_transformer_blocks")
    return any(isinstance(getattr(model, name, None), nn.ModuleList) for name in stacks) and not isinstance(
        getattr(model, "layers", None), nn.ModuleList
    )


def _block_list(module: nn.Module) -> Optional[nn.ModuleList]:
    for attr in BLOCK_LIST_ATTRS:
        blocks = getattr(module, attr, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    return None


def find_backbone(model: nn.Module) -> Optional[nn.Module]:
    """The module whose block list the decoder loop runs over (`LlamaModel`, `GPT2Model`, OPT's decoder)."""
    for attr in BACKBONE_ATTRS:
        inner = getattr(model, attr, None)
        if not isinstance(inner, nn.Module) or inner is model:
            continue
        nested = getattr(inner, "decoder", None)
        if isinstance(nested, nn.Module) and _block_list(nested) is not None:
            return nested
        if _block_list(inner) is not None:
            return inner
    return model if _block_list(model) is not None else None


def decoder_block_names(model: nn.Module) -> list[str]:
    """Full paths of every decoder block, in order (the default `target_modules`)."""
    backbone = find_backbone(model)
    if backbone is None:
        raise ConfigError(
            f"ShadowPEFT found no decoder-block list (`.layers` / `.h`) in {type(model).__name__}; it supports "
            "decoder-only transformers models. Set `target_modules` to the decoder blocks to wrap, e.g. "
            r"r'.*\.layers\.\d+$'."
        )
    prefix = next(name for name, module in model.named_modules() if module is backbone)
    attr = next(attr for attr in BLOCK_LIST_ATTRS if isinstance(getattr(backbone, attr, None), nn.ModuleList))
    base = f"{prefix}.{attr}" if prefix else attr
    return [f"{base}.{index}" for index in range(len(getattr(backbone, attr)))]


def hidden_size(config: Any) -> int:
    """The model width `d` (the shadow state's width) from a transformers config."""
    for attr in _WIDTH:
        if hasattr(config, attr):
            return int(getattr(config, attr))
    raise ConfigError(
        f"ShadowPEFT cannot read the hidden size from the model config ({type(config).__name__} has none of "
        f"{', '.join(_WIDTH)}); it supports transformers decoder models."
    )


def _set(config: Any, names: tuple[str, ...], value: int, field: str) -> None:
    for attr in names:
        if hasattr(config, attr):
            setattr(config, attr, int(value))
            return
    raise ConfigError(
        f"Cannot set `{field}` on a mirror backbone of {type(config).__name__}: its config has none of {names}. "
        "Leave the field unset for this architecture."
    )


def _fit_layer_lists(config: Any) -> None:
    """Per-layer config lists (e.g. `layer_types`) shortened or padded to the new depth."""
    try:
        depth = int(config.num_hidden_layers)
    except (AttributeError, TypeError, ValueError):
        return
    kinds = getattr(config, "layer_types", None)
    if kinds is not None:
        kinds = list(kinds) or ["full_attention"]
        config.layer_types = (kinds + [kinds[-1]] * depth)[:depth]
    window = getattr(config, "max_window_layers", None)
    if isinstance(window, int) and window > depth:
        config.max_window_layers = depth


def build_mirror_backbone(model: nn.Module, shadow_config: Any) -> nn.Module:
    """A fresh backbone of the base model's architecture, reduced as `shadow_config` says."""
    base_backbone = find_backbone(model)
    if base_backbone is None or not hasattr(base_backbone, "config"):
        raise ConfigError(
            f"ShadowPEFT cannot build a mirror backbone for {type(model).__name__}: no transformers backbone "
            "with a config was found. It supports decoder-only transformers models."
        )
    config = copy.deepcopy(base_backbone.config)
    _set(config, _DEPTH, shadow_config.shadow_num_hidden_layers or 1, "shadow_num_hidden_layers")
    if shadow_config.shadow_hidden_size is not None:
        _set(config, _WIDTH, shadow_config.shadow_hidden_size, "shadow_hidden_size")
    if shadow_config.shadow_intermediate_size is not None:
        _set(config, _FFN, shadow_config.shadow_intermediate_size, "shadow_intermediate_size")
    if shadow_config.shadow_num_attention_heads is not None:
        _set(config, _HEADS, shadow_config.shadow_num_attention_heads, "shadow_num_attention_heads")
    _fit_layer_lists(config)
    return type(base_backbone)(config)
