"""Data-parallel training on CPU (gloo, 2 processes under torchrun) equals 1 process on the same global batch.

Each run is the real CLI (`python -m torch.distributed.run -m slimtune train`) on the tiny Llama:
8 alpaca rows, batch 2 x accumulation 2, 4 steps (2 epochs), fp32, no dropout, constant lr so a run
stopped at step 2 and resumed to step 4 sees the schedule of an uninterrupted one. Runs are launched
on first use (RECIPES), so `-k` selects the launches too.
SLIMTUNE_DIST_TEST_DEVICE=cuda runs them on GPUs (nccl).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

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
                  "precision": "fp32", "device": DEVICE, "report_to": [], **train},
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


FSDP2 = {"distributed": "fsdp2"}
QLORA_FSDP2 = {"method": "qlora", "distributed": "fsdp2"}
# run name -> launches: (ranks, config changes, extra CLI args[, folder to copy the run from first])
RECIPES: dict[str, list[tuple[Any, ...]]] = {
    "one": [(1, {}, ())],
    "two": [(2, {}, ())],
    "half": [(2, {"max_steps": 2}, ()), (1, {}, ("--resume",))],  # 2 ranks stopped at step 2, then 1
    "grow": [(1, {"max_steps": 2}, ()), (2, {}, ("--resume",))],
    "fsdp": [(2, FSDP2, ())],
    "q-one": [(1, {"method": "qlora"}, ())],
    "q-fsdp": [(2, QLORA_FSDP2, ())],
    "q-fsdp-half": [(2, {**QLORA_FSDP2, "max_steps": 2}, ())],
    "q-fsdp-2to2": [(2, QLORA_FSDP2, ("--resume",), "q-fsdp-half")],
    "q-fsdp-2to1": [(1, QLORA_FSDP2, ("--resume",), "q-fsdp-half")],
}


class Runs:
    """The run folders of RECIPES under `root`, each trained once, on first use."""

    def __init__(self, root: Path, model_dir: Path):
        self.root, self.model_dir = root, model_dir

    def __truediv__(self, name: str) -> Path:
        run = self.root / name
        if not run.exists():
            for ranks, changes, extra, *source in RECIPES[name]:
                if source:
                    shutil.copytree(self / source[0], run)
                train = {k: v for k, v in changes.items() if k != "method"}
                config = write_config(self.root, self.model_dir, name, changes.get("method", "lora"), **train)
                slimtune_train(config, ranks, *extra)
        return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Runs:
    return Runs(tmp_path_factory.mktemp("ddp"), tiny_model_dir)


def test_two_ranks_give_the_one_rank_losses_and_adapter(runs: Runs) -> None:
    one, two = read_metrics(runs / "one"), read_metrics(runs / "two")
    assert len(one["loss"]) == 4
    assert one["loss"] == pytest.approx(two["loss"], abs=1e-5)
    assert one["eval_loss"] == pytest.approx(two["eval_loss"], abs=1e-5)
    assert_same_adapter(adapter(runs / "one"), adapter(runs / "two"))


def test_two_rank_adapter_is_complete_and_loads(runs: Runs, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from slimtune import PeftModel

    saved = adapter(runs / "two")
    assert saved and all(t.numel() > 0 for t in saved.values())
    config = json.loads((runs / "two" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), runs / "two" / "adapter")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved)


def test_two_rank_checkpoint_resumes_on_one_rank(runs: Runs) -> None:
    assert (runs / "half" / "checkpoints" / "step-2").is_dir()
    assert read_metrics(runs / "half")["loss"] == pytest.approx(read_metrics(runs / "one")["loss"], abs=1e-5)
    assert_same_adapter(adapter(runs / "one"), adapter(runs / "half"))


def test_one_rank_checkpoint_resumes_on_two_ranks(runs: Runs) -> None:
    assert read_metrics(runs / "grow")["loss"] == pytest.approx(read_metrics(runs / "one")["loss"], abs=1e-5)
    assert_same_adapter(adapter(runs / "one"), adapter(runs / "grow"))


def test_fsdp2_two_ranks_give_the_one_rank_losses_and_adapter(runs: Runs) -> None:
    assert read_metrics(runs / "fsdp")["loss"] == pytest.approx(read_metrics(runs / "one")["loss"], abs=1e-5)
    assert_same_adapter(adapter(runs / "one"), adapter(runs / "fsdp"))


def test_fsdp2_qlora_two_ranks_give_the_one_rank_losses_and_adapter(runs: Runs) -> None:
    """The NF4 codes are sharded in a float storage (Note: quant storage): any changed byte changes the loss."""
    one, two = read_metrics(runs / "q-one"), read_metrics(runs / "q-fsdp")
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-5)
    assert_same_adapter(adapter(runs / "q-one"), adapter(runs / "q-fsdp"))


def test_fsdp2_checkpoint_holds_complete_tensors(runs: Runs) -> None:
    """Step 2 of a 2-rank FSDP2 QLoRA run: the keys, shapes and file set of a 1-rank checkpoint."""
    sharded, single = runs / "q-fsdp-half" / "checkpoints" / "step-2", runs / "q-one" / "checkpoints" / "step-2"
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in single.iterdir())
    a, b = (load_file(str(c / "trainable.safetensors")) for c in (sharded, single))
    assert sorted(a) == sorted(b) and all(a[k].shape == b[k].shape and a[k].numel() > 0 for k in a)
    moments = torch.load(sharded / "optimizer.pt", weights_only=True)["state"]
    assert sorted(tuple(m["exp_avg"].shape) for m in moments.values()) == sorted(tuple(t.shape) for t in a.values())


@pytest.mark.parametrize("name", ["q-fsdp-2to2", "q-fsdp-2to1"])
def test_fsdp2_run_stopped_at_step_2_resumes_on_two_or_one_ranks(runs: Runs, name: str) -> None:
    """Adapter, optimizer, scheduler, RNG and data position come back: the uninterrupted run's adapter (1e-6)."""
    whole, resumed = read_metrics(runs / "q-fsdp"), read_metrics(runs / name)
    assert len(resumed["loss"]) == 4
    assert resumed["loss"] == pytest.approx(whole["loss"], abs=1e-6)
    a, b = adapter(runs / "q-fsdp"), adapter(runs / name)
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


ADALORA = {"init_r": 4, "target_r": 2, "tinit": 0, "tfinal": 0, "total_step": 4, "target_modules": ["q_proj", "v_proj"]}


def _adalora_trainer_args(tmp_path: Path, method: str, peft: dict[str, Any]) -> tuple[Any, ...]:
    from tiny_run import build_llama, pad_collate, random_rows

    from slimtune.train.config import TrainConfig
    from slimtune.train.methods import build_peft_config, prepare_model

    model = prepare_model(build_llama(None), method, build_peft_config(method, peft), gradient_checkpointing=False)
    cfg = TrainConfig(batch_size=2, max_steps=4, log_every=1, report_to=[])
    return model, cfg, random_rows(4), None, pad_collate, tmp_path


def test_fsdp2_refuses_adalora_before_sharding(tmp_path: Path) -> None:
    """AdaLoRA's rank allocator reads whole gradients after each step; FSDP2 shards them: refused up front, naming
    the method and the way out (before any collective, so no process group is needed here)."""
    from slimtune.train.distributed import DistributedTrainer, per_step_methods

    model, *rest = _adalora_trainer_args(tmp_path, "adalora", ADALORA)
    assert per_step_methods(model) == ["adalora"]
    with pytest.raises(ValueError, match=r"fsdp2 does not take method 'adalora'.*train.distributed: ddp"):
        DistributedTrainer(model, *rest, strategy="fsdp2")
    lora, *_ = _adalora_trainer_args(tmp_path, "lora", {"r": 4, "target_modules": ["q_proj"]})
    assert per_step_methods(lora) == []


def test_optimizer_step_clips_through_the_hook_and_keeps_the_method_bookkeeping(tmp_path: Path) -> None:
    """A trainer that overrides clip_grad_norm (as the FSDP2 one does) still runs AdaLoRA's allocator each step."""
    from slimtune.train.loop import Trainer

    norms: list[float] = []

    class Recording(Trainer):
        def clip_grad_norm(self) -> float:
            norms.append(super().clip_grad_norm())
            return norms[-1]

    trainer = Recording(*_adalora_trainer_args(tmp_path, "adalora", ADALORA), progress=False)
    trainer.fit()
    history = [row["grad_norm"] for row in trainer.state.history if "grad_norm" in row]
    assert len(norms) == 4 and history == pytest.approx(norms) and all(n > 0 for n in norms)
    config = trainer.model.peft_config["default"]
    assert config.rank_pattern, "the allocator never ran: no rank pattern"
    kept = sum(sum(bool(x) for x in mask) for mask in config.rank_pattern.values())
    assert kept == 2 * len(config.rank_pattern)  # the final budget: target_r per adapter on average


def test_fsdp2_adalora_run_is_refused_with_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`slimtune train` under torchrun with method adalora and train.distributed: fsdp2 stops before step 1."""
    config = write_config(tmp_path, tiny_model_dir, "ada-fsdp", "adalora", distributed="fsdp2")
    raw = yaml.safe_load(config.read_text())
    raw["peft"] = ADALORA
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    cmd = torchrun_command(2, ["train", str(config), "--no-progress"])
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0  # each rank prints the one-line error (torchrun then reports the failed ranks)
    assert "error: train.distributed: fsdp2 does not take method 'adalora'" in done.stderr
    assert not (tmp_path / "ada-fsdp" / "checkpoints").exists()
