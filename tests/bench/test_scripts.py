"""The benchmark library behind the scripts: the shell scripts in benchmarks/ name modules and files that exist,
and bench/distributed.py (the multi-GPU throughput run) measures a real step on one CPU process."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_shell_scripts_call_modules_and_files_that_exist(script: Path) -> None:
    text = script.read_text()
    modules = set(re.findall(r"-m (slimtune(?:\.\w+)*)", text))
    files = set(re.findall(r"benchmarks/(\w+\.py)", text))
    assert modules or files, f"{script.name} calls no slimtune module or benchmark script"
    assert [m for m in modules if importlib.util.find_spec(m) is None] == []
    assert [f for f in files if not (BENCHMARKS / f).is_file()] == []


def test_distributed_bench_runs_one_process_on_cpu(tmp_path: Path) -> None:
    from slimtune.bench.distributed import main

    out = tmp_path / "rows.jsonl"
    main(["--preset", "tiny", "--device", "cpu", "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "1",
          "--out", str(out)])
    row = json.loads(out.read_text())
    assert row["strategy"] == "single" and row["gpus"] == 1 and row["steps"] == 2
    assert row["tokens_per_s"] == pytest.approx(2 * 32 / row["step_s"], rel=0.01)
    assert abs(row["loss"] - math.log(256)) < 0.1  # random init: about ln(vocab)
