"""peft's `peft.helpers`: small utilities around a PeftModel.

- `update_forward_signature` / `update_generate_signature` / `update_signature`: show the base
  model's signature and docstring on a PeftModel whose `forward` / `generate` take `*args, **kwargs`
  (for `help()`, IDEs and tools that read signatures);
- `check_if_peft_model`: whether a local folder or hub repo holds an adapter config;
- `rescale_adapter_scale`: a context manager multiplying every LoRA adapter's scaling (wise-ft);
- `disable_input_dtype_casting`: a context manager setting the tuner layers' `cast_input_dtype_enabled` flag off;
- `KappaTuneSelector` / `find_kappa_target_modules`: pick LoRA targets by the condition number of
  their weights (the best-conditioned ones first).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType
from typing import Optional, Union

import torch
from torch import nn

from .config import PeftConfig
from .errors import ConfigError
from .quantization.weights import read_weight
from .tuners._core.layer import BaseTunerLayer
from .tuners.lora.layer import LoraLayer

__all__ = [
    "KappaTuneSelector",
    "check_if_peft_model",
    "disable_input_dtype_casting",
    "find_kappa_target_modules",
    "rescale_adapter_scale",
    "update_forward_signature",
    "update_generate_signature",
    "update_signature",
]


# ---------------------------------------------------------------------- signatures
def _takes_only_var_args(method: object) -> bool:
    params = inspect.signature(method).parameters
    kinds = {param.kind for param in params.values()}
    return bool(params) and kinds <= {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}


def _adopt_base_signature(model: nn.Module, method_name: str) -> None:
    """Give `model.<method_name>` (when it takes only *args / **kwargs) the base model class's
    signature, name, docstring and annotations; calls still go to the PeftModel's method."""
    bound = getattr(model, method_name, None)
    base_method = getattr(type(model.get_base_model()), method_name, None)
    if bound is None or base_method is None or not _takes_only_var_args(bound):
        return
    func = bound.__func__ if isinstance(bound, MethodType) else bound

    def call(self: nn.Module, *args: object, **kwargs: object) -> object:
        return func(self, *args, **kwargs)

    functools.update_wrapper(call, base_method, assigned=("__doc__", "__name__", "__annotations__"))
    object.__setattr__(model, method_name, MethodType(call, model))


def update_forward_signature(model: nn.Module) -> None:
    """Show the base model's `forward` signature on `model.forward` (if it takes only *args, **kwargs)."""
    _adopt_base_signature(model, "forward")


def update_generate_signature(model: nn.Module) -> None:
    """Show the base model's `generate` signature on `model.generate` (if it takes only *args / **kwargs)."""
    if hasattr(model, "generate"):
        _adopt_base_signature(model, "generate")


def update_signature(model: nn.Module, method: str = "all") -> None:
    """`update_forward_signature` ("forward"), `update_generate_signature` ("generate") or both ("all")."""
    if method not in ("forward", "generate", "all"):
        raise ConfigError(f"method {method} is not supported please choose one of ['forward', 'generate', 'all']")
    if method in ("forward", "all"):
        update_forward_signature(model)
    if method in ("generate", "all"):
        update_generate_signature(model)


# ---------------------------------------------------------------------- checks
def check_if_peft_model(model_name_or_path: str) -> bool:
    """True when `model_name_or_path` (a local folder or hub repo) holds a readable adapter config."""
    try:
        PeftConfig.from_pretrained(model_name_or_path)
    except Exception:  # any failure (missing file, offline, bad JSON, unknown method) means "not an adapter"
        return False
    return True


# ---------------------------------------------------------------------- context managers
@contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: Union[float, int]) -> Iterator[None]:
    """Multiply the scaling of every LoRA adapter in `model` by `multiplier` inside the block.

    With `multiplier` in [0, 1] this is wise-ft (interpolating the fine-tuned and base models). The
    scalings are restored on exit, also after an exception. Merged adapters are not affected (their
    update is in the base weights). Raises `ValueError` if the model has no LoRA layer.
    """
    if isinstance(multiplier, bool) or not isinstance(multiplier, (float, int)):
        raise TypeError(f"Argument multiplier should be of type float, got {type(multiplier)}")
    saved: dict[nn.Module, dict[str, float]] = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            saved[module] = dict(module.scaling)
            module.scaling = {name: value * multiplier for name, value in module.scaling.items()}
    if not saved:
        raise ConfigError("scaling is only supported for models with `LoraLayer`s")
    try:
        yield
    finally:
        for module, scaling in saved.items():
            module.scaling = scaling


@contextmanager
def disable_input_dtype_casting(model: nn.Module, active: bool = True) -> Iterator[None]:
    """Inside the block, set `cast_input_dtype_enabled = False` on every tuner layer (restored on exit).

    peft's layers read the flag to skip casting inputs to the adapter's dtype (for hooks that do
    the casting themselves, e.g. diffusers' layerwise casting). `active=False` does nothing.
    """
    if not active:
        yield
        return
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    saved = [(layer, layer.__dict__.get("cast_input_dtype_enabled", True)) for layer in layers]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer, value in saved:
            layer.cast_input_dtype_enabled = value


# ---------------------------------------------------------------------- KappaTune target selection
_MOE_SUFFIXES = (".gate_up_proj", ".down_proj", ".gate_proj", ".up_proj")


def _condition_number(matrix: torch.Tensor) -> float:
    singular = torch.linalg.svdvals(matrix.detach().float().reshape(matrix.shape[0], -1))
    return (singular[0] / (singular[-1] + 1e-8)).item()


def _pick(scores: dict[str, float], top_p: Optional[float], num_modules: Optional[int], threshold: Optional[float]) -> list[str]:
    ranked = sorted(scores, key=scores.__getitem__)  # best-conditioned (smallest kappa) first
    if num_modules is not None:
        return ranked[: min(num_modules, len(ranked))]
    if top_p is not None:
        return ranked[: max(1, int(len(ranked) * top_p))] if ranked else []
    if threshold is not None:
        return [name for name in ranked if scores[name] <= threshold]
    return ranked


class KappaTuneSelector:
    """Rank a model's `nn.Linear` layers (and fused MoE expert weights, 3-D parameters) by the
    condition number of their weight; the best-conditioned ones are the suggested LoRA targets.

    Quantized linear layers (peftkit's or bitsandbytes') are dequantized for the measurement.
    Matrices with a dimension above `max_dim_size_to_analyze` are skipped (the SVD is costly).
    """

    def __init__(
        self,
        model: nn.Module,
        max_dim_size_to_analyze: int = 16384,
        moe_param_suffixes: Optional[tuple[str, ...]] = None,
        show_progress: bool = True,
    ) -> None:
        self.model = model
        self.max_dim_size_to_analyze = max_dim_size_to_analyze
        self.moe_param_suffixes = tuple(moe_param_suffixes or _MOE_SUFFIXES)
        self.show_progress = show_progress
        self._condition_numbers: Optional[dict[str, float]] = None
        self._parameter_condition_numbers: Optional[dict[str, float]] = None

    def _progress(self, items: list, desc: str) -> list:
        if not self.show_progress:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, unit="layer")

    def _compute_kappas(self) -> None:
        if self._condition_numbers is not None:
            return
        from .quantization.bnb import is_bnb_linear
        from .quantization.linear import QuantizedLinearBase

        linear = [
            (name, module)
            for name, module in self.model.named_modules()
            if isinstance(module, (nn.Linear, QuantizedLinearBase)) or is_bnb_linear(module)
        ]
        scores: dict[str, float] = {}
        for name, module in self._progress(linear, "Computing SVD (linear layers)"):
            weight = read_weight(module)
            if any(dim > self.max_dim_size_to_analyze for dim in weight.shape):
                continue
            scores[name] = _condition_number(weight)
        self._condition_numbers = scores

        experts = [
            (name, param)
            for name, param in self.model.named_parameters()
            if param.dim() == 3 and name.endswith(self.moe_param_suffixes)
        ]
        param_scores: dict[str, float] = {}
        for name, param in self._progress(experts, "Computing SVD (MoE parameters)"):
            if any(dim > self.max_dim_size_to_analyze for dim in param.shape[1:]):
                continue
            param_scores[name] = sum(_condition_number(expert) for expert in param) / param.shape[0]
        self._parameter_condition_numbers = param_scores

    def get_best_targets(
        self, top_p: Optional[float] = None, num_modules: Optional[int] = None, threshold: Optional[float] = None
    ) -> list[str]:
        """Module names for `target_modules`: `num_modules` of them, the best `top_p` fraction, those with
        kappa <= `threshold`, or all ranked (first given wins)."""
        self._compute_kappas()
        return _pick(self._condition_numbers or {}, top_p, num_modules, threshold)

    def get_best_target_parameters(
        self, top_p: Optional[float] = None, num_modules: Optional[int] = None, threshold: Optional[float] = None
    ) -> list[str]:
        """Fused MoE parameter names (mean kappa over experts), selected as `get_best_targets`."""
        self._compute_kappas()
        return _pick(self._parameter_condition_numbers or {}, top_p, num_modules, threshold)


def find_kappa_target_modules(
    model: nn.Module,
    top_p: float = 0.2,
    max_dim_size_to_analyze: int = 16384,
    moe_param_suffixes: Optional[tuple[str, ...]] = None,
    show_progress: bool = True,
) -> dict[str, Optional[list[str]]]:
    """`{"target_modules": [...], "target_parameters": [...] or None}`: the best-conditioned `top_p` fraction."""
    selector = KappaTuneSelector(model, max_dim_size_to_analyze, moe_param_suffixes, show_progress)
    parameters = selector.get_best_target_parameters(top_p=top_p)
    return {"target_modules": selector.get_best_targets(top_p=top_p), "target_parameters": parameters or None}
