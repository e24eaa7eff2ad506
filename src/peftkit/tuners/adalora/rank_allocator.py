r"""`RankAllocator`: AdaLoRA's importance scores and the rank budget they are spent on.

For every adapter tensor `P` (A, E and B of each module) after each backward pass:

    I   = |P * grad P|                               sensitivity of each entry
    Ibar <- beta1 * Ibar + (1 - beta1) * I           smoothed sensitivity
    U    <- beta2 * U    + (1 - beta2) * |I - Ibar|  its uncertainty
    s(P) = Ibar * U                                  score of each entry

The score of rank i of a module is `s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)`. The total budget
(number of kept ranks over all modules) follows a cubic schedule from `init_r * n` down to
`target_r * n`; a masking step zeroes E for every rank whose score is at or below the
`(init_budget - budget)`-th smallest score.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import torch

from ...errors import AdapterStateError, ConfigError
from .layer import AdaLoraLayer

RankPattern = dict[str, list[bool]]
_FACTORS = ("lora_A", "lora_E", "lora_B")


def rank_pattern_key(module_name: str) -> str:
    """The rank_pattern key of a module, as peft writes it: `<module path>.lora_E`."""
    return f"{module_name}.lora_E"


class RankAllocator:
    """Tracks the importance of one adapter's ranks and masks the least important ones.

    Args:
        tuner: Anything with `tuner_layers()` yielding `(name, layer)`, normally the `AdaLoraModel`.
        config: The adapter's `AdaLoraConfig` (schedule and EMA factors are read from it).
        adapter_name: The (single trainable) adapter whose ranks are allocated.
    """

    def __init__(self, tuner: Any, config: Any, adapter_name: str) -> None:
        for name in ("beta1", "beta2"):
            value = getattr(config, name)
            if not 0 < value < 1:
                raise ConfigError(f"{name}={value!r} is invalid for training AdaLoRA; it must lie in (0, 1), e.g. 0.85.")
        if config.target_r > config.init_r:
            raise ConfigError(
                f"target_r={config.target_r} is larger than init_r={config.init_r}; AdaLoRA only prunes ranks, "
                "so set target_r <= init_r."
            )
        self.tuner = tuner
        self.peft_config = config
        self.adapter_name = adapter_name
        self.reset_ipt()
        names = [name for name, _ in self._layers()]
        self.init_bgt = sum(layer.r[adapter_name] for _, layer in self._layers())
        self.target_bgt = config.target_r * len(names)

    def _layers(self) -> Iterator[tuple[str, AdaLoraLayer]]:
        for name, layer in self.tuner.tuner_layers():
            if isinstance(layer, AdaLoraLayer) and self.adapter_name in layer.lora_A:
                yield name, layer

    def set_total_step(self, total_step: int) -> None:
        self.peft_config.total_step = total_step

    def reset_ipt(self) -> None:
        """Forget every importance statistic (done once the final ranks are fixed)."""
        self.ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    # ------------------------------------------------------------------ schedule
    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total kept ranks allowed at `step`, whether to mask at this step)."""
        config = self.peft_config
        if step <= config.tinit:
            return self.init_bgt, False
        if step > config.total_step - config.tfinal:
            return self.target_bgt, True
        progress = (step - config.tinit) / (config.total_step - config.tfinal - config.tinit)
        budget = int((self.init_bgt - self.target_bgt) * ((1 - progress) ** 3) + self.target_bgt)
        return budget, step % config.deltaT == 0

    # ------------------------------------------------------------------ importance
    @torch.no_grad()
    def update_ipt(self) -> None:
        """Fold this step's gradients into the smoothed sensitivity and uncertainty of every entry."""
        beta1, beta2 = self.peft_config.beta1, self.peft_config.beta2
        for name, layer in self._layers():
            for factor in _FACTORS:
                param = getattr(layer, factor)[self.adapter_name]
                if param.grad is None:
                    raise AdapterStateError(
                        f"{name}.{factor} has no gradient; call update_and_allocate(step) after loss.backward() "
                        "and before optimizer.zero_grad()."
                    )
                key = (name, factor)
                if key not in self.exp_avg_ipt:
                    self.exp_avg_ipt[key] = torch.zeros_like(param)
                    self.exp_avg_unc[key] = torch.zeros_like(param)
                ipt = (param * param.grad).abs()
                self.ipt[key] = ipt
                self.exp_avg_ipt[key] = beta1 * self.exp_avg_ipt[key] + (1 - beta1) * ipt
                self.exp_avg_unc[key] = beta2 * self.exp_avg_unc[key] + (1 - beta2) * (ipt - self.exp_avg_ipt[key]).abs()

    def _score(self, name: str, factor: str) -> torch.Tensor:
        return self.exp_avg_ipt[(name, factor)] * self.exp_avg_unc[(name, factor)]

    def rank_scores(self) -> dict[str, torch.Tensor]:
        """Module name -> importance of each of its ranks, shape (r,)."""
        scores = {}
        for name, _ in self._layers():
            from_a = self._score(name, "lora_A").mean(dim=1)
            from_b = self._score(name, "lora_B").mean(dim=0)
            scores[name] = self._score(name, "lora_E").view(-1) + (from_a + from_b)
        return scores

    # ------------------------------------------------------------------ masking
    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> RankPattern:
        """Zero E for the least important ranks so about `budget` ranks stay; return the masks."""
        scores = self.rank_scores()
        to_prune = self.init_bgt - budget
        if to_prune > 0:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=to_prune)[0].item()
        else:
            threshold = float("-inf")
        rank_pattern = {}
        for name, layer in self._layers():
            pruned = scores[name] <= threshold
            layer.lora_E[self.adapter_name].masked_fill_(pruned.view(-1, 1), 0.0)
            rank_pattern[rank_pattern_key(name)] = (~pruned).tolist()
        return rank_pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, rank_pattern: RankPattern) -> None:
        """Zero E again wherever `rank_pattern` says a rank is pruned (the optimizer may revive it)."""
        for name, layer in self._layers():
            mask = lookup_mask(rank_pattern, name, self.adapter_name)
            lora_e = layer.lora_E[self.adapter_name]
            if mask is None or len(mask) != lora_e.shape[0]:
                continue  # no mask, or the module was already resized to its kept ranks
            kept = torch.tensor(mask, dtype=torch.bool, device=lora_e.device).view(-1, 1)
            lora_e.masked_fill_(~kept, 0.0)

    def update_and_allocate(self, global_step: int, force_mask: bool = False) -> tuple[int, Optional[RankPattern]]:
        """Update the scores (before the final phase) and mask if the schedule says so."""
        if global_step < self.peft_config.total_step - self.peft_config.tfinal:
            self.update_ipt()
        budget, mask_now = self.budget_schedule(global_step)
        rank_pattern = self.mask_to_budget(budget) if mask_now or force_mask else None
        return budget, rank_pattern


def lookup_mask(rank_pattern: Optional[dict], module_name: str, adapter_name: str) -> Optional[list[bool]]:
    """The mask of `module_name`, keyed as peft saves it (`...lora_E`) or holds it in memory (`...lora_E.<adapter>`)."""
    if not rank_pattern:
        return None
    key = rank_pattern_key(module_name)
    if key in rank_pattern:
        return list(rank_pattern[key])
    with_adapter = f"{key}.{adapter_name}"
    return list(rank_pattern[with_adapter]) if with_adapter in rank_pattern else None
