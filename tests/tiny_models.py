"""Tiny random models, one per architecture family, built from configs (seconds on 2 CPU cores)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import transformers as tf

VOCAB = 96


@dataclasses.dataclass(frozen=True)
class TinyModel:
    """A name, a builder, and a function that makes model inputs."""

    name: str
    build: Callable[[], torch.nn.Module]
    task_type: str
    conv1d: bool = False

    def inputs(self, batch: int = 2, seq: int = 7) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(123)
        ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.task_type == "SEQ_2_SEQ_LM":
            out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
        return out

    def model(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()


def _llama() -> torch.nn.Module:
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


def _qwen2() -> torch.nn.Module:
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


def _mistral() -> torch.nn.Module:
    return tf.MistralForCausalLM(tf.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=None))


def _gpt2() -> torch.nn.Module:
    return tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2))


def _bloom() -> torch.nn.Module:
    return tf.BloomForCausalLM(tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4))


def _t5() -> torch.nn.Module:
    return tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0))


def _bert_cls() -> torch.nn.Module:
    return tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3))


TINY_MODELS = {
    m.name: m for m in [
        TinyModel("llama", _llama, "CAUSAL_LM"),
        TinyModel("qwen2", _qwen2, "CAUSAL_LM"),
        TinyModel("mistral", _mistral, "CAUSAL_LM"),
        TinyModel("gpt2", _gpt2, "CAUSAL_LM", conv1d=True),
        TinyModel("bloom", _bloom, "CAUSAL_LM"),
        TinyModel("t5", _t5, "SEQ_2_SEQ_LM"),
        TinyModel("bert_cls", _bert_cls, "SEQ_CLS"),
    ]
}


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits
