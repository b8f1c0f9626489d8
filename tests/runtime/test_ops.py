import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import lowra_compile  # noqa: F401  (registers the ops)
from lowra_compile.runtime.synthetic import random_packed_weight

N, K, R = 24, 100, 4


def _inputs(dtype, bias: bool, lora: bool, seed=0):
    torch.manual_seed(seed)
    packed = random_packed_weight(N, K, group_size=32, dtype=dtype, seed=seed).tensors()
    x = torch.randn(3, 5, K, dtype=dtype, requires_grad=True)
    xl = torch.randn(3, 5, K, dtype=dtype, requires_grad=True)
    b = torch.randn(N, dtype=dtype, requires_grad=True) if bias else None
    a = torch.randn(R, K, dtype=dtype, requires_grad=True) if lora else None
    bb = torch.randn(N, R, dtype=dtype, requires_grad=True) if lora else None
    return x, xl, packed, b, a, bb


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_lora_linear_matches_dense_autograd(bias, lora):
    x, xl, packed, b, a, bb = _inputs(torch.float64, bias, lora)
    w = torch.ops.lowra.dequant(packed, K, 32, torch.float64)
    y = torch.ops.lowra.lora_linear(x, xl, packed, 32, b, a, bb, 0.5)
    ref = F.linear(x, w, b) + (0.5 * F.linear(F.linear(xl, a), bb) if lora else 0)
    torch.testing.assert_close(y, ref)
    leaves = [t for t in (x, xl, b, a, bb) if t is not None]
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, g, allow_unused=True)
    want = torch.autograd.grad(ref, leaves, g, allow_unused=True)
    for u, v in zip(got, want):
        if v is None:
            assert u is None or not u.abs().any()
        else:
            torch.testing.assert_close(u, v)


@pytest.mark.parametrize("lora", [False, True])
def test_opcheck(lora):
    x, xl, packed, b, a, bb = _inputs(torch.float64, True, lora)
    opcheck(torch.ops.lowra.lora_linear.default, (x, xl, packed, 32, b, a, bb, 0.5))
    opcheck(torch.ops.lowra.dequant.default, (packed, K, 32, torch.float32))


def test_gradcheck():
    x, xl, packed, b, a, bb = _inputs(torch.float64, True, True)
    fn = lambda x, xl, b, a, bb: torch.ops.lowra.lora_linear(x, xl, packed, 32, b, a, bb, 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x[:1, :2], xl[:1, :2], b, a, bb))


def test_no_gradient_for_frozen_input():
    x, xl, packed, _, a, bb = _inputs(torch.float32, False, True)
    x.requires_grad_(False)
    y = torch.ops.lowra.lora_linear(x, x, packed, 32, None, a, bb, 1.0)
    y.sum().backward()
    assert x.grad is None and a.grad is not None and bb.grad is not None
