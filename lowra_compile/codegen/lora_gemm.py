"""One GEMM with the LoRA term folded in: C = X @ Wt + alpha * (S @ Bt) + bias.

What and why
------------
An unfused LoRA layer re-reads and re-writes the [M, N] output to add `s * (x A^T) B^T` after the base
GEMM (about 15% of the base GEMM time at M=8192, docs/kernels.md). LoRAFusion's answer, used here:
the skinny product S @ Bt (R = rank) runs as ceil(R / BLOCK_R) extra K-steps on the same fp32
accumulator before the base K loop, so the output is written once. S = x_lora A^T is its own small
GEMM (fusing it here would recompute it for every column tile: r/BLOCK_N extra work).

The same kernel serves the backward input gradient, dx = dy @ W + dS @ A: only the operands change.
Strides are arguments, so W is read as W^T (forward) or W (backward) from the one dequantized buffer,
without a copy. Programs are ordered in groups of GROUP_M row tiles so neighbours share X tiles in L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def rank_block(r: int) -> int:
    """The tile of the LoRA rank's K-steps: 16 to 64 (a rank past 64 takes several steps; 0, no adapter, one)."""
    return min(64, max(16, triton.next_power_of_2(r)))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 GEMMs follow torch's TF32 switch, like the reference on CUDA."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


@triton.jit
def _lora_gemm_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, bias_ptr, c_ptr,
    M, N, K, R, alpha,
    sxm, sxk, swk, swn, ssm, ssr, sbr, sbn, scm, scn,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows_in_group = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows_in_group
    pid_n = (pid % width) // rows_in_group
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    dot_dtype = w_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:  # the LoRA K-steps first, scaled once, then the base K loop adds onto them
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            s = tl.load(s_ptr + rm[:, None] * ssm + rr[None, :] * ssr, mask=m_ok[:, None] & (rr < R)[None, :], other=0.0)
            b = tl.load(b_ptr + rr[:, None] * sbr + rn[None, :] * sbn, mask=(rr < R)[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(s.to(dot_dtype), b.to(dot_dtype), input_precision=PRECISION)
        acc = acc * alpha
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=m_ok[:, None] & (rk < K)[None, :], other=0.0)
        w = tl.load(w_ptr + rk[:, None] * swk + rn[None, :] * swn, mask=(rk < K)[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(x.to(dot_dtype), w, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None] * scm + rn[None, :] * scn, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def lora_gemm(
    x: Tensor, wt: Tensor, s: Tensor | None = None, bt: Tensor | None = None, alpha: float = 1.0,
    bias: Tensor | None = None, out_dtype: torch.dtype | None = None,
    block_m: int = 128, block_n: int = 128, block_k: int = 64, group_m: int = 8, num_warps: int = 8, num_stages: int = 3,
) -> Tensor:
    """x [M, K] @ wt [K, N] (+ alpha * s [M, R] @ bt [R, N]) (+ bias [N]) -> [M, N], fp32 accumulation.

    The dot runs in wt's dtype (x, s and bt are cast to it in registers); the result is `out_dtype`.
    """
    m, k = x.shape
    n = wt.shape[1]
    c = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    has_lora = s is not None
    s_, b_ = (s, bt) if has_lora else (x, wt)  # placeholders the kernel never reads
    r = s.shape[1] if has_lora else 0
    block_r = rank_block(r)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _lora_gemm_kernel[grid](
        x, wt, s_, b_, bias if bias is not None else c, c,
        m, n, k, r, float(alpha),
        x.stride(0), x.stride(1), wt.stride(0), wt.stride(1), s_.stride(0), s_.stride(1),
        b_.stride(0), b_.stride(1), c.stride(0), c.stride(1),
        HAS_LORA=has_lora, HAS_BIAS=bias is not None, PRECISION=dot_precision(wt.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, GROUP_M=group_m,
        num_warps=num_warps, num_stages=num_stages,
    )
    return c
