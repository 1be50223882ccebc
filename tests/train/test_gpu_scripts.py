"""The two GPU scripts of #7 (benchmarks/long_context.py, benchmarks/loss_parity.py) in their --dry-run
form on CPU, so the lead's GPU call does not find their bugs."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from slimtune.kernels import set_fast_path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_mode():
    yield
    set_fast_path("auto")


def test_long_context_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = _script("long_context").main(["--dry-run", "--out", str(tmp_path)])
    assert [(c.layers, c.seq, c.status) for c in cases] == [(2, 50, "ok"), (1, 40, "ok")]
    assert all(math.isfinite(c.loss) and 4.0 < c.loss < 7.0 for c in cases)  # ~ln(256) at random init
    assert cases[1].extra_gib > cases[0].extra_gib > 0  # one more missing layer's bytes
    assert "proj 32L GiB" in capsys.readouterr().out


def test_loss_parity_dry_run(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    rows = _script("loss_parity").main(["--dry-run", "--assets", str(tiny_model_dir), "--methods", "lora",
                                        "--steps", "2"])
    (row,) = rows
    assert row["steps"] == 2 and row["method"] == "lora"
    assert row["max_fast_ref"] < 0.05 and row["max_bf16_fp32"] < 0.05
    assert abs(row["final_fast"] - row["final_fp32"]) < 0.05
    assert "within noise" in capsys.readouterr().out
