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


def _time(fn, rep: int = 50) -> float:
    import triton.testing

    try:
        fn()
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3  # microseconds
    except Exception as e:  # noqa: BLE001 - one contender failing must not lose the other rows
        print(f"[time] failed: {type(e).__name__}: {e}"[:400], flush=True)
        return float("nan")


def _bnb_state(weight: torch.Tensor):
    import bitsandbytes as bnb

    return bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")


def dequant_rows(shapes=DEQUANT_SHAPES) -> list[KernelRow]:
    from slimtune.kernels.nf4_dequant import dequantize_4bit_triton
    from slimtune.quant.nf4 import quantize_4bit

    rows = []
    for n, k in shapes:
        weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        packed, state = quantize_4bit(weight, "nf4", 64, True)
        moved = packed.numel() + state.absmax.numel() + state.state2.absmax.numel() * 4 + n * k * 2
        out = torch.empty(n, k, dtype=torch.bfloat16, device="cuda")
        label = f"{n}x{k}"
        us = _time(lambda p=packed, s=state, o=out: dequantize_4bit_triton(p, s, out=o))
        rows.append(KernelRow("dequant", label, "slimtune", us, moved / us / 1e6))
        try:
            import bitsandbytes as bnb

            q, st = _bnb_state(weight)
            us = _time(lambda q=q, st=st, o=out: bnb.functional.dequantize_4bit(q, st, out=o))
            rows.append(KernelRow("dequant", label, "bnb", us, moved / us / 1e6))
        except ImportError:
            pass
        src = torch.empty(n * k // 2 * 5 // 2, dtype=torch.uint8, device="cuda")  # same bytes moved as a copy
        dst = torch.empty_like(src)
        us = _time(lambda d=dst, s=src: d.copy_(s))
        rows.append(KernelRow("dequant", label, "copy", us, 2 * src.numel() / us / 1e6))
    return rows


def gemv_rows(shapes=GEMV_SHAPES, ms=(1, 4, 16), sweep: bool = False) -> list[KernelRow]:
    from slimtune.kernels.nf4_matmul import matmul_4bit_triton
    from slimtune.quant.nf4 import quantize_4bit

    rows = []
    for n, k in shapes:
        weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        packed, state = quantize_4bit(weight, "nf4", 64, True)
        try:
            import bitsandbytes as bnb

            q, st = _bnb_state(weight)
        except ImportError:
            bnb = None
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            label = f"M{m} {n}x{k}"
            w_bytes = packed.numel() + state.absmax.numel()
            us = _time(lambda x=x, p=packed, s=state: matmul_4bit_triton(x, p, s))
            rows.append(KernelRow("gemv", label, "slimtune", us, w_bytes / us / 1e6))
            if sweep and m == 1 and k == 4096:
                rows += _sweep(x, packed, state, label, w_bytes)
            if bnb is not None:
                us = _time(lambda x=x, q=q, st=st, b=bnb: b.matmul_4bit(x, q.t(), quant_state=st))
                rows.append(KernelRow("gemv", label, "bnb", us, w_bytes / us / 1e6))
            us = _time(lambda x=x, w=weight: F.linear(x, w))
            rows.append(KernelRow("gemv", label, "bf16", us, n * k * 2 / us / 1e6))
    return rows


def _sweep(x, packed, state, label, w_bytes) -> list[KernelRow]:
    from slimtune.kernels.nf4_matmul import matmul_4bit_triton

    rows = []
    for bn in (16, 32, 64):
        for sk in (1, 2, 4, 8):
            for stages in (2, 4):
                cfg = dict(BLOCK_N=bn, SPLIT_K=sk, num_warps=4, num_stages=stages)
                try:
                    us = _time(lambda c=cfg: matmul_4bit_triton(x, packed, state, config=c), rep=20)  # noqa: B023
                except Exception as e:  # noqa: BLE001 - a config that does not compile is just skipped
                    print(f"[sweep] {label} {cfg} failed: {type(e).__name__}: {e}"[:300])
                    continue
                rows.append(KernelRow("gemv-sweep", label, f"bn{bn} sk{sk} st{stages}", us, w_bytes / us / 1e6))
    return rows


def run_kernel_bench(sweep: bool = False, verbose: bool = True) -> list[KernelRow]:
    """Time dequantization and decode matmuls on the current CUDA device; print a table."""
    rows = dequant_rows() + gemv_rows(sweep=sweep)
    if verbose:
        print(f"card: {torch.cuda.get_device_name()}")
        print(f"{'kernel':<10} {'shape':<16} {'contender':<22} {'us':>9} {'TB/s':>7}")
        for r in rows:
            if r.kernel == "gemv-sweep":
                continue
            print(f"{r.kernel:<10} {r.shape:<16} {r.contender:<22} {r.us:>9.2f} {r.tb_s:>7.2f}")
        if sweep:
            best: dict[str, KernelRow] = {}
            for r in rows:
                if r.kernel == "gemv-sweep" and (r.shape not in best or r.us < best[r.shape].us):
                    best[r.shape] = r
            for shape, r in best.items():
                print(f"best config {shape:<16} {r.contender:<22} {r.us:>9.2f}")
    return rows
