"""Small helpers shared across peftkit (enums, constants, module-tree utilities).

Also peft's `peft.utils` names that belong to this layer. Those that live above it
(`load_peft_weights`, `get_base_model_state_dict`, `set_base_model_state_dict`: they read adapter
folders and module trees) are in `peftkit.checkpoint.state_dict` (peft's `peft.utils.save_and_load`)
and at top level.
"""

from ..errors import NoMatchingPeftModuleError, PeftError, PeftWarning
from .other import cast_mixed_precision_params, shift_tokens_right
from .peft_types import PeftType, TaskType

__all__ = [
    "NoMatchingPeftModuleError",
    "PeftError",
    "PeftType",
    "PeftWarning",
    "TaskType",
    "cast_mixed_precision_params",
    "shift_tokens_right",
]
