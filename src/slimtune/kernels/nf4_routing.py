"""Which 4-bit matmuls take the fused decode GEMV (nf4_matmul.py) instead of dequantize + cuBLAS.

Kept apart from nf4_matmul.py so that reading the rule does not import Triton.

# Note: decode routing
Inputs with up to DECODE_ROWS rows (all leading dims flattened) take the fused kernel on CUDA; larger
ones dequantize into the shared buffer and call cuBLAS. Measured on one NVIDIA H200 (torch 2.11,
benchmarks/kernel_bench.py --gemv-only, CUDA-graph medians, bf16 x, NF4 + double quant, default
configs; warm = same weight every call, cold = weights streamed from HBM; microseconds, 2026-11-29):

    rows, W (out x in)    fused GEMV      dequant+cuBLAS   bitsandbytes    bf16 F.linear
                          warm / cold                      warm / cold     warm / cold
    1, 4096 x 4096         9.11 / 10.07       25.1         10.65 / 10.74    9.86 / 13.25
    1, 14336 x 4096       27.24 / 28.07       81.5         29.37 / 29.34   30.11 / 30.06
    1, 4096 x 14336       26.55 / 27.66       81.2         30.02 / 29.94   31.13 / 31.27
    4, 4096 x 4096        15.32 / 16.75       24.7         23.70 / 23.94    9.58 / 13.40
    4, 14336 x 4096       47.80 / 49.41       81.5         66.54 / 66.53   29.63 / 29.60
    4, 4096 x 14336       40.84 / 42.86       81.1         74.50 / 74.50   31.46 / 31.61
    16, 4096 x 4096       53.68 / 54.63       24.8         35.65 / 35.57    9.42 / 13.54

At one row the GEMV is faster than bitsandbytes and than bf16 (Note: the packed dot and Note: the cached
fp32 scales in nf4_matmul.py are what got it there); at four rows it beats bitsandbytes by 1.4-1.8x and
dequant+cuBLAS by 1.6-2x. Each further group of 4 rows decodes W again, so above 4 rows dequant+cuBLAS
is faster.
"""

DECODE_ROWS = 4
