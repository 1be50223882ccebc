"""AdaLoRA through the table-driven invariant suite (every tiny model x config case), HF peft as the oracle:
same seed -> same weights and outputs; files load both ways; merge == unmerged; disable == base; and the rank
allocator: the same training run in both libraries prunes the same triplets at the same steps, writes the
same rank_pattern, and the pruned files reload both ways."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from torch import nn

import slimtune
from layer_invariants import (
    TOL,
    assert_files_load_both_ways,
    assert_merge_disable_unload,
    assert_same_as_peft,
    assert_step_leaves_base_untouched,
    case_kwargs,
    pair,
)
from slimtune.methods.adalora import (
    AdaLoraConfig,
    RankAllocator,
    adapters_of,
    orthogonality_penalty,
)
from slimtune.methods.adalora.state import to_file
from slimtune.quant.linear4bit import Linear4bit
from tiny_models import TINY_MODELS, logits

BASE = dict(init_r=4, target_r=2, total_step=10, lora_alpha=8)
CASES = {
    "default": dict(BASE),
    "random_init": dict(BASE, init_lora_weights=False),
    "all_linear": dict(BASE, target_modules="all-linear", init_lora_weights=False),
    "lora_only_bias": dict(BASE, bias="lora_only", init_lora_weights=False),
}
MODELS = list(TINY_MODELS)


def _config(lib, model_name: str, case: str, **extra):
    kwargs = case_kwargs(CASES, model_name, case, **extra)
    if model_name == "mistral" and "target_modules" not in kwargs:
        kwargs["target_modules"] = ["q_proj", "v_proj"]  # peft has no AdaLoRA default for mistral (we do)
    return lib.AdaLoraConfig(**kwargs)


def _pair(model_name: str, case: str, **extra):
    return pair(model_name, _config(slimtune.methods.adalora, model_name, case, **extra),
                _config(peft, model_name, case, **extra))


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("case", list(CASES))
def test_same_seed_same_adapter_as_peft(model_name, case):
    ours, theirs = _pair(model_name, case)
    theirs_sd = {k: v for k, v in peft.get_peft_model_state_dict(theirs).items() if ".original_module." not in k}
    assert_same_as_peft(ours, theirs, theirs_sd, TINY_MODELS[model_name].inputs(), rtol=0, atol=0)
    assert {k.rsplit(".", 1)[1] for k in ours.adapter_state_dict() if ".lora_" in k} == {"lora_A", "lora_B", "lora_E"}
    assert not any("ranknum" in n for n, _ in ours.named_parameters()), "ranknum is a buffer, never trained"


@pytest.mark.parametrize("model_name", MODELS)
def test_files_load_both_ways(model_name, tmp_path):
    ours, theirs = _pair(model_name, "random_init")
    assert_files_load_both_ways(ours, theirs, model_name, tmp_path)


@pytest.mark.parametrize("model_name", MODELS)
def test_merge_disable_unload_invariants(model_name):
    assert_merge_disable_unload(model_name, _config(slimtune.methods.adalora, model_name, "random_init"))


@pytest.mark.parametrize("model_name", MODELS)
def test_only_adapter_parameters_train_and_base_is_untouched(model_name):
    assert_step_leaves_base_untouched(model_name, _config(slimtune.methods.adalora, model_name, "random_init"),
                                      ".adapters.default.lora_")


# ---- the rank allocator against peft's --------------------------------------------------------
SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12, lora_alpha=8,
                orth_reg_weight=0.3, beta1=0.8, beta2=0.7)
STEPS = 14  # past total_step: the final phase re-applies the frozen mask


def _lm_batch(tiny, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (2, 9), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    if tiny.task_type == "SEQ_2_SEQ_LM":
        batch["decoder_input_ids"] = ids[:, :5]
        batch["labels"] = ids[:, 1:6].clone()
    if tiny.task_type == "SEQ_CLS":
        batch["labels"] = torch.tensor([0, 2])
    return batch


def _strip(pattern: dict | None) -> dict:
    return {k.removesuffix(".default"): v for k, v in (pattern or {}).items()}


def _train(model, tiny, allocate, after_zero_grad: bool = False) -> dict[str, list]:
    """A plain loop: backward, Adam step, allocate (before or after zero_grad); records what to compare."""
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    record: dict[str, list] = {"loss": [], "pattern": []}
    for step in range(STEPS):
        torch.manual_seed(100 + step)  # the same dropout draws in both libraries (gpt2, bloom, t5, bert)
        loss = model(**_lm_batch(tiny, step)).loss
        loss.backward()
        opt.step()
        if after_zero_grad:
            opt.zero_grad(set_to_none=True)
        allocate(step)
        opt.zero_grad(set_to_none=True)
        record["loss"].append(loss.item())
        record["pattern"].append(json.dumps(_strip(model.peft_config["default"].rank_pattern), sort_keys=True))
    return record


def _trained_pair(model_name: str):
    ours, theirs = _pair(model_name, "default", **{k: v for k, v in SCHEDULE.items() if k not in BASE or
                                                   SCHEDULE[k] != BASE[k]})
    tiny = TINY_MODELS[model_name]
    ours_run = _train(ours, tiny, ours.update_and_allocate)
    theirs_run = _train(theirs, tiny, theirs.base_model.update_and_allocate)
    return ours, theirs, ours_run, theirs_run


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "t5", "bert_cls"])
def test_training_with_allocation_matches_peft_step_by_step(model_name):
    ours, theirs, ours_run, theirs_run = _trained_pair(model_name)
    np = pytest.approx
    assert ours_run["loss"] == np(theirs_run["loss"], rel=1e-5), "losses (incl. orth. reg.) must follow peft's"
    assert ours_run["pattern"] == theirs_run["pattern"], "the same triplets are pruned at the same steps"
    final = json.loads(ours_run["pattern"][-1])
    n = len(final)
    assert sum(sum(kept) for kept in final.values()) == SCHEDULE["target_r"] * n
    # masked singular values are zero in both, after the last (final-phase) step
    for key, kept in final.items():
        module = key.removesuffix(".lora_E")
        e = ours.get_base_model().get_submodule(module).adapters["default"].lora_E
        assert torch.all(e[~torch.tensor(kept)] == 0)
    theirs_sd = peft.get_peft_model_state_dict(theirs)  # peft's is pruned: compare with what our file holds
    ours_sd = to_file(ours.adapter_state_dict(), ours.peft_config["default"], "default")
    assert ours_sd.keys() == theirs_sd.keys()
    for key, value in ours_sd.items():
        torch.testing.assert_close(value, theirs_sd[key], rtol=1e-4, atol=1e-6, msg=key)


def test_budget_schedule_matches_peft():
    ours, theirs = _pair("llama", "default", **SCHEDULE)
    config = ours.peft_config["default"]
    allocator = RankAllocator(config, adapters_of(ours.get_base_model(), "default"))
    budgets = [allocator.budget_schedule(step) for step in range(STEPS)]
    assert budgets == [theirs.base_model.rankallocator.budget_schedule(step) for step in range(STEPS)]
    assert budgets[0] == (16, False) and budgets[-1] == (8, True)
    assert [b for b, _ in budgets] == sorted((b for b, _ in budgets), reverse=True)


def test_allocation_after_zero_grad_equals_before_it():
    """slimtune's loop (and Trainer's on_step_end) run after zero_grad(set_to_none=True): same result."""
    tiny = TINY_MODELS["llama"]
    before, _ = _pair("llama", "default", **SCHEDULE)
    after = copy.deepcopy(before)  # a copy must capture its own gradients too
    run_before = _train(before, tiny, before.update_and_allocate)
    run_after = _train(after, tiny, after.update_and_allocate, after_zero_grad=True)
    assert run_before == run_after


def test_orthogonality_penalty_equals_peft_and_enters_the_training_loss():
    ours, theirs = _pair("llama", "random_init", orth_reg_weight=0.7)
    tiny = TINY_MODELS["llama"]
    batch = _lm_batch(tiny, 0)
    penalty = orthogonality_penalty(ours.get_base_model(), ours.peft_config["default"], "default")
    assert penalty.item() > 0.1
    ours.train(), theirs.train()
    theirs_loss = theirs(**batch).loss
    plain = ours.get_base_model()(**batch).loss
    torch.testing.assert_close(plain + penalty, theirs_loss)
    torch.testing.assert_close(ours(**batch).loss, theirs_loss)
    penalty.backward()
    assert all(p.grad is not None for n, p in ours.named_parameters() if "lora_A" in n or "lora_B" in n)


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_pruned_adapter_files_load_both_ways(model_name, tmp_path):
    ours, theirs, _, _ = _trained_pair(model_name)
    tiny = TINY_MODELS[model_name]
    inputs = tiny.inputs()
    ours.eval(), theirs.eval()
    expected = logits(ours, inputs)
    torch.testing.assert_close(expected, logits(theirs, inputs), rtol=1e-4, atol=1e-5)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert ours_cfg["rank_pattern"] == theirs_cfg["rank_pattern"]
    assert all(len(kept) == SCHEDULE["init_r"] for kept in ours_cfg["rank_pattern"].values())
    from safetensors.torch import load_file
    ours_file, theirs_file = load_file(tmp_path / "ours/adapter_model.safetensors"), \
        load_file(tmp_path / "theirs/adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours_file.items()} == {k: tuple(v.shape) for k, v in theirs_file.items()}
    assert any(v.shape[0] < SCHEDULE["init_r"] for k, v in ours_file.items() if k.endswith("lora_A"))
    for key in ours_file:
        torch.testing.assert_close(ours_file[key], theirs_file[key], rtol=1e-4, atol=1e-6, msg=key)
    for folder in ("ours", "theirs"):
        in_ours = slimtune.PeftModel.from_pretrained(tiny.model(), tmp_path / folder).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            in_peft = peft.PeftModel.from_pretrained(tiny.model(), tmp_path / folder).eval()
        torch.testing.assert_close(logits(in_ours, inputs), expected, **TOL)
        torch.testing.assert_close(logits(in_peft, inputs), expected, **TOL)
        merged = in_ours.merge_and_unload()
        torch.testing.assert_close(logits(merged, inputs), expected, **TOL)


def test_warning_when_trained_without_the_allocator(tmp_path):
    tiny = TINY_MODELS["llama"]
    model = slimtune.get_peft_model(tiny.model(), AdaLoraConfig(**BASE))
    model.train()
    model(**_lm_batch(tiny, 0)).loss.backward()
    with pytest.warns(UserWarning, match="rank allocator was never called"):
        model.save_pretrained(tmp_path)
    fresh = slimtune.get_peft_model(tiny.model(), AdaLoraConfig(**BASE))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.save_pretrained(tmp_path / "fresh")  # no training: no warning


def test_allocator_without_gradients_is_a_clear_error():
    model = slimtune.get_peft_model(TINY_MODELS["llama"].model(), AdaLoraConfig(**BASE))
    with pytest.raises(ValueError, match="found no gradient for model.layers.0.self_attn.q_proj.lora_A"):
        model.update_and_allocate(0)


# ---- transformers.Trainer ---------------------------------------------------------------------
class _Rows(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = _lm_batch(TINY_MODELS["llama"], i)
        return {k: v[0] for k, v in batch.items()}


def _trainer(model, tmp_path, callbacks):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=SCHEDULE["total_step"],
                             learning_rate=5e-2, report_to=[], seed=0, use_cpu=True, save_strategy="no",
                             logging_steps=1, lr_scheduler_type="constant")
    return Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=callbacks)


def test_trainer_callback_allocates_like_peft(tmp_path):
    from slimtune.methods.adalora import AdaLoraCallback

    ours, theirs = _pair("llama", "default", **SCHEDULE)
    _trainer(ours, tmp_path / "a", [AdaLoraCallback()]).train()
    _trainer(theirs, tmp_path / "b", [AdaLoraCallback()]).train()  # the callback drives peft's model too
    ours_pattern = ours.peft_config["default"].rank_pattern
    assert ours_pattern and _strip(ours_pattern) == _strip(theirs.peft_config["default"].rank_pattern)
    assert sum(sum(v) for v in ours_pattern.values()) == SCHEDULE["target_r"] * len(ours_pattern)


def test_trainer_event_order_the_callback_relies_on(tmp_path):
    """on_optimizer_step still sees gradients; on_step_end does not (zero_grad ran): hence the callback's event."""
    from transformers import TrainerCallback

    seen = {}

    class Probe(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen.setdefault("optimizer_step", (state.global_step, _has_grads(model)))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.setdefault("step_end", (state.global_step, _has_grads(model)))

    def _has_grads(model):
        return all(p.grad is not None for p in model.parameters() if p.requires_grad)

    model = slimtune.get_peft_model(TINY_MODELS["llama"].model(), AdaLoraConfig(**BASE))
    trainer = _trainer(model, tmp_path, [Probe()])
    trainer.args.max_steps = 1
    trainer.train()
    assert seen == {"optimizer_step": (0, True), "step_end": (1, False)}


# ---- configuration ----------------------------------------------------------------------------
def test_peft_config_files_load_and_ours_round_trip():
    theirs = peft.AdaLoraConfig(init_r=6, target_r=3, total_step=50, target_modules=["q", "v"], tinit=5)
    data = json.loads(json.dumps(theirs.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    ours = slimtune.PeftConfig.from_dict(data)
    assert isinstance(ours, AdaLoraConfig) and (ours.init_r, ours.target_r, ours.total_step) == (6, 3, 50)
    assert AdaLoraConfig.from_dict(ours.to_dict()) == ours


@pytest.mark.parametrize("kwargs, message", [
    (dict(total_step=None), "total_step to be a positive integer .*total_step=None"),
    (dict(total_step=0), "total_step=0"),
    (dict(total_step=10, init_r=4, target_r=6), "target_r=6 must be <= init_r=4"),
    (dict(total_step=10, tinit=6, tfinal=4), "tinit=6, tfinal=4, total_step=10 leave no budgeting phase"),
    (dict(total_step=10, beta1=1.0), "beta1=1.0 must be in"),
    (dict(total_step=10, orth_reg_weight=-1), "orth_reg_weight=-1"),
    (dict(total_step=10, use_dora=True), "use_dora=True is not supported"),
    (dict(total_step=10, rank_pattern={"q.lora_E": [1, 0]}), r"rank_pattern\['q.lora_E'\] must be a list of booleans"),
])
def test_config_errors_name_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaLoraConfig(**kwargs)


def test_r_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="r=16 is not used by AdaLoRA"):
        AdaLoraConfig(total_step=10, r=16)


# ---- 4-bit base -------------------------------------------------------------------------------
def test_adalora_on_4bit_base_trains_allocates_and_unloads_to_linear():
    tiny = TINY_MODELS["llama"]
    inputs = tiny.inputs()

    def quantized():
        model = tiny.model()
        for layer in model.model.layers:
            for name in ("q_proj", "v_proj"):
                linear = getattr(layer.self_attn, name)
                setattr(layer.self_attn, name, Linear4bit.from_linear(linear, compute_dtype=torch.float32))
        return model

    def dequantized():
        model = quantized()
        for layer in model.model.layers:
            for name in ("q_proj", "v_proj"):
                q = getattr(layer.self_attn, name)
                plain = nn.Linear(q.in_features, q.out_features, bias=False)
                plain.weight.data.copy_(q.dequantize())
                setattr(layer.self_attn, name, plain)
        return model

    config = AdaLoraConfig(**dict(SCHEDULE, init_lora_weights=False))
    q_base, float_base = quantized(), dequantized()
    torch.manual_seed(3)
    model = slimtune.get_peft_model(q_base, config)
    torch.manual_seed(3)
    ref = slimtune.get_peft_model(float_base, config)
    assert isinstance(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    run = _train(model, tiny, model.update_and_allocate)
    ref_run = _train(ref, tiny, ref.update_and_allocate)
    assert run["loss"] == pytest.approx(ref_run["loss"], rel=1e-4)
    final = json.loads(run["pattern"][-1])
    assert sum(sum(v) for v in final.values()) == SCHEDULE["target_r"] * len(final)
    model.eval()
    expected = logits(model, inputs)
    with pytest.raises(ValueError, match="cannot merge .* 4-bit"):
        model.merge_adapter()
    merged = model.merge_and_unload()
    assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(logits(merged, inputs), expected, **TOL)
