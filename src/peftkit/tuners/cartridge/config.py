"""`CartridgeConfig`: cartridges (Eyuboglu et al., 2025, arXiv:2506.06266) -- a trained KV-cache prefix.

Served like prefix tuning (the prefix is every layer's attention cache before the input), but the
cache itself is the parameter, `n x (num_layers * 2 * token_dim)`, with no projection MLP:

    cache_l = [K_l(prefix) ; K_l(x)],  [V_l(prefix) ; V_l(x)]       K_l(prefix), V_l(prefix) trained

The first `num_frozen_tokens` positions stay fixed (an attention sink). Start it randomly, or from a
prefill of the base model on a text (`initialize_kv_prefix_from_text`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ...errors import ConfigError
from ...utils.peft_types import PeftType
from .._prompt.config import PromptLearningConfig


@dataclass
class CartridgeConfig(PromptLearningConfig):
    """A KV-cache prefix of `num_virtual_tokens` positions, trained directly.

    Args:
        num_frozen_tokens: How many leading positions get no gradient (1: the paper's attention sink).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.CARTRIDGE

    num_frozen_tokens: int = field(default=1, metadata={"help": "Leading virtual tokens kept frozen"})

    def __post_init__(self) -> None:
        if str(self.peft_type) != PeftType.CARTRIDGE.value:
            raise ConfigError(f"CartridgeConfig has peft_type {self.peft_type!r}; it must be 'CARTRIDGE'.")
        self.peft_type = PeftType.CARTRIDGE
        super().__post_init__()
        frozen = self.num_frozen_tokens
        if isinstance(frozen, bool) or not isinstance(frozen, int) or frozen < 0:
            raise ConfigError(f"num_frozen_tokens={frozen!r} is invalid; pass an integer >= 0 (1 freezes the attention sink).")
        if frozen > self.num_virtual_tokens:
            raise ConfigError(
                f"num_frozen_tokens={frozen} is more than num_virtual_tokens={self.num_virtual_tokens}; "
                "freeze at most all of them."
            )

    def uses_kv_heads(self) -> bool:
        return True

    def adapter_elements(self) -> int:
        """The cache table, `n x 2*L*d` (n virtual tokens, L layers, d token_dim)."""
        return self.num_virtual_tokens * 2 * (self.num_layers or 1) * (self.token_dim or 1)

    def size_fields(self) -> dict[str, Any]:
        return {**super().size_fields(), "num_layers": self.num_layers}
