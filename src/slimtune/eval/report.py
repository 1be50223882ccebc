"""Evaluation outputs: metrics.json, samples.jsonl (every prompt, answer and judge output), chart.png
(base vs fine-tuned, matplotlib) and report.md (summary table, chart, per-sample table)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

CHART_FILE = "chart.png"
METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.jsonl"
REPORT_FILE = "report.md"

# (key, label, factor to put it on a 0-100 scale)
_BAR_METRICS = (("bleu", "BLEU", 1.0), ("rouge1", "ROUGE-1", 100.0), ("rouge2", "ROUGE-2", 100.0),
                ("rougeL", "ROUGE-L", 100.0), ("exact_match", "Exact match", 100.0),
                ("judge_score", "Judge (x10)", 10.0))


def write_outputs(out: Path, metrics: dict[str, Any], rows: list[dict[str, Any]], names: list[str]) -> Path:
    """Write all four files into `out`; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, ensure_ascii=False, default=str) + "\n",
                                    encoding="utf-8")
    with (out / SAMPLES_FILE).open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    chart = plot_chart(metrics["models"], out / CHART_FILE)
    report = out / REPORT_FILE
    report.write_text(markdown_report(metrics, rows, names, chart is not None), encoding="utf-8")
    return report


def plot_chart(models: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Grouped bars per metric (0-100 scale) and a perplexity panel; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(models)
    keys = [(k, label, f) for k, label, f in _BAR_METRICS if any(_num(models[n].get(k)) is not None for n in names)]
    fig, (bars, ppl) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        values = [(_num(models[name].get(k)) or 0.0) * f for k, _, f in keys]
        bars.bar([x + i * width for x in range(len(keys))], values, width, label=name, color=f"C{i}")
    bars.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(keys))], [label for _, label, _ in keys])
    bars.set_ylim(0, 100)
    bars.set_ylabel("score (0-100)")
    bars.set_title("generation metrics")
    bars.legend()
    ppl_values = [_num(models[n].get("perplexity")) or 0.0 for n in names]
    ppl.bar(names, ppl_values, color=[f"C{i}" for i in range(len(names))])
    ppl.set_title("perplexity (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown_report(metrics: dict[str, Any], rows: list[dict[str, Any]], names: list[str], chart: bool) -> str:
    models = metrics["models"]
    lines = ["# Evaluation report", "", f"- model: `{metrics['config']['model']}`",
             f"- adapter: `{metrics['config'].get('adapter')}`", f"- data: `{metrics['config']['data']}` "
             f"({metrics['rows']} rows, {metrics['ppl_examples']} perplexity examples, "
             f"{metrics['generation_samples']} generation samples)", ""]
    keys = ["perplexity", "loss", "bleu", "rouge1", "rouge2", "rougeL", "exact_match", "judge_score", "judge_unparsed"]
    keys = [k for k in keys if any(k in models[n] for n in names)]
    lines += ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(_fmt(models[n].get(k)) for n in names) + " |" for k in keys]
    if "pairwise" in metrics:
        p = metrics["pairwise"]
        lines += ["", f"Pairwise (judge, both orders), fine-tuned vs base: {p['win']} wins, {p['loss']} losses, "
                      f"{p['tie']} ties, {p['unparsed']} unparsed; win rate {_fmt(p['win_rate'])}"]
    if chart:
        lines += ["", f"![base vs fine-tuned]({CHART_FILE})"]
    if rows:
        lines += ["", "## Samples", "", _sample_header(names, rows)]
        lines += [_sample_line(i, row, names) for i, row in enumerate(rows, 1)]
    lines += ["", f"Every prompt, answer and judge output is in `{SAMPLES_FILE}`.", ""]
    return "\n".join(lines)


def _sample_header(names: list[str], rows: list[dict[str, Any]]) -> str:
    cols = ["#", "question", "reference"] + [f"{n} answer" for n in names] + [f"{n} ROUGE-L" for n in names]
    if "judge" in rows[0].get(names[0], {}):
        cols += [f"{n} judge" for n in names]
    if "pairwise" in rows[0]:
        cols.append("pairwise")
    return "| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|"


def _sample_line(index: int, row: dict[str, Any], names: list[str]) -> str:
    cells = [str(index), _cell(row["question"]), _cell(row["reference"])]
    cells += [_cell(row[n]["answer"]) for n in names]
    cells += [_fmt(row[n]["rougeL"]) for n in names]
    if "judge" in row[names[0]]:
        cells += [_fmt(row[n]["judge"]["score"]) if row[n]["judge"]["score"] is not None else "unparsed" for n in names]
    if "pairwise" in row:
        cells.append(row["pairwise"]["outcome"])
    return "| " + " | ".join(cells) + " |"


def _cell(text: str, limit: int = 80) -> str:
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
