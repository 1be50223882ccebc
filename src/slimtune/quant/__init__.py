"""slimtune.quant: 4-bit NF4/FP4 layers (bit-compatible with bitsandbytes): Linear4bit, loading, saving.

The storage format itself (codebooks, QuantState, the reference quantize_4bit / dequantize_4bit) is
slimtune.quant_format; its public names are re-exported here.
"""

from slimtune.quant.kbit import prepare_model_for_kbit_training
from slimtune.quant.linear4bit import Linear4bit
from slimtune.quant.loading import load_model
from slimtune.quant.saving import save_quantized, update_quantization_config
from slimtune.quant_format.nf4 import dequantize_4bit, quantize_4bit
from slimtune.quant_format.state import NestedState, QuantState

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
