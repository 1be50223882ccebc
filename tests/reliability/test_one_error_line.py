"""What users do ends in one `error:` line naming the file, never a traceback: a truncated base model in
`train` and `chat`, a 4-bit shard index that is empty, not an object, or points outside the model folder,
a full disk while the tokenizer of the final adapter is written, and data rows holding a lone surrogate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from reliability_tools import count, write_run_config
from typer.testing import CliRunner

from slimtune.cli.main import app


def _one_line(result) -> str:
    text = " ".join(result.output.split())
    assert result.exit_code in (1, 2) and "Traceback" not in result.output, result.output
    assert text.count("error:") == 1, result.output  # one line, the last: what ran before may have spoken
    text = text[text.index("error:"):]
    count("one_error_line")
    return text


@pytest.mark.parametrize("command", ["train", "chat"])
def test_truncated_base_model(tmp_path: Path, tiny_model_dir: Path, tiny_rows: Path, command: str) -> None:
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted download
    config = write_run_config(tmp_path, model, tiny_rows, tmp_path / "run", max_steps=1)
    args = ["train", str(config), "--no-progress"] if command == "train" else ["chat", "--model", str(model)]
    assert "cannot load" in _one_line(CliRunner().invoke(app, args, input="hi\n"))


@pytest.mark.parametrize("index", [{}, [], {"weight_map": {}}, {"weight_map": {"x": "../model.safetensors"}},
                                   {"weight_map": {"x": "/etc/passwd"}}, {"weight_map": {"x": 3}}])
def test_4bit_shard_index(tmp_path: Path, tiny_model_dir: Path, index: object) -> None:
    from slimtune.quant import load_model

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    count("one_error_line")
    with pytest.raises(ValueError, match="model.safetensors.index.json: (expected an object|shard)"):
        load_model(model, compute_dtype=torch.float32, device="cpu")


def test_disk_full_while_the_tokenizer_of_the_final_adapter_is_written(tmp_path: Path, tiny_model_dir: Path,
                                                                       tiny_rows: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import PreTrainedTokenizerBase

    def full(*args: object, **kwargs: object) -> None:
        raise Exception("No space left on device (os error 28)")  # what the tokenizers writer raises

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full)
    config = write_run_config(tmp_path, tiny_model_dir, tiny_rows, tmp_path / "run", max_steps=2, save_every=1)
    text = _one_line(CliRunner().invoke(app, ["train", str(config), "--no-progress"]))
    assert "No space left on device" in text and "--resume" in text and "checkpoints/step-2" in text, text
    assert not (tmp_path / "run" / ".tmp-adapter").exists()


@pytest.mark.parametrize("skip", [False, True])
def test_a_lone_surrogate_in_a_row(tmp_path: Path, tiny_model_dir: Path, tiny_rows: Path, skip: bool) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(tiny_rows.read_text() + '{"instruction": "say \\ud800 now", "output": "ok"}\n')
    config = write_run_config(tmp_path, tiny_model_dir, rows, tmp_path / "run", max_steps=1)
    args = ["data", "inspect", str(config), *(["--data.skip_bad_rows", "true"] if skip else [])]
    result = CliRunner().invoke(app, args)
    if skip:
        assert result.exit_code == 0 and "Traceback" not in result.output, result.output
        return
    assert "lone surrogate U+D800" in _one_line(result)


@pytest.mark.parametrize(("method", "key"), [("prompt_tuning", "num_virtual_tokens"),
                                             ("prefix_tuning", "num_virtual_tokens"), ("lora", "r")])
def test_adapter_too_large_to_allocate(tmp_path: Path, tiny_model_dir: Path, tiny_rows: Path, method: str,
                                       key: str) -> None:
    import yaml

    config = write_run_config(tmp_path, tiny_model_dir, tiny_rows, tmp_path / "run", max_steps=1)
    raw = yaml.safe_load(config.read_text())
    raw.update(method=method, peft={key: 10**13})  # ~10**14 floats and more: no allocator has them
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    text = _one_line(CliRunner().invoke(app, ["train", str(config), "--no-progress"]))
    assert "does not fit in memory" in text and "lower r (or num_virtual_tokens)" in text, text
    assert not (tmp_path / "run" / "adapter").exists()
