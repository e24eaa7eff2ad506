r"""Turn a trained PiSSA / OLoRA adapter into a plain LoRA adapter for the ORIGINAL base model.

PiSSA and OLoRA replace the base weight W by W_res = W - s B0 A0 at init. After training:

    W_res + s B A = W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0]

so the trained model equals the original model plus a LoRA adapter of rank 2r whose A stacks
A over A0 and whose B puts B beside -B0. Its config doubles r and lora_alpha (alpha * sqrt(2)
with rsLoRA), which keeps the scaling s, doubles rank_pattern / alpha_pattern, and sets
`init_lora_weights=True`, exactly as peft writes it.

Usage, as in peft: save the adapter once right after `get_peft_model` (before training) to a
folder, train, then `model.save_pretrained(out, path_initial_model_for_weight_conversion=folder)`.

Unlike peft, tensors that are not A/B pairs (modules_to_save heads, biases) are kept unchanged,
and embedding adapters are converted like the others; DoRA adapters are refused, as DoRA is not
an additive update.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ...errors import CheckpointError, ConfigError
from ...utils.constants import PEFT_MODEL_PREFIX
from ...utils.peft_types import PeftType
from .init import is_valid_base_weight_init

# Checkpoint-key endings of the factors, and the dim along which the ranks are stacked.
_A_KEYS = ((".lora_A.weight", 0), (".lora_embedding_A", 0))
_B_KEYS = ((".lora_B.weight", 1), (".lora_embedding_B", 1))


def convert_mutated_init_to_lora(
    config: Any,
    state: dict[str, torch.Tensor],
    config_fields: dict[str, Any],
    initial_dir: str,
    read_weights: Callable[[str], Mapping[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(converted tensors, config fields to save) for saving a PiSSA/OLoRA/LoRA-GA adapter as plain LoRA.

    `config` is the adapter's live config, `state` its checkpoint dict and `config_fields` the
    fields about to be written. `initial_dir` holds the same adapter saved before training (its
    A0, B0); `read_weights(folder)` reads an adapter folder's tensors (given by the caller, so
    this module needs no file code).
    """
    _check_convertible(config)
    initial = {_bare(key): tensor for key, tensor in read_weights(initial_dir).items()}
    converted = {key: _convert_tensor(key, tensor, initial, initial_dir) for key, tensor in state.items()}
    return converted, _converted_config_fields(config_fields)


def _check_convertible(config: Any) -> None:
    if str(config.peft_type) != PeftType.LORA.value:
        raise ConfigError(
            f"path_initial_model_for_weight_conversion is only supported for LoRA adapters, not {config.peft_type}."
        )
    if config.use_dora:
        raise ConfigError(
            "path_initial_model_for_weight_conversion cannot convert a DoRA adapter (use_dora=True): DoRA is not an "
            "additive update, so it has no plain-LoRA equivalent. Save without the conversion."
        )
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ConfigError(
            "path_initial_model_for_weight_conversion is not supported with use_rslora=True together with "
            "rank_pattern/alpha_pattern."
        )
    if not (is_valid_base_weight_init(config.init_lora_weights) or config.init_lora_weights is True):
        warnings.warn(
            "path_initial_model_for_weight_conversion only converts a PiSSA/OLoRA/LoRA-GA adapter to plain LoRA; "
            f"this adapter has init_lora_weights={config.init_lora_weights!r}.",
            stacklevel=5,
        )


def _bare(key: str) -> str:
    return key[len(PEFT_MODEL_PREFIX):] if key.startswith(PEFT_MODEL_PREFIX) else key


def _convert_tensor(key: str, tensor: torch.Tensor, initial: dict[str, torch.Tensor], initial_dir: str) -> torch.Tensor:
    """A -> [A ; A0], B -> [B | -B0]; any other tensor unchanged."""
    for suffixes, sign in ((_A_KEYS, 1), (_B_KEYS, -1)):
        for suffix, dim in suffixes:
            if key.endswith(suffix):
                start = initial.get(_bare(key))
                if start is None or start.shape != tensor.shape:
                    found = "missing" if start is None else f"shaped {tuple(start.shape)}"
                    raise CheckpointError(
                        f"The initial adapter in {initial_dir!r} has {_bare(key)} {found}, expected shape "
                        f"{tuple(tensor.shape)}; pass the folder this adapter was saved to before training."
                    )
                return torch.cat([tensor, sign * start.to(tensor.device, tensor.dtype)], dim=dim)
    return tensor


def _converted_config_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The saved config of the rank-2r adapter: r, alpha and the patterns doubled, plain init."""
    fields = dict(fields)
    fields["init_lora_weights"] = True
    fields["r"] = 2 * fields["r"]
    # scaling alpha / r (or alpha / sqrt(r) with rsLoRA) must not change when r doubles.
    fields["lora_alpha"] = fields["lora_alpha"] * (2**0.5 if fields.get("use_rslora") else 2)
    fields["rank_pattern"] = {key: 2 * value for key, value in (fields.get("rank_pattern") or {}).items()}
    fields["alpha_pattern"] = {key: 2 * value for key, value in (fields.get("alpha_pattern") or {}).items()}
    return fields
