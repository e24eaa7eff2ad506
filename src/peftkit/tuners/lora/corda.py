r"""CorDA (https://arxiv.org/abs/2406.05223): context-oriented decomposition of the base weight.

`preprocess_corda` runs the user's `run_model()` on sample data and collects, for each targeted
Linear / Conv1D layer, the covariance of its inputs (each call's tokens X, scaled by max(X)):

    C = mean over calls of X^T X                        (in x in)
    C' = C + damp * mean(diag C) * I                    damp = 0.01, doubled until ||C' C'^-1 - I|| < 0.05
    W C' = U S V'^T,        V = (V'^T C'^-1)^T          so that  W = U S V^T  exactly

The adapter takes r of those components, and the base keeps the rest:

    "ipm" (instruction-previewed, default): the r largest      -- adapt what the task's data uses most
    "kpm" (knowledge-preserved):            the r smallest     -- leave the data's main directions alone
    S_r <- S_r / scaling,   A = diag(sqrt S_r) V_r^T,   B = U_r diag(sqrt S_r),   W <- W - scaling * B A

As with PiSSA, the base weight is rewritten (the model's outputs are unchanged at init) and a
trained adapter converts back to plain LoRA with `save_pretrained(...,
path_initial_model_for_weight_conversion=...)`. `corda_config.cache_file` keeps the cropped
decomposition, `covariance_file` the covariances (peft's file layouts; loaded weights-only).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional

import torch
from torch import nn

from ...errors import ConfigError
from ...utils.commits import commit_files
from ...utils.files import read_weights_file, weights_writer
from .._core.base_journal import record_base_weight
from .._core.matching import is_targeted, pattern_value

if TYPE_CHECKING:
    from .layer import LoraLayer

_METHODS = ("ipm", "kpm")


@dataclass
class CordaConfig:
    """CorDA's options (`LoraConfig.corda_config`), peft's fields and defaults.

    cache_file: where the cropped decomposition is kept (reused when it exists).
    covariance_file: where the input covariances are kept (reusable for other ranks).
    corda_method: "ipm" (largest components to the adapter) or "kpm" (smallest).
    verbose: a progress bar over the layers. use_float16_for_covariance: halve the covariances' memory.
    prune_temporary_fields: drop the covariance and helpers from the layers after preprocessing.
    """

    cache_file: Optional[str] = field(default=None, metadata={"help": "File to store the SVD cache."})
    covariance_file: Optional[str] = field(default=None, metadata={"help": "File to store the covariance matrix."})
    corda_method: Literal["ipm", "kpm"] = field(default="ipm", metadata={"help": "Method to build adapter."})
    verbose: bool = field(default=False, metadata={"help": "If true, prints the progress of CorDA initialization."})
    use_float16_for_covariance: bool = field(
        default=False, metadata={"help": "If true, uses float16 for the covariance matrix."}
    )
    prune_temporary_fields: bool = field(
        default=True, metadata={"help": "If true, temporary fields generated in CorDA preprocessing will be pruned."}
    )

    def __post_init__(self) -> None:
        if self.corda_method is not None and self.corda_method not in _METHODS:
            raise ConfigError(f"Invalid corda_method found: {self.corda_method}, it should be 'ipm' or 'kpm'.")


@dataclass
class CordaEigens:
    """A layer's decomposition W = U diag(S) V^T (cropped to its rank), kept on the layer as `eigens`."""

    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


def _targets(model: nn.Module, config: Any) -> Iterator[tuple[str, nn.Module]]:
    from transformers.pytorch_utils import Conv1D

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and is_targeted(config, name):
            yield name, module


def _out_in(module: nn.Module) -> torch.Tensor:
    """The layer's weight as float32 (out, in) (Conv1D stores (in, out))."""
    from transformers.pytorch_utils import Conv1D

    weight = module.weight.detach().float()
    return weight.T if isinstance(module, Conv1D) else weight


def _device(model: nn.Module) -> str:
    return str(next(model.parameters()).device)


def _save(tensors: dict[str, torch.Tensor], path: str) -> None:
    """peft's file format (a torch file of tensors), written atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    commit_files(folder, {os.path.basename(path): weights_writer(tensors, safe_serialization=False)})


def _exists(path: Optional[str]) -> bool:
    return path is not None and os.path.exists(path) and os.path.getsize(path) > 0


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config: Any,
    run_model: Optional[Callable[[], None]] = None,
    hooked_model: Optional[nn.Module] = None,
) -> None:
    """Attach `eigens` (the cropped decomposition) to every targeted layer; see the module docstring.

    `run_model()` runs the model on sample data (not needed when the cache or covariance file
    exists); `hooked_model`, if given, is the model observed instead of `model` (same layer names).
    Call before `get_peft_model(model, lora_config)` with `init_lora_weights="corda"`.
    """
    options = lora_config.corda_config
    if options is None:
        raise ValueError("`lora_config.corda_config` must be set (CordaConfig(...)) to preprocess for CorDA.")
    targets = list(_targets(model, lora_config))
    if _exists(options.cache_file):
        cache = read_weights_file(options.cache_file, device=_device(model))
        for name, module in targets:
            module.eigens = CordaEigens(*(cache[f"{name}.eigens.{part}"] for part in ("S_WC", "U_WC", "V_WC")))
        return
    if options.corda_method is None:
        raise ValueError("corda_method is required when cache_file is not provided.")
    covariances = _covariances(model, lora_config, run_model, hooked_model)
    layers = [(name, module) for name, module in targets if name in covariances]
    if options.verbose:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="Collecting eigens")
    for name, module in layers:
        rank = pattern_value(lora_config.rank_pattern or {}, name, lora_config.r)
        module.eigens = _crop(_decompose(_out_in(module), covariances[name]), rank, options.corda_method)
        if not options.prune_temporary_fields:
            module.covariance_matrix, module.corda_method, module.rank = covariances[name], options.corda_method, rank
    if options.cache_file is not None:
        _save({f"{name}.eigens.{part}": getattr(module.eigens, part) for name, module in targets
               for part in ("S_WC", "U_WC", "V_WC")}, options.cache_file)


def _covariances(model: nn.Module, config: Any, run_model: Optional[Callable[[], None]],
                 hooked_model: Optional[nn.Module]) -> dict[str, torch.Tensor]:
    """{layer name: mean over calls of X^T X}, X the call's input rows scaled by max(X)."""
    options = config.corda_config
    if _exists(options.covariance_file):
        return read_weights_file(options.covariance_file, device=_device(model))
    if run_model is None:
        raise ValueError("run_model must be specified when covariance file and cache file aren't built.")
    observed = model if hooked_model is None else hooked_model
    observed.eval()
    sums: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            rows = args[0].detach()
            rows = rows.reshape(-1, rows.shape[-1])
            if not options.use_float16_for_covariance:
                rows = rows.float()
            rows = rows / torch.max(rows).abs()
            if not torch.isfinite(rows).all():
                raise ValueError("Invalid value found in input, please check your input data.")
            covariance = rows.t() @ rows
            sums[name] = sums[name] + covariance if name in sums else covariance
            calls[name] = calls.get(name, 0) + 1
        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in _targets(observed, config)]
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
    wanted = {name for name, _ in _targets(model, config)}
    covariances = {name: total / calls[name] for name, total in sums.items() if name in wanted}
    if options.covariance_file is not None:
        _save(covariances, options.covariance_file)
    return covariances


def _decompose(weight: torch.Tensor, covariance: torch.Tensor) -> CordaEigens:
    """W = U diag(S) V^T with U S V'^T the SVD of W C' and V = (V'^T C'^-1)^T (module docstring)."""
    covariance = covariance.float()
    eye = torch.eye(covariance.shape[0], device=covariance.device)
    damp = 0.01
    while True:
        damped = covariance + eye * torch.mean(torch.diag(covariance)) * damp
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    left, singular, right_t = torch.linalg.svd(weight @ damped, full_matrices=False)
    return CordaEigens(S_WC=singular, U_WC=left, V_WC=(right_t @ inverse).t())


def _crop(eigens: CordaEigens, rank: int, method: str) -> CordaEigens:
    """The r largest ("ipm") or r smallest ("kpm") components."""
    if method not in _METHODS:
        raise ValueError(f"Invalid corda_method found: {method}, it should be 'ipm' or 'kpm'.")
    keep = slice(0, rank) if method == "ipm" else slice(-rank, None)
    return CordaEigens(S_WC=eigens.S_WC[keep].clone(), U_WC=eigens.U_WC[:, keep].clone(),
                       V_WC=eigens.V_WC[:, keep].clone())


@torch.no_grad()
def init_corda(layer: "LoraLayer", adapter_name: str) -> None:
    """`init_lora_weights="corda"` on one layer: A, B from its `eigens`, base W <- W - scaling B A."""
    base = layer.get_base_layer()
    eigens = getattr(base, "eigens", None)
    if eigens is None:
        raise ValueError(
            "`eigens` attribute not found for layer, please run `preprocess_corda` first. "
            "More information can be found at examples/corda_finetuning/README.md."
        )
    dtype = base.weight.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            "Please initialize CorDA under float32, float16, or bfloat16. "
            "Subsequently, re-quantize the residual model to help minimize quantization errors."
        )
    weight = layer.out_in_layout(base.weight.to(torch.float32))
    rank, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    out_dim, in_dim = weight.shape
    for part, tensor, shape in (("U", eigens.U_WC, (out_dim, rank)), ("S", eigens.S_WC, (rank,)),
                                ("V", eigens.V_WC, (in_dim, rank))):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"Invalid value found in matrix {part}; run preprocess_corda again on valid data.")
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"Matrix {part} size mismatch: {tuple(tensor.shape)} vs. {shape}. Please make sure the `lora_config` "
                "and `model` argument of `preprocess_corda` is consistent with `get_peft_model`. If you're using cache "
                "in `preprocess_corda`, please make sure the cache is built with the same model and LoRA rank."
            )
    root = torch.sqrt(eigens.S_WC.to(weight.device).float() / scaling)
    weight_a = (eigens.V_WC.t().to(weight.device) * root.view(-1, 1)).contiguous()
    weight_b = (eigens.U_WC.to(weight.device) * root).contiguous()
    layer.lora_A[adapter_name].weight.data = weight_a
    layer.lora_B[adapter_name].weight.data = weight_b
    record_base_weight(base.weight)  # put back if the add / load creating this adapter fails (base_journal.py)
    base.weight.copy_(layer.out_in_layout((weight - scaling * weight_b @ weight_a).to(dtype)))
    del base.eigens
