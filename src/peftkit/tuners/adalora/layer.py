r"""AdaLoRA layers: a frozen base layer plus an SVD-shaped update per adapter.

    y = W x + B (A * E) dropout(x) * scaling / (ranknum + 1e-5),     scaling = lora_alpha

         x ──────────────┬───────────────────┐
                         │                   │ dropout
                   ┌─────▼──────┐      ┌─────▼──────┐
                   │ W (frozen) │      │ A: r x in  │  right singular vectors, N(0, 0.02)
                   └─────┬──────┘      └─────┬──────┘
                         │             ┌─────▼──────┐
                         │             │ * E: r x 1 │  singular values, zeros -> a no-op at start
                         │             └─────┬──────┘
                         │             ┌─────▼──────┐
                         │             │ B: out x r │  left singular vectors, N(0, 0.02)
                         │             └─────┬──────┘
                         └────── + ◄─────────┘ * scaling / ranknum

Pruning a rank zeroes its entry of E (training) or drops its row of A, entry of E and column of
B (a saved or loaded adapter). `ranknum` stays at `init_r` either way, so both forms compute the
same output. A, E and B are bare parameters in `lora_A` / `lora_E` / `lora_B` ParameterDicts,
which gives peft's checkpoint keys `<module>.lora_A`, `<module>.lora_E`, `<module>.lora_B`;
`ranknum` is a frozen tensor that is never saved.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from .._core.base_layers import base_of, is_linear_like, is_transposed, linear_features, refuse_grouped_conv, wraps
from .._core.layer import BaseTunerLayer

# Added to `ranknum` before dividing, exactly as peft does (so outputs match to the last bit).
RANKNUM_EPS = 1e-5


class AdaLoraLayer(BaseTunerLayer):
    """What every AdaLoRA layer shares: per-adapter A, E, B, scaling, dropout and `ranknum`."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_E")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "ranknum")

    def _init_adalora_layer(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        self._init_tuner_layer(base_layer)
        self.in_features = in_features
        self.out_features = out_features
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict({})
        self.lora_A = nn.ParameterDict({})
        self.lora_E = nn.ParameterDict({})
        self.lora_B = nn.ParameterDict({})
        self.ranknum = nn.ParameterDict({})

    def _fan_in(self) -> int:
        """Columns of A: the number of inputs one output sees."""
        return self.in_features

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: Union[bool, str] = True,
        ranknum: Optional[int] = None,
    ) -> None:
        """Add (or replace) adapter `adapter_name` with `r` ranks (0 allowed: a fully pruned module).

        `ranknum` is the divisor of the update, `init_r` of the config; it defaults to `r`.
        """
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ConfigError(f"r={r!r} is invalid for an AdaLoRA layer; it must be an integer >= 0.")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        # As peft: AdaLoRA scales by lora_alpha itself (the 1/r part is the division by ranknum).
        self.scaling[adapter_name] = lora_alpha if lora_alpha > 0 else float(r)
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(r, self._fan_in()))
        self.lora_E[adapter_name] = nn.Parameter(torch.randn(r, 1))
        self.lora_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r))
        divisor = float(r if ranknum is None else ranknum)
        self.ranknum[adapter_name] = nn.Parameter(torch.full((1,), divisor), requires_grad=False)
        if self.ranknum[adapter_name].is_meta:
            # low_cpu_mem_usage puts new parameters on meta for the checkpoint to fill, but checkpoints
            # never hold ranknum (it comes from the config): it is made real here, bypassing that.
            self.ranknum._parameters[adapter_name] = nn.Parameter(torch.full((1,), divisor), requires_grad=False)
        if init_lora_weights:
            self.reset_lora_parameters(adapter_name)
        self._move_adapter_to_base(adapter_name)  # ranknum too: the base's device, the adapter dtype
        self.set_adapter(self.active_adapters or [adapter_name])

    def reset_lora_parameters(self, adapter_name: str) -> None:
        """E zero (so a new adapter is a no-op), A and B ~ N(0, 0.02)."""
        nn.init.zeros_(self.lora_E[adapter_name])
        nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B[adapter_name], mean=0.0, std=0.02)

    def _update_matrix(self, adapter_name: str) -> torch.Tensor:
        """B (A * E) * scaling / (ranknum + eps), shaped (out, fan_in)."""
        weight_a = self.lora_A[adapter_name] * self.lora_E[adapter_name]
        divisor = self.ranknum[adapter_name] + RANKNUM_EPS
        return self.lora_B[adapter_name] @ weight_a * self.scaling[adapter_name] / divisor

    def _active_here(self) -> list[str]:
        return [name for name in self._active_adapter if name in self.lora_A]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus each active adapter's update (none when disabled or merged)."""
        if self._disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self._disable_adapters or self.merged:
            return result
        result_dtype = result.dtype
        for adapter_name in self._active_here():
            lora_a = self.lora_A[adapter_name]
            dropped = self.lora_dropout[adapter_name](x.to(lora_a.dtype))
            result = result + self._adapter_output(dropped, adapter_name)
        return result.to(result_dtype)

    def _adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return "adalora." + super().__repr__()


class SVDLinear(AdaLoraLayer, nn.Module):
    """AdaLoRA on `nn.Linear` or transformers' `Conv1D` (`fan_in_fan_out=True`, weight stored (in, out))."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, fan_in_fan_out: Optional[bool] = None, **adapter_kwargs: Any
    ):
        super().__init__()
        self._init_adalora_layer(base_layer, *linear_features(base_layer))
        self.fan_in_fan_out = is_transposed(base_of(base_layer)) if fan_in_fan_out is None else fan_in_fan_out
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **adapter_kwargs)

    def _adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        weight_a = self.lora_A[adapter_name] * self.lora_E[adapter_name]
        divisor = self.ranknum[adapter_name] + RANKNUM_EPS
        return (x @ weight_a.T @ self.lora_B[adapter_name].T) * self.scaling[adapter_name] / divisor

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W = B (A * E) * scaling / ranknum, transposed for (in, out)-stored bases."""
        delta = self._update_matrix(adapter_name)
        return delta.T if self.fan_in_fan_out else delta


class SVDConv2d(AdaLoraLayer, nn.Module):
    """AdaLoRA on `nn.Conv2d`: A is (r, in * kH * kW), and delta_W = B (A * E) reshaped to the kernel."""

    def __init__(self, base_layer: nn.Conv2d, adapter_name: str, **adapter_kwargs: Any):
        super().__init__()
        refuse_grouped_conv(base_layer, "AdaLoRA")
        self._init_adalora_layer(base_layer, base_layer.in_channels, base_layer.out_channels)
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **adapter_kwargs)

    def _fan_in(self) -> int:
        kernel_h, kernel_w = self.get_base_layer().kernel_size
        return self.in_features * kernel_h * kernel_w

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self._update_matrix(adapter_name).reshape(self.get_base_layer().weight.shape)

    def _adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        base = self.get_base_layer()
        return F.conv2d(
            x, self.get_delta_weight(adapter_name), stride=base.stride, padding=base.padding, dilation=base.dilation
        )


# ---------------------------------------------------------------------- dispatchers (AdaLoraModel.dispatchers)
dispatch_linear = wraps(is_linear_like, SVDLinear)  # Linear, Conv1D and quantized linear bases
dispatch_conv2d = wraps(nn.Conv2d, SVDConv2d)
SUPPORTED_LAYERS = "torch.nn.Linear, torch.nn.Conv2d, transformers' Conv1D and quantized linear layers"
