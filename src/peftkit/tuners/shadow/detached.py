"""The shadow path on its own: its auxiliary loss, and `DetachedShadowModel` (`unload_shadow()`).

The shadow network alone computes

    s0     = projection(backbone(x))                 (backbone width -> base width; identity if equal)
    logits = head(s0)                                 (causal LM: per token; classification: last token)

which is what the auxiliary loss trains (`auxiliary_loss_weight * loss(head(s0), labels)`, added
to the task loss), so the detached network is a usable small model by itself. The per-block
updates of s need the base model's hidden states and do not exist without it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutput

from ...utils.hf_compat import output_cache_name


def shifted_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy: logits at t predict labels at t + 1 (-100 ignored)."""
    shifted = logits[..., :-1, :].contiguous()
    return F.cross_entropy(shifted.view(-1, shifted.size(-1)), labels[..., 1:].contiguous().view(-1), ignore_index=-100)


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' rule for sequence classification: one label -> MSE, integer labels -> cross
    entropy, float labels -> multi-label BCE (without writing `problem_type` into the model config)."""
    classes = logits.shape[-1]
    if classes == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
    if labels.dtype in (torch.long, torch.int):
        return F.cross_entropy(logits.view(-1, classes), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels)


def last_token(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Each row's hidden state at its last non-padding position (left or right padding)."""
    if attention_mask is None:
        return hidden[:, -1, :]
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    last = (attention_mask.ne(0) * positions).argmax(dim=-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class DetachedShadowModel(PreTrainedModel, GenerationMixin):
    """`head(projection(backbone(x)))`: the shadow network without the base model.

    With a language-model head it returns `CausalLMOutputWithPast` and supports `generate()` with
    a KV cache; with a classification head it pools the last token and returns
    `SequenceClassifierOutput`; without a head it returns s0. The modules may be shared with the
    ShadowModel it came from (`unload_shadow(copy=False)`). A backbone that reads the base model's
    embeddings gets them through `input_embeddings`, which is deliberately no submodule: such a
    model runs, but `save_pretrained` would miss the table (use `unload_shadow(copy=True)`).
    """

    main_input_name = "input_ids"
    base_model_prefix = "backbone"
    _supports_cache_class = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    #: Arguments generate() passes to a causal LM that a bare backbone does not take.
    _lm_only_arguments = ("logits_to_keep", "num_logits_to_keep")

    def __init__(
        self,
        backbone: PreTrainedModel,
        projection: Optional[nn.Module] = None,
        head: Optional[nn.Module] = None,
        is_classification: bool = False,
        input_embeddings: Optional[nn.Module] = None,
    ) -> None:
        super().__init__(backbone.config)
        self.backbone = backbone
        self.shadow_hidden_projection = projection if projection is not None else nn.Identity()
        self.head = head
        self.is_classification = is_classification
        self._shared_input_embeddings: list[Optional[nn.Module]] = [input_embeddings]  # a list: no submodule
        config = getattr(backbone, "generation_config", None)
        self.generation_config = config if config is not None else GenerationConfig.from_model_config(self.config)

    def can_generate(self) -> bool:
        # PreTrainedModel.__init__ asks before the attributes exist.
        return getattr(self, "head", None) is not None and not getattr(self, "is_classification", False)

    def get_input_embeddings(self) -> nn.Module:
        shared = self._shared_input_embeddings[0]
        return shared if shared is not None else self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        if self._shared_input_embeddings[0] is not None:
            self._shared_input_embeddings[0] = value
        else:
            self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self) -> Optional[nn.Module]:
        return None if getattr(self, "is_classification", False) else self.head

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> Any:
        for name in self._lm_only_arguments:
            kwargs.pop(name, None)
        kwargs["return_dict"] = True
        if self._shared_input_embeddings[0] is not None and kwargs.get("inputs_embeds") is None:
            if input_ids is None:
                raise ValueError("Either `input_ids` or `inputs_embeds` must be provided.")
            kwargs["inputs_embeds"], input_ids = self.get_input_embeddings()(input_ids), None
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = self.shadow_hidden_projection(out.last_hidden_state)
        if self.head is None:
            return hidden
        if self.is_classification:
            logits = self.head(last_token(hidden, attention_mask))
            loss = None if labels is None else sequence_classification_loss(logits, labels)
            return SequenceClassifierOutput(loss=loss, logits=logits)
        logits = self.head(hidden)
        loss = None if labels is None else shifted_lm_loss(logits, labels)
        cache = getattr(out, output_cache_name(out) or "past_key_values", None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{output_cache_name(CausalLMOutputWithPast): cache})
