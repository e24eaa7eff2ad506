"""Merging adapters into the base weights of many layers: all of them, or (on failure) none.

One layer's merge is all-or-nothing already (`BaseTunerLayer._merge_names`); `merge_layers` makes
a whole model's merge so: with `safe_merge` it computes and checks every layer's merge before it
writes any, and any failure while writing unmerges the layers it merged. `merge_adapter` and
`merge_and_unload` both go through it, after `warn_if_merging_tied_targets` (peft's warning).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from typing import Optional

from torch import nn
from tqdm.auto import tqdm

from .layer import BaseTunerLayer

#: The layer names by which peft recognises a (possibly tied) embedding when warning about merges.
_EMBEDDING_NAMES = ("embed_tokens", "lm_head")
#: The example in peft's warning on merging tied layers (its text, verbatim).
_UNTIE_EXAMPLE = """
```python
from transformers import AutoModelForCausalLM

# Load original tied model
model = AutoModelForCausalLM.from_pretrained("google/gemma-2-2b-it", tie_word_embeddings=False)

# Set the randomly initialized lm_head to the previously tied embeddings
model.lm_head.weight.data = model.model.embed_tokens.weight.data.clone()

# Save the untied model
untied_model_dir = "dir/for/untied/model"
model.save_pretrained(untied_model_dir)
model.config.save_pretrained(untied_model_dir)

# Now use the original model but in untied format
model = AutoModelForCausalLM.from_pretrained(untied_model_dir)
```
"""


def merge_layers(
    layers: list[BaseTunerLayer], safe_merge: bool, adapter_names: Optional[list[str]], progressbar: bool = False
) -> None:
    """Merge into every layer or, if any fails, into none.

    With `safe_merge`, every layer's merge is computed and checked first (`_check_merge`:
    NaN/inf, layers that cannot merge), one layer at a time and writing nothing; only then is
    each written. Any failure while writing (a layer that cannot merge without `safe_merge`,
    out of memory) unmerges the layers this call merged. Plain merges skip the check: it
    computes every merge twice.
    """
    plans = [(layer, layer._adapters_to_merge(adapter_names)) for layer in layers]
    plans = [(layer, names) for layer, names in plans if names]
    if safe_merge:
        for layer, names in plans:
            layer._check_merge(names, safe_merge)
    done: list[tuple[BaseTunerLayer, int]] = []
    try:
        for layer, names in tqdm(plans, disable=not progressbar, desc="Merging"):
            keep = len(layer.merged_adapters)
            layer._merge_names(names, safe_merge)
            done.append((layer, keep))
    except BaseException:
        for layer, keep in reversed(done):
            if keep:
                layer._unmerge_to(keep)
            else:
                layer.unmerge()  # the layer's own full unmerge (e.g. LoRA's MHA also unmerges out_proj)
        raise


def warn_if_merging_tied_targets(model: nn.Module, targeted_module_names: Iterable[str]) -> None:
    """peft's warning (its text and rule) when merging adapters of layers named like a tied embedding.

    With `tie_word_embeddings`, the output layer's weight *is* the input embedding's: merging a
    LoRA of either changes both layers, which silently changes the model's logits.
    """
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):
        fields = config.to_dict()
    elif dataclasses.is_dataclass(config):
        fields = dataclasses.asdict(config)
    else:
        fields = config if isinstance(config, dict) else {}
    if not fields.get("tie_word_embeddings"):
        return
    tied_target_modules = [name for name in targeted_module_names if name.split(".")[-1] in _EMBEDDING_NAMES]
    if tied_target_modules:
        warnings.warn(
            f"Model with `tie_word_embeddings=True` and the {tied_target_modules=} are part of the adapter. "
            "This can lead to complications. "
            "You can opt to merge the adapter after cloning the weights (to untie the embeddings). "
            "You can untie the embeddings by loading the model with `tie_word_embeddings=False`. For example:"
            + _UNTIE_EXAMPLE,
            stacklevel=5,  # the user's call, above PeftModel's and the tuner's merge methods
        )
