"""kill -9 of `slimtune train` (the real CLI, in a subprocess) at 20 points after its first checkpoint,
each followed by `--resume`: the run always resumes, every checkpoint on disk is complete and loadable
(or an ignored leftover), and the final adapter and every logged row (all but the timing fields) equal
an uninterrupted run's bit for bit. The same holds when save_every does not line up with log_every (the
checkpoint carries the steps not logged yet), and a run resumed with a longer max_steps follows the
longer schedule from its first resumed step.

# Note: where the kills land
Checkpoints are written every step (save_every 1), so about half of the training time is spent inside
`save_checkpoint`. Kill times alternate between two strategies, both from a fixed-seed RNG:
  random   SIGKILL at a uniformly random delay (0-250 ms) after the launch made progress;
  mid-save a watcher polls the checkpoints folder (every ~1 ms) and sends SIGKILL 0-30 ms after a new
           `.tmp-step-N` folder appears, i.e. while a checkpoint is being written.
After each kill, the folder says where it landed: a `.tmp-step-N` newer than every complete checkpoint
is a kill inside a save (with or without its manifest yet), `.tmp-adapter`/`.old-adapter` a kill
inside the final adapter swap, a `.deleting-step-N` or more complete checkpoints than `keep_checkpoints` a
kill inside pruning.
The counts are printed at the end of the session (conftest) and recorded in docs/reliability.md.
"""

from __future__ import annotations

import json
import random
import re
import signal
import time
from pathlib import Path

import pytest
from reliability_tools import (
    FAULT_STATS,
    ForkedRun,
    Zygote,
    adapter_tensors,
    assert_same_tensors,
    check_checkpoint_loadable,
    checkpoint_dirs,
    write_run_config,
)

KILLS = 20
KEEP = 2
_TMP_STEP = re.compile(r"^\.tmp-step-(\d+)$")
TIMING = ("tokens_per_s", "memory_gb")  # wall-clock and memory figures: the only fields allowed to differ


def logged_rows(run_dir: Path) -> list[dict[str, object]]:
    """Every metrics.jsonl row (train and eval) without its timing fields."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def newest_step(run_dir: Path) -> int:
    complete, _ = checkpoint_dirs(run_dir)
    return max((int(p.name.split("-")[1]) for p in complete), default=0)


def wait_for_progress(proc: ForkedRun, run_dir: Path, after: int, timeout: float = 120) -> bool:
    """Wait until a checkpoint newer than step `after` is complete; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if newest_step(run_dir) > after:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError(f"no new checkpoint after step {after} within {timeout} s")


def kill_mid_save(proc: ForkedRun, run_dir: Path, rng: random.Random) -> None:
    """SIGKILL shortly after a new checkpoint write starts (a .tmp-step-N newer than every complete one)."""
    ckpts = run_dir / "checkpoints"
    while proc.poll() is None:
        newest = newest_step(run_dir)
        try:
            names = [p.name for p in ckpts.iterdir()]
        except FileNotFoundError:
            names = []
        if any((m := _TMP_STEP.match(n)) and int(m.group(1)) > newest for n in names):
            time.sleep(rng.uniform(0.0, 0.03))
            proc.send_signal(signal.SIGKILL)
            return
        time.sleep(0.001)


def where_it_landed(run_dir: Path) -> str:
    complete, other = checkpoint_dirs(run_dir)
    newest = max((int(p.name.split("-")[1]) for p in complete), default=0)
    for p in other:
        m = _TMP_STEP.match(p.name)
        if m and int(m.group(1)) > newest:
            return "mid_save_after_manifest" if (p / "manifest.json").exists() else "mid_save_before_manifest"
    if (run_dir / ".tmp-adapter").exists() or (run_dir / ".old-adapter").exists():
        return "mid_final_adapter_save"
    if len(complete) > KEEP or any(p.name.startswith(".deleting-") for p in other):
        return "mid_prune"
    return "between_saves"


def check_on_disk(run_dir: Path) -> None:
    """Every complete checkpoint loads (newest first: what --resume uses); anything else under checkpoints/
    is a leftover resume ignores: hidden (.tmp-step-N, .deleting-step-N) or without a manifest."""
    complete, other = checkpoint_dirs(run_dir)
    assert complete, "a kill after the first checkpoint left no complete checkpoint"
    for folder in reversed(complete):
        check_checkpoint_loadable(folder)
    for p in other:
        assert p.name.startswith(".") or not (p / "manifest.json").exists(), p


def kill_chain(zygote: Zygote, run_dir: Path, config: Path, rng: random.Random, budget: int,
               landed: dict[str, int]) -> tuple[int, int]:
    """Launch, kill, resume ... until `budget` kills are spent, then resume to the end; (kills, resumes)."""
    kills = resumes = 0
    resume: list[str] = []
    while True:
        before = newest_step(run_dir)
        proc = zygote.train(config, *resume)
        if kills < budget and wait_for_progress(proc, run_dir, before):
            if kills % 2 == 0:
                time.sleep(rng.uniform(0.0, 0.25))
                proc.send_signal(signal.SIGKILL)
            else:
                kill_mid_save(proc, run_dir, rng)
        _, err = proc.communicate(timeout=240)
        text = err.decode(errors="replace")
        if resume:
            assert "resuming from" in text and "Not resuming from it" not in text, text[-2000:]
        if proc.returncode == 0:  # ran to the end (the last launch, or it finished before the kill)
            return kills, resumes
        assert proc.returncode == -signal.SIGKILL, text[-2000:]  # a resume never fails on its own
        kills += 1
        place = where_it_landed(run_dir)
        landed[place] = landed.get(place, 0) + 1
        check_on_disk(run_dir)
        resume = ["--resume"]
        resumes += 1


def test_kill_9_at_random_points_then_resume_is_bit_exact(tmp_path: Path, tiny_model_dir: Path, tiny_rows: Path,
                                                          baseline: Path) -> None:
    rng = random.Random(20240909)
    landed: dict[str, int] = {}
    kills = resumes = chains = 0
    with Zygote(tmp_path) as zygote:
        while kills < KILLS:
            chains += 1
            run_dir = tmp_path / f"chain-{chains}"
            config = write_run_config(tmp_path, tiny_model_dir, tiny_rows, run_dir)
            k, r = kill_chain(zygote, run_dir, config, rng, KILLS - kills, landed)
            kills, resumes = kills + k, resumes + r
            assert_same_tensors(adapter_tensors(run_dir), adapter_tensors(baseline))
            assert logged_rows(run_dir) == logged_rows(baseline)
            assert not [p for p in checkpoint_dirs(run_dir)[1] if p.name.startswith(".tmp-step-")]
    mid_save = sum(v for k, v in landed.items() if k.startswith("mid_save"))
    FAULT_STATS.update(kills=kills, kills_mid_save=mid_save, resumes=resumes, resumes_ok=resumes, chains=chains,
                       launches=zygote.launches, **landed)
    print(f"\nkills={kills} resumes={resumes} chains={chains} landed={landed}")
    assert kills >= KILLS and mid_save >= 3, landed


def _uninterrupted(zygote: Zygote, root: Path, tiny_model_dir: Path, tiny_rows: Path, **train: object) -> Path:
    root.mkdir()
    config = write_run_config(root, tiny_model_dir, tiny_rows, root / "run", **train)
    proc = zygote.train(config)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return root / "run"


def test_kill_9_when_saves_and_logs_do_not_line_up_keeps_every_row(tmp_path: Path, tiny_model_dir: Path,
                                                                   tiny_rows: Path) -> None:
    """save_every 2, log_every 3: most checkpoints fall inside a metrics window, whose steps they carry."""
    cadence = {"max_steps": 24, "log_every": 3, "save_every": 2}
    rng = random.Random(20240910)
    landed: dict[str, int] = {}
    with Zygote(tmp_path) as zygote:
        baseline = _uninterrupted(zygote, tmp_path / "baseline", tiny_model_dir, tiny_rows, **cadence)
        run_dir = tmp_path / "chain"
        config = write_run_config(tmp_path, tiny_model_dir, tiny_rows, run_dir, **cadence)
        kills, _ = kill_chain(zygote, run_dir, config, rng, 4, landed)
    assert kills >= 1, landed
    assert_same_tensors(adapter_tensors(run_dir), adapter_tensors(baseline))
    assert logged_rows(run_dir) == logged_rows(baseline)
    assert [r["step"] for r in logged_rows(run_dir)] == list(range(3, 25, 3))
    FAULT_STATS.update(misaligned_kills=kills, misaligned_rows_equal=True)


@pytest.mark.parametrize("stop", ["killed", "finished"])
def test_resume_with_a_longer_max_steps_follows_the_longer_schedule_from_its_first_step(
        tmp_path: Path, tiny_model_dir: Path, tiny_rows: Path, stop: str) -> None:
    """Note: the schedule of a resumed run (train/optim.py): the lr of every resumed step is the longer
    schedule's, as if the run had been configured with it from the start; the steps before keep theirs."""
    schedule = {"scheduler": "linear", "warmup_steps": 2, "log_every": 1, "save_every": 1}
    with Zygote(tmp_path) as zygote:
        short = _uninterrupted(zygote, tmp_path / "short", tiny_model_dir, tiny_rows, max_steps=12, **schedule)
        long = _uninterrupted(zygote, tmp_path / "long", tiny_model_dir, tiny_rows, max_steps=24, **schedule)
        run_dir = tmp_path / "run"
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        first = write_run_config(tmp_path / "a", tiny_model_dir, tiny_rows, run_dir, max_steps=12, **schedule)
        proc = zygote.train(first)
        if stop == "killed":
            assert wait_for_progress(proc, run_dir, 3)
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=240)
        resumed_at = newest_step(run_dir)
        longer = write_run_config(tmp_path / "b", tiny_model_dir, tiny_rows, run_dir, max_steps=24, **schedule)
        proc = zygote.train(longer, "--resume")
        _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0 and f"(step {resumed_at})" in err.decode(), err.decode(errors="replace")[-2000:]
    rows = logged_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert rows[:resumed_at] == logged_rows(short)[:resumed_at]  # what was trained stays as it was
    assert [r["lr"] for r in rows[resumed_at:]] == [r["lr"] for r in logged_rows(long)[resumed_at:]]
    assert rows[resumed_at]["lr"] > 0.0  # not the 12-step schedule's final lr
    FAULT_STATS[f"longer_schedule_{stop}_at"] = resumed_at
