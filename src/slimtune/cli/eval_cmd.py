"""`slimtune eval`: perplexity, BLEU/ROUGE/exact match and optional local-judge scoring, base vs fine-tuned.

Registered in main.py with `app.command("eval")(eval_command)`.
"""

from __future__ import annotations

from typing import Annotated

import typer


def eval_command(
    model: Annotated[str, typer.Option("--model", help="Base model: a folder, a hub name or "
                                       "slimtune:smollm2-135m-instruct.", show_default=False)],
    data: Annotated[str, typer.Option("--data", help="Held-out rows (.jsonl/.json/.csv/.parquet, hub name, or "
                                      "`slimtune:<name>`).", show_default=False)],
    output: Annotated[str, typer.Option("--output", help="Folder for metrics.json, samples.jsonl, chart.png, "
                                        "report.md.", show_default=False)],
    adapter: Annotated[str | None, typer.Option("--adapter", help="Adapter folder; base and fine-tuned are "
                                                "compared side by side.")] = None,
    judge: Annotated[str | None, typer.Option("--judge", help="Local judge model folder (MT-Bench-style 1-10 "
                                              "grading and pairwise vs base).")] = None,
    max_samples: Annotated[int | None, typer.Option("--max-samples", min=1, help="Evaluate at most this many "
                                                    "rows.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Rows per batch.")] = 8,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Answer length cap.")] = 128,
    max_seq_len: Annotated[int, typer.Option("--max-seq-len", min=2, help="Perplexity truncation.")] = 1024,
    all_tokens: Annotated[bool, typer.Option("--all-tokens", help="Perplexity over every token, not only the "
                                             "assistant's.")] = False,
    no_generate: Annotated[bool, typer.Option("--no-generate", help="Perplexity only.")] = False,
    template: Annotated[str, typer.Option("--template", help="Prompt template, as in training.")] = "auto",
    data_format: Annotated[str, typer.Option("--format", help="Row format, as in training.")] = "auto",
    system_prompt: Annotated[str | None, typer.Option("--system-prompt", help="System message for rows without "
                                                      "one.")] = None,
    quantization: Annotated[str, typer.Option("--quantization", help="auto | none | nf4 | fp4.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto | fp32 | bf16 | fp16.")] = "auto",
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 (default: cuda if "
                                               "available).")] = None,
) -> None:
    """Evaluate a model (and its adapter) on held-out data; writes a report with a per-sample table and a chart.

    Example: `slimtune eval --model base/ --adapter runs/a/adapter --data eval.jsonl --output runs/a/eval`
    """
    from slimtune.cli.main import _guarded, _quiet_transformers, console

    def body() -> None:
        from slimtune.eval import EvalConfig, run_eval

        cfg = EvalConfig(model=model, data=data, output=output, adapter=adapter, judge=judge,
                         max_samples=max_samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                         max_seq_len=max_seq_len, all_tokens=all_tokens, generate=not no_generate,
                         template=template, format=data_format, system_prompt=system_prompt,
                         quantization=quantization, dtype=dtype, device=device)
        _quiet_transformers()
        result = run_eval(cfg, log=lambda text: console.print(text, highlight=False))
        for name, values in result.metrics["models"].items():
            shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, float))
            console.print(f"[bold]{name}[/bold]: {shown}", highlight=False)

    _guarded(body)
