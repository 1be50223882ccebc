"""The `slimtune` command (typer): assembles the app; defines train, data inspect and demo.

The other commands live beside this file; all run their body through `common.guarded`, which turns user
mistakes into one red line (exit 2) and lets a bug show its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from slimtune.cli.bench_cmd import bench_command
from slimtune.cli.chat_cmd import chat_command
from slimtune.cli.common import console, guarded, quiet_transformers
from slimtune.cli.eval_cmd import eval_command
from slimtune.cli.export_cmd import export_command
from slimtune.cli.help import config_help
from slimtune.cli.merge_cmd import merge_command
from slimtune.cli.serve_cmd import serve_command

app = typer.Typer(
    name="slimtune", no_args_is_help=True, add_completion=False, rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    help="Fine-tune LLMs cheaply: LoRA, QLoRA and the PEFT family, with a complete SFT pipeline. "
         "Start with `slimtune demo`.",
)
data_app = typer.Typer(no_args_is_help=True, help="Look at training data before training on it.")
app.add_typer(data_app, name="data")

OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("slimtune")
        except PackageNotFoundError:  # imported from a source tree that was never installed
            from slimtune import __version__ as installed
        typer.echo(f"slimtune {installed}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print the installed slimtune version and exit.")] = False,
) -> None:
    """Options that apply before any command."""

ConfigArg = Annotated[Path, typer.Argument(help="Run YAML: model, method, peft, data, train, output_dir "
                                            "(keys below).", show_default=False)]


@app.command(context_settings=OVERRIDES, epilog=config_help())
def train(
    ctx: typer.Context,
    config: ConfigArg,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint in "
                                         "output_dir/checkpoints, exactly where it stopped.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the live progress bar.")] = True,
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="Train data-parallel on this many GPUs (re-runs itself "
                                      "under torchrun; see train.distributed).")] = 1,
) -> None:
    """Fine-tune a model as described by CONFIG; extra `--section.key value` pairs override its keys.

    Example: `slimtune train examples/lora.yaml --train.max_steps 100 --output_dir runs/try`
    """

    if gpus > 1 and "WORLD_SIZE" not in os.environ:
        from slimtune.train.launch import relaunch

        raise typer.Exit(relaunch(gpus))

    def body() -> None:
        from slimtune.train.distributed import teardown
        from slimtune.train.run import run_training
        from slimtune.train.run_config import load_run_config

        cfg = load_run_config(config, ctx.args)
        quiet_transformers()
        run_training(cfg, resume=resume, progress=progress, console=console)
        teardown()

    guarded(body, interrupted="interrupted; continue with `slimtune train CONFIG --resume`")


@data_app.command("inspect", context_settings=OVERRIDES)
def data_inspect(
    ctx: typer.Context,
    config: ConfigArg,
    sample: Annotated[int, typer.Option("--sample", help="Index of the training example to show.")] = 0,
) -> None:
    """Build the data of CONFIG as training would; show stats and one sample with its trained tokens.

    Only the `model` (for its tokenizer), `data` and `train.max_seq_len`/`train.seed` keys are used.
    """

    def body() -> None:
        from slimtune.data import inspect_data
        from slimtune.train.run import load_tokenizer
        from slimtune.train.run_config import load_run_config

        cfg = load_run_config(config, ctx.args)
        quiet_transformers()
        tokenizer = load_tokenizer(cfg.model)
        report = inspect_data(cfg.data, tokenizer, cfg.train.max_seq_len, seed=cfg.train.seed,
                              sample_index=sample)
        out = Console()
        # colour marks the trained tokens only where colour shows; elsewhere they are bracketed in plain text
        coloured = out.is_terminal and out.color_system is not None and not out.no_color
        out.print(report.render(markup=coloured), markup=coloured, highlight=False, soft_wrap=True)

    guarded(body)


@app.command()
def demo(
    steps: Annotated[int, typer.Option("--steps", min=1, help="LoRA optimizer steps of 8 rows (~2-3 s each on "
                                       "2 idle CPU cores; the loss plateaus after ~30).")] = 40,
    output_dir: Annotated[str, typer.Option("--output-dir", help="Run folder (replaced if it holds an earlier "
                                            "demo run).")] = "runs/demo",
) -> None:
    """Fine-tune SmolLM2-135M-Instruct with LoRA on the shipped WordNet rows, on CPU in a few minutes.

    Prints the held-out loss and greedy answers to held-out prompts, before and after training.
    """

    def body() -> None:
        from slimtune.cli.demo import run_demo

        quiet_transformers()
        run_demo(steps=steps, output_dir=Path(output_dir), console=console)

    guarded(body)


# Commands defined beside this file (options generated from their config dataclasses, see options.py).
app.command("eval")(eval_command)
app.command("chat")(chat_command)
app.command("merge")(merge_command)
app.command("export")(export_command)
app.command("serve")(serve_command)
app.command("bench")(bench_command)


def main() -> None:
    app()
