"""slimtune.quant: 4-bit NF4/FP4 quantization (bit-compatible with bitsandbytes), Linear4bit, loading."""

from slimtune.quant.kbit import prepare_model_for_kbit_training
from slimtune.quant.linear4bit import Linear4bit
from slimtune.quant.loading import load_model
from slimtune.quant.nf4 import dequantize_4bit, quantize_4bit
from slimtune.quant.saving import save_quantized, update_quantization_config
from slimtune.quant.state import NestedState, QuantState

__all__ = [
    "quantize_4bit",
    "dequantize_4bit",
    "QuantState",
    "NestedState",
    "Linear4bit",
    "prepare_model_for_kbit_training",
    "load_model",
    "save_quantized",
    "update_quantization_config",
]
