"""slimtune.kernels: fast paths for 4-bit dequantization, decode matmuls, fused LoRA and the LM-head loss.

Each kernel sits beside a plain-torch reference computing the same function, and tests/kernels checks
values and gradients against it (on CPU under TRITON_INTERPRET=1, on a GPU with `-m gpu`).

    nf4_dequant.py    Triton: packed NF4/FP4 (+ double-quantized absmax) -> bf16/fp16/fp32
    nf4_matmul.py     Triton: fused dequantize-matmul for decode-size inputs (M <= 16 rows)
    lora_linear.py    torch autograd.Function: base matmul + LoRA in one op, manual backward
    cross_entropy.py  torch autograd.Function: chunked LM-head cross-entropy, no (N, V) fp32 logits,
                      its gradient formed in the forward
    ce_rows.py        Triton: per-row loss of a block of logits and its gradient over them
    ce_rows_reference.py  its torch reference, which CPU runs use
    rms_norm.py       Triton: RMSNorm forward/backward (saves x and a per-row rstd)
    rope.py           Triton: rotary embedding of q and k in one launch; backward rotates by -theta
    swiglu.py         Triton: silu(g) * u; backward recomputes silu from g
    llama_fused.py    runs those in Llama/Qwen2/Mistral modules, opt-in and self-checked (enable_fast_path)
    dispatch.py       when the fast paths are used, the reused dequantization buffer, dense_weight

Triton is imported lazily (only when a CUDA tensor takes a Triton path): CPU installs need no Triton.
"""

from slimtune.kernels.cross_entropy import chunked_linear_cross_entropy
from slimtune.kernels.dispatch import fast_path_mode, set_fast_path, triton_available

__all__ = ["chunked_linear_cross_entropy", "fast_path_mode", "set_fast_path", "triton_available"]
