"""peftkit's own quantization: NF4/FP4 4-bit and int8 base weights in pure PyTorch (QLoRA on any device).

    from peftkit.quantization import QuantizationConfig, quantize_model, prepare_model_for_kbit_training

    model = quantize_model(model, QuantizationConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True))
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(...))

Importing this package registers the LoRA, (IA)^3, LoHa and LoKr dispatchers for quantized layers
(ours and bitsandbytes'). DoRA over quantized bases is refused with a ConfigError.
"""

from . import ia3_layers as _ia3_layers
from . import lora_layers as _lora_layers
from . import lycoris_layers as _lycoris_layers
from .formats import QuantState4bit, dequantize_4bit, quantize_4bit
from .kbit_training import prepare_model_for_kbit_training
from .linear import Linear4bit, Linear8bit, QuantizedLinearBase
from .ia3_layers import QuantizedIA3Linear
from .lora_layers import QuantizedLinear
from .lycoris_layers import QuantizedLoHaLayer, QuantizedLoKrLayer
from .quantize import (
    QuantizationConfig,
    dequantize_model,
    load_quantized_model,
    quantize_model,
    save_quantized_model,
)

_lora_layers.register()
_ia3_layers.register()
_lycoris_layers.register()

__all__ = [
    "Linear4bit",
    "Linear8bit",
    "QuantState4bit",
    "QuantizationConfig",
    "QuantizedIA3Linear",
    "QuantizedLinear",
    "QuantizedLoHaLayer",
    "QuantizedLoKrLayer",
    "QuantizedLinearBase",
    "dequantize_4bit",
    "dequantize_model",
    "load_quantized_model",
    "prepare_model_for_kbit_training",
    "quantize_4bit",
    "quantize_model",
    "save_quantized_model",
]
