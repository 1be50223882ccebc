"""The CLI tests reuse the tiny-model builders of tests/train (tiny_run.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

from tiny_run import build_llama, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama + ChatML tokenizer folder, what `model:` points at."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tokenizer(folder)
    build_llama(folder)
    return folder
