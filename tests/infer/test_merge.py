"""Merging: the saved model equals the unmerged adapter (logits and greedy text), QLoRA bases are
dequantized (never re-quantized), the logit check fails loudly, and `slimtune merge` works."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_chat import add_random_lora, cli_app, tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from slimtune.infer import SamplingOptions, generate, load_for_inference
from slimtune.infer.generation import render_chat
from slimtune.infer.merge import MergeCheckFailed, check_inputs, merge_to_dir


def _logits(model, inputs):
    with torch.no_grad():
        return [model(input_ids=ids).logits.float() for ids in inputs]


def test_merge_fp32_matches_unmerged(tiny_chat, tmp_path):
    out = tmp_path / "merged"
    report = merge_to_dir(str(tiny_chat.base), tiny_chat.adapters["alpha"], out, device="cpu", dtype="fp32")
    assert report.max_logit_diff < 1e-4 and report.quantized_base is False and report.dtype == "float32"
    assert json.loads((out / "slimtune_merge.json").read_text())["max_logit_diff"] == report.max_logit_diff
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    unmerged = load_for_inference(tiny_chat.base, {"a": tiny_chat.adapters["alpha"]}, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == unmerged.tokenizer.chat_template and tokenizer.padding_side == "right"
    assert merged.generation_config.eos_token_id == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    inputs = check_inputs(unmerged.tokenizer, torch.device("cpu"))
    for a, b in zip(_logits(unmerged.model, inputs), _logits(merged, inputs)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    merged_loaded = load_for_inference(out, device="cpu")
    prompt = render_chat(tokenizer, [{"role": "user", "content": "Hello there!"}])
    greedy = SamplingOptions(max_new_tokens=10)
    assert generate(merged_loaded, [prompt], greedy)[0].token_ids == generate(unmerged, [prompt], greedy, adapter="a")[0].token_ids


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """A QLoRA-style run folder: adapter on q/v only (other layers stay 4-bit) and config.yaml method qlora."""
    root = tmp_path_factory.mktemp("qlora")
    tokenizer = tiny_tokenizer()
    base_dir = root / "base"
    tiny_llama(len(tokenizer)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    peft = add_random_lora(tiny_llama(len(tokenizer)), seed=5, targets=["q_proj", "v_proj"])
    peft.save_pretrained(root / "run" / "adapter")
    (root / "run" / "config.yaml").write_text("method: qlora\nquant:\n  type: nf4\n  double_quant: true\n")
    return base_dir, root / "run" / "adapter"


def test_qlora_merge_dequantizes_never_requantizes(qlora_run, tmp_path):
    base_dir, adapter = qlora_run
    out = tmp_path / "merged"
    report = merge_to_dir(str(base_dir), adapter, out, device="cpu", dtype="fp32")  # auto -> nf4 from config.yaml
    assert report.quantized_base is True
    assert report.dequantized_layers == 2 * 5  # k, o, gate, up, down in each of 2 layers
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())
    # the unmerged 4-bit model, loaded the same way: logits agree, and plain layers hold dequantized NF4
    unmerged = load_for_inference(base_dir, {"a": adapter}, quantization="nf4", dtype="fp32", device="cpu")
    inputs = check_inputs(unmerged.tokenizer, torch.device("cpu"))
    for a, b in zip(_logits(unmerged.model, inputs), _logits(merged, inputs)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    four_bit = unmerged.model.get_base_model().model.layers[0].self_attn.k_proj
    assert type(four_bit).__name__ == "Linear4bit"
    torch.testing.assert_close(merged.model.layers[0].self_attn.k_proj.weight, four_bit.dequantize())
    original = AutoModelForCausalLM.from_pretrained(base_dir).model.layers[0].self_attn.k_proj.weight
    assert not torch.equal(merged.model.layers[0].self_attn.k_proj.weight, original)  # NF4-rounded, as trained


def test_check_failure_writes_nothing_and_cli_exits_nonzero(tiny_chat, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(MergeCheckFailed, match=r"merge check failed: .* differ .* by up to"):
        merge_to_dir(str(tiny_chat.base), tiny_chat.adapters["alpha"], out, device="cpu", dtype="fp32",
                     max_logit_diff=1e-12)
    assert not out.exists()
    result = CliRunner().invoke(cli_app(), ["merge", "--model", str(tiny_chat.base), "--adapter",
                                            str(tiny_chat.adapters["beta"]), "--output", str(out),
                                            "--max-logit-diff", "1e-12", "--device", "cpu", "--dtype", "fp32"])
    assert result.exit_code == 2 and "merge check failed" in result.output and not out.exists()
    ok = CliRunner().invoke(cli_app(), ["merge", "--model", str(tiny_chat.base), "--adapter",
                                        str(tiny_chat.adapters["beta"]), "--output", str(out), "--device", "cpu"])
    assert ok.exit_code == 0, ok.output
    assert "max |logit diff|" in ok.output and (out / "model.safetensors").is_file()
    again = CliRunner().invoke(cli_app(), ["merge", "--model", str(tiny_chat.base), "--adapter",
                                           str(tiny_chat.adapters["beta"]), "--output", str(out)])
    assert again.exit_code == 2 and "exists and is not empty" in again.output
