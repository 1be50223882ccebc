"""slimtune.quant_format: the 4-bit storage format, bit-compatible with bitsandbytes, in plain torch.

    codebooks.py  the NF4 / FP4 codebooks and the 8-bit dynamic map that double quantization uses
    state.py      QuantState / NestedState and their bitsandbytes key layout; VALID_BLOCKSIZES
    nf4.py        the reference quantize_4bit / dequantize_4bit: blockwise absmax, nibble packing

This package imports no other slimtune package (only the leaf module slimtune.dtypes), so both the
modules that hold 4-bit weights (slimtune.quant: Linear4bit, loading, saving) and the kernels that
read them (slimtune.kernels) build on it without importing each other.
"""
