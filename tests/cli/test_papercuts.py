"""What a new user meets first, through the real CLI on the tiny model: --version, the loss mask without
colour, the files named by train's done line, which model eval is scoring, a QLoRA adapter folder that keeps
its 4-bit base when copied elsewhere, the qlora-on-CPU warning and suggestions for mistyped keys."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from tiny_chat import tiny_chat  # noqa: F401  (session fixture: tiny base + adapters on disk)
from tiny_run import golden_config
from typer.testing import CliRunner

from slimtune.adapter_base import BASE_FILE, read_base_quantization
from slimtune.cli.main import app
from slimtune.infer.loading import load_for_inference
from slimtune.train.schema import closest_key

CPU_WARNING = "warning: qlora on CPU is slower than lora"


def invoke(*args: str, env: dict[str, str | None] | None = None, input: str | None = None):
    return CliRunner().invoke(app, list(args), env=env, input=input)


def test_version_prints_the_installed_version() -> None:
    out = subprocess.run([sys.executable, "-m", "slimtune", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"slimtune {version('slimtune')}\n"


@pytest.mark.parametrize("env", [{}, {"NO_COLOR": "1", "FORCE_COLOR": "1"}], ids=["piped", "no-color-terminal"])
def test_data_inspect_marks_trained_tokens_in_plain_text(tmp_path: Path, tiny_model_dir: Path,
                                                         env: dict[str, str]) -> None:
    config = golden_config(tmp_path, tiny_model_dir, "lora")
    result = invoke("data", "inspect", str(config), "--sample", "0", env=env)
    assert result.exit_code == 0, result.output
    assert "\x1b[" not in result.output
    assert "sample (text inside ⟦ ⟧ is trained (loss-bearing); the rest is masked, no loss):" in result.output
    sample = result.output.split("no loss):\n", 1)[1]
    trained = re.findall(r"⟦(.*?)⟧", sample, flags=re.S)
    # the assistant's answer and its end-of-turn token are trained; the user's turn is not
    assert len(trained) == 1 and trained[0].startswith("food made of flour") and "<|im_end|>" in trained[0]
    assert "What does bread mean?" in sample.split("⟦")[0]


def test_data_inspect_keeps_colour_on_a_colour_terminal(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = golden_config(tmp_path, tiny_model_dir, "lora")
    result = invoke("data", "inspect", str(config), env={"FORCE_COLOR": "1", "NO_COLOR": None})
    assert result.exit_code == 0, result.output
    assert "⟦" not in result.output and "\x1b[1;32mfood made of flour" in result.output


def test_train_done_line_names_every_file_written(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = golden_config(tmp_path, tiny_model_dir, "lora")
    result = invoke("train", str(config), "--no-progress")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run-lora"
    done = [line for line in result.output.splitlines() if line.startswith("done:")]
    assert len(done) == 1, result.output
    listed = done[0].split(" holds ", 1)[1].split(", ")
    on_disk = {f"{p.name}/" if p.is_dir() else p.name for p in run.iterdir() if not p.name.startswith(".")}
    assert set(listed) == on_disk
    assert {"adapter/", "checkpoints/", "config.yaml", "loss.png", "metrics.jsonl", "README.md"} <= on_disk
    assert CPU_WARNING not in result.output  # lora: no qlora warning


def test_eval_progress_names_the_model_it_scores(tiny_chat, tmp_path: Path) -> None:  # noqa: F811
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hello"},
                                             {"role": "assistant", "content": "Hello there!"}]}) + "\n")
    common = ["--data", str(data), "--max-new-tokens", "2", "--device", "cpu"]
    both = invoke("eval", "--model", str(tiny_chat.base), "--adapter", str(tiny_chat.adapters["beta"]),
                  "--output", str(tmp_path / "both"), *common)
    assert both.exit_code == 0, both.output
    lines = [line for line in both.output.splitlines() if line.startswith("scoring the ")]
    assert lines == ["scoring the base model (adapter off): perplexity on 1 examples",
                     "scoring the base model (adapter off): generating 1 answers",
                     "scoring the tuned model (base + adapter): perplexity on 1 examples",
                     "scoring the tuned model (base + adapter): generating 1 answers"]
    alone = invoke("eval", "--model", str(tiny_chat.base), "--output", str(tmp_path / "alone"), *common)
    assert alone.exit_code == 0, alone.output
    assert "scoring the model (no adapter given): perplexity on 1 examples" in alone.output


def _count_4bit(model: torch.nn.Module) -> int:
    return sum(type(m).__name__ == "Linear4bit" for m in model.modules())


def test_qlora_adapter_keeps_its_4bit_base_outside_the_run_folder(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = golden_config(tmp_path, tiny_model_dir, "qlora")
    result = invoke("train", str(config), "--no-progress", "--train.max_steps", "1", "--train.save_every", "1")
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if CPU_WARNING in line]
    assert len(warning) == 1 and "consider method: lora" in warning[0] and "dequantizes" in warning[0]

    moved = tmp_path / "elsewhere" / "my-adapter"
    shutil.copytree(tmp_path / "run-qlora" / "adapter", moved)
    assert json.loads((moved / BASE_FILE).read_text()) == {"quantization": "nf4", "double_quant": True}
    in_run = load_for_inference(str(tiny_model_dir), {"a": tmp_path / "run-qlora" / "adapter"}, device="cpu")
    loaded = load_for_inference(str(tiny_model_dir), {"a": moved}, device="cpu")
    assert _count_4bit(loaded.model) == _count_4bit(in_run.model) == 14  # 7 projections x 2 layers
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, in_run.model(input_ids=ids).logits)

    from_checkpoint = tmp_path / "elsewhere" / "step-1-adapter"  # a checkpoint's adapter carries it too
    shutil.copytree(tmp_path / "run-qlora" / "checkpoints" / "step-1" / "adapter", from_checkpoint)
    assert _count_4bit(load_for_inference(str(tiny_model_dir), {"a": from_checkpoint}, device="cpu").model) == 14

    (moved / BASE_FILE).unlink()  # without the record, nothing says the base was 4-bit
    assert _count_4bit(load_for_inference(str(tiny_model_dir), {"a": moved}, device="cpu").model) == 0


def test_hf_peft_loads_an_adapter_folder_with_the_record(tmp_path: Path, tiny_model_dir: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    config = golden_config(tmp_path, tiny_model_dir, "lora")
    assert invoke("train", str(config), "--no-progress", "--train.max_steps", "1").exit_code == 0
    adapter = tmp_path / "run-lora" / "adapter"
    assert read_base_quantization(adapter).quantization == "none"
    ours = load_for_inference(str(tiny_model_dir), {"a": adapter}, device="cpu")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(base, adapter).eval()
    assert not [w for w in caught if "base_quantization" in str(w.message) or "Unexpected" in str(w.message)]
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours.model(input_ids=ids).logits)


def test_mistyped_override_and_yaml_key_get_the_real_key(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = golden_config(tmp_path, tiny_model_dir, "lora")
    typo = invoke("train", str(config), "--train.learning_rate", "1e-4")
    assert typo.exit_code == 2
    assert ("unknown override --train.learning_rate: section 'train' has no key 'learning_rate'; "
            "did you mean --train.lr?") in " ".join(typo.output.split())
    section = invoke("train", str(config), "--trian.lr", "1e-4")
    assert section.exit_code == 2 and "did you mean --train.lr?" in " ".join(section.output.split())
    peft_typo = invoke("train", str(config), "--peft.lora_r", "8")
    assert peft_typo.exit_code == 2 and "did you mean --peft.r?" in " ".join(peft_typo.output.split())

    text = config.read_text().replace("  lr: 0.01", "  learning_rate: 0.01")
    assert text != config.read_text()
    config.write_text(text)
    in_yaml = invoke("train", str(config))
    assert in_yaml.exit_code == 2
    assert (f"{config}: unknown key 'learning_rate' in section 'train'; did you mean 'lr'?"
            in " ".join(in_yaml.output.split()))


@pytest.mark.parametrize(("typed", "meant"), [
    ("learning_rate", "lr"), ("gradient_accumulation_steps", "grad_accum"), ("num_train_epochs", "epochs"),
    ("per_device_train_batch_size", "batch_size"), ("max_seq_length", "max_seq_len"), ("weight_decy", "weight_decay"),
    ("lr_scheduler_type", "scheduler"), ("logging_steps", "log_every"), ("save_steps", "save_every"),
    ("eval_steps", "eval_every"), ("save_total_limit", "keep_checkpoints"), ("bf16", "precision"),
    ("learning_rte", "lr"), ("wieght_decay", "weight_decay"), ("banana", None),
])
def test_closest_train_key(typed: str, meant: str | None) -> None:
    from slimtune.train.config import TrainConfig
    from slimtune.train.schema import field_types

    assert closest_key(typed, list(field_types(TrainConfig))) == meant


def test_closest_key_single_letters_stand_for_whole_words() -> None:
    assert closest_key("lora_r", ["r", "lora_alpha", "lora_dropout"]) == "r"
    assert closest_key("dropout_rate", ["r", "lora_alpha"]) is None  # r is no abbreviation of rate


@pytest.mark.parametrize(("text", "message"), [
    ("{", "not a JSON object"),
    ('{"quantization": "int8", "double_quant": true}', "quantization='int8' is not one of none, nf4, fp4"),
    ('{"quantization": "nf4"}', "expected exactly the keys 'quantization' and 'double_quant'"),
    ('{"quantization": "nf4", "double_quant": "yes"}', "double_quant='yes' must be true or false"),
])
def test_a_malformed_record_is_one_error_naming_the_file(tiny_chat, tmp_path: Path, text: str,  # noqa: F811
                                                         message: str) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_chat.adapters["beta"], adapter)
    (adapter / BASE_FILE).write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{adapter / BASE_FILE}: ") + ".*" + re.escape(message)):
        load_for_inference(str(tiny_chat.base), {"a": adapter}, device="cpu")
    result = invoke("chat", "--model", str(tiny_chat.base), "--adapter", str(adapter), "--device", "cpu",
                    input="/exit\n")
    assert result.exit_code == 2 and message in " ".join(result.output.split()) and "Traceback" not in result.output
