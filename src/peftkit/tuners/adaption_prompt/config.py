"""`AdaptionPromptConfig`: fields, defaults and validation of LLaMA-Adapter's adaption prompts, as in Hugging Face peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import check_size


@dataclass
class AdaptionPromptConfig(PeftConfig):
    """Configuration of adaption prompts (LLaMA-Adapter, https://huggingface.co/papers/2303.16199).

    The top `adapter_layers` attention modules each get `adapter_len` learned prompt tokens P and
    a gate g (zero at start, so the model starts as the base model):

        y = attn(x) + o_proj( g * softmax(q(x) k(P)^T / sqrt(d_head)) v(P) )

    Args:
        target_modules: Name of the attention submodules (the attribute of each decoder layer);
            None picks the model type's ("self_attn" for llama / mistral, "attn" for gpt2).
        adapter_len: Number of prompt tokens per adapted layer (required when the adapter is added).
        adapter_layers: Number of adapted layers, counted from the top (required when the adapter is added).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.ADAPTION_PROMPT
    target_modules: Optional[str] = field(
        default=None, metadata={"help": "Name of the attention submodules to insert adaption prompts into."}
    )
    adapter_len: Optional[int] = field(default=None, metadata={"help": "Number of adapter tokens to insert"})
    adapter_layers: Optional[int] = field(default=None, metadata={"help": "Number of adapter layers (from the top)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.ADAPTION_PROMPT.value:
            raise ConfigError(f"AdaptionPromptConfig has peft_type {self.peft_type!r}; it must be 'ADAPTION_PROMPT'.")
        self.peft_type = PeftType.ADAPTION_PROMPT
        if self.target_modules is not None and (not isinstance(self.target_modules, str) or not self.target_modules):
            raise ConfigError(
                f"target_modules={self.target_modules!r} is invalid; AdaptionPromptConfig takes the name of the "
                "attention submodule of each decoder layer, e.g. 'self_attn', or None for the model type's default."
            )
        check_size(self.adapter_len, "adapter_len", example="10", allow_none=True)
        check_size(self.adapter_layers, "adapter_layers", example="30", allow_none=True)

    @property
    def is_adaption_prompt(self) -> bool:
        """True: adaption prompts (peft's flag)."""
        return True

    def require_sizes(self) -> None:
        """ConfigError unless adapter_len and adapter_layers are set (peft's defaults are None)."""
        for name in ("adapter_len", "adapter_layers"):
            if getattr(self, name) is None:
                raise ConfigError(
                    f"AdaptionPromptConfig.{name} is not set; pass e.g. adapter_len=10, adapter_layers=30 "
                    "(prompt tokens per layer, adapted layers from the top)."
                )
