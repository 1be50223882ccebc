"""The (method case x tiny model) table of the prompt-learning suites, and helpers shared by them."""

from __future__ import annotations

import peft
import torch

import slimtune
from slimtune.methods.p_tuning import PromptEncoderConfig
from slimtune.methods.prefix_tuning import PrefixTuningConfig
from slimtune.methods.prompt_tuning import PromptTuningConfig
from tiny_models import TINY_MODELS

# case -> (slimtune config class, peft config class, kwargs)
CASES = {
    "prompt": (PromptTuningConfig, peft.PromptTuningConfig, dict(num_virtual_tokens=3)),
    "prompt_vocab": (PromptTuningConfig, peft.PromptTuningConfig,
                     dict(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB")),
    "prefix": (PrefixTuningConfig, peft.PrefixTuningConfig, dict(num_virtual_tokens=3)),
    "prefix_proj": (PrefixTuningConfig, peft.PrefixTuningConfig,
                    dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8)),
    "ptune_mlp": (PromptEncoderConfig, peft.PromptEncoderConfig, dict(num_virtual_tokens=3, encoder_hidden_size=16)),
    "ptune_lstm": (PromptEncoderConfig, peft.PromptEncoderConfig,
                   dict(num_virtual_tokens=2, encoder_hidden_size=8, encoder_reparameterization_type="LSTM")),
}
GEN_MODELS = ["llama", "gpt2", "bloom", "t5"]
MODELS = GEN_MODELS + ["qwen2", "mistral"]


def configs(case: str, model_name: str, **extra):
    ours_cls, peft_cls, kwargs = CASES[case]
    kwargs = dict(kwargs, task_type=TINY_MODELS[model_name].task_type, **extra)
    return ours_cls(**kwargs), peft_cls(**kwargs)


def pair(case: str, model_name: str, seed: int = 1, **extra):
    """(slimtune model, peft model) from the same base weights and the same seed, in eval mode."""
    ours_config, peft_config = configs(case, model_name, **extra)
    tiny = TINY_MODELS[model_name]
    base_ours, base_peft = tiny.model(), tiny.model()
    torch.manual_seed(seed)
    ours = slimtune.get_peft_model(base_ours, ours_config)
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(base_peft, peft_config)
    return ours.eval(), theirs.eval()


def perturb(encoder: torch.nn.Module, seed: int = 7, scale: float = 0.5) -> None:
    """Move every encoder weight by seeded noise, so the adapter is far from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(encoder.named_parameters(), key=lambda kv: kv[0]):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def greedy_by_forward(model, input_ids: torch.Tensor, new: int, encoder_decoder: bool) -> torch.Tensor:
    """Greedy tokens from full forwards without any cache: the reference for generate()."""
    with torch.no_grad():
        if encoder_decoder:
            out = torch.zeros(input_ids.shape[0], 1, dtype=torch.long)
            for _ in range(new):
                logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                               decoder_input_ids=out).logits
                out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            return out
        out = input_ids
        for _ in range(new):
            logits = model(input_ids=out, attention_mask=torch.ones_like(out)).logits
            out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return out
