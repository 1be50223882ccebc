"""The training loop on a tiny random Llama + LoRA: accumulation, determinism, resume, NaN, schedules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import build_llama, pad_collate, random_rows

from slimtune.train.checkpoint import latest_checkpoint, list_checkpoints
from slimtune.train.config import TrainConfig
from slimtune.train.forward import forward_loss, supports_logits_to_keep
from slimtune.train.loop import Trainer, TrainingDiverged
from slimtune.train.loss import loss_positions
from slimtune.train.methods import build_peft_config, prepare_model, trainable_parameters
from slimtune.train.optim import lr_factor
from slimtune.train.rng import seed_everything


def make_trainer(tmp: Path, rows: list, eval_rows: list | None = None, seed: int = 0, dropout: float = 0.1,
                 **train: object) -> Trainer:
    cfg = TrainConfig(**{"batch_size": 2, "max_steps": 6, "log_every": 1, "save_every": 2, "seed": seed,
                         "lr": 1e-2, "report_to": [], **train})
    seed_everything(cfg.seed)
    peft = build_peft_config("lora", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                                      "lora_dropout": dropout, "init_lora_weights": False})
    model = prepare_model(build_llama(None), "lora", peft, gradient_checkpointing=False)
    return Trainer(model, cfg, rows, eval_rows, pad_collate, tmp, progress=False)


def losses(tmp: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (tmp / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def adapter_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainable_parameters(trainer.model).items()}


def test_grad_accum_matches_one_big_batch_with_uneven_lengths(tmp_path: Path) -> None:
    rows = random_rows(4)
    assert len({len(r["input_ids"]) for r in rows}) == 4
    big = make_trainer(tmp_path / "a", rows, dropout=0.0, batch_size=4)
    small = make_trainer(tmp_path / "b", rows, dropout=0.0, batch_size=1, grad_accum=4)
    loss_big, n_big = big.backward([pad_collate(rows)])
    loss_small, n_small = small.backward([pad_collate([r]) for r in rows])
    assert n_big == n_small == sum(len(r["input_ids"]) - 2 for r in rows)
    assert loss_big == pytest.approx(loss_small, rel=1e-6)
    grads_big = {n: p.grad for n, p in trainable_parameters(big.model).items()}
    grads_small = {n: p.grad for n, p in trainable_parameters(small.model).items()}
    assert len(grads_big) == 28  # 7 projections x 2 layers x (A, B)
    for name, g in grads_big.items():
        assert g.abs().max() > 0
        torch.testing.assert_close(grads_small[name], g, atol=1e-6, rtol=0, msg=name)


def test_same_seed_same_losses_other_seed_other_losses(tmp_path: Path) -> None:
    rows = random_rows(8)
    runs = [make_trainer(tmp_path / name, rows, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    for t in runs:
        t.fit()
    a, b, c = (losses(tmp_path / n) for n in "abc")
    assert len(a) == 6 and a == b
    assert a != c


def test_resume_after_crash_is_bit_identical(tmp_path: Path) -> None:
    rows = random_rows(7)  # odd: the last micro-batch of each epoch is short
    full = make_trainer(tmp_path / "full", rows, grad_accum=2, max_steps=5)
    full.fit()
    crashed = make_trainer(tmp_path / "run", rows, grad_accum=2, max_steps=5)
    calls = {"n": 0}

    def crash_on_step_4(module: torch.nn.Module, args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 7:  # 2 micro-batches per step: the 7th forward is inside step 4
            raise KeyboardInterrupt

    crashed.model.register_forward_pre_hook(crash_on_step_4)
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-2"]
    resumed = make_trainer(tmp_path / "run", rows, grad_accum=2, max_steps=5)
    state = resumed.fit(resume=True)
    assert state.step == 5
    expected, got = adapter_tensors(full), adapter_tensors(resumed)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert losses(tmp_path / "run") == losses(tmp_path / "full")
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step-5" / "trainable.safetensors"))
    assert all(torch.equal(saved[n], expected[n]) for n in expected)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, random_rows(8))
    calls = {"n": 0}

    def nan_on_step_3(module: torch.nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    trainer.model.base_model.model.model.norm.register_forward_hook(nan_on_step_3)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3.*step-2"):
        trainer.fit()
    last = latest_checkpoint(tmp_path / "checkpoints")
    assert last is not None and last.name == "step-2"
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 2
    saved = load_file(str(last / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_checkpoint_contents_keep_last_two_and_load_weights_only(tmp_path: Path) -> None:
    make_trainer(tmp_path, random_rows(8), max_steps=6, save_every=2).fit()
    names = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step-4", "step-6"]
    ckpt = tmp_path / "checkpoints" / "step-6"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["step"] == 6
    assert {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng.pt",
            "trainer_state.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(
        manifest["files"])
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(opt["state"]) == 28
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    assert set(rng) == {"python", "numpy", "torch", "cuda"}
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"], state["data_seed"]) == (1, 2, 0)


def test_incomplete_checkpoint_is_ignored(tmp_path: Path) -> None:
    make_trainer(tmp_path, random_rows(8), max_steps=2).fit()
    fake = tmp_path / "checkpoints" / "step-9"
    fake.mkdir()
    (fake / "trainable.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-2"


def test_eval_rows_and_early_stopping(tmp_path: Path) -> None:
    rows = random_rows(8)
    trainer = make_trainer(tmp_path, rows, eval_rows=random_rows(3, seed=5), eval_every=2, max_steps=6)
    trainer.fit()
    evals = [r for r in trainer.state.history if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(r["eval_ppl"] == pytest.approx(torch.tensor(r["eval_loss"]).exp().item()) for r in evals)
    trainer.state.best_eval_loss, trainer.state.evals_without_improvement = None, 0
    trainer.cfg.early_stopping_patience = 2
    for value, stop in ((3.0, None), (2.5, None), (2.6, None), (2.5, "early_stopping")):
        trainer.update_early_stopping(value)
        assert trainer.state.stop_reason == stop
    assert trainer.state.best_eval_loss == 2.5


def test_early_stopping_ends_the_run(tmp_path: Path) -> None:
    rows = random_rows(8)
    # lr 0 -> eval loss never improves after the first evaluation
    trainer = make_trainer(tmp_path, rows, eval_rows=random_rows(3, seed=5), eval_every=1, max_steps=20,
                           early_stopping_patience=2, scheduler="constant", lr=1e-12, dropout=0.0)
    state = trainer.fit()
    assert state.stop_reason == "early_stopping"
    assert state.step == 3
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-3"


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]), ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
     ("cosine", [0.0, 0.5, 1.0, 0.8535534, 0.5, 0.1464466])],
)
def test_schedules_with_warmup(kind: str, expected: list[float]) -> None:
    got = [lr_factor(step, warmup=2, total=6, kind=kind) for step in range(6)]
    assert got == pytest.approx(expected, abs=1e-6)


def test_logged_lr_follows_schedule(tmp_path: Path) -> None:
    make_trainer(tmp_path, random_rows(8), max_steps=4, warmup_steps=2, lr=1e-3).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])
    assert all(r["tokens_per_s"] > 0 and r["memory_gb"] > 0 for r in rows)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_fp32(tmp_path: Path, precision: str) -> None:
    rows = random_rows(8)
    make_trainer(tmp_path / "fp32", rows, max_steps=3, dropout=0.0).fit()
    trainer = make_trainer(tmp_path / precision, rows, max_steps=3, dropout=0.0, precision=precision)
    trainer.fit()
    assert trainer.ckpt.scaler.is_enabled() == (precision == "fp16")
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert losses(tmp_path / precision) == pytest.approx(losses(tmp_path / "fp32"), rel=2e-2)


def test_gradient_checkpointing_gives_same_grads(tmp_path: Path) -> None:
    rows = random_rows(4)
    plain = make_trainer(tmp_path / "a", rows, dropout=0.0)
    seed_everything(0)
    peft = build_peft_config("lora", {"r": 4, "target_modules": "all-linear", "init_lora_weights": False})
    model = prepare_model(build_llama(None), "lora", peft, gradient_checkpointing=True)
    assert model.base_model.model.is_gradient_checkpointing
    ckpt = Trainer(model, plain.cfg, rows, None, pad_collate, tmp_path / "b", progress=False)
    plain.backward([pad_collate(rows)])
    ckpt.backward([pad_collate(rows)])
    for (name, p), q in zip(trainable_parameters(plain.model).items(), ckpt.params):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_logits_only_at_loss_positions_gives_the_same_loss(tmp_path: Path) -> None:
    rows = random_rows(4)
    trainer = make_trainer(tmp_path, rows, dropout=0.0)
    batch = pad_collate(rows)
    assert trainer.logits_to_keep
    with torch.no_grad():
        kept = forward_loss(trainer.model, batch, trainer.device, logits_to_keep=True)
        full = forward_loss(trainer.model, batch, trainer.device, logits_to_keep=False)
    assert int(kept[1]) == int(full[1]) == sum(len(r["input_ids"]) - 2 for r in rows)
    torch.testing.assert_close(kept[0], full[0], atol=1e-5, rtol=1e-6)
    positions = loss_positions(batch["labels"])
    assert positions.tolist() == list(range(1, batch["labels"].shape[1] - 1))  # every row masks 2 tokens


def test_tensorboard_scalars_match_metrics_jsonl(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_trainer(tmp_path, random_rows(8), max_steps=3, report_to=["tensorboard"]).fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tb = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in tb] == [1, 2, 3]
    assert [v for _, v in tb] == pytest.approx(losses(tmp_path), rel=1e-6)
    assert "train/lr" in events.Tags()["scalars"]


def test_progress_bar_shows_loss_lr_speed_memory() -> None:
    import io

    from rich.console import Console

    from slimtune.train.logs import ProgressBar

    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=False)
    with ProgressBar(total=10, start=0, console=console, enabled=True) as bar:
        bar.update(4, {"loss": 1.23456, "lr": 2e-4, "tokens_per_s": 1234.5, "memory_gb": 0.5})
    text = out.getvalue()
    assert "4/10" in text and "loss 1.2346  lr 2.00e-04  1,234 tok/s  mem 0.50 GiB" in text and "ETA" in text


def test_resuming_a_finished_run_trains_no_more(tmp_path: Path) -> None:
    first = make_trainer(tmp_path, random_rows(8), max_steps=3)
    first.fit()
    again = make_trainer(tmp_path, random_rows(8), max_steps=3)
    state = again.fit(resume=True)
    assert state.step == 3
    expected, got = adapter_tensors(first), adapter_tensors(again)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert len(losses(tmp_path)) == 3


@pytest.mark.parametrize(
    ("method", "peft"),
    [("lora", {"r": 4, "target_modules": "all-linear", "init_lora_weights": False}),
     ("ia3", {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
     ("adalora", {"init_r": 4, "target_r": 2, "tinit": 0, "tfinal": 0, "target_modules": "all-linear"}),
     ("prompt_tuning", {"num_virtual_tokens": 3}),
     ("p_tuning", {"num_virtual_tokens": 3, "encoder_hidden_size": 16}),
     ("prefix_tuning", {"num_virtual_tokens": 3})],
)
def test_our_loss_equals_the_models_own_loss(method: str, peft: dict) -> None:
    """Virtual tokens (prompt/p-tuning) shift the logits; our loss must still match the model's mean loss."""
    seed_everything(0)
    config = build_peft_config(method, peft, total_steps=10)
    model = prepare_model(build_llama(None), method, config, gradient_checkpointing=False).eval()
    batch = pad_collate(random_rows(3))
    with torch.no_grad():
        ours, n = forward_loss(model, batch, torch.device("cpu"), supports_logits_to_keep(model))
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"]).loss
    torch.testing.assert_close(ours / n, theirs, atol=1e-5, rtol=1e-5)
