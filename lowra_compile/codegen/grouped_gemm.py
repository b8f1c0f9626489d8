"""A mixture's stacked experts: dequantize each expert's tiles inside its GEMM, never the whole stack.

What and why
------------
transformers 5 runs a layer's E experts as one grouped product over x's rows sorted by expert
(`offsets[e]` = the end of expert e's rows). lowra packs the [E, N, K] stack as one [E*N, K] weight, and
the plain way to run it dequantizes the whole stack, then calls torch's grouped product: E*N*K dense
values written and read again per call, and for a decode step that touches 2 of 8 (or 8 of 128) experts,
every expert dequantized for nothing. Here a program dequantizes only the tiles of its own expert, as
fused_small_m.py does for one layer, and experts that got no rows cost one early-out program each.

Rows of one expert are contiguous inside a bit group: `pack_weight` sorts each width's rows by original
row, and expert e owns original rows e*N .. e*N + N - 1. So `ranges[g, e] .. ranges[g, e + 1]` (group-local)
are expert e's rows of width group g; a small kernel finds all of them at once by binary search.

The schedule needs no host sync and no torch ops: expert e's rows of x split into ceil(count_e / BLOCK_M)
blocks, and program j along M takes block j of all of them, found from the offsets inside the kernel (a
cumulative sum over the experts, `_block`). The grid has ceil(M / BLOCK_M) + E programs along M, an upper
bound on the blocks; programs past the last block have no rows, run no K steps and store nothing. A call
is thus one launch for the ranges, one memset and the GEMM launches:

    forward  (one launch per bit group, BITS constexpr; groups write disjoint columns of y):
        acc[BLOCK_N, BLOCK_M] = deq(W)[rows of e] @ x[block rows]^T     y[block rows, perm[row] - e*N] = acc
    backward dx (one launch; the four widths a static loop inside, each with its own BITS):
        acc[BLOCK_M, BLOCK_K] = sum over e's rows r of every group: dy[block rows, perm[r] - e*N] deq(W)[r, k tile]

As in fused_small_m.py, the dequantized tile is the left operand of the forward's tl.dot. Rows past the
last offset (none in transformers' use) come out zero, as the reference's loop leaves them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..runtime.format import BIT_WIDTHS
from .dequant import bit_groups, check_tiles, dequant_tile, load_lut
from .fused_small_m import dequant_dot_xt
from .lora_gemm import dot_precision


@triton.jit
def _ranges_kernel(perm_ptr, ranges_ptr, N, E, start1, start2, start3, start4, rows1, rows2, rows3, rows4, steps,
                   EXPERTS: tl.constexpr):
    """ranges[g, e] = the first row of width group g (group-local) whose original row is >= e*N, for e = 0..E:
    a binary search per expert, all experts at once (one program per width)."""
    g = tl.program_id(0)
    start = tl.where(g == 0, start1, tl.where(g == 1, start2, tl.where(g == 2, start3, start4)))
    count = tl.where(g == 0, rows1, tl.where(g == 1, rows2, tl.where(g == 2, rows3, rows4)))
    es = tl.arange(0, EXPERTS)
    lo = tl.zeros((EXPERTS,), dtype=tl.int32)
    hi = lo + count
    for _ in range(steps):  # steps = bit length of the largest group: enough for lo to meet hi
        open_ = lo < hi
        mid = (lo + hi) // 2
        below = open_ & (tl.load(perm_ptr + start + mid, mask=open_, other=0) < es * N)
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(open_ & ~below, mid, hi)
    tl.store(ranges_ptr + g * (E + 1) + es, lo, mask=es <= E)


def _expert_ranges(packed: list[Tensor], experts: int) -> Tensor:
    """int32 [4, E + 1]: expert e's rows of width group g are ranges[g, e] .. ranges[g, e + 1], group-local."""
    perm = packed[0]
    starts, counts = [0] * len(BIT_WIDTHS), [0] * len(BIT_WIDTHS)
    for bits, start, rows, _, _ in bit_groups(packed):
        starts[BIT_WIDTHS.index(bits)], counts[BIT_WIDTHS.index(bits)] = start, rows
    ranges = torch.empty(len(BIT_WIDTHS), experts + 1, dtype=torch.int32, device=perm.device)
    _ranges_kernel[(len(BIT_WIDTHS),)](perm, ranges, perm.shape[0] // experts, experts, *starts, *counts,
                                       max(counts).bit_length(), EXPERTS=triton.next_power_of_2(experts + 1))
    return ranges


def _grid_m(m: int, experts: int, block_m: int) -> int:
    """Programs along M: an upper bound on the blocks, sum over experts of ceil(rows_e / BLOCK_M)."""
    return triton.cdiv(m, block_m) + experts


@triton.jit
def _block(offsets_ptr, M, E, BLOCK_M: tl.constexpr, EXPERTS: tl.constexpr):
    """This program's expert and its rows of x (and their mask): expert e's rows, offsets[e - 1] ..
    offsets[e], split into blocks of BLOCK_M; program j takes block j of all of them, and programs past
    the last block get no rows."""
    es = tl.arange(0, EXPERTS)
    ends = tl.minimum(tl.load(offsets_ptr + es, mask=es < E, other=0), M)
    starts = tl.minimum(tl.load(offsets_ptr + es - 1, mask=(es >= 1) & (es < E), other=0), M)
    blocks = tl.where(es < E, (tl.maximum(ends - starts, 0) + BLOCK_M - 1) // BLOCK_M, 0)
    last = tl.cumsum(blocks, 0)  # one past each expert's last block
    j = tl.program_id(0)
    e = tl.minimum(tl.sum((last <= j).to(tl.int32), 0), E - 1)
    mine = es == e
    first = tl.sum(tl.where(mine, starts + (j - (last - blocks)) * BLOCK_M, 0), 0)
    end = tl.where(j < tl.sum(blocks, 0), tl.sum(tl.where(mine, ends, 0), 0), first)
    rm = first + tl.arange(0, BLOCK_M)
    return e, rm.to(tl.int64), rm < end


@triton.jit
def _grouped_forward_kernel(
    x_ptr, codes_ptr, book_ptr, perm_ptr, absmax_codes_ptr, absmax_scale_ptr, y_ptr,
    offsets_ptr, ranges_ptr,
    M, K, N, E, row_offset, words_per_row, G, S, sxm, sxk, sym, syn,
    BITS: tl.constexpr, GROUP: tl.constexpr, LUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EXPERTS: tl.constexpr,
):
    e, rm, m_ok = _block(offsets_ptr, M, E, BLOCK_M, EXPERTS)
    rows = tl.load(ranges_ptr + e) + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < tl.load(ranges_ptr + e + 1)
    out_cols = tl.load(perm_ptr + row_offset + rows, mask=row_ok, other=0) - e * N
    busy = tl.max((row_ok[:, None] & m_ok[None, :]).to(tl.int32)) > 0
    k_end = tl.where(busy, K, 0)  # a tile with no rows of x or of e runs no K steps
    acc = dequant_dot_xt(tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), x_ptr, sxm, sxk, rm, m_ok, k_end, K,
                         codes_ptr, book_ptr, absmax_codes_ptr, absmax_scale_ptr, rows, row_offset, row_ok, words_per_row,
                         G, S, BITS, GROUP, LUT, PRECISION, BLOCK_N, BLOCK_K)
    tl.store(y_ptr + rm[None, :] * sym + out_cols[:, None] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & m_ok[None, :])


@triton.jit
def _dx_width(acc, codes_ptr, book_ptr, ranges_ptr, row_offset, words_per_row,
              dy_ptr, perm_ptr, absmax_codes_ptr, absmax_scale_ptr, e, rm, m_ok, k0, K, N, G, S, sdm, sdn,
              BITS: tl.constexpr, GROUP: tl.constexpr, LUT: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += dy[rm, columns of e's rows of this width] @ deq(W)[those rows, k0 .. k0 + BLOCK_K]."""
    first = tl.load(ranges_ptr + e)
    last = tl.where(tl.max(m_ok.to(tl.int32), 0) > 0, tl.load(ranges_ptr + e + 1), first)  # no rows of x: no steps
    dot_dtype = dy_ptr.dtype.element_ty
    for r0 in range(first, last, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < last
        cols = tl.load(perm_ptr + row_offset + rows, mask=row_ok, other=0) - e * N
        dy = tl.load(dy_ptr + rm[:, None] * sdm + cols[None, :] * sdn, mask=m_ok[:, None] & row_ok[None, :], other=0.0)
        table = load_lut(book_ptr, rows, row_ok, BITS, LUT)
        w = dequant_tile(codes_ptr, book_ptr, table, absmax_codes_ptr, absmax_scale_ptr, rows, row_offset, row_ok,
                         k0, K, words_per_row, G, S, BITS, GROUP, LUT, BLOCK_N, BLOCK_K)  # masked rows are 0
        acc += tl.dot(dy.to(dot_dtype), w.to(dot_dtype), input_precision=PRECISION)
    return acc


@triton.jit
def _grouped_dx_kernel(
    dy_ptr, perm_ptr, absmax_codes_ptr, absmax_scale_ptr, dx_ptr,
    codes1, book1, codes2, book2, codes3, book3, codes4, book4,
    offsets_ptr, ranges_ptr,
    M, K, N, E, offset1, offset2, offset3, offset4, words1, words2, words3, words4, G, S, sdm, sdn, sxm, sxk,
    HAS1: tl.constexpr, HAS2: tl.constexpr, HAS3: tl.constexpr, HAS4: tl.constexpr,
    GROUP: tl.constexpr, LUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EXPERTS: tl.constexpr,
):
    e, rm, m_ok = _block(offsets_ptr, M, E, BLOCK_M, EXPERTS)
    k0 = tl.program_id(1) * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    # ranges_ptr is [4, E + 1]: width g's row starts at ranges_ptr + g * (E + 1)
    if HAS1:
        acc = _dx_width(acc, codes1, book1, ranges_ptr, offset1, words1,
                        dy_ptr, perm_ptr, absmax_codes_ptr, absmax_scale_ptr, e, rm, m_ok, k0, K, N, G, S, sdm, sdn,
                        1, GROUP, LUT, PRECISION, BLOCK_N, BLOCK_K)
    if HAS2:
        acc = _dx_width(acc, codes2, book2, ranges_ptr + (E + 1), offset2, words2,
                        dy_ptr, perm_ptr, absmax_codes_ptr, absmax_scale_ptr, e, rm, m_ok, k0, K, N, G, S, sdm, sdn,
                        2, GROUP, LUT, PRECISION, BLOCK_N, BLOCK_K)
    if HAS3:
        acc = _dx_width(acc, codes3, book3, ranges_ptr + 2 * (E + 1), offset3, words3,
                        dy_ptr, perm_ptr, absmax_codes_ptr, absmax_scale_ptr, e, rm, m_ok, k0, K, N, G, S, sdm, sdn,
                        3, GROUP, LUT, PRECISION, BLOCK_N, BLOCK_K)
    if HAS4:
        acc = _dx_width(acc, codes4, book4, ranges_ptr + 3 * (E + 1), offset4, words4,
                        dy_ptr, perm_ptr, absmax_codes_ptr, absmax_scale_ptr, e, rm, m_ok, k0, K, N, G, S, sdm, sdn,
                        4, GROUP, LUT, PRECISION, BLOCK_N, BLOCK_K)
    tl.store(dx_ptr + rm[:, None] * sxm + ks[None, :] * sxk, acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (ks < K)[None, :])


def grouped_forward(
    x: Tensor, offsets: Tensor, packed: list[Tensor], group_size: int, experts: int,
    block_m: int = 64, block_n: int = 64, block_k: int = 128, num_warps: int = 4, num_stages: int = 2,
    lut: str = "where",
) -> Tensor:
    """y [M, N] with y[rows of expert e] = x[rows of e] @ deq(W)[e]^T; x [M, K] sorted by expert, W packed [E*N, K]."""
    check_tiles(group_size, block_k, lut)
    (m, k), n = x.shape, packed[0].shape[0] // experts
    perm, absmax_codes, absmax_scale = packed[:3]
    y = x.new_zeros(m, n)  # rows past the last offset stay zero
    ranges = _expert_ranges(packed, experts)
    for bits, start, rows, codes, book in bit_groups(packed):
        grid = (_grid_m(m, experts, block_m), triton.cdiv(min(rows, n), block_n))
        _grouped_forward_kernel[grid](
            x, codes, book, perm, absmax_codes, absmax_scale, y, offsets, ranges[BIT_WIDTHS.index(bits)],
            m, k, n, experts, start, codes.shape[1], absmax_codes.shape[1], absmax_scale.shape[1],
            x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            BITS=bits, GROUP=group_size, LUT=lut, PRECISION=dot_precision(x.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EXPERTS=triton.next_power_of_2(experts),
            num_warps=num_warps, num_stages=num_stages,
        )
    return y


def grouped_dx(
    dy: Tensor, offsets: Tensor, packed: list[Tensor], group_size: int, experts: int, k: int,
    block_m: int = 64, block_n: int = 64, block_k: int = 128, num_warps: int = 4, num_stages: int = 2,
    lut: str = "where",
) -> Tensor:
    """dx [M, K] with dx[rows of expert e] = dy[rows of e] @ deq(W)[e]; dy [M, N] sorted by expert."""
    check_tiles(group_size, block_k, lut)
    m, n = dy.shape
    perm, absmax_codes, absmax_scale = packed[:3]
    dx = dy.new_zeros(m, k)  # rows past the last offset stay zero
    groups = {bits: (start, codes, book) for bits, start, _, codes, book in bit_groups(packed)}
    per_width = {}
    for bits in BIT_WIDTHS:  # an absent width gets placeholders its constexpr HAS flag never reads
        start, codes, book = groups.get(bits, (0, perm, perm))
        per_width[bits] = (start, codes, book, codes.shape[1] if bits in groups else 0)
    _grouped_dx_kernel[(_grid_m(m, experts, block_m), triton.cdiv(k, block_k))](
        dy, perm, absmax_codes, absmax_scale, dx,
        *(t for b in BIT_WIDTHS for t in per_width[b][1:3]),
        offsets, _expert_ranges(packed, experts),
        m, k, n, experts, *(per_width[b][0] for b in BIT_WIDTHS), *(per_width[b][3] for b in BIT_WIDTHS),
        absmax_codes.shape[1], absmax_scale.shape[1], dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
        HAS1=1 in groups, HAS2=2 in groups, HAS3=3 in groups, HAS4=4 in groups,
        GROUP=group_size, LUT=lut, PRECISION=dot_precision(dy.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EXPERTS=triton.next_power_of_2(experts),
        num_warps=num_warps, num_stages=num_stages,
    )
    return dx
