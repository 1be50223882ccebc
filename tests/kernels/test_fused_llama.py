"""The fused RMSNorm/RoPE/SwiGLU swap (kernels/llama_fused.py) on tiny Llama, Qwen2 and Mistral models.

A patched model's logits and LoRA gradients equal the unpatched model's (gradient checkpointing on,
non-reentrant); the kernels are really called (counted); unknown architectures are untouched; with the
kernels not applying (mode off, CPU in mode auto) the patched model runs transformers' forward bit for bit.
On CPU the kernels run under TRITON_INTERPRET=1 (mode 'on'); `-m gpu` checks bf16 under autocast on CUDA.
"""

import copy

import pytest
import torch
import transformers as tf
from torch import nn

pytest.importorskip("triton")

from slimtune import LoraConfig, get_peft_model  # noqa: E402
from slimtune.kernels import llama_fused, lora_mlp, rms_norm, rope, set_fast_path, swiglu  # noqa: E402
from slimtune.methods.lora.layer import LoraLayer  # noqa: E402

SHAPE = dict(vocab_size=96, hidden_size=96, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)  # head dim 24: half 12, no power of two
BUILDERS = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**SHAPE)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**SHAPE)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**SHAPE, sliding_window=None)),
}
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _restore_mode():
    yield
    set_fast_path("auto")


def _pair(arch: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module, int]:
    """(unpatched, patched) LoRA models with equal weights (B != 0), checkpointing on; and the swap count."""
    torch.manual_seed(0)
    base = BUILDERS[arch]().to(device, dtype)
    base.requires_grad_(False)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_fast_path("off")  # get_peft_model swaps nothing in mode off
    plain = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=PROJ))
    for layer in plain.modules():
        if isinstance(layer, LoraLayer):
            nn.init.normal_(layer.adapters["default"].lora_B.weight, std=0.1)
            layer.set_active(["default"], trainable=True)  # see bench/training.py: Python 3.12 Protocols
    fused = copy.deepcopy(plain)
    set_fast_path("on")
    swapped = llama_fused.patch_model(fused.get_base_model())
    plain.train()
    fused.train()
    return plain, fused, swapped


def _logits_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1], device=logits.device)).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


class _Counter:
    """Counts calls of the kernel entry points (so a test fails if the swap silently does nothing). In
    training, an MLP whose three projections carry LoRA runs as one lora_mlp op (no separate swiglu)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = {"rms_norm": 0, "apply_rope": 0, "swiglu": 0, "lora_mlp": 0}
        for module in (rms_norm, rope, swiglu, lora_mlp):
            for name in self.calls:
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, self._wrap(name, getattr(module, name)))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)
        return counted


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_patched_model_matches_unpatched(arch, monkeypatch, kernel_device):
    plain, fused, swapped = _pair(arch, kernel_device)
    assert swapped == 2 * 4 + 1  # per layer: two norms, attention, MLP; plus the final norm
    names = {type(m).__name__ for m in fused.modules()}
    assert {"FusedRMSNorm", "FusedAttention", "FusedSwiGLU"} <= names
    assert plain.get_base_model().state_dict().keys() == fused.get_base_model().state_dict().keys()
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0)).to(kernel_device)
    counter = _Counter(monkeypatch)
    want_logits, want = _logits_and_grads(plain, ids)
    assert counter.calls == {"rms_norm": 0, "apply_rope": 0, "swiglu": 0, "lora_mlp": 0}
    got_logits, got = _logits_and_grads(fused, ids)
    # forward and checkpoint recomputation: 5 norms, 2 ropes, 2 MLPs, each layer's twice
    assert counter.calls == {"rms_norm": 9, "apply_rope": 4, "swiglu": 0, "lora_mlp": 4}
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert got.keys() == want.keys() and len(got) == 2 * 7 * 2
    for name in want:
        scale = want[name].abs().max().item()  # fp32 round-off grows with the gradient's size
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=name)


def test_kernels_off_means_transformers_forward_bit_for_bit():
    plain, fused, _ = _pair("llama")
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    for mode in ("off", "auto"):  # auto: CPU tensors never take the kernels
        set_fast_path(mode)
        want_logits, want = _logits_and_grads(plain, ids)
        got_logits, got = _logits_and_grads(fused, ids)
        assert torch.equal(got_logits, want_logits)
        assert all(torch.equal(got[n], want[n]) for n in want)


def test_generation_with_cache_takes_the_plain_attention():
    plain, fused, _ = _pair("llama")
    plain.eval()
    fused.eval()
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(fused.generate(input_ids=ids, **kwargs), plain.generate(input_ids=ids, **kwargs))


def test_unknown_architecture_mode_off_and_env_flag_swap_nothing(monkeypatch):
    set_fast_path("on")
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    before = [(n, type(m)) for n, m in gpt2.named_modules()]
    assert llama_fused.patch_model(gpt2) == 0
    assert [(n, type(m)) for n, m in gpt2.named_modules()] == before
    llama = BUILDERS["llama"]()
    set_fast_path("off")
    assert llama_fused.patch_model(llama) == 0
    set_fast_path("auto")
    monkeypatch.setenv(llama_fused.ENV_FLAG, "off")
    assert llama_fused.patch_model(llama) == 0
    monkeypatch.setenv(llama_fused.ENV_FLAG, "rope, swiglu")
    assert llama_fused.patch_model(llama) == 4  # attention and MLP of both layers, no norm
    assert type(llama.model.norm).__name__ == "LlamaRMSNorm"
    monkeypatch.setenv(llama_fused.ENV_FLAG, "rmsnorm,gelu")
    with pytest.raises(ValueError, match="allowed"):
        llama_fused.patch_model(llama)
    monkeypatch.delenv(llama_fused.ENV_FLAG)
    assert llama_fused.patch_model(llama) == 5 and llama_fused.patch_model(llama) == 0  # the norms; once only


def test_get_peft_model_patches_a_llama():
    set_fast_path("auto")
    model = get_peft_model(BUILDERS["llama"](), LoraConfig(r=2, target_modules=PROJ))
    layer = model.get_base_model().model.layers[0]
    assert type(layer.self_attn).__name__ == "FusedAttention" and type(layer.mlp).__name__ == "FusedSwiGLU"
    assert isinstance(layer.self_attn.q_proj, LoraLayer)  # injected layers sit inside the fused module


def test_autocast_bf16_on_cpu():
    plain, fused, _ = _pair("llama")
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_logits, want = _logits_and_grads(plain, ids)
        got_logits, got = _logits_and_grads(fused, ids)
    rel = ((got_logits.float() - want_logits.float()).norm() / want_logits.float().norm()).item()
    assert rel < 2e-2
    for name in want:
        assert ((got[name] - want[name]).norm() / want[name].norm()).item() < 5e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_gpu_patched_model_matches_unpatched_bf16_autocast(arch, monkeypatch):
    plain, fused, swapped = _pair(arch, "cuda", torch.bfloat16)
    set_fast_path("auto")
    ids = torch.randint(0, 96, (2, 37), generator=torch.Generator().manual_seed(0)).cuda()
    counter = _Counter(monkeypatch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want_logits, want = _logits_and_grads(plain, ids)
        got_logits, got = _logits_and_grads(fused, ids)
    assert swapped == 9 and counter.calls == {"rms_norm": 9, "apply_rope": 4, "swiglu": 0, "lora_mlp": 4}
    rel = ((got_logits.float() - want_logits.float()).norm() / want_logits.float().norm()).item()
    assert rel < 2e-2
    for name in want:
        assert ((got[name].float() - want[name].float()).norm() / want[name].float().norm()).item() < 5e-2, name
