"""`slimtune export --gguf`: a merged model to GGUF files for llama.cpp (f16, q8_0, f32).

Registered in main.py with `app.command("export")(export_command)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def export_command(
    model: Annotated[str, typer.Option("--model", help="Merged model folder (from `slimtune merge`), or "
                                       "slimtune:smollm2-135m-instruct.", show_default=False)],
    output: Annotated[str, typer.Option("--output", help="A .gguf file, or a folder receiving "
                                        "NAME-OUTTYPE.gguf per --outtype.", show_default=False)],
    gguf: Annotated[bool, typer.Option("--gguf", help="Write GGUF (the only export format for now).")] = False,
    outtype: Annotated[list[str] | None, typer.Option("--outtype", help="f16 | q8_0 | f32; repeat for several "
                                                      "files.")] = None,
    pre_tokenizer: Annotated[str | None, typer.Option("--pre-tokenizer", help="llama.cpp name of the BPE "
                                                      "pre-tokenizer when slimtune cannot identify it.")] = None,
) -> None:
    """Export a merged model; `--gguf` writes llama.cpp-readable GGUF files.

    Example: `slimtune export --gguf --model runs/a/merged --output runs/a/gguf --outtype f16 --outtype q8_0`
    """
    from slimtune.cli.main import _guarded, _quiet_transformers, console

    def body() -> None:
        from slimtune.infer.gguf_export import export_gguf
        from slimtune.models import resolve_model

        if not gguf:
            raise ValueError("choose an export format: --gguf (the only one for now)")
        types = outtype or ["f16"]
        _quiet_transformers()
        folder = resolve_model(model, "--model")
        for kind, path in gguf_targets(folder, output, types).items():
            written = export_gguf(folder, path, kind, pre_tokenizer=pre_tokenizer)
            size = written.stat().st_size / 2**20
            console.print(f"{kind}: {written} ({size:.1f} MiB)", highlight=False)

    _guarded(body)


def gguf_targets(model: str, output: str, types: list[str]) -> dict[str, Path]:
    """outtype -> file: `output` itself when it ends with .gguf (one outtype), else output/NAME-TYPE.gguf."""
    if len(set(types)) != len(types):
        raise ValueError(f"--outtype repeats a value: {types}")
    out = Path(output)
    if out.suffix == ".gguf":
        if len(types) > 1:
            raise ValueError(f"--output {output} is one file but {len(types)} --outtype values were given; "
                             "pass a folder")
        return {types[0]: out}
    name = Path(model).resolve().name
    return {kind: out / f"{name}-{kind}.gguf" for kind in types}
