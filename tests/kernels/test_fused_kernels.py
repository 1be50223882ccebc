"""Triton RMSNorm, RoPE and SwiGLU against their torch references (transformers' Llama math): values and grads.

On CPU the kernels run under TRITON_INTERPRET=1 on small, odd shapes (hidden 576 as SmolLM2, rows that are
no multiple of a block, head dims whose half is no power of two); `-m gpu` runs 8B shapes in bf16.
The interpreter truncates fp32 -> bf16 instead of rounding, so bf16 checks allow two bf16 ulps there.
"""

import pytest
import torch

pytest.importorskip("triton")

from slimtune.kernels.rms_norm import rms_norm, rms_norm_reference  # noqa: E402
from slimtune.kernels.rope import apply_rope, rope_reference  # noqa: E402
from slimtune.kernels.swiglu import swiglu, swiglu_reference  # noqa: E402

BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def _value_and_grads(fn, inputs: list[torch.Tensor], seed: int = 0):
    """fn(*inputs) and the grads of every input that requires grad, for one fixed random cotangent."""
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    cots = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return outs, torch.autograd.grad(outs, wrt, cots)


def _leaves(*tensors: torch.Tensor, grad: tuple[bool, ...] | None = None) -> list[torch.Tensor]:
    grad = grad or (True,) * len(tensors)
    return [t.detach().clone().requires_grad_(g) for t, g in zip(tensors, grad, strict=True)]


def _assert_all_close(got, want, **tol) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("shape,dtype,weight_grad", [
    ((3, 5, 576), torch.float32, True),  # SmolLM2 hidden, 15 rows
    ((7, 96), torch.float32, False),
    ((2, 9, 200), torch.bfloat16, True),
])
def test_rms_norm_matches_reference(shape, dtype, weight_grad, kernel_device):
    torch.manual_seed(0)
    x = torch.randn(shape, device=kernel_device).to(dtype) * 3
    w = (1 + 0.1 * torch.randn(shape[-1], device=kernel_device)).to(dtype)
    mine = _value_and_grads(lambda a, b: rms_norm(a, b, 1e-5), _leaves(x, w, grad=(True, weight_grad)))
    ref = _value_and_grads(lambda a, b: rms_norm_reference(a, b, 1e-5), _leaves(x, w, grad=(True, weight_grad)))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else BF16_TOL
    _assert_all_close(mine[0], ref[0], **tol)
    _assert_all_close(mine[1], ref[1], **(tol if dtype == torch.float32 else dict(rtol=3e-2, atol=1e-1)))


def test_rms_norm_mixed_dtypes_and_errors(kernel_device):
    x = torch.randn(4, 64, device=kernel_device).bfloat16()
    w = torch.rand(64, device=kernel_device) + 0.5  # fp32 weight, bf16 input: fp32 output, as eager
    y = rms_norm(x, w, 1e-6)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, rms_norm_reference(x, w, 1e-6), **BF16_TOL)
    with pytest.raises(ValueError, match="does not match x's last dim"):
        rms_norm(x, w[:10], 1e-6)
    with pytest.raises(TypeError, match="not supported"):
        rms_norm(x.double(), w, 1e-6)


def _cos_sin(batch: int, n_pos: int, dim: int, device: str, duplicated: bool = True):
    """transformers' cos/sin (both halves equal) or arbitrary ones, (batch, n_pos, dim) fp32."""
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    pos = torch.arange(n_pos, dtype=torch.float32)[None, :, None] + torch.arange(batch)[:, None, None] * 3
    freqs = pos * inv
    emb = torch.cat((freqs, freqs), dim=-1) if duplicated else torch.cat((freqs, 1.7 * freqs + 0.3), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


@pytest.mark.parametrize("layout,batch_cos,dim,duplicated", [
    (1, 1, 64, True),  # (B, H, T, D), cos broadcast over the batch
    (2, 2, 80, True),  # (B, T, H, D), half = 40: no power of two
    (2, 2, 32, False),  # arbitrary cos/sin: the backward is the exact transpose
])
def test_rope_matches_reference(layout, batch_cos, dim, duplicated, kernel_device):
    torch.manual_seed(1)
    b, t, hq, hk = 2, 7, 6, 2
    q = torch.randn(b, t, hq, dim, device=kernel_device)
    k = torch.randn(b, t, hk, dim, device=kernel_device)
    if layout == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # the strided views attention works on
    cos, sin = _cos_sin(batch_cos, t, dim, kernel_device, duplicated)
    mine = _value_and_grads(lambda a, c: apply_rope(a, c, cos, sin, unsqueeze_dim=layout), _leaves(q, k))
    ref = _value_and_grads(lambda a, c: rope_reference(a, c, cos, sin, unsqueeze_dim=layout), _leaves(q, k))
    _assert_all_close(mine[0], ref[0], rtol=1e-5, atol=1e-5)
    _assert_all_close(mine[1], ref[1], rtol=1e-5, atol=1e-5)


def test_rope_inplace_bf16_and_errors(kernel_device):
    torch.manual_seed(2)
    q0 = torch.randn(1, 5, 4, 64, device=kernel_device).bfloat16()
    k0 = torch.randn(1, 5, 2, 64, device=kernel_device).bfloat16()
    cos, sin = (c.bfloat16() for c in _cos_sin(1, 5, 64, kernel_device))
    ql, kl = _leaves(q0, k0)
    q, k = ql * 1, kl * 1  # non-leaf tensors, as projection outputs are
    qo, ko = apply_rope(q, k, cos, sin, unsqueeze_dim=2, inplace=True)
    assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
    (qo.float().sum() + 2 * ko.float().sum()).backward()
    ref = _leaves(q0, k0)
    rq, rk = rope_reference(*ref, cos, sin, unsqueeze_dim=2)
    (rq.float().sum() + 2 * rk.float().sum()).backward()
    _assert_all_close((qo, ko, ql.grad, kl.grad), (rq, rk, ref[0].grad, ref[1].grad), **BF16_TOL)
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        apply_rope(q0, k0, cos, sin, unsqueeze_dim=3)
    with pytest.raises(ValueError, match="do not agree"):
        apply_rope(q0, k0[:, :4], cos, sin, unsqueeze_dim=2)
    with pytest.raises(ValueError, match="require grad"):
        apply_rope(q0, k0, cos.requires_grad_(), sin, unsqueeze_dim=2)


@pytest.mark.parametrize("shape,dtype", [((3, 7, 173), torch.float32), ((5, 344), torch.bfloat16)])
def test_swiglu_matches_reference(shape, dtype, kernel_device):
    torch.manual_seed(3)
    g = (torch.randn(shape, device=kernel_device) * 4).to(dtype)
    u = torch.randn(shape, device=kernel_device).to(dtype)
    mine = _value_and_grads(swiglu, _leaves(g, u))
    ref = _value_and_grads(swiglu_reference, _leaves(g, u))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else BF16_TOL
    _assert_all_close(mine[0], ref[0], **tol)
    _assert_all_close(mine[1], ref[1], **tol)
    with pytest.raises(ValueError, match="one shape"):
        swiglu(g, u[..., :-1])


# --- GPU: 8B shapes (hidden 4096, intermediate 14336, 32 x 128 query heads, 8 kv heads), bf16 ---------

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
def test_gpu_rms_norm_8b_bf16():
    torch.manual_seed(0)
    x = torch.randn(2, 2048, 4096, device="cuda", dtype=torch.bfloat16)
    w = (1 + 0.1 * torch.randn(4096, device="cuda")).bfloat16()
    mine = _value_and_grads(lambda a, b: rms_norm(a, b, 1e-5), _leaves(x, w))
    ref = _value_and_grads(lambda a, b: rms_norm_reference(a, b, 1e-5), _leaves(x, w))
    # forward keeps eager's roundings: equal up to the order of the sum of squares
    assert (mine[0][0] != ref[0][0]).float().mean().item() < 1e-2
    torch.testing.assert_close(mine[0][0], ref[0][0], rtol=1.6e-2, atol=1e-2)
    assert _rel(mine[1][0], ref[1][0]) < 1e-2 and _rel(mine[1][1], ref[1][1]) < 1e-2


@pytest.mark.gpu
def test_gpu_rope_8b_bf16():
    torch.manual_seed(0)
    q = torch.randn(2, 2048, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2048, 8, 128, device="cuda", dtype=torch.bfloat16)
    cos, sin = (c.bfloat16() for c in _cos_sin(1, 2048, 128, "cuda"))
    mine = _value_and_grads(lambda a, c: apply_rope(a, c, cos, sin, unsqueeze_dim=2), _leaves(q, k))
    ref = _value_and_grads(lambda a, c: rope_reference(a, c, cos, sin, unsqueeze_dim=2), _leaves(q, k))
    for a, b in zip((*mine[0], *mine[1]), (*ref[0], *ref[1]), strict=True):
        torch.testing.assert_close(a, b, rtol=1.6e-2, atol=2e-2)
        assert _rel(a, b) < 5e-3


@pytest.mark.gpu
def test_gpu_swiglu_8b_bf16():
    torch.manual_seed(0)
    g = torch.randn(2, 2048, 14336, device="cuda", dtype=torch.bfloat16) * 3
    u = torch.randn(2, 2048, 14336, device="cuda", dtype=torch.bfloat16)
    mine = _value_and_grads(swiglu, _leaves(g, u))
    ref = _value_and_grads(swiglu_reference, _leaves(g, u))
    assert (mine[0][0] != ref[0][0]).float().mean().item() < 1e-2  # same roundings as eager
    for a, b in zip((*mine[0], *mine[1]), (*ref[0], *ref[1]), strict=True):
        torch.testing.assert_close(a, b, rtol=1.6e-2, atol=2e-2)
        assert _rel(a, b) < 5e-3
