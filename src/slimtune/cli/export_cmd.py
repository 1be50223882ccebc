"""`slimtune export --gguf`: a merged model to GGUF files for llama.cpp (f16, q8_0, f32).

Its options are the fields of slimtune.infer.config.ExportConfig. Registered in main.py.
"""

from __future__ import annotations

from pathlib import Path

from slimtune.cli.common import console, quiet_transformers
from slimtune.cli.options import config_command
from slimtune.infer.config import ExportConfig


def run_export(cfg: ExportConfig) -> None:
    from slimtune.infer.gguf_export import export_gguf
    from slimtune.models import resolve_model

    quiet_transformers()
    folder = resolve_model(cfg.model, "--model")
    for kind, path in gguf_targets(folder, cfg.output, cfg.outtype).items():
        written = export_gguf(folder, path, kind, pre_tokenizer=cfg.pre_tokenizer)
        size = written.stat().st_size / 2**20
        console.print(f"{kind}: {written} ({size:.1f} MiB)", highlight=False)


def gguf_targets(model: str, output: str, types: list[str]) -> dict[str, Path]:
    """outtype -> file: `output` itself when it ends with .gguf (one outtype), else output/NAME-TYPE.gguf."""
    out = Path(output)
    if out.suffix == ".gguf":
        if len(types) > 1:
            raise ValueError(f"--output {output} is one file but {len(types)} --outtype values were given; "
                             "pass a folder")
        return {types[0]: out}
    name = Path(model).resolve().name
    return {kind: out / f"{name}-{kind}.gguf" for kind in types}


export_command = config_command(run_export, ExportConfig, doc="""\
Export a merged model; `--gguf` writes llama.cpp-readable GGUF files.

Example: `slimtune export --gguf --model runs/a/merged --output runs/a/gguf --outtype f16 --outtype q8_0`
""")
