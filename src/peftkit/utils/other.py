"""peft's small training helpers of `peft.utils.other`: `shift_tokens_right`, `cast_mixed_precision_params`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError


def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: Optional[int], decoder_start_token_id: int) -> torch.Tensor:
    """Decoder inputs from labels: shifted one position right, `decoder_start_token_id` first,
    label padding (-100) replaced by `pad_token_id`. `input_ids` is `(batch, seq_len)`; a new tensor."""
    if pad_token_id is None:
        raise ConfigError("self.model.config.pad_token_id has to be defined.")
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill_(shifted == -100, pad_token_id)


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen parameters of `model` to `dtype` (fp16 / bf16) and the trainable ones to fp32, in place.

    For mixed-precision training: the frozen base takes half the memory, the adapters keep full
    precision for stable updates.
    """
    for param in model.parameters():
        param.data = param.data.to(torch.float32 if param.requires_grad else dtype)
