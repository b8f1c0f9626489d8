"""Refit a channel's codebook to its error-feedback codes: group scales and levels by least squares.

Error-feedback rounding (passes/gptq.py) picks the codes for levels and group scales fitted before it, on
the weights alone (weighted Lloyd-Max, fitted scales: passes/quantize.py). Once the codes are fixed, row n
dequantizes to s[n, g(k)] * l_n[code[n, k]], and its output error on the damped H = E[x x^T] + ridge I,

    (w_n - deq_n) H (w_n - deq_n)^T,

is quadratic in the scales with the levels fixed, and in the levels with the scales fixed:

    scales  s_n [G]:  (L_n^T H L_n + r I) s_n = L_n^T H w_n + r s_n_old     L_n[k, g] = l_n[code[n, k]] if k in g
    levels  l_n [L]:  (X_n^T H X_n + r I) l_n = X_n^T H w_n + r l_n_old     X_n[k, j] = s[n, g(k)] if code[n, k] = j

One refit round solves the scales, then the levels (passes/quantize.py `_refit` rounds again in between
rounds). The ridge r (of the system's mean diagonal) keeps a scale or level that no code constrains where
it was, and a near-singular system finite. Every row is solved on its own, in chunks of rows whose
[rows, K, G] or [rows, K, L] products stay under 64 MiB.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..runtime.format import CODEBOOK_DTYPE
from .gptq import HessianFactor

# Elements of the [rows, K, G] / [rows, K, L] products built at once (2^24: 64 MiB in float32).
_ELEMENTS = 1 << 24
# Of each row's mean diagonal, pulling the solution toward the old values (see the module docstring).
_RIDGE = 1e-3


def _solve(lhs: Tensor, rhs: Tensor, old: Tensor) -> Tensor:
    """Solve (lhs + r I) x = rhs + r old per row, r = _RIDGE * mean diag(lhs); lhs [R, M, M], rhs/old [R, M]."""
    r = _RIDGE * lhs.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
    lhs.diagonal(dim1=1, dim2=2).add_(r[:, None])
    return torch.linalg.solve(lhs, rhs + r[:, None] * old)


def _damped(factor: HessianFactor, size: int, device: torch.device) -> Tensor:
    """E[x x^T] + ridge I, zero-padded to [size, size]."""
    k = factor.gram.shape[0]
    h = torch.zeros(size, size, device=device)
    h[:k, :k] = factor.gram.to(device)
    h.diagonal()[:k] += factor.ridge
    return h


def refit_scales(weight: Tensor, scales: Tensor, codes: Tensor, levels: Tensor, group_size: int, factor: HessianFactor) -> Tensor:
    """Group scales [N, G] (float32, not yet double-quantized) that minimise each row's output error for its
    fixed codes [N, K] and levels [N, L]; `scales` [N, G] are the current ones."""
    n, k = weight.shape
    g = scales.shape[1]
    padded = g * group_size
    h = _damped(factor, padded, weight.device)
    level = torch.nn.functional.pad(torch.gather(levels, 1, codes), (0, padded - k))
    rhs = ((torch.nn.functional.pad(weight.float(), (0, padded - k)) @ h) * level).view(n, g, group_size).sum(-1)
    blocks = h.view(padded, g, group_size)
    new = torch.empty_like(scales, dtype=torch.float32)
    for rows in torch.arange(n, device=weight.device).split(max(1, _ELEMENTS // (padded * g))):
        lg = level[rows].view(len(rows), g, group_size)
        hl = torch.einsum("rhb,ahb->rah", lg, blocks)  # H L_n: [rows, K, G]
        lhs = torch.einsum("rga,rgah->rgh", lg, hl.view(len(rows), g, group_size, g))
        new[rows] = _solve(lhs, rhs[rows], scales[rows].float())
    return new


def refit_levels(weight: Tensor, scale: Tensor, codes: Tensor, levels: Tensor, factor: HessianFactor) -> tuple[Tensor, Tensor]:
    """Levels [N, L] that minimise each row's output error for its fixed codes [N, K] and per-element scales
    `scale` [N, K], and the codes that point at the same levels once they are sorted again. Levels are
    clamped to [-1, 1] and rounded to fp16, as the format stores them."""
    n, k = weight.shape
    m = levels.shape[1]
    h = _damped(factor, k, weight.device)
    new = torch.empty_like(levels)
    for rows in torch.arange(n, device=weight.device).split(max(1, _ELEMENTS // (k * m))):
        x = torch.zeros(len(rows), k, m, device=weight.device)
        x.scatter_(2, codes[rows, :, None], scale[rows, :, None].float())
        hx = (h @ x.transpose(0, 1).reshape(k, -1)).view(k, len(rows), m).transpose(0, 1)  # H X_n: [rows, K, L]
        lhs = x.transpose(1, 2) @ hx  # [rows, L, L]
        rhs = (hx * weight[rows, :, None].float()).sum(1)  # X^T H w: H is symmetric
        new[rows] = _solve(lhs, rhs, levels[rows])
    new, order = new.clamp(-1.0, 1.0).to(CODEBOOK_DTYPE).float().sort(dim=1)
    return new, torch.gather(order.argsort(dim=1), 1, codes)
