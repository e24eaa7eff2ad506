"""Adaption prompts (LLaMA-Adapter): learned prompt tokens attended to by the top attention layers,
`y = attn(x) + o_proj(g * softmax(q k(P)^T / sqrt(d)) v(P))`, with the gate g zero at start."""

from ...registry import MethodSpec
from ...utils.peft_types import PeftType
from .config import AdaptionPromptConfig
from .layer import AdaptedAttention
from .model import AdaptionPromptModel

METHOD = MethodSpec(
    peft_type=PeftType.ADAPTION_PROMPT,
    config_cls=AdaptionPromptConfig,
    tuner_cls=AdaptionPromptModel,
    cli_names=("adaption_prompt", "llama_adapter"),
    capabilities=set(),
    display_name="AdaptionPrompt",
)

__all__ = ["METHOD", "AdaptedAttention", "AdaptionPromptConfig", "AdaptionPromptModel"]
