"""Data-parallel training on CPU (gloo, 2 processes under torchrun) equals 1 process on the same global batch.

Each run is the real CLI (`python -m torch.distributed.run -m slimtune train`) on the tiny Llama:
8 alpaca rows, batch 2 x accumulation 2, 4 steps (2 epochs), fp32, no dropout, constant lr so a run
stopped at step 2 and resumed to step 4 sees the schedule of an uninterrupted one.
SLIMTUNE_DIST_TEST_DEVICE=cuda runs them on GPUs (nccl).
"""

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
from tiny_run import read_metrics, write_alpaca

from slimtune.train.distributed import shard_rows
from slimtune.train.launch import torchrun_command, without_gpus

SRC = Path(__file__).resolve().parents[2] / "src"
DEVICE = os.environ.get("SLIMTUNE_DIST_TEST_DEVICE", "cpu")  # cuda: the same tests on GPUs with nccl


def write_config(root: Path, model_dir: Path, name: str, method: str = "lora", **train: object) -> Path:
    train_rows = root / "train.jsonl"
    if not train_rows.exists():
        write_alpaca(train_rows, 8), write_alpaca(root / "eval.jsonl", 3, offset=8)
    raw = {
        "model": str(model_dir), "method": method,
        "peft": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0},
        "data": {"path": str(train_rows), "eval_path": str(root / "eval.jsonl")},
        "train": {"max_steps": 4, "batch_size": 2, "grad_accum": 2, "lr": 1.0e-2, "scheduler": "constant",
                  "max_seq_len": 64, "seed": 0, "log_every": 1, "eval_every": 2, "save_every": 2,
                  "precision": "fp32", "device": DEVICE, "tensorboard": False, **train},
        "output_dir": str(root / name),
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def slimtune_train(config: Path, ranks: int, *extra: str) -> None:
    args = ["train", str(config), "--no-progress", *extra]
    cmd = torchrun_command(ranks, args) if ranks > 1 else [sys.executable, "-m", "slimtune", *args]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].numel() > 0 and a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def test_shard_rows_splits_each_micro_batch_and_pads_empty_shards() -> None:
    assert shard_rows([7, 3, 5], 0, 2) == ([7, 5], 1.0)
    assert shard_rows([7, 3, 5], 1, 2) == ([3], 1.0)
    assert shard_rows([9], 1, 2) == ([9], 0.0)  # nothing left for rank 1: a placeholder row, weight 0


def test_gpus_flag_relaunches_under_torchrun() -> None:
    assert without_gpus(["train", "a.yaml", "--gpus", "2", "--resume", "--gpus=4"]) == ["train", "a.yaml", "--resume"]
    cmd = torchrun_command(2, ["train", "a.yaml"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "slimtune",
                       "train", "a.yaml"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """one: 1 rank, 4 steps; two: 2 ranks; half: 2 ranks stopped at step 2, resumed on 1; grow: 1 -> 2."""
    root = tmp_path_factory.mktemp("ddp")
    slimtune_train(write_config(root, tiny_model_dir, "one"), 1)
    slimtune_train(write_config(root, tiny_model_dir, "two"), 2)
    slimtune_train(write_config(root, tiny_model_dir, "half", max_steps=2), 2)
    slimtune_train(write_config(root, tiny_model_dir, "half"), 1, "--resume")
    slimtune_train(write_config(root, tiny_model_dir, "grow", max_steps=2), 1)
    slimtune_train(write_config(root, tiny_model_dir, "grow"), 2, "--resume")
    return root


def test_two_ranks_give_the_one_rank_losses_and_adapter(runs: Path) -> None:
    one, two = read_metrics(runs / "one"), read_metrics(runs / "two")
    assert len(one["loss"]) == 4
    assert one["loss"] == pytest.approx(two["loss"], abs=1e-5)
    assert one["eval_loss"] == pytest.approx(two["eval_loss"], abs=1e-5)
    assert_same_adapter(adapter(runs / "one"), adapter(runs / "two"))


def test_two_rank_adapter_is_complete_and_loads(runs: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from slimtune import PeftModel

    saved = adapter(runs / "two")
    assert saved and all(t.numel() > 0 for t in saved.values())
    config = json.loads((runs / "two" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), runs / "two" / "adapter")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved)


def test_two_rank_checkpoint_resumes_on_one_rank(runs: Path) -> None:
    assert (runs / "half" / "checkpoints" / "step-2").is_dir()
    assert read_metrics(runs / "half")["loss"] == pytest.approx(read_metrics(runs / "one")["loss"], abs=1e-5)
    assert_same_adapter(adapter(runs / "one"), adapter(runs / "half"))


def test_one_rank_checkpoint_resumes_on_two_ranks(runs: Path) -> None:
    assert read_metrics(runs / "grow")["loss"] == pytest.approx(read_metrics(runs / "one")["loss"], abs=1e-5)
    assert_same_adapter(adapter(runs / "one"), adapter(runs / "grow"))


def test_fsdp2_two_ranks_give_the_one_rank_losses_and_adapter(runs: Path, tiny_model_dir: Path) -> None:
    slimtune_train(write_config(runs, tiny_model_dir, "fsdp", distributed="fsdp2"), 2)
    assert read_metrics(runs / "fsdp")["loss"] == pytest.approx(read_metrics(runs / "one")["loss"], abs=1e-5)
    assert_same_adapter(adapter(runs / "one"), adapter(runs / "fsdp"))


def test_fsdp2_qlora_two_ranks_give_the_one_rank_losses_and_adapter(runs: Path, tiny_model_dir: Path) -> None:
    """NF4 weights are uint8 parameters: sharded by fully_shard (torch >= 2.13) or replicated (older)."""
    slimtune_train(write_config(runs, tiny_model_dir, "q-one", method="qlora"), 1)
    slimtune_train(write_config(runs, tiny_model_dir, "q-fsdp", method="qlora", distributed="fsdp2"), 2)
    one, two = read_metrics(runs / "q-one"), read_metrics(runs / "q-fsdp")
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-5)
    assert_same_adapter(adapter(runs / "q-one"), adapter(runs / "q-fsdp"))
