"""The LoRA-folded GEMM (forward and dx) and the one-read dS/dB kernel against plain torch in fp32."""

import pytest
import torch

from lowra_compile.codegen.lora_gemm import lora_gemm
from lowra_compile.codegen.lora_grad import lora_dys_dyb

SMALL = dict(block_m=16, block_n=32, block_k=32, group_m=2)


@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_gemm(m, lora, bias, dtype, tol, device):
    torch.manual_seed(m)
    k, n, r = 100, 45, 20  # rank 20 spans two BLOCK_R=16 steps
    x, w = torch.randn(m, k, device=device).to(dtype), torch.randn(n, k, device=device).to(dtype)
    s, b = (torch.randn(m, r, device=device).to(dtype), torch.randn(n, r, device=device).to(dtype)) if lora else (None, None)
    bb = torch.randn(n, device=device).to(dtype) if bias else None
    got = lora_gemm(x, w.t(), s, b.t() if lora else None, 0.5, bb, **SMALL)
    want = x.float() @ w.float().t()
    if lora:
        want += 0.5 * s.float() @ b.float().t()
    if bias:
        want += bb.float()
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, **tol[dtype])


def test_lora_gemm_backward_orientation(tol, device):
    """dx = dy W + dS A: W read row-major as the [N, K] right operand, no transpose copy."""
    torch.manual_seed(0)
    m, k, n, r = 7, 100, 45, 4
    dy, w = torch.randn(m, n, device=device), torch.randn(n, k, device=device)
    ds, a = torch.randn(m, r, device=device), torch.randn(r, k, device=device)
    got = lora_gemm(dy, w, ds, a, 1.0, **SMALL)
    torch.testing.assert_close(got, dy @ w + ds @ a, **tol[torch.float32])


@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("r", [4, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_dys_dyb(m, r, dtype, tol, device):
    torch.manual_seed(m + r)
    n = 90
    dy = torch.randn(m, n, device=device).to(dtype)
    s, b = torch.randn(m, r, device=device), torch.randn(n, r, device=device)
    ds, db = lora_dys_dyb(dy, s, b, 0.5, block_m=16, block_n=32)
    s16, b16 = s.to(dtype).float(), b.to(dtype).float()  # the kernel multiplies in dy's dtype
    torch.testing.assert_close(ds, 0.5 * dy.float() @ b16, **tol[dtype])
    torch.testing.assert_close(db, 0.5 * dy.float().t() @ s16, **tol[dtype])
