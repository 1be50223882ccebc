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


def test_repeats_keep_each_sides_fastest_round_and_offload_row(monkeypatch):
    """--repeats: every library measured in every round (order reversed on odd rounds), the fastest kept;
    --offload: a third row trained under offload_saved_tensors, with the same first loss."""
    pytest.importorskip("peft")
    import slimtune.bench.run as run_mod
    from slimtune.bench.run import OFFLOAD

    calls = []
    real = run_mod.measure

    def spy(work, library, *args, **kwargs):
        row = real(work, library, *args, **kwargs)
        row.tokens_per_s = 100.0 + len(calls)  # later rounds look faster: the kept row must be the last one
        calls.append((library, kwargs["offload"]))
        return row

    monkeypatch.setattr(run_mod, "measure", spy)
    report = run_bench(["tiny-lora-b2"], device="cpu", seq_len=16, warmup=1, steps=3, verbose=False,
                       repeats=2, offload=True)
    assert calls == [("slimtune", False), ("peft", False), (OFFLOAD, True),
                     (OFFLOAD, True), ("peft", False), ("slimtune", False)]
    assert [(r.library, r.tokens_per_s) for r in report.rows] == [("slimtune", 105.0), ("peft", 104.0),
                                                                   (OFFLOAD, 103.0)]
    for row in report.rows:
        assert len(row.step_times) == 3 and row.step_s == sorted(row.step_times)[1]
    assert report.rows[2].loss == pytest.approx(report.rows[0].loss, rel=1e-5)


def test_offload_is_refused_for_the_baseline():
    pytest.importorskip("peft")
    import torch

    from slimtune.bench.run import WORKLOADS
    from slimtune.bench.training import measure

    with pytest.raises(ValueError, match="baseline"):
        measure(WORKLOADS["tiny-lora-b2"], "peft", torch.device("cpu"), torch.float32, 16, 1, 1, offload=True)


def test_kbit_baseline_row():
    """--kbit: the tutorial recipe (peft's prepare_model_for_kbit_training) as a second 4-bit baseline; its
    fp32 upcast of embeddings, norms and head shows in the model's memory, and the ratios name it."""
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from slimtune.bench.run import KBIT

    calls = []
    real = peft.prepare_model_for_kbit_training
    peft.prepare_model_for_kbit_training = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        report = run_bench(["tiny-qlora-b2"], device="cpu", seq_len=16, warmup=1, steps=1, verbose=False,
                           kbit_baseline=True)
    finally:
        peft.prepare_model_for_kbit_training = real
    assert [r.library for r in report.rows] == ["slimtune", "peft+bnb", KBIT] and calls == [1]
    assert all(r.status == "ok" for r in report.rows)
    assert report.rows[2].loss == pytest.approx(report.rows[0].loss, rel=1e-3)
    assert report.ratio("tiny-qlora-b2", KBIT)["speedup"] > 0
    assert KBIT in format_table(report)


def test_graph_nockpt_row_trains_without_recompute(monkeypatch):
    """--graph-nockpt: a row built without gradient checkpointing, and a peft row without it too. Each decoder layer runs its forward once
    (its norm, inside the checkpointed function) per step there, against twice (forward + recompute in backward) in the checkpointed slimtune row; the
    first losses are equal and the table gives the row its ratios."""
    pytest.importorskip("peft")
    import slimtune.bench.training as training
    from slimtune.bench.run import GRAPH_NOCKPT

    calls: dict[int, int] = {}
    real = training.wrap_slimtune

    def counting(model, checkpointing=True):
        wrapped = real(model, checkpointing)
        key = len(calls)
        calls[key] = 0
        inner = model.model.layers[0].input_layernorm  # inside the checkpoint: runs again in the recompute
        inner.register_forward_hook(lambda *_: calls.__setitem__(key, calls[key] + 1))
        return wrapped

    monkeypatch.setattr(training, "wrap_slimtune", counting)
    peft_wraps: dict[str, list[bool]] = {}  # per baseline row: was gradient checkpointing on in each layer
    real_peft = training.wrap_peft

    def peft_spy(model, quantized, kbit=False, checkpointing=True):
        wrapped = real_peft(model, quantized, kbit, checkpointing)
        name = "peft" if checkpointing else "peft-nockpt"
        peft_wraps[name] = [layer.gradient_checkpointing for layer in model.model.layers]
        return wrapped

    monkeypatch.setattr(training, "wrap_peft", peft_spy)
    report = run_bench(["tiny-lora-b2"], device="cpu", seq_len=16, warmup=1, steps=2, verbose=False,
                       baseline=True, graph_no_checkpoint=True)
    assert [r.library for r in report.rows] == ["slimtune", "peft", GRAPH_NOCKPT, "peft-nockpt"]
    assert calls == {0: 2 * 3, 1: 3}  # 3 steps: checkpointed layers recompute, the nockpt row does not
    assert "peft-nockpt" in peft_wraps and peft_wraps["peft-nockpt"] == [False] * len(peft_wraps["peft-nockpt"])
    assert peft_wraps["peft"] and all(peft_wraps["peft"])
    assert report.rows[3].loss == pytest.approx(report.rows[0].loss, rel=1e-3)
    assert report.ratio("tiny-lora-b2", "peft-nockpt", GRAPH_NOCKPT)["speedup"] > 0
    assert report.rows[2].note == "eager: no CUDA"
    assert report.rows[2].loss == pytest.approx(report.rows[0].loss, rel=1e-5)
    assert report.ratio("tiny-lora-b2", library=GRAPH_NOCKPT)["speedup"] > 0
    nockpt_line, peft_line = format_table(report).splitlines()[-2:]
    assert nockpt_line.startswith("tiny-lora-b2   st-graph-nockpt") and nockpt_line.endswith("x  (eager: no CUDA)")
    assert peft_line.startswith("tiny-lora-b2   peft-nockpt") and peft_line.endswith("x")


def test_nockpt_and_offload_are_refused_together():
    import torch

    from slimtune.bench.run import WORKLOADS
    from slimtune.bench.training import measure

    with pytest.raises(ValueError, match="offload needs checkpointing"):
        measure(WORKLOADS["tiny-lora-b2"], "slimtune", torch.device("cpu"), torch.float32, 16, 1, 1, offload=True,
                checkpointing=False)
