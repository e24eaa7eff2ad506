r"""LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): B learns faster than A.

With A and B at one learning rate, LoRA's feature learning is inefficient for wide layers; LoRA+
sets `lr_B = loraplus_lr_ratio * lr_A`. The parameter groups, in peft's order (so
`optimizer.param_groups[i]` means the same thing in both libraries):

    0  A (and every other trainable tensor)           lr                       weight decay
    1  A and B of LoRA on embedding layers            loraplus_lr_embedding    weight decay
    2  B, and 1-d tensors (e.g. DoRA's magnitude)     lr * loraplus_lr_ratio   weight decay
    3  the same, but biases / LayerNorm parameters    lr * loraplus_lr_ratio   no weight decay
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS

from ..tuners.lora.layer import Embedding as LoraEmbedding


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[Optimizer],
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = 1e-6,
    loraplus_weight_decay: float = 0.0,
    **kwargs: Any,
) -> Optimizer:
    """An `optimizer_cls` over the trainable parameters of `model`, grouped for LoRA+.

    Args:
        model: The model to train (usually a `PeftModel`); only parameters with `requires_grad` are used.
        optimizer_cls: e.g. `torch.optim.AdamW`.
        lr: Learning rate of A (and of every tensor that is not B or an embedding adapter).
        loraplus_lr_ratio: lr_B / lr_A, usually >= 1 (the paper suggests ~16).
        loraplus_lr_embedding: Learning rate of LoRA adapters on embedding layers.
        loraplus_weight_decay: Weight decay of every group but the bias / LayerNorm one.
        kwargs: Passed on to `optimizer_cls` (betas, eps, ...).
    """
    embedding_params = {
        id(param)
        for module in model.modules()
        if isinstance(module, LoraEmbedding)
        for param in (*module.lora_embedding_A.values(), *module.lora_embedding_B.values())
    }
    no_decay = _no_decay_names(model)
    groups: dict[str, list[nn.Parameter]] = {"a": [], "embedding": [], "b": [], "b_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding_params:
            groups["embedding"].append(param)
        elif ".lora_B." in f".{name}." or param.ndim == 1:
            groups["b_no_decay" if name in no_decay else "b"].append(param)
        else:
            groups["a"].append(param)
    param_groups = [
        {"params": groups["a"], "weight_decay": loraplus_weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": loraplus_weight_decay, "lr": loraplus_lr_embedding},
        {"params": groups["b"], "weight_decay": loraplus_weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["b_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]
    return optimizer_cls(param_groups, lr=lr, **kwargs)


def _no_decay_names(model: nn.Module) -> set[str]:
    """Names of biases and of LayerNorm parameters, which are trained without weight decay."""
    names = {name for name, _ in model.named_parameters() if "bias" in name}
    for module_name, module in model.named_modules():
        if isinstance(module, tuple(ALL_LAYERNORM_LAYERS)):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + name for name, _ in module.named_parameters())
    return names
