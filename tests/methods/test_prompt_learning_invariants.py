"""Prompt-learning invariants without peft: left-padded batches generate like single rows, gradient
checkpointing, disable/unload/merge, multiple adapters, Trainer-style state_dict, config errors, 4-bit base."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from prompt_cases import CASES, configs, perturb
from torch import nn

import slimtune
from slimtune.config import PeftConfig
from slimtune.methods.p_tuning import PromptEncoderConfig
from slimtune.methods.prefix_tuning import PrefixTuningConfig
from slimtune.methods.prompt_tuning import PromptTuningConfig
from tiny_models import TINY_MODELS, VOCAB, logits

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
PAD = 0


def _model(case: str, model_name: str, seed: int = 1, **extra) -> slimtune.PeftModel:
    torch.manual_seed(seed)
    model = slimtune.get_peft_model(TINY_MODELS[model_name].model(), configs(case, model_name, **extra)[0])
    perturb(model.prompt_encoder["default"])
    return model.eval()


def _new_tokens(out: torch.Tensor, prompt_len: int, encoder_decoder: bool) -> torch.Tensor:
    return out if encoder_decoder else out[:, prompt_len:]


@pytest.mark.parametrize("model_name", ["llama", "t5"])
@pytest.mark.parametrize("case", ["prompt", "prefix", "ptune_mlp"])
def test_left_padded_batch_generates_like_one_by_one(case, model_name):
    model = _model(case, model_name)
    encoder_decoder = TINY_MODELS[model_name].task_type == "SEQ_2_SEQ_LM"
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, VOCAB, (n,), generator=g) for n in (7, 4, 2)]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.full((width - len(r),), PAD), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]) for r in rows]).long()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    batched = _new_tokens(model.generate(input_ids=ids, attention_mask=mask, **kwargs), width, encoder_decoder)
    for i, row in enumerate(rows):
        alone = model.generate(input_ids=row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long), **kwargs)
        alone = _new_tokens(alone, len(row), encoder_decoder)[0]
        # a row that stops early (eos) is padded in the batch
        assert torch.equal(batched[i, :len(alone)], alone), (i, batched[i], alone)
        assert (batched[i, len(alone):] == PAD).all()
    # and the prompt matters: the base model alone generates something else for some row
    with model.disable_adapter():
        base = _new_tokens(model.generate(input_ids=ids, attention_mask=mask, **kwargs), width, encoder_decoder)
    assert not torch.equal(base, batched)


def _loss_and_grads(model: slimtune.PeftModel, inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.train()
    torch.manual_seed(0)
    loss = model(**inputs).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.prompt_encoder.parameters()]
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "bloom"])
@pytest.mark.parametrize("case", ["prefix", "prefix_proj", "prompt", "ptune_lstm"])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(case, model_name):
    model = _model(case, model_name)
    inputs = TINY_MODELS[model_name].inputs()
    inputs["labels"] = inputs["input_ids"].clone()
    loss, grads = _loss_and_grads(model, inputs)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    for module in model.modules():  # count the layers that really run checkpointed
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            inner = module._gradient_checkpointing_func
            module._gradient_checkpointing_func = lambda *a, _f=inner, **k: calls.append(1) or _f(*a, **k)
    checkpointed_loss, checkpointed_grads = _loss_and_grads(model, inputs)
    assert len(calls) == 2, "both tiny decoder layers checkpoint"
    torch.testing.assert_close(checkpointed_loss, loss)
    for got, expected in zip(checkpointed_grads, grads, strict=True):
        assert expected.abs().sum() > 0
        torch.testing.assert_close(got, expected)
    # the flag that lets checkpointed layers keep the prefix is set only during the call
    assert not any("_can_checkpoint_with_cache" in vars(m) for m in model.modules())


def test_prefix_tuning_with_checkpointing_on_t5_is_refused_clearly():
    model = _model("prefix", "t5")
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs = TINY_MODELS["t5"].inputs()
    inputs["labels"] = inputs.pop("decoder_input_ids")
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(**inputs)


@pytest.mark.parametrize("case", list(CASES))
def test_disable_unload_and_merge(case):
    tiny = TINY_MODELS["llama"]
    inputs = tiny.inputs()
    base_logits = logits(tiny.model(), inputs)
    model = _model(case, "llama")
    adapted = logits(model, inputs)
    virtual = adapted.shape[1] - base_logits.shape[1]
    assert (adapted[:, virtual:] - base_logits).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), base_logits)
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match="nothing to merge"):
            merge()
    torch.testing.assert_close(logits(model, inputs), adapted)
    torch.testing.assert_close(logits(model.unload(), inputs), base_logits)


def test_prompt_adapter_loads_frozen_only_and_does_not_mix_with_lora(tmp_path):
    model = _model("ptune_mlp", "llama")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is_trainable=True"):
        slimtune.PeftModel.from_pretrained(TINY_MODELS["llama"].model(), tmp_path, is_trainable=True)
    with pytest.raises(ValueError, match="do not mix"):
        model.add_adapter("lora", slimtune.LoraConfig(r=2))
    lora = slimtune.get_peft_model(TINY_MODELS["llama"].model(), slimtune.LoraConfig(r=2))
    with pytest.raises(ValueError, match="do not mix"):
        lora.load_adapter(tmp_path, "prompt")


def test_several_prompt_adapters_switch_and_delete(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    inputs = tiny.inputs()
    model = _model("prompt", "gpt2")
    first = logits(model, inputs)
    model.save_pretrained(tmp_path / "first")
    model.add_adapter("other", PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]
    model.set_adapter("other")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_encoder.other.embedding.weight"]
    perturb(model.prompt_encoder["other"])
    other = logits(model, inputs)
    assert other.shape[1] == 7 and first.shape[1] == 10
    model.load_adapter(tmp_path / "first", "again")
    model.set_adapter("again")
    torch.testing.assert_close(logits(model, inputs), first)
    model.delete_adapter("default")
    assert sorted(model.prompt_encoder) == ["again", "other"]


def test_trainer_state_dict_holds_the_encoder_and_restores_it():
    """Trainer checkpoints save state_dict(): for P-tuning that is the MLP itself, not only its output."""
    tiny = TINY_MODELS["llama"]
    model = _model("ptune_mlp", "llama").train()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    assert sorted(saved) == sorted(f"prompt_encoder.default.{k}" for k in model.prompt_encoder["default"].state_dict())
    fresh = slimtune.get_peft_model(tiny.model(), configs("ptune_mlp", "llama")[0])
    fresh.load_state_dict(saved)
    inputs = tiny.inputs()
    torch.testing.assert_close(logits(fresh.eval(), inputs), logits(model.eval(), inputs))
    model.peft_config["default"].inference_mode = True  # an inference-mode adapter's state_dict is the file's tensor
    assert list(model.state_dict()) == ["prompt_embeddings"]


def test_trained_prompt_reduces_loss_and_only_the_encoder_moves():
    tiny = TINY_MODELS["bloom"]
    base = tiny.model()
    before = copy.deepcopy(base.state_dict())
    model = slimtune.get_peft_model(base, PromptEncoderConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    inputs = tiny.inputs()
    inputs["labels"] = inputs["input_ids"].clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    losses = []
    for _ in range(15):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.03, losses  # random tokens: the prompt can only shift the distribution
    for key, value in model.get_base_model().state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("make, message", [
    (lambda: PromptTuningConfig(), "num_virtual_tokens is required"),
    (lambda: PromptTuningConfig(num_virtual_tokens=0), "num_virtual_tokens=0"),
    (lambda: PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="WORDS"), "allowed: TEXT, SAMPLE_VOCAB"),
    (lambda: PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi"),
     "tokenizer_name_or_path"),
    (lambda: PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", tokenizer_name_or_path="x"),
     "prompt_tuning_init_text"),
    (lambda: PromptTuningConfig(num_virtual_tokens=2, tokenizer_kwargs={"a": 1}), "only used with"),
    (lambda: PrefixTuningConfig(num_virtual_tokens=2, init_weights="ones"), "init_weights='ones'"),
    (lambda: PrefixTuningConfig(num_virtual_tokens=2, num_transformer_submodules=3), "num_transformer_submodules=3"),
    (lambda: PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU"), "allowed: MLP, LSTM"),
    (lambda: PromptEncoderConfig(num_virtual_tokens=2, encoder_dropout=1.0), "encoder_dropout=1.0"),
    (lambda: PromptEncoderConfig(num_virtual_tokens=2, encoder_hidden_size=-4), "encoder_hidden_size=-4"),
])
def test_config_errors_name_the_value_and_what_is_allowed(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_prefix_tuning_refuses_sequence_classification():
    with pytest.raises(ValueError, match="task_type='SEQ_CLS' is not supported"):
        slimtune.get_peft_model(TINY_MODELS["bert_cls"].model(),
                                PrefixTuningConfig(num_virtual_tokens=2, task_type="SEQ_CLS"))


def test_configs_read_peft_json():
    data = {"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "token_dim": 32,
            "encoder_reparameterization_type": "LSTM", "peft_version": "0.21.2", "auto_mapping": None}
    config = PeftConfig.from_dict(data)
    assert isinstance(config, PromptEncoderConfig) and config.encoder_reparameterization_type.value == "LSTM"
    assert config.to_dict()["encoder_reparameterization_type"] == "LSTM"


def test_prompt_methods_on_a_4bit_base_match_the_dequantized_reference():
    linear4bit = pytest.importorskip("slimtune.quant.linear4bit", reason="slimtune.quant (4-bit) is not available")
    tiny = TINY_MODELS["llama"]
    inputs = tiny.inputs()
    for case in ("prompt", "prefix", "ptune_mlp"):
        quantized = tiny.model()
        for name, module in list(quantized.named_modules()):
            if isinstance(module, nn.Linear) and name != "lm_head":
                parent, _, child = name.rpartition(".")
                setattr(quantized.get_submodule(parent), child,
                        linear4bit.Linear4bit.from_linear(module, compute_dtype=torch.float32))
        reference = copy.deepcopy(quantized)
        for name, module in list(reference.named_modules()):
            if isinstance(module, linear4bit.Linear4bit):
                plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                plain.weight.data.copy_(module.dequantize())
                parent, _, child = name.rpartition(".")
                setattr(reference.get_submodule(parent), child, plain)
        config = configs(case, "llama")[0]
        torch.manual_seed(2)
        ours = slimtune.get_peft_model(quantized, config).eval()
        torch.manual_seed(2)
        expected = slimtune.get_peft_model(reference, configs(case, "llama")[0]).eval()
        torch.testing.assert_close(logits(ours, inputs), logits(expected, inputs), rtol=1e-4, atol=1e-5)
        trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
        assert trainable and all(n.startswith("prompt_encoder.") for n in trainable)
        out = ours.generate(input_ids=inputs["input_ids"], max_new_tokens=3, do_sample=False)
        assert torch.equal(out, expected.generate(input_ids=inputs["input_ids"], max_new_tokens=3, do_sample=False))
