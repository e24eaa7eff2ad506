"""Reading and writing adapters in peft's checkpoint format."""

from .state_dict import get_peft_model_state_dict, set_peft_model_state_dict

__all__ = ["get_peft_model_state_dict", "set_peft_model_state_dict"]
