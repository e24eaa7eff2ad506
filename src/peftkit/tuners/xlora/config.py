"""`XLoraConfig`: X-LoRA's fields and defaults, as in Hugging Face peft."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType


@dataclass
class XLoraConfig(PeftConfig):
    """X-LoRA: a mixture of frozen LoRA experts weighted per token by a trained classifier.

    hidden_size: the base model's hidden size (the classifier's input).
    adapters: {expert name: LoRA adapter folder or hub id}, loaded in this order as the experts
        (peft names them "0", "1", ...). On reloading, `from_pretrained(..., adapters=...)` may
        point elsewhere; peftkit also finds experts saved beside the X-LoRA folder.
    enable_softmax / softmax_temperature: softmax over the experts' logits (temperature T).
    enable_softmax_topk / top_k_lora: keep the k largest scalings per token (and renormalise them).
    layerwise_scalings: one scaling per expert and LoRA layer (else one per expert, shared).
    xlora_depth / xlora_size / xlora_dropout_p: the classifier's MLP (depth 1: a single Linear).
    use_trainable_adapters: train the experts too. scaling_pass_value: the experts' weight in the
    scaling pass (unused: that pass runs the base model). global_scaling_weight: multiplies every
    expert's output.
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.XLORA
    hidden_size: int = None  # type: ignore[assignment]
    adapters: dict[str, str] = None  # type: ignore[assignment]
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: Optional[int] = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.XLORA.value:
            raise ConfigError(f"XLoraConfig has peft_type {self.peft_type!r}; it must be 'XLORA'.")
        self.peft_type = PeftType.XLORA
        if self.hidden_size is None:
            warnings.warn("No value was provided for `hidden_size`. This will be set to 4096 by default, please "
                          "ensure that this is correct.", stacklevel=3)
            self.hidden_size = 4096
        if self.adapters is None:
            warnings.warn("No value was provided for `adapters`. This will be set to empty, please ensure that this "
                          "is correct.", stacklevel=3)
            self.adapters = {}
        if self.enable_softmax_topk and self.top_k_lora is None:
            warnings.warn("`enable_softmax_topk` enabled `top_k_lora` is not set", stacklevel=3)
        if self.enable_softmax_topk and self.enable_softmax:
            warnings.warn("`enable_softmax_topk` and `enable_softmax` are both enabled. This will result in worse "
                          "performance.", stacklevel=3)
        if self.top_k_lora is not None and self.top_k_lora < 1:
            warnings.warn("`top_k_lora` value must be at least 1.", stacklevel=3)
        if self.xlora_depth <= 0:
            raise ConfigError(f"xlora_depth={self.xlora_depth} is invalid: X-LoRA depth must be strictly positive.")
