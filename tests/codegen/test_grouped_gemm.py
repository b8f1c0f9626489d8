"""The fused grouped GEMM of a mixture's experts against runtime.reference: every width, empty experts,
rows past the last offset, one expert taking every row, decode-sized M, fp32 and fp16, every LUT."""

import pytest
import torch

from lowra_compile.codegen.grouped_gemm import _expert_ranges, grouped_dx, grouped_forward
from lowra_compile.runtime import reference
from lowra_compile.runtime.synthetic import random_packed_weight

SMALL = dict(block_m=16, block_n=16, block_k=32)
E, N, K, GROUP = 4, 24, 80, 32  # N and K are not multiples of the tiles; the last K group is short
# rows per expert: some with none, several blocks of 16 for one, all for one, a decode step's few
COUNTS = {"spread": (3, 0, 37, 2), "one expert": (0, 0, 0, 19), "decode": (1, 0, 0, 1)}


def _case(widths, counts, dtype, device, tail=0, seed=0):
    """Packed [E*N, K] stack, x [M, K] sorted by expert (plus `tail` rows past the last offset), offsets, dy."""
    torch.manual_seed(seed)
    packed = random_packed_weight(E * N, K, widths, group_size=GROUP, seed=seed, device=device).tensors()
    m = sum(counts) + tail
    x = torch.randn(m, K, device=device).to(dtype)
    dy = torch.randn(m, N, device=device).to(dtype)
    offsets = torch.cumsum(torch.tensor(counts), 0).to(device=device, dtype=torch.int32)
    return packed, x, dy, offsets


@pytest.mark.parametrize("widths", [(1,), (2,), (3,), (4,), (1, 2, 3, 4), (2, 4)])
@pytest.mark.parametrize("counts", list(COUNTS), ids=list(COUNTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_forward_and_dx_match_the_reference(widths, counts, dtype, tol, device):
    packed, x, dy, offsets = _case(widths, COUNTS[counts], dtype, device)
    y = grouped_forward(x, offsets, packed, GROUP, E, **SMALL)
    dx = grouped_dx(dy, offsets, packed, GROUP, E, K, **SMALL)
    assert y.dtype == dx.dtype == dtype
    torch.testing.assert_close(y.float(), reference.grouped_linear(x.float(), offsets, packed, GROUP, E), **tol[dtype])
    want = reference.grouped_linear_backward(dy.float(), offsets, packed, GROUP, E, K)
    torch.testing.assert_close(dx.float(), want, **tol[dtype])


def test_rows_past_the_last_offset_come_out_zero(tol, device):
    packed, x, dy, offsets = _case((1, 2, 3, 4), COUNTS["spread"], torch.float32, device, tail=5)
    y = grouped_forward(x, offsets, packed, GROUP, E, **SMALL)
    dx = grouped_dx(dy, offsets, packed, GROUP, E, K, **SMALL)
    assert not y[-5:].any() and not dx[-5:].any()
    torch.testing.assert_close(y, reference.grouped_linear(x, offsets, packed, GROUP, E), **tol[torch.float32])


@pytest.mark.parametrize("lut", ["gather", "load"])
def test_luts(lut, tol, device):
    packed, x, dy, offsets = _case((1, 2, 3, 4), COUNTS["spread"], torch.float32, device)
    y = grouped_forward(x, offsets, packed, GROUP, E, lut=lut, **SMALL)
    dx = grouped_dx(dy, offsets, packed, GROUP, E, K, lut=lut, **SMALL)
    torch.testing.assert_close(y, reference.grouped_linear(x, offsets, packed, GROUP, E), **tol[torch.float32])
    torch.testing.assert_close(dx, reference.grouped_linear_backward(dy, offsets, packed, GROUP, E, K), **tol[torch.float32])


def test_strided_inputs(tol, device):
    # an expanded gradient (stride 0, as a sum's backward gives) and a column slice of a wider x
    packed, x, dy, offsets = _case((1, 2, 3, 4), COUNTS["spread"], torch.float32, device)
    wide = torch.randn(x.shape[0], 2 * K, device=device)[:, ::2]
    expanded = dy[:1].expand_as(dy)
    torch.testing.assert_close(grouped_forward(wide, offsets, packed, GROUP, E, **SMALL),
                               reference.grouped_linear(wide.contiguous(), offsets, packed, GROUP, E), **tol[torch.float32])
    torch.testing.assert_close(grouped_dx(expanded, offsets, packed, GROUP, E, K, **SMALL),
                               reference.grouped_linear_backward(expanded.contiguous(), offsets, packed, GROUP, E, K),
                               **tol[torch.float32])


@pytest.mark.parametrize("widths", [(1, 2, 3, 4), (2,)])
def test_expert_ranges_follow_the_packed_order(widths, device):
    packed = random_packed_weight(E * N, K, widths, group_size=GROUP, device=device).tensors()
    ranges = _expert_ranges(packed, E).cpu()
    packed = [t.cpu() for t in packed]
    perm, start = packed[0], 0
    for g, bits in enumerate((1, 2, 3, 4)):
        rows = packed[3 + 2 * g].shape[0]
        group = perm[start:start + rows]
        for e in range(E):
            mine = group[ranges[g, e]:ranges[g, e + 1]]
            assert ((mine // N) == e).all() and len(mine) == int(((group // N) == e).sum())
        start += rows
