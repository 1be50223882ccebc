"""`slimtune bench` through the CLI on the tiny CPU preset: both rows present, positive numbers."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from slimtune.cli.main import app


def test_bench_cli_tiny_cpu_writes_both_rows(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "tiny-lora-b2", "--device", "cpu", "--seq-len", "16",
                                      "--steps", "1", "--warmup", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["library"]: r for r in json.loads(out.read_text())["rows"] if r["workload"] == "tiny-lora-b2"}
    assert set(rows) == {"slimtune", "peft"}
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows.values())
    # same shape, same seed, same first batch: the two libraries see the same first-step loss
    assert abs(rows["slimtune"]["loss"] - rows["peft"]["loss"]) < 1e-4


def test_bench_cli_unknown_workload_is_a_user_error():
    result = CliRunner().invoke(app, ["bench", "9b-nope", "--device", "cpu"])
    assert result.exit_code == 2
    assert "unknown workloads" in result.output


def test_bench_cli_graph_row_says_it_ran_eagerly_without_cuda(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "tiny-lora-b2", "--device", "cpu", "--seq-len", "16", "--steps", "1",
                                      "--warmup", "0", "--no-baseline", "--graph", "--graph-nockpt", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["library"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"slimtune", "st-graph", "st-graph-nockpt"}  # no baseline: no peft-nockpt row either
    assert rows["st-graph-nockpt"]["note"] == "eager: no CUDA"
    assert rows["st-graph"]["note"] == "eager: no CUDA" and rows["st-graph"]["status"] == "ok"
    assert abs(rows["slimtune"]["loss"] - rows["st-graph"]["loss"]) < 1e-6
