r"""`convert_to_lora` / `save_as_lora`: any additive adapter as a plain LoRA checkpoint.

Methods whose merge is W' = W + delta_W (LoHa, LoKr, VeRA, FourierFT, C3A, ...: the layers with
`supports_lora_conversion()`) can be approximated, layer by layer, by the best rank-k product:

    delta_W = U S V^T          B = U_k S_k  (out x k),   A = V_k^T  (k x in)     ||delta_W - B A|| minimal

k is `rank` (an int), or with a float 0 < rank <= 1 the smallest k whose singular values hold that
share of the energy: sum_{i<=k} S_i^2 >= rank * sum_i S_i^2. The scaling is baked into B, so
lora_alpha == r (scaling 1) everywhere; per-layer ranks go to rank_pattern / alpha_pattern. The
result loads in peft and peftkit as a LoRA adapter and is usable where only LoRA is (mixed-adapter
batches, other libraries). Conv1D bases get the factors in their transposed layout. It reads the
model and writes a checkpoint, so it lives here, above the method folders.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Optional, Union

import torch
from torch import nn

from ..tuners._core.base_layers import is_transposed
from ..tuners._core.layer import BaseTunerLayer
from ..tuners._core.modules_to_save import ModulesToSaveWrapper
from ..tuners.lora.config import LoraConfig
from ..utils.commits import commit_files
from ..utils.files import text_writer, weights_writer
from ..utils.peft_types import PeftType
from .adapter_folder import config_text

PEFT_PREFIX = "base_model.model."


def energy_rank(singular: torch.Tensor, threshold: float) -> int:
    """The smallest k with sum_{i<k} S_i^2 >= threshold * sum S_i^2 (S sorted, descending)."""
    if singular.dim() != 1:
        raise ValueError("Input vector must be 1d.")
    cumulative = torch.cumsum(singular**2, dim=0)
    return int(torch.searchsorted(cumulative, threshold * cumulative[-1]).item()) + 1


@torch.no_grad()
def lora_factors(delta: torch.Tensor, rank: Union[int, float], transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(A, B, k) with B A the best rank-k approximation of `delta` (stored (in, out) when `transposed`)."""
    dtype = delta.dtype
    left, singular, right_t = torch.linalg.svd(delta.float(), full_matrices=False)
    k = rank if isinstance(rank, int) else energy_rank(singular, rank)
    if k > left.shape[1]:
        raise ValueError(f"The chosen rank {k} is larger than the weight shape ({left.shape[1]}), please choose a "
                         "lower rank.")
    weight_b, weight_a = (left[:, :k] * singular[:k]).to(dtype), right_t[:k].to(dtype)
    if transposed:  # delta is (in, out): delta = B A  =>  delta^T = A^T B^T
        return weight_b.T.contiguous(), weight_a.T.contiguous(), k
    return weight_a.contiguous(), weight_b.contiguous(), k


def convert_to_lora(
    model: nn.Module,
    rank: Union[int, float],
    adapter_name: str = "default",
    progressbar: bool = False,
    compile_kwargs: Optional[dict[str, Any]] = None,
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(LoraConfig, state dict) of a LoRA adapter approximating `adapter_name` (module docstring).

    Raises TypeError if a tuner layer of the model cannot be converted (or none can), ValueError
    for a rank that is 0, above a layer's size, or a float outside (0, 1]. The model is only read.
    """
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ValueError(f"If rank is a float, it is interpreted as a threshold. It must be between 0 and 1 but got {rank}.")
    if rank == 0:
        raise ValueError("Passing a rank of 0 doesn't make sense, please pass a valid value.")
    layers = _convertible_layers(model, adapter_name)
    source = getattr(model, "peft_config", {}).get(adapter_name)
    config = _lora_config_like(source, rank)
    factorize = torch.compile(lora_factors, **compile_kwargs) if compile_kwargs is not None else lora_factors
    if progressbar:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="Converting to LoRA")
    state: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        short = name.removeprefix(PEFT_PREFIX)
        weight_a, weight_b, k = factorize(layer.get_delta_weight(adapter_name), rank,
                                          is_transposed(layer.get_base_layer()))
        if k == 0:
            config.exclude_modules.add(short)
            continue
        if k != rank or isinstance(config.target_modules, str):
            config.rank_pattern[short] = k
            config.alpha_pattern[short] = k
        else:
            config.target_modules.add(short)
        state[f"{name}.lora_A.weight"] = weight_a
        state[f"{name}.lora_B.weight"] = weight_b
    if source is not None and getattr(source, "modules_to_save", None):
        config.modules_to_save = copy.copy(source.modules_to_save)
        state.update(_modules_to_save_state(model, adapter_name))
    return config, state


def _convertible_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, BaseTunerLayer]]:
    """Every tuner layer of `model`; TypeError (peft's) if one cannot be converted, or there is none."""
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    unsupported = sorted({repr(type(m)) for _, m in layers if not m.supports_lora_conversion(adapter_name)})
    if unsupported:
        raise TypeError(f"Some module types on this model do not support LoRA conversion: {', '.join(unsupported)}.")
    if not layers:
        raise TypeError("Could not detect any layer that supports LoRA conversion.")
    return layers


def _lora_config_like(source: Any, rank: Union[int, float]) -> LoraConfig:
    """The LoraConfig of the converted adapter: the source's targets and layer selection, alpha = rank
    (scaling 1), ranks that differ per layer filled in by the caller (rank_pattern / alpha_pattern)."""
    if source is not None and str(source.peft_type) == PeftType.LORA.value:
        warnings.warn("Converting a PEFT adapter to LoRA that is already a LoRA adapter. There is typically no need for that.")
    bias = getattr(source, "bias", getattr(source, "lora_bias", "none"))
    if bias not in ("none", False):
        raise ValueError(f"The adapter's config sets bias={bias}, this is not supported right now.")
    fields: dict[str, Any] = {"rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": set(), "target_modules": set()}
    if source is not None:
        fields["target_modules"] = copy.copy(source.target_modules)
        fields["base_model_name_or_path"] = source.base_model_name_or_path
        if hasattr(source, "layers_pattern"):
            fields["layers_pattern"], fields["layers_to_transform"] = source.layers_pattern, source.layers_to_transform
    fixed = isinstance(rank, int)
    return LoraConfig(r=rank if fixed else 1, lora_alpha=rank if fixed else 1, **fields)


def _modules_to_save_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's modules-to-save copies, under their full parameter paths."""
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for param_name, param in module.modules_to_save[adapter_name].named_parameters():
                state[f"{name}.{param_name}"] = param.detach()
    return state


def save_as_lora(
    path: Union[str, os.PathLike],
    model: nn.Module,
    rank: Union[int, float],
    adapter_name: str = "default",
    progressbar: bool = False,
    compile_kwargs: Optional[dict[str, Any]] = None,
) -> None:
    """`convert_to_lora`, then write the LoRA folder (`adapter_model.safetensors` and
    `adapter_config.json`, one atomic commit) that `PeftModel.from_pretrained` loads."""
    config, state = convert_to_lora(model, rank=rank, adapter_name=adapter_name, progressbar=progressbar,
                                    compile_kwargs=compile_kwargs)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    commit_files(path, {"adapter_model.safetensors": weights_writer(state),
                        "adapter_config.json": text_writer(config_text(config.to_dict()))})
