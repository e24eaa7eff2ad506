"""`VBLoRAModel`: the VB-LoRA tuner -- one vector bank per adapter, shared by every wrapped Linear / Conv1D.

Checkpoints (as peft writes them):

    <module>.vblora_logits_A / _B             full logits, or with save_only_topk_weights:
    <module>.vblora_logits_A_topk_indices     (.., k) the top-k bank indices (uint8/int16/int32/int64,
                                              the smallest that holds num_vectors)
    <module>.vblora_logits_A_topk_weights     (.., k-1) their softmax weights, the last one left out
    base_model.vblora_vector_bank             the bank, once

Loading a top-k checkpoint rebuilds logits whose top-k softmax gives back the saved weights:
log(w) at the saved indices, a very negative logit elsewhere (peft: -inf); such adapters refuse
training, as in peft.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import VBLoRAConfig
from .constants import VBLORA_TARGET_MODULES_BY_MODEL_TYPE
from .layer import MASKED_LOGIT, VBLoRALayer, dispatch_linear
from .shared import SharedTensorsTuner, refuse_unsupported

SUPPORTED_LAYERS = "`torch.nn.Linear`, `transformers.pytorch_utils.Conv1D`"
_TOPK_INDICES, _TOPK_WEIGHTS = "_topk_indices", "_topk_weights"


def index_dtype(num_vectors: int) -> torch.dtype:
    """The smallest integer dtype peft uses for top-k indices into a bank of `num_vectors`."""
    if num_vectors < 2**8:
        return torch.uint8
    if num_vectors < 2**15:
        return torch.int16
    if num_vectors < 2**31:
        return torch.int32
    return torch.int64


class VBLoRAModel(SharedTensorsTuner):
    """Creates VB-LoRA adapters on a model: `VBLoRAModel(model, VBLoRAConfig(...), "default")`.

    `vblora_vector_bank[adapter]` is the adapter's bank; every layer of the adapter reads it.
    """

    prefix = "vblora_"
    layer_cls = VBLoRALayer
    dispatchers = (dispatch_linear, refuse_unsupported("VB-LoRA", SUPPORTED_LAYERS))
    default_target_modules = VBLORA_TARGET_MODULES_BY_MODEL_TYPE
    display_name = "VB-LoRA"
    supported_layers = SUPPORTED_LAYERS
    shared_containers = {"vblora_vector_bank": False}
    uses_shared_state = True

    @property
    def vblora_vector_bank(self) -> nn.ParameterDict:
        return self.shared("vblora_vector_bank")

    def _create_shared(self, adapter_name: str, config: VBLoRAConfig) -> None:
        # Filled for real (from the RNG, as peft) per wrapped module, in `layer_kwargs`.
        self.vblora_vector_bank[adapter_name] = nn.Parameter(torch.zeros(config.num_vectors, config.vector_length))

    def _init_vblora_vector_bank(self, config: VBLoRAConfig, adapter_name: str) -> None:
        """A new bank for `adapter_name`, uniform in [-init_vector_bank_bound, init_vector_bank_bound] (peft's name)."""
        bank = torch.zeros(config.num_vectors, config.vector_length)
        torch.nn.init.uniform_(bank, -config.init_vector_bank_bound, config.init_vector_bank_bound)
        self.vblora_vector_bank[adapter_name] = bank

    def _create_and_replace(
        self, config: VBLoRAConfig, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module,
        current_key: str,
    ) -> None:
        with torch.no_grad():  # peft draws the bank anew for every wrapped module (the last draw stays): same RNG use
            self.vblora_vector_bank[adapter_name].uniform_(-config.init_vector_bank_bound, config.init_vector_bank_bound)
        super()._create_and_replace(config, adapter_name, target, target_name, parent, current_key)

    def layer_kwargs(self, config: VBLoRAConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {
            "vblora_vector_bank": self.vblora_vector_bank,
            "r": config.r,
            "topk": config.topk,
            "num_vectors": config.num_vectors,
            "vector_length": config.vector_length,
            "vblora_dropout": config.vblora_dropout,
            "init_logits_std": config.init_logits_std,
        }

    # ------------------------------------------------------------------ checkpoints
    def state_for_save(self, adapter_name: str, state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """With save_only_topk_weights, each logits tensor becomes its top-k indices and k-1 weights."""
        state = super().state_for_save(adapter_name, state, prefix)
        config = self.peft_config[adapter_name]
        if not config.save_only_topk_weights:
            return state
        out: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            if not key.endswith((".vblora_logits_A", ".vblora_logits_B")):
                out[key] = tensor
                continue
            top_logits, indices = tensor.topk(config.topk)
            out[key + _TOPK_INDICES] = indices.to(index_dtype(config.num_vectors))
            out[key + _TOPK_WEIGHTS] = torch.softmax(top_logits, dim=-1)[..., :-1].contiguous()
        return out

    def checkpoint_for_load(self, adapter_name: str, state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """Top-k indices and weights become logits again (see the module docstring)."""
        if not any(key.endswith(_TOPK_INDICES) for key in state):
            return state
        num_vectors = self.vblora_vector_bank[adapter_name].shape[0]
        out = {key: tensor for key, tensor in state.items() if not key.endswith((_TOPK_INDICES, _TOPK_WEIGHTS))}
        for key, indices in state.items():
            if not key.endswith(_TOPK_INDICES):
                continue
            base_key = key[: -len(_TOPK_INDICES)]
            weights = state.get(base_key + _TOPK_WEIGHTS)
            if weights is None:
                out[key] = indices  # left for the loader to report as unexpected
                continue
            weights = weights.float()
            weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
            logits = torch.full((*weights.shape[:-1], num_vectors), MASKED_LOGIT, device=weights.device)
            out[base_key] = logits.scatter(-1, indices.long(), torch.log(weights).clamp_min(MASKED_LOGIT))
        return out

    # ------------------------------------------------------------------ sizes
    def get_nb_savable_parameters(self, adapter: str = "default") -> tuple[int, int]:
        """(VB-LoRA parameters to save, in float32 equivalents; other trainable parameters), as peft counts them."""
        logits = bank = other = 0
        for name, param in self.named_parameters():
            if "vblora_logits" in name:
                logits += param.numel()
            elif "vblora_vector_bank" in name:
                bank += param.numel()
            elif param.requires_grad:
                other += param.numel()
        config = self.peft_config[adapter]
        if not config.save_only_topk_weights:
            return bank + logits, other
        factor = {torch.uint8: 0.25, torch.int16: 0.5, torch.int32: 1, torch.int64: 2}[index_dtype(config.num_vectors)]
        rows = logits / config.num_vectors
        return int(bank + rows * (config.topk - 1) + rows * config.topk * factor), other

    def print_savable_parameters(self) -> None:
        vblora_params, other_params = self.get_nb_savable_parameters()
        print(
            f"VB-LoRA params to-be-saved (float32-equivalent): {vblora_params:,d} "
            f"|| total params to-be-saved: {(vblora_params + other_params):,d}"
        )
