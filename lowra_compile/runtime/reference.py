"""Pure-torch reference of the LowRA ops: the specification every kernel is tested against, and the
implementation used on CPU and under fake tensors.

    dequantize:        packed tensors -> dense W [N, K] in original row order
    dora_row_norms:    ||W[n] + s (B A)[n]|| for every row n, fp32: DoRA's weight norm, without a dense W
    lora_linear:       y  = x W^T + b + s * (x_lora A^T) B^T
    lora_linear_backward: dx = dy W ;  S = x_lora A^T ;  dS = s * dy B ;  dB = s * dy^T S ;  dA = dS^T x_lora ;
                       dx_lora = dS A
    grouped_linear:    y[rows of expert e] = x[rows of expert e] W_e^T, W = dequantize(..).view(E, N, K): the
                       experts of a mixture, stacked in one packed matrix (rows sorted by expert, `offsets`
                       their cumulative ends, as transformers' grouped product takes them)
    grouped_linear_backward: dx[rows of expert e] = dy[rows of expert e] W_e
    gptq_block:        codes and scaled errors of one block of columns rounded with error feedback
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .format import BIT_WIDTHS, dequantize_absmax, unpack_codes


def no_output(like: Tensor) -> Tensor:
    """An empty tensor for an output an op does not compute: a fresh one each time, as op outputs may not alias."""
    return like.new_empty(0)


def _dense_rows(packed: list[Tensor], k: int, group_size: int, chunk: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """(original row indices [r], fp32 rows [r, K]) of the dense weight, `chunk` packed rows at a time (None:
    each bit group whole)."""
    perm, absmax_codes, absmax_scale, *groups = packed
    absmax = dequantize_absmax(absmax_codes, absmax_scale)  # [N, G], packed row order
    start = 0
    for i, bits in enumerate(BIT_WIDTHS):
        codes, codebook = groups[2 * i], groups[2 * i + 1]
        rows = codes.shape[0]
        step = chunk or max(rows, 1)
        for first in range(0, rows, step):
            last = min(first + step, rows)
            scale = absmax[start + first : start + last].repeat_interleave(group_size, dim=1)[:, :k]
            values = torch.gather(codebook[first:last].float(), 1, unpack_codes(codes[first:last], bits, k))
            yield perm[start + first : start + last].long(), values * scale
        start += rows


def dequantize(packed: list[Tensor], k: int, group_size: int, dtype: torch.dtype) -> Tensor:
    """Dense [N, K] weight in original row order, computed in fp32 and cast to `dtype`."""
    out = torch.empty(packed[0].shape[0], k, dtype=torch.float32, device=packed[0].device)
    for rows, values in _dense_rows(packed, k, group_size):
        out[rows] = values
    return out.to(dtype)


_NORM_ROWS = 256  # rows dequantized at a time for the norms: 11 MB of fp32 at K = 11008


def dora_row_norms(
    packed: list[Tensor], k: int, group_size: int, lora_a: Tensor, lora_b: Tensor, scaling: float
) -> Tensor:
    """[N] fp32: the norm of each row of W + scaling * B A (A [r, K], B [N, r]), DoRA's weight norm (PEFT's
    `get_weight_norm`), in fp32 whatever the adapters' dtype. Neither W nor B A is ever held whole: a few
    hundred rows of each at a time."""
    out = torch.empty(packed[0].shape[0], dtype=torch.float32, device=packed[0].device)
    a = lora_a.float()
    for rows, values in _dense_rows(packed, k, group_size, _NORM_ROWS):
        values += scaling * (lora_b[rows].float() @ a)
        out[rows] = torch.linalg.vector_norm(values, dim=1)
    return out


def lora_output_dtype(x: Tensor, lora_a: Tensor | None) -> torch.dtype:
    return x.dtype if lora_a is None else torch.promote_types(x.dtype, lora_a.dtype)


def lora_linear(
    x: Tensor,
    x_lora: Tensor,
    packed: list[Tensor],
    group_size: int,
    bias: Tensor | None,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    scaling: float,
) -> Tensor:
    w = dequantize(packed, x.shape[-1], group_size, x.dtype)
    y = F.linear(x, w, bias)
    if lora_a is None:
        return y
    return y + scaling * F.linear(F.linear(x_lora, lora_a), lora_b)


def lora_linear_backward(
    grad: Tensor,
    x_lora: Tensor,
    packed: list[Tensor],
    group_size: int,
    k: int,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    scaling: float,
    need_dx: bool,
    merge_dx: bool,
    compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dx_lora, dA, dB); the ones not computed are empty tensors (x_lora may be empty without LoRA).

    merge_dx: x_lora is x, so return dx = dy W + dS A and an empty dx_lora.
    compute_dtype: x's dtype, which dy W runs in, as the dense linear's backward would (dy is fp32 next to
    fp32 adapters, and PEFT casts x_lora to them).
    """
    dx = no_output(grad)
    if need_dx:
        w = dequantize(packed, k, group_size, compute_dtype)
        dx = (grad.to(compute_dtype) @ w).to(grad.dtype)
    if lora_a is None:
        return dx, no_output(grad), no_output(grad), no_output(grad)
    g2 = grad.reshape(-1, grad.shape[-1]).to(lora_b.dtype)
    xl2 = x_lora.reshape(-1, x_lora.shape[-1]).to(lora_a.dtype)
    s = xl2 @ lora_a.t()
    ds = scaling * (g2 @ lora_b)
    db = scaling * (g2.t() @ s)
    da = ds.t() @ xl2
    dx_lora = (ds @ lora_a).view(*x_lora.shape[:-1], lora_a.shape[1])
    if merge_dx:
        return dx + dx_lora.to(dx.dtype), no_output(grad), da, db
    return dx, dx_lora.to(x_lora.dtype), da, db


def per_expert_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """x[rows of expert e] @ w[e] for every expert; rows past the last offset (none in transformers' use) are
    zero. Like torch's grouped product, it computes in the inputs' dtype, autocast or not (transformers casts x
    to the weight's dtype first)."""
    with torch.autocast(x.device.type, enabled=False):
        if _grouped_mm_runs(x, w, offsets):
            # torch's product leaves those rows uninitialised; zeroing them takes no host sync
            past = torch.arange(x.shape[0], device=x.device) >= offsets[-1]
            return F.grouped_mm(x, w, offs=offsets).masked_fill_(past[:, None], 0)
        # One host sync for the offsets, as transformers' own fallback
        out = x.new_zeros(x.shape[0], w.shape[-1])
        start = 0
        for e, end in enumerate(offsets.tolist()):
            if end > start:
                torch.mm(x[start:end], w[e], out=out[start:end])
            start = end
        return out


def _grouped_mm_runs(x: Tensor, w: Tensor, offsets: Tensor) -> bool:
    """Whether torch's grouped product takes these operands: one kernel and no host sync, where the loop
    above syncs once and runs a product per expert. It needs bf16 on CUDA (sm80 and later), float32 on the
    CPU, int32 offsets, a row-major x, and 16-byte aligned rows."""
    if not hasattr(F, "grouped_mm") or offsets.dtype != torch.int32:
        return False
    if x.device.type == "cuda":
        supported = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    else:
        supported = x.device.type == "cpu" and x.dtype == torch.float32
    # x row-major (a gradient may come expanded, stride 0: the loop takes it); w either way round
    laid_out = x.is_contiguous() and 1 in w.stride()[1:]
    aligned = all(s * x.element_size() % 16 == 0 for s in (*x.stride()[:-1], *w.stride()) if s != 1)
    return supported and laid_out and aligned and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0


def grouped_linear(x: Tensor, offsets: Tensor, packed: list[Tensor], group_size: int, experts: int) -> Tensor:
    """x [M, K], rows sorted by expert -> [M, N]. The dequantization goes through the `lowra::dequant` op,
    so a device with a faster kernel for it uses that."""
    k = x.shape[-1]
    w = torch.ops.lowra.dequant(packed, k, group_size, x.dtype).view(experts, -1, k)
    return per_expert_mm(x, w.transpose(1, 2), offsets)


def grouped_linear_backward(
    grad: Tensor, offsets: Tensor, packed: list[Tensor], group_size: int, experts: int, k: int
) -> Tensor:
    """dx [M, K] of `grouped_linear`; the frozen weight gets no gradient, and is dequantized again here
    rather than kept from the forward (that would hold every expert dense until the backward)."""
    w = torch.ops.lowra.dequant(packed, k, group_size, grad.dtype).view(experts, -1, k)
    return per_expert_mm(grad, w, offsets)


def gptq_block(weight: Tensor, scale: Tensor, levels: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """One block of error-feedback rounding (passes/gptq.py): columns j = 0 .. B-1 in turn, each rounded to
    its row's nearest level and its scaled error pushed onto the block's later columns.

    weight, scale [N, B] float32 (scale > 0); levels [N, L] float32, sorted per row; u [B, B] float32, this
    block's diagonal block of the upper Cholesky factor. Returns codes [N, B] int64 and errors [N, B]
    float32, e[:, j] = (w[:, j] - level * scale[:, j]) / u[j, j], for the caller's update of later blocks.
    """
    # transposed, so that every step reads and updates contiguous rows (1.2-1.6x faster on CPU than columns)
    w = weight.float().t().contiguous()
    scale_t = scale.float().t().contiguous()
    levels_t = levels.t().contiguous()
    thresholds = ((levels[:, 1:] + levels[:, :-1]) / 2).t().contiguous()
    codes = torch.empty(w.shape, dtype=torch.long, device=w.device)
    errors = torch.empty_like(w)
    for j in range(w.shape[0]):
        v = (w[j] / scale_t[j]).clamp(-1.0, 1.0)
        codes[j] = (v[None, :] > thresholds).sum(0)  # midpoints below v: the nearest level's index
        rounded = levels_t.gather(0, codes[j, None]).squeeze(0) * scale_t[j]
        errors[j] = (w[j] - rounded) / u[j, j]
        w[j + 1 :] -= u[j, j + 1 :, None] * errors[j, None, :]
    return codes.t().contiguous(), errors.t().contiguous()
