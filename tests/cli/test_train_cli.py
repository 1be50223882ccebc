"""`slimtune train` end to end on a tiny Llama: golden losses, run folder contents, resume, user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_run import GOLDEN_METHODS, golden_config, read_metrics, write_alpaca
from typer.testing import CliRunner

from slimtune.cli.main import app
from slimtune.train.run_config import load_run_config

GOLDEN = Path(__file__).resolve().parents[1] / "train" / "golden"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def invoke(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("method", GOLDEN_METHODS)
def test_train_matches_golden_losses(tmp_path: Path, tiny_model_dir: Path, method: str) -> None:
    config = golden_config(tmp_path, tiny_model_dir, method)
    result = invoke("train", str(config), "--no-progress")
    assert result.exit_code == 0, result.output
    golden = json.loads((GOLDEN / f"{method}.json").read_text())
    got = read_metrics(tmp_path / f"run-{method}")
    assert len(got["loss"]) == 4 and len(got["eval_loss"]) == 2
    for key in ("loss", "lr", "eval_loss"):
        assert got[key] == pytest.approx(golden[key], rel=1e-5, abs=1e-6), key


def test_run_folder_contents(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = golden_config(tmp_path, tiny_model_dir, "lora")
    assert invoke("train", str(config), "--no-progress").exit_code == 0
    run = tmp_path / "run-lora"
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "adapter", "checkpoints", "metrics.jsonl",
                                               "loss.png", "README.md"}
    adapter = run / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja",
            "generation_config.json"} <= {p.name for p in adapter.iterdir()}
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["grad_accum"] == 2 and resolved["data"]["format"] == "auto"
    card = (run / "README.md").read_text()
    golden = json.loads((GOLDEN / "lora.json").read_text())
    assert f"final eval loss | {golden['eval_loss'][-1]:.4f}" in card and "4 optimizer steps" in card
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # the final adapter holds the final trained weights
    final = load_file(str(adapter / "adapter_model.safetensors"))
    ckpt = load_file(str(run / "checkpoints" / "step-4" / "trainable.safetensors"))
    def q_proj_a(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return next(v for k, v in tensors.items() if "layers.1.self_attn.q_proj" in k and "lora_A" in k)

    assert torch.equal(q_proj_a(final), q_proj_a(ckpt))


def test_full_method_saves_a_whole_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = golden_config(tmp_path, tiny_model_dir, "full")
    assert invoke("train", str(config), "--no-progress").exit_code == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run-full" / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_resume_through_the_cli_is_bit_identical(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = golden_config(tmp_path, tiny_model_dir, "lora")
    constant = ["--train.scheduler", "constant", "--no-progress"]  # a 2-step run then has the 4-step run's lr
    assert invoke("train", str(config), *constant).exit_code == 0
    full = load_file(str(tmp_path / "run-lora" / "adapter" / "adapter_model.safetensors"))
    # stop after epoch 1 (max_steps 2), then resume the 2-epoch run from its step-2 checkpoint
    short = [*constant, "--output_dir", str(tmp_path / "resumed")]
    assert invoke("train", str(config), *short, "--train.max_steps", "2").exit_code == 0
    result = invoke("train", str(config), *short, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output
    resumed = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert read_metrics(tmp_path / "resumed") == read_metrics(tmp_path / "run-lora")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--train.lrr", "1"], "unknown override --train.lrr: section 'train' has no key 'lrr'; did you mean --train.lr?"),
        (["--method", "lroa"], "method 'lroa' is not a slimtune method; did you mean 'lora'? allowed: "),
        (["--method", "prefix_tuning"], "unknown key 'r' in section 'peft'"),
        (["--model", "/nonexistent/model"], "model: cannot load"),
        (["--model", "slimtune:smollm2"], "model='slimtune:smollm2': no shipped model 'smollm2'; known names: "
                                          "slimtune:smollm2-135m-instruct"),
        (["--data.path", "/nonexistent.jsonl"], "nonexistent.jsonl"),
        (["--resume"], "--resume: no complete checkpoint"),
    ],
)
def test_user_errors_are_one_red_line_exit_2(tmp_path: Path, tiny_model_dir: Path, args: list[str],
                                             message: str) -> None:
    config = golden_config(tmp_path, tiny_model_dir, "lora")
    result = invoke("train", str(config), "--no-progress", *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert result.output.strip().startswith("error:")


def test_existing_run_needs_resume(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = golden_config(tmp_path, tiny_model_dir, "lora")
    assert invoke("train", str(config), "--no-progress", "--train.max_steps", "1").exit_code == 0
    result = invoke("train", str(config), "--no-progress")
    assert result.exit_code == 2 and "already holds checkpoints (step-1): pass --resume" in result.output


EXTRA = {"adalora": ["--peft.tinit", "0", "--peft.tfinal", "0", "--peft.deltaT", "1"]}
"""Overrides an example needs to fit a 2-step run."""


@pytest.mark.parametrize("example", sorted(p.stem for p in EXAMPLES.glob("*.yaml")))
def test_shipped_examples_train_on_a_tiny_model(tmp_path: Path, shipped_model_cache: Path, example: str) -> None:
    """Each example as shipped names slimtune:smollm2-135m-instruct; here that cache folder holds the tiny model."""
    assert load_run_config(EXAMPLES / f"{example}.yaml").model == "slimtune:smollm2-135m-instruct"
    data = write_alpaca(tmp_path / "rows.jsonl", 6)
    result = invoke("train", str(EXAMPLES / f"{example}.yaml"), "--no-progress",
                    "--data.path", str(data), "--output_dir", str(tmp_path / "run"), "--train.max_steps", "2",
                    "--train.precision", "fp32", "--train.device", "cpu", "--train.max_seq_len", "64",
                    *EXTRA.get(example, []))
    assert result.exit_code == 0, result.output
    rows = read_metrics(tmp_path / "run")
    assert len(rows["eval_loss"]) == 1 and all(0 < v < 10 for v in rows["loss"] + rows["eval_loss"])
    # the run keeps the name; the card names the folder it resolved to (what plain transformers can load)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"] == "slimtune:smollm2-135m-instruct"
    assert f"base_model: {shipped_model_cache}\n" in (tmp_path / "run" / "README.md").read_text()


@pytest.mark.slow
def test_lora_example_trains_the_real_default_model_without_hf_hub_offline(tmp_path: Path) -> None:
    """`slimtune train examples/lora.yaml` as a user runs it: the real SmolLM2-135M-Instruct (converted into
    the cache on first use), no HF_HUB_OFFLINE, so a hub lookup would fail on an offline machine."""
    from slimtune.data.loading import builtin_dataset_files
    from slimtune.models import default_model_path

    shipped_eval = builtin_dataset_files("slimtune:wordnet_instruct")[1].read_text().splitlines(keepends=True)
    held_out = tmp_path / "eval.jsonl"  # 8 of the shipped 200 eval rows keep the test short
    held_out.write_text("".join(shipped_eval[:8]))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    cmd = [sys.executable, "-m", "slimtune", "train", str(EXAMPLES / "lora.yaml"), "--no-progress",
           "--output_dir", str(tmp_path / "run"), "--data.max_rows", "16", "--data.eval_path", str(held_out),
           "--train.max_steps", "2",
           "--train.batch_size", "2", "--train.grad_accum", "1", "--train.max_seq_len", "64",
           "--train.precision", "fp32", "--train.device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_metrics(tmp_path / "run")
    # SmolLM2 already knows English: its loss on WordNet definitions starts low, far below ln(49152) = 10.8
    assert len(rows["loss"]) >= 1 and all(0 < v < 5 for v in rows["loss"] + rows["eval_loss"])
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(default_model_path())


def test_python_dash_m_and_help(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "slimtune", "train", "--help"], capture_output=True, text=True,
                         env={"COLUMNS": "200", "PATH": "", "HOME": str(tmp_path)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "train.grad_accum" in out.stdout and "Micro-batches accumulated per optimizer step" in out.stdout
    assert "peft.lora_alpha" in out.stdout and "data.packing" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "slimtune", "train", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "config file not found" in bad.stderr and "Traceback" not in bad.stderr


def test_data_inspect(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = golden_config(tmp_path, tiny_model_dir, "lora")
    result = invoke("data", "inspect", str(config))
    assert result.exit_code == 0, result.output
    assert "examples: train 8, eval 3" in result.output and "format alpaca" in result.output
    assert "What does" in result.output


@pytest.mark.parametrize("attention", ["position_ids", "4d_mask"])
def test_packed_rows_train_with_the_same_eval(tmp_path: Path, tiny_model_dir: Path, attention: str) -> None:
    config = golden_config(tmp_path, tiny_model_dir, "lora")
    frozen = ["--no-progress", "--train.max_seq_len", "128", "--train.lr", "1e-12", "--train.max_steps", "1",
              "--train.batch_size", "8", "--train.grad_accum", "1", "--peft.lora_dropout", "0"]
    assert invoke("train", str(config), *frozen, "--output_dir", str(tmp_path / "plain")).exit_code == 0
    result = invoke("train", str(config), *frozen, "--data.packing", "true", "--data.packed_attention", attention)
    assert result.exit_code == 0, result.output
    packed, plain = read_metrics(tmp_path / "run-lora"), read_metrics(tmp_path / "plain")
    # one step over all 8 rows with lr ~0: packing (no cross-sample attention) changes nothing
    assert packed["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert packed["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-6)


def test_missing_tensorboard_and_matplotlib_only_print_a_notice(tmp_path: Path, tiny_model_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    config = golden_config(tmp_path, tiny_model_dir, "lora")
    result = invoke("train", str(config), "--no-progress", "--train.report_to", "[tensorboard]", "--train.max_steps", "1")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "tensorboard is not installed: skipping" in text and "matplotlib is not installed" in text
    assert not (tmp_path / "run-lora" / "loss.png").exists()
    assert len(read_metrics(tmp_path / "run-lora")["loss"]) == 1
