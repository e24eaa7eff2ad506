"""peftkit's own quantization: NF4/FP4 4-bit and int8 base weights in pure PyTorch (QLoRA on any device).

    from peftkit.quantization import QuantizationConfig, quantize_model, prepare_model_for_kbit_training

    model = quantize_model(model, QuantizationConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True))
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(...))

This package holds weight formats only and sits below `tuners/`: the methods' layers wrap these
layers (and bitsandbytes') like any other linear layer, and merge through `weights.py`, which
reads and writes the dense weight of any base. LoRA (DoRA included), AdaLoRA, (IA)^3, LoHa and
LoKr work over them; PiSSA/OLoRA inits, which rewrite the base weight, are refused.
"""

from .formats import QuantState4bit, dequantize_4bit, quantize_4bit
from .kbit_training import prepare_model_for_kbit_training
from .linear import Linear4bit, Linear8bit, QuantizedLinearBase
from .quantize import (
    QuantizationConfig,
    dequantize_model,
    load_quantized_model,
    quantize_model,
    save_quantized_model,
)
from .weights import is_quantized, read_weight, write_weight

__all__ = [
    "Linear4bit",
    "Linear8bit",
    "QuantState4bit",
    "QuantizationConfig",
    "QuantizedLinearBase",
    "dequantize_4bit",
    "dequantize_model",
    "load_quantized_model",
    "prepare_model_for_kbit_training",
    "quantize_4bit",
    "is_quantized",
    "quantize_model",
    "read_weight",
    "save_quantized_model",
    "write_weight",
]
