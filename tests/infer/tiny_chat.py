"""A tiny chat model on disk for inference tests: byte-level BPE tokenizer with a ChatML template (trained
offline in well under a second), a random 2-layer Llama whose vocabulary matches it, and LoRA adapters
with random (non-zero) B so that each adapter changes the output. Folders look like what `slimtune train`
writes: base model folder; adapter folder with adapter files + tokenizer + generation_config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CORPUS = [
    "system user assistant You are a helpful assistant. Hello there! How are you? I am fine, thank you.",
    "What does the word cat mean? A small domesticated feline. The dog ran to the big red tree.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。白日依山尽，黄河入海流。",
    "Rating: [[7]] The answer is correct and helpful. [[A]] [[B]] [[C]] 1 2 3 4 5 6 7 8 9 10",
] * 4


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def tiny_llama(vocab_size: int, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger logits: greedy choices are far from ties
        model.lm_head.weight.mul_(8.0)
    return model


def add_random_lora(model, seed: int, scale: float = 0.3, targets: list[str] | None = None):
    """A PeftModel with one LoRA adapter whose B is random, so it changes the logits."""
    from slimtune import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets or TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * scale)
    return peft.eval()


@dataclass
class TinyChat:
    base: Path
    adapters: dict[str, Path]


def build_tiny_chat(root: Path, adapter_seeds: dict[str, int] | None = None) -> TinyChat:
    from transformers import GenerationConfig

    tokenizer = tiny_tokenizer()
    base_dir = root / "tiny-base"
    model = tiny_llama(len(tokenizer))
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(eos_token_id=[eot], pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=tokenizer.bos_token_id)
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    adapters = {}
    for name, seed in (adapter_seeds or {"alpha": 1, "beta": 2}).items():
        peft = add_random_lora(tiny_llama(len(tokenizer)), seed)
        out = root / name / "adapter"
        peft.save_pretrained(out)
        tokenizer.save_pretrained(out)
        model.generation_config.save_pretrained(out)
        adapters[name] = out
    return TinyChat(base_dir, adapters)


def cli_app():
    """A typer app with slimtune's inference/eval commands, registered as main.py registers them."""
    import importlib

    import typer

    app = typer.Typer(pretty_exceptions_enable=False)
    app.callback()(lambda: None)  # a group even when one command is there
    for module, name, func in [("eval_cmd", "eval", "eval_command"), ("chat_cmd", "chat", "chat_command"),
                               ("merge_cmd", "merge", "merge_command"), ("export_cmd", "export", "export_command"),
                               ("serve_cmd", "serve", "serve_command")]:
        try:
            command = getattr(importlib.import_module(f"slimtune.cli.{module}"), func)
        except ModuleNotFoundError:
            continue
        app.command(name)(command)
    return app


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory) -> TinyChat:
    """The model and adapters on disk, built once per session for each test folder that imports this."""
    return build_tiny_chat(tmp_path_factory.mktemp("tiny_chat"))


@pytest.fixture(scope="session")
def loaded(tiny_chat):
    from slimtune.infer import load_for_inference

    return load_for_inference(tiny_chat.base, adapters=tiny_chat.adapters, device="cpu")
