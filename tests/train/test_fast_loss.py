"""The loop's loss from hidden states (chunked LM-head cross-entropy) against the logits path (#7).

With the fast path on, forward_loss never builds the (B, K, V) logits: the loss sum, the loss-token count
and every trainable gradient must equal the reference (fast path off) within fp32 tolerance, with and
without gradient checkpointing, for adapters and for full fine-tuning (the head's own gradient).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_run import build_llama, pad_collate, random_rows

from slimtune.kernels import set_fast_path
from slimtune.train.config import TrainConfig
from slimtune.train.forward import forward_loss, supports_logits_to_keep
from slimtune.train.loop import Trainer
from slimtune.train.loss import loss_head
from slimtune.train.methods import build_peft_config, prepare_model, trainable_parameters
from slimtune.train.rng import seed_everything

LORA = {"r": 4, "target_modules": "all-linear", "init_lora_weights": False}


@pytest.fixture(autouse=True)
def _restore_mode():
    yield
    set_fast_path("auto")


def _model(method: str, peft: dict | None, checkpointing: bool = False, tied: bool = False) -> torch.nn.Module:
    seed_everything(0)
    config = None if method == "full" else build_peft_config(method, peft or {}, total_steps=10)
    base = build_llama(None)
    if tied:
        base.config.tie_word_embeddings = True
        base.lm_head.weight = base.model.embed_tokens.weight
    return prepare_model(base, method, config, gradient_checkpointing=checkpointing)


def _loss_and_grads(model: torch.nn.Module, mode: str, batch: dict) -> tuple[torch.Tensor, int, dict]:
    set_fast_path(mode)
    model.zero_grad(set_to_none=True)
    total, n = forward_loss(model, batch, torch.device("cpu"), supports_logits_to_keep(model))
    (total / n).backward()
    return total.detach(), int(n), {k: p.grad.clone() for k, p in trainable_parameters(model).items()}


@pytest.mark.parametrize(("method", "peft", "checkpointing", "tied"), [
    ("lora", LORA, False, False),
    ("lora", LORA, True, False),
    ("lora", LORA, False, True),
    ("full", None, False, False),
    ("full", None, True, True),
    ("ia3", {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}, False, False),
])
def test_hidden_state_loss_equals_logits_loss(method: str, peft: dict | None, checkpointing: bool,
                                              tied: bool) -> None:
    model = _model(method, peft, checkpointing, tied)
    batch = pad_collate(random_rows(3))
    set_fast_path("on")
    assert loss_head(model) is not None
    fast, n_fast, g_fast = _loss_and_grads(model, "on", batch)
    ref, n_ref, g_ref = _loss_and_grads(model, "off", batch)
    assert n_fast == n_ref == sum(len(r["input_ids"]) - 2 for r in random_rows(3))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-6)
    assert g_fast.keys() == g_ref.keys() and g_ref
    if method == "full":
        assert g_fast["model.embed_tokens.weight" if tied else "lm_head.weight"].abs().max() > 0
    for name, g in g_ref.items():
        torch.testing.assert_close(g_fast[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_no_logits_are_built_on_the_fast_path() -> None:
    model = _model("lora", LORA)
    widths = []
    model.get_base_model().lm_head.register_forward_hook(lambda _m, _a, out: widths.append(out.shape[1]))
    batch = pad_collate(random_rows(2))
    for mode in ("on", "off"):
        _loss_and_grads(model, mode, batch)
    assert widths == [0, batch["input_ids"].shape[1] - 2]  # fast: (B, 0, V); reference: loss positions only


def test_fast_path_off_or_virtual_tokens_or_auto_on_cpu_keep_the_logits_path() -> None:
    lora = _model("lora", LORA)
    prompt = _model("prompt_tuning", {"num_virtual_tokens": 3})
    set_fast_path("on")
    assert loss_head(lora) is not None and loss_head(prompt) is None
    set_fast_path("off")
    assert loss_head(lora) is None
    set_fast_path("auto")
    assert loss_head(lora) is None  # CPU tensors: auto means CUDA only


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_losses_match_with_accumulation(tmp_path: Path, precision: str) -> None:
    """Three optimizer steps of 2 x 2 accumulated micro-batches: same losses, same adapter weights."""
    rows, results = random_rows(12), {}
    for mode in ("on", "off"):
        set_fast_path(mode)
        cfg = TrainConfig(batch_size=2, grad_accum=2, max_steps=3, lr=1e-2, report_to=[], log_every=1,
                          precision=precision, device="cpu")
        model = _model("lora", LORA)
        trainer = Trainer(model, cfg, rows, None, pad_collate, tmp_path / mode, progress=False)
        state = trainer.fit()
        results[mode] = ([r["loss"] for r in state.history if "loss" in r],
                         {k: p.detach().clone() for k, p in trainable_parameters(model).items()})
    (loss_on, w_on), (loss_off, w_off) = results["on"], results["off"]
    if precision == "fp32":
        assert loss_on == pytest.approx(loss_off, rel=1e-5)
        for name, w in w_off.items():
            torch.testing.assert_close(w_on[name], w, atol=1e-5, rtol=1e-5, msg=name)
        return
    # bf16: the fused LoRA rounds differently (tests/kernels/test_lora_linear.py bounds that noise per
    # gradient), and AdamW turns tiny gradient differences into lr-sized steps: compare the losses only.
    assert loss_on == pytest.approx(loss_off, rel=1e-2)


def test_right_padding_mask_is_dropped_only_when_exact() -> None:
    """Note: right padding needs no attention mask: the fast path leaves the 2D mask out of right-padded
    batches of a rotary causal model (the loss and gradients above stay equal to the masked reference),
    and keeps it for left padding, labels under a pad, packed rows and other architectures."""
    from slimtune.train.loss import drop_right_padding_mask

    model = _model("lora", LORA)
    batch = pad_collate(random_rows(3))
    assert (batch["attention_mask"] == 0).any() and drop_right_padding_mask(model, batch)
    left = {k: v.flip(1) for k, v in batch.items()}  # pads first
    assert not drop_right_padding_mask(model, left)
    labelled_pad = {**batch, "labels": batch["labels"].masked_fill(batch["attention_mask"] == 0, 3)}
    assert not drop_right_padding_mask(model, labelled_pad)
    assert not drop_right_padding_mask(model, {**batch, "position_ids": torch.zeros_like(batch["input_ids"])})
    model.get_base_model().config.model_type = "bloom"  # positions (alibi) from the mask
    assert not drop_right_padding_mask(model, batch)
    model.get_base_model().config.model_type = "llama"
    config = model.get_base_model().config
    config._attn_implementation = "eager"  # only SDPA gains (flash-attention 2 unpads with the mask)
    assert not drop_right_padding_mask(model, batch)
    config._attn_implementation = "sdpa"

    masks = []
    attention = model.get_base_model().model.layers[0].self_attn
    attention.register_forward_pre_hook(lambda _m, _a, kw: masks.append(kw.get("attention_mask")), with_kwargs=True)
    for mode in ("on", "off"):
        set_fast_path(mode)
        forward_loss(model, batch, torch.device("cpu"), supports_logits_to_keep(model))
    assert masks[0] is None and masks[1] is not None  # fast path: causal kernel; reference: the padding mask
