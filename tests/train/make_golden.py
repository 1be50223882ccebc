"""Regenerate tests/train/golden/<method>.json: the logged losses of `slimtune train` on a tiny Llama.

Run only when training behaviour changes on purpose:  python tests/train/make_golden.py
It runs the real CLI (2 epochs x 2 steps, fixed seed) for each method in tiny_run.GOLDEN_METHODS.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tiny_run import GOLDEN_METHODS, build_llama, build_tokenizer, golden_config, read_metrics  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from slimtune.cli.main import app  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tokenizer(root / "model")
        build_llama(root / "model")
        for method in GOLDEN_METHODS:
            config = golden_config(root, root / "model", method)
            result = CliRunner().invoke(app, ["train", str(config), "--no-progress"])
            if result.exit_code != 0:
                raise SystemExit(f"{method}: exit {result.exit_code}\n{result.output}")
            metrics = read_metrics(root / f"run-{method}")
            out = HERE / "golden" / f"{method}.json"
            out.write_text(json.dumps(metrics, indent=1) + "\n")
            print(f"{method}: {metrics['loss']} -> {out}")


if __name__ == "__main__":
    main()
