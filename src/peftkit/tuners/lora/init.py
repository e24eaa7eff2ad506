r"""Initialisations that take the adapter from the base weight: PiSSA and OLoRA.

Both split the base weight W (out x in) into a rank-r part, which becomes the adapter, and a
residual, which replaces W:

    W = W_res + s B A          ->  the base layer now holds W_res; a fresh adapter is a no-op

PiSSA (https://arxiv.org/abs/2404.02948) takes the top-r singular triplets, W ~ V_r S_r U_r^T:

    A = sqrt(S_r / s) U_r^T,   B = V_r sqrt(S_r / s)

("pissa" is an exact SVD; "pissa_niter_N" a randomized one, `torch.svd_lowrank` with N power
iterations, much faster on large matrices). OLoRA (https://arxiv.org/abs/2406.01775) takes the
QR decomposition W = Q R:   A = R[:r],  B = Q[:, :r].

THE BASE MODEL IS MODIFIED IN PLACE (put back, exactly, if the add / load creating the adapter
fails: `_core/base_journal.py`). An adapter trained this way only works on top of W_res. To
get a plain LoRA adapter that works on the original W, save the adapter once before training and
pass that folder to `save_pretrained(..., path_initial_model_for_weight_conversion=...)` later
(see `conversion.py`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from ...errors import ConfigError
from .._core.base_journal import record_base_weight

if TYPE_CHECKING:
    from .layer import LoraLayer

_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


#: the init -> the LoraConfig field holding its options
_INIT_OPTION_FIELDS = {"loftq": "loftq_config", "lora_ga": "lora_ga_config"}


def is_valid_base_weight_init(init_lora_weights: Union[bool, str]) -> bool:
    """The inits whose trained adapter converts back to plain LoRA (`conversion.py`): "pissa",
    "pissa_niter_<N>", "olora", "lora_ga" and "corda"."""
    if not isinstance(init_lora_weights, str):
        return False
    return init_lora_weights in ("pissa", "olora", "lora_ga", "corda") or _PISSA_NITER.fullmatch(init_lora_weights) is not None


def rewrites_base_weight(init_lora_weights: Union[bool, str]) -> bool:
    """The inits that set the adapter from the base weight and rewrite it: PiSSA, OLoRA, LoRA-GA
    (`loraga.py`), CorDA (`corda.py`), LoftQ (`loftq.py`)."""
    return init_lora_weights == "loftq" or is_valid_base_weight_init(init_lora_weights)


def init_options(config: Any) -> Optional[Any]:
    """The options of `config`'s init (its `loftq_config` / `lora_ga_config`), None for the others."""
    field = _INIT_OPTION_FIELDS.get(config.init_lora_weights) if isinstance(config.init_lora_weights, str) else None
    return None if field is None else getattr(config, field)


def init_from_base_weight(
    layer: "LoraLayer", adapter_name: str, init_lora_weights: str, init_config: Optional[dict[str, Any]] = None
) -> None:
    """Set `lora_A` / `lora_B` of `adapter_name` from the base weight and replace it by the residual
    (LoftQ: by its quantized self; `init_config` is then the `loftq_config` dict)."""
    if init_lora_weights == "loftq":
        from .loftq import init_loftq

        init_loftq(layer, adapter_name, init_config)
        return
    if init_lora_weights == "lora_ga":
        from .loraga import init_lora_ga

        init_lora_ga(layer, adapter_name, init_config)
        return
    if init_lora_weights == "corda":
        from .corda import init_corda

        init_corda(layer, adapter_name)
        return
    base = layer.get_base_layer()
    dtype = base.weight.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(
            f"init_lora_weights={init_lora_weights!r} needs a float32/float16/bfloat16 base weight, got {dtype}; "
            "initialise before quantizing (and quantize the residual model afterwards)."
        )
    rank = layer.r[adapter_name]
    scaling = layer.scaling[adapter_name]
    weight = layer.out_in_layout(base.weight).detach().to(torch.float32)
    if rank > min(weight.shape):
        raise ConfigError(
            f"init_lora_weights={init_lora_weights!r} needs r <= min(in, out) = {min(weight.shape)}, got r={rank}; "
            "lower r (or set rank_pattern for this module)."
        )
    if init_lora_weights == "olora":
        weight_a, weight_b = _olora_factors(weight, rank)
    else:
        match = _PISSA_NITER.fullmatch(init_lora_weights)
        weight_a, weight_b = _pissa_factors(weight, rank, scaling, int(match.group(1)) if match else None)
    residual = weight - scaling * weight_b @ weight_a
    record_base_weight(base.weight)  # put back if the add / load creating this adapter fails (base_journal.py)
    with torch.no_grad():
        layer.lora_A[adapter_name].weight.copy_(weight_a)
        layer.lora_B[adapter_name].weight.copy_(weight_b)
        base.weight.copy_(layer.out_in_layout(residual.to(dtype)))


def _pissa_factors(weight: torch.Tensor, rank: int, scaling: float, niter: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) from the top-`rank` singular triplets, each factor carrying sqrt(S / scaling)."""
    if niter is None:
        left, singular, right_t = torch.linalg.svd(weight, full_matrices=False)
        left, singular, right_t = left[:, :rank], singular[:rank], right_t[:rank]
    else:
        left, singular, right = torch.svd_lowrank(weight, rank, niter=niter)
        right_t = right.t()
    root = torch.diag(torch.sqrt(singular / scaling))
    return root @ right_t, left @ root


def _olora_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (R[:rank], Q[:, :rank]) of W = Q R."""
    q, r = torch.linalg.qr(weight)
    return r[:rank].contiguous(), q[:, :rank].contiguous()
