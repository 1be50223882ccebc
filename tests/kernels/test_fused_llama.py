"""The fused RMSNorm/RoPE/SwiGLU opt-in (kernels/llama_fused.py) on tiny Llama, Qwen2 and Mistral models.

A fast model's logits and LoRA gradients equal the plain model's (gradient checkpointing on,
non-reentrant); the kernels are really called (counted); unknown architectures are untouched; with the
kernels not applying (mode off, CPU in mode auto) the model runs transformers' forward bit for bit; the
modules keep their type, hooks and state; a fused forward that disagrees with transformers' is refused by
the self-check. On CPU the kernels run under TRITON_INTERPRET=1 (mode 'on'); `-m gpu` checks bf16 on CUDA.
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
    """(plain, fast) LoRA models with equal weights (B != 0), checkpointing on; and the fast module count."""
    torch.manual_seed(0)
    base = BUILDERS[arch]().to(device, dtype)
    base.requires_grad_(False)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plain = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=PROJ))
    for layer in plain.modules():
        if isinstance(layer, LoraLayer):
            nn.init.normal_(layer.adapters["default"].lora_B.weight, std=0.1)
            layer.set_active(["default"], trainable=True)  # see bench/training.py: Python 3.12 Protocols
    fused = copy.deepcopy(plain)
    set_fast_path("on")
    swapped = llama_fused.enable_fast_path(fused)
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
    assert sorted(set(llama_fused.fast_modules(fused).values())) == ["rmsnorm", "rope", "swiglu"]
    assert [type(m) for m in plain.modules()] == [type(m) for m in fused.modules()]
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


def test_generation_with_cache_takes_the_plain_attention(kernel_device):
    plain, fused, swapped = _pair("llama", kernel_device)
    assert swapped == 9
    plain.eval()
    fused.eval()
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(2)).to(kernel_device)
    kwargs = dict(max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(fused.generate(input_ids=ids, **kwargs), plain.generate(input_ids=ids, **kwargs))


def test_unknown_architecture_cpu_mode_off_and_env_flag_choose_nothing(monkeypatch):
    set_fast_path("on")
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    assert llama_fused.enable_fast_path(gpt2) == 0 and llama_fused.fast_modules(gpt2) == {}
    llama = BUILDERS["llama"]()
    for mode in ("off", "auto"):  # auto: CPU tensors never take the kernels, so nothing is switched on
        set_fast_path(mode)
        assert llama_fused.enable_fast_path(llama) == 0
    set_fast_path("on")
    monkeypatch.setenv(llama_fused.ENV_FLAG, "off")
    assert llama_fused.enable_fast_path(llama) == 0
    monkeypatch.setenv(llama_fused.ENV_FLAG, "rope, swiglu")
    assert llama_fused.enable_fast_path(llama) == 4  # attention and MLP of both layers, no norm
    assert "forward" not in vars(llama.model.norm)
    monkeypatch.setenv(llama_fused.ENV_FLAG, "rmsnorm,gelu")
    with pytest.raises(ValueError, match="allowed"):
        llama_fused.enable_fast_path(llama)
    monkeypatch.delenv(llama_fused.ENV_FLAG)
    assert llama_fused.enable_fast_path(llama) == 5 and llama_fused.enable_fast_path(llama) == 0  # the norms; once
    assert llama_fused.disable_fast_path(llama) == 9 and llama_fused.fast_modules(llama) == {}


def test_get_peft_model_changes_nothing_but_the_adapted_layers():
    set_fast_path("on")  # even where the kernels would apply, get_peft_model leaves the fast path off
    base = BUILDERS["llama"]()
    before = {n: type(m) for n, m in base.named_modules()}
    model = get_peft_model(base, LoraConfig(r=2, target_modules=PROJ))
    after = {n.removeprefix("base_model.model."): type(m) for n, m in model.named_modules()}
    changed = {n for n in before if n and after.get(n) is not before[n]}  # "" is the PeftModel wrapper
    assert changed == {f"model.layers.{i}.{a}.{p}" for i in range(2) for a, p in
                       [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
                        ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")]}
    assert llama_fused.fast_modules(model) == {} and not any("forward" in vars(m) for m in model.modules())


def test_fast_modules_keep_type_hooks_and_state():
    set_fast_path("on")
    model = get_peft_model(BUILDERS["llama"](), LoraConfig(r=2, target_modules=PROJ))
    layer = model.get_base_model().model.layers[0]
    attn, mlp, norm = layer.self_attn, layer.mlp, layer.input_layernorm
    seen = []
    attn.register_forward_hook(lambda m, args, out: seen.append(("attn", m)))
    mlp.register_forward_pre_hook(lambda m, args: seen.append(("mlp", m)))
    attn.user_state = "kept"
    assert llama_fused.enable_fast_path(model) == 9
    assert layer.self_attn is attn and layer.mlp is mlp and layer.input_layernorm is norm  # same objects
    assert isinstance(attn, tf.models.llama.modeling_llama.LlamaAttention)
    assert isinstance(mlp, tf.models.llama.modeling_llama.LlamaMLP)
    assert isinstance(norm, tf.models.llama.modeling_llama.LlamaRMSNorm)
    assert attn.user_state == "kept" and isinstance(attn.q_proj, LoraLayer)
    seen.clear()  # the self-check ran the model too
    model(input_ids=torch.tensor([[1, 2, 3]]))
    assert seen == [("attn", attn), ("mlp", mlp)]  # hooks registered before enabling still run


def test_accelerate_hooks_survive_in_both_orders():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Count(ModelHook):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def pre_forward(self, module, *args, **kwargs):
            self.calls += 1
            return args, kwargs

    set_fast_path("on")
    ids = torch.tensor([[1, 2, 3, 4]])
    model = BUILDERS["llama"]().eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    early, late = Count(), Count()
    layers = model.model.layers
    add_hook_to_module(layers[0].mlp, early)  # hooked first: its forward is accelerate's, so left alone
    assert llama_fused.enable_fast_path(model) == 8
    assert "mlp" not in {n.split(".")[-1] for n in llama_fused.fast_modules(model)
                         if n.startswith("model.layers.0.")}
    add_hook_to_module(layers[1].mlp, late)  # hooked after: accelerate wraps the fast forward
    early.calls = 0  # the self-check ran the model too
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert early.calls == 1 and late.calls == 1 and accelerate is not None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_self_check_refuses_a_fused_forward_that_disagrees(monkeypatch):
    set_fast_path("on")
    model = get_peft_model(BUILDERS["llama"](), LoraConfig(r=2, target_modules=PROJ))
    real = rope.apply_rope

    def wrong_rope(q, k, cos, sin, unsqueeze_dim=1):  # what a changed RoPE convention would look like
        return real(q, k, cos, -sin, unsqueeze_dim=unsqueeze_dim)

    monkeypatch.setattr(rope, "apply_rope", wrong_rope)
    with pytest.warns(RuntimeWarning, match=f"transformers {tf.__version__}.*relative error"):
        assert llama_fused.enable_fast_path(model) == 0
    assert llama_fused.fast_modules(model) == {} and not any("forward" in vars(m) for m in model.modules())


def test_self_check_refuses_a_fused_forward_that_raises(monkeypatch):
    set_fast_path("on")
    model = BUILDERS["qwen2"]()

    def broken(*args, **kwargs):
        raise AttributeError("'Qwen2MLP' object has no attribute 'something_new'")

    monkeypatch.setattr(swiglu, "swiglu", broken)
    with pytest.warns(RuntimeWarning, match="AttributeError"):
        assert llama_fused.enable_fast_path(model) == 0
    assert llama_fused.fast_modules(model) == {}


def test_self_check_draws_no_randomness_and_keeps_grads():
    set_fast_path("on")
    model = get_peft_model(BUILDERS["mistral"](), LoraConfig(r=2, target_modules=PROJ))
    model.train()
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    lora_b.grad = torch.full_like(lora_b, 3.0)
    torch.manual_seed(7)
    want = torch.rand(3)
    torch.manual_seed(7)
    assert llama_fused.enable_fast_path(model) == 9
    assert torch.equal(torch.rand(3), want) and model.training and bool((lora_b.grad == 3.0).all())


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
