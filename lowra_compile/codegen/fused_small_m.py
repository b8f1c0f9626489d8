"""Small M (decode, eval, short batches): dequantize inside the GEMM main loop, never materialise W.

What and why
------------
At M up to a few hundred tokens the layer is bound by reading the weight, so the win is to read the
b-bit codes (b/16 of the bf16 bytes) and expand them in registers. Each program owns BLOCK_N packed
rows of one bit group (so BITS is a constexpr and every row of the tile has the same width) and
BLOCK_M tokens, and computes the transposed output tile

    acc[BLOCK_N, BLOCK_M] = alpha * B[perm[rows], :] @ S^T  +  deq(W)[rows, :] @ x^T  +  bias[perm[rows]]

The dequantized tile is the LEFT operand of tl.dot, which wgmma may take from registers (RS mode).
The sm_90 TTGIR shows it does, but after a round trip through shared memory (docs/kernels.md,
"Measured so far"). The LoRA term is
R/BLOCK_R extra K-steps on the same accumulator, as in lora_gemm.py. The tile is stored to
y[:, perm[rows]], so packed rows scatter back to their original output columns. One launch per bit
group; every group writes disjoint columns of y.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dequant import bit_groups, check_tiles, dequant_tile, load_lut
from .lora_gemm import dot_precision, rank_block


@triton.jit
def dequant_dot_xt(acc, x_ptr, sxm, sxk, rm, m_ok, k_end, K,
                   codes_ptr, book_ptr, absmax_codes_ptr, absmax_scale_ptr, rows, row_offset, row_ok, words_per_row, G, S,
                   BITS: tl.constexpr, GROUP: tl.constexpr, LUT: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[BLOCK_N, BLOCK_M] += deq(W)[rows, :k_end] @ x[rm, :k_end]^T, each W tile dequantized in registers as
    the dot's left operand (shared with the grouped kernels, grouped_gemm.py)."""
    dot_dtype = x_ptr.dtype.element_ty
    table = load_lut(book_ptr, rows, row_ok, BITS, LUT)  # loop-invariant: the rows' levels
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w = dequant_tile(codes_ptr, book_ptr, table, absmax_codes_ptr, absmax_scale_ptr, rows, row_offset, row_ok,
                         k0, K, words_per_row, G, S, BITS, GROUP, LUT, BLOCK_N, BLOCK_K)
        # columns past K hold padding codes (finite levels); the zeros loaded for x there cancel them
        xt = tl.load(x_ptr + rm[None, :] * sxm + ks[:, None] * sxk, mask=(ks < K)[:, None] & m_ok[None, :], other=0.0)
        acc += tl.dot(w.to(dot_dtype), xt, input_precision=PRECISION)
    return acc


@triton.jit
def _fused_small_m_kernel(
    x_ptr, codes_ptr, book_ptr, perm_ptr, absmax_codes_ptr, absmax_scale_ptr,
    s_ptr, b_ptr, bias_ptr, y_ptr,
    M, K, R, row_offset, n_rows, words_per_row, G, S, alpha,
    sxm, sxk, ssm, ssr, sbn, sbr, sym, syn,
    BITS: tl.constexpr, GROUP: tl.constexpr, LUT: tl.constexpr, PRECISION: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok, m_ok = rows < n_rows, rm < M
    out_cols = tl.load(perm_ptr + row_offset + rows, mask=row_ok, other=0)
    dot_dtype = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if HAS_LORA:
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            b = tl.load(b_ptr + out_cols[:, None] * sbn + rr[None, :] * sbr, mask=row_ok[:, None] & (rr < R)[None, :], other=0.0)
            st = tl.load(s_ptr + rm[None, :] * ssm + rr[:, None] * ssr, mask=(rr < R)[:, None] & m_ok[None, :], other=0.0)
            acc += tl.dot(b.to(dot_dtype), st.to(dot_dtype), input_precision=PRECISION)
        acc = acc * alpha
    acc = dequant_dot_xt(acc, x_ptr, sxm, sxk, rm, m_ok, K, K, codes_ptr, book_ptr, absmax_codes_ptr, absmax_scale_ptr,
                         rows, row_offset, row_ok, words_per_row, G, S, BITS, GROUP, LUT, PRECISION, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_cols, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + rm[None, :] * sym + out_cols[:, None] * syn, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & m_ok[None, :])


def fused_small_m(
    x: Tensor, packed: list[Tensor], group_size: int, bias: Tensor | None = None,
    s: Tensor | None = None, b: Tensor | None = None, alpha: float = 1.0, out_dtype: torch.dtype | None = None,
    block_n: int = 64, block_m: int | None = None, block_k: int = 128, num_warps: int = 4, num_stages: int = 2,
    lut: str = "where",
) -> Tensor:
    """y [M, N] = x [M, K] @ deq(W)^T (+ alpha * s [M, R] @ b [N, R]^T) (+ bias [N]); W is never stored.

    block_m None: the smallest power of two >= M in [16, 128] (tl.dot needs 16; larger M tiles over M).
    """
    check_tiles(group_size, block_k, lut)
    m, k = x.shape
    perm, absmax_codes, absmax_scale = packed[:3]
    y = torch.empty(m, perm.shape[0], dtype=out_dtype or x.dtype, device=x.device)
    block_m = block_m or min(128, max(16, triton.next_power_of_2(m)))
    has_lora = s is not None
    s_, b_ = (s, b) if has_lora else (x, x)  # placeholders the kernel never reads
    r = s.shape[1] if has_lora else 0
    block_r = rank_block(r)
    for bits, start, rows, codes, book in bit_groups(packed):
        grid = (triton.cdiv(rows, block_n), triton.cdiv(m, block_m))
        _fused_small_m_kernel[grid](
            x, codes, book, perm, absmax_codes, absmax_scale, s_, b_, bias if bias is not None else y, y,
            m, k, r, start, rows, codes.shape[1], absmax_codes.shape[1], absmax_scale.shape[1], float(alpha),
            x.stride(0), x.stride(1), s_.stride(0), s_.stride(1), b_.stride(0), b_.stride(1), y.stride(0), y.stride(1),
            BITS=bits, GROUP=group_size, LUT=lut, PRECISION=dot_precision(x.dtype),
            HAS_LORA=has_lora, HAS_BIAS=bias is not None,
            BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r,
            num_warps=num_warps, num_stages=num_stages,
        )
    return y
