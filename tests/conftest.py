import os
import sys
from pathlib import Path

import pytest
import torch

# Test helper modules (tiny_models, tiny_tokenizer, ...) import by plain name from any tests/ folder.
_HERE = Path(__file__).parent
for folder in [_HERE, *sorted(p for p in _HERE.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))]:
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Without CUDA, Triton kernels run under its interpreter. Triton before 3.9 reads TRITON_INTERPRET when a
# kernel is defined, so it is set here, before any test module imports slimtune.kernels (and so triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny_run import build_llama, build_tokenizer  # noqa: E402  (tests/train, on sys.path from here on)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama (hidden 32, 2 layers) + byte-level ChatML tokenizer folder, what `model:` points at in
    the training, CLI and reliability tests; built once per session (tests that change it work on a copy)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tokenizer(folder)
    build_llama(folder)
    return folder


@pytest.fixture
def shipped_model_cache(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`slimtune:smollm2-135m-instruct` resolves to a copy of the tiny model: SLIMTUNE_CACHE points at a tmp
    folder holding it as an already converted default model (done-marker written), so nothing converts."""
    import shutil

    from slimtune.models import DEFAULT_MODEL_NAME, DONE_MARKER

    cache = tmp_path / "slimtune-cache"
    folder = shutil.copytree(tiny_model_dir, cache / DEFAULT_MODEL_NAME)
    (folder / DONE_MARKER).write_text("a tiny stand-in for the tests\n", encoding="utf-8")
    monkeypatch.setenv("SLIMTUNE_CACHE", str(cache))
    return folder
