"""peftkit's own quantization: NF4/FP4 4-bit and int8 base weights in pure PyTorch (QLoRA on any device).

    from peftkit.quantization import QuantizationConfig, quantize_model, prepare_model_for_kbit_training

    model = quantize_model(model, QuantizationConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True))
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(...))

Importing this package registers LoRA's dispatcher for quantized layers (ours and bitsandbytes').
"""

from . import lora_layers as _lora_layers
from .formats import QuantState4bit, dequantize_4bit, quantize_4bit
from .kbit_training import prepare_model_for_kbit_training
from .linear import Linear4bit, Linear8bit, QuantizedLinearBase
from .lora_layers import QuantizedLinear
from .quantize import QuantizationConfig, dequantize_model, quantize_model

_lora_layers.register()

__all__ = [
    "Linear4bit",
    "Linear8bit",
    "QuantState4bit",
    "QuantizationConfig",
    "QuantizedLinear",
    "QuantizedLinearBase",
    "dequantize_4bit",
    "dequantize_model",
    "prepare_model_for_kbit_training",
    "quantize_4bit",
    "quantize_model",
]
