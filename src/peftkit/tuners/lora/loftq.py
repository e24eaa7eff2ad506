r"""LoftQ (https://arxiv.org/abs/2310.08659): a LoRA adapter that starts by absorbing its base's
quantization error.

A base weight W (out x in) is about to be quantized. Plain QLoRA starts at Q(W) + 0, off from W by
the quantization error. LoftQ alternates between quantizing what the adapter does not cover and
fitting the adapter, by a rank-r SVD, to what the quantization misses:

    R_0 = W
    for t = 1 .. loftq_iter:
        Q_t   = dequant(quant(R_{t-1}))               NF4 (blocks of 64, fp32 absmax) or int8 per row
        L, R  = SVD_r(W - Q_t)                        W - Q_t ~ L R,  L = U_r sqrt(S_r),  R = sqrt(S_r) V_r^T
        R_t   = W - L R                               (not needed after the last step)

    base weight <- Q_T,   lora_A <- R (r x in),   lora_B <- L (out x r)

so that Q_T + B A ~ W. As in peft, the factors carry no `1 / scaling`: the adapter's output is
`scaling * B A x`, which equals the fitted correction when lora_alpha == r (scaling 1).

Two entry points:
- `init_lora_weights="loftq"` with `loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1)` on a
  full-precision base: the base weight is REPLACED by Q_T (still dense: quantize the model, e.g.
  with `peftkit.quantization.quantize_model`, after saving it), the adapter by (R, L).
- `replace_lora_weights_loftq(peft_model, model_path)` on a model whose LoRA layers already wrap
  4-bit bases (peftkit's `Linear4bit` or bitsandbytes'): one SVD of W - dequant(codes) per layer,
  W read lazily from the model's safetensors file(s); the base codes are left as they are.

Our NF4 is bitsandbytes' format computed by its formula in PyTorch (`quantization/formats.py`), so
this runs on any device, CPU included.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from ...errors import ConfigError
from ...quantization.formats import dequantize_4bit, dequantize_int8_rowwise, quantize_4bit, quantize_int8_rowwise
from ...quantization.linear import Linear4bit
from ...quantization.weights import is_quantized, read_weight
from .._core.base_journal import record_base_weight

if TYPE_CHECKING:
    from .layer import LoraLayer

LOFTQ_BITS = (4, 8)


@dataclass
class LoftQConfig:
    """LoftQ's options (`LoraConfig.loftq_config`, saved as a dict, as peft does).

    loftq_bits: 4 (NF4) or 8 (int8, one absmax per row).
    loftq_iter: alternations between quantizing and fitting the adapter (>= 1).
    """

    loftq_bits: int = field(default=4, metadata={"help": "Quantization bits for LoftQ"})
    loftq_iter: int = field(default=1, metadata={"help": "Alternating iterations for LoftQ"})


def check_loftq_options(options: dict[str, Any]) -> None:
    """Refuse bits / iterations LoftQ has no meaning for, before any weight is touched."""
    bits, iters = options.get("loftq_bits", 4), options.get("loftq_iter", 1)
    if bits not in LOFTQ_BITS:
        raise ConfigError(f"loftq_bits={bits!r} is not supported: LoftQ quantizes to 4 (nf4) or 8 (int8) bits.")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters <= 0:
        raise ConfigError(f"loftq_iter={iters!r} must be an integer >= 1 (the number of alternations).")


def fake_quantize(weight: torch.Tensor, num_bits: int) -> torch.Tensor:
    """dequant(quant(weight)) in float32: NF4 in blocks of 64 with fp32 absmax, or int8 per row."""
    if num_bits == 4:
        packed, state = quantize_4bit(weight, "nf4")
        return dequantize_4bit(packed, state, torch.float32)
    codes, row_absmax = quantize_int8_rowwise(weight)
    return dequantize_int8_rowwise(codes, row_absmax, torch.float32)


def low_rank_fit(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (sqrt(S_r) V_r^T, U_r sqrt(S_r)): the best rank-`rank` approximation B A of `residual`."""
    if residual.dim() != 2:
        raise ConfigError(f"LoftQ fits 2-D weights only, got a weight with {residual.dim()} dimensions.")
    left, singular, right_t = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(singular[:rank])
    return root.unsqueeze(1) * right_t[:rank], left[:, :rank] * root


@torch.no_grad()
def loftq_factors(weight: torch.Tensor, num_bits: int, rank: int, num_iter: int = 1) -> tuple[torch.Tensor, ...]:
    """(Q, A, B), all float32, with Q = dequant(quant(.)) and Q + B A ~ `weight` (module docstring)."""
    weight = weight.detach().to(torch.float32)
    remainder = weight
    for step in range(num_iter):
        dequantized = fake_quantize(remainder, num_bits)
        weight_a, weight_b = low_rank_fit(weight - dequantized, rank)
        if step + 1 < num_iter:
            remainder = weight - weight_b @ weight_a
    return dequantized, weight_a, weight_b


def init_loftq(layer: "LoraLayer", adapter_name: str, options: Optional[dict[str, Any]]) -> None:
    """`init_lora_weights="loftq"`: the base weight becomes Q, the adapter (A, B) (module docstring)."""
    options = dict(options or {})
    check_loftq_options(options)
    base = layer.get_base_layer()
    if is_quantized(base):
        raise ConfigError(
            "init_lora_weights='loftq' quantizes a full-precision base weight itself, but this base is already "
            "quantized; load the model unquantized, or use replace_lora_weights_loftq(peft_model) on the quantized one."
        )
    weight = layer.out_in_layout(base.weight)
    rank = layer.r[adapter_name]
    if rank > min(weight.shape):
        raise ConfigError(f"init_lora_weights='loftq' needs r <= min(in, out) = {min(weight.shape)}, got r={rank}.")
    dequantized, weight_a, weight_b = loftq_factors(weight, options.get("loftq_bits", 4), rank,
                                                    options.get("loftq_iter", 1))
    record_base_weight(base.weight)  # put back if the add / load creating this adapter fails (base_journal.py)
    with torch.no_grad():
        layer.lora_A[adapter_name].weight.copy_(weight_a)
        layer.lora_B[adapter_name].weight.copy_(weight_b)
        base.weight.copy_(layer.out_in_layout(dequantized.to(base.weight.dtype)))


# ------------------------------------------------------------------------ already-quantized models
class _SafetensorsWeights:
    """Tensors of a (possibly sharded) `model.safetensors`, read one at a time (never the whole file)."""

    def __init__(self, peft_model: nn.Module, model_path: Optional[str]) -> None:
        base_model = peft_model.get_base_model()
        if model_path is None:
            model_path = _local_snapshot(base_model)
        if not model_path.endswith("model.safetensors"):
            model_path = os.path.join(model_path, "model.safetensors")
        self.base_model_prefix = getattr(base_model, "base_model_prefix", None)
        self.files: dict[str, str] = {}
        self.single = model_path if os.path.exists(model_path) else None
        if self.single is None:
            index = model_path + ".index.json"
            if not os.path.exists(index):
                raise FileNotFoundError(
                    f"Could not find file for {model_path}, ensure that there is a (sharded) safetensors file of the model."
                )
            with open(index, encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
            folder = os.path.dirname(model_path)
            self.files = {name: os.path.join(folder, shard) for name, shard in weight_map.items()}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        candidates = [name]
        if self.base_model_prefix and name.startswith(self.base_model_prefix + "."):
            candidates.append(name[len(self.base_model_prefix) + 1:])
        for candidate in candidates:
            path = self.single or self.files.get(candidate)
            if path is None:
                continue
            with safe_open(path, framework="pt", device="cpu") as handle:
                if candidate in handle.keys():
                    return handle.get_tensor(candidate)
        raise KeyError(f"{name!r} is not in the model's safetensors file(s); pass model_path of the unquantized model.")


def _local_snapshot(base_model: nn.Module) -> str:
    """The cached hub folder of a transformers model, never downloaded (local files only)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(base_model.config._name_or_path, local_files_only=True)
    except (AttributeError, HFValidationError) as exc:
        raise ValueError(
            "The provided model does not appear to be a transformers model or is a local model. In this case, "
            "you must pass the model_path argument that points to the safetensors file."
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise ValueError("The model.safetensors file must be present on disk, but it could not be found.") from exc


def _is_4bit(base: nn.Module) -> bool:
    if isinstance(base, Linear4bit):
        return True
    return is_quantized(base) and hasattr(getattr(base, "weight", None), "quant_state")  # bitsandbytes' Linear4bit


@torch.no_grad()
def replace_lora_weights_loftq(
    peft_model: nn.Module,
    model_path: Optional[str] = None,
    adapter_name: str = "default",
    callback: Optional[Callable[[nn.Module, str], bool]] = None,
) -> None:
    """Set the LoRA factors of every 4-bit-based LoRA layer to LoftQ's fit of W - dequant(codes).

    W comes from the unquantized model's safetensors file(s) at `model_path` (a file or folder;
    None: the model's local hub cache). `callback(peft_model, module_name)` is called after each
    replacement; returning False rolls that layer back (a greedy check that the error went down).
    """
    from .layer import LoraLayer

    prefix = "base_model.model."
    layers = [(name, module) for name, module in peft_model.named_modules()
              if isinstance(module, LoraLayer) and adapter_name in module.lora_A and _is_4bit(module.get_base_layer())]
    if not layers:
        raise ValueError("No 4-bit quantized LoRA module found on the model (bitsandbytes' or peftkit's Linear4bit).")
    for name, _ in layers:
        if not name.startswith(prefix):
            raise TypeError("The passed model does not appear to be a valid PeftModel")
    weights = _SafetensorsWeights(peft_model, model_path)
    for name, layer in layers:
        name = name[len(prefix):]
        dequantized = read_weight(layer.get_base_layer())
        residual = weights.get(name + ".weight").to(dequantized.device, torch.float32) - dequantized
        weight_a, weight_b = low_rank_fit(residual, layer.r[adapter_name])
        lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        before = (lora_a.detach().clone(), lora_b.detach().clone())
        lora_a.copy_(weight_a)
        lora_b.copy_(weight_b)
        if callback is not None and not callback(peft_model, name):
            lora_a.copy_(before[0])
            lora_b.copy_(before[1])
