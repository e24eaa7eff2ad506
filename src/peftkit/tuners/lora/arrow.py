r"""Arrow (https://arxiv.org/abs/2405.11157): route each token through the best of several trained LoRAs.

An "arrow_router" adapter (a LoRA adapter with `arrow_config`) sits on layers holding task LoRA
experts e = 1..E (loaded as `task_0`, `task_1`, ... by `create_arrow_model`). Per layer, each
expert's prototype is the top right singular vector of its update, found by power iteration on
A_e^T (B_e^T B_e) A_e without forming delta_W (sign-free):

    p_e = top_right_singular_vector(B_e A_e)                       (in,)
    sim(t, e) = |x_t . p_e|          top_k experts kept, the rest -inf
    c(t, .) = softmax(sim(t, .) / router_temperature)
    y_t = W x_t + dropout( sum_e c(t, e) * scaling_e * B_e A_e x_t )

GenKnowSub (`use_gks`, https://aclanthology.org/2025.acl-short.54/): before the first routing,
the mean (A, B) of the general adapters `gks_0`, ... is subtracted from every task expert (in
place; once per expert, also for experts added later). Prototypes are built lazily and rebuilt
when the set of experts on the layer changes. Not mergeable: the mixture depends on each token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from ...errors import AdapterStateError, ConfigError

if TYPE_CHECKING:
    from .layer import LoraLayer

TASK_ADAPTER_PREFIX = "task_"
GKS_ADAPTER_PREFIX = "gks_"
ROUTER_NAME = "arrow_router"
# `create_arrow_model` (which loads the experts, so sits above the tuners) is in `peftkit/routing.py`.


@dataclass
class ArrowConfig:
    """Arrow's options (`LoraConfig.arrow_config`), peft's fields and defaults.

    top_k: experts mixed per token. router_temperature: softmax temperature of the coefficients.
    use_gks: subtract the general adapters' mean from the task experts (GenKnowSub).
    task_adapter_names / gks_adapter_names: set by `create_arrow_model`. rng_seed: the power
    iteration's start vector (None: the global RNG).
    """

    top_k: int = field(default=3, metadata={"help": "Number of top LoRA modules to combine in Arrow routing."})
    router_temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature for computing Arrow expert coefficients."}
    )
    use_gks: bool = field(default=False, metadata={"help": "Enable GenKnowSub."})
    task_adapter_names: Optional[list[str]] = field(
        default=None, init=False, metadata={"help": "Task-specific LoRA adapter names, set in create_arrow_model()."}
    )
    gks_adapter_names: Optional[list[str]] = field(
        default=None, init=False, metadata={"help": "General LoRA adapter names for GenKnowSub, set in create_arrow_model()."}
    )
    rng_seed: Optional[int] = field(
        default=None, metadata={"help": "Optional RNG seed for reproducibility. If None, sampling is non-deterministic."}
    )

    def __post_init__(self) -> None:
        if self.top_k <= 0:
            raise ConfigError("top_k cannot be negative.")
        if self.router_temperature <= 0:
            raise ConfigError("router_temperature must be greater than 0.")


def _is_gks(name: str) -> bool:
    return name.startswith(GKS_ADAPTER_PREFIX) and name[len(GKS_ADAPTER_PREFIX):].isdigit()


@torch.no_grad()
def top_right_singular_vector(weight_a: torch.Tensor, weight_b: torch.Tensor, seed: Optional[int],
                              iters: int = 15, eps: float = 1e-8) -> torch.Tensor:
    """Power iteration v <- A^T (B^T B) (A v) / norm, in float32: the top right singular vector of B A."""
    a, b = weight_a.float(), weight_b.float()
    gram = b.T @ b
    generator = None
    if seed is not None:
        generator = torch.Generator(device=a.device.type)
        generator.manual_seed(int(seed))
    v = torch.randn(a.shape[1], dtype=a.dtype, device=a.device, generator=generator)
    v = v / (v.norm() + eps)
    for _ in range(iters):
        w = a.T @ (gram @ (a @ v))
        v = w / (w.norm() + eps)
    return v


class ArrowVariant:
    """The router adapter's term on one Linear LoRA layer (module docstring)."""

    def __init__(self, config: ArrowConfig) -> None:
        self.config = config
        self.task_names: list[str] = list(config.task_adapter_names or [])
        self.prototypes: Optional[torch.Tensor] = None
        self.gks_done = False
        self.gks_pending: list[str] = []

    def init(self, layer: "LoraLayer", adapter_name: str) -> None:
        """Nothing to build up front: prototypes need the experts, which may come later."""

    def supports_lora_conversion(self) -> bool:
        return False

    # ---------------------------------------------------------------- lazy state
    def _refresh(self, layer: "LoraLayer", router: str) -> None:
        """Follow experts added to / removed from the layer since the prototypes were built."""
        current = [n for n in layer.lora_A if n in layer.lora_B and n != router and not _is_gks(n)]
        if sorted(current) == sorted(self.task_names):
            return
        if len(current) > len(self.task_names):
            self.gks_pending = [n for n in current if n not in self.task_names]
        self.task_names = current
        self.prototypes = None

    @torch.no_grad()
    def _general_knowledge_subtraction(self, layer: "LoraLayer") -> None:
        if not self.config.use_gks or (self.gks_done and not self.gks_pending):
            return
        general = self.config.gks_adapter_names or []
        mean_a = torch.stack([layer.lora_A[n].weight for n in general]).mean(0)
        mean_b = torch.stack([layer.lora_B[n].weight for n in general]).mean(0)
        for name in self.task_names if not self.gks_done else self.gks_pending:
            layer.lora_A[name].weight.sub_(mean_a)
            layer.lora_B[name].weight.sub_(mean_b)
        self.gks_done, self.gks_pending = True, []

    @torch.no_grad()
    def _build_prototypes(self, layer: "LoraLayer") -> None:
        if self.prototypes is not None:
            return
        rows = []
        for name in self.task_names:
            weight_a, weight_b = layer.lora_A[name].weight, layer.lora_B[name].weight
            rows.append(top_right_singular_vector(weight_a, weight_b, self.config.rng_seed).to(weight_a))
        self.prototypes = torch.stack(rows)

    # ---------------------------------------------------------------- forward / merge
    def adapter_output(self, layer: "LoraLayer", x: torch.Tensor, adapter_name: str,
                       base_output: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._refresh(layer, adapter_name)
        if not self.task_names:
            raise ConfigError("The Arrow router has no task experts on this layer; load them with create_arrow_model.")
        self._general_knowledge_subtraction(layer)
        self._build_prototypes(layer)
        stack_a = torch.stack([layer.lora_A[n].weight for n in self.task_names])  # (E, r, in)
        stack_b = torch.stack([layer.lora_B[n].weight for n in self.task_names])  # (E, out, r)
        tokens = x.to(stack_a.dtype).reshape(-1, x.shape[-1])
        scales = torch.tensor([layer.scaling[n] for n in self.task_names], device=tokens.device, dtype=tokens.dtype)
        similarity = (tokens @ self.prototypes.T).abs()  # (t, E)
        top, index = torch.topk(similarity, self.config.top_k, dim=1)
        scores = tokens.new_full(similarity.shape, float("-inf")).scatter_(1, index, top)
        coefficients = torch.softmax(scores / self.config.router_temperature, dim=1)
        low = torch.einsum("tf,erf->ter", tokens, stack_a)
        expert_out = torch.einsum("ter,eor->teo", low, stack_b) * scales.view(1, -1, 1)
        delta = layer.lora_dropout[adapter_name](torch.einsum("te,teo->to", coefficients, expert_out))
        return delta.view(*x.shape[:-1], delta.shape[-1])

    def merge_factor(self, layer: "LoraLayer", adapter_name: str, weight: torch.Tensor) -> Any:
        raise AdapterStateError("Cannot merge an active Arrow router adapter. Remove it first.")

    def delta_weight(self, layer: "LoraLayer", adapter_name: str) -> torch.Tensor:
        raise AdapterStateError("An Arrow router has no fixed delta weight: its mixture depends on each token.")
