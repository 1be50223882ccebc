"""What a run reports: metrics.jsonl rows, the trackers of train.report_to, a rich progress bar, a loss/lr plot.

matplotlib is optional and imported lazily; when missing, a one-line notice says so and training goes on
(the trackers: slimtune.train.trackers). On resume, metrics.jsonl is rewritten from the checkpoint's history, so rows
logged after the checkpoint by the interrupted run do not appear twice.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from slimtune.train.trackers import Tracker, row_metrics

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated on `device`, else this process's peak resident memory, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


class MetricsLog:
    """Append metric rows to output_dir/metrics.jsonl and send each to the trackers of train.report_to."""

    def __init__(self, output_dir: Path, history: list[dict[str, Any]], trackers: list[Tracker]):
        self.path = output_dir / METRICS_FILE
        self.path.write_text("".join(json.dumps(row) + "\n" for row in history))
        self.trackers = trackers

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        metrics = row_metrics(row)
        for tracker in self.trackers:
            tracker.log(metrics, row["step"])

    def close(self, failed: bool = False) -> None:
        """Finish every tracker's run, marked failed when training raised; each is closed even if one fails."""
        errors = []
        for tracker in self.trackers:
            try:
                tracker.close(failed)
            except Exception as err:  # noqa: BLE001 - the other trackers still close; re-raised below
                errors.append(err)
        if errors and not failed:
            raise errors[0]


class ProgressBar:
    """A rich progress bar showing loss, lr, tokens/s, memory and ETA (silent when disabled)."""

    def __init__(self, total: int, start: int, console: Console, enabled: bool):
        self.progress = Progress(
            TextColumn("[bold blue]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, disable=not enabled, transient=False,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, stats="")

    def __enter__(self) -> ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, step: int, row: dict[str, Any]) -> None:
        stats = (f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:,.0f} tok/s  "
                 f"mem {row['memory_gb']:.2f} GiB")
        self.progress.update(self.task, completed=step, stats=stats)

    def advance_to(self, step: int) -> None:
        self.progress.update(self.task, completed=step)

    def print(self, text: str) -> None:
        self.progress.console.print(text)


def plot_metrics(history: list[dict[str, Any]], path: Path, console: Console) -> Path | None:
    """Save a PNG of train/eval loss and learning rate by step; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("[yellow]matplotlib is not installed: skipping the loss plot[/yellow]")
        return None
    train = [r for r in history if "loss" in r and math.isfinite(r["loss"])]
    evals = [r for r in history if "eval_loss" in r]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
