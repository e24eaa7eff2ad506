"""`VBLoRAConfig`: fields, defaults and validation of VB-LoRA, as in Hugging Face peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import as_name_set, check_bool, check_dropout, check_finite, check_layer_selection, check_rank, check_size
from .._core.bias import check_bias


@dataclass
class VBLoRAConfig(PeftConfig):
    """Configuration of a VB-LoRA adapter: LoRA factors assembled from one shared vector bank.

    Args:
        r: Rank of the update `B A`.
        num_vectors: Number of vectors in the bank (shared by every wrapped layer).
        vector_length: Length of each bank vector; in and out features of every target must be
            multiples of it.
        topk: How many bank vectors each sub-vector of A and B mixes (2 works best in the paper).
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks peft's per-architecture default.
        exclude_modules: Names or a regex of modules never to wrap.
        save_only_topk_weights: Save the top-k indices and mixing weights instead of the full
            logits (much smaller; such adapters serve inference / merging, not further training).
        vblora_dropout: Dropout on the adapter's input.
        fan_in_fan_out: True when the base stores its weight as (in, out), e.g. GPT-2 `Conv1D`.
        bias: "none", "all" or "vblora_only": which biases train with the adapter.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        init_vector_bank_bound: The bank starts uniform in [-bound, bound] (not zero: zero banks get no gradient).
        init_logits_std: The logits start normal with this standard deviation.
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices.
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.VBLORA
    r: int = field(default=4, metadata={"help": "The rank of incremental matrices."})
    num_vectors: int = field(default=256, metadata={"help": "Number of vectors in the vector bank."})
    vector_length: int = field(default=256, metadata={"help": "Length of the vectors in the vector bank."})
    topk: int = field(default=2, metadata={"help": "The K of the top-K selection."})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    save_only_topk_weights: bool = field(default=False, metadata={"help": "Save only the top-k weights and indices"})
    vblora_dropout: float = field(default=0.0, metadata={"help": "VBLoRA dropout"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored (in, out)"})
    bias: str = field(default="none", metadata={"help": "Bias type for VBLoRA. Can be 'none', 'all' or 'vblora_only'"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    init_vector_bank_bound: float = field(default=0.02, metadata={"help": "Bound of the uniform bank init"})
    init_logits_std: float = field(default=0.1, metadata={"help": "Standard deviation of the logits init"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.VBLORA.value:
            raise ConfigError(f"VBLoRAConfig has peft_type {self.peft_type!r}; it must be 'VBLORA'.")
        self.peft_type = PeftType.VBLORA
        self.target_modules = as_name_set(self.target_modules)
        self.exclude_modules = as_name_set(self.exclude_modules, "exclude_modules")
        check_rank(self.r, "r")
        check_size(self.num_vectors, "num_vectors", "256")
        check_size(self.vector_length, "vector_length", "256")
        check_size(self.topk, "topk", "2")
        if self.topk > self.num_vectors:
            raise ConfigError(
                f"topk={self.topk} is larger than num_vectors={self.num_vectors}; each sub-vector mixes topk of the "
                "bank's vectors, so use topk <= num_vectors."
            )
        check_dropout(self.vblora_dropout, "vblora_dropout")
        check_bool(self.fan_in_fan_out, "fan_in_fan_out")
        check_bool(self.save_only_topk_weights, "save_only_topk_weights")
        check_bias(self.bias, "vblora_")
        for name in ("init_vector_bank_bound", "init_logits_std"):
            check_finite(getattr(self, name), name)
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid; it must be >= 0.")
        check_layer_selection(self)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
