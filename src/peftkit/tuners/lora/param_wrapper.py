r"""LoRA on a bare `nn.Parameter` (peft's `target_parameters`): MoE expert stacks and custom layers.

Some weights are not held by an `nn.Linear` (e.g. the experts of a mixture-of-experts block are one
3-D parameter, `gate_up_proj: (experts, in, out)`), so there is no layer whose output to add to.
Instead the adapted parameter is computed and swapped in for the wrapped module's forward (under a
lock per module, `tensors_swapped`: concurrent calls of one model run that forward one at a time):

    2-D W (d0, d1):        W' = W + s * B A                A: (r, d1),     B: (d0, r)
    3-D W (E, d1, d2):     W'[e] = W[e] + s * delta_e      A: (E r, in),   B: (out, r E)

For 3-D weights, expert e uses rows `e r .. e r + r - 1` of A and the columns `j E + e` of B (peft's
layout, kept for its checkpoints). `in`/`out` are (d2, d1) -- so delta_e = B_e A_e -- unless the
module says `is_transposed = True` (weights stored (E, in, out)), where they are (d1, d2) and
delta_e = (B_e A_e)^T. The update is added in factored form (`addmm` / `baddbmm`), never as a
separate dense delta per adapter.

Limits, as in peft: no dropout (x cannot be factored out of `W'`), no DoRA, no `lora_bias`, no
mixed-adapter batches, and every adapter of a model must target the same parameters. Several
parameters of one module nest: a `ParamWrapper` wraps the `ParamWrapper` of the parameter before
(checkpoint keys `<module>.lora_A...` for the last, `<module>.base_layer.lora_A...` for the one
before).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ...errors import ConfigError
from .._core.base_layers import swap_guard, tensors_swapped
from .._core.call_state import batch_adapter_names
from .layer import LoraLayer


class ParamWrapper(LoraLayer, nn.Module):
    """LoRA on the parameter `parameter_name` of the wrapped module; see the module docstring."""

    supports_lora_bias = False
    drops_input = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, parameter_name: str, **lora_kwargs: Any):
        super().__init__()
        self.parameter_name = parameter_name
        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        shape = getattr(base, parameter_name).shape
        #: Whether a 3-D parameter is stored (experts, in, out) (the module's `is_transposed`), not (experts, out, in).
        self._experts_in_out = len(shape) == 3 and bool(getattr(base, "is_transposed", False))
        if len(shape) == 2:
            self.num_experts, in_features, out_features = 1, shape[1], shape[0]
        elif len(shape) == 3:
            self.num_experts = shape[0]
            in_features, out_features = (shape[1], shape[2]) if self._experts_in_out else (shape[2], shape[1])
        else:
            raise ConfigError(
                f"lora.ParamWrapper was initialized with {len(shape)} dimensional Parameter, but only 2d and 3d are "
                f"supported ({parameter_name!r} has shape {tuple(shape)}); remove it from target_parameters."
            )
        self._init_lora_layer(base_layer, in_features, out_features)
        self.fan_in_fan_out = False
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **lora_kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, **kwargs: Any) -> None:
        for option, refused in (
            ("lora_dropout", kwargs.get("lora_dropout", 0.0)),
            ("use_dora", kwargs.get("use_dora", False)),
            ("lora_bias", kwargs.get("lora_bias", False)),
        ):
            if refused:
                value = "!= 0" if option == "lora_dropout" else "=True"
                raise ConfigError(
                    f"lora.ParamWrapper does not work with {option} {value}: a LoRA update of a bare parameter "
                    f"cannot have it; set {option} to its default for adapters with target_parameters."
                )
        super().update_layer(adapter_name, r, lora_alpha, **kwargs)

    def get_param(self) -> torch.Tensor:
        """The wrapped parameter itself (no adapter applied)."""
        return getattr(self.get_base_layer(), self.parameter_name)

    def _create_adapter_weights(self, adapter_name: str, r: int) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)

    def _init_from_base_weight(self, adapter_name: str, init_lora_weights: str) -> None:
        raise ConfigError(
            f"init_lora_weights={init_lora_weights!r} is not supported with target_parameters; "
            "use True, False or 'gaussian'."
        )

    # ------------------------------------------------------------------ the update
    def delta_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs, rhs) with `delta = s * lhs @ rhs` in the parameter's own layout (batched over experts if 3-D)."""
        weight_a, weight_b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if self.num_experts == 1 and self.get_param().dim() == 2:
            return weight_b, weight_a
        experts = self.num_experts
        per_a = weight_a.reshape(experts, -1, weight_a.shape[-1])  # (E, r, in)
        per_b = weight_b.reshape(weight_b.shape[0], -1, experts).permute(2, 0, 1)  # (E, out, r)
        if self._experts_in_out:  # (E, in, out) = (B_e A_e)^T
            return per_a.transpose(-2, -1), per_b.transpose(-2, -1)
        return per_b, per_a

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        lhs, rhs = self.delta_factors(adapter_name)
        param = self.get_param()
        return (lhs @ rhs * self.scaling[adapter_name]).to(param.device, param.dtype)

    def adapted_param(self, adapter_names: list[str]) -> torch.Tensor:
        """W + sum_a s_a lhs_a rhs_a, one fused multiply-add per adapter (differentiable in A and B)."""
        weight = self.get_param()
        for name in adapter_names:
            lhs, rhs = (factor.to(weight.dtype) for factor in self.delta_factors(name))
            fused = torch.addmm if weight.dim() == 2 else torch.baddbmm
            weight = fused(weight, lhs, rhs, alpha=self.scaling[name])
        return weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if batch_adapter_names() is not None:
            raise ValueError("lora.ParamWrapper does not support mixed adapter batches yet.")
        if self._disable_adapters and self.merged:
            self.unmerge()
        active = [] if self._disable_adapters or self.merged else self._active_here()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        with swap_guard(base):  # `adapted_param` reads the parameter: never another call's swapped-in one
            with tensors_swapped([(base, self.parameter_name, self.adapted_param(active))]):
                return self.base_layer(x, *args, **kwargs)

    # ------------------------------------------------------------------ merging into the parameter
    def _read_base(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.get_param(), None

    def _write_base(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        param = self.get_param()
        if weight is not param:
            with torch.no_grad():
                param.copy_(weight)

    def extra_repr(self) -> str:
        return (
            f"parameter_name='{self.parameter_name}', in_features={self.in_features}, "
            f"out_features={self.out_features}, num_experts={self.num_experts}"
        )


def _unwrapped_path(path: str) -> str:
    """`experts.base_layer.base_layer` -> `experts`: the module path as the user names it."""
    return ".".join(part for part in path.split(".") if part != "base_layer")


def parameter_targets(model: nn.Module, target_parameters: list[str], prefix: str) -> list[tuple[str, str]]:
    """(module path, parameter name) of every parameter `target_parameters` names, in peft's order.

    A name matches `<module path>.<parameter>` exactly or as a dotted suffix. Modules are taken in
    `named_modules` order and each module's parameters in registration order, which fixes the
    nesting when one module has several targets (the first wraps innermost). Adapter tensors
    (under `<prefix>...` containers) never match.
    """
    names = sorted(set(target_parameters))
    found: list[tuple[str, str]] = []
    for path, module in model.named_modules():
        if any(part.startswith(prefix) for part in path.split(".")):
            continue
        plain = _unwrapped_path(path)
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{plain}.{param_name}" if plain else param_name
            if not any(key == name or key.endswith("." + name) for name in names):
                continue
            if not plain:
                raise ConfigError(
                    f"Targeting an nn.Parameter on the top-level module is not supported (parameter '{param_name}'). "
                    "Wrap the model, or target a parameter of a submodule."
                )
            if (plain, param_name) not in found:
                found.append((plain, param_name))
    return found


def existing_wrapper(module: nn.Module, parameter_name: str) -> Optional[ParamWrapper]:
    """The `ParamWrapper` of `parameter_name` in the nest starting at `module`, if any."""
    while isinstance(module, ParamWrapper):
        if module.parameter_name == parameter_name:
            return module
        module = module.base_layer
    return None
