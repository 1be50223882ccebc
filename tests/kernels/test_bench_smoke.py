"""CPU smoke run of the benchmark on the tiny preset: both rows present, numbers positive (no timing claim)."""

import json

import pytest

from slimtune.bench import format_table, run_bench


@pytest.mark.parametrize("workload", ["tiny-lora-b2", "tiny-qlora-b2"])
def test_bench_rows_and_table(workload, tmp_path):
    if workload == "tiny-qlora-b2":
        pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    path = tmp_path / "bench.json"
    report = run_bench([workload], device="cpu", seq_len=16, warmup=1, steps=1, json_path=str(path), verbose=False)
    assert [r.library for r in report.rows] == ["slimtune", "peft+bnb" if "qlora" in workload else "peft"]
    for row in report.rows:
        assert row.status == "ok" and row.tokens_per_s > 0 and row.step_s > 0 and row.mfu > 0
        assert 4.0 < row.loss < 7.0  # ln(256) = 5.55 at random init: both sides train the same model
    assert report.rows[0].loss == pytest.approx(report.rows[1].loss, rel=1e-3)
    ratio = report.ratio(workload)
    assert ratio is not None and ratio["speedup"] > 0
    table = format_table(report)
    assert workload in table and "slimtune" in table and table.count("\n") == 4
    assert json.loads(path.read_text())["rows"][1]["library"] == report.rows[1].library


def test_unknown_workload():
    with pytest.raises(ValueError, match="allowed"):
        run_bench(["9b-lora"], device="cpu")
