"""Where bottleneck adapters go in each architecture: `model_type` -> insertion points.

Sequential adapters (houlsby, pfeiffer) wrap the *output projection* of a sub-layer, so they act on
its output before the residual add (and, post-LN, before the LayerNorm). Parallel adapters wrap the
*whole sub-layer* (or, where the model splits it, the module that ends it) and read the
sub-layer's input. See docs/BOTTLENECK.md for diagrams.

Coarse names in `target_modules` resolve through this table:
    "attention"        self-attention (encoder and decoder)
    "cross_attention"  encoder-decoder attention (T5, GPT-2 / BERT with cross-attention)
    "mlp"              the feed-forward network
Each site is a regex matched against the end of a module's dotted path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from torch import nn

COARSE_NAMES = ("attention", "cross_attention", "mlp")

#: The coarse names each preset inserts at when `target_modules` is left out.
DEFAULT_COARSE_NAMES = {
    "houlsby": ("attention", "mlp"),
    "pfeiffer": ("mlp",),
    "parallel": ("attention", "mlp"),
}


@dataclass(frozen=True)
class BlockLayout:
    """Insertion points of one architecture family.

    Args:
        norm: "post-LN" (LayerNorm after the residual add) or "pre-LN" (before the sub-layer).
        sequential: coarse name -> sites of the sub-layer's output projection.
        parallel: coarse name -> sites of the module a parallel adapter runs beside.
        parallel_input: (position, keyword) of the argument of a parallel site that holds the
            sub-layer's input, the tensor the parallel branch reads.
    """

    norm: str
    sequential: dict[str, tuple[str, ...]]
    parallel: dict[str, tuple[str, ...]]
    parallel_input: tuple[int, str] = (0, "hidden_states")


# BERT-style post-LN: `LayerNorm(x + dropout(dense(sublayer(x))))`. The FFN is split into
# `intermediate` and `output`, so its output dense is `layer.<i>.output.dense`; the attention output
# dense is `attention.output.dense`. No module maps x to the FFN output before the LayerNorm, so the
# parallel branch runs beside the `*Output` modules (dense + residual + LayerNorm) and reads their
# `input_tensor` argument, which is the sub-layer input x.
_BERT = BlockLayout(
    norm="post-LN",
    sequential={
        "attention": (r"attention\.output\.dense",),
        "cross_attention": (r"crossattention\.output\.dense",),
        "mlp": (r"layer\.\d+\.output\.dense",),
    },
    parallel={
        "attention": (r"attention\.output",),
        "cross_attention": (r"crossattention\.output",),
        "mlp": (r"layer\.\d+\.output",),
    },
    parallel_input=(1, "input_tensor"),
)

# Llama-style pre-LN: `x + o_proj(attn(norm(x)))` and `x + down_proj(mlp(norm(x)))`.
_LLAMA = BlockLayout(
    norm="pre-LN",
    sequential={"attention": (r"self_attn\.o_proj",), "mlp": (r"mlp\.down_proj",)},
    parallel={"attention": (r"self_attn",), "mlp": (r"mlp",)},
)

# GPT-2 pre-LN, with transformers' Conv1D projections.
_GPT2 = BlockLayout(
    norm="pre-LN",
    sequential={
        "attention": (r"attn\.c_proj",),
        "cross_attention": (r"crossattention\.c_proj",),
        "mlp": (r"mlp\.c_proj",),
    },
    parallel={"attention": (r"attn",), "cross_attention": (r"crossattention",), "mlp": (r"mlp",)},
)

# T5 pre-LN (RMSNorm). "attention" is self-attention in encoder and decoder; cross-attention
# (`EncDecAttention`) is only adapted when "cross_attention" is asked for, as in AdapterHub.
_T5 = BlockLayout(
    norm="pre-LN",
    sequential={
        "attention": (r"SelfAttention\.o",),
        "cross_attention": (r"EncDecAttention\.o",),
        "mlp": (r"DenseReluDense\.wo",),
    },
    parallel={"attention": (r"SelfAttention",), "cross_attention": (r"EncDecAttention",), "mlp": (r"DenseReluDense",)},
)

BLOCK_LAYOUTS: dict[str, BlockLayout] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "camembert": _BERT,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "phi3": _LLAMA,
    "gpt2": _GPT2,
    "t5": _T5,
    "mt5": _T5,
}


def _site_regex(sites: tuple[str, ...]) -> "re.Pattern[str]":
    return re.compile(r"(?:.*\.)?(?:" + "|".join(sites) + r")")


def sites_for(layout: BlockLayout, coarse_name: str, parallel: bool) -> tuple[str, ...]:
    """The site regexes of one coarse name (empty if the architecture lacks that sub-layer)."""
    return (layout.parallel if parallel else layout.sequential).get(coarse_name, ())


def module_paths(
    model: nn.Module, layout: BlockLayout, coarse_name: str, parallel: bool, skip: tuple[str, ...] = ()
) -> set[str]:
    """Full paths of the modules a coarse name selects (empty if the model lacks that sub-layer).

    Full paths keep `layers_to_transform` usable and record exactly what was wrapped. Modules inside
    `skip` (the internals of wrapped layers) are never selected.
    """
    sites = sites_for(layout, coarse_name, parallel)
    if not sites:
        return set()
    pattern = _site_regex(sites)
    return {
        key
        for key, _ in model.named_modules()
        if key and pattern.fullmatch(key) and not any(key.startswith(prefix + ".") for prefix in skip)
    }


def parallel_input_for(layout: Optional[BlockLayout], key: str) -> tuple[int, str]:
    """Which argument of the module at `key` a parallel branch reads (the first by default)."""
    if layout is None:
        return (0, "hidden_states")
    sites = tuple(site for group in layout.parallel.values() for site in group)
    if sites and _site_regex(sites).fullmatch(key):
        return layout.parallel_input
    return (0, "hidden_states")
