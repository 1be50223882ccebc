"""train.offload_checkpoints (#7): the key is validated, saved tensors really leave for the host, and a
run with it on equals the run with it off, bit for bit (CPU copies are exact)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch
from tiny_run import build_llama, pad_collate, random_rows

import slimtune.train.loop as loop
from slimtune.train import offload
from slimtune.train.config import TrainConfig
from slimtune.train.loop import Trainer
from slimtune.train.methods import build_peft_config, prepare_model, trainable_parameters
from slimtune.train.rng import seed_everything
from slimtune.train.run_config import RunConfig


def test_key_needs_gradient_checkpointing_and_a_bool() -> None:
    with pytest.raises(ValueError, match="train.offload_checkpoints needs train.gradient_checkpointing"):
        TrainConfig(offload_checkpoints=True)
    assert TrainConfig(offload_checkpoints=True, gradient_checkpointing=True).offload_checkpoints
    raw = {"model": "m", "train": {"gradient_checkpointing": True, "offload_checkpoints": True}}
    assert RunConfig.from_dict(raw).train.offload_checkpoints
    with pytest.raises(ValueError, match="offload_checkpoints must be true or false"):
        RunConfig.from_dict({"model": "m", "train": {"gradient_checkpointing": True, "offload_checkpoints": "yes"}})
    with pytest.raises(ValueError, match="did you mean 'offload_checkpoints'"):
        RunConfig.from_dict({"model": "m", "train": {"offload_checkpoint": True}})


def _model(checkpointing: bool) -> torch.nn.Module:
    seed_everything(0)
    peft = build_peft_config("lora", {"r": 4, "target_modules": "all-linear", "init_lora_weights": False})
    return prepare_model(build_llama(None), "lora", peft, gradient_checkpointing=checkpointing)


def test_checkpointed_layer_inputs_are_offloaded_and_grads_unchanged() -> None:
    batch = pad_collate(random_rows(3))
    b, t = batch["input_ids"].shape
    grads, stats = {}, offload.OffloadStats()
    for on in (False, True):
        model = _model(checkpointing=True)
        with offload.offload_saved_tensors(min_bytes=0) if on else nullcontext(stats) as stats:
            loss = model(**batch).loss
        loss.backward()
        grads[on] = {k: p.grad for k, p in trainable_parameters(model).items()}
    assert stats.tensors >= 2 and stats.bytes >= 2 * b * t * 32 * 4  # two layers' (B, T, C) fp32 inputs
    for name, g in grads[False].items():
        assert torch.equal(grads[True][name], g), name


def test_trainer_run_with_offload_equals_run_without(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offload, "MIN_BYTES", 0)  # the tiny model's tensors are all under 1 MiB
    seen: list[offload.OffloadStats] = []

    @contextmanager
    def counting() -> Iterator[offload.OffloadStats]:
        with offload.offload_saved_tensors() as stats:
            seen.append(stats)
            yield stats

    monkeypatch.setattr(loop, "offload_saved_tensors", counting)
    rows, results = random_rows(8), {}
    for on in (False, True):
        cfg = TrainConfig(batch_size=2, grad_accum=2, max_steps=2, lr=1e-2, report_to=[], log_every=1,
                          gradient_checkpointing=True, offload_checkpoints=on, device="cpu")
        model = _model(checkpointing=True)
        state = Trainer(model, cfg, rows, None, pad_collate, tmp_path / str(on), progress=False).fit()
        results[on] = ([r["loss"] for r in state.history if "loss" in r],
                       {k: p.detach().clone() for k, p in trainable_parameters(model).items()})
    assert len(seen) == 4 and all(s.tensors >= 2 for s in seen)  # 2 steps x 2 micro-batches, only when on
    assert results[True][0] == results[False][0]
    for name, w in results[False][1].items():
        assert torch.equal(results[True][1][name], w), (name, (results[True][1][name] - w).abs().max().item())



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_side_stream_gives_identical_grads() -> None:
    """On CUDA the copies run on a side stream with a prefetch (Note: copies beside the compute), or
    synchronously to pageable memory (all tensors; or the 128 KiB layer inputs while smaller ones stay pinned): the
    gradients match those without offload over repeated steps (to the run-to-run spread of the attention
    backward, which may accumulate with atomics; a copy race would give garbage)."""
    from slimtune import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from slimtune.bench.models import PROJECTIONS
    from slimtune.bench.models import build_llama as build_bench_llama
    from slimtune.bench.training import slimtune_loss

    model = build_bench_llama("tiny", "cuda", torch.bfloat16, seed=0)
    prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(PROJECTIONS)))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(0, 256, (4, 256), generator=torch.Generator().manual_seed(0)).cuda()
    params = [p for p in model.parameters() if p.requires_grad]
    runs = []
    for on, pageable in ((False, None), (True, None), (True, 0), (False, None), (True, None), (True, 1 << 17)):
        saving = offload.offload_saved_tensors(min_bytes=0, pageable_bytes=pageable)
        with saving if on else nullcontext(offload.OffloadStats()) as stats:
            loss = slimtune_loss(model, ids)
        loss.backward()
        runs.append((on, stats.tensors, [p.grad.clone() for p in params]))
        for p in params:
            p.grad = None
    reference = runs[0][2]
    for on, tensors, grads in runs:
        assert (tensors > 0) == on
        for g, r in zip(grads, reference, strict=True):
            assert ((g.float() - r.float()).norm() / r.float().norm().clamp_min(1e-12)) < 1e-2
