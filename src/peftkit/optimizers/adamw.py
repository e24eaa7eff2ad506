"""AdamW over adapter parameters, fused where torch can (what transformers' Trainer picks by default).

Adapters are many small tensors (LoRA r = 16 on 56 layers: 112 tensors, 1.25 M values), so the
for-loop AdamW pays per-tensor Python and kernel-launch costs: 7.2 ms a step on CPU against 1.1 ms
fused (torch 2.13, 2 threads; `bench/RESULTS.md`).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

_FUSED_DEVICES = ("cpu", "cuda")


def can_fuse(params: list[torch.Tensor]) -> bool:
    """Plain floating-point parameters on a device with a fused AdamW kernel (not DTensor or subclasses)."""
    return bool(params) and all(
        type(p) in (torch.Tensor, nn.Parameter) and p.is_floating_point() and p.device.type in _FUSED_DEVICES
        for p in params
    )


def adamw(params: Iterable[torch.Tensor], lr: float, **kwargs) -> torch.optim.AdamW:
    """`torch.optim.AdamW(params, lr, fused=True)` when `can_fuse`, else the default implementation."""
    params = list(params)
    return torch.optim.AdamW(params, lr=lr, fused=can_fuse(params) or None, **kwargs)
