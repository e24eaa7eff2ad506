r"""OFT layers: a frozen base layer whose input (or, for embeddings, output) space is rotated.

    Linear (and quantized linear):  y = W (x R) + b = (W R^T) x + b      R: block-diagonal, d = in_features
    Conv2d:                          y = conv(x, W R^T) + b               W viewed (out, in_channels * kh * kw)
    Embedding:                       y = E[ids] R                          d = embedding_dim

R = diag(R_1, ..., R_n) comes from skew-symmetric parameters (`rotation.py`); with
`init_weights=True` they start at zero, R = I, and a new adapter is a no-op. Saved as
`<module>.oft_R.weight` (`oft_embedding_R.weight` for embeddings), shape (r or 1, b(b-1)/2).

Where the rotation is applied, and why (R itself, d x d, is never formed):

- Linear: on the input, `x R` as n batched (b x b) products: tokens * d * b multiply-adds. Rotating
  the weight instead costs out * d * b and, in training, a full tokens * out * d gradient of the
  rotated weight; the input side is cheaper in training and whenever tokens < out_features
  (decoding, typical prompts), and it leaves the (possibly quantized) base layer untouched.
- Conv2d: on the kernel, `W R^T` (out * d * b), then the base convolution. Rotating every
  receptive field of the input would need the k^2-times larger unfolded input.
- Embedding: on the looked-up rows (tokens * d * b), not the whole table.
- Merging rotates the weight (`W R^T`, or `E R` for embeddings); unmerging applies the batched
  block inverses (the Neumann form of R is only approximately orthogonal).

Several active adapters on one layer compose in the order merging folds them (W R_1^T R_2^T ...),
so merged and unmerged outputs agree; for a Linear that means the last active adapter's rotation
meets the input first.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from ...errors import ConfigError
from ...quantization.weights import is_quantized
from .._core.base_layers import refuse_grouped_conv, wraps
from .._core.layer import BaseTunerLayer
from .rotation import OFTRotationModule, rotate_rows

SUPPORTED_LAYERS = "torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding and quantized linear layers"
SCALE_WARNING = "Scaling operation for OFT not supported! Automatically set scale to 1."
UNSCALE_WARNING = "Unscaling operation for OFT not supported! Keeping scale to 1."


def adjust_oft_parameters(in_features: int, params: int) -> int:
    """The divisor of `in_features` nearest to `params` (ties: the smaller); `in_features` if params >= it."""
    if params >= in_features:
        return in_features
    higher = params
    while higher <= in_features and in_features % higher != 0:
        higher += 1
    lower = params
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if params - lower <= higher - params else higher


def resolve_blocks(dim: int, r: int, oft_block_size: int) -> tuple[int, int]:
    """(r, block size) with r * block = dim, from whichever of the two the config gives (warns, as peft, when
    the given value does not divide `dim` and is moved to the nearest divisor)."""
    if r == 0 and oft_block_size != 0:
        if dim % oft_block_size != 0 or oft_block_size > dim:
            adjusted = adjust_oft_parameters(dim, oft_block_size)
            warnings.warn(
                f"Invalid `oft_block_size` ({oft_block_size})! Adjusted `oft_block_size` to ({adjusted}).", stacklevel=5
            )
            oft_block_size = adjusted
        return dim // oft_block_size, oft_block_size
    if r != 0 and oft_block_size == 0:
        if dim % r != 0 or r > dim:
            adjusted = adjust_oft_parameters(dim, r)
            warnings.warn(f"Invalid `r` ({r})! Adjusted `r` to ({adjusted}).", stacklevel=5)
            r = adjusted
        return r, dim // r
    raise ConfigError(f"Exactly one of r ({r}) and oft_block_size ({oft_block_size}) must be non-zero.")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merging arithmetic runs in float32 at least (half-precision CPU matmuls are slow, inverses missing)."""
    return torch.promote_types(dtype, torch.float32)


class OFTLayer(BaseTunerLayer, nn.Module):
    """What every OFT layer shares: one `OFTRotationModule` per adapter, multiplicative merging."""

    adapter_layer_names = ("oft_R", "oft_embedding_R")
    other_param_names = ("r", "oft_block_size", "oft_dropout", "module_dropout")
    #: Which of `adapter_layer_names` this kind of layer fills.
    rotation_attr = "oft_R"

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.oft_R = nn.ModuleDict({})
        self.oft_embedding_R = nn.ModuleDict({})
        # peft's layout: the (unused) dropout modules; module_dropout has no effect in peft 0.21.2.
        self.oft_dropout = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}
        self.module_dropout: dict[str, float] = {}
        self.fan_in_fan_out = False
        self.cast_input_dtype_enabled = True
        self._init_geometry(self.get_base_layer())
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    # ------------------------------------------------------------------ geometry (per layer kind)
    def _init_geometry(self, base: nn.Module) -> None:
        """Set `in_features` / `out_features` from the wrapped base layer."""
        raise NotImplementedError

    @property
    def rotated_features(self) -> int:
        """d: the dimension R acts on."""
        return self.in_features

    def _kernel_size(self) -> tuple[int, ...]:
        return (0, 0)

    # ------------------------------------------------------------------ adapters
    @property
    def rotations(self) -> nn.ModuleDict:
        """adapter name -> OFTRotationModule (`oft_R`, or `oft_embedding_R` for embeddings)."""
        return getattr(self, self.rotation_attr)

    def update_layer(
        self,
        adapter_name: str,
        r: int = 0,
        oft_block_size: int = 32,
        module_dropout: float = 0.0,
        coft: bool = False,
        eps: float = 6e-5,
        block_share: bool = False,
        init_weights: bool = True,
        use_cayley_neumann: bool = True,
        num_cayley_neumann_terms: int = 5,
        inference_mode: bool = False,
    ) -> None:
        """Add (or replace) adapter `adapter_name`: n = d / b blocks of size b (one stored with block_share)."""
        dim = self.rotated_features
        r, block_size = resolve_blocks(dim, r, oft_block_size)
        self.rotations[adapter_name] = OFTRotationModule(
            1 if block_share else r,
            block_size * (block_size - 1) // 2,
            block_size,
            dim,
            coft=coft,
            eps=eps,
            block_share=block_share,
            kernel_size=self._kernel_size(),
            use_cayley_neumann=use_cayley_neumann,
            num_cayley_neumann_terms=num_cayley_neumann_terms,
        )
        self.oft_dropout[adapter_name] = nn.Identity()
        self.reset_oft_parameters(adapter_name, init_weights)
        self.r[adapter_name] = r
        self.oft_block_size[adapter_name] = block_size
        self.module_dropout[adapter_name] = module_dropout
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name], inference_mode=inference_mode)

    def reset_oft_parameters(self, adapter_name: str, init_weights: Any = True) -> None:
        """True: zeros (R = I, a no-op); False: N(0, 0.1^2) entries (a random rotation near I)."""
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            if init_weights is False:
                nn.init.normal_(container[adapter_name].weight, mean=0.0, std=0.1)
            elif init_weights is True:
                nn.init.zeros_(container[adapter_name].weight)
            else:
                raise ConfigError(f"Unknown initialization {init_weights=}")

    def adjust_oft_parameters(self, in_features: int, params: int) -> int:
        """peft's method name for `adjust_oft_parameters`."""
        return adjust_oft_parameters(in_features, params)

    def _active_here(self) -> list[str]:
        return [name for name in self._active_adapter if name in self.rotations]

    def _blocks(self, adapter_name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return self.rotations[adapter_name].rotation_blocks(dtype)

    def _num_blocks(self, adapter_name: str) -> int:
        return self.rotations[adapter_name].num_blocks

    def _adapter_dtype(self, adapter_name: str) -> torch.dtype:
        return self.rotations[adapter_name].weight.dtype

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense d x d rotation R of `adapter_name` (peft's API; OFT's merge multiplies, see `fold`)."""
        return self.rotations[adapter_name].get_weight()

    # ------------------------------------------------------------------ merging (multiplicative)
    def _rotate_merged(self, adapter_name: str, weight: torch.Tensor, inverse: bool) -> torch.Tensor:
        """W R^T (Linear/Conv2d, weight viewed (out, d)) or its undoing; overridden for embeddings."""
        blocks = self._blocks(adapter_name, _compute_dtype(self._adapter_dtype(adapter_name))).detach()
        if inverse:
            blocks = torch.linalg.inv(blocks)
        flat = weight.reshape(weight.shape[0], -1).to(blocks.dtype)
        rotated = rotate_rows(flat, blocks.transpose(-2, -1), self._num_blocks(adapter_name))
        return rotated.reshape(weight.shape).to(weight.dtype)

    def fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- W R^T (the bias is untouched)."""
        return self._rotate_merged(adapter_name, weight, inverse=False), bias

    def unfold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W <- W (R^-1)^T, with the b x b block inverses."""
        return self._rotate_merged(adapter_name, weight, inverse=True), bias

    # ------------------------------------------------------------------ peft's scaling API (a no-op for OFT)
    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.rotations:
            warnings.warn(SCALE_WARNING, stacklevel=2)

    def scale_layer(self, scale: float) -> None:
        if scale != 1 and self._active_here():
            warnings.warn(SCALE_WARNING, stacklevel=2)

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        if self._active_here():
            warnings.warn(UNSCALE_WARNING, stacklevel=2)

    def _adapters_off(self) -> bool:
        """Whether the forward is the base layer's alone (adapters disabled -- unmerging first -- or merged)."""
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return True
        return self.merged or not self._active_here()

    def __repr__(self) -> str:
        return "oft." + super().__repr__()


class Linear(OFTLayer):
    """OFT on `nn.Linear` or a quantized linear layer: `y = base(x R)`."""

    def _init_geometry(self, base: nn.Module) -> None:
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Rotate the input by the active adapters (last one first: the order merging composes them)."""
        if self._adapters_off():
            return self.base_layer(x, *args, **kwargs)
        previous_dtype = x.dtype
        active = self._active_here()
        hidden = x
        for name in reversed(active):
            blocks = self._blocks(name)
            hidden = rotate_rows(hidden.to(blocks.dtype), blocks, self._num_blocks(name))
        return self.base_layer(hidden.to(previous_dtype), *args, **kwargs).to(previous_dtype)


class Conv2d(OFTLayer):
    """OFT on `nn.Conv2d`: each filter's receptive field (in_channels * kh * kw) is rotated, `conv(x, W R^T)`."""

    def _init_geometry(self, base: nn.Module) -> None:
        refuse_grouped_conv(base, "OFT")
        if any(d > 1 for d in base.dilation):
            raise ConfigError("Conv2d with dilation > 1 is not supported by OFT.")
        self.in_features, self.out_features = base.in_channels, base.out_channels

    @property
    def rotated_features(self) -> int:
        kernel_height, kernel_width = self.get_base_layer().kernel_size
        return self.in_features * kernel_height * kernel_width

    def _kernel_size(self) -> tuple[int, ...]:
        return tuple(self.get_base_layer().kernel_size)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base convolution with its kernel rotated by each active adapter, in merge order."""
        if self._adapters_off():
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()  # (nn.Conv2d.forward takes no other arguments)
        weight = base.weight
        for name in self._active_here():
            blocks = self._blocks(name)
            flat = weight.reshape(weight.shape[0], -1).to(blocks.dtype)
            weight = rotate_rows(flat, blocks.transpose(-2, -1), self._num_blocks(name)).reshape(weight.shape)
        return base._conv_forward(x, weight.to(base.weight.dtype), base.bias)


class Embedding(OFTLayer):
    """OFT on `nn.Embedding`: the looked-up rows are rotated, `E[ids] R` (saved as `oft_embedding_R`)."""

    rotation_attr = "oft_embedding_R"

    def _init_geometry(self, base: nn.Module) -> None:
        # peft's convention: in_features is the dimension that is rotated.
        self.in_features, self.out_features = base.embedding_dim, base.num_embeddings

    def _rotate_merged(self, adapter_name: str, weight: torch.Tensor, inverse: bool) -> torch.Tensor:
        """E R (or E R^-1): the table's rows are rotated as the looked-up ones are."""
        blocks = self._blocks(adapter_name, _compute_dtype(self._adapter_dtype(adapter_name))).detach()
        if inverse:
            blocks = torch.linalg.inv(blocks)
        return rotate_rows(weight.to(blocks.dtype), blocks, self._num_blocks(adapter_name)).to(weight.dtype)

    def fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """E <- E R."""
        return self._rotate_merged(adapter_name, weight, inverse=False), bias

    def unfold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """E <- E R^-1."""
        return self._rotate_merged(adapter_name, weight, inverse=True), bias

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Look up, then rotate the rows by each active adapter in turn."""
        if self._adapters_off():
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self._active_here():
            blocks = self._blocks(name)
            result = rotate_rows(result.to(blocks.dtype), blocks, self._num_blocks(name))
        return result.to(out_dtype)


def _is_linear(base: nn.Module) -> bool:
    return isinstance(base, nn.Linear) or is_quantized(base)


# ---------------------------------------------------------------------- dispatchers (OFTModel.dispatchers)
dispatch_embedding = wraps(nn.Embedding, Embedding)
dispatch_conv2d = wraps(nn.Conv2d, Conv2d)
dispatch_linear = wraps(_is_linear, Linear)
