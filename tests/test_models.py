"""`slimtune:` model names: the default model resolves to its cached folder, converted on first use; unknown
names are a clear error; local folders and hub names pass through unchanged."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from slimtune import models
from slimtune.models import DEFAULT_MODEL, DONE_MARKER, check_model_name, resolve_model


def _no_conversion() -> Path:
    raise AssertionError("the cached folder is complete: nothing may be converted")


def test_default_name_resolves_to_the_cached_folder(shipped_model_cache: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "find_smollm2_gguf", _no_conversion)
    assert DEFAULT_MODEL == "slimtune:smollm2-135m-instruct"
    assert resolve_model(DEFAULT_MODEL) == str(shipped_model_cache)


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="converting needs the gguf package")
def test_an_empty_cache_converts_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(gguf_path)
        (out_dir / "config.json").write_text("{}")
        (out_dir / DONE_MARKER).write_text("converted\n")

    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "find_smollm2_gguf", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(models, "_convert_gguf", convert)
    first, second = resolve_model(DEFAULT_MODEL), resolve_model(DEFAULT_MODEL)
    assert first == second == str(tmp_path / "smollm2-135m-instruct")
    assert calls == [tmp_path / "model.gguf"]
    assert (Path(first) / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m-instruct"]  # no temporary folder left


@pytest.mark.parametrize("value", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "./runs/a/merged",
                                   "/models/smollm2-135m-instruct"])
def test_folders_and_hub_names_pass_through(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "find_smollm2_gguf", _no_conversion)
    assert resolve_model(value) == value
    assert resolve_model(Path(value)) == str(Path(value))


@pytest.mark.parametrize("value", ["slimtune:smollm2", "slimtune:", "slimtune:SmolLM2-135M-Instruct"])
def test_unknown_names_list_the_known_ones(value: str) -> None:
    with pytest.raises(ValueError) as err:
        resolve_model(value, key="--model")
    name = value.removeprefix("slimtune:")
    assert str(err.value) == (f"--model={value!r}: no shipped model {name!r}; known names: "
                              "slimtune:smollm2-135m-instruct (or give a local folder or a hub name)")
    with pytest.raises(ValueError, match="no shipped model"):
        check_model_name(value)
