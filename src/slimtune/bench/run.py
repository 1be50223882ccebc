"""run_bench: slimtune vs peft (+ bitsandbytes for 4-bit) on the reference workloads, one process, one card.

    from slimtune.bench import run_bench
    report = run_bench(["8b-qlora-b1", "8b-qlora-b4"])      # prints the table, returns the rows

Rows are measured one after the other in this process (each model freed before the next is built),
so every ratio compares two numbers from the same run on the same card (DESIGN.md, Performance
protocol). MFU = tokens/s x flops_per_token / peak, the peak being the card's spec-sheet dense bf16 rate
(card_peak_flops; 989 TFLOP/s on an H100 SXM or H200).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from slimtune.bench.models import flops_per_token
from slimtune.bench.training import KBIT, Measurement, Workload, measure

__all__ = ["WORKLOADS", "BenchReport", "run_bench", "format_table", "card_peak_flops"]

# Dense (no sparsity) bf16 tensor-core FLOP/s from the vendors' spec sheets, matched in this order as a
# substring of torch.cuda.get_device_name ("NVIDIA H100 80GB HBM3" is the SXM card).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L40S", 362e12),
)
FALLBACK_PEAK_FLOPS = 790e12
"""Peak for a card not in PEAK_BF16_FLOPS: the dense bf16 matmul rate measured on an H100/H200 here."""

OFFLOAD = "st-offload"
GRAPH = "st-graph"
GRAPH_NOCKPT = "st-graph-nockpt"
NOCKPT = "-nockpt"  # suffix of a baseline row without gradient checkpointing, paired with GRAPH_NOCKPT

WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("1b-lora-b4", "1b", False, 4),
    Workload("1b-qlora-b4", "1b", True, 4),
    Workload("8b-lora-b1", "8b", False, 1),
    Workload("8b-qlora-b1", "8b", True, 1),
    Workload("8b-qlora-b4", "8b", True, 4),
    Workload("70b-qlora-b1", "70b", True, 1),
    Workload("tiny-lora-b2", "tiny", False, 2),
    Workload("tiny-qlora-b2", "tiny", True, 2),
)}
DEFAULT_WORKLOADS = ("1b-lora-b4", "1b-qlora-b4", "8b-lora-b1", "8b-qlora-b1", "8b-qlora-b4", "70b-qlora-b1")


@dataclass
class BenchReport:
    """All rows of one run plus what the run was: card, versions, settings."""

    rows: list[Measurement]
    card: str
    versions: dict[str, str]
    settings: dict[str, object] = field(default_factory=dict)

    def ratio(self, workload: str, baseline: str | None = None, library: str = "slimtune") -> dict[str, float] | None:
        """library / baseline: tokens/s (speedup) and peak memory; None without both rows ok.

        baseline: the library of the baseline row, by default the plain one ("peft" or "peft+bnb");
        library: slimtune's row, or one of its variants (st-offload, st-graph)."""
        mine = next((r for r in self.rows if r.workload == workload and r.library == library), None)
        base = next((r for r in self.rows if r.workload == workload and
                     (r.library == baseline if baseline else r.library in ("peft", "peft+bnb"))), None)
        if not mine or not base or mine.status != "ok" or base.status != "ok":
            return None
        return {"speedup": mine.tokens_per_s / base.tokens_per_s, "memory": mine.peak_gib / max(base.peak_gib, 1e-9),
                "model_memory": mine.model_gib / max(base.model_gib, 1e-9)}

    def all_ratios(self) -> list[dict[str, object]]:
        """Every slimtune-side row against every baseline row of its workload."""
        out = []
        for mine in self.rows:
            for base in self.rows:
                if mine.workload != base.workload or mine.library.startswith("peft") or \
                        not base.library.startswith("peft"):
                    continue
                r = self.ratio(mine.workload, base.library, mine.library)
                if r is not None:
                    out.append({"workload": mine.workload, "library": mine.library, "baseline": base.library, **r})
        return out

    def to_json(self) -> str:
        return json.dumps({"card": self.card, "versions": self.versions, "settings": self.settings,
                           "rows": [asdict(r) for r in self.rows],
                           "ratios": {w: self.ratio(w) for w in dict.fromkeys(r.workload for r in self.rows)},
                           "ratios_all": self.all_ratios()},
                          indent=1)


def _versions() -> dict[str, str]:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("peft", "bitsandbytes", "triton"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - an absent or broken optional package is just not listed
            out[name] = "absent"
    return out


def card_peak_flops(card: str) -> float:
    """Dense bf16 FLOP/s of a card named as torch.cuda.get_device_name names it; FALLBACK_PEAK_FLOPS if unknown."""
    return next((flops for name, flops in PEAK_BF16_FLOPS if name in card), FALLBACK_PEAK_FLOPS)


def run_bench(workloads: list[str] | tuple[str, ...] | None = None, *, device: str | None = None,
              seq_len: int = 2048, warmup: int = 2, steps: int = 3, baseline: bool = True,
              skip_baseline: tuple[str, ...] = (), peak_flops: float | None = None, max_step_seconds: float = 60.0,
              json_path: str | None = None, verbose: bool = True, offload: bool = False,
              repeats: int = 1, kbit_baseline: bool = False, cuda_graph: bool = False,
              graph_no_checkpoint: bool = False) -> BenchReport:
    """Run the workloads for slimtune and (unless baseline=False) peft / peft+bitsandbytes; print the table.

    Args:
        workloads: names from WORKLOADS (default: the six reference workloads).
        device: "cuda" (default when present) or "cpu" (smoke runs on the tiny preset; no timing value).
        seq_len, warmup, steps: tokens per row of the batch, untimed steps, timed steps.
        skip_baseline: workloads that run slimtune only (e.g. a baseline too slow for the time budget).
        peak_flops: the card's dense bf16 rate for MFU; default card_peak_flops(device).
        max_step_seconds: measured steps are cut so that one row takes about this long.
        json_path: also write the report as JSON there.
        offload: also a row "st-offload": slimtune with its checkpointed layer inputs in pinned host
            memory (offload_saved_tensors, train.offload_checkpoints), measured in the same rounds.
        repeats: measure each (workload, library) this many times, the order of the libraries reversed
            on every other round (A B, B A, ...), and keep each side's fastest round: the same treatment
            for both sides, so an order effect or a slow round cannot favour either.
        kbit_baseline: for 4-bit workloads also a row "peft+bnb-kbit": the QLoRA tutorial recipe, with
            peft's prepare_model_for_kbit_training (fp32 upcast of norms, embeddings and head).
        cuda_graph: also a row "st-graph": slimtune with forward + backward replayed as a CUDA graph
            (bench/graphed_step.py), measured in the same rounds.
        graph_no_checkpoint: also a row "st-graph-nockpt": st-graph without gradient checkpointing (no
            recompute, every layer's activations kept), the default of `slimtune train`, and (with the
            baseline) a "peft-nockpt" / "peft+bnb-nockpt" row without it either, to compare like with like.
    """
    names = list(workloads or DEFAULT_WORKLOADS)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workloads {unknown}; allowed: {sorted(WORKLOADS)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak_flops = peak_flops or card_peak_flops(card)
    report = BenchReport([], card, _versions(), dict(seq_len=seq_len, warmup=warmup, steps=steps, dtype=str(dtype),
                                                      peak_flops=peak_flops, lora="r=16 alpha=16 dropout=0 7 proj",
                                                      offload=offload, repeats=repeats, kbit_baseline=kbit_baseline,
                                                      cuda_graph=cuda_graph,
                                                      graph_no_checkpoint=graph_no_checkpoint))
    for name in names:
        work = WORKLOADS[name]
        libraries = ["slimtune"]
        if baseline and name not in skip_baseline:
            libraries.append("peft+bnb" if work.quantized else "peft")
            if kbit_baseline and work.quantized:
                libraries.append(KBIT)
        if offload:
            libraries.append(OFFLOAD)
        if cuda_graph:
            libraries.append(GRAPH)
        if graph_no_checkpoint:
            libraries.append(GRAPH_NOCKPT)
            if baseline and name not in skip_baseline:
                libraries.append(("peft+bnb" if work.quantized else "peft") + NOCKPT)
        best: dict[str, Measurement] = {}
        for round_ in range(max(1, repeats)):
            for library in libraries if round_ % 2 == 0 else libraries[::-1]:
                row = measure(work, library, dev, dtype, seq_len, warmup, steps, max_step_seconds,
                              offload=library == OFFLOAD, cuda_graph=library in (GRAPH, GRAPH_NOCKPT),
                              checkpointing=not library.endswith(NOCKPT))
                row.mfu = row.tokens_per_s * flops_per_token(work.preset, seq_len) / peak_flops
                if verbose:
                    print(f"[bench] round {round_ + 1}: {row}", flush=True)
                kept = best.get(library)
                if kept is None or (row.status == "ok" and (kept.status != "ok" or row.tokens_per_s > kept.tokens_per_s)):
                    best[library] = row
        report.rows.extend(best[library] for library in libraries)
        if baseline and name in skip_baseline:
            report.rows.append(Measurement(name, "peft+bnb" if work.quantized else "peft", status="skipped"))
    if json_path:
        with open(json_path, "w") as f:
            f.write(report.to_json())
    if verbose:
        print(format_table(report), flush=True)
    return report


def format_table(report: BenchReport) -> str:
    """A fixed-width text table: one line per (workload, library), ratios on the slimtune line."""
    head = (f"{'workload':<14} {'library':<13} {'tok/s':>9} {'peak GiB':>9} {'model GiB':>9} {'MFU':>6} "
            f"{'loss':>6} {'speedup':>8} {'mem x':>6}")
    lines = [f"card: {report.card}  {report.versions}", head, "-" * len(head)]
    for r in report.rows:
        if r.status != "ok":
            lines.append(f"{r.workload:<14} {r.library:<13} {r.status}")
            continue
        ratio = _line_ratio(report, r)
        tail = f" {ratio['speedup']:>7.2f}x {ratio['memory']:>5.2f}x" if ratio else ""
        tail += f"  ({r.note})" if r.note else ""
        lines.append(f"{r.workload:<14} {r.library:<13} {r.tokens_per_s:>9.1f} {r.peak_gib:>9.2f} {r.model_gib:>9.2f} "
                     f"{100 * r.mfu:>5.1f}% {r.loss:>6.3f}{tail}")
    return "\n".join(lines)


def _line_ratio(report: BenchReport, row: Measurement) -> dict[str, float] | None:
    """The ratios a table line shows: slimtune's lines (st-* variants too) against the plain baseline; the
    kbit line, slimtune's against it; a -nockpt baseline line, st-graph-nockpt's against it."""
    if row.library == KBIT:
        return report.ratio(row.workload, KBIT)
    if row.library.startswith("peft"):
        return report.ratio(row.workload, row.library, GRAPH_NOCKPT) if row.library.endswith(NOCKPT) else None
    return report.ratio(row.workload, library=row.library)
