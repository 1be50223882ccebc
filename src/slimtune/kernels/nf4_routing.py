"""Which 4-bit matmuls take the fused decode GEMV (nf4_matmul.py) instead of dequantize + cuBLAS.

Kept apart from nf4_matmul.py so that reading the rule does not import Triton.

# Note: decode routing
Inputs with up to DECODE_ROWS rows (all leading dims flattened) take the fused kernel on CUDA; larger
ones dequantize into the shared buffer and call cuBLAS. Measured on one NVIDIA H200 (torch 2.11,
benchmarks/kernel_bench.py --gemv-only --sweep, CUDA-graph medians, same weight every call, bf16 x,
NF4 + double quant, default configs; microseconds):

    rows, W (out x in)    fused GEMV   dequant+cuBLAS   bitsandbytes   bf16 F.linear
    1, 4096 x 4096           12.97          24.88           10.56          10.01
    1, 14336 x 4096          39.58          81.44           29.15          30.10
    1, 4096 x 14336          41.83          81.21           29.97          31.93
    4, 4096 x 4096           20.17          24.88           23.68           9.88
    4, 14336 x 4096          63.72          81.47           66.38          32.18
    4, 4096 x 14336          61.43          81.07           74.50          32.38
    16, 4096 x 4096          72.17          24.61           35.44           9.28
    16, 14336 x 4096        245.30          81.46           67.67          30.42
    16, 4096 x 14336        227.26          81.17          108.14          32.88

The GEMV halves the time of dequant+cuBLAS at one row and still wins at four (one 4-row program
group); each further group of 4 rows decodes W again (5-8 rows ~2x the 4-row time, 16 rows 3.5x), so
above 4 rows dequant+cuBLAS is faster. At one row it is 1.2-1.4x slower than bitsandbytes' GEMV and
than bf16: the kernel is bound by integer instructions (PRMT lookup, nibble shifts, x unpacking,
~8 per weight), not by memory (0.7 TB/s of 4-bit weight).
"""

DECODE_ROWS = 4
