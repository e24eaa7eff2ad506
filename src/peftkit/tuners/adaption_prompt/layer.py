r"""Adaption prompts: learned prompt tokens attended to by an attention module, behind a zero-init gate.

Per adapter, an adapted attention module holds P (1 x L x hidden, standard normal at start) and a
gate g (a scalar, zero at start). For input x (rows x T x hidden) with the module's own output y:

    q      = the module's query states for x (rotary embedding applied for llama-likes)   (rows, H, T, d)
    k, v   = the module's key / value projections of P, per head (shared by all rows)   (rows, H, L, d)
    a      = g * softmax(q k^T / sqrt(d))      softmax over the L prompt tokens, in fp32
    y'     = y + o_proj(a v)                   (llama-likes; gpt2: y + a v, no projection, as peft)

The prompt keys carry no position (no rotary embedding), so every position sees the same prompt.
With g = 0 the module's output is unchanged: training starts from the base model. Grouped-query
attention shares each key / value head among H / H_kv query heads. Tensors are kept in the
dtype of the module's weights (fp32 over int8 / uint8 weights), as peft keeps them. Checkpoint keys:
`<attention module>.adaption_prompt`, `<attention module>.adaption_gate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from .._core.layer import BaseTunerLayer


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension's halves (the rotary embedding's rotation)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _heads(states: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(rows, T, heads * d) -> (rows, heads, T, d)."""
    return states.view(*states.shape[:-1], -1, head_dim).transpose(1, 2)


def _llama_queries(attn: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """q_proj(x) per head with the call's rotary embedding: q cos + rotate_half(q) sin."""
    rotary = kwargs.get("position_embeddings")
    if rotary is None:
        raise ConfigError(
            "Adaption prompts on a llama-like attention need the rotary `position_embeddings` its decoder layer "
            "passes (transformers >= 4.48); this attention module was called without them."
        )
    cos, sin = (t.unsqueeze(1) for t in rotary)
    queries = _heads(attn.q_proj(hidden), attn.head_dim)
    return queries * cos + _rotate_half(queries) * sin


def _llama_prompt_keys_values(attn: nn.Module, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return attn.k_proj(prompt), attn.v_proj(prompt)


def _gpt2_queries(attn: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """The query third of c_attn(x) per head (q_attn(x) for cross-attention)."""
    if kwargs.get("encoder_hidden_states") is not None:
        if not hasattr(attn, "q_attn"):
            raise ConfigError(
                f"If `{type(attn).__name__}` is used as cross attention, the weights `q_attn` must be defined. "
                "Please make sure to instantiate it with `GPT2Attention(..., is_cross_attention=True)`."
            )
        queries = attn.q_attn(hidden)
    else:
        queries = attn.c_attn(hidden).split(attn.split_size, dim=2)[0]
    return _heads(queries, attn.head_dim)


def _gpt2_prompt_keys_values(attn: nn.Module, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, keys, values = attn.c_attn(prompt).split(attn.split_size, dim=2)
    return keys, values


@dataclass(frozen=True)
class AttentionKind:
    """How adaption prompts read one architecture's attention module."""

    #: The attention submodule's name in each decoder layer (the config's default target_modules).
    target_modules: str
    #: (attention, x, the call's keywords) -> query states (rows, H, T, d).
    queries: Callable[[nn.Module, torch.Tensor, dict[str, Any]], torch.Tensor]
    #: (attention, P) -> the key and value projections of P, (1, L, H_kv * d) each.
    prompt_keys_values: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    #: The output projection applied to the prompt's contribution, or None (added as it is).
    output_projection: Optional[str]
    #: The weight whose dtype the adapter tensors take.
    dtype_reference: str


_LLAMA = AttentionKind("self_attn", _llama_queries, _llama_prompt_keys_values, "o_proj", "q_proj")

#: The model types peft 0.21.2 supports (`config.model_type` of the wrapped model).
ATTENTION_KINDS: dict[str, AttentionKind] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "gpt2": AttentionKind("attn", _gpt2_queries, _gpt2_prompt_keys_values, None, "c_proj"),
}


def adapter_dtype(attn: nn.Module, kind: AttentionKind) -> torch.dtype:
    """The dtype of the module's reference weight, fp32 when that weight is integer (quantized)."""
    weight = getattr(getattr(attn, kind.dtype_reference, None), "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        return torch.float32
    return weight.dtype


class AdaptedAttention(BaseTunerLayer, nn.Module):
    """An attention module (`base_layer`) with adaption prompts: per adapter P, g and L (`adapter_len`)."""

    adapter_layer_names = ("adaption_prompt", "adaption_gate")
    other_param_names = ("adapter_len",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, model_type: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.model_type = model_type
        self.kind = ATTENTION_KINDS[model_type]
        self.adapter_len: dict[str, int] = {}
        self.adaption_prompt = nn.ParameterDict({})
        self.adaption_gate = nn.ParameterDict({})
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    def update_layer(self, adapter_name: str, adapter_len: int, inference_mode: bool = False) -> None:
        """Add (or replace) adapter `adapter_name`: L = `adapter_len` prompt tokens ~ N(0, 1), gate 0."""
        attn = self.get_base_layer()
        hidden_size = attn.config.hidden_size
        reference = next(attn.parameters())
        dtype = adapter_dtype(attn, self.kind)
        self.adapter_len[adapter_name] = adapter_len
        prompt = torch.empty(1, adapter_len, hidden_size, device=reference.device, dtype=dtype)
        if not prompt.is_meta:
            prompt.normal_()
        self.adaption_prompt[adapter_name] = nn.Parameter(prompt)
        self.adaption_gate[adapter_name] = nn.Parameter(torch.zeros(1, device=reference.device, dtype=dtype))
        self.set_adapter(self.active_adapters or [adapter_name], inference_mode=inference_mode)

    def _move_adapter_to_base(self, adapter_name: str, keep_fp32: bool = True) -> None:
        """The module's device and weight dtype, whatever `keep_fp32` (peft never upcasts these tensors)."""
        attn = self.get_base_layer()
        reference = next(attn.parameters())
        dtype = adapter_dtype(attn, self.kind)
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                tensor = container[adapter_name]
                device = tensor.device if tensor.is_meta else reference.device
                tensor.data = tensor.data.to(device, dtype)

    # ------------------------------------------------------------------ forward
    def prompt_output(self, adapter_name: str, hidden: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.dtype]:
        """What adapter `adapter_name` adds to the module's output (rows, T, hidden), and the queries' dtype."""
        attn = self.get_base_layer()
        prompt, gate = self.adaption_prompt[adapter_name], self.adaption_gate[adapter_name]
        head_dim = attn.head_dim
        queries = self.kind.queries(attn, hidden, kwargs)  # (rows, H, T, d)
        rows, n_heads, length = queries.shape[0], queries.shape[1], queries.shape[2]
        keys, values = self.kind.prompt_keys_values(attn, prompt)  # (1, L, H_kv * d)
        keys, values = _heads(keys, head_dim), _heads(values, head_dim)  # (1, H_kv, L, d)
        repeat = n_heads // keys.shape[1]
        keys = keys.repeat_interleave(repeat, dim=1).expand(rows, -1, -1, -1)
        values = values.repeat_interleave(repeat, dim=1).expand(rows, -1, -1, -1)
        dtype = queries.dtype
        scores = queries @ keys.transpose(2, 3).to(dtype) / math.sqrt(head_dim)
        weights = gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        mixed = (weights @ values).transpose(1, 2).reshape(rows, length, -1)
        if self.kind.output_projection is not None:
            mixed = getattr(attn, self.kind.output_projection)(mixed)
        return mixed, dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The module's outputs, the first one plus the active adapter's prompt output (see the module docstring)."""
        outputs = self.base_layer(*args, **kwargs)
        if self._disable_adapters:
            return outputs
        active = [name for name in self._active_adapter if name in self.adaption_prompt]
        if not active:
            return outputs
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        first, rest = outputs[0], tuple(outputs[1:])
        result = first
        for adapter_name in active:
            added, dtype = self.prompt_output(adapter_name, hidden, kwargs)
            result = (result + added).to(dtype)
        return (result, *rest)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError("Adaption prompts cannot be merged into the base weights.")

    def __repr__(self) -> str:
        return "adaption_prompt." + super().__repr__()
