r"""MiSS layers: one trained shard shared by every column block of the frozen weight.

Default (and "mini", and init False): the shard D (r x out, saved as `miss_block`) is added to
each r-wide column block of W, so with x cut into r-wide pieces x_1 .. x_n (zero-padded):

    W = [ W_1 | W_2 | ... | W_n ]          W_k: out x r
    delta_W = [ D^T | D^T | ... | D^T ]    delta_W[o, i] = D[i mod r, o]
    y = W x + b + (x_1 + ... + x_n)^T D    (the sum of the pieces, then one r x out matmul)

"mini": D is r x mini_r, repeated out / mini_r times along out_features.

"bat": per out-block an r x r matrix B_j (saved as `miss_block`, out/r x r x r); every r x r block
W_jk of W (row block j, column block k) is replaced by

    W_jk <- W_jk (I + B_j) + B_j            unmerge: W_jk <- (W_jk - B_j) (I + B_j)^-1

and the forward is `x W'^T + b` with W' built from the (dequantized) base weight. A layer keeps
the variant of its first adapter (`miss_fn`), as in peft. Every variant starts as a no-op except
init_weights=False (Kaiming-uniform D).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...quantization.weights import is_quantized, read_weight
from .._core.base_layers import base_of, linear_features
from .._core.layer import BaseTunerLayer

SUPPORTED_LAYERS = "`torch.nn.Linear` (optionally quantized)"


def bat_blocks(weight: torch.Tensor, r: int) -> torch.Tensor:
    """(out, in) -> (in/r, out/r, r, r): block [k, j] is rows j*r.., columns k*r.. of `weight`."""
    out_features, in_features = weight.shape
    return weight.reshape(out_features // r, r, in_features // r, r).permute(2, 0, 1, 3)


def from_bat_blocks(blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return blocks.permute(1, 2, 0, 3).reshape(shape)


class MissLayer(BaseTunerLayer, nn.Module):
    """What every MiSS layer holds: per adapter its shard `miss_block`, r, mini_r and input dropout."""

    adapter_layer_names = ("miss_block",)
    other_param_names = ("miss_r", "miss_dropout", "miss_mini_r")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.miss_r: dict[str, int] = {}
        self.miss_mini_r: dict[str, int] = {}
        self.miss_dropout = nn.ModuleDict({})
        self.miss_block = nn.ParameterDict({})
        self.in_features, self.out_features = linear_features(self.get_base_layer())
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)
        # As peft: the layer's variant is its first adapter's.
        self.miss_fn = layer_kwargs.get("init_weights", True)

    def update_layer(
        self, adapter_name: str, r: int, mini_r: int = 1, miss_dropout: float = 0.0, init_weights: Any = True
    ) -> None:
        """Add (or replace) adapter `adapter_name`: a zero (or random) shard of the variant's shape."""
        if r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {r}")
        if r > self.in_features:
            raise ConfigError(f"`r` ({r}) must be less than or equal to in_features ({self.in_features})")
        if init_weights == "bat":
            if self.in_features % r != 0 or self.out_features % r != 0:
                raise ConfigError("The weight matrix must be fully divisible into [r, r] blocks.")
            shape: tuple[int, ...] = (self.out_features // r, r, r)
        elif init_weights == "mini":
            if self.out_features % mini_r != 0:
                raise ConfigError(
                    "mini_r is divided along the out_features dimension. For optimal performance and implementation "
                    f"simplicity, it is recommended that out_features be divisible by mini_r. Error: "
                    f"{self.out_features} % {mini_r} != 0"
                )
            shape = (r, mini_r)
        else:
            shape = (r, self.out_features)
        self.miss_r[adapter_name] = r
        self.miss_mini_r[adapter_name] = mini_r
        self.miss_dropout[adapter_name] = nn.Dropout(p=miss_dropout) if miss_dropout > 0.0 else nn.Identity()
        block = torch.zeros(shape)
        if init_weights is False:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.miss_block[adapter_name] = nn.Parameter(block)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _active_here(self) -> list[str]:
        return [name for name in self._active_adapter if name in self.miss_block]

    def _shard(self, adapter_name: str) -> torch.Tensor:
        """D as r x out ("mini": its r x mini_r block repeated along out_features)."""
        shard = self.miss_block[adapter_name]
        if self.miss_fn == "mini":
            shard = shard.repeat(1, self.out_features // self.miss_mini_r[adapter_name])
        return shard

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`base(x) + (sum of x's r-wide pieces) D` per active adapter; "bat": `x W'^T + b`."""
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = self._active_here()
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        previous_dtype = x.dtype
        if self.miss_fn == "bat":
            weight = read_weight(self.get_base_layer())
            for name in active:
                weight = self._bat_fold(name, weight)
            bias = self.get_base_layer().bias
            result = F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
            return result.to(previous_dtype)
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            shard = self._shard(name)
            r = shard.shape[0]
            pieces = self.miss_dropout[name](x.to(shard.dtype))
            if pieces.shape[-1] % r:
                pieces = F.pad(pieces, (0, r - pieces.shape[-1] % r))
            result = result + pieces.reshape(*pieces.shape[:-1], -1, r).sum(dim=-2) @ shard
        return result.to(previous_dtype)

    # ------------------------------------------------------------------ merging
    def get_delta_weight(
        self, adapter_name: str, orig_weight: Optional[torch.Tensor] = None, reverse: bool = False
    ) -> torch.Tensor:
        """delta_W (out x in): the shard tiled over the column blocks; "bat" needs `orig_weight` and gives
        `W (I + B) + B - W` (with `reverse`, peft's unmerged full weight `(W - B) (I + B)^-1`)."""
        if self.miss_fn == "bat":
            if orig_weight is None:
                raise ConfigError("MiSS 'bat' updates depend on the base weight: pass orig_weight.")
            if reverse:
                return self._bat_unfold(adapter_name, orig_weight)
            return self._bat_fold(adapter_name, orig_weight) - orig_weight
        shard = self._shard(adapter_name)
        r = shard.shape[0]
        return shard.T.repeat(1, -(-self.in_features // r))[:, : self.in_features]

    def _bat_fold(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        block = self.miss_block[adapter_name]
        dtype = torch.promote_types(block.dtype, weight.dtype)
        blocks = bat_blocks(weight.to(dtype), block.shape[-1])
        block = block.to(dtype)
        return from_bat_blocks(blocks + blocks @ block + block, weight.shape)

    def _bat_unfold(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        block = self.miss_block[adapter_name].detach()
        r = block.shape[-1]
        dtype = torch.promote_types(block.dtype, weight.dtype)
        inverse = torch.linalg.inv(torch.eye(r, device=block.device, dtype=torch.float32) + block.float()).to(dtype)
        blocks = bat_blocks(weight.to(dtype), r)
        return from_bat_blocks((blocks - block.to(dtype)) @ inverse, weight.shape)

    def fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Default / mini: W + delta_W; "bat": W_jk (I + B_j) + B_j blockwise."""
        if self.miss_fn == "bat":
            return self._bat_fold(adapter_name, weight).detach().to(weight.dtype), bias
        return weight + self.get_delta_weight(adapter_name).detach().to(weight.dtype), bias

    def unfold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.miss_fn == "bat":
            return self._bat_unfold(adapter_name, weight).to(weight.dtype), bias
        return weight - self.get_delta_weight(adapter_name).detach().to(weight.dtype), bias

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def __repr__(self) -> str:
        return "miss." + super().__repr__()


class MissLinear(MissLayer):
    """MiSS on `nn.Linear` or a quantized linear layer."""


def dispatch_linear(target: nn.Module, adapter_name: str, **layer_kwargs: Any) -> Optional[nn.Module]:
    base = base_of(target)
    if isinstance(base, nn.Linear) or is_quantized(base):
        return MissLinear(target, adapter_name, **layer_kwargs)
    return None
