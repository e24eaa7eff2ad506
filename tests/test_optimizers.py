"""`peftkit.optimizers.adamw`: fused AdamW where torch has the kernel, the same updates as the default one."""

from __future__ import annotations

import torch
from torch import nn

from peftkit import LoraConfig, get_peft_model
from peftkit.optimizers import adamw
from peftkit.optimizers.adamw import can_fuse


def _trained_lora_weights(fused: bool | None) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)),
                           LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=1e-2) if fused else torch.optim.AdamW(params, lr=1e-2, foreach=False)
    x = torch.randn(16, 12)
    for _ in range(5):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in params]


def test_adamw_is_fused_for_plain_float_parameters_and_matches_the_default() -> None:
    params = [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(5))]
    assert can_fuse(params) and adamw(params, lr=1e-3).defaults["fused"] is True
    for fused, default in zip(_trained_lora_weights(True), _trained_lora_weights(False)):
        torch.testing.assert_close(fused, default, atol=1e-6, rtol=1e-5)


def test_adamw_falls_back_where_no_fused_kernel_applies() -> None:
    assert not can_fuse([])
    assert not can_fuse([torch.zeros(2, dtype=torch.complex64)])
    meta = nn.Parameter(torch.empty(2, device="meta"))
    assert not can_fuse([meta]) and not adamw([meta], lr=1e-3).defaults["fused"]
