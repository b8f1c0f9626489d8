"""Both LoRA gradients that need dy from one read of it: dS = alpha dy B and dB = alpha dy^T S.

What and why
------------
In the backward of y = x W^T + alpha (x_lora A^T) B^T, two skinny products read the [M, N] output
gradient: dS = alpha dy B ([M, R], needed for dA and for dx) and dB = alpha dy^T S ([N, R]). Run as two
GEMMs they stream dy from memory twice, which at rank 16-64 is most of their cost (dy is M*N*2 bytes;
the products are R/64 as much work as the base GEMM). Here each program owns BLOCK_M rows of dy and
walks along N once; every dy tile feeds both dots while it is in registers:

    dS[rows, :]  += dy[rows, n-tile] @ B[n-tile, :]        kept in registers across the N loop
    dB[n-tile, :] += dy[rows, n-tile]^T @ S[rows, :]       partial over this program's rows

dB's partials from the M/BLOCK_M programs are summed with fp32 atomic adds into a zeroed fp32 buffer
(no bf16 atomics exist, and the sum wants fp32 anyway). The whole rank sits in one BLOCK_R tile, so
BLOCK_M shrinks at large ranks to keep the [BLOCK_M, BLOCK_R] accumulator in registers.
dA = dS^T x_lora is a separate GEMM (it needs x_lora, not dy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .lora_gemm import dot_precision


@triton.jit
def _lora_dys_dyb_kernel(
    dy_ptr, s_ptr, b_ptr, ds_ptr, db_ptr,
    M, N, R, alpha,
    sdm, sdn, ssm, ssr, sbn, sbr, sdsm, sdsr, sdbn, sdbr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    m_ok, r_ok = rm < M, rr < R
    dot_dtype = dy_ptr.dtype.element_ty
    s = tl.load(s_ptr + rm[:, None] * ssm + rr[None, :] * ssr, mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(dot_dtype)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        dy = tl.load(dy_ptr + rm[:, None] * sdm + rn[None, :] * sdn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rn[:, None] * sbn + rr[None, :] * sbr, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        ds += tl.dot(dy, b.to(dot_dtype), input_precision=PRECISION)
        db = tl.dot(tl.trans(dy), s, input_precision=PRECISION)
        tl.atomic_add(db_ptr + rn[:, None] * sdbn + rr[None, :] * sdbr, db * alpha, mask=n_ok[:, None] & r_ok[None, :], sem="relaxed")
    tl.store(ds_ptr + rm[:, None] * sdsm + rr[None, :] * sdsr, ds * alpha, mask=m_ok[:, None] & r_ok[None, :])


def rank_tiles(r: int, block_m: int, block_n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_R) for rank r: the whole rank in one tile, the others shrunk to fit."""
    block_r = max(16, triton.next_power_of_2(r))
    block_m = max(16, min(block_m, 16384 // block_r))  # the [BLOCK_M, BLOCK_R] fp32 accumulator stays in registers
    block_n = max(16, min(block_n, 8192 // block_r))  # the pipelined dy and B tiles fit in shared memory
    return block_m, block_n, block_r


def lora_dys_dyb(
    dy: Tensor, s: Tensor, b: Tensor, alpha: float,
    block_m: int = 128, block_n: int = 128, num_warps: int = 8, num_stages: int = 3,
) -> tuple[Tensor, Tensor]:
    """dy [M, N], S [M, R], B [N, R] -> (dS = alpha dy B [M, R], dB = alpha dy^T S [N, R]), both fp32.

    The dots run in dy's dtype (S and B are cast to it in registers), accumulating in fp32.
    """
    m, n = dy.shape
    r = s.shape[1]
    block_m, block_n, block_r = rank_tiles(r, block_m, block_n)
    ds = torch.empty(m, r, dtype=torch.float32, device=dy.device)
    db = torch.zeros(n, r, dtype=torch.float32, device=dy.device)
    _lora_dys_dyb_kernel[(triton.cdiv(m, block_m),)](
        dy, s, b, ds, db, m, n, r, float(alpha),
        dy.stride(0), dy.stride(1), s.stride(0), s.stride(1), b.stride(0), b.stride(1),
        ds.stride(0), ds.stride(1), db.stride(0), db.stride(1),
        PRECISION=dot_precision(dy.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        num_warps=num_warps, num_stages=num_stages,
    )
    return ds, db
