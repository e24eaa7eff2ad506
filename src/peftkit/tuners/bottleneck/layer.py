r"""Bottleneck adapter layer: a small down-project / nonlinearity / up-project around a frozen module.

    sequential (houlsby, pfeiffer):   h = module(x);   h' = h + scaling * up(act(down(dropout(h))))
    parallel:                         h' = module(x) + scaling * up(act(down(dropout(x))))

          x ───────────┬───────────────────────┐
             ┌─────────▼────────┐              │  parallel: the adapter reads x
             │ module (frozen)  │              │
             └─────────┬────────┘              │
                       h ──────────┐           │  sequential: the adapter reads h
                       │      ┌────▼───────────▼─┐
                       │      │ dropout          │
                       │      │ down: d -> b     │  Kaiming-uniform, bias 0
                       │      │ act              │  relu / gelu / silu / tanh
                       │      │ up:   b -> d     │  zeros -> a new adapter is the identity
                       │      └────────┬─────────┘
                       └───── + ◄──────┘ * scaling (a number, or a learned scalar)

d is the wrapped module's output size; each adapter has 2*d*b + b + d parameters (one more with
learned scaling). The module's output may be a tensor or a tuple whose first element is the hidden
states (attention modules); the adapter acts on that element. Adapters cannot be merged into the
base weights: the activation makes them nonlinear.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import TargetModulesError
from .._core.layer import BaseTunerLayer

ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def _projection_sizes(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a Linear or a GPT-2 Conv1D (weight stored (in, out)), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def feature_sizes(module: nn.Module, key: str) -> tuple[int, int]:
    """(input, output) sizes of a module an adapter wraps.

    A Linear / Conv1D gives its own sizes. A block (attention, MLP) maps hidden states to hidden
    states, so both are the output size of its last projection (`o_proj`, `down_proj`, `c_proj`).
    """
    sizes = _projection_sizes(module)
    if sizes is not None:
        return sizes
    projections = [found for found in map(_projection_sizes, module.modules()) if found is not None]
    if not projections:
        raise TargetModulesError(
            f"Cannot tell the output size of {key!r} ({type(module).__name__}): it holds no Linear or "
            "Conv1D layer. Target a projection layer or a block that contains one."
        )
    hidden = projections[-1][1]
    return hidden, hidden


class BottleneckLayer(BaseTunerLayer, nn.Module):
    """Wraps any module; holds per-adapter `adapter_down` / `adapter_up` (and `adapter_scale`).

    Args:
        base_layer: The frozen module.
        adapter_name: Name of the first adapter.
        key: The module's dotted path (for error messages).
        parallel_input: (position, keyword) of the `forward` argument a parallel branch reads.
        **adapter_kwargs: Passed to `update_layer`.
    """

    adapter_layer_names = ("adapter_down", "adapter_up", "adapter_scale")
    other_param_names = ("bottleneck_size", "activation", "scaling", "parallel", "adapter_dropout")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        key: str,
        parallel_input: tuple[int, str] = (0, "hidden_states"),
        composition: str = "stack",
        **adapter_kwargs: Any,
    ) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.key = key
        self.in_features, self.out_features = feature_sizes(base_layer, key)
        self.parallel_input = parallel_input
        #: How several active adapters combine: "stack" (one after another) or "average".
        self.composition = composition
        self.bottleneck_size: dict[str, int] = {}
        self.activation: dict[str, str] = {}
        self.scaling: dict[str, float | str] = {}
        self.parallel: dict[str, bool] = {}
        self.adapter_dropout = nn.ModuleDict({})
        self.adapter_down = nn.ModuleDict({})
        self.adapter_up = nn.ModuleDict({})
        self.adapter_scale = nn.ParameterDict({})
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **adapter_kwargs)

    def update_layer(
        self,
        adapter_name: str,
        bottleneck_size: int,
        activation: str = "relu",
        dropout: float = 0.0,
        scaling: float | str = 1.0,
        parallel: bool = False,
        init_weights: bool = True,
    ) -> None:
        """Add (or replace) adapter `adapter_name`: down d_in -> b, up b -> d, both with bias."""
        self.bottleneck_size[adapter_name] = bottleneck_size
        self.activation[adapter_name] = activation
        self.scaling[adapter_name] = scaling
        self.parallel[adapter_name] = parallel
        # No dropout op at all when p == 0: it would cost a copy of the input per step for nothing.
        self.adapter_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        in_features = self.in_features if parallel else self.out_features
        self.adapter_down[adapter_name] = nn.Linear(in_features, bottleneck_size)
        self.adapter_up[adapter_name] = nn.Linear(bottleneck_size, self.out_features)
        if scaling == "learned":
            self.adapter_scale[adapter_name] = nn.Parameter(torch.ones(1))
        self.reset_adapter_parameters(adapter_name, init_weights)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def reset_adapter_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """Down Kaiming-uniform, biases and up zero: the adapter adds 0, the module is unchanged.

        `init_weights=False` keeps the random init of the up-projection too (for tests).
        """
        down, up = self.adapter_down[adapter_name], self.adapter_up[adapter_name]
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(down.bias)
        if init_weights:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    # ------------------------------------------------------------------ forward
    def _active_here(self) -> list[str]:
        return [name for name in self._active_adapter if name in self.adapter_down]

    def _adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """scaling * up(act(down(dropout(x)))) in the adapter's dtype."""
        down = self.adapter_down[adapter_name]
        x = self.adapter_dropout[adapter_name](x.to(down.weight.dtype))
        hidden = ACTIVATION_FUNCTIONS[self.activation[adapter_name]](down(x))
        scale = self.adapter_scale[adapter_name] if adapter_name in self.adapter_scale else self.scaling[adapter_name]
        return self.adapter_up[adapter_name](hidden) * scale

    def _branch_input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The `forward` argument a parallel branch reads: by keyword if given so, else by position."""
        position, keyword = self.parallel_input
        if keyword in kwargs:
            x = kwargs[keyword]
        else:
            x = args[position] if len(args) > position else None
        if not isinstance(x, torch.Tensor) or x.shape[-1] != self.in_features:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TargetModulesError(
                f"The parallel adapter on {self.key!r} reads argument {keyword!r} (position {position}) and "
                f"needs a tensor with {self.in_features} features, got {got}. Use a sequential adapter_type "
                "there, or target a module that maps hidden states to hidden states."
            )
        return x

    def _apply_adapters(self, hidden: torch.Tensor, branch_input: torch.Tensor | None) -> torch.Tensor:
        """Active adapters one after another ("stack"), or the mean of their outputs ("average")."""
        names = self._active_here()
        if self.composition == "average":
            outputs = [self._adapter_output(branch_input if self.parallel[n] else hidden, n) for n in names]
            return hidden + (sum(outputs) / len(outputs)).to(hidden.dtype)
        for name in names:
            source = branch_input if self.parallel[name] else hidden
            hidden = hidden + self._adapter_output(source, name).to(hidden.dtype)
        return hidden

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base output with each active adapter applied (unchanged when disabled)."""
        output = self.base_layer(*args, **kwargs)
        names = self._active_here()
        if self._disable_adapters or not names:
            return output
        is_tuple = isinstance(output, tuple)
        hidden = output[0] if is_tuple else output
        if not isinstance(hidden, torch.Tensor):
            raise TargetModulesError(
                f"{self.key!r} returns {type(output).__name__}; a bottleneck adapter needs a tensor or a tuple "
                "starting with one. Target a projection layer inside it instead."
            )
        needs_input = any(self.parallel[name] for name in names)
        branch_input = self._branch_input(args, kwargs) if needs_input else None
        hidden = self._apply_adapters(hidden, branch_input)
        return (hidden, *output[1:]) if is_tuple else hidden

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


def dispatch_bottleneck(target: nn.Module, adapter_name: str, **kwargs: Any) -> BottleneckLayer:
    """BottleneckModel's one dispatcher: an adapter can follow (or run beside) any module with a known output size."""
    return BottleneckLayer(target, adapter_name, **kwargs)
