"""`ShadowLayer`: a whole decoder block with the shadow injection before it and the shadow update after it.

The shadow state s rides the base decoder loop beside the hidden states h, packed with them in a
`ShadowCarrier` that the loop passes from block to block as if it were h. Block l computes

    delta = Dropout(h - s) W_down^T W_up^T                (W_down: d -> r, W_up: r -> d, no biases)
    h_in  = h + alpha * delta
    h_out = block(h_in)
    t     = T(h_out),   g = sigmoid(G(h_out))             (T, G: Linear(d, u) -> GELU -> Linear(u, d))
    s'    = (1 - g) * s + g * t

and hands (h_out, s') on. The first wrapped block of the active adapter (its entry) packs the
carrier from the embeddings and s0, which the tuner computed for this call; the last (its exit)
returns h_out alone, so the final norm and head see a plain tensor. A block whose adapter is
disabled, or that does not hold the active adapter, is the frozen block.

Checkpoint keys keep the adapter segment as `default` (peft's ShadowPEFT format):
`<block>.shadow_down.default.weight`, `<block>.shadow_update_gate.default.0.bias`, ...
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ...errors import ConfigError
from .._core.layer import BaseTunerLayer
from .cache import ShadowCache
from .detached import DetachedShadowModel

# ShadowCache and DetachedShadowModel are importable from here too, as from peft.tuners.shadow.layers.
__all__ = ["CHECKPOINT_ADAPTER", "DetachedShadowModel", "ShadowCache", "ShadowCarrier", "ShadowLayer", "ShadowRun",
           "block_hidden", "dispatch_shadow"]

#: The adapter segment every Shadow checkpoint key carries, whatever the adapter's name.
CHECKPOINT_ADAPTER = "default"


class ShadowCarrier:
    """The pair (hidden states h, shadow state s) passed between wrapped blocks in place of h."""

    __slots__ = ("hidden", "shadow")

    def __init__(self, hidden: torch.Tensor, shadow: torch.Tensor) -> None:
        self.hidden = hidden
        self.shadow = shadow


class ShadowRun:
    """Per-call state shared by the tuner and its layers.

    `seed`: s0 of the call in progress (None outside a call, or when the shadow path is off);
    `last_seed`: s0 of the last call, read by the auxiliary loss after the call returned;
    `shadow_past`: the shadow backbone's KV cache of the call, packed into the returned ShadowCache.
    """

    def __init__(self) -> None:
        self.seed: Optional[torch.Tensor] = None
        self.last_seed: Optional[torch.Tensor] = None
        self.shadow_past: Any = None
        self.pack_cache = False


def _gated_mlp(width: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


def block_hidden(output: Any) -> torch.Tensor:
    """The hidden states in what a decoder block returned (a tensor, a tuple, or a model output)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    for attr in ("hidden_states", "last_hidden_state"):
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(
        f"ShadowPEFT cannot read the hidden states from a decoder block that returned {type(output).__name__}."
    )


class ShadowLayer(nn.Module, BaseTunerLayer):
    """A decoder block wrapped with per-adapter shadow injection and update modules."""

    adapter_layer_names = (
        "shadow_down", "shadow_up", "shadow_update_transform", "shadow_update_gate", "shadow_dropout"
    )
    other_param_names = ("shadow_r", "shadow_alpha")

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, hidden_size: int, run: ShadowRun, **layer_kwargs: Any
    ) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.hidden_size = int(hidden_size)
        self.run = run
        #: Adapters for which this block is the first / last wrapped block (set by the tuner).
        self.entry_for: set[str] = set()
        self.exit_for: set[str] = set()
        self.shadow_r: dict[str, int] = {}
        self.shadow_alpha: dict[str, float] = {}
        self.shadow_down = nn.ModuleDict()
        self.shadow_up = nn.ModuleDict()
        self.shadow_dropout = nn.ModuleDict()
        self.shadow_update_transform = nn.ModuleDict()
        self.shadow_update_gate = nn.ModuleDict()
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        shadow_alpha: float,
        shadow_dropout: float,
        init_weights: bool,
        update_hidden_size: Optional[int] = None,
    ) -> None:
        if r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {r}")
        width, hidden = self.hidden_size, update_hidden_size or r
        self.shadow_r[adapter_name] = r
        self.shadow_alpha[adapter_name] = shadow_alpha
        # Creation order (down, up, T, G) fixes what a seed gives, the same tensors as peft's.
        self.shadow_down[adapter_name] = nn.Linear(width, r, bias=False)
        self.shadow_up[adapter_name] = nn.Linear(r, width, bias=False)
        self.shadow_dropout[adapter_name] = nn.Dropout(shadow_dropout) if shadow_dropout else nn.Identity()
        if init_weights:
            nn.init.zeros_(self.shadow_up[adapter_name].weight)
        self.shadow_update_transform[adapter_name] = _gated_mlp(width, hidden)
        self.shadow_update_gate[adapter_name] = _gated_mlp(width, hidden)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters)

    # ------------------------------------------------------------------ checkpoint keys
    def adapter_state(self, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
        """`<prefix>.<attr>.default.<param>` -> tensor (peft keeps a `default` segment in Shadow keys)."""
        state: dict[str, torch.Tensor] = {}
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                for name, tensor in container[adapter_name].state_dict(keep_vars=True).items():
                    state[f"{prefix}.{attr}.{CHECKPOINT_ADAPTER}.{name}"] = tensor
        return state

    # ------------------------------------------------------------------ forward
    def _shadow_adapter(self) -> Optional[str]:
        """The adapter this block applies, or None (disabled, or not held here)."""
        if self._disable_adapters or not self.active_adapters:
            return None
        name = self.active_adapters[0]  # ShadowModel allows one active adapter
        return name if name in self.shadow_down else None

    def forward(self, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        adapter = self._shadow_adapter()
        carrier = hidden_states if isinstance(hidden_states, ShadowCarrier) else None
        if adapter is None:
            return self.base_layer(carrier.hidden if carrier is not None else hidden_states, *args, **kwargs)
        if carrier is None:
            if adapter not in self.entry_for or self.run.seed is None:
                return self.base_layer(hidden_states, *args, **kwargs)
            carrier = self._enter(hidden_states)
        injected = self.inject(carrier.hidden, carrier.shadow, adapter)
        output = self.base_layer(injected, *args, **kwargs)
        hidden = block_hidden(output)
        # The last block's new shadow state would be dropped: it is not computed (T and G of that
        # block get no gradient, in peft as here).
        if adapter in self.exit_for:
            passed_on: Any = hidden
        else:
            passed_on = ShadowCarrier(hidden, self.advance(hidden, carrier.shadow, adapter))
        if isinstance(output, tuple):  # e.g. GPT-J blocks return (hidden, cache, ...)
            return (passed_on, *output[1:])
        return passed_on

    def _enter(self, hidden: torch.Tensor) -> ShadowCarrier:
        seed = self.run.seed
        if hidden.shape[:-1] != seed.shape[:-1]:
            raise ValueError(
                f"Shadow state sequence shape {tuple(seed.shape[:-1])} does not match base hidden states "
                f"{tuple(hidden.shape[:-1])}. When using a KV cache, both the base model and the shadow backbone "
                "must see the same new-token length (pass the ShadowCache the model returned as `past_key_values`)."
            )
        return ShadowCarrier(hidden, seed)

    def inject(self, hidden: torch.Tensor, shadow: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """h + alpha * W_up(W_down(Dropout(h - s))), computed in the adapter dtype, returned in h's."""
        down = self.shadow_down[adapter_name]
        delta = self.shadow_dropout[adapter_name]((hidden - shadow).to(down.weight.dtype))
        delta = self.shadow_up[adapter_name](down(delta))
        return hidden + (self.shadow_alpha[adapter_name] * delta).to(hidden.dtype)

    def advance(self, hidden: torch.Tensor, shadow: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """(1 - g) * s + g * T(h_out) with g = sigmoid(G(h_out)), in the adapter dtype, returned in s's."""
        transform = self.shadow_update_transform[adapter_name]
        dtype = transform[0].weight.dtype
        hidden = hidden.to(dtype)
        gate = torch.sigmoid(self.shadow_update_gate[adapter_name](hidden))
        candidate = transform(hidden)
        return ((1.0 - gate) * shadow.to(dtype) + gate * candidate).to(shadow.dtype)

    def __getattr__(self, name: str) -> Any:
        """Attributes the decoder loop reads off its blocks (e.g. `attention_type`) come from the block."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self.base_layer, name)

    def __repr__(self) -> str:
        return "shadow." + super().__repr__()


def dispatch_shadow(target: nn.Module, adapter_name: str, **kwargs: Any) -> ShadowLayer:
    """Any module selected as a block is wrapped (the tuner has checked that the targets are decoder blocks)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    return ShadowLayer(base, adapter_name, **kwargs)
