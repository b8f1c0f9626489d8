"""One block of error-feedback (GPTQ) rounding in one launch: the column loop that quantizing spends its time in.

What and why
------------
GPTQ rounding (passes/gptq.py) walks a layer's K columns one at a time: round column j to each row's
nearest codebook level, then push the scaled error onto the columns after it. Within a block of B = 128
columns every step depends on the one before, so in eager PyTorch one column is about a dozen launches of
tiny kernels; a Llama-2-7B layer has 4,096-11,008 columns and all of them together took ~4 minutes on one
H200, against ~20 s for nearest rounding (benchmarks/results/plan_speed_*). Rows, though, are
independent: here each program owns BLOCK_N rows of the block, holds their [BLOCK_N, B] weights and
scales in registers, and runs the whole column loop without leaving the kernel:

    for j in 0 .. B-1:
        v        = clamp(w[:, j] / scale[:, j], -1, 1)
        code     = #{ t : threshold[t] < v }            thresholds = midpoints of the row's sorted levels
        e        = (w[:, j] - level[code] * scale[:, j]) / u[j, j]
        w       -= e[:, None] * u[j, :]                 u is upper triangular: only columns >= j move
    store codes and e

Column j is read out of the register tile with a masked row sum (one non-zero term, so exact). The
pushes onto later blocks stay one GEMM in the caller (`errors @ u[block, after]`), where the tensor
cores do them. Divisions are IEEE-rounded (`div_rn`) like torch's; the update may be contracted to an
FMA on the GPU, so a code can differ from the reference's where a value sits on a threshold to within
an ulp (equally good roundings).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _gptq_block_kernel(
    w_ptr, scale_ptr, levels_ptr, u_ptr, codes_ptr, errors_ptr,
    N, B, L,
    swn, swb, ssn, ssb, sln, sll, sua, sub, scn, scb, sen, seb,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_B)
    lv = tl.arange(0, BLOCK_L)
    row_ok = rows < N
    tile_ok = row_ok[:, None] & (cols < B)[None, :]
    w = tl.load(w_ptr + rows[:, None] * swn + cols[None, :] * swb, mask=tile_ok, other=0.0)
    scale = tl.load(scale_ptr + rows[:, None] * ssn + cols[None, :] * ssb, mask=tile_ok, other=1.0)
    level_ptrs = levels_ptr + rows[:, None] * sln + lv[None, :] * sll
    levels = tl.load(level_ptrs, mask=row_ok[:, None] & (lv < L)[None, :], other=0.0)
    upper = tl.load(level_ptrs + sll, mask=row_ok[:, None] & (lv < L - 1)[None, :], other=0.0)
    thresholds = tl.where((lv < L - 1)[None, :], (upper + levels) / 2, float("inf"))
    codes = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.int32)
    errors = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    for j in range(0, B):
        here = (cols == j)[None, :]
        wj = tl.sum(tl.where(here, w, 0.0), axis=1)
        sj = tl.sum(tl.where(here, scale, 0.0), axis=1)
        v = tl.minimum(tl.maximum(tl.math.div_rn(wj, sj), -1.0), 1.0)
        code = tl.sum((thresholds < v[:, None]).to(tl.int32), axis=1)
        level = tl.sum(tl.where(lv[None, :] == code[:, None], levels, 0.0), axis=1)
        e = tl.math.div_rn(wj - level * sj, tl.load(u_ptr + j * sua + j * sub))
        u_row = tl.load(u_ptr + j * sua + cols * sub, mask=(cols >= j) & (cols < B), other=0.0)
        w -= e[:, None] * u_row[None, :]
        codes = tl.where(here, code[:, None], codes)
        errors = tl.where(here, e[:, None], errors)
    tl.store(codes_ptr + rows[:, None] * scn + cols[None, :] * scb, codes.to(tl.int64), mask=tile_ok)
    tl.store(errors_ptr + rows[:, None] * sen + cols[None, :] * seb, errors, mask=tile_ok)


def gptq_block(weight: Tensor, scale: Tensor, levels: Tensor, u: Tensor, block_n: int = 16,
               num_warps: int = 4) -> tuple[Tensor, Tensor]:
    """The kernel behind `lowra::gptq_block` (runtime.reference.gptq_block is the specification): float32
    weight, scale [N, B <= 128], levels [N, L <= 16], u [B, B] -> codes [N, B] int64, errors [N, B] float32."""
    n, b = weight.shape
    if b > 128 or levels.shape[1] > 16:
        raise ValueError(f"lowra: gptq_block takes blocks of at most 128 columns and 16 levels, got {b} and {levels.shape[1]}")
    codes = torch.empty(n, b, dtype=torch.long, device=weight.device)
    errors = torch.empty(n, b, dtype=torch.float32, device=weight.device)
    _gptq_block_kernel[(triton.cdiv(n, block_n),)](
        weight, scale, levels, u, codes, errors, n, b, levels.shape[1],
        weight.stride(0), weight.stride(1), scale.stride(0), scale.stride(1), levels.stride(0), levels.stride(1),
        u.stride(0), u.stride(1), codes.stride(0), codes.stride(1), errors.stride(0), errors.stride(1),
        BLOCK_N=block_n, BLOCK_B=max(16, triton.next_power_of_2(b)), BLOCK_L=max(2, triton.next_power_of_2(levels.shape[1])),
        num_warps=num_warps,
    )
    return codes, errors
