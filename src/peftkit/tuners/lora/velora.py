r"""VeLoRA (Miles et al. 2024, https://arxiv.org/abs/2405.17991): memory-light training of LoRA's A.

The forward pass is plain LoRA, `y = W x + s B A dropout(x)`. What changes is what the A
projection keeps for its backward pass: instead of the input x (tokens x in), one number per
group of `d = ceil(in / G)` features (G = `num_groups`), its projection onto a unit vector v:

    x -> zero-padded to G * d features, cut into G sub-tokens x_g (d each)
    c_g = <x_g, v>                                     kept: (tokens x G) instead of (tokens x in)
    x~_g = scale * c_g * v                             rebuilt in the backward pass
    grad_A = g^T x~      (approximate)                 grad_x = g A      (exact)

v (`lora_velora_embed`, a saved buffer of d entries) is, by `init_type`: "random" (a normalised
Gaussian, drawn once), "batch_average" (the normalised mean sub-token of each training batch,
refreshed every training forward) or "batch_average_once" (from the first training batch only).
A zero mean falls back to the normalised all-ones vector.

Outside training (or without grad) the layer is exactly LoRA, so VeLoRA adapters merge like LoRA
(`W + s B A`). Only `nn.Linear` / Conv1D layers take VeLoRA, as in peft.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from .._core.buffer_dict import BufferDict

if TYPE_CHECKING:
    from .layer import LoraLayer

_INIT_TYPES = ("batch_average_once", "batch_average", "random")


@dataclass
class VeloraConfig:
    """VeLoRA settings (`LoraConfig.velora_config`).

    Args:
        num_groups: Number of sub-tokens G each input row is cut into; more groups keep more
            of the activation (a better gradient) at more memory.
        scale: Factor applied to the rebuilt activations in the backward pass.
        init_type: How the projection vector v is chosen: "batch_average" (every training
            batch), "batch_average_once" (the first training batch) or "random".
    """

    num_groups: int = field(default=64, metadata={"help": "Sub-tokens per input row"})
    scale: float = field(default=1.0, metadata={"help": "Scale of the rebuilt activations"})
    init_type: Literal["batch_average", "batch_average_once", "random"] = field(
        default="batch_average", metadata={"help": "Choice of the projection vector"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int) or self.num_groups <= 0:
            raise ConfigError(f"`num_groups` should be positive, got {self.num_groups}.")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or self.scale <= 0:
            raise ConfigError(f"`scale` should be positive, got {self.scale}.")
        if self.init_type not in _INIT_TYPES:
            raise ConfigError(
                f"Unsupported `init_type` {self.init_type!r}. Supported values are 'batch_average_once', "
                "'batch_average', and 'random'."
            )


def group_width(in_features: int, num_groups: int) -> int:
    """d = ceil(in / G): the width of one sub-token."""
    return -(-in_features // num_groups)


def sub_tokens(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """x (..., in) as (rows, G, d), zero-padded on the right to G * d features."""
    width = group_width(x.shape[-1], num_groups)
    missing = num_groups * width - x.shape[-1]
    if missing:
        x = F.pad(x, (0, missing))
    return x.reshape(-1, num_groups, width)


def unit_vector(vector: torch.Tensor) -> torch.Tensor:
    """`vector / ||vector||` in fp32; the normalised all-ones vector when `vector` is zero."""
    vector = vector.float()
    norm = torch.linalg.vector_norm(vector)
    if norm == 0:
        vector = torch.ones_like(vector)
        norm = torch.linalg.vector_norm(vector)
    return vector / norm


class _CompressedProjection(torch.autograd.Function):
    """`x A^T` whose backward rebuilds x from its per-group projections onto v (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, vector: torch.Tensor, num_groups: int,
                scale: float) -> torch.Tensor:
        ctx.x_shape, ctx.x_dtype, ctx.in_features, ctx.scale = tuple(x.shape), x.dtype, x.shape[-1], scale
        coefficients = sub_tokens(x, num_groups) @ vector.to(x.dtype)  # (rows, G)
        ctx.save_for_backward(coefficients, weight, vector)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        coefficients, weight, vector = ctx.saved_tensors
        dtype = grad_out.dtype
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_rows @ weight.to(dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            rebuilt = coefficients.to(dtype).unsqueeze(-1) * vector.to(dtype)  # (rows, G, d)
            rebuilt = rebuilt.reshape(rebuilt.shape[0], -1)[:, : ctx.in_features] * ctx.scale
            grad_weight = (grad_rows.T @ rebuilt).to(weight.dtype)
        return grad_x, grad_weight, None, None, None


class VeloraVariant:
    """VeLoRA as a strategy object for a LoRA `Linear` (like `DoraVariant`): an additive variant."""

    def __init__(self, config: VeloraConfig) -> None:
        self.num_groups = config.num_groups
        self.scale = float(config.scale)
        self.init_type = config.init_type
        self.ready = False  # whether v holds a batch average (or the random draw) yet

    def init(self, layer: "LoraLayer", adapter_name: str) -> None:
        if "lora_velora_embed" not in layer._modules:
            layer.lora_velora_embed = BufferDict(persistent=True)
            layer.other_param_names = tuple(layer.other_param_names) + ("lora_velora_embed",)
        weight = layer.get_base_layer().weight
        device = "cpu" if weight.is_meta else weight.device
        width = group_width(layer.in_features, self.num_groups)
        if self.init_type == "random":
            vector = unit_vector(torch.randn(width, device=device, dtype=weight.dtype))
            self.ready = True
        else:
            vector = torch.zeros(width, device=device)
        layer.lora_velora_embed[adapter_name] = vector.to(weight.dtype)

    def _refresh(self, layer: "LoraLayer", adapter_name: str, x: torch.Tensor) -> None:
        """A training batch's normalised mean sub-token becomes v ("batch_average", or once)."""
        if self.init_type == "random" or (self.init_type == "batch_average_once" and self.ready):
            return
        with torch.no_grad():
            mean = sub_tokens(x.detach(), self.num_groups).reshape(-1, group_width(x.shape[-1], self.num_groups))
            current = layer.lora_velora_embed[adapter_name]
            layer.lora_velora_embed[adapter_name] = unit_vector(mean.mean(dim=0)).to(current.device, current.dtype)
        self.ready = True

    def adapter_output(
        self, layer: "LoraLayer", x: torch.Tensor, adapter_name: str, base_output: Optional[torch.Tensor]
    ) -> torch.Tensor:
        lora_a, lora_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        x = layer.apply_dropout(x, adapter_name).to(lora_a.weight.dtype)
        if layer.training and torch.is_grad_enabled():
            self._refresh(layer, adapter_name, x)
            hidden = _CompressedProjection.apply(
                x, lora_a.weight, layer.lora_velora_embed[adapter_name], self.num_groups, self.scale
            )
        else:
            hidden = lora_a(x)
        return lora_b(hidden) * layer.scaling[adapter_name]

    def adapter_state(self, layer: "LoraLayer", adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
        """v is saved as `<module>.lora_velora_embed` (peft's key)."""
        return {f"{prefix}.lora_velora_embed": layer.lora_velora_embed[adapter_name]}


def check_velora_target(layer: "LoraLayer", config: Optional[VeloraConfig]) -> None:
    """peft's refusals: VeLoRA adapts Linear layers only."""
    if config is None:
        return
    base = layer.get_base_layer()
    if isinstance(base, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        raise ConfigError("VeLoRA does not support adapting conv layers; exclude them via exclude_modules.")
    raise ConfigError(
        f"{type(base).__name__} does not support VeLoRA, please set `velora_config=None` (or exclude this module)."
    )
