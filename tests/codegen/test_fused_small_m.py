"""The fused dequant-in-mainloop GEMM against runtime.reference: every width, M in {1, 7, 64}, ragged N, K."""

import pytest
import torch

from lowra_compile.codegen.fused_small_m import fused_small_m
from lowra_compile.runtime import reference
from lowra_compile.runtime.synthetic import random_packed_weight

SMALL = dict(block_n=32, block_k=32)
N, K, R, GROUP = 90, 200, 4, 64  # N and K are not multiples of the tiles; the last K group is short


def _case(widths, m, dtype, device, lora=True, bias=True):
    torch.manual_seed(m)
    packed = random_packed_weight(N, K, widths, group_size=GROUP, seed=m, device=device).tensors()
    x = torch.randn(m, K, device=device).to(dtype)
    a = torch.randn(R, K, device=device).to(dtype) if lora else None
    b = torch.randn(N, R, device=device).to(dtype) if lora else None
    bb = torch.randn(N, device=device).to(dtype) if bias else None
    return packed, x, a, b, bb


def _reference(packed, x, a, b, bb):
    f = (lambda t: None if t is None else t.float())
    return reference.lora_linear(x.float(), x.float(), packed, GROUP, f(bb), f(a), f(b), 0.5)


@pytest.mark.parametrize("widths", [(1,), (2,), (3,), (4,), (1, 2, 3, 4)])
@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_small_m(widths, m, dtype, tol, device):
    packed, x, a, b, bb = _case(widths, m, dtype, device)
    got = fused_small_m(x, packed, GROUP, bb, x @ a.t(), b, 0.5, **SMALL)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), _reference(packed, x, a, b, bb), **tol[dtype])


@pytest.mark.parametrize("lora,bias", [(False, False), (False, True), (True, False)])
def test_fused_small_m_without_lora_or_bias(lora, bias, tol, device):
    packed, x, a, b, bb = _case((1, 2, 3, 4), 7, torch.float32, device, lora, bias)
    got = fused_small_m(x, packed, GROUP, bb, x @ a.t() if lora else None, b, 0.5, **SMALL)
    torch.testing.assert_close(got, _reference(packed, x, a, b, bb), **tol[torch.float32])


@pytest.mark.parametrize("lut", ["gather", "load"])
def test_fused_small_m_luts(lut, tol, device):
    packed, x, a, b, bb = _case((1, 2, 3, 4), 7, torch.float32, device)
    got = fused_small_m(x, packed, GROUP, bb, x @ a.t(), b, 0.5, lut=lut, **SMALL)
    torch.testing.assert_close(got, _reference(packed, x, a, b, bb), **tol[torch.float32])
