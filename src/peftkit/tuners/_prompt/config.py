"""`PromptLearningConfig`: fields shared by prompt tuning, prefix tuning and P-tuning.

Shape fields the user leaves out (`num_layers`, `token_dim`, `num_attention_heads`,
`num_transformer_submodules`, `encoder_hidden_size`) are filled from the model config when the
adapter is added (`fill_from_model_config`), so `adapter_config.json` always holds them, as peft's does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import TaskType
from ...utils.validation import check_size


@dataclass
class PromptLearningConfig(PeftConfig):
    """Base config of the prompt-learning methods (virtual tokens instead of wrapped layers).

    Args:
        num_virtual_tokens: How many virtual tokens the adapter learns.
        token_dim: Hidden size of the base model (for prefix tuning with grouped-query attention,
            `head_dim * num_key_value_heads`); filled from the model config when None.
        num_transformer_submodules: 2 for encoder-decoder models, else 1; filled when None.
        num_attention_heads: Attention heads (key/value heads for prefix tuning); filled when None.
        num_layers: Transformer layers; filled when None.
        modules_to_save: Modules trained in full and saved (classifier heads are added per task).
    """

    num_virtual_tokens: int = field(default=None, metadata={"help": "Number of virtual tokens"})
    token_dim: int = field(default=None, metadata={"help": "Hidden embedding dimension of the base model"})
    num_transformer_submodules: Optional[int] = field(default=None, metadata={"help": "Number of transformer submodules"})
    num_attention_heads: Optional[int] = field(default=None, metadata={"help": "Number of attention heads"})
    num_layers: Optional[int] = field(default=None, metadata={"help": "Number of transformer layers"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained in full and saved"})

    def __post_init__(self) -> None:
        super().__post_init__()
        # ints only (not bools or floats such as 1e10), bounded by validation.MAX_SIZE; the model-relative
        # limit is checked when the adapter is added (`adapter_elements`, `tuners._core.size_limits`).
        check_size(self.num_virtual_tokens, "num_virtual_tokens", example="20")
        for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            check_size(getattr(self, name), name, allow_none=True)

    @property
    def is_prompt_learning(self) -> bool:
        return True

    def encoder_updates(self) -> dict[str, Any]:
        """Hook: method-specific fields filled after the shared ones (e.g. `encoder_hidden_size`)."""
        return {}

    def uses_kv_heads(self) -> bool:
        """True when the virtual tokens go into the attention cache (prefix tuning)."""
        return False

    def adapter_elements(self) -> int:
        """About how many elements the adapter allocates once the shape fields are filled.

        Used to refuse absurd sizes before allocating (`tuners._core.size_limits`); this base
        version counts the virtual token table, `num_virtual_tokens * submodules x token_dim`.
        """
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1) * (self.token_dim or 1)

    def size_fields(self) -> dict[str, Any]:
        """The fields `adapter_elements` grows with, for the error message that refuses them."""
        return {"num_virtual_tokens": self.num_virtual_tokens, "token_dim": self.token_dim}


def _first_key(config: dict[str, Any], names: tuple[str, ...], field_name: str) -> int:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    raise ConfigError(f"Cannot read `{field_name}` from the model config; pass {field_name}=... in the adapter config.")


def fill_from_model_config(config: PromptLearningConfig, model: Any) -> PromptLearningConfig:
    """A copy of `config` with every shape field the user left out read from `model.config`."""
    model_config = getattr(model, "config", None)
    if model_config is not None and hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()
    values = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config or {})
    if model_config is not None and getattr(model_config, "num_hidden_layers", None) is not None:
        values.setdefault("num_hidden_layers", model_config.num_hidden_layers)
    updates: dict[str, Any] = {}
    if config.num_layers is None:
        updates["num_layers"] = _first_key(values, ("num_hidden_layers", "num_layers", "n_layer"), "num_layers")
    token_dim = config.token_dim
    if token_dim is None:
        token_dim = updates["token_dim"] = _first_key(values, ("hidden_size", "n_embd", "d_model"), "token_dim")
    heads = config.num_attention_heads
    if heads is None:
        heads = updates["num_attention_heads"] = _first_key(
            values, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"), "num_attention_heads"
        )
    if config.uses_kv_heads() and values.get("num_key_value_heads") is not None:
        # Grouped-query attention: the cache holds num_key_value_heads heads of head_dim each.
        head_dim = values.get("head_dim") or token_dim // heads
        updates["token_dim"] = head_dim * values["num_key_value_heads"]
        updates["num_attention_heads"] = values["num_key_value_heads"]
    if config.num_transformer_submodules is None:
        updates["num_transformer_submodules"] = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    filled = dataclasses.replace(config, **updates)
    return dataclasses.replace(filled, **filled.encoder_updates())
