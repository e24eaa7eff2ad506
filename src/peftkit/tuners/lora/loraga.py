r"""LoRA-GA (https://arxiv.org/abs/2407.05000): LoRA initialised along the full fine-tuning gradient.

Before the adapter exists, `preprocess_loraga` runs the user's `train_step` (forward + backward on
a few batches) with gradients on the targeted weights only, and keeps each weight's averaged
gradient G (out x in). `init_lora_weights="lora_ga"` then takes a rank-2r SVD of G and hands
r directions to each factor, so the first steps of B A move like full fine-tuning would:

    G ~ U S V^T   (randomized, q = min(4r, min(G.shape)), 4 power iterations)
    direction "ArB2r" (default):  A = V[:, :r]^T,       B = U[:, r:2r] diag(S[r:2r])
              "A2rBr":            A = V[:, r:2r]^T,     B = U[:, :r]   diag(S[:r])
              "ArBr":             A = V[:, 1:2r:2]^T,   B = U[:, 0:2r:2] diag(S[0:2r:2])
              "random":           r of the first 2r indices, shared by A and B
    scale "stable" (default): B *= out^(1/4) / sqrt(stable_gamma);  "weight_svd": B *= s_1(W) / S_B[0];
          "gd_scale": A, B /= scaling;  "unit": nothing

The initial adapter is not zero, so the base weight is rewritten to keep the model's outputs:
W <- W - scaling * B A (factors rounded to the base dtype first). As with PiSSA, a trained
adapter converts back to plain LoRA with `save_pretrained(...,
path_initial_model_for_weight_conversion=...)`. A layer without a recorded gradient (e.g. when
loading a saved adapter) gets the default init and keeps its base weight.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional

import torch
from torch import nn

from ...errors import ConfigError
from ...quantization.weights import is_quantized
from .._core.base_journal import record_base_weight
from ...utils.commits import commit_files
from ...utils.files import read_weights_file, weights_writer
from .._core.matching import is_targeted

if TYPE_CHECKING:
    from .layer import LoraLayer

GRAD_ATTRIBUTE = "_peft_loraga_grad"  # where the gradient waits on the base layer (peft's name)
_DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
_SCALES = ("stable", "weight_svd", "gd_scale", "unit")


@dataclass
class LoraGAConfig:
    """LoRA-GA's options (`LoraConfig.lora_ga_config`): which SVD components go to A and B, and the scale."""

    direction: Literal["ArBr", "A2rBr", "ArB2r", "random"] = field(
        default="ArB2r", metadata={"help": "Component distribution strategy from gradient SVD"}
    )
    scale: Literal["stable", "weight_svd", "gd_scale", "unit"] = field(
        default="stable", metadata={"help": "Scaling strategy for initialization"}
    )
    stable_gamma: int = field(default=16, metadata={"help": "Gamma parameter for stable scaling"})

    def __post_init__(self) -> None:
        if self.direction not in _DIRECTIONS:
            raise ConfigError(f"LoraGAConfig.direction={self.direction!r} is not one of {list(_DIRECTIONS)}.")
        if self.scale not in _SCALES:
            raise ConfigError(f"LoraGAConfig.scale={self.scale!r} is not one of {list(_SCALES)}.")


def _targets(model: nn.Module, config: Any) -> Iterator[tuple[str, nn.Module]]:
    """The nn.Linear / Conv1D layers of `model` that `config` targets."""
    from transformers.pytorch_utils import Conv1D

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and is_targeted(config, name):
            yield name, module


@torch.no_grad()
def preprocess_loraga(
    model: nn.Module,
    lora_config: Any,
    train_step: Callable[[], None],
    cache_file: Optional[str] = None,
) -> None:
    """Record on each targeted layer the weight gradient averaged over `train_step`'s backward passes.

    `train_step()` should run forward and backward passes; gradients accumulate across them and are
    divided by the number of passes. `cache_file`: if it exists, the gradients are read from it
    (`torch.load(weights_only=True)`); otherwise they are computed and written there (atomically,
    the torch file of tensors peft writes). Call before
    `get_peft_model(model, lora_config)`.
    """
    if lora_config.lora_ga_config is None:
        raise ValueError(
            "If you want to use LoRA-GA, please initialize the LoraConfig with "
            "init_lora_weights='lora_ga' and lora_ga_config=LoraGAConfig(...)."
        )
    if lora_config.target_modules is None:
        from .constants import LORA_TARGET_MODULES_BY_MODEL_TYPE

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in LORA_TARGET_MODULES_BY_MODEL_TYPE:
            raise ValueError("Please specify `target_modules` in `peft_config`")
        lora_config.target_modules = set(LORA_TARGET_MODULES_BY_MODEL_TYPE[model_type])
    targets = list(_targets(model, lora_config))
    for name, module in model.named_modules():
        if is_quantized(module) and is_targeted(lora_config, name):
            raise ValueError(
                f"LoRA-GA does not support quantized models. Found quantized module: '{name}'. "
                "LoRA-GA requires full-precision gradients during preprocessing."
            )
    if cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0:
        cache = read_weights_file(cache_file, device=str(next(model.parameters()).device))
        for name, module in targets:
            setattr(module, GRAD_ATTRIBUTE, cache[f"{name}.{GRAD_ATTRIBUTE}"])
        return
    estimate_gradients(model, lora_config, train_step, targets)
    if cache_file is not None:
        grads = {f"{name}.{GRAD_ATTRIBUTE}": getattr(module, GRAD_ATTRIBUTE) for name, module in targets
                 if hasattr(module, GRAD_ATTRIBUTE)}
        folder = os.path.dirname(os.path.abspath(cache_file))
        os.makedirs(folder, exist_ok=True)
        # peft's cache format (a torch file of tensors), written atomically
        commit_files(folder, {os.path.basename(cache_file): weights_writer(grads, safe_serialization=False)})


def estimate_gradients(model: nn.Module, lora_config: Any, train_step: Callable[[], None],
                       targets: Optional[list[tuple[str, nn.Module]]] = None) -> None:
    """Run `train_step` with gradients on the targeted weights only; store their per-pass average."""
    targets = list(_targets(model, lora_config)) if targets is None else targets
    if not targets:
        raise ValueError(
            "No supported layers found for LoRA-GA initialization. LoRA-GA only supports nn.Linear and Conv1D layers. "
            "Please ensure your model contains at least one of these layer types in target_modules."
        )
    was_training = model.training
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    counts = {id(module): 0 for _, module in targets}

    def counter(module: nn.Module) -> Callable[[torch.Tensor], None]:
        def count(grad: torch.Tensor) -> None:  # one call per backward pass reaching the weight
            counts[id(module)] += 1
        return count

    hooks = []
    try:
        model.train()
        for param in model.parameters():
            param.requires_grad_(False)
        for _, module in targets:
            module.weight.requires_grad_(True)
            hooks.append(module.weight.register_hook(counter(module)))
        with torch.enable_grad():
            train_step()
    finally:
        for hook in hooks:
            hook.remove()
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad.get(name, param.requires_grad))
        model.train(was_training)
    for _, module in targets:
        if counts[id(module)] > 0 and module.weight.grad is not None:
            setattr(module, GRAD_ATTRIBUTE, module.weight.grad.detach() / counts[id(module)])
        module.weight.grad = None


@torch.no_grad()
def init_lora_ga(layer: "LoraLayer", adapter_name: str, options: Optional[LoraGAConfig]) -> None:
    """`init_lora_weights="lora_ga"` on one Linear / Conv1D layer (module docstring)."""
    base = layer.get_base_layer()
    grad = getattr(base, GRAD_ATTRIBUTE, None)
    if grad is None:  # e.g. loading a saved adapter: its factors replace these anyway
        layer.reset_lora_parameters(adapter_name, True)
        return
    if options is None:
        raise ValueError("lora_ga_config must be provided when init_lora_weights='lora_ga'. "
                         "Please pass lora_ga_config=LoraGAConfig(...) to LoraConfig.")
    rank, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    dtype = base.weight.dtype
    grad = layer.out_in_layout(grad.to(torch.float32))
    left, singular, right = torch.svd_lowrank(grad, q=min(4 * rank, min(grad.shape)), niter=4)
    left, singular, right_t = left[:, : 2 * rank], singular[: 2 * rank], right.t()[: 2 * rank]
    a_index, b_index = _split(options.direction, rank)
    weight_a = right_t[a_index]
    singular_b = singular[b_index]
    weight_b = left[:, b_index] * singular_b
    if options.scale == "stable":
        weight_b = weight_b * (grad.shape[0] ** 0.25 / options.stable_gamma**0.5)
    elif options.scale == "weight_svd":
        weight = layer.out_in_layout(base.weight.to(torch.float32))
        top = torch.svd_lowrank(weight, q=rank, niter=4)[1][0]
        if singular_b[0] > 0:
            weight_b = weight_b * (top / singular_b[0])
    elif options.scale == "gd_scale":
        weight_a, weight_b = weight_a / scaling, weight_b / scaling
    weight_a, weight_b = weight_a.to(dtype), weight_b.to(dtype)
    layer.lora_A[adapter_name].weight.data = weight_a.contiguous()
    layer.lora_B[adapter_name].weight.data = weight_b.contiguous()
    residual = layer.out_in_layout(base.weight.to(torch.float32)) - scaling * (weight_b.float() @ weight_a.float())
    record_base_weight(base.weight)  # put back if the add / load creating this adapter fails (base_journal.py)
    base.weight.copy_(layer.out_in_layout(residual.to(dtype)))
    delattr(base, GRAD_ATTRIBUTE)


def _split(direction: str, rank: int) -> tuple[Any, Any]:
    """Indices into the first 2r SVD components for A's rows and B's columns."""
    if direction == "ArBr":
        return slice(1, 2 * rank, 2), slice(0, 2 * rank, 2)
    if direction == "A2rBr":
        return slice(rank, 2 * rank), slice(0, rank)
    if direction == "ArB2r":
        return slice(0, rank), slice(rank, 2 * rank)
    indices = torch.randperm(2 * rank)[:rank]
    return indices, indices
