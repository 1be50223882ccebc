"""Kernel timings on the GPU, side by side in one run: 4-bit dequantization and decode-size 4-bit matmuls.

    dequant: slimtune Triton vs bitsandbytes' dequantize_4bit (+ a device-to-device copy as the ceiling);
             effective TB/s = (packed + absmax bytes read + output bytes written) / time.
    gemv:    y = x W^T for M = 1, 4, 16 rows: slimtune's fused kernel vs bitsandbytes' matmul_4bit vs a bf16
             F.linear on the unquantized weight.
All times are medians of CUDA-graph replays (triton.testing.do_bench_cudagraph), so host launch cost is
left out for every contender alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["KernelRow", "run_kernel_bench", "DEQUANT_SHAPES", "GEMV_SHAPES"]

DEQUANT_SHAPES = ((4096, 4096), (14336, 4096), (28672, 8192))
GEMV_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))  # (N out, K in)


@dataclass
class KernelRow:
    kernel: str
    shape: str
    contender: str
    us: float
    tb_s: float = 0.0


def _time(fn, rep: int = 20) -> float:
    import triton.testing

    try:
        fn()
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3  # microseconds
    except Exception as e:  # noqa: BLE001 - one contender failing must not lose the other rows
        print(f"[time] failed: {type(e).__name__}: {e}"[:400], flush=True)
        return float("nan")


def _emit(rows: list[KernelRow], r: KernelRow) -> None:
    """Keep and print a row at once (a run cut short by a time limit still shows what it measured)."""
    rows.append(r)
    print(f"{r.kernel:<10} {r.shape:<16} {r.contender:<34} {r.us:>9.2f} {r.tb_s:>7.2f}", flush=True)


def _bnb_state(weight: torch.Tensor):
    import bitsandbytes as bnb

    return bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")


def dequant_rows(shapes=DEQUANT_SHAPES) -> list[KernelRow]:
    from slimtune.kernels.nf4_dequant import dequantize_4bit_triton
    from slimtune.quant_format.nf4 import quantize_4bit

    rows = []
    for n, k in shapes:
        weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        packed, state = quantize_4bit(weight, "nf4", 64, True)
        moved = packed.numel() + state.absmax.numel() + state.state2.absmax.numel() * 4 + n * k * 2
        out = torch.empty(n, k, dtype=torch.bfloat16, device="cuda")
        label = f"{n}x{k}"
        us = _time(lambda p=packed, s=state, o=out: dequantize_4bit_triton(p, s, out=o))
        _emit(rows, KernelRow("dequant", label, "slimtune", us, moved / us / 1e6))
        try:
            import bitsandbytes as bnb

            q, st = _bnb_state(weight)
            us = _time(lambda q=q, st=st, o=out: bnb.functional.dequantize_4bit(q, st, out=o))
            _emit(rows, KernelRow("dequant", label, "bnb", us, moved / us / 1e6))
        except ImportError:
            pass
        src = torch.empty(n * k // 2 * 5 // 2, dtype=torch.uint8, device="cuda")  # same bytes moved as a copy
        dst = torch.empty_like(src)
        us = _time(lambda d=dst, s=src: d.copy_(s))
        _emit(rows, KernelRow("dequant", label, "copy", us, 2 * src.numel() / us / 1e6))
    return rows


def _rotating(make, copies: int):
    """A callable that uses the next of `copies` inputs made by make() at each call, so that a CUDA graph of
    repeated calls streams more than the L2 cache holds (cold weights, as in a decode step over many layers)."""
    items = [make() for _ in range(copies)]
    state = {"i": 0}

    def pick():
        state["i"] = (state["i"] + 1) % copies
        return items[state["i"]]
    pick.copies = copies
    return pick


def gemv_rows(shapes=GEMV_SHAPES, ms=(1, 4, 16), sweep: bool = False) -> list[KernelRow]:
    """Decode matmuls, each contender timed twice: 'warm' (the same weight every call, L2-resident when it
    fits in the 50 MB L2) and 'cold' (a rotation of weight copies totalling >= 256 MB)."""
    from slimtune.kernels.dispatch import dequantize_to_buffer
    from slimtune.kernels.nf4_matmul import matmul_4bit_triton
    from slimtune.quant_format.nf4 import quantize_4bit

    rows = []
    for n, k in shapes:
        weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        packed, state = quantize_4bit(weight, "nf4", 64, True)
        w_bytes = packed.numel() + state.absmax.numel()
        q4 = _rotating(lambda w=weight: quantize_4bit(w, "nf4", 64, True), max(1, (256 << 20) // w_bytes))
        wb = _rotating(lambda w=weight: w.clone(), max(1, (256 << 20) // (n * k * 2)))
        try:
            import bitsandbytes as bnb

            bq = _rotating(lambda w=weight: _bnb_state(w), max(1, (256 << 20) // w_bytes))
        except ImportError:
            bnb = None
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            label = f"M{m} {n}x{k}"
            contenders = [
                ("slimtune", w_bytes, lambda p: matmul_4bit_triton(x, *p), q4, (packed, state)),  # noqa: B023
                ("dequant+cuBLAS", w_bytes,
                 lambda p: F.linear(x, dequantize_to_buffer(p[0], p[1], x.dtype)), q4, (packed, state)),  # noqa: B023
                ("bf16", n * k * 2, lambda w: F.linear(x, w), wb, weight),  # noqa: B023
            ]
            if bnb is not None:
                contenders.append(("bnb", w_bytes, lambda p: bnb.matmul_4bit(x, p[0].t(), quant_state=p[1]),  # noqa: B023
                                   bq, bq()))
            for name, nbytes, fn, rot, warm in contenders:
                us = _time(lambda f=fn, w=warm: f(w))
                _emit(rows, KernelRow("gemv", label, f"{name} warm", us, nbytes / us / 1e6))
                for _ in range(rot.copies):  # per-weight lazy state (slimtune's cached scales) before capture
                    fn(rot())
                us = _time(lambda f=fn, r=rot: f(r()))
                _emit(rows, KernelRow("gemv", label, f"{name} cold", us, nbytes / us / 1e6))
            if sweep and m <= 4:  # above 4 rows dequant + cuBLAS is routed (nf4_routing.py)
                rows += _sweep(x, q4, label, w_bytes)
    return rows


SWEEP_CONFIGS = tuple(  # (BLOCK_M, BLOCK_N, BLOCK_KW, num_warps, SPLIT_K); the 2026-11-29 sweep's leaders
    dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_KW=bkw, num_warps=w, SPLIT_K=sk, num_stages=1) for bm, bn, bkw, w, sk in (
        (1, 2, 256, 4, 1), (1, 4, 128, 4, 1), (1, 2, 64, 2, 1), (1, 1, 256, 4, 1), (1, 4, 256, 8, 1),
        (1, 4, 128, 4, 2), (4, 1, 128, 4, 1), (4, 4, 64, 4, 1), (4, 2, 128, 4, 1), (2, 4, 64, 4, 1)))


def config_name(cfg: dict) -> str:
    return f"m{cfg['BLOCK_M']} n{cfg['BLOCK_N']} kw{cfg['BLOCK_KW']} w{cfg['num_warps']} sk{cfg['SPLIT_K']}"


def _sweep(x, q4, label, w_bytes) -> list[KernelRow]:
    """Cold timings of the fused kernel over SWEEP_CONFIGS, with and without the cached fp32 scales."""
    from slimtune.kernels.nf4_matmul import matmul_4bit_triton

    rows = []
    for _ in range(q4.copies):
        matmul_4bit_triton(x, *q4())  # cached scales of every copy before any capture
    for cfg in SWEEP_CONFIGS:
        if (cfg["BLOCK_M"] == 1) != (x.shape[0] == 1):
            continue
        for cache in (True, False):
            us = _time(lambda c=cfg, sc=cache: matmul_4bit_triton(x, *q4(), config=c, scale_cache=sc), rep=10)
            name = config_name(cfg) + ("" if cache else " no-cache")
            _emit(rows, KernelRow("gemv-sweep", label, name, us, w_bytes / us / 1e6))
    return rows


def run_kernel_bench(sweep: bool = False, verbose: bool = True, dequant: bool = True) -> list[KernelRow]:
    """Time dequantization and decode matmuls on the current CUDA device; print a table."""
    rows = (dequant_rows() if dequant else []) + gemv_rows(sweep=sweep)
    if verbose:
        print(f"card: {torch.cuda.get_device_name()}")
        if sweep:
            best: dict[str, KernelRow] = {}
            for r in rows:
                if r.kernel == "gemv-sweep" and (r.shape not in best or r.us < best[r.shape].us):
                    best[r.shape] = r
            for shape, r in best.items():
                print(f"best config {shape:<16} {r.contender:<34} {r.us:>9.2f}")
    return rows
