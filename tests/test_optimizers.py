"""`peftkit.optimizers`: fused AdamW (the same updates as the default one, fused where torch has the kernel), the Riemannian-preconditioned LoRA optimizer and LoRA-FA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import LoraConfig, get_peft_model
from peftkit.optimizers import adamw
from peftkit.optimizers.adamw import can_fuse
from tests.tiny_models import llama, lm_inputs


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


# ---------------------------------------------------------------------------------------------- Riemannian
def _riemannian_model():
    from peftkit import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def test_riemannian_step_preconditions_lora_gradients_by_formula():
    from peftkit.optimizers import create_riemannian_optimizer

    model = _riemannian_model()
    optimizer = create_riemannian_optimizer(model, torch.optim.SGD, lr=0.1, reg=0.05)
    model(**lm_inputs()).loss.backward()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a0, b0, ga, gb = a.detach().clone(), b.detach().clone(), a.grad.clone(), b.grad.clone()
    eye = torch.eye(4)
    optimizer.step()
    expected_a = a0 - 0.1 * torch.linalg.pinv(b0.T @ b0 + 0.05 * eye) @ ga
    expected_b = b0 - 0.1 * gb @ torch.linalg.pinv(a0 @ a0.T + 0.05 * eye)
    assert torch.allclose(a, expected_a, atol=1e-6) and torch.allclose(b, expected_b, atol=1e-6)


def test_riemannian_optimizer_matches_peft_and_lowers_the_loss():
    peft_optimizers = pytest.importorskip("peft.optimizers")
    from peftkit.optimizers import create_riemannian_optimizer

    ours, theirs = _riemannian_model(), _riemannian_model()
    ours_opt = create_riemannian_optimizer(ours, torch.optim.AdamW, lr=1e-2, weight_decay=0.0)
    theirs_opt = peft_optimizers.create_riemannian_optimizer(theirs, torch.optim.AdamW, lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(5):
        for model, optimizer in ((ours, ours_opt), (theirs, theirs_opt)):
            loss = model(**lm_inputs()).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    assert losses[-1] < losses[0]


def test_riemannian_optimizer_refusals():
    from peftkit.optimizers import create_riemannian_optimizer

    model = _riemannian_model()
    with pytest.raises(TypeError, match="subclass of torch.optim.Optimizer"):
        create_riemannian_optimizer(model, object, lr=0.1)
    with pytest.raises(ValueError, match="requires a closure"):
        create_riemannian_optimizer(model, torch.optim.LBFGS, lr=0.1)
    with pytest.raises(ValueError, match="did not find any trainable lora_A/lora_B"):
        create_riemannian_optimizer(llama(), torch.optim.SGD, lr=0.1)
    optimizer = create_riemannian_optimizer(model, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="does not support closures"):
        optimizer.step(lambda: None)
