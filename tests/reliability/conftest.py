"""Fixtures of the reliability suite: rows and a baseline run per session (the tiny model folder,
`tiny_model_dir`, comes from tests/conftest.py); counters printed at the end."""

from __future__ import annotations

from pathlib import Path

import pytest
from reliability_tools import EXAMPLES_RUN, FAULT_STATS, run_train, write_run_config
from tiny_run import write_alpaca


@pytest.fixture(scope="session")
def tiny_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_alpaca(tmp_path_factory.mktemp("rel-rows") / "rows.jsonl", 12)


@pytest.fixture(scope="session")
def baseline(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_rows: Path) -> Path:
    """The uninterrupted 64-step run every fault test compares with (all checkpoints kept: step-N of any
    shorter run of the same config must equal its step-N)."""
    root = tmp_path_factory.mktemp("baseline")
    config = write_run_config(root, tiny_model_dir, tiny_rows, root / "run", keep_checkpoints=1000)
    done = run_train(config)
    assert done.returncode == 0, done.stderr
    return root / "run"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if EXAMPLES_RUN:
        terminalreporter.write_line("fuzz examples per target: " + ", ".join(
            f"{k}={v}" for k, v in sorted(EXAMPLES_RUN.items())))
    if FAULT_STATS:
        terminalreporter.write_line("fault injection: " + ", ".join(f"{k}={v}" for k, v in FAULT_STATS.items()))
