r"""Riemannian-preconditioned LoRA (Zhang & Pilanci 2024, https://arxiv.org/abs/2402.02347).

Plain gradient steps on W = B A see A and B at the scale of each other; the scaled-gradient
(Riemannian) direction removes that coupling with an r x r preconditioner per pair, applied to
the gradients before the base optimizer's step:

    g_A <- (B^T B + reg I_r)^+ g_A          (r x r on the left)
    g_B <- g_B (A A^T + reg I_r)^+          (r x r on the right)

`reg` damps the inverse when a factor is (near) rank-deficient (at init, B = 0). The r x r
products are computed in at least float32 and the results written back in the gradients' dtype.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from ..tuners.lora.layer import LoraLayer


def lora_pairs(model: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(A, B) weights of every LoRA adapter on a linear layer whose two factors both train.

    Embedding LoRA (`lora_embedding_A/B`) and other trained tensors (DoRA's magnitude, biases) are
    left to the base optimizer as they are.
    """
    pairs = []
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, down in module.lora_A.items():
            up = module.lora_B[name] if name in module.lora_B else None
            a, b = getattr(down, "weight", None), getattr(up, "weight", None)
            if isinstance(a, nn.Parameter) and isinstance(b, nn.Parameter) and a.ndim == b.ndim == 2:
                if a.requires_grad and b.requires_grad:
                    pairs.append((a, b))
    return pairs


def _damped_inverse(gram: torch.Tensor, reg: float) -> torch.Tensor:
    eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    return torch.linalg.pinv(gram + reg * eye)


@torch.no_grad()
def precondition(pairs: list[tuple[nn.Parameter, nn.Parameter]], reg: float) -> None:
    """Replace each pair's gradients by the Riemannian directions (module docstring), in place."""
    for a, b in pairs:
        if a.grad is None and b.grad is None:
            continue
        dtype = torch.promote_types(a.dtype, torch.float32)
        a_value, b_value = a.detach().to(dtype), b.detach().to(dtype)
        if a.grad is not None:
            a.grad.copy_((_damped_inverse(b_value.T @ b_value, reg) @ a.grad.to(dtype)).to(a.grad.dtype))
        if b.grad is not None:
            b.grad.copy_((b.grad.to(dtype) @ _damped_inverse(a_value @ a_value.T, reg)).to(b.grad.dtype))


def create_riemannian_optimizer(
    model: nn.Module, optimizer_cls: type[Optimizer], *, lr: float, reg: float = 1e-2, **kwargs: Any
) -> Optimizer:
    """An `optimizer_cls` over the trainable parameters of `model` whose `step` first preconditions the
    LoRA gradients (module docstring); every other trainable tensor is updated by `optimizer_cls` unchanged.

    Args:
        model: The LoRA model (usually a `PeftModel`).
        optimizer_cls: A `torch.optim.Optimizer` subclass whose `step` needs no closure (AdamW, SGD, ...).
        lr: Learning rate of the base optimizer.
        reg: Damping added to the r x r matrices' diagonal before inversion.
        kwargs: Passed on to `optimizer_cls` (weight_decay, betas, ...).
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer)):
        raise TypeError(f"optimizer_cls must be a subclass of torch.optim.Optimizer, got {optimizer_cls!r}.")
    pairs = lora_pairs(model)
    if not pairs:
        raise ValueError(
            "create_riemannian_optimizer did not find any trainable lora_A/lora_B parameter pairs on the model. "
            "The Riemannian preconditioner only applies to LoRA-style adapters."
        )
    closure = inspect.signature(optimizer_cls.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(
            f"{optimizer_cls.__name__} requires a closure and re-evaluates the objective inside step(); the "
            "preconditioned gradients would be overwritten. Use an optimizer whose step() takes no closure "
            "(SGD, AdamW, ...)."
        )

    class RiemannianPreconditionedOptimizer(optimizer_cls):  # type: ignore[misc, valid-type]
        @torch.no_grad()
        def step(self, closure: Optional[Callable] = None) -> Any:
            if closure is not None:  # it would recompute (and overwrite) the gradients after preconditioning
                raise ValueError(
                    "The Riemannian-preconditioned optimizer does not support closures: a closure recomputes the "
                    "gradients inside step(), after they were preconditioned."
                )
            precondition(pairs, reg)
            return super().step()

    return RiemannianPreconditionedOptimizer([p for p in model.parameters() if p.requires_grad], lr=lr, **kwargs)
