"""`AdaLoraModel`: the AdaLoRA tuner -- SVD-form layers, rank allocation, orthogonality penalty.

Training loop (as with peft):

    loss = model(**batch).loss          # includes orth_reg_weight * penalty in training mode
    loss.backward()
    optimizer.step()
    model.base_model.update_and_allocate(step)
    optimizer.zero_grad()

Pruned ranks are zeroed in memory; on save they are cut out of the tensors and the masks go into
`adapter_config.json` as `rank_pattern`. Loading creates each module at its kept rank straight
away (from that `rank_pattern`), so the generic loader sees matching shapes.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ...errors import AdapterStateError, CheckpointError, ConfigError
from ..lora.model import LoraModel
from .config import AdaLoraConfig
from .constants import ADALORA_TARGET_MODULES_BY_MODEL_TYPE
from .layer import SUPPORTED_LAYERS, AdaLoraLayer, dispatch_conv2d, dispatch_linear
from .rank_allocator import RankAllocator, lookup_mask


class AdaLoraModel(LoraModel):
    """Creates AdaLoRA adapters on a model: `AdaLoraModel(model, AdaLoraConfig(...), "default")`.

    At most one adapter may be trainable (`inference_mode=False`); its ranks are allocated by
    `update_and_allocate`. Bias options and modules_to_save work as in LoRA.
    """

    prefix = "lora_"
    default_target_modules = ADALORA_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = AdaLoraLayer
    dispatchers = (dispatch_linear, dispatch_conv2d)
    display_name = "AdaLoRA"
    supported_layers = SUPPORTED_LAYERS

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str = "default", **kwargs: Any) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self.rankallocator: Optional[RankAllocator] = None
        if self.trainable_adapter_name is not None:
            self._allocator()

    @property
    def trainable_adapter_name(self) -> Optional[str]:
        """The one adapter that trains (not in inference mode), or None."""
        return next((name for name, config in self.peft_config.items() if not config.inference_mode), None)

    # ------------------------------------------------------------------ injection
    def layer_kwargs(self, config: AdaLoraConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {
            "r": self._initial_rank(config, adapter_name, key),
            "lora_alpha": config.lora_alpha,
            "lora_dropout": config.lora_dropout,
            "init_lora_weights": config.init_lora_weights,
            "ranknum": config.init_r,
        }

    @staticmethod
    def _initial_rank(config: AdaLoraConfig, adapter_name: str, key: str) -> int:
        """init_r, or the number of kept ranks when the config carries a (saved) rank_pattern."""
        mask = lookup_mask(config.rank_pattern, key, adapter_name)
        if mask is None:
            return config.init_r
        if len(mask) != config.init_r:
            raise ConfigError(
                f"rank_pattern for {key!r} has {len(mask)} entries but init_r is {config.init_r}; "
                "the adapter config is inconsistent -- restore init_r or the rank_pattern it was saved with."
            )
        return sum(mask)

    def _check_new_adapter_config(self, config: AdaLoraConfig) -> None:
        super()._check_new_adapter_config(config)
        trainable = [name for name, cfg in self.peft_config.items() if not cfg.inference_mode]
        if trainable and not config.inference_mode:
            raise ConfigError(
                f"AdaLoraModel supports only 1 trainable adapter and {trainable[0]!r} is one; "
                "add the new adapter with inference_mode=True (or load it with is_trainable=False)."
            )

    def _bias_parameters(self, config: AdaLoraConfig) -> dict[str, nn.Parameter]:
        if config.bias not in ("lora_only", "adalora_only"):
            return super()._bias_parameters(config)
        return {
            f"{name}.base_layer.bias": layer.base_layer.bias
            for name, layer in self.tuner_layers()
            if getattr(layer.base_layer, "bias", None) is not None
        }

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward; in training mode `orth_reg_weight * penalty` is added to `loss`."""
        outputs = super().forward(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        name = self.trainable_adapter_name
        if not (self.model.training and isinstance(loss, torch.Tensor) and name is not None):
            return outputs
        weight = self.peft_config[name].orth_reg_weight
        if weight > 0:
            outputs.loss = loss + weight * self.orthogonal_regularization(name)
        return outputs

    def orthogonal_regularization(self, adapter_name: str) -> torch.Tensor:
        """mean over A and B of every module of `|A A^T - I|_F` and `|B^T B - I|_F`."""
        penalties = []
        for _, layer in self.tuner_layers():
            if adapter_name not in layer.lora_A:
                continue
            weight_a, weight_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
            for gram in (weight_a @ weight_a.T, weight_b.T @ weight_b):
                eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
                penalties.append(torch.norm(gram - eye, p="fro"))
        if not penalties:
            return torch.zeros(())
        return torch.stack(penalties).sum() / len(penalties)

    # ------------------------------------------------------------------ rank allocation
    def _allocator(self) -> RankAllocator:
        name = self.trainable_adapter_name
        if name is None:
            raise AdapterStateError(
                "No trainable AdaLoRA adapter: update_and_allocate only works while training; "
                "create it with get_peft_model or load it with is_trainable=True."
            )
        if self.rankallocator is None or self.rankallocator.adapter_name != name:
            self.rankallocator = RankAllocator(self, self.peft_config[name], name)
        return self.rankallocator

    def update_and_allocate(self, global_step: int) -> None:
        """Update importance scores and prune ranks per the budget schedule; call once per step.

        Call it after `loss.backward()` (and `optimizer.step()`) and before `optimizer.zero_grad()`;
        `tinit`, `tfinal` and `deltaT` are handled here.
        """
        allocator = self._allocator()
        config = self.peft_config[allocator.adapter_name]
        final_step = config.total_step - config.tfinal
        if global_step < final_step:
            _, rank_pattern = allocator.update_and_allocate(global_step)
            if rank_pattern:
                config.rank_pattern = rank_pattern
        elif global_step == final_step:
            _, rank_pattern = allocator.update_and_allocate(global_step, force_mask=True)
            config.rank_pattern = rank_pattern
            allocator.reset_ipt()
        else:
            # The optimizer keeps updating pruned entries of E; zero them again every step.
            allocator.mask_using_rank_pattern(config.rank_pattern)

    # LoRA features that AdaLoRA layers do not implement (inherited from LoraModel, refused here).
    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("AdaLoraModel does not support add_weighted_adapter; use LoRA adapters for that.")

    def mixed_batch(self, adapter_names: list[str]) -> Any:
        raise ConfigError("adapter_names (mixed-adapter batches) is not supported for AdaLoRA; run one adapter at a time.")

    # ------------------------------------------------------------------ saving
    def state_for_save(self, adapter_name: str, state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """Cut pruned ranks out of A (rows), E (rows) and B (columns), as peft saves them."""
        rank_pattern = self.peft_config[adapter_name].rank_pattern
        if not rank_pattern:
            return state
        state = dict(state)
        for name, layer in self.tuner_layers():
            mask = lookup_mask(rank_pattern, name, adapter_name)
            key = f"{prefix}{name}"
            if mask is None or f"{key}.lora_A" not in state:
                continue
            rows = state[f"{key}.lora_A"].shape[0]
            if rows == sum(mask) and rows != len(mask):
                continue  # already at its kept ranks (e.g. loaded from a pruned checkpoint)
            if rows != len(mask):
                raise CheckpointError(
                    f"{name} has {rows} ranks but its rank_pattern mask has {len(mask)} entries; "
                    "the adapter config does not match its weights."
                )
            kept = torch.tensor(mask, dtype=torch.bool, device=state[f"{key}.lora_A"].device)
            state[f"{key}.lora_A"] = state[f"{key}.lora_A"][kept]
            state[f"{key}.lora_E"] = state[f"{key}.lora_E"][kept]
            state[f"{key}.lora_B"] = state[f"{key}.lora_B"][:, kept]
        return state

