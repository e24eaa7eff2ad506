r"""Poly layers: per task, a routed mixture of LoRA "skills" (Polytropon; with n_splits > 1, MHR).

Per adapter and wrapped `nn.Linear` (in -> out), with q = n_splits blocks and s = n_skills:

    A: (q, s, in / q, r)        one (in / q) x r down-projection per block and skill
    B: (q, s, r, out / q)       one r x (out / q) up-projection per block and skill
    Z: (n_tasks, q * s)         the router's logits, `poly_router.<name>.module_logits`

For batch row b with task t = task_ids[b]:

    p_b[q, :]  = sigmoid(Z[t] viewed as (q, s))             (eval)
               = RelaxedBernoulli(T=1, logits=Z[t]).rsample()  (training: a differentiable sample)
    w_b[q, s]  = p_b[q, s] / (sum_s' p_b[q, s'] + 1e-12)     (mixing weights, per block)
    A_b        = concat_q  sum_s w_b[q, s] A[q, s]            (in x r: block q acts on input block q)
    B_b        = concat_q  sum_s w_b[q, s] B[q, s]            (r x out: block q writes output block q)
    y_b        = W0 x_b + b + (x_b A_b B_b) / r

The task ids come with the call (`model(..., task_ids=ids)`, `_core/call_state.py`) or as the
layer's own `task_ids=` keyword. Init (peft's): every A[q, s] Kaiming-uniform (bound 1/sqrt(in / q)),
B zero (True; the adapter starts as a no-op) or Kaiming-uniform (bound 1/sqrt(r), False), Z uniform
in [-1e-3, 1e-3]. The update depends on each row's task, so it is never merged into W0.
Checkpoint keys: `<module>.poly_lora_A`, `<module>.poly_lora_B`, `<module>.poly_router.module_logits`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from ...errors import PeftkitError
from ...quantization.weights import is_quantized
from .._core.base_layers import base_of
from .._core.call_state import task_ids as call_task_ids
from .._core.layer import BaseTunerLayer
from ..vblora.shared import UnsupportedLayerError

#: Added to the sum of the skill probabilities before normalising (peft's constant).
MIX_EPS = 1e-12
#: The router logits start uniform in [-ROUTER_INIT, ROUTER_INIT].
ROUTER_INIT = 1e-3

SUPPORTED_LAYERS = "`torch.nn.Linear`"


class TaskIdsError(PeftkitError):
    """`task_ids` missing, out of range or not one per batch row (a ValueError, as peft raises it)."""


def as_task_ids(ids: Any) -> torch.Tensor:
    """`ids` as a 1-d integer tensor (a tensor, list or int is accepted); TaskIdsError otherwise."""
    if ids is None:
        raise TaskIdsError(
            "task_ids should not be None. Poly routes each batch row by its task: pass "
            "task_ids=torch.tensor([...]) (one task id per row) to the model call or to generate."
        )
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TaskIdsError(f"task_ids={ids!r} is invalid; pass a 1-d tensor of integer task ids.") from exc
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TaskIdsError(f"task_ids must hold integers, got dtype {ids.dtype}; pass e.g. torch.tensor([0, 2]).")
    return ids.reshape(-1)


class SkillRouter(nn.Module):
    """Per-task mixing weights over the skills, one set per block: `forward(task_ids) -> (rows, q, s)`."""

    def __init__(self, n_tasks: int, n_skills: int, n_splits: int) -> None:
        super().__init__()
        self.n_tasks, self.n_skills, self.n_splits = n_tasks, n_skills, n_splits
        self.module_logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills))

    def reset(self) -> None:
        """Logits uniform in [-1e-3, 1e-3]: all skills start (almost) equally weighted."""
        if not self.module_logits.is_meta:
            with torch.no_grad():
                self.module_logits.uniform_(-ROUTER_INIT, ROUTER_INIT)

    def forward(self, task_ids: Any) -> torch.Tensor:
        ids = as_task_ids(task_ids)
        if ids.numel():
            low, high = int(ids.min().item()), int(ids.max().item())
            if high >= self.n_tasks:
                raise TaskIdsError(
                    f"Only {self.n_tasks} tasks available. Found task id = {high}; task ids run from 0 to "
                    f"n_tasks - 1 = {self.n_tasks - 1} (set n_tasks in PolyConfig to the number of tasks)."
                )
            if low < 0:
                raise TaskIdsError(f"Found task id = {low}; task ids must be >= 0 (0 to n_tasks - 1).")
        logits = self.module_logits[ids.to(self.module_logits.device)].view(-1, self.n_splits, self.n_skills)
        if self.training:
            probs = RelaxedBernoulli(temperature=1.0, logits=logits).rsample()
        else:
            probs = torch.sigmoid(logits)
        return probs / (probs.sum(dim=-1, keepdim=True) + MIX_EPS)


def _kaiming_blocks(target: torch.Tensor, fan_in: int) -> None:
    """Fill every (split, skill) block of `target` (q, s, a, b) as peft does: a Kaiming-uniform (b x a) matrix
    (bound 1/sqrt(fan_in)), transposed -- drawn skill by skill, split by split."""
    n_splits, n_skills, rows, cols = target.shape
    bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
    for skill in range(n_skills):
        for split in range(n_splits):
            block = torch.empty(cols, rows).uniform_(-bound, bound)
            target[split, skill].copy_(block.T)


class PolyLayer(BaseTunerLayer, nn.Module):
    """Poly on an `nn.Linear`: per adapter A, B, a router, and r / n_tasks / n_skills / n_splits / poly_type."""

    adapter_layer_names = ("poly_lora_A", "poly_lora_B", "poly_router")
    other_param_names = ("r", "n_tasks", "n_skills", "n_splits", "poly_type")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise UnsupportedLayerError(f"Unsupported layer type {type(base)}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r: dict[str, int] = {}
        self.n_tasks: dict[str, int] = {}
        self.n_skills: dict[str, int] = {}
        self.n_splits: dict[str, int] = {}
        self.poly_type: dict[str, str] = {}
        self.poly_router = nn.ModuleDict({})
        self.poly_lora_A = nn.ParameterDict({})
        self.poly_lora_B = nn.ParameterDict({})
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    # ------------------------------------------------------------------ adapters
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        n_tasks: int = 1,
        n_skills: int = 4,
        n_splits: int = 1,
        poly_type: str = "poly",
        init_weights: bool = True,
        inference_mode: bool = False,
    ) -> None:
        """Add (or replace) adapter `adapter_name`: n_skills rank-r skills in n_splits blocks, routed over n_tasks."""
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        if poly_type != "poly":
            raise ValueError(f"Unsupported poly_type: {poly_type}. Currently, only the following types are supported: `poly`.")
        if self.in_features % n_splits or self.out_features % n_splits:
            raise ValueError(
                f"n_splits={n_splits} must divide the layer's in_features ({self.in_features}) and out_features "
                f"({self.out_features}); pick a common divisor (1 always works)."
            )
        self.r[adapter_name] = r
        self.n_tasks[adapter_name] = n_tasks
        self.n_skills[adapter_name] = n_skills
        self.n_splits[adapter_name] = n_splits
        self.poly_type[adapter_name] = poly_type
        self.poly_lora_A[adapter_name] = nn.Parameter(torch.empty(n_splits, n_skills, self.in_features // n_splits, r))
        self.poly_lora_B[adapter_name] = nn.Parameter(torch.empty(n_splits, n_skills, r, self.out_features // n_splits))
        self.poly_router[adapter_name] = SkillRouter(n_tasks, n_skills, n_splits)
        self.reset_poly_parameters(adapter_name, init_weights)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name], inference_mode=inference_mode)

    def reset_poly_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """Kaiming-uniform A blocks; B zero (True) or Kaiming-uniform blocks (False); router logits ~ U(+-1e-3)."""
        if adapter_name not in self.poly_lora_A:
            return
        A, B = self.poly_lora_A[adapter_name], self.poly_lora_B[adapter_name]
        if not A.is_meta:
            with torch.no_grad():
                _kaiming_blocks(A, fan_in=A.shape[2])
                if init_weights:
                    B.zero_()
                else:
                    _kaiming_blocks(B, fan_in=B.shape[2])
        self.poly_router[adapter_name].reset()

    # ------------------------------------------------------------------ forward
    def mixed_factors(self, adapter_name: str, task_ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_b, B_b) of every row: (rows, in, r) and (rows, r, out), mixed by the router for the rows' tasks."""
        weights = self.poly_router[adapter_name](task_ids)  # (rows, q, s)
        A, B = self.poly_lora_A[adapter_name], self.poly_lora_B[adapter_name]
        weights = weights.to(A.dtype)
        rows, r = weights.shape[0], self.r[adapter_name]
        mixed_A = torch.einsum("bqs,qsdr->bqdr", weights, A).reshape(rows, self.in_features, r)
        mixed_B = torch.einsum("bqs,qsrd->bqrd", weights, B).transpose(1, 2).reshape(rows, r, self.out_features)
        return mixed_A, mixed_B

    def delta_output(self, x: torch.Tensor, adapter_name: str, task_ids: Any = None) -> torch.Tensor:
        """`(x_b A_b B_b) / r` per row b, in the adapter's dtype; x is (rows, ..., in)."""
        mixed_A, mixed_B = self.mixed_factors(adapter_name, task_ids)
        rows = x.shape[0] if x.dim() > 1 else 1
        if mixed_A.shape[0] != rows:
            raise TaskIdsError(
                f"Got {mixed_A.shape[0]} task ids for a batch of {rows} rows; pass one task id per row "
                "(with beam search or num_return_sequences, repeat each row's id accordingly)."
            )
        hidden = x.to(mixed_A.dtype).reshape(rows, -1, self.in_features)
        delta = torch.bmm(torch.bmm(hidden, mixed_A), mixed_B) / self.r[adapter_name]
        return delta.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor, *args: Any, task_ids: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
        """`base(x) + sum_a delta_a(x)` over the active adapters, each row mixed for its task; x's dtype.

        `task_ids`: the rows' tasks; when None, those of the running call (`model(..., task_ids=...)`).
        """
        previous_dtype = x.dtype
        result = self.base_layer(x, *args, **kwargs)
        if self._disable_adapters:
            return result
        active = [name for name in self._active_adapter if name in self.poly_lora_A]
        if not active:
            return result
        ids = task_ids if task_ids is not None else call_task_ids()
        for adapter_name in active:  # added in the adapter's dtype, rounded once to the output's
            result = (result + self.delta_output(x, adapter_name, ids)).to(result.dtype)
        return result.to(previous_dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError(
            "Poly adapters cannot be merged into the base weight: the update depends on each row's task id."
        )

    def __repr__(self) -> str:
        return "poly." + super().__repr__()


class Linear(PolyLayer):
    """Poly on `nn.Linear` (peft's class name)."""


def dispatch_linear(target: nn.Module, adapter_name: str, **layer_kwargs: Any) -> Optional[nn.Module]:
    """A Poly `Linear` around an `nn.Linear` (not quantized); anything else is refused with peft's TypeError."""
    base = base_of(target)
    if isinstance(base, nn.Linear) and not is_quantized(base):
        return Linear(target, adapter_name, **layer_kwargs)
    raise UnsupportedLayerError(
        f"Target module {target} is not supported. Currently, only the following modules are supported: "
        "`torch.nn.Linear`."
    )
