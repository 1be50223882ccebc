"""`slimtune eval`: perplexity, BLEU/ROUGE/exact match and optional local-judge scoring, base vs fine-tuned.

Its options are the fields of slimtune.eval.EvalConfig. Registered in main.py.
"""

from __future__ import annotations

from slimtune.cli.common import console, quiet_transformers
from slimtune.cli.options import config_command
from slimtune.eval.config import EvalConfig


def run_eval_command(cfg: EvalConfig) -> None:
    from slimtune.eval import run_eval

    quiet_transformers()
    result = run_eval(cfg, log=lambda text: console.print(text, markup=False, highlight=False))
    for name, values in result.metrics["models"].items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, float))
        console.print(f"[bold]{name}[/bold]: {shown}", highlight=False)


eval_command = config_command(run_eval_command, EvalConfig, doc="""\
Evaluate a model (and its adapter) on held-out data; writes a report with a per-sample table and a chart.

Example: `slimtune eval --model base/ --adapter runs/a/adapter --data eval.jsonl --output runs/a/eval`
""")
