"""Fused 4-bit dequantize-matmul (decode sizes) against dequantize + F.linear."""

import pytest
import torch

pytest.importorskip("triton")

from slimtune.kernels.nf4_matmul import matmul_4bit_reference, matmul_4bit_triton, supports  # noqa: E402
from slimtune.quant.nf4 import quantize_4bit  # noqa: E402


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("m,n,k,double_quant,split_k,bias", [
    (1, 48, 512, True, 1, False), (5, 40, 256, False, 2, True), (16, 33, 768, True, 3, True),
])
def test_matches_reference(m, n, k, double_quant, split_k, bias, kernel_device):
    torch.manual_seed(m * 100 + n)
    # fp16: Triton's interpreter mis-computes bf16 tl.dot on CPU (bf16 is covered by the GPU test)
    dtype = torch.float16
    weight = torch.randn(n, k, dtype=dtype, device=kernel_device)
    packed, state = quantize_4bit(weight, "nf4", 64, double_quant)
    x = torch.randn(m, k, dtype=dtype, device=kernel_device)
    b = torch.randn(n, dtype=dtype, device=kernel_device) if bias else None
    cfg = dict(BLOCK_N=16, SPLIT_K=split_k, num_warps=4, num_stages=1)
    out = matmul_4bit_triton(x, packed, state, b, config=cfg)
    ref = matmul_4bit_reference(x.double(), packed, state, None if b is None else b.double())
    assert out.shape == (m, n) and out.dtype == dtype
    assert _rel(out, ref) < 1e-3


def test_supports_and_errors():
    packed, state = quantize_4bit(torch.randn(8, 96), "nf4", 64, True)  # K=96 is no multiple of 64
    x = torch.randn(1, 96, dtype=torch.float16)
    assert not supports(x, state)
    with pytest.raises(ValueError, match="unsupported"):
        matmul_4bit_triton(x, packed, state)
    packed, state = quantize_4bit(torch.randn(8, 128), "nf4", 64, True)
    assert supports(torch.randn(16, 128, dtype=torch.bfloat16), state)
    assert not supports(torch.randn(17, 128, dtype=torch.bfloat16), state)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336)])
def test_gpu_llama_shapes_bf16(m, n, k):
    torch.manual_seed(m)
    weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
    packed, state = quantize_4bit(weight, "nf4", 64, True)
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    ref = matmul_4bit_reference(x.double(), packed, state)
    assert _rel(matmul_4bit_triton(x, packed, state), ref) < 1e-2


@pytest.mark.gpu
def test_gpu_linear4bit_routes_decode_and_training():
    from slimtune.kernels import set_fast_path
    from slimtune.quant.linear4bit import Linear4bit

    layer = Linear4bit.from_linear(torch.nn.Linear(1024, 512, bias=True, dtype=torch.bfloat16, device="cuda"))
    x = torch.randn(3, 1024, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        fast = layer(x)  # Triton dequantization + matmul
        set_fast_path("off")
        plain = layer(x)
        set_fast_path("auto")
    assert _rel(fast, plain.double()) < 1e-2
    xg = torch.randn(40, 1024, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    y = layer(xg)  # Triton dequantization into the shared buffer: bit-identical to the plain path
    (g,) = torch.autograd.grad(y.float().sum(), xg)
    set_fast_path("off")
    y_plain = layer(xg)
    (g_plain,) = torch.autograd.grad(y_plain.float().sum(), xg)
    set_fast_path("auto")
    assert torch.equal(y, y_plain) and torch.equal(g, g_plain)
