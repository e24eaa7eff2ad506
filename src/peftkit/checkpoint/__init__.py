"""Reading and writing adapters in peft's checkpoint format."""

from .state_dict import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)

__all__ = [
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "load_peft_weights",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]
