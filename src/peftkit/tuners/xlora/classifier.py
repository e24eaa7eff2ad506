r"""The X-LoRA classifier: per token, a weight for every LoRA expert, from the base model's last hidden state.

    h = hidden_states[-1]                       (batch, seq, hidden)  -- from a base-model pass
    logits = MLP(h)                             depth 1: Linear(hidden, E [* L]);  depth d: d-1 hidden
                                                layers of xlora_size with ReLU (+ dropout), then the head
    scalings = softmax(logits / T)              (batch, seq, L, E); without layerwise_scalings the same
                                                E weights are repeated for each of the L LoRA layers

E experts, L X-LoRA layers (the LoRA layers of the model, in module order). The parameter names
(`layers.<i>`) are peft's, so checkpoints match key for key.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn


class TemperatureScaledSoftmax(nn.Module):
    """softmax(logits / temperature) over the last dimension."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits / self.temperature, dim=-1)


class XLoraClassifier(nn.Module):
    """Maps the last hidden state to the experts' scalings (module docstring)."""

    def __init__(self, config: Any, n_classes: int, n_layers: int, device: Optional[torch.device], dtype: torch.dtype) -> None:
        super().__init__()
        self.n_classes, self.n_layers, self.config = n_classes, n_layers, config
        self.log_scalings: list[torch.Tensor] = []
        self.scalings_logging = False
        self.softmax = TemperatureScaledSoftmax(temperature=config.softmax_temperature)
        self.override_scaling_pass_value = config.scaling_pass_value
        outputs = n_classes * n_layers if config.layerwise_scalings else n_classes
        layers: list[nn.Module] = []
        width = config.hidden_size
        for _ in range(config.xlora_depth - 1):
            layers += [nn.Linear(width, config.xlora_size), nn.ReLU()]
            if config.xlora_dropout_p > 0.0:
                layers.append(nn.Dropout(p=config.xlora_dropout_p))
            width = config.xlora_size
        layers.append(nn.Linear(width, outputs))
        self.layers = nn.Sequential(*layers).to(device=device, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[-1].weight.dtype

    def make_dummy_scalings(self, input_ids: Optional[torch.Tensor] = None,
                            inputs_embeds: Optional[torch.Tensor] = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Scalings filled with `scaling_pass_value`, shaped (batch, seq, L, E) like real ones."""
        reference = input_ids if input_ids is not None else inputs_embeds
        return torch.full((reference.shape[0], reference.shape[1], self.n_layers, self.n_classes),
                          self.override_scaling_pass_value, device=reference.device, dtype=self.dtype)

    def forward(self, result: Any, input_ids: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The scalings (batch, seq, L, E) for a base-model output with `hidden_states`."""
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, seq = reference.shape[0], reference.shape[1]
        logits = self.layers(result.hidden_states[-1])
        if not self.config.layerwise_scalings:
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        scalings = logits.reshape(batch, seq, self.n_layers, self.n_classes)
        if self.config.enable_softmax:
            scalings = self.softmax(scalings)
        if self.scalings_logging:
            self.log_scalings.append(scalings)
        return scalings

    def _get_bucketed_scalings(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """{seq_len: (positions in the log, scalings)}."""
        buckets: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
        for position, scalings in enumerate(self.log_scalings):
            positions, tensors = buckets.setdefault(scalings.shape[1], ([], []))
            positions.append(position)
            tensors.append(scalings)
        return buckets

    def _set_override_scaling_pass_value(self, value: Optional[float]) -> None:
        self.override_scaling_pass_value = 1 / self.n_classes if value is None else value
        self.config.scaling_pass_value = self.override_scaling_pass_value
