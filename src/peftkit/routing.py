"""`create_arrow_model`: a PeftModel whose `arrow_router` adapter routes each token between LoRA experts.

The routing itself is a LoRA variant (`tuners/lora/arrow.py`); this module loads the experts
(task adapters `task_0`, ..., general adapters `gks_0`, ... for GenKnowSub) from their folders,
checks they agree (rank, shapes, target modules, Linear-like bases) and adds the router.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from torch import nn

from .peft_model import PeftModel
from .tuners._core.base_layers import is_linear_like
from .tuners.lora.arrow import GKS_ADAPTER_PREFIX, ROUTER_NAME, TASK_ADAPTER_PREFIX, ArrowConfig
from .tuners.lora.config import LoraConfig
from .tuners.lora.layer import LoraLayer


def _adapter_source(path: str) -> tuple[str, Optional[str]]:
    """(model_id, subfolder): a local folder, or a hub id with an optional subfolder ("user/repo/sub")."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ValueError(f"Local adapter path '{path}' does not contain 'adapter_config.json'.")
        return path, None
    parts = path.strip("/").split("/")
    if len(parts) > 2:
        return "/".join(parts[:2]), "/".join(parts[2:])
    return path, None


def _layers_with(model: nn.Module, name: str) -> dict[str, LoraLayer]:
    return {path: module for path, module in model.named_modules() if name in getattr(module, "lora_A", {})}


def _check_experts(model: nn.Module, names: list[str]) -> tuple[list[str], int]:
    """Every expert: the same rank, shapes and module names; Linear-like bases only. (module names, r)."""
    reference = None
    for name in names:
        layers = _layers_with(model, name)
        offenders = [(path, type(layer.get_base_layer()).__name__) for path, layer in layers.items()
                     if not is_linear_like(layer.get_base_layer()) and not isinstance(layer.get_base_layer(), nn.Conv1d)]
        if offenders:
            raise TypeError("LoRA adapters must only target Linear-like layers (nn.Linear, nn.Conv1d, HF Conv1D, or a "
                            "4-bit linear). Found:\n" + "\n".join(f"  - adapter '{name}' on module '{p}' of type {t}"
                                                                   for p, t in offenders))
        shapes = {(tuple(l.lora_A[name].weight.shape), tuple(l.lora_B[name].weight.shape)) for l in layers.values()}
        summary = {"r": next(iter(layers.values())).r[name], "shapes": shapes,
                   "modules": {path.rpartition(".")[2] for path in layers}}
        if reference is None:
            reference = summary
            continue
        for key, what in (("r", "rank"), ("shapes", "shape"), ("modules", "target_modules")):
            if summary[key] != reference[key]:
                raise ValueError(f"[{name}] {what} mismatch: {summary[key]} != {reference[key]}")
    return sorted(reference["modules"]), int(reference["r"])


def create_arrow_model(
    base_model: nn.Module,
    task_specific_adapter_paths: list[str],
    arrow_config: ArrowConfig,
    general_adapter_paths: Optional[list[str]] = None,
    **adapter_kwargs: Any,
) -> Any:
    """A PeftModel with the task experts (`task_0`, ...), the general adapters for GenKnowSub
    (`gks_0`, ..., with `use_gks`) and the active `arrow_router` adapter routing between them.

    `adapter_kwargs` go to every `from_pretrained` / `load_adapter` call (hub options, `torch_device`).
    """
    if not task_specific_adapter_paths:
        raise ValueError("`task_specific_adapter_paths` should contain at least one adapter path")
    if arrow_config.use_gks and not general_adapter_paths:
        raise ValueError("You should provide general LoRA paths if you want to use GenKnowSub.")

    def load(model: Optional[PeftModel], path: str, name: str) -> PeftModel:
        model_id, subfolder = _adapter_source(path)
        kwargs = dict(adapter_kwargs)
        if subfolder is not None:
            kwargs.setdefault("subfolder", subfolder)
        if model is None:
            return PeftModel.from_pretrained(base_model, model_id, adapter_name=name, **kwargs)
        model.load_adapter(model_id, adapter_name=name, **kwargs)
        return model

    model = None
    tasks = [f"{TASK_ADAPTER_PREFIX}{i}" for i in range(len(task_specific_adapter_paths))]
    for name, path in zip(tasks, task_specific_adapter_paths):
        model = load(model, path, name)
    general = [f"{GKS_ADAPTER_PREFIX}{i}" for i in range(len(general_adapter_paths or []))] if arrow_config.use_gks else []
    for name, path in zip(general, general_adapter_paths or []):
        model = load(model, path, name)
    arrow_config.task_adapter_names, arrow_config.gks_adapter_names = tasks, general
    target_modules, r = _check_experts(model, tasks + general)
    model.add_adapter(ROUTER_NAME, LoraConfig(arrow_config=arrow_config, target_modules=target_modules, r=r))
    model.set_adapter(ROUTER_NAME)
    return model
