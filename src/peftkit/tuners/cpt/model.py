"""`CPTEmbedding` and its tuner: the context's embeddings plus a projected, masked delta, and CPT's loss.

    prompt = E + P(delta)          E = embed(cpt_token_ids), frozen; delta trained, zero at start
    P(delta)_j = delta_j * eps_j / max(|delta_j|, eps_j)        (each row kept in its epsilon ball)

eps_j is `opt_projection_format_epsilon` (templates, type % 4 in {1, 3}) or `opt_projection_epsilon`
(inputs, type % 4 == 2), times sqrt(token_dim / 2048); 1e-10 for labels. Only template and input rows
get a gradient. The projection is written back into `delta_embedding.weight` on every forward, as in
peft, so what the optimizer sees is always inside the ball.

The loss, on the context and the input together (types of the input shifted past the context's):

    labels_t = token_t where type_t > 0 and type_t % 4 == 0, else -100
    loss     = mean_t [CE(logits_t-1, labels_t) * w_t]     over positions with a label
    w_t      = decay ** k, k = how many distinct label types of the row are larger   ("decay"; else 1)

Checkpoints hold `prompt_embeddings` = E + P(delta), as peft writes them.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ...errors import ConfigError
from .._prompt.config import fill_from_model_config
from .._prompt.model import PromptLearningModel
from .config import CPTConfig

#: The radius of rows that never move (label tokens, untyped tokens).
_NO_MOVE = 1e-10


class CPTEmbedding(nn.Module):
    """`embedding` (the context, frozen) and `delta_embedding` (the trained, projected update), n x d each."""

    def __init__(self, config: CPTConfig, word_embeddings: nn.Module) -> None:
        super().__init__()
        count, dim = config.num_virtual_tokens, config.token_dim
        ids = torch.tensor(config.cpt_token_ids, dtype=torch.long)
        rows = word_embeddings.weight.shape[0]
        if not config.inference_mode and int(ids.max()) >= rows:
            raise ConfigError(
                f"cpt_token_ids holds ids up to {int(ids.max())} but the model's input embedding has {rows} rows; "
                "tokenize the context with this model's tokenizer."
            )
        self.embedding = nn.Embedding(count, dim)
        if not config.inference_mode:
            with torch.no_grad():
                context = word_embeddings(ids.to(word_embeddings.weight.device)).detach().clone().float()
            self.embedding.weight = nn.Parameter(context)
        self.embedding.requires_grad_(False)
        self.delta_embedding = nn.Embedding(count, dim)
        with torch.no_grad():
            self.delta_embedding.weight.zero_()
        types = torch.tensor(config.cpt_tokens_type_mask, dtype=torch.long)
        kind = types % 4
        self.register_buffer("movable", ((kind == 1) | (kind == 2) | (kind == 3)).unsqueeze(1), persistent=False)
        scale = torch.sqrt(torch.tensor([dim / 2048], dtype=torch.float32))
        radius = torch.full((count,), _NO_MOVE, dtype=torch.float32)
        typed = types > 0
        radius[typed & ((kind == 1) | (kind == 3))] = (config.opt_projection_format_epsilon * scale).item()
        radius[typed & (kind == 2)] = (config.opt_projection_epsilon * scale).item()
        self.register_buffer("radius", radius, persistent=False)

    def frozen_parameters(self) -> tuple[nn.Parameter, ...]:
        """The context itself never trains (the tuner keeps these frozen)."""
        return (self.embedding.weight,)

    @torch.no_grad()
    def project_delta(self) -> None:
        """Pull every non-zero row of the delta back into its epsilon ball (in place)."""
        weight = self.delta_embedding.weight
        norm = weight.norm(p=2, dim=1)
        radius = self.radius.to(norm.dtype)
        factor = torch.where(norm > 0, radius / torch.maximum(norm, radius), torch.ones_like(norm))
        weight.mul_(factor.unsqueeze(1).to(weight.dtype))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        self.project_delta()
        weight = self.delta_embedding.weight
        # Label rows keep their value but get no gradient (peft masks the gradient with a hook).
        delta = torch.where(self.movable, weight, weight.detach())
        return self.embedding(indices).detach() + F.embedding(indices, delta)


def cpt_labels_and_types(
    config: CPTConfig, labels: torch.Tensor, input_type_mask: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and token types of [context, input]: the input's types move past the context's
    (no input type mask: every input token is type 4, an output), non-label positions get -100."""
    batch, device = labels.shape[0], labels.device
    prefix_types = torch.tensor(config.cpt_tokens_type_mask, dtype=torch.long, device=device).expand(batch, -1)
    if input_type_mask is None:
        input_type_mask = torch.full(labels.shape, 4, dtype=torch.long, device=device)
    input_types = input_type_mask.to(device=device, dtype=torch.long)
    input_types = torch.where(input_types > 0, input_types + prefix_types.max(), input_types)  # a copy: the caller's stays
    types = torch.cat((prefix_types, input_types), dim=1)
    prefix_labels = torch.tensor(config.cpt_token_ids, dtype=labels.dtype, device=device).expand(batch, -1)
    all_labels = torch.cat((prefix_labels, labels), dim=1)
    is_label = (types > 0) & (types % 4 == 0)
    return all_labels.masked_fill(~is_label, -100), types


def cpt_loss(logits: torch.Tensor, labels: torch.Tensor, types: torch.Tensor, config: CPTConfig) -> torch.Tensor:
    """CPT's weighted next-token loss (module docstring); labels and types cover [context, input]."""
    labels, types = labels.to(logits.device)[:, 1:], types.to(logits.device)[:, 1:]
    logits = logits[:, :-1]
    batch, length, vocab = logits.shape
    token_loss = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), reduction="none", ignore_index=-100)
    token_loss = token_loss.view(batch, length)
    has_label = labels != -100
    weights = has_label.float()
    if config.opt_weighted_loss_type == "decay":
        for row in range(batch):
            label_types = types[row][(types[row] > 0) & (types[row] % 4 == 0)].unique()
            row_weights = torch.ones(length, device=logits.device)
            weight = 1.0
            for label_type in label_types.flip(0):  # the last example weighs 1, each earlier one `decay` times less
                row_weights[types[row] == label_type] = weight
                weight *= config.opt_loss_decay_factor
            weights[row] *= row_weights
    if not bool(has_label.any()):
        warnings.warn(
            "CPT: no position of this batch is a label (type > 0 and type % 4 == 0), so the loss is NaN; pass "
            "input_type_mask with the output tokens typed 4 (or a multiple of 4).",
            stacklevel=3,
        )
    return (token_loss[has_label] * weights[has_label]).mean()


class CPTModel(PromptLearningModel):
    """The prompt-learning tuner whose adapters are `CPTEmbedding`s; with labels, forward returns CPT's loss.

    Forward takes `input_type_mask` (batch x input length; types as in `CPTConfig`) beside the labels.
    """

    encoder_cls = CPTEmbedding
    display_name = "CPT"

    def _prepare_adapter_config(self, config: CPTConfig) -> CPTConfig:
        # peft always reads the shape fields from the model for CPT, whatever the config says.
        return fill_from_model_config(
            dataclasses.replace(config, token_dim=None, num_layers=None, num_attention_heads=None), self.model
        )

    def forward(self, input_ids: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        input_type_mask = kwargs.pop("input_type_mask", None)
        labels = kwargs.pop("labels", None)
        name = self._active_prompt_adapter()
        if name is None or labels is None:
            return super().forward(input_ids, labels=labels, **kwargs)
        output = super().forward(input_ids, **kwargs)
        cpt_labels, types = cpt_labels_and_types(self.peft_config[name], labels, input_type_mask)
        logits = output.logits if hasattr(output, "logits") else output[0]
        loss = cpt_loss(logits, cpt_labels, types, self.peft_config[name])
        if not hasattr(output, "logits"):  # return_dict=False: a tuple, the loss first
            return (loss, *output)
        return type(output)(loss=loss, **dict(output.items()))
