"""train.report_to on a tiny random Llama + LoRA: each tracker's logged config and metrics, read back from its
own files or API, equal metrics.jsonl row by row; a crashed run resumed continues the same tracker run."""

from __future__ import annotations

import glob
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from tiny_run import build_llama, golden_config, pad_collate, random_rows
from typer.testing import CliRunner

from slimtune.cli.main import app
from slimtune.train.config import TrainConfig
from slimtune.train.loop import Trainer
from slimtune.train.methods import build_peft_config, prepare_model
from slimtune.train.rng import seed_everything
from slimtune.train.schema import UnknownKeyError, from_mapping
from slimtune.train.trackers import IDS_FILE, TRACKERS, flatten, metric_name, missing_package

RUN_CONFIG = {"model": "tiny-llama", "method": "lora", "train": {"lr": 0.01, "adam_betas": [0.9, 0.999]},
              "peft": {"r": 4, "target_modules": "all-linear"}}


def needs(name: str) -> None:
    if (why := missing_package(name)) is not None:
        pytest.skip(why)


def make_trainer(out: Path, trackers: list[str], max_steps: int = 4) -> Trainer:
    cfg = TrainConfig(batch_size=2, max_steps=max_steps, log_every=1, save_every=2, eval_every=2, lr=1e-2,
                      report_to=trackers)
    seed_everything(cfg.seed)
    peft = build_peft_config("lora", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                                      "init_lora_weights": False})
    model = prepare_model(build_llama(None), "lora", peft, gradient_checkpointing=False)
    return Trainer(model, cfg, random_rows(8), random_rows(4, seed=1), pad_collate, out, progress=False,
                   run_config=RUN_CONFIG)


def crash_after_step_3(trainer: Trainer) -> None:
    """Interrupt `trainer` in step 4's forward, after step 3's row was logged (checkpoint: step-2)."""
    calls = {"n": 0}

    def hook(module: torch.nn.Module, args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 4 + 1 + 1:  # 3 steps, 1 eval batch (at step 2), then step 4
            raise KeyboardInterrupt

    trainer.model.register_forward_pre_hook(hook)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()


def expected_series(out: Path) -> dict[str, list[tuple[int, float]]]:
    """{tracker metric name: [(step, value), ...]} from metrics.jsonl."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        for key, value in row.items():
            if key != "step":
                series.setdefault(metric_name(key), []).append((row["step"], float(value)))
    return series


def last_per_step(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The newest value logged at each step (a resumed run logs again the steps after its checkpoint)."""
    return sorted(dict(points).items())


def assert_same_series(got: dict[str, list[tuple[int, float]]], out: Path) -> None:
    expected = expected_series(out)
    assert {"train/loss", "train/lr", "eval/loss", "eval/ppl"} <= set(expected)
    assert set(got) >= set(expected), sorted(set(expected) - set(got))
    for name, points in expected.items():
        assert [s for s, _ in got[name]] == [s for s, _ in points], name
        assert [v for _, v in got[name]] == pytest.approx([v for _, v in points], rel=1e-6), name


def test_unknown_tracker_is_one_error_listing_the_allowed_names() -> None:
    with pytest.raises(ValueError, match=r"train.report_to: unknown tracker 'wandbb'; allowed: "
                                         r"tensorboard, wandb, mlflow, trackio$"):
        from_mapping(TrainConfig, {"report_to": ["tensorboard", "wandbb"]}, "train")
    with pytest.raises(ValueError, match="train.report_to must be a list; got 'wandb'"):
        from_mapping(TrainConfig, {"report_to": "wandb"}, "train")
    with pytest.raises(ValueError, match="names a tracker twice"):
        TrainConfig(report_to=["mlflow", "mlflow"])
    with pytest.raises(UnknownKeyError, match="unknown key 'tensorboard' in section 'train'; did you mean 'report_to'"):
        from_mapping(TrainConfig, {"tensorboard": False}, "train")
    assert TrainConfig().report_to == ["tensorboard"] and TRACKERS == ("tensorboard", "wandb", "mlflow", "trackio")


def test_a_missing_tracker_package_is_one_error_naming_package_and_extra(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an uninstalled package looks like to find_spec
    with pytest.raises(ValueError, match=r"^train.report_to names mlflow, but the mlflow-skinny package is not "
                                         r"installed: pip install mlflow-skinny \(or pip install 'slimtune\[tracking\]'\)$"):
        make_trainer(tmp_path, ["mlflow"])


def test_flatten_gives_dotted_keys() -> None:
    assert flatten(RUN_CONFIG) == {"model": "tiny-llama", "method": "lora", "train.lr": 0.01,
                                   "train.adam_betas": "[0.9, 0.999]", "peft.r": 4, "peft.target_modules": "all-linear"}


def test_tensorboard_scalars_and_config_match_metrics_jsonl(tmp_path: Path) -> None:
    needs("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_trainer(tmp_path, ["tensorboard"]).fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    got = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert_same_series(got, tmp_path)
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "train.lr: 0.01" in config and "peft.r: 4" in config


def test_mlflow_params_and_metric_history_match_metrics_jsonl_across_a_resume(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    needs("mlflow")
    from mlflow import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "report-to-test")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local file store, as in the docs
    out = tmp_path / "run"
    crash_after_step_3(make_trainer(out, ["mlflow"]))
    client = MlflowClient(tracking_uri=uri)
    run_id = json.loads((out / IDS_FILE).read_text())["mlflow"]
    assert client.get_run(run_id).info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]

    make_trainer(out, ["mlflow"]).fit(resume=True)
    assert json.loads((out / IDS_FILE).read_text())["mlflow"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "report-to-test"
    assert run.data.params == {k: str(v) for k, v in flatten(RUN_CONFIG).items()}
    got = {name: last_per_step([(m.step, m.value) for m in client.get_metric_history(run_id, name)])
           for name in run.data.metrics}
    assert_same_series(got, out)
    # step 3 was logged by the crashed run and again after the resume from step-2
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 3, 4]


def wandb_records(run_dir: Path) -> list:
    """The records of an offline W&B run file (LevelDB log format: 32 KiB blocks of crc32, length, type, data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    block, pos, pending, out = 32768, 7, b"", []  # 7: the file header (":W&B", magic, version)
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or length == kind == 0:  # block trailer / zero padding
            pos += left
            continue
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def wandb_history(records: list) -> tuple[dict[str, list[tuple[int, float]]], dict[str, object], str]:
    """(metric series, config, run id) logged in an offline run's records."""
    series: dict[str, list[tuple[int, float]]] = {}
    config: dict[str, object] = {}
    run_id = ""
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_id = r.run.run_id
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    series.setdefault(key, []).append((r.history.step.num, float(json.loads(item.value_json))))
    return series, config, run_id


def test_wandb_offline_history_and_config_match_metrics_jsonl_across_a_resume(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    needs("wandb")
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"), "WANDB_SILENT": "true",
                       "WANDB_PROJECT": "report-to-test", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "wb").mkdir()
    out = tmp_path / "run"
    crash_after_step_3(make_trainer(out, ["wandb"]))
    run_id = json.loads((out / IDS_FILE).read_text())["wandb"]
    make_trainer(out, ["wandb"]).fit(resume=True)
    assert json.loads((out / IDS_FILE).read_text())["wandb"] == run_id

    runs = sorted(glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith(run_id) for r in runs)  # one id: the resume continues that run
    series: dict[str, list[tuple[int, float]]] = {}
    for run_dir in runs:
        got, config, logged_id = wandb_history(wandb_records(Path(run_dir)))
        assert logged_id == run_id
        assert {k: config[k] for k in flatten(RUN_CONFIG)} == flatten(RUN_CONFIG)
        exits = [r.exit.exit_code for r in wandb_records(Path(run_dir)) if r.WhichOneof("record_type") == "exit"]
        assert exits == ([1] if run_dir == runs[0] else [0])
        for name, points in got.items():
            series.setdefault(name, []).extend(points)
    assert_same_series({k: last_per_step(v) for k, v in series.items()}, out)


def test_trackio_local_metrics_and_config_match_metrics_jsonl_across_a_resume(tmp_path: Path) -> None:
    needs("trackio")
    if "trackio" in sys.modules:  # trackio reads TRACKIO_DIR when first imported
        pytest.skip("trackio was imported before this test could point TRACKIO_DIR at a temporary folder")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("TRACKIO_PROJECT", "report-to-test")
    try:
        out = tmp_path / "run"
        crash_after_step_3(make_trainer(out, ["trackio"]))
        name = json.loads((out / IDS_FILE).read_text())["trackio"]
        assert name.startswith("run-")
        make_trainer(out, ["trackio"]).fit(resume=True)
        assert json.loads((out / IDS_FILE).read_text())["trackio"] == name
        from trackio.sqlite_storage import SQLiteStorage

        assert len(SQLiteStorage.get_runs("report-to-test")) == 1  # the resume continued the run
        series: dict[str, list[tuple[int, float]]] = {}
        for entry in SQLiteStorage.get_logs("report-to-test", name):
            for key, value in entry.items():
                if "/" in key and isinstance(value, int | float):
                    series.setdefault(key, []).append((entry["step"], float(value)))
        assert_same_series({k: last_per_step(v) for k, v in series.items()}, out)
        config = SQLiteStorage.get_run_config("report-to-test", name)
        assert {k: config[k] for k in flatten(RUN_CONFIG)} == flatten(RUN_CONFIG)
    finally:
        monkeypatch.undo()


def test_slimtune_train_reports_the_whole_run_config_to_mlflow(tmp_path: Path, tiny_model_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    needs("mlflow")
    from mlflow import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    for key, value in {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "cli", "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
        monkeypatch.setenv(key, value)
    config = golden_config(tmp_path, tiny_model_dir, "lora")
    result = CliRunner().invoke(app, ["train", str(config), "--no-progress", "--train.report_to", "[mlflow]"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "run-lora"
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(json.loads((out / IDS_FILE).read_text())["mlflow"])
    params = run.data.params
    assert params["method"] == "lora" and params["train.lr"] == "0.01" and params["peft.r"] == "4"
    assert params["data.path"] == str(tmp_path / "train.jsonl") and params["train.report_to"] == '["mlflow"]'
    got = {name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
           for name in run.data.metrics}
    assert_same_series(got, out)
    assert not (out / "tensorboard").exists()


def test_only_rank_0_reports_in_a_distributed_run(tmp_path: Path, tiny_model_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    needs("mlflow")
    from mlflow import MlflowClient
    from test_distributed import slimtune_train, write_config

    uri = (tmp_path / "mlruns").as_uri()
    for key, value in {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "ddp", "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
        monkeypatch.setenv(key, value)
    slimtune_train(write_config(tmp_path, tiny_model_dir, "ddp", report_to=["mlflow"]), 2)
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    got = {name: [(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, name)]
           for name in runs[0].data.metrics}
    assert_same_series(got, tmp_path / "ddp")
