"""Chunked LM-head cross-entropy against full-logit F.cross_entropy: values and gradients."""

import pytest
import torch

from slimtune.kernels import chunked_linear_cross_entropy
from slimtune.kernels.cross_entropy import cross_entropy_reference, default_chunk


@pytest.mark.parametrize("dtype,chunk", [(torch.float64, 3), (torch.float32, 16), (torch.bfloat16, 5)])
def test_values_and_grads(dtype, chunk):
    torch.manual_seed(0)
    n, c, v = 13, 24, 40
    hidden = torch.randn(n, c, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, c) / 4).to(dtype).requires_grad_(True)
    labels = torch.randint(0, v, (n,))
    labels[[0, 5, 6]] = -100
    loss, count = chunked_linear_cross_entropy(hidden, weight, labels, chunk=chunk)
    ref, ref_count = cross_entropy_reference(hidden, weight, labels)
    assert count.item() == ref_count.item() == n - 3 and loss.dtype == torch.float32
    tol = dict(rtol=1e-6, atol=1e-6) if dtype != torch.bfloat16 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(loss, ref.float(), **tol)
    gh, gw = torch.autograd.grad(loss * 0.5, (hidden, weight))
    rh, rw = torch.autograd.grad(ref * 0.5, (hidden, weight))
    assert gh[[0, 5, 6]].abs().max() == 0  # ignored rows get no gradient
    if dtype == torch.bfloat16:
        for g, r in ((gh, rh), (gw, rw)):
            assert ((g.float() - r.float()).norm() / r.float().norm()) < 1e-2
    else:
        torch.testing.assert_close(gh, rh, **tol)
        torch.testing.assert_close(gw, rw, **tol)


def test_frozen_weight_and_all_ignored():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(10, 8)
    labels = torch.full((6,), -100)
    loss, count = chunked_linear_cross_entropy(hidden, weight, labels, chunk=4)
    assert count.item() == 0 and loss.item() == 0
    (g,) = torch.autograd.grad(loss, hidden)
    assert g.abs().max() == 0


def test_errors_and_default_chunk():
    with pytest.raises(ValueError, match="same C"):
        chunked_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        chunked_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))
    assert default_chunk(128256) == 523 and default_chunk(10) == (1 << 26) // 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("write_grad", [False, True])
def test_row_kernel_matches_reference(dtype, write_grad, kernel_device):
    """kernels/ce_rows.py (Triton; the interpreter on CPU) against its torch reference: a vocabulary that
    is no multiple of the 4096 block, ignored rows, extreme logits."""
    pytest.importorskip("triton")
    from slimtune.kernels.ce_rows import ce_rows_
    from slimtune.kernels.ce_rows_reference import ce_rows_reference

    torch.manual_seed(1)
    v = 5000
    logits = (torch.randn(6, v) * 4).to(dtype).to(kernel_device)
    logits[2, 17] = 60.0  # one dominant logit
    labels = torch.tensor([3, -100, 17, v - 1, 4097, -100], device=kernel_device)
    got_z, ref_z = logits.clone(), logits.clone()
    got = ce_rows_(got_z, labels, -100, write_grad, kernel=True)
    ref = ce_rows_reference(ref_z, labels, -100, write_grad)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert got[1] == 0 and got[5] == 0
    if write_grad:
        tol = 1e-6 if dtype == torch.float32 else 8e-3
        torch.testing.assert_close(got_z.float(), ref_z.float(), rtol=tol, atol=tol)
        assert got_z[[1, 5]].abs().max() == 0  # ignored rows: no gradient
        assert abs(got_z[0].float().sum().item()) < 0.05  # softmax - onehot sums to 0
    else:
        assert torch.equal(got_z, logits)


def test_grad_in_forward_only_when_needed():
    """Under no_grad, or with nothing that requires grad, the forward keeps no gradient buffers."""
    hidden, weight = torch.randn(5, 8), torch.randn(12, 8)
    labels = torch.randint(0, 12, (5,))
    with torch.no_grad():
        loss, _ = chunked_linear_cross_entropy(hidden.requires_grad_(True), weight, labels, chunk=2)
    assert loss.grad_fn is None
    ref, _ = cross_entropy_reference(hidden, weight, labels)
    torch.testing.assert_close(loss, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("need_w", [False, True])
def test_gpu_gradient_in_forward(need_w):
    """On CUDA the rows run in Triton (ce_rows.py) and the gradient is formed in the forward: loss and
    gradients match the full-logit reference on a 32k vocabulary."""
    torch.manual_seed(3)
    hidden = torch.randn(700, 256, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    weight = (torch.randn(32000, 256, device="cuda") / 16).to(torch.bfloat16).requires_grad_(need_w)
    labels = torch.randint(0, 32000, (700,), device="cuda")
    labels[::7] = -100
    loss, count = chunked_linear_cross_entropy(hidden, weight, labels, chunk=300)
    ref, ref_count = cross_entropy_reference(hidden, weight, labels)
    assert count.item() == ref_count.item()
    torch.testing.assert_close(loss, ref.float(), rtol=1e-3, atol=1e-3)
    inputs = (hidden, weight) if need_w else (hidden,)
    got = torch.autograd.grad(loss / count, inputs)
    want = torch.autograd.grad(ref / ref_count, inputs)
    for g, r in zip(got, want, strict=True):
        assert ((g.float() - r.float()).norm() / r.float().norm()) < 1e-2
