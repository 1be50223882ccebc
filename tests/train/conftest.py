"""Fixtures of the training tests (builders live in tiny_run.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_run import build_llama, build_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama + tokenizer folder (what `model:` points at in the run tests)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tokenizer(folder)
    build_llama(folder)
    return folder
