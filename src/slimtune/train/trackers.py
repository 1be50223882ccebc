"""Experiment trackers a run reports to (`train.report_to`): TensorBoard, Weights & Biases, MLflow, Trackio.

Each tracker's library is optional and imported only when the run names it. A tracker receives the run
config once, flattened to dotted keys (`train.lr`), and every metrics row at its step, under the names
TensorBoard shows: `train/<key>` for training rows, `eval/<key>` for `eval_<key>`. Where a run is continued
from a checkpoint, each tracker continues its run: TensorBoard drops the events after the checkpoint's step,
W&B and MLflow reopen the run whose id the run folder keeps in `.trackers.json`, Trackio the run of that name.
Which project or experiment a run goes to is each library's own setting (WANDB_PROJECT,
MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME, TRACKIO_PROJECT; "slimtune" when unset).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
"""The names `train.report_to` takes."""

# tracker -> (module whose presence means it is installed, pip package, slimtune extra that installs it)
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard", "logging"), "wandb": ("wandb", "wandb", "tracking"),
             "mlflow": ("mlflow", "mlflow-skinny", "tracking"), "trackio": ("trackio", "trackio", "tracking")}
IDS_FILE = ".trackers.json"
DEFAULT_PROJECT = "slimtune"


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self, failed: bool) -> None: ...


def check_names(names: list[str]) -> None:
    """Raise ValueError for a name that is not a tracker, or one named twice."""
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"train.report_to: unknown tracker {name!r}; allowed: {', '.join(TRACKERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"train.report_to names a tracker twice: {names}")


def missing_package(name: str) -> str | None:
    """The one-line error for tracker `name` when its library is not installed, else None."""
    module, package, extra = _PACKAGES[name]
    if importlib.util.find_spec(module) is not None:
        return None
    return (f"train.report_to names {name}, but the {package} package is not installed: "
            f"pip install {package} (or pip install 'slimtune[{extra}]')")


def require_installed(names: list[str]) -> None:
    """Raise ValueError naming the first tracker of `names` whose library is missing (tensorboard, on by
    default, is only skipped with a notice when it is missing)."""
    for name in names:
        if name != "tensorboard" and (message := missing_package(name)) is not None:
            raise ValueError(message)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}; lists and None become their JSON text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, bool | int | float | str):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = json.dumps(value, default=str)
    return out


def metric_name(key: str) -> str:
    """The name a metrics.jsonl key is reported under: eval_loss -> eval/loss, loss -> train/loss."""
    return f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"


def row_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row (not its step), named by metric_name."""
    return {metric_name(k): float(v) for k, v in row.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


def open_trackers(names: list[str], output_dir: Path, config: Mapping[str, Any], resuming: bool,
                  last_step: int | None, console: Console) -> list[Tracker]:
    """Start (or, when `resuming`, continue) each named tracker's run for the run folder `output_dir`.

    `last_step` is the step of the newest row already logged (the checkpoint's), None for a new run.
    """
    ids_path = output_dir / IDS_FILE
    if not resuming:  # a new run never continues the tracker runs of an earlier one in this folder
        ids_path.unlink(missing_ok=True)
    ids = _read_ids(ids_path) if resuming else {}
    params = flatten(config)
    opened: list[Tracker] = []
    try:
        for name in names:
            tracker = _OPEN[name](output_dir, params, ids.get(name), last_step, console)
            if tracker is not None:
                opened.append(tracker)
                if (run_id := getattr(tracker, "run_id", None)) is not None:
                    ids[name] = run_id
    except BaseException:
        for tracker in opened:
            tracker.close(failed=True)
        raise
    if ids:
        ids_path.write_text(json.dumps(ids, indent=2) + "\n")
    return opened


def _read_ids(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        ids = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the trackers' run ids ({err}); delete the file to start new "
                         "tracker runs") from None
    if not isinstance(ids, dict) or not all(isinstance(v, str) for v in ids.values()):
        raise ValueError(f"{path} must map tracker names to run ids, got {ids!r}; delete the file to start new "
                         "tracker runs")
    return ids


class TensorBoardTracker:
    def __init__(self, writer: Any):
        self.writer = writer

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


def _tensorboard(output_dir: Path, params: dict[str, Any], run_id: str | None, last_step: int | None,
                 console: Console) -> TensorBoardTracker | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # on by default: a plain install trains without it
        console.print("[yellow]tensorboard is not installed: skipping TensorBoard logs "
                      "(pip install tensorboard)[/yellow]")
        return None
    # purge_step drops events an interrupted run wrote after the checkpoint we resume from.
    writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=None if last_step is None else last_step + 1)
    if last_step is None:
        writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))
    return TensorBoardTracker(writer)


class WandbTracker:
    def __init__(self, run: Any):
        self.run, self.run_id = run, run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _wandb(output_dir: Path, params: dict[str, Any], run_id: str | None, last_step: int | None,
           console: Console) -> WandbTracker:
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, name=output_dir.name, id=run_id,
                     resume="allow" if run_id else None, dir=None if os.environ.get("WANDB_DIR") else str(output_dir),
                     reinit="create_new")
    run.config.update(params, allow_val_change=True)  # a resumed run may change keys (run.report_config_changes)
    return WandbTracker(run)


class MlflowTracker:
    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _mlflow(output_dir: Path, params: dict[str, Any], run_id: str | None, last_step: int | None,
            console: Console) -> MlflowTracker:
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient()  # MLFLOW_TRACKING_URI, else mlflow's local default
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return MlflowTracker(client, run_id)  # params are kept from the run's start (mlflow never changes them)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name=output_dir.name)
    items = [Param(k, str(v)) for k, v in params.items()]
    for start in range(0, len(items), 100):  # mlflow takes at most 100 params a batch
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    return MlflowTracker(client, run.info.run_id)


class TrackioTracker:
    def __init__(self, run: Any, name: str):
        self.run, self.run_id = run, name

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish()


def _trackio(output_dir: Path, params: dict[str, Any], run_id: str | None, last_step: int | None,
             console: Console) -> TrackioTracker:
    import trackio

    name = run_id or f"{output_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = trackio.init(project=os.environ.get("TRACKIO_PROJECT") or DEFAULT_PROJECT, name=name, config=params,
                       resume="allow" if run_id else "never", embed=False)
    return TrackioTracker(run, name)


_OPEN = {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow, "trackio": _trackio}
