"""train/cuda_graphs.py (train.cuda_graphs): who may use it, the eager path's bucketing and loss on CPU, and
on CUDA a Trainer run with graphs against the same run without (losses and adapter weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_run import build_llama, pad_collate, random_rows

from slimtune.kernels import set_fast_path
from slimtune.train import cuda_graphs
from slimtune.train.config import TrainConfig
from slimtune.train.cuda_graphs import GraphSteps, auto_enabled, graphs_unsupported
from slimtune.train.forward import forward_loss
from slimtune.train.loop import Trainer
from slimtune.train.methods import build_peft_config, prepare_model, trainable_parameters
from slimtune.train.rng import seed_everything

LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False}


@pytest.fixture(autouse=True)
def _restore_mode():
    yield
    set_fast_path("auto")


def _model(method: str = "lora", peft: dict | None = None, device: str = "cpu", checkpointing: bool = False):
    seed_everything(0)
    config = build_peft_config(method, LORA if peft is None else peft, total_steps=10)
    return prepare_model(build_llama(None).to(device), method, config, gradient_checkpointing=checkpointing)


def test_config_refuses_fp16_and_offload():
    with pytest.raises(ValueError, match="cuda_graphs does not take precision fp16"):
        TrainConfig(cuda_graphs=True, precision="fp16")
    with pytest.raises(ValueError, match="cuda_graphs and train.offload_checkpoints do not combine"):
        TrainConfig(cuda_graphs=True, gradient_checkpointing=True, offload_checkpoints=True)


def test_trainer_refuses_graphs_on_cpu_and_auto_stays_off(tmp_path):
    cfg = TrainConfig(cuda_graphs=True, device="cpu", max_steps=1, report_to=[])
    with pytest.raises(ValueError, match="train.cuda_graphs: it needs a CUDA device; the run's device is cpu"):
        Trainer(_model(), cfg, random_rows(4), None, pad_collate, tmp_path, progress=False)
    auto = TrainConfig(device="cpu", max_steps=1, report_to=[])
    assert auto.cuda_graphs == "auto"
    assert Trainer(_model(), auto, random_rows(4), None, pad_collate, tmp_path, progress=False).graphs is None
    with pytest.raises(ValueError, match="train.cuda_graphs must be true, false or auto"):
        TrainConfig(cuda_graphs="yes")


def test_auto_only_for_lora_and_qlora_without_dora():
    set_fast_path("on")
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    plain, offload = TrainConfig(), TrainConfig(gradient_checkpointing=True, offload_checkpoints=True)
    assert auto_enabled(_model(), cuda, bf16, plain)
    assert not auto_enabled(_model(), cuda, bf16, offload)
    assert not auto_enabled(_model(), torch.device("cpu"), bf16, plain)
    assert not auto_enabled(_model(peft={**LORA, "use_dora": True}), cuda, bf16, plain)
    assert not auto_enabled(_model("ia3", {"target_modules": ["k_proj", "v_proj", "down_proj"],
                                           "feedforward_modules": ["down_proj"]}), cuda, bf16, plain)


def test_unsupported_reasons():
    set_fast_path("on")  # the loss from hidden states is then available on CPU tensors
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert graphs_unsupported(_model(), cuda, bf16) is None
    assert "CUDA device" in graphs_unsupported(_model(), torch.device("cpu"), bf16)
    assert "fp16" in graphs_unsupported(_model(), cuda, torch.float16)
    adalora = {"init_r": 4, "target_r": 2, "target_modules": ["q_proj", "v_proj"], "total_step": 10}
    assert "AdaLoRA" in graphs_unsupported(_model("adalora", adalora), cuda, bf16)
    assert "hidden states" in graphs_unsupported(_model("prompt_tuning", {"num_virtual_tokens": 4}), cuda, bf16)
    set_fast_path("off")
    assert "hidden states" in graphs_unsupported(_model(), cuda, bf16)


def _eager_steps(monkeypatch, model, bucket=8) -> GraphSteps:
    """GraphSteps on CPU that never captures: its eager path (bucket padding, loss over every position)."""
    monkeypatch.setattr(cuda_graphs, "graphs_unsupported", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # CPU builds lack it
    return GraphSteps(model, list(trainable_parameters(model).values()), None, bucket=bucket, warmup=10**9)


def test_eager_path_pads_to_a_bucket_and_gives_the_loops_loss_and_grads(monkeypatch):
    set_fast_path("on")
    rows = random_rows(3)  # lengths 5, 12, 6: right-padded to 12, bucketed to 16
    batch = pad_collate(rows)
    n = int((batch["labels"][:, 1:] != -100).sum())
    ref_model, model = _model(), _model()
    want, want_n = forward_loss(ref_model, batch, torch.device("cpu"), True)
    (want / n).backward()
    steps = _eager_steps(monkeypatch, model)
    assert steps.takes(batch)
    got = steps(batch, n)
    assert list(steps.buckets) == [(3, 16)] and steps.replays == 0 and int(want_n) == n
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(trainable_parameters(ref_model).items(), trainable_parameters(model).values()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_takes_only_right_padded_unpacked_batches(monkeypatch):
    set_fast_path("on")
    steps = _eager_steps(monkeypatch, _model())
    batch = pad_collate(random_rows(3))
    assert steps.takes(batch)
    left = {k: v.flip(1) for k, v in batch.items()}  # padding first: the mask matters
    assert not steps.takes(left)
    packed = {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])}
    assert not steps.takes(packed)
    steps.reason = "a capture failed"
    assert not steps.takes(batch)


def _run(tmp: Path, graphs: bool, quantized: bool = False, dropout: float = 0.0):
    """8 optimizer steps of 2 x 4 random rows (5-17 tokens) on CUDA, bf16, checkpointing: (losses, initial and
    final adapter weights, the GraphSteps)."""
    from slimtune.bench.models import build_llama as bench_llama
    from slimtune.bench.models import slimtune_quantizer

    seed_everything(0)
    peft = build_peft_config("qlora" if quantized else "lora", {**LORA, "lora_dropout": dropout}, total_steps=10)
    base = bench_llama("tiny", "cuda", torch.bfloat16, slimtune_quantizer if quantized else None, seed=0)
    model = prepare_model(base, "qlora" if quantized else "lora", peft, gradient_checkpointing=True)
    cfg = TrainConfig(cuda_graphs=graphs, device="cuda", precision="bf16", batch_size=4, grad_accum=2, max_steps=8,
                      lr=2e-3, log_every=1, save_every=1000, report_to=[], gradient_checkpointing=True, seed=0)
    trainer = Trainer(model, cfg, random_rows(64, vocab=256), None, pad_collate, tmp, progress=False)
    start = [p.detach().float().clone() for p in trainer.params]
    state = trainer.fit()
    losses = [row["loss"] for row in state.history if "loss" in row]
    return losses, start, [p.detach().float().clone() for p in trainer.params], trainer.graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantized", [False, True])
def test_gpu_trainer_with_graphs_matches_eager(tmp_path, monkeypatch, quantized):
    monkeypatch.setattr(cuda_graphs, "BUCKET", 8)  # rows of 5..17 tokens: buckets 8, 16, 24, several graphs
    eager_losses, start, eager_params, _ = _run(tmp_path / "eager", False, quantized)
    graph_losses, _, graph_params, steps = _run(tmp_path / "graphs", True, quantized)
    assert steps.reason is None and steps.replays > 0 and len(steps.buckets) >= 2
    assert sum(b.graph is not None for b in steps.buckets.values()) >= 2
    assert len(graph_losses) == len(eager_losses) == 8
    assert graph_losses == pytest.approx(eager_losses, rel=2e-2)
    for s, g, e in zip(start, graph_params, eager_params, strict=True):  # the updates, not the weights
        assert (e - s).norm() > 0
        assert ((g - s) - (e - s)).norm() / (e - s).norm() < 5e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphs_with_lora_dropout_train(tmp_path, monkeypatch):
    """Dropout masks are drawn anew at every replay (the graph owns a generator offset): finite losses, moved weights."""
    monkeypatch.setattr(cuda_graphs, "BUCKET", 8)
    losses, start, params, steps = _run(tmp_path, True, dropout=0.1)
    assert steps.reason is None and steps.replays > 0
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all((p - s).norm() > 0 for s, p in zip(start, params))
