"""`slimtune merge`: fold an adapter into its base model and save a plain transformers model.

Registered in main.py with `app.command("merge")(merge_command)`.
"""

from __future__ import annotations

from typing import Annotated

import typer


def merge_command(
    model: Annotated[str, typer.Option("--model", help="Base model: a folder, a hub name or "
                                       "slimtune:smollm2-135m-instruct.", show_default=False)],
    adapter: Annotated[str, typer.Option("--adapter", help="Adapter folder.", show_default=False)],
    output: Annotated[str, typer.Option("--output", help="New folder for the merged model.", show_default=False)],
    max_logit_diff: Annotated[float | None, typer.Option(
        "--max-logit-diff", min=0.0, help="Fail when merged and unmerged logits differ by more than this "
        "(default: max(floor, fraction of the largest logit) for the dtype: fp32 1e-3/1e-4, fp16 0.1/1e-2, "
        "bf16 0.5/5e-2).")] = None,
    quantization: Annotated[str, typer.Option("--quantization", help="auto (4-bit base for a QLoRA run) | none | "
                                              "nf4 | fp4; a 4-bit base is dequantized, never re-quantized.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="Weights dtype of the merged model: auto | fp32 | bf16 | "
                                       "fp16.")] = "auto",
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1.")] = None,
) -> None:
    """Merge an adapter into its base; checks merged vs unmerged logits before writing anything.

    Example: `slimtune merge --model base/ --adapter runs/a/adapter --output runs/a/merged`
    """
    from slimtune.cli.main import _guarded, _quiet_transformers, console

    def body() -> None:
        from slimtune.infer.merge import merge_to_dir

        _quiet_transformers()
        report = merge_to_dir(model, adapter, output, quantization, dtype, device, max_logit_diff)
        base = "4-bit base dequantized" if report.quantized_base else "base"
        console.print(f"merged ({base}, {report.dtype}): max |logit diff| {report.max_logit_diff:.3g} "
                      f"<= {report.threshold:.3g}; saved to {report.output}", highlight=False)

    _guarded(body)
