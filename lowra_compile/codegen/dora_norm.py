"""DoRA's weight norm from the packed weight: ||W[n] + s (B A)[n]|| for every row, W never stored.

What and why
------------
PEFT's DoRA scales each output row by magnitude / ||row of W + s B A||, and builds that norm densely:
an identity [K, K] through both adapters for B A (PEFT's `lora_weight`, [N, K]), W dequantized ([N, K]),
their sum ([N, K]), then the norm. On a 7B MLP's down projection (K = 11008) that is 240 MB for the
identity and 90 MB for each of the others, written and read once per call, for a vector of N values.

Here each program owns BLOCK_R packed rows of one bit group and walks K in BLOCK_K steps:

    w    = dequant_tile(rows, k0)                         [BLOCK_R, BLOCK_K]  fp32, as dequant.py
    ba   = B[perm[rows], :] @ A[:, k0 : k0 + BLOCK_K]     [BLOCK_R, BLOCK_K]  one tl.dot, rank padded to 16
    acc += sum over the tile of (w + s * ba)^2
    out[perm[rows]] = sqrt(acc)

so it reads the codes (b/16 of the bf16 bytes) and the adapters, and writes N floats. The rank is a
constexpr padded to a power of two of at least 16 (tl.dot's minimum); the padded columns of B and rows of
A load as zeros. Above rank 64 the K step shrinks so that A's tile stays within 32 KB of fp32 (rank 256
at BLOCK_K 128 took 144 KB of shared memory on sm_90, one program per SM). Columns past K are masked out of the sum: their codes load as 0, which is a level.
Everything is fp32 (the dot in IEEE precision): the norm is of the dense sum, not rounded to the adapters'
or the model's dtype, as `runtime.reference.dora_row_norms`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dequant import bit_groups, check_tiles, dequant_tile, load_lut


@triton.jit
def _dora_norm_kernel(
    codes_ptr, book_ptr, perm_ptr, absmax_codes_ptr, absmax_scale_ptr, a_ptr, b_ptr, out_ptr,
    scaling, row_offset, n_rows, K, R, words_per_row, G, S, stride_a, stride_b,
    BITS: tl.constexpr, GROUP: tl.constexpr, LUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_RANK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    out_rows = tl.load(perm_ptr + row_offset + rows, mask=row_ok, other=0)
    ranks = tl.arange(0, BLOCK_RANK)
    rank_ok = ranks < R
    b = tl.load(b_ptr + out_rows[:, None].to(tl.int64) * stride_b + ranks[None, :],
                mask=row_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
    table = load_lut(book_ptr, rows, row_ok, BITS, LUT)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w = dequant_tile(codes_ptr, book_ptr, table, absmax_codes_ptr, absmax_scale_ptr, rows, row_offset, row_ok,
                         k0, K, words_per_row, G, S, BITS, GROUP, LUT, BLOCK_R, BLOCK_K)
        a = tl.load(a_ptr + ranks[:, None] * stride_a + ks[None, :], mask=rank_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        v = tl.where(k_ok[None, :], w + scaling * tl.dot(b, a, input_precision="ieee"), 0.0)
        acc += tl.sum(v * v, axis=1)
    tl.store(out_ptr + out_rows, tl.sqrt(acc), mask=row_ok)


def norm_tiles(rank: int, block_k: int) -> tuple[int, int]:
    """(BLOCK_RANK, BLOCK_K) for an adapter of `rank`: the rank padded to a power of two >= 16, and K steps
    that keep A's [BLOCK_RANK, BLOCK_K] fp32 tile within 32 KB (never below 32 columns)."""
    block_rank = max(16, triton.next_power_of_2(rank))
    return block_rank, min(block_k, max(32, 8192 // block_rank))


def dora_row_norms(
    packed: list[Tensor], k: int, group_size: int, lora_a: Tensor, lora_b: Tensor, scaling: float,
    block_r: int = 16, block_k: int = 128, num_warps: int = 4, lut: str = "where",
) -> Tensor:
    """[N] fp32 norms of the rows of W + scaling * B A (A [r, K], B [N, r]), one launch per bit group."""
    rank = lora_a.shape[0]
    block_rank, block_k = norm_tiles(rank, block_k)
    check_tiles(group_size, block_k, lut)
    perm, absmax_codes, absmax_scale = packed[:3]
    out = torch.empty(perm.shape[0], dtype=torch.float32, device=perm.device)
    a, b = lora_a.contiguous(), lora_b.contiguous()
    for bits, start, rows, codes, book in bit_groups(packed):
        _dora_norm_kernel[(triton.cdiv(rows, block_r),)](
            codes, book, perm, absmax_codes, absmax_scale, a, b, out,
            float(scaling), start, rows, k, rank, codes.shape[1], absmax_codes.shape[1], absmax_scale.shape[1],
            a.stride(0), b.stride(0),
            BITS=bits, GROUP=group_size, LUT=lut, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_RANK=block_rank,
            num_warps=num_warps,
        )
    return out
