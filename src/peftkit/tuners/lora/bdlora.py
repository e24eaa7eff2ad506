r"""BD-LoRA: block-diagonal LoRA factors, for multi-LoRA serving on sharded models.

With N blocks, one of the two factors of a layer is block-diagonal:

    A = diag(A_1, ..., A_N)   A_i: (r / N) x (in / N)        for row-sharded layers (out / down proj)
    B = diag(B_1, ..., B_N)   B_i: (out / N) x (r / N)       for column-sharded layers (q, k, v, up, gate)
    y = W x + s B A dropout(x)

so that under N-way tensor parallelism each shard's LoRA product needs no extra communication.
Which factor is block-diagonal is chosen per module by `BdLoraConfig.target_modules_bd_a / _bd_b`
(a pattern matches when it is a substring of the module's full name). A block-diagonal factor is a
`BlockDiagonalLinear` whose `weight` stacks the N blocks row-wise, shape (out, in / N) -- peft's
checkpoint layout (`lora_A.weight` of shape (r, in / N), `lora_B.weight` of shape (out, r / N)).

A block-diagonal A starts Kaiming-uniform (a = 0) and a block-diagonal B at zero, whatever
`init_lora_weights` says (as peft). Merging adds `s B A` with the dense block-diagonal factors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ...errors import ConfigError

if TYPE_CHECKING:
    from .layer import LoraLayer


@dataclass
class BdLoraConfig:
    """BD-LoRA settings (`LoraConfig.use_bdlora`).

    Args:
        target_modules_bd_a: Patterns (substrings of module names) whose LoRA A is block-diagonal,
            e.g. the out / down projections.
        target_modules_bd_b: Patterns whose LoRA B is block-diagonal, e.g. q / k / v / up / gate.
        nblocks: Number of diagonal blocks (the tensor-parallel degree when serving).
        match_strict: Every targeted module must match one of the two lists (else an error);
            False lets unmatched modules keep plain LoRA.
    """

    target_modules_bd_a: Optional[list[str]] = field(default=None, metadata={"help": "Modules with block-diagonal A"})
    target_modules_bd_b: Optional[list[str]] = field(default=None, metadata={"help": "Modules with block-diagonal B"})
    nblocks: int = field(default=1, metadata={"help": "Number of diagonal blocks"})
    match_strict: bool = field(default=True, metadata={"help": "Every target must match A or B patterns"})

    def __post_init__(self) -> None:
        overlap = set(self.target_modules_bd_a or []) & set(self.target_modules_bd_b or [])
        if overlap:
            raise ConfigError(
                "Found overlapping modules in target_modules_bd lists:"
                f"{self.target_modules_bd_a} (A) and {self.target_modules_bd_b} (B); a module can have a "
                "block-diagonal A or B, not both."
            )
        if isinstance(self.nblocks, bool) or not isinstance(self.nblocks, int) or self.nblocks <= 0:
            raise ConfigError(f"BdLoraConfig.nblocks={self.nblocks!r} is invalid; it must be a positive integer.")


def block_diagonal_side(config: BdLoraConfig, key: str) -> Optional[str]:
    """"A", "B" or None (plain LoRA): which factor of module `key` is block-diagonal; peft's errors otherwise."""
    in_a = any(pattern in key for pattern in config.target_modules_bd_a or [])
    in_b = any(pattern in key for pattern in config.target_modules_bd_b or [])
    if in_a and in_b:
        raise ConfigError(f"Target {key} matches both A and B block-diagonal patterns")
    if config.match_strict and not (in_a or in_b):
        raise ConfigError(
            f"Target {key} matches neither A nor B block-diagonal patterns. If this is intentional, set "
            "match_strict=False in BdLoraConfig during initialization."
        )
    return "A" if in_a else "B" if in_b else None


class BlockDiagonalLinear(nn.Module):
    """`y = diag(W_1, ..., W_N) x` without the zeros: `weight` (out, in / N) holds the blocks W_i (out/N, in/N) stacked."""

    def __init__(self, in_features: int, out_features: int, nblocks: int, init_zero: bool = False) -> None:
        super().__init__()
        if in_features % nblocks or out_features % nblocks:
            raise ConfigError(
                f"self.in_features={in_features} or self.out_features={out_features} not divisible by {nblocks}: "
                "BD-LoRA needs the rank and the block-diagonal side's features to be multiples of nblocks."
            )
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.weight = nn.Parameter(torch.empty(out_features, in_features // nblocks))
        if init_zero:
            nn.init.zeros_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        blocks = x.reshape(-1, self.nblocks, self.in_features // self.nblocks)  # (rows, N, in/N)
        weight = self.weight.view(self.nblocks, self.out_features // self.nblocks, -1)  # (N, out/N, in/N)
        out = torch.einsum("rni,noi->rno", blocks.to(weight.dtype), weight)
        return out.reshape(*lead, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) block-diagonal matrix."""
        return torch.block_diag(*self.weight.chunk(self.nblocks, dim=0))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}"


def dense(factor: nn.Module) -> torch.Tensor:
    return factor.dense_weight() if isinstance(factor, BlockDiagonalLinear) else factor.weight


class BdLoraVariant:
    """BD-LoRA as a strategy object for a LoRA `Linear`: an additive variant with one block-diagonal factor."""

    def __init__(self, side: Optional[str], nblocks: int) -> None:
        self.side, self.nblocks = side, nblocks

    def init(self, layer: "LoraLayer", adapter_name: str) -> None:
        rank = layer.r[adapter_name]
        if self.side == "A":
            layer.lora_A[adapter_name] = BlockDiagonalLinear(layer.in_features, rank, self.nblocks)
        elif self.side == "B":
            layer.lora_B[adapter_name] = BlockDiagonalLinear(rank, layer.out_features, self.nblocks, init_zero=True)

    @staticmethod
    def adapter_output(
        layer: "LoraLayer", x: torch.Tensor, adapter_name: str, base_output: Optional[torch.Tensor]
    ) -> torch.Tensor:
        lora_a, lora_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        x = layer.apply_dropout(x, adapter_name).to(lora_a.weight.dtype)
        return lora_b(lora_a(x)) * layer.scaling[adapter_name]

    @staticmethod
    def delta_weight(layer: "LoraLayer", adapter_name: str) -> torch.Tensor:
        """s B A with the dense block-diagonal factor(s), (out, in)."""
        return dense(layer.lora_B[adapter_name]) @ dense(layer.lora_A[adapter_name]) * layer.scaling[adapter_name]
