r"""EVA, Explained Variance Adaptation (https://arxiv.org/abs/2410.07170): LoRA's A from the data.

For every targeted Linear layer, the inputs X (tokens x in) seen on a few batches of the
fine-tuning data are decomposed incrementally (PCA, `IncrementalPCA` below); the top right-singular
vectors become the rows of A, B starts at zero:

    X - mean(X) = U S V^T          A = V[:, :r_l]^T   (whiten: A = diag(S_r_l)^-1/2 V[:, :r_l]^T)
                                   B = 0              -> a fresh EVA adapter is still a no-op

Ranks are redistributed across layers: the budget sum_l r (r from `r` / `rank_pattern`) goes to
the components with the largest explained variance ratio S_i^2 / sum(var * n) over all layers,
each layer capped at round(r * rho). A layer that gets rank 0 is unwrapped; with
`adjust_scaling_factors`, lora_alpha scales by r_l / r so alpha / r stays the same. The new ranks
and alphas are written into the adapter's `rank_pattern` / `alpha_pattern` (the saved adapter is a
plain LoRA checkpoint that peft loads).

The batches are cycled until, for every layer, the first r_l components are stable: cosine
similarity >= tau between consecutive partial fits. Layers that see the same input (q/k/v of one
block) share one decomposition.

    model = get_peft_model(base, LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(rho=2.0)))
    initialize_lora_eva_weights(model, dataloader)      # or eva_state_dict=get_eva_state_dict(...)
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from ...errors import ConfigError
from .._core.matching import is_targeted, pattern_value
from .._core.module_tree import get_submodules, replace_module

PEFT_PREFIX = "base_model.model."
#: with this many targets or more, the saved target_modules are shortened to distinct name suffixes
MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20
_RHO_THRESHOLD = 1000


@dataclass
class EvaConfig:
    """EVA's options (`LoraConfig.eva_config`), peft's fields and defaults.

    rho: cap on a layer's rank after redistribution, round(r * rho) (>= 1; 1 = no redistribution).
    tau: cosine similarity between consecutive fits at which a component counts as converged.
    use_label_mask / label_mask_value: leave out the positions whose label is `label_mask_value`.
    whiten: divide each component by the square root of its singular value.
    adjust_scaling_factors: lora_alpha * r_l / r, so each layer keeps scaling alpha / r.
    """

    rho: float = field(default=2.0, metadata={"help": "Rho value for EVA redistribution"})
    tau: float = field(default=0.99, metadata={"help": "Cosine similarity threshold for early stopping"})
    use_label_mask: bool = field(default=True, metadata={"help": "Use label mask for EVA initialization"})
    label_mask_value: int = field(
        default=-100, metadata={"help": "if use_label_mask=True the value to look for to mask out ignored tokens"}
    )
    whiten: bool = field(default=False, metadata={"help": "Apply whitening to singular vectors"})
    adjust_scaling_factors: bool = field(
        default=True, metadata={"help": "Adjust LoRA scaling factors after the rank redistribution"}
    )

    def __post_init__(self) -> None:
        if self.rho < 1.0:
            raise ConfigError("`rho` must be >= 1.0")
        if self.tau < 0.0 or self.tau > 1.0:
            raise ConfigError("`tau` must be between 0.0 and 1.0.")


class IncrementalPCA:
    """PCA fitted batch by batch (Ross et al. 2008, as scikit-learn's), in torch.

    Each `partial_fit` decomposes [S_prev * V_prev ; X - mean(X) ; mean correction] and keeps the
    top `n_components` right-singular vectors (`components_`, signs fixed by their largest entry)
    and singular values. `lowrank`: randomized SVD (q = 2 n_components, 4 power iterations, seeded,
    so results are reproducible) instead of the full one.
    """

    def __init__(self, n_components: int, lowrank: bool = True, seed: Optional[int] = 42, niter: int = 4) -> None:
        self.n_components = n_components
        self.lowrank, self.seed, self.niter = lowrank, seed, niter
        self.components_: Optional[torch.Tensor] = None
        self.singular_values_: Optional[torch.Tensor] = None
        self.explained_variance_ratio_: Optional[torch.Tensor] = None
        self.mean_: Optional[torch.Tensor] = None
        self.var_: Optional[torch.Tensor] = None
        self.n_samples_seen_ = 0

    def _svd(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.lowrank:
            return torch.linalg.svd(x, full_matrices=False)
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else [], enabled=self.seed is not None):
            if self.seed is not None:
                torch.manual_seed(self.seed)
            u, s, v = torch.svd_lowrank(x, q=2 * self.n_components, niter=self.niter)
        return u, s, v.mH

    def _update_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Mean and variance of everything seen so far, float64, merged with this batch's (Chan et al.)."""
        seen, new = self.n_samples_seen_, x.shape[0]
        total = seen + new
        batch_sum = x.sum(dim=0, dtype=torch.float64)
        batch_mean = batch_sum / new
        centred = x - batch_mean
        batch_m2 = centred.square().sum(dim=0, dtype=torch.float64) - centred.sum(dim=0, dtype=torch.float64).square() / new
        if self.mean_ is None:
            return batch_sum / total, batch_m2 / total, total
        last_sum = self.mean_ * seen
        m2 = self.var_ * seen + batch_m2 + (seen / new) / total * (last_sum / (seen / new) - batch_sum).square()
        return (last_sum + batch_sum) / total, m2 / total, total

    def partial_fit(self, x: torch.Tensor) -> "IncrementalPCA":
        x = x.to(torch.float32) if x.dtype not in (torch.float32, torch.float64) else x.clone()
        samples, features = x.shape
        if self.n_components > features:
            raise ValueError(f"n_components={self.n_components} invalid for n_features={features}, "
                             "need more rows than columns for IncrementalPCA processing.")
        if self.n_components > samples:
            raise ValueError(f"n_components={self.n_components} must be less or equal to the batch number of "
                             f"samples {samples}")
        mean, var, total = self._update_moments(x)
        if self.components_ is None:
            stacked = x.sub_(mean)  # in place: the centred batch stays in x's dtype
        else:
            batch_mean = x.mean(dim=0)
            correction = ((self.n_samples_seen_ / total) * samples) ** 0.5 * (self.mean_ - batch_mean)
            stacked = torch.vstack((self.singular_values_.view(-1, 1) * self.components_, x - batch_mean, correction))
        _, s, vt = self._svd(stacked)
        signs = torch.sign(vt[torch.arange(vt.shape[0]), vt.abs().argmax(dim=1)])
        vt = vt * signs.view(-1, 1)
        self.explained_variance_ratio_ = (s**2 / torch.sum(var * total))[: self.n_components]
        self.components_ = vt[: self.n_components]
        self.singular_values_ = s[: self.n_components]
        self.mean_, self.var_, self.n_samples_seen_ = mean, var, total
        return self


# ---------------------------------------------------------------------------- default input handling
def forward_fn_dict(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Mapping[str, torch.Tensor], peft_config: Any) -> torch.Tensor:
    """The (batch, position) indices of the tokens EVA uses: not padding, and (use_label_mask) not ignored."""
    if not isinstance(model_input, dict):
        raise TypeError("When using `prepare_model_inputs_fn_language_modeling` inputs must be a dictionary")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    eva = peft_config.eva_config
    if eva.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != eva.label_mask_value)
    return mask.nonzero()


def _first_tensor(layer_input: Any, layer_name: str) -> torch.Tensor:
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise TypeError(
            f"unsupported input type {type(layer_input)} for prepare_layer_inputs_fn in layer {layer_name}, "
            "please provide a custom prepare_layer_inputs_fn"
        )
    return layer_input


def prepare_layer_inputs_fn_language_modeling(layer_input: Any, model_input: torch.Tensor, layer_name: str) -> torch.Tensor:
    """The layer's input rows at the token indices `prepare_model_inputs_fn_language_modeling` kept."""
    return _first_tensor(layer_input, layer_name)[model_input.T.unbind()]


def _default_layer_inputs(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """Without a custom function: the layer input flattened to (tokens, features)."""
    tensor = _first_tensor(layer_input, layer_name)
    return tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() > 2 else tensor


# ----------------------------------------------------------------------------------- the statistics
class _LayerInputs:
    """Forward hook of one layer: its prepared (and, under torch.distributed, gathered) input rows."""

    def __init__(self, name: str, prepare: Optional[Callable], gather: bool) -> None:
        self.name, self.prepare, self.gather = name, prepare or _default_layer_inputs, gather
        self.model_input: Any = None
        self.pca: Optional[IncrementalPCA] = None
        self.first: Optional[torch.Tensor] = None
        self.converged = torch.zeros(0, dtype=torch.bool)

    def start_pca(self, n_components: int, tau: float) -> None:
        self.pca, self.tau = IncrementalPCA(n_components), tau
        self.converged = torch.zeros(n_components, dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        rows = self.prepare(args, self.model_input, self.name)
        if self.gather and dist.is_initialized():
            rows = _gather_rows(rows)
        if self.pca is None:  # the first batch only tells which layers see the same input
            self.first = rows.detach().cpu()
            return
        if rows.shape[0] < self.pca.n_components:
            warnings.warn(f"skipping SVD for {self.name} because there are less than {self.pca.n_components} examples")
            return
        previous = None if self.pca.components_ is None else self.pca.components_.clone()
        self.pca.partial_fit(rows.to(torch.float32))
        if previous is not None:
            similarity = torch.nn.functional.cosine_similarity(self.pca.components_, previous)
            self.converged = (similarity >= self.tau).cpu()


def _gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, concatenated (ranks may hold different numbers of rows)."""
    world = dist.get_world_size()
    sizes = torch.empty(world, dtype=torch.long, device=rows.device)
    dist.all_gather_into_tensor(sizes, torch.tensor([rows.shape[0]], device=rows.device))
    padded = rows.new_zeros((int(sizes.max()), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:n] for g, n in zip(gathered, sizes.tolist())], dim=0)


def _move(inputs: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _move(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_move(v, device) for v in inputs)
    return inputs


def _model_device(model: nn.Module) -> Optional[torch.device]:
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    return next(iter(devices)) if len(devices) == 1 else None


def _share_inputs(hooks: dict[str, _LayerInputs]) -> dict[str, str]:
    """{layer: the first layer with an identical first-batch input}, for every layer that has one."""
    shared: dict[str, str] = {}
    owners: list[str] = []
    for name, hook in hooks.items():
        owner = next((o for o in owners if hooks[o].first.shape == hook.first.shape
                      and torch.equal(hooks[o].first, hook.first)), None)
        if owner is None:
            owners.append(name)
        else:
            shared[name] = owner
    return shared


def _distribute_ranks(pcas: dict[str, IncrementalPCA], owner_of: dict[str, str], budget: int,
                      max_components: dict[str, int], shared: dict[str, str]) -> dict[str, int]:
    """Budget ranks to the components with the largest explained variance ratio, over all layers."""
    ratios = {name: pca.explained_variance_ratio_[: max_components[name]] for name, pca in pcas.items()}
    keys, values = zip(*[(layer, ratio) for layer, owner in owner_of.items() for ratio in ratios[owner]])
    order = torch.stack(values).argsort(descending=True)
    picked = Counter(keys[i] for i in order[:budget].tolist())
    ranks = {layer: picked.get(layer, 0) for layer in owner_of}
    for layer, owner in shared.items():  # the owning layer keeps the largest rank of its group
        if ranks[owner] < ranks[layer]:
            ranks[owner], ranks[layer] = ranks[layer], ranks[owner]
    return ranks


def _eva_state_dict(model: nn.Module, dataloader: Iterable, config: Any, is_target: Callable[[str, nn.Module], bool],
                    forward_fn: Callable, prepare_model_inputs_fn: Optional[Callable],
                    prepare_layer_inputs_fn: Union[Callable, Mapping[str, Callable], None], gather: bool,
                    show_progress_bar: bool) -> dict[str, torch.Tensor]:
    if len(dataloader) == 0:
        raise ValueError("dataloader is empty")
    if dist.is_initialized() and gather:
        warnings.warn(
            "torch.distributed is initialized and `gather_distributed_inputs` is True, therefore EVA initialization "
            "will gather tensors from all ranks. Ensure the model does not receive the same inputs on different ranks."
        )
    eva = config.eva_config or EvaConfig()
    hooks, max_components, budget = _layer_hooks(model, config, eva, is_target, prepare_layer_inputs_fn, gather)
    device = _model_device(model)
    training = model.training
    model.eval()
    handles = {name: model.get_submodule(name).register_forward_hook(hook) for name, hook in hooks.items()}
    try:
        batches = itertools.cycle(dataloader)

        def feed(inputs: Any) -> None:
            inputs = _move(inputs, device)
            model_input = prepare_model_inputs_fn(inputs, config) if prepare_model_inputs_fn else copy.deepcopy(inputs)
            for hook in hooks.values():
                hook.model_input = model_input
            forward_fn(model, inputs)

        feed(next(iter(dataloader)))  # which layers see the same input: they share one decomposition
        shared = _share_inputs(hooks)
        _share_component_counts(shared, max_components)
        for name in shared:
            handles.pop(name).remove()
        owners = {name: hook for name, hook in hooks.items() if name not in shared}
        for name, hook in owners.items():
            hook.first = None
            hook.start_pca(max_components[name], eva.tau)
        owner_of = {**{name: name for name in owners}, **shared}
        ranks = dict(max_components)
        progress = _progress(show_progress_bar)
        while True:
            inputs = next(batches)
            for name, hook in owners.items():
                done = bool(torch.all(hook.converged[: ranks[name]]))
                if done and name in handles:
                    handles.pop(name).remove()
                elif not done and name not in handles:
                    handles[name] = model.get_submodule(name).register_forward_hook(hook)
            progress.update(sum(name not in handles for name in owners), len(owners))
            if not handles:
                break
            feed(inputs)
            if all(hook.pca.components_ is not None for hook in owners.values()):
                ranks = _distribute_ranks({n: h.pca for n, h in owners.items()}, owner_of, budget, max_components, shared)
        progress.close()
    finally:
        for handle in handles.values():
            handle.remove()
        model.train(training)

    return _components(ranks, {name: owners[owner_of[name]].pca for name in ranks}, eva.whiten, device)


def _layer_hooks(model: nn.Module, config: Any, eva: "EvaConfig", is_target: Callable[[str, nn.Module], bool],
                 prepare_layer_inputs_fn: Union[Callable, Mapping[str, Callable], None],
                 gather: bool) -> tuple[dict[str, "_LayerInputs"], dict[str, int], int]:
    """(input collector per target layer, its most components = round(rank * rho), the rank budget)."""
    rho = eva.rho
    if rho > _RHO_THRESHOLD:
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // config.r)
    per_layer = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else None
    hooks: dict[str, _LayerInputs] = {}
    max_components: dict[str, int] = {}
    budget = 0
    for name, module in model.named_modules():
        if not is_target(name, module):
            continue
        prepare = per_layer.pop(name, None) if per_layer is not None else prepare_layer_inputs_fn
        hooks[name] = _LayerInputs(name, prepare, gather)
        rank = pattern_value(config.rank_pattern or {}, name, config.r)
        max_components[name] = round(rank * rho)
        budget += rank
    if per_layer:
        raise ValueError("prepare_layer_inputs_fn is a mapping but the following module names were not found in the "
                         f"model: {per_layer.keys()}")
    if not hooks:
        raise ValueError("EVA found no Linear LoRA layer to initialise (Embedding, Conv and MultiheadAttention LoRA "
                         "layers are not supported).")
    return hooks, max_components, budget


def _share_component_counts(shared: Mapping[str, str], max_components: dict[str, int]) -> None:
    """Layers that see the same input (`shared`: layer -> owner) get the largest count of their group."""
    for owner in set(shared.values()):
        group = [owner] + [name for name, o in shared.items() if o == owner]
        top = max(max_components[name] for name in group)
        for name in group:
            max_components[name] = top


def _components(ranks: Mapping[str, int], pcas: Mapping[str, Any], whiten: bool,
                device: Optional[torch.device]) -> dict[str, torch.Tensor]:
    """Each layer's first `rank` principal components (divided by sqrt(singular value) with `whiten`)."""
    state: dict[str, torch.Tensor] = {}
    for name, rank in ranks.items():
        pca = pcas[name]
        rows = pca.components_[:rank]
        if whiten:
            rows = rows / pca.singular_values_[:rank].sqrt().view(-1, 1)
        state[name] = rows.clone() if device is None else rows.to(device)
    return state


class _progress:
    """A tqdm bar of converged layers on the main process (or nothing)."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled and (not dist.is_initialized() or dist.get_rank() == 0):
            from tqdm.auto import tqdm

            self.bar = tqdm(position=0, leave=False)

    def update(self, converged: int, total: int) -> None:
        if self.bar is not None:
            self.bar.set_description(f"{converged}/{total} layers have converged")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_eva_layer(module: nn.Module) -> bool:
    from .layer import Linear

    return isinstance(module, Linear)


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config: Optional[Any] = None,
    forward_fn: Optional[Callable] = forward_fn_dict,
    prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Union[Callable, dict[str, Callable], None] = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """{layer name: A rows (r_l x in)} from the model's inputs on `dataloader` (module docstring).

    `model` is a PeftModel (its Linear LoRA layers, adapters off during the passes) or a plain
    model with `peft_config` (its targeted nn.Linear / Conv1D layers). `forward_fn(model, batch)`
    runs a batch; `prepare_model_inputs_fn(batch, config)` and `prepare_layer_inputs_fn(layer_input,
    model_input, layer_name)` (one function or {layer name: function}) select the rows used.
    """
    from transformers.pytorch_utils import Conv1D

    is_peft_model = hasattr(model, "peft_config")
    if peft_config is None:
        if not is_peft_model:
            raise ValueError("peft_config is required if model is not a PeftModel")
        peft_config = model.peft_config[adapter_name]
    if is_peft_model:
        context, is_target = model.disable_adapter(), (lambda name, module: _is_eva_layer(module))
    else:
        def is_target(name: str, module: nn.Module) -> bool:
            return isinstance(module, (nn.Linear, Conv1D)) and (peft_config.target_modules is None
                                                                or is_targeted(peft_config, name))
        context = nullcontext()
    with context:
        return _eva_state_dict(model, dataloader, peft_config, is_target, forward_fn, prepare_model_inputs_fn,
                               prepare_layer_inputs_fn, gather_distributed_inputs, show_progress_bar)


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Optional[Iterable] = None,
    eva_state_dict: Optional[dict] = None,
    forward_fn: Optional[Callable] = forward_fn_dict,
    prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Union[Callable, dict[str, Callable], None] = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """Set the A factors (and ranks) of `adapter_name` by EVA: from `eva_state_dict`, or computed on
    `dataloader` with `get_eva_state_dict`. The model must be a PeftModel made with
    `init_lora_weights="eva"` and one active adapter. Returns the model."""
    if not hasattr(model, "peft_config"):
        raise ValueError("model must be a PeftModel")
    if len(model.active_adapters) > 1:
        raise ValueError("`initialize_lora_eva_weights` currently only works with a single active adapter")
    if model.peft_config[adapter_name].init_lora_weights != "eva":
        raise ValueError("`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("dataloader is required if eva_state_dict is not provided")
        eva_state_dict = get_eva_state_dict(model, dataloader, forward_fn=forward_fn,
                                            prepare_model_inputs_fn=prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn=prepare_layer_inputs_fn, adapter_name=adapter_name,
                                            gather_distributed_inputs=gather_distributed_inputs,
                                            show_progress_bar=show_progress_bar)
    _load_eva_state_dict(model, dict(eva_state_dict), adapter_name)
    return model


def _load_eva_state_dict(model: nn.Module, eva_state_dict: dict[str, torch.Tensor], adapter_name: str) -> None:
    from .layer import LoraLayer

    config = model.peft_config[adapter_name]
    eva = config.eva_config or EvaConfig()
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name, _ in layers:  # every new rank checked before any layer changes
        rows = eva_state_dict.get(name)
        if rows is not None and rows.shape[0] and rows.shape[-1] != model.get_submodule(name).in_features:
            raise ValueError(f"eva_state_dict[{name!r}] has {rows.shape[-1]} columns, but the layer has "
                             f"{model.get_submodule(name).in_features} input features; compute it on this model.")
    missing, kept = [], []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    other_names = [n.removeprefix(PEFT_PREFIX) for n, m in model.named_modules() if not isinstance(m, LoraLayer)]
    for name, layer in layers:
        short = name.removeprefix(PEFT_PREFIX)
        rank = pattern_value(config.rank_pattern or {}, name, config.r)
        alpha = pattern_value(config.alpha_pattern or {}, name, config.lora_alpha)
        options = model.base_model.layer_kwargs(config, adapter_name, short, layer)
        if name in eva_state_dict:
            rows = eva_state_dict[name]
            new_rank = rows.shape[0]
            if new_rank == 0:
                parent, _, child = get_submodules(model, name)
                replace_module(parent, child, layer.get_base_layer())
                continue
            if new_rank != rank and eva.adjust_scaling_factors:
                alpha *= new_rank / rank
            if new_rank != rank or layer.lora_A[adapter_name].weight.is_meta:
                layer.update_layer(adapter_name, **{**options, "r": new_rank, "lora_alpha": alpha,
                                                    "init_lora_weights": "eva"})
            layer.lora_A[adapter_name].weight.copy_(rows)
            kept.append(short)
        else:
            layer.update_layer(adapter_name, **{**options, "r": rank, "lora_alpha": alpha, "init_lora_weights": True})
            missing.append(short)
            new_rank = rank
        if new_rank != config.r:
            rank_pattern[short] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[short] = alpha
    targets = kept + missing
    if len(targets) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        targets = minimal_target_modules(targets, other_names)
    config.target_modules = set(targets)
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern
    if missing:
        warnings.warn(
            "the following layers were initialized with init_lora_weights=True because they were not found in the "
            f"eva state_dict: {missing}\ncurrently the following lora modules are not supported by EVA: "
            "Embedding, MultiheadAttention and Conv LoRA layers"
        )


def minimal_target_modules(targets: list[str], others: list[str]) -> list[str]:
    """The shortest dotted suffixes that name every target and no other module (a compact target_modules)."""
    other_suffixes = {".".join(parts[i:]) for parts in (n.split(".") for n in others if n) for i in range(len(parts))}
    found: set[str] = set()
    for target in targets:
        parts = target.split(".")
        if any(".".join(parts[i:]) in found for i in range(len(parts))):
            continue
        for i in range(len(parts) - 1, -1, -1):
            suffix = ".".join(parts[i:])
            if suffix not in other_suffixes:
                found.add(suffix)
                break
    return sorted(found)
