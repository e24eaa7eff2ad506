"""`prepare_model_for_kbit_training`: the usual set-up before training adapters on a quantized model."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Optional[dict[str, Any]] = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Ready a (quantized) model for adapter training, as peft's function of the same name does.

    1. Freeze every parameter (the adapters added afterwards are the only trainable ones).
    2. Upcast the remaining fp16/bf16 parameters (norms, embeddings, output head) to fp32 for
       stable training; packed quantized weights are integers and stay as they are. Then, unless
       `auto_clear_cache=False`, the accelerator's caching allocator is emptied (the fp16 copies it
       still holds are freed; this matters where host and accelerator share memory), as in peft.
    3. With gradient checkpointing (reentrant by default, as in peft): make the input embeddings'
       output require grad, so checkpointed blocks get a gradient path although the base is frozen,
       then turn checkpointing on.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.to(torch.float32)
    if auto_clear_cache:
        clear_accelerator_cache()
    if not use_gradient_checkpointing:
        return model
    gradient_checkpointing_kwargs = dict(gradient_checkpointing_kwargs or {})
    if gradient_checkpointing_kwargs.get("use_reentrant", True):
        _make_inputs_require_grad(model)
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if callable(enable):
        enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs or None)
    return model


def _make_inputs_require_grad(model: nn.Module) -> None:
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        return

    def require_grad(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        output.requires_grad_(True)

    embeddings.register_forward_hook(require_grad)


def clear_accelerator_cache() -> None:
    """Release the unused memory the CUDA / XPU caching allocators hold (nothing to do on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        xpu.empty_cache()
