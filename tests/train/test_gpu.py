"""The loop on CUDA: bf16 autocast + fused AdamW, fp16 + GradScaler, QLoRA, exact resume (skipped on CPU)."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch
from tiny_run import golden_config, read_metrics
from typer.testing import CliRunner

from slimtune.cli.main import app

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def train(config: Path, *args: str) -> str:
    result = CliRunner().invoke(app, ["train", str(config), "--no-progress", "--train.device", "cuda", *args])
    trace = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
    assert result.exit_code == 0, result.output + trace
    return result.output


@pytest.mark.parametrize(("method", "precision"), [("lora", "bf16"), ("lora", "fp16"), ("qlora", "bf16"),
                                                   ("dora", "bf16"), ("full", "bf16")])
def test_cuda_losses_close_to_cpu_fp32(tmp_path: Path, tiny_model_dir: Path, method: str, precision: str) -> None:
    config = golden_config(tmp_path, tiny_model_dir, method)
    output = train(config, "--train.precision", precision, "--train.gradient_checkpointing", "true")
    if method != "full":  # slimtune train switches the fused layers on for the tiny Llama (9 modules a layer pair)
        assert "fast path: fused rmsnorm, rope, swiglu in" in output, output
    cuda = read_metrics(tmp_path / f"run-{method}")
    golden = json.loads((Path(__file__).parent / "golden" / f"{method}.json").read_text())  # CPU fp32
    assert cuda["loss"] == pytest.approx(golden["loss"], rel=2e-2)
    assert cuda["eval_loss"] == pytest.approx(golden["eval_loss"], rel=2e-2)


def test_fused_adamw_on_cuda(tmp_path: Path) -> None:
    from slimtune.train.config import TrainConfig
    from slimtune.train.optim import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(4, 4, device="cuda"))]
    assert build_optimizer(params, TrainConfig()).defaults["fused"] is True


def test_cuda_resume_is_bit_identical(tmp_path: Path, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    config = golden_config(tmp_path, tiny_model_dir, "lora")
    constant = ["--train.scheduler", "constant", "--train.precision", "bf16"]
    train(config, *constant)
    short = [*constant, "--output_dir", str(tmp_path / "resumed")]
    train(config, *short, "--train.max_steps", "2")
    train(config, *short, "--resume")
    full = load_file(str(tmp_path / "run-lora" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
