"""`AdamssModel`: the AdaMSS tuner -- wraps targeted `nn.Linear` modules; ASA via `update_and_allocate`.

Checkpoints (as peft writes them; the clustering itself is not saved but rebuilt from the base
weight, deterministically, when loading):

    <module>.adamss_A.<k> (r_k, r')    <module>.adamss_B.<k> (n_k, r_k)    <module>.adamss_newB (r', in~)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from ...errors import TargetModulesError
from .._core.base_layers import base_of
from .._core.tuner import BaseTuner
from ..lora.constants import LORA_TARGET_MODULES_BY_MODEL_TYPE
from .config import AdamssConfig
from .layer import SUPPORTED_LAYERS, AdamssLayer, dispatch_linear

#: peft's table: LoRA's defaults, with ViT's query/value.
ADAMSS_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = {**LORA_TARGET_MODULES_BY_MODEL_TYPE, "vit": ["query", "value"]}


class UnsupportedLayerError(TargetModulesError, TypeError):
    """A target that is not an `nn.Linear` (a TypeError, as peft raises it)."""


def refuse_unsupported(target: nn.Module, adapter_name: str, **_: Any) -> None:
    raise UnsupportedLayerError(
        f"Target module {base_of(target)} is not supported. Currently, only `torch.nn.Linear` is supported."
    )


class AdamssModel(BaseTuner):
    """Creates AdaMSS adapters on a model: `AdamssModel(model, AdamssConfig(...), "default")`.

    With `use_asa=True`, call `update_and_allocate(global_step)` after every backward pass (or
    use `AdamssAsaCallback` with a transformers `Trainer`).
    """

    prefix = "adamss_"
    layer_cls = AdamssLayer
    dispatchers = (dispatch_linear, refuse_unsupported)
    default_target_modules = ADAMSS_TARGET_MODULES_BY_MODEL_TYPE
    display_name = "AdaMSS"
    supported_layers = SUPPORTED_LAYERS

    def __init__(self, model: nn.Module, config: Any, adapter_name: str = "default", **kwargs: Any) -> None:
        self._asa_total_subspaces: dict[str, int] = {}
        super().__init__(model, config, adapter_name, **kwargs)

    def layer_kwargs(self, config: AdamssConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {
            "r": config.r,
            "num_subspaces": config.num_subspaces,
            "subspace_rank": config.subspace_rank,
            "init_weights": config.init_weights,
            "use_asa": config.use_asa,
            "use_dynamic_rank": config.use_dynamic_rank,
            "svd_threshold": config.svd_threshold,
            "random_seed": config.random_seed,
            "inference_mode": config.inference_mode,
        }

    def _create_and_replace(
        self, config: Any, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module, current_key: str
    ) -> None:
        existing = isinstance(target, AdamssLayer)
        super()._create_and_replace(config, adapter_name, target, target_name, parent, current_key)
        if not existing:  # peft counts the subspaces of newly wrapped layers only
            layer = getattr(parent, target_name)
            count = layer.num_subspaces.get(adapter_name, 0) if isinstance(layer, AdamssLayer) else 0
            if count > 0:
                self._asa_total_subspaces[adapter_name] = self._asa_total_subspaces.get(adapter_name, 0) + count

    def _remove_adapter_from_layers(self, adapter_name: str) -> None:
        super()._remove_adapter_from_layers(adapter_name)
        self._asa_total_subspaces.pop(adapter_name, None)

    def fit_to_checkpoint(self, adapter_name: str, state: Mapping[str, torch.Tensor], prefix: str) -> None:
        """Give A_k / B_k the checkpoint's shapes where the rebuilt clustering differs (peft's safety net)."""
        for name, layer in self.tuner_layers():
            if adapter_name not in layer.adamss_A:
                continue
            key = prefix + name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
            for attr in ("adamss_A", "adamss_B"):
                for k, param in enumerate(layer.adamss_A[adapter_name] if attr == "adamss_A" else layer.adamss_B[adapter_name]):
                    saved = state.get(f"{key}.{attr}.{k}")
                    if saved is not None and saved.shape != param.shape:
                        layer.refit_to(adapter_name, attr, k, saved.shape)

    # ------------------------------------------------------------------ ASA
    def update_and_allocate(self, global_step: int) -> None:
        """One ASA step (call after backward, before zero_grad): accumulate importance during
        [init_warmup, final_warmup]; every `mask_interval` steps keep the top scheduled number of
        subspaces over all layers trainable, freeze the rest, and restart the statistics."""
        for adapter_name in self.active_adapters:
            config = self.peft_config[adapter_name]
            if not config.use_asa:
                continue
            layers = [layer for _, layer in self.tuner_layers() if adapter_name in layer.exp_avg_ipt_A]
            if not layers:
                continue
            if not config.init_warmup <= global_step <= config.final_warmup:
                continue
            for layer in layers:
                layer.update_importance(adapter_name, config.asa_importance_beta, config.asa_uncertainty_beta)
            if global_step % config.mask_interval == 0:
                target = self._schedule_threshold(global_step, config)
                if target is not None:
                    self._global_mask_to_target(target, adapter_name, layers)
                for layer in layers:
                    layer.reset_importance(adapter_name)

    def _schedule_threshold(self, step: int, config: AdamssConfig) -> Optional[int]:
        """target + (total - target) * (1 - progress) ** asa_schedule_exponent, peft's schedule."""
        total = self._asa_total_subspaces.get(next(iter(self.active_adapters), "default"), 0)
        if total == 0:
            total = self._get_asa_total_subspaces()
        if total == 0 or step < config.init_warmup:
            return None
        if step > config.final_warmup:
            return config.asa_target_subspaces
        remaining = 1.0 - (step - config.init_warmup) / (config.final_warmup - config.init_warmup)
        remaining = max(0.0, min(1.0, remaining))
        exponent = getattr(config, "asa_schedule_exponent", 3.0)
        return int(config.asa_target_subspaces + (total - config.asa_target_subspaces) * (remaining**exponent))

    def _get_asa_total_subspaces(self) -> int:
        """Subspaces over all layers (each layer's first adapter)."""
        return sum(next(iter(layer.num_subspaces.values())) for _, layer in self.tuner_layers() if layer.num_subspaces)

    def _global_mask_to_target(self, target_subspaces: int, adapter_name: str, asa_layers: list) -> None:
        """Keep the `target_subspaces` best-scored subspaces (over all layers) trainable, freeze the others."""
        scored = []
        for layer in asa_layers:
            for k in range(layer.num_subspaces.get(adapter_name, 0)):
                score = layer.subspace_score(adapter_name, k)
                if score is not None:
                    scored.append((layer, k, score))
        if not scored:
            return
        scores = torch.stack([score for _, _, score in scored])
        if target_subspaces >= len(scored):
            threshold = float("-inf")
        else:
            threshold = -torch.kthvalue(-scores, target_subspaces)[0].item()
        for layer, k, score in scored:
            layer.set_subspace_active(adapter_name, k, float(score) > threshold)
