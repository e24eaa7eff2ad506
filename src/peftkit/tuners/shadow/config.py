"""`ShadowConfig`: fields, defaults and validation of ShadowPEFT, as in Hugging Face peft.

ShadowPEFT runs a small trainable "shadow" network beside a frozen decoder-only model. A shadow
backbone turns the input into an initial shadow state s0; each wrapped decoder block l then sees

    h_in  = h + alpha * W_up(Dropout(W_down(h - s)))          (injection, W_up zero at init)
    h_out = block(h_in)
    g     = sigmoid(G(h_out)),  t = T(h_out)                  (two-layer GELU MLPs of width update_hidden_size)
    s'    = (1 - g) * s + g * t                               (gated shadow update)

and training adds `auxiliary_loss_weight * CE(head(s0), labels)` to the task loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import (
    as_name_set,
    check_bool,
    check_dropout,
    check_finite,
    check_layer_indices,
    check_layer_selection,
    check_optional_name_list,
    check_rank,
    check_size,
)

#: The backbone fields that only shape a "mirror" backbone (an explicit checkpoint defines its own).
MIRROR_ONLY_FIELDS = (
    "shadow_num_hidden_layers",
    "shadow_hidden_size",
    "shadow_num_attention_heads",
    "shadow_intermediate_size",
)


@dataclass
class ShadowConfig(PeftConfig):
    """Configuration of a ShadowPEFT adapter (see the module docstring for the equations).

    Args:
        target_modules: The decoder blocks to wrap (names or a regex over full paths); they must be
            consecutive blocks of one block list. None wraps every decoder block.
        exclude_modules: Names or a regex of blocks never to wrap.
        r: Rank of the injection bottleneck W_down (d -> r) / W_up (r -> d).
        shadow_alpha: Strength of the injected correction.
        shadow_dropout: Dropout on the discrepancy h - s before W_down.
        init_weights: True: W_up starts at zero, so a fresh adapter leaves the outputs unchanged.
        shadow_model: "mirror" builds the backbone from the base model's own architecture, reduced by
            the `shadow_*` fields below. Anything else names a pretrained backbone (model id or local
            path), which peftkit does not load (it never downloads weights).
        shadow_num_hidden_layers: Depth of the mirror backbone (None: 1).
        shadow_hidden_size: Width of the mirror backbone (None: the base width); a different width adds
            a bias-free projection shadow width -> base width.
        shadow_num_attention_heads: Attention heads of the mirror backbone (None: the base's).
        shadow_intermediate_size: Feed-forward width of the mirror backbone (None: the base's).
        share_embeddings: Feed the mirror backbone the frozen base input embeddings (when widths match).
        update_hidden_size: Hidden width of the candidate T and gate G MLPs (None: r).
        auxiliary_loss_weight: Weight lambda of the shadow path's own loss; 0 disables it.
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. "lm_head").
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.SHADOW
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Decoder blocks to wrap"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Blocks to skip"})
    r: int = field(default=8, metadata={"help": "Rank of the injection bottleneck"})
    shadow_alpha: float = field(default=0.1, metadata={"help": "Strength of the injected correction"})
    shadow_dropout: float = field(default=0.2, metadata={"help": "Dropout on the discrepancy signal"})
    init_weights: bool = field(default=True, metadata={"help": "True: W_up = 0, a no-op adapter"})
    shadow_model: str = field(default="mirror", metadata={"help": "'mirror' or a backbone model id / path"})
    shadow_num_hidden_layers: Optional[int] = field(default=None, metadata={"help": "Mirror backbone depth"})
    shadow_hidden_size: Optional[int] = field(default=None, metadata={"help": "Mirror backbone width"})
    shadow_num_attention_heads: Optional[int] = field(default=None, metadata={"help": "Mirror backbone heads"})
    shadow_intermediate_size: Optional[int] = field(default=None, metadata={"help": "Mirror backbone FFN width"})
    share_embeddings: bool = field(default=True, metadata={"help": "Reuse the base input embeddings"})
    update_hidden_size: Optional[int] = field(default=None, metadata={"help": "Width of the T / G update MLPs"})
    auxiliary_loss_weight: float = field(default=0.05, metadata={"help": "Weight of the auxiliary shadow loss"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Block indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Block list name"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.SHADOW.value:
            raise ConfigError(f"ShadowConfig has peft_type {self.peft_type!r}; it must be 'SHADOW'.")
        self.peft_type = PeftType.SHADOW
        self.target_modules = as_name_set(self.target_modules)
        self.exclude_modules = as_name_set(self.exclude_modules, "exclude_modules")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError("`layers_pattern` cannot be used when `target_modules` is a str.")
        check_layer_selection(self)
        check_layer_indices(self.layers_to_transform)
        check_rank(self.r, "r")
        check_finite(self.shadow_alpha, "shadow_alpha")
        check_dropout(self.shadow_dropout, "shadow_dropout")
        check_bool(self.init_weights, "init_weights")
        check_bool(self.share_embeddings, "share_embeddings")
        if not isinstance(self.shadow_model, str) or not self.shadow_model:
            raise ConfigError(f"shadow_model={self.shadow_model!r} is invalid; use 'mirror' or a model id / path.")
        for name in MIRROR_ONLY_FIELDS + ("update_hidden_size",):
            check_size(getattr(self, name), name, allow_none=True)
        check_finite(self.auxiliary_loss_weight, "auxiliary_loss_weight")
        if self.auxiliary_loss_weight < 0:
            raise ConfigError(
                f"auxiliary_loss_weight={self.auxiliary_loss_weight!r} is invalid; use a weight >= 0 (0 disables it)."
            )
        if self.shadow_model != "mirror":
            configured = [name for name in MIRROR_ONLY_FIELDS if getattr(self, name) is not None]
            if configured:
                raise ConfigError(
                    "Explicit `shadow_model` checkpoints define their architecture; unset these mirror-only "
                    f"overrides: {', '.join(configured)}."
                )
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
