"""Shared helpers of the reliability suite: tiny training runs through the real CLI in a subprocess,
checkpoint inspection, fuzz budgets with example counters, and a wall-clock limit for one call.

Nothing here is a test; tests/reliability/test_*.py use it (tests/conftest.py puts this folder on sys.path).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from hypothesis import HealthCheck, settings
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]

# ---- fuzz budgets ------------------------------------------------------------------------------------
FUZZ_ENV = "SLIMTUNE_FUZZ_EXAMPLES"
"""Set to an integer to run that many examples per fuzz target instead of the CI budget."""

EXAMPLES_RUN: collections.Counter[str] = collections.Counter()
"""target name -> examples executed in this session (printed by conftest's terminal summary)."""


def fuzz_settings(ci_examples: int) -> settings:
    """Hypothesis settings of one fuzz target: fixed example count, derandomized, no deadline."""
    n = int(os.environ.get(FUZZ_ENV) or ci_examples)
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])


FAULT_STATS: dict[str, object] = {}
"""Figures of the kill/resume test (kills, where they landed, resumes), printed by conftest."""


def count(target: str) -> None:
    EXAMPLES_RUN[target] += 1


class Hang(Exception):
    """A call ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise Hang in the main thread if the block runs longer than `seconds` (SIGALRM)."""

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---- tiny runs through the CLI ---------------------------------------------------------------------------
def write_run_config(root: Path, model_dir: Path, rows: Path, output_dir: Path, **train: object) -> Path:
    """A LoRA run YAML on the tiny Llama: dropout on (RNG state matters), fp32 CPU, no TensorBoard.

    The schedule is warmup then constant, so the first N steps of a longer run equal an N-step run.
    """
    raw = {
        "model": str(model_dir), "method": "lora",
        "peft": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.1},
        "data": {"path": str(rows), "eval_split": 0.0},
        "train": {"max_steps": 64, "batch_size": 2, "lr": 5.0e-3, "scheduler": "constant", "warmup_steps": 4, "max_seq_len": 48, "seed": 3, "log_every": 1,
                  "save_every": 1, "keep_checkpoints": 2, "precision": "fp32", "device": "cpu",
                  "report_to": [], **train},
        "output_dir": str(output_dir),
    }
    path = root / f"{output_dir.name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def cli_env() -> dict[str, str]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT / "src"))
    env.pop("SLIMTUNE_DEBUG", None)
    return env


def start_train(config: Path, *args: str, stderr: int | None = subprocess.PIPE) -> subprocess.Popen[bytes]:
    """`slimtune train CONFIG --no-progress ARGS` in a new process (killable with SIGKILL)."""
    return subprocess.Popen([sys.executable, "-m", "slimtune", "train", str(config), "--no-progress", *args],
                            stdout=subprocess.DEVNULL, stderr=stderr, env=cli_env(), cwd=str(ROOT))


def run_train(config: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "slimtune", "train", str(config), "--no-progress", *args],
                          capture_output=True, text=True, env=cli_env(), cwd=str(ROOT), timeout=timeout)


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


# ---- checkpoint inspection --------------------------------------------------------------------------------
def check_checkpoint_loadable(folder: Path) -> int:
    """Verify a complete checkpoint (sizes and sha256 of its files, its trainer state, finite weights) and
    load every file its manifest lists, as resume would; return its step."""
    from slimtune.train.checkpoint import verify_checkpoint

    verify_checkpoint(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in manifest["files"]:
        path = folder / name
        assert path.is_file(), f"{folder.name}: manifest lists {name}, which is missing"
        if name.endswith(".safetensors"):
            load_file(str(path))
        elif name.endswith(".pt"):
            torch.load(path, map_location="cpu", weights_only=True)
        elif name.endswith(".json"):
            json.loads(path.read_text())
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == manifest["step"] == int(folder.name.split("-")[1])
    return int(manifest["step"])


def checkpoint_dirs(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """(complete step-N folders, every other entry) under run_dir/checkpoints."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return [], []
    complete, other = [], []
    for p in sorted(root.iterdir()):
        (complete if p.name.startswith("step-") and (p / "manifest.json").is_file() else other).append(p)
    return complete, other


# ---- forked launches (see reliability_zygote.py) ------------------------------------------------------------
class Zygote:
    """A warm parent process that forks `slimtune` CLI children; use as a context manager."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.launches = 0
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("reliability_zygote.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=cli_env(), cwd=str(ROOT),
                                     text=True)
        assert json.loads(self._readline(180)).get("ready")

    def _readline(self, timeout: float) -> str:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"fork server gave no answer within {timeout} s")
        return self.proc.stdout.readline()

    def ask(self, request: dict[str, object], timeout: float = 30) -> dict[str, object]:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._readline(timeout))

    def train(self, config: Path, *args: str) -> ForkedRun:
        """Fork `slimtune train CONFIG --no-progress ARGS`; its stderr goes to a file in workdir."""
        self.launches += 1
        stderr = self.workdir / f"launch-{self.launches}.stderr"
        pid = self.ask({"op": "run", "argv": ["train", str(config), "--no-progress", *args], "stderr": str(stderr)})
        return ForkedRun(self, int(pid["pid"]), stderr)

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class ForkedRun:
    """A forked CLI child, with the part of Popen's interface the kill test uses."""

    def __init__(self, zygote: Zygote, pid: int, stderr: Path) -> None:
        self.zygote, self.pid, self.stderr = zygote, pid, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit code once the child has ended (a zombie counts as ended), else None."""
        if self.returncode is None:
            try:
                state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, IndexError):
                state = "Z"
            if state in ("Z", "X"):
                self.returncode = int(self.zygote.ask({"op": "wait", "pid": self.pid})["code"])
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def communicate(self, timeout: float) -> tuple[None, bytes]:
        if self.returncode is None:
            self.returncode = int(self.zygote.ask({"op": "wait", "pid": self.pid}, timeout=timeout)["code"])
        return None, self.stderr.read_bytes()
