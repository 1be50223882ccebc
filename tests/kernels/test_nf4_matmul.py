"""Fused 4-bit decode matmul (nf4_matmul.py) against dequantize + F.linear, on CPU under the interpreter
and on CUDA; plus the decode routing of Linear4bit and the fused LoRA path."""

import pytest
import torch

pytest.importorskip("triton")

from slimtune.kernels.nf4_matmul import matmul_4bit_reference, matmul_4bit_triton, supports  # noqa: E402
from slimtune.quant_format.nf4 import quantize_4bit  # noqa: E402


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _tol(dtype: torch.dtype) -> float:
    # one rounding of the output to bf16 (8 bits) or fp16 (11 bits), with margin; under the CPU
    # interpreter fp32 -> bf16 truncates instead of rounding to nearest, which doubles the bf16 error.
    return 6e-3 if dtype == torch.bfloat16 else 1e-3


# (m, n, k, quant_type, double_quant, dtype, config): K=200 and K=72 are no multiple of the 32-word step
# (and 200 of the 64 blocksize: absmax blocks straddle rows); m=3 runs a partial 4-row group.
CASES = [
    (1, 12, 512, "nf4", True, torch.bfloat16, dict(BLOCK_N=4, BLOCK_KW=16)),
    (1, 9, 200, "fp4", False, torch.float16, dict(BLOCK_N=4, BLOCK_KW=32, SPLIT_K=2)),
    (3, 10, 200, "nf4", False, torch.bfloat16, dict(BLOCK_N=4, BLOCK_KW=16, BLOCK_M=4)),
    (3, 8, 72, "fp4", True, torch.float16, dict(BLOCK_N=2, BLOCK_KW=16, BLOCK_M=2)),
    (16, 6, 136, "nf4", True, torch.float16, dict(BLOCK_N=4, BLOCK_KW=16, BLOCK_M=4, SPLIT_K=2)),
    (16, 5, 64, "fp4", False, torch.bfloat16, dict(BLOCK_N=8, BLOCK_KW=8, BLOCK_M=4)),
    (2, 7, 328, "nf4", True, torch.bfloat16, dict(BLOCK_N=2, BLOCK_KW=16, BLOCK_M=2)),
    (1, 5, 456, "nf4", True, torch.float16, dict(BLOCK_N=4, BLOCK_KW=8, SPLIT_K=4)),
]


@pytest.mark.parametrize("m,n,k,quant_type,double_quant,dtype,config", CASES)
@pytest.mark.parametrize("bias,scale_cache", [(False, True), (True, False)])
def test_matches_reference(m, n, k, quant_type, double_quant, dtype, config, bias, scale_cache, kernel_device):
    torch.manual_seed(m * 100 + n)
    weight = torch.randn(n, k, dtype=dtype, device=kernel_device)
    packed, state = quantize_4bit(weight, quant_type, 64, double_quant)
    x = torch.randn(m, k, dtype=dtype, device=kernel_device)
    b = torch.randn(n, dtype=dtype, device=kernel_device) if bias else None
    out = matmul_4bit_triton(x, packed, state, b, config=dict(config, num_warps=4), scale_cache=scale_cache)
    ref = matmul_4bit_reference(x.double(), packed, state, None if b is None else b.double())
    assert out.shape == (m, n) and out.dtype == dtype
    assert _rel(out, ref) < _tol(dtype)


def test_cached_scales_and_leading_dims(kernel_device):
    torch.manual_seed(0)
    weight = torch.randn(8, 128, dtype=torch.float16, device=kernel_device)
    packed, state = quantize_4bit(weight, "nf4", 64, True)
    x = torch.randn(2, 3, 128, dtype=torch.float16, device=kernel_device)  # (B, T, K): 6 rows
    cfg = dict(BLOCK_N=4, BLOCK_KW=16, BLOCK_M=4, num_warps=4)
    out = matmul_4bit_triton(x, packed, state, config=cfg, scale_cache=True)
    again = matmul_4bit_triton(x, packed, state, config=cfg, scale_cache=True)  # reads the cache
    plain = matmul_4bit_triton(x, packed, state, config=cfg, scale_cache=False)
    assert out.shape == (2, 3, 8)
    assert torch.equal(out, again) and _rel(out, plain.double()) < 1e-3
    assert _rel(out, matmul_4bit_reference(x.double(), packed, state)) < 1e-3


def _half_bits(bits: int, dtype: torch.dtype) -> float:
    return torch.tensor([bits & 0xFFFF], dtype=torch.int32).to(torch.int16).view(dtype).item()


def _to_half_bits(value: float, dtype: torch.dtype) -> int:
    return torch.tensor([value], dtype=torch.float64).to(dtype).view(torch.int16).item() & 0xFFFF


def _f32(bits: int) -> float:
    return torch.tensor([bits & 0xFFFFFFFF], dtype=torch.int64).to(torch.int32).view(torch.float32).item()


def _run_ptx(asm: str, regs: dict[str, int]) -> dict[str, int]:
    """Execute the lines of `asm` on 32-bit Python ints with PTX semantics: and/shl/shr/prmt/lop3/mov, and
    fma.rn.{bf16x2,f16x2}, add.f32, cvt.f32.f16 through torch's roundings."""
    def val(tok: str) -> int:
        return int(tok, 0) if tok[0].isdigit() else regs[tok]

    def prmt(a: int, b: int, sel: int) -> int:
        src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
        out = 0
        for i in range(4):
            nib = (sel >> 4 * i) & 0xF
            byte = src[nib & 7]
            out |= ((0xFF if byte & 0x80 else 0) if nib & 8 else byte) << 8 * i
        return out

    def lop3(a: int, b: int, c: int, lut: int) -> int:
        return sum(((lut >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1))) & 1) << i for i in range(32))

    def fma2(a: int, b: int, c: int, dtype: torch.dtype) -> int:
        out = 0
        for half in range(2):  # exact product and sum, one rounding, per half
            v = [_half_bits(r >> 16 * half, dtype) for r in (a, b, c)]
            out |= _to_half_bits(v[0] * v[1] + v[2], dtype) << 16 * half
        return out

    for line in asm.splitlines():
        op, _, rest = line.strip().rstrip(";").partition(" ")
        args = [a.strip() for a in rest.split(",")]
        if op == "and.b32":
            regs[args[0]] = val(args[1]) & val(args[2])
        elif op == "shl.b32":
            regs[args[0]] = (val(args[1]) << val(args[2])) & 0xFFFFFFFF
        elif op == "shr.b32":
            regs[args[0]] = val(args[1]) >> val(args[2])
        elif op == "prmt.b32":
            regs[args[0]] = prmt(val(args[1]), val(args[2]), val(args[3]))
        elif op == "lop3.b32":
            regs[args[0]] = lop3(val(args[1]), val(args[2]), val(args[3]), val(args[4]))
        elif op == "mov.b32" and args[0].startswith("{"):  # split into halves
            regs[args[0][1:]], regs[args[1][:-1]] = val(args[2]) & 0xFFFF, val(args[2]) >> 16
        elif op == "mov.b32":
            regs[args[0]] = val(args[1])
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            dtype = torch.bfloat16 if "bf16" in op else torch.float16
            regs[args[0]] = fma2(val(args[1]), val(args[2]), val(args[3]), dtype)
        elif op == "cvt.f32.f16":
            regs[args[0]] = torch.tensor([_half_bits(val(args[1]), torch.float16)]).view(torch.int32).item()
        elif op == "add.f32":
            total = torch.tensor([_f32(val(args[1]))]) + torch.tensor([_f32(val(args[2]))])  # fp32 add
            regs[args[0]] = total.view(torch.int32).item() & 0xFFFFFFFF
        else:
            assert op in ("{", "}", ".reg"), line
    return regs


def _nibbles(w: int) -> list[int]:
    """The 8 codes of an int32 word in k order (byte b: weight 2b high nibble, 2b + 1 low nibble)."""
    return [(w >> 8 * b + 4 * (1 - h)) & 0xF for b in range(4) for h in range(2)]


def _words(n: int) -> list[int]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 2**32, (n,), generator=gen, dtype=torch.int64).tolist() + [0, 0xFFFFFFFF]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prmt_asm_emulated(quant_type, dtype):
    """The inline PTX codebook lookup, run line by line, gives code[nibble] in `dtype` for every weight of
    a word, as pairs in k order."""
    from slimtune.kernels.nf4_matmul import _PAIRS_ASM, prmt_table
    from slimtune.quant_format.codebooks import get_code

    code = get_code(quant_type, torch.device("cpu"))
    table = [int(t) & 0xFFFFFFFF for t in prmt_table(code, dtype)]
    expect = code.to(dtype)
    for w in _words(300):
        regs = _run_ptx(_PAIRS_ASM.value, {"$4": w, **{f"${5 + i}": t for i, t in enumerate(table)}})
        pairs = torch.tensor([regs[f"${i}"] for i in range(4)], dtype=torch.int64)
        halves = torch.stack([pairs & 0xFFFF, pairs >> 16], 1).reshape(-1)  # weights 0..7 of the word
        assert torch.equal(halves.to(torch.int16).view(dtype), expect[_nibbles(w)]), hex(w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_dot_asm_emulated(dtype):
    """The two-wide dot (Note: the packed dot), run line by line on looked-up pairs: the word's dot within
    the dtype's rounding of the exact one."""
    from slimtune.kernels.nf4_matmul import _DOT_ASM, _PAIRS_ASM, prmt_table
    from slimtune.quant_format.codebooks import get_code

    code = get_code("nf4", torch.device("cpu"))
    table = [int(t) & 0xFFFFFFFF for t in prmt_table(code, dtype)]
    gen = torch.Generator().manual_seed(1)
    for w in _words(60):
        regs = _run_ptx(_PAIRS_ASM.value, {"$4": w, **{f"${5 + i}": t for i, t in enumerate(table)}})
        pairs = [regs[f"${i}"] for i in range(4)]
        got = [_half_bits(p >> 16 * h, dtype) for p in pairs for h in range(2)]
        x = torch.randn(8, generator=gen).to(dtype)
        xbits = (x.view(torch.int16).to(torch.int64) & 0xFFFF).tolist()
        x_pairs = [xbits[2 * i] | xbits[2 * i + 1] << 16 for i in range(4)]
        regs = _run_ptx(_DOT_ASM[dtype == torch.bfloat16], {f"${1 + i}": r for i, r in enumerate(pairs + x_pairs)})
        exact = sum(c * v for c, v in zip(got, x.double().tolist(), strict=True))
        scale = sum(abs(c * v) for c, v in zip(got, x.double().tolist(), strict=True))
        ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
        assert abs(_f32(regs["$0"]) - exact) <= 4 * ulp * scale + 1e-30, hex(w)


def test_supports_and_errors():
    packed, state = quantize_4bit(torch.randn(8, 100), "nf4", 64, True)  # K=100 is no multiple of 8
    x = torch.randn(1, 100, dtype=torch.float16)
    assert not supports(x, state)
    with pytest.raises(ValueError, match="in_features % 8"):
        matmul_4bit_triton(x, packed, state)
    packed, state = quantize_4bit(torch.randn(8, 128), "nf4", 64, True)
    assert supports(torch.randn(16, 128, dtype=torch.bfloat16), state)
    assert not supports(torch.randn(17, 128, dtype=torch.bfloat16), state)
    assert not supports(torch.randn(1, 128, dtype=torch.float32), state)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 4, 16])
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336)])
def test_gpu_llama_shapes(m, n, k):
    torch.manual_seed(m)
    weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
    packed, state = quantize_4bit(weight, "nf4", 64, True)
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    ref = matmul_4bit_reference(x.double(), packed, state)
    # the packed bf16 dot rounds each word's partial sum to bf16: ~3e-3 relative error (Note: the packed dot)
    assert _rel(matmul_4bit_triton(x, packed, state), ref) < 6e-3
    assert _rel(matmul_4bit_triton(x, packed, state, scale_cache=False), ref) < 6e-3
    assert _rel(matmul_4bit_triton(x.half(), packed, state), ref) < 3e-3
    gathered = matmul_4bit_triton(x, packed, state, config=dict(BLOCK_N=4, BLOCK_KW=128, PRMT=False))
    assert _rel(gathered, ref) < 4e-3


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type,double_quant", [("fp4", False), ("nf4", False)])
def test_gpu_configs(quant_type, double_quant):
    from slimtune.bench.kernels import SWEEP_CONFIGS

    torch.manual_seed(1)
    weight = torch.randn(1000, 1032, dtype=torch.float16, device="cuda")  # ragged N and K
    packed, state = quantize_4bit(weight, quant_type, 64, double_quant)
    for cfg in SWEEP_CONFIGS:
        x = torch.randn(cfg["BLOCK_M"] * 3, 1032, dtype=torch.float16, device="cuda")
        b = torch.randn(1000, dtype=torch.float16, device="cuda")
        out = matmul_4bit_triton(x, packed, state, b, config=cfg)
        assert _rel(out, matmul_4bit_reference(x.double(), packed, state, b.double())) < 1e-3, cfg


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_gpu_decode_routing(rows, monkeypatch):
    """Linear4bit inference and the fused LoRA forward take the GEMV for <= DECODE_ROWS rows, dequant +
    cuBLAS above; both agree with the plain (fast path off) layer."""
    import slimtune.kernels.nf4_matmul as nf4_matmul
    from slimtune.kernels import set_fast_path
    from slimtune.kernels.lora_linear import lora_linear
    from slimtune.kernels.nf4_routing import DECODE_ROWS
    from slimtune.quant.linear4bit import Linear4bit

    calls = []
    real = nf4_matmul.matmul_4bit_triton
    monkeypatch.setattr(nf4_matmul, "matmul_4bit_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(rows)
    layer = Linear4bit.from_linear(torch.nn.Linear(1024, 512, bias=True, dtype=torch.bfloat16, device="cuda"))
    x = torch.randn(rows, 1024, dtype=torch.bfloat16, device="cuda")
    a = torch.randn(8, 1024, device="cuda") * 0.05
    b = torch.randn(512, 8, device="cuda") * 0.05
    with torch.no_grad():
        fast = layer(x)
        fast_lora = lora_linear(x, layer.weight, a, b, 2.0, layer.bias, layer.quant_state)
        set_fast_path("off")
        try:
            plain = layer(x)
        finally:
            set_fast_path("auto")
    assert len(calls) == (2 if rows <= DECODE_ROWS else 0)
    assert _rel(fast, plain.double()) < 1e-2
    lora_ref = plain.double() + 2.0 * (x.double() @ a.double().T) @ b.double().T
    assert _rel(fast_lora, lora_ref) < 1e-2
