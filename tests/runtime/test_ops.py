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


def _autocast_dense(x, packed, b, a, bb, scaling):
    """What the dense layer and its PEFT branch compute under autocast: each F.linear casts its inputs."""
    w = torch.ops.lowra.dequant(packed, K, 32, torch.float32)
    return F.linear(x, w, b) + scaling * F.linear(F.linear(x, a), bb)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
def test_lora_linear_under_autocast_runs_in_the_autocast_dtype_as_the_dense_layer(device):
    x, _, packed, b, a, bb = (
        [u.to(device) for u in t] if isinstance(t, list) else t.detach().to(device).requires_grad_()
        for t in _inputs(torch.float32, True, True)
    )
    with torch.autocast(device, dtype=torch.bfloat16):
        # the op first: casts made inside it, where autograd is off, would enter autocast's cache of cast
        # parameters without gradients, and the dense layer after it would read those
        y = torch.ops.lowra.lora_linear(x, x, packed, 32, b, a, bb, 0.5)
        ref = _autocast_dense(x, packed, b, a, bb, 0.5)
    assert y.dtype == ref.dtype == torch.bfloat16
    exact = device == "cpu"  # the same reference ops; on CUDA the Triton kernels sum in another order
    torch.testing.assert_close(y, ref, atol=0 if exact else 6e-2, rtol=0 if exact else 2e-2)
    leaves = (x, b, a, bb)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, g)
    want = torch.autograd.grad(ref, leaves, g)
    for u, v in zip(got, want):
        assert u.dtype == v.dtype == torch.float32  # back to each leaf's dtype, through the casts
        torch.testing.assert_close(u, v, atol=2e-2, rtol=2e-2)


def test_lora_linear_under_autocast_traces_to_the_dtype_it_runs_in():
    # Traced (fake tensors, as aot_autograd and Inductor see it), the op must give what it computes for real.
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, _, packed, b, a, bb = _inputs(torch.float32, True, True)
    with FakeTensorMode() as mode, torch.autocast("cpu", dtype=torch.bfloat16):
        fake = [mode.from_tensor(t) for t in (x, b, a, bb)]
        y = torch.ops.lowra.lora_linear(fake[0], fake[0], [mode.from_tensor(t) for t in packed], 32, *fake[1:], 0.5)
    assert y.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.lowra.lora_linear(x.double(), x.double(), packed, 32, None, None, None, 1.0)
    assert y.dtype == torch.float64  # autocast leaves float64 alone, as it does for F.linear
