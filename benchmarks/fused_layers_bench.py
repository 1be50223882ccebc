"""Fused RMSNorm / RoPE / SwiGLU vs transformers' eager code at Llama-3.1-8B shapes, bf16, one card.

    python benchmarks/fused_layers_bench.py [--tokens 2048] [--layers 2]

Per kernel: forward, forward+backward (microseconds, median of triton.testing.do_bench) and the memory
autograd keeps for backward (MB), for ours and for eager. Eager is the transformers code itself
(LlamaRMSNorm, apply_rotary_pos_emb, SiLU * up). Then a few 8B-shape decoder layers with LoRA r=16 on all
seven projections and non-reentrant checkpointing, forward+backward with the fused layers on and off
(SLIMTUNE_FUSED_LAYERS), all other fast paths on, to show what they add per layer. GPU only.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch

DEVICE = "cuda"


def _time(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3


def _saved_mb(fn) -> float:
    """Memory held after forward (outputs and what autograd saved), minus the output itself."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = fn()
    outs = out if isinstance(out, tuple) else (out,)
    held = torch.cuda.memory_allocated() - before - sum(o.numel() * o.element_size() for o in outs)
    del out, outs
    return held / 2**20


def _row(name: str, fwd, inputs: list[torch.Tensor]) -> tuple[str, float, float, float]:
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with torch.no_grad():
        out = fwd(*leaves)
    cots = [torch.randn_like(o) for o in (out if isinstance(out, tuple) else (out,))]

    def fb() -> None:
        o = fwd(*leaves)
        torch.autograd.backward(o if isinstance(o, tuple) else (o,), cots)
        for t in leaves:
            t.grad = None

    with torch.no_grad():
        us_f = _time(lambda: fwd(*leaves))
    return name, us_f, _time(fb), _saved_mb(lambda: fwd(*leaves))


def kernel_rows(tokens: int) -> list[tuple[str, float, float, float]]:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    from slimtune.kernels.rms_norm import rms_norm
    from slimtune.kernels.rope import apply_rope
    from slimtune.kernels.swiglu import swiglu

    dev, bf = DEVICE, torch.bfloat16
    x = torch.randn(1, tokens, 4096, device=dev, dtype=bf)
    norm = LlamaRMSNorm(4096, eps=1e-5).to(dev, bf).requires_grad_(False)  # frozen, as in LoRA training
    w = norm.weight
    q = torch.randn(1, tokens, 32, 128, device=dev, dtype=bf)
    k = torch.randn(1, tokens, 8, 128, device=dev, dtype=bf)
    inv = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, device=dev).float() / 128))
    freqs = torch.arange(tokens, device=dev).float()[:, None] * inv
    emb = torch.cat((freqs, freqs), -1)[None]
    cos, sin = emb.cos().to(bf), emb.sin().to(bf)
    g = torch.randn(1, tokens, 14336, device=dev, dtype=bf)
    u = torch.randn(1, tokens, 14336, device=dev, dtype=bf)
    act = torch.nn.SiLU()

    def eager_rope(a, b):  # the attention's own call: (B, H, T, D) views of the projection layout
        return apply_rotary_pos_emb(a.transpose(1, 2), b.transpose(1, 2), cos, sin)

    return [
        _row("rmsnorm eager", norm, [x]),
        _row("rmsnorm slimtune", lambda a: rms_norm(a, w, 1e-5), [x]),
        _row("rope eager", eager_rope, [q, k]),
        _row("rope slimtune", lambda a, b: apply_rope(a, b, cos, sin, unsqueeze_dim=2), [q, k]),
        _row("swiglu eager", lambda a, b: act(a) * b, [g, u]),
        _row("swiglu slimtune", swiglu, [g, u]),
    ]


def layer_rows(tokens: int, layers: int) -> list[tuple[str, float, float, float]]:
    """Forward+backward of `layers` 8B-shape decoder layers with LoRA, fused layers on vs off."""
    import transformers as tf

    from slimtune import LoraConfig, enable_fast_path, get_peft_model
    from slimtune.kernels.llama_fused import ENV_FLAG, fast_modules
    from slimtune.methods.lora.layer import LoraLayer

    rows = []
    for fused in (False, True):
        os.environ[ENV_FLAG] = "on" if fused else "off"
        torch.manual_seed(0)
        config = tf.LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                                num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, use_cache=False,
                                max_position_embeddings=max(tokens, 64), attn_implementation="sdpa")
        with torch.device(DEVICE):  # random init on the card: seconds less than on the host
            model = tf.LlamaForCausalLM(config).to(torch.bfloat16).requires_grad_(False)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        for layer in model.modules():  # see bench/training.py: Python 3.12 Protocols
            if isinstance(layer, LoraLayer):
                layer.set_active(["default"], trainable=True)
        enable_fast_path(model)
        model.train()
        inner = model.get_base_model().model
        kinds = sorted(set(fast_modules(model).values()))
        ids = torch.randint(0, 1024, (1, tokens), device=DEVICE)

        def fb(inner=inner, ids=ids) -> None:
            inner(input_ids=ids).last_hidden_state.float().square().mean().backward()

        torch.cuda.reset_peak_memory_stats()
        us = _time(fb)
        peak = torch.cuda.max_memory_allocated() / 2**20
        rows.append((f"{layers} layers {'fused' if fused else 'eager'} {kinds}", float("nan"), us, peak))
        del model, inner, fb
        gc.collect()  # PeftModel <-> AdaptedModel is a reference cycle: freed by the collector only
        torch.cuda.empty_cache()
    os.environ.pop(ENV_FLAG, None)
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args()
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  tokens {args.tokens}  bf16")
    print(f"{'case':<60} {'fwd us':>9} {'fwd+bwd us':>11} {'saved/peak MB':>14}")
    for name, f, fb, mb in kernel_rows(args.tokens) + layer_rows(args.tokens, args.layers):
        print(f"{name:<60} {f:>9.1f} {fb:>11.1f} {mb:>14.1f}", flush=True)
