r"""BEFT layers: a trained bias added to a frozen Linear layer's output.

    y = base(x) + sum over active adapters a of beft_bias_a        beft_bias: (1, out), saved as `beft_bias`

Initialisation (`init_weights`): True -- zeros (a no-op); False -- N(0, 1).

Merging adds the bias to the base's bias, `b <- b + beft_bias` (unmerging subtracts it, and
unmerging the last adapter puts back the bias from before the first merge exactly); only
the bias is read and written, the weight is never touched (so quantized weights stay as they
are). A base without a bias cannot merge: peft's warning when the adapter is added, its error
when merging.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from ...errors import AdapterStateError
from .._core.base_layers import base_of
from .._core.layer import BaseTunerLayer

SUPPORTED_LAYERS = "`torch.nn.Linear`"

NO_BIAS_WARNING = (
    "Detected that the base layer has no bias term. Note you cannot merge the BEFT adapter into the base layer."
)


class BeftLayer(BaseTunerLayer, nn.Module):
    """What every BEFT layer holds: per adapter one bias vector of the output size."""

    adapter_layer_names = ("beft_bias",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.beft_bias = nn.ParameterDict({})
        self._bias_before_merge: Optional[torch.Tensor] = None
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, init_weights: bool = True) -> None:
        """Add (or replace) adapter `adapter_name`: a (1, out) bias, zero (True) or N(0, 1) (False)."""
        if self.bias is None:
            warnings.warn(NO_BIAS_WARNING, stacklevel=2)
        self.beft_bias[adapter_name] = nn.Parameter(torch.randn(1, self.out_features))
        if init_weights:
            self.reset_beft_parameters(adapter_name)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def reset_beft_parameters(self, adapter_name: str) -> None:
        """The bias of `adapter_name` back to zero."""
        if adapter_name in self.beft_bias:
            with torch.no_grad():
                nn.init.zeros_(self.beft_bias[adapter_name])

    def _active_here(self) -> list[str]:
        return [name for name in self._active_adapter if name in self.beft_bias]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`base(x) + (sum of the active adapters' biases)`, in the base output's dtype."""
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        active = self._active_here()
        if self.merged or not active:
            return result
        added = self.beft_bias[active[0]].flatten()
        for name in active[1:]:
            added = added + self.beft_bias[name].flatten()
        return (result + added).to(result.dtype)

    # ------------------------------------------------------------------ merging (the bias only)
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """BEFT changes no weight: zeros of the base weight's shape (the update is `bias_delta`)."""
        return torch.zeros_like(self.weight)

    def bias_delta(self, adapter_name: str) -> torch.Tensor:
        """What merging adds to the base bias: `beft_bias` as an (out,) vector."""
        return self.beft_bias[adapter_name].flatten()

    def fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """b <- b + beft_bias (the weight is returned as it is); b0 is kept until the last unmerge."""
        shifted = self._shifted_bias(adapter_name, bias, sign=1.0, action="merge")
        if not self.merged_adapters or self._bias_before_merge is None:
            self._bias_before_merge = bias.detach().clone()
        return weight, shifted

    def unfold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """b <- b - beft_bias; unfolding the last merged adapter gives back b0 exactly."""
        if self.merged_adapters == [adapter_name] and self._bias_before_merge is not None and bias is not None:
            return weight, self._bias_before_merge.to(bias.device, bias.dtype, copy=True)
        return weight, self._shifted_bias(adapter_name, bias, sign=-1.0, action="unmerge")

    def _forget_merge(self, adapter_name: str) -> None:
        if not self.merged_adapters:
            self._bias_before_merge = None

    def _shifted_bias(self, adapter_name: str, bias: Optional[torch.Tensor], sign: float, action: str) -> torch.Tensor:
        if bias is None:
            raise AdapterStateError(f"Base layer has no bias, cannot {action} bias adapter {adapter_name}")
        compute = torch.promote_types(bias.dtype, torch.float32)
        shift = self.bias_delta(adapter_name).detach().to(bias.device, compute)
        return (bias.to(compute) + sign * shift).to(bias.dtype)

    def _read_base(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The base weight as stored (never changed) and its bias."""
        return self.weight, self.bias

    def _write_base(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        """Only the bias changes: copied in place into the base's bias parameter."""
        base_bias = self.bias
        if bias is not None and base_bias is not None and bias is not base_bias:
            with torch.no_grad():
                base_bias.copy_(bias)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """False: a bias offset is not a low-rank weight update."""
        return False

    def __repr__(self) -> str:
        return "beft." + super().__repr__()


class Linear(BeftLayer):
    """BEFT on `nn.Linear`: `y = W0 x + b0 + beft_bias`."""


def dispatch_linear(target: nn.Module, adapter_name: str, **layer_kwargs: Any) -> Optional[nn.Module]:
    """A BEFT layer when `target`'s base is an `nn.Linear` (subclasses included, as peft)."""
    if isinstance(base_of(target), nn.Linear):
        return Linear(target, adapter_name, **layer_kwargs)
    return None
