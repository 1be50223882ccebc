"""AdaLoRA resumed mid-pruning ends bit-identical to an uninterrupted run: under transformers.Trainer (whose
checkpoints hold PeftModel.state_dict()) and under slimtune's own loop. Checkpoints keep the init_r shapes and the
rank allocator's state; only save_pretrained writes the pruned triplets, which HF peft loads."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import slimtune
from slimtune.methods.adalora import AdaLoraCallback, AdaLoraConfig
from tiny_models import TINY_MODELS, logits

LLAMA = TINY_MODELS["llama"]
# budgeting over steps 3..8 (masks at 4, 6, 8), rank_pattern frozen at step 9, 12 optimizer steps in all
SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12, lora_alpha=8,
                orth_reg_weight=0.3, beta1=0.8, beta2=0.7, lora_dropout=0.1)
MID = 6  # the checkpoint to resume from: pruning has begun, the budget is still falling


class _Rows(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 20  # 5 steps per epoch: the resume lands mid-epoch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(3, 96, (9,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def _model() -> slimtune.PeftModel:
    return slimtune.get_peft_model(LLAMA.model(), AdaLoraConfig(**SCHEDULE))


def _trainer(model: slimtune.PeftModel, out: Path) -> Trainer:
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=SCHEDULE["total_step"],
                             learning_rate=5e-2, report_to=[], seed=0, use_cpu=True, save_steps=MID,
                             logging_steps=1, lr_scheduler_type="linear", warmup_steps=2)
    return Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[AdaLoraCallback()])


def _exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_trainer_resume_mid_pruning_is_bit_identical_and_the_file_loads_in_peft(tmp_path):
    full = _model()
    full_run = _trainer(full, tmp_path / "full")
    full_run.train()
    checkpoint = load_file(tmp_path / "full" / f"checkpoint-{MID}" / "model.safetensors")
    # the checkpoint holds the full init_r tensors and the allocator's state, with some triplets masked already
    lora_a = {k: v for k, v in checkpoint.items() if k.endswith(".lora_A")}
    assert lora_a and all(v.shape[0] == SCHEDULE["init_r"] for v in lora_a.values())
    masks = {k: v for k, v in checkpoint.items() if k.startswith("method_state.") and k.endswith(".mask")}
    assert len(masks) == len(lora_a) and not all(bool(m.all()) for m in masks.values())
    assert any(k.endswith(".lora_E.avg_uncertainty") for k in checkpoint)

    resumed = _model()
    resumed_run = _trainer(resumed, tmp_path / "resumed")
    resumed_run.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{MID}"))
    _exact(resumed.state_dict(), full.state_dict())
    pattern = full.peft_config["default"].rank_pattern
    assert pattern == resumed.peft_config["default"].rank_pattern
    assert sum(map(sum, pattern.values())) == SCHEDULE["target_r"] * len(pattern) < SCHEDULE["init_r"] * len(pattern)
    full_losses, resumed_losses = ([r["loss"] for r in t.state.log_history if "loss" in r and r["step"] > MID]
                                   for t in (full_run, resumed_run))
    assert len(full_losses) == SCHEDULE["total_step"] - MID and resumed_losses == full_losses
    _exact(load_file(tmp_path / "resumed" / "checkpoint-12" / "model.safetensors"),
           load_file(tmp_path / "full" / "checkpoint-12" / "model.safetensors"))

    resumed.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert not any(k.startswith("method_state.") for k in saved)
    assert sorted(v.shape[0] for k, v in saved.items() if k.endswith(".lora_A")) == sorted(map(sum, pattern.values()))
    inputs = LLAMA.inputs()
    expected = logits(resumed.eval(), inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(LLAMA.model(), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(in_peft, inputs), expected, rtol=1e-5, atol=1e-6)
    in_ours = slimtune.PeftModel.from_pretrained(LLAMA.model(), tmp_path / "adapter")  # pruned shapes: other sums
    torch.testing.assert_close(logits(in_ours, inputs), expected, rtol=1e-5, atol=1e-6)


# ---- slimtune's own loop ----------------------------------------------------------------------
def _loop(out: Path):
    from tiny_run import build_llama, pad_collate, random_rows

    from slimtune.train.config import TrainConfig
    from slimtune.train.loop import Trainer as Loop
    from slimtune.train.methods import build_peft_config, prepare_model
    from slimtune.train.rng import seed_everything

    cfg = TrainConfig(batch_size=2, max_steps=SCHEDULE["total_step"], log_every=1, save_every=MID, seed=0, lr=2e-2,
                      report_to=[])
    seed_everything(cfg.seed)
    peft_config = build_peft_config("adalora", {**SCHEDULE, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    model = prepare_model(build_llama(None), "adalora", peft_config, gradient_checkpointing=False)
    return Loop(model, cfg, random_rows(9), None, pad_collate, out, progress=False)


def test_own_loop_resume_mid_pruning_is_bit_identical(tmp_path):
    full = _loop(tmp_path / "full")
    full.fit()
    crashed = _loop(tmp_path / "run")
    calls = {"n": 0}

    def crash_in_step_8(module: torch.nn.Module, args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt

    crashed.model.register_forward_pre_hook(crash_in_step_8)
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    checkpoint = tmp_path / "run" / "checkpoints" / f"step-{MID}"
    masks = {k: v for k, v in load_file(checkpoint / "method_state.safetensors").items() if k.endswith(".mask")}
    assert len(masks) == 6 and not all(bool(m.all()) for m in masks.values())  # 3 targets x 2 layers, pruning began
    resumed = _loop(tmp_path / "run")
    assert resumed.fit(resume=True).step == SCHEDULE["total_step"]
    _exact(resumed.model.state_dict(), full.model.state_dict())  # adapter + allocator state, init_r shapes
    pattern = full.model.peft_config["default"].rank_pattern
    assert pattern and resumed.model.peft_config["default"].rank_pattern == pattern
    assert sum(map(sum, pattern.values())) == SCHEDULE["target_r"] * len(pattern)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for run in ("full", "run")]
    assert len(losses[0]) == SCHEDULE["total_step"] and losses[1] == losses[0]


def test_checkpoint_state_of_another_model_is_a_clear_error():
    model = _model()
    state = dict(model.state_dict())
    state["method_state.model.layers.9.self_attn.q_proj.mask"] = torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"model\.layers\.9\.self_attn\.q_proj\.mask fits no adapted module"):
        _model().load_state_dict(state)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("method_state.")}
    state["method_state.model.layers.0.self_attn.q_proj.mask"] = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"q_proj\.mask is torch\.bool \(3,\), the model expects torch\.bool \(4,\)"):
        _model().load_state_dict(state)
    lora = slimtune.get_peft_model(LLAMA.model(), slimtune.LoraConfig(r=2, target_modules=["q_proj"]))
    lora_state = {**lora.state_dict(), "method_state.x.mask": torch.ones(1, dtype=torch.bool)}
    with pytest.raises(ValueError, match="LORA keeps no run state"):
        lora.load_state_dict(lora_state)
