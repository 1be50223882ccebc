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
