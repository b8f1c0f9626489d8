"""Error-feedback rounding (GPTQ) onto the per-channel codebooks: codes that minimise the layer's output error.

Nearest rounding picks each code on its own, so the errors of one row add up in the output
y_n = sum_k W[n, k] x_k. With the input's second moment H = E[x x^T] (from calibration), the output
error of row n is dW[n] H dW[n]^T, and rounding the columns one at a time while pushing each column's
error onto the columns not yet rounded (the optimal brain surgeon update) cancels much of it:

    H'  = H + damp * mean(diag H) * I                  (damp = K / tokens, within [0.01, 1])
    U   = upper Cholesky factor of H'^-1, columns taken most-active-first (diag H descending)
    for each column k in that order:
        code[:, k] = nearest level of W[:, k] / absmax[:, k]  in each row's own codebook
        e          = (W[:, k] - absmax[:, k] * level) / U[k, k]
        W[:, j]   -= e * U[k, j]                               for the columns j after k

The codebooks and the group scales are fitted beforehand, on the original weights (passes/quantize.py), so
the packed format is unchanged; only which level each weight gets differs (`refit_rounds` may then refit
scales and levels to these codes: passes/refit.py). Every row is rounded
independently of the others, so any subset of rows gets the same codes as the whole layer, which lets
rows of different widths be rounded separately. Columns are processed in blocks of 128: the column loop
inside a block is the op `lowra::gptq_block` (its reference in runtime.reference; on CUDA one Triton
launch, codegen/gptq_block.py, registered when lowra_compile is imported), and the errors of a block
are pushed onto the rest of the row with one matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..runtime import ops as _ops  # noqa: F401  (defines torch.ops.lowra.gptq_block)

# Of the mean diagonal, added to H before inverting: a sample E[x x^T] over T tokens of K inputs is noisy
# (singular when T < K), and rounding onto an undamped one fits the calibration batch instead of the
# layer. The damping shrinks as tokens per input grow: damp = K / T, within [DAMP_MIN, DAMP_MAX]. Held-out
# output error of 15 SmolLM2 layers at 2 bits (benchmarks/gptq_damping.py), against the best of the fixed
# dampings {1, 0.3, 0.1, 0.03} per layer: the rule is +4.5% / +0.8% / +0.2% in the median (worst +12%)
# at 1k / 4k / 16k tokens; a fixed 1.0 is up to +42% at 16k, a fixed 0.1 up to +21% at 1k.
DAMP_MIN, DAMP_MAX = 0.01, 1.0
_BLOCK = 128


@dataclass(frozen=True)
class HessianFactor:
    """What GPTQ needs of one layer's input. Tensors: gram [K, K] float32 = E[x x^T] (undamped, for the
    error), order [K] int64 (columns, most active first), u [K, K] float32 (upper Cholesky factor of the
    damped inverse of gram[order][:, order]). Attribute: ridge, the damping added to gram's diagonal."""

    gram: Tensor
    order: Tensor
    u: Tensor
    ridge: float


def damping(features: int, tokens: int) -> float:
    """The relative damping for E[x x^T] of `features` inputs averaged over `tokens` rows (see DAMP_MIN)."""
    return min(DAMP_MAX, max(DAMP_MIN, features / max(tokens, 1)))


def hessian_factor(gram: Tensor, damp: float) -> HessianFactor:
    """Damp, reorder and factor E[x x^T] of one layer's input."""
    gram = gram.float()
    diag = gram.diagonal()
    order = torch.argsort(diag, descending=True)
    ridge = damp * diag.mean().clamp_min(1e-12).item()
    h = gram[order][:, order]  # indexing copies: the caller's gram stays undamped
    h.diagonal().add_(ridge)
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    u = torch.linalg.cholesky(inv, upper=True)
    return HessianFactor(gram, order, u.contiguous(), ridge)


class LatestFactor:
    """The Hessian factor of the input met last, rebuilt when the input changes.

    Layers reading one input (q, k and v; gate and up) share its E[x x^T] and are quantized one after
    another, so keeping only the latest factor means a 7B model never holds one per input (together about
    as large as the E[x x^T]s themselves); each is built again for packing instead.
    """

    def __init__(self) -> None:
        self.key: object = None
        self.factor: HessianFactor | None = None

    def __call__(self, key: object, gram: Callable[[], Tensor], tokens: int) -> HessianFactor:
        """The factor of input `key`; `gram()` gives its E[x x^T], averaged over `tokens` rows."""
        if self.factor is None or key != self.key:
            self.factor = None  # free the previous factor before building the next
            g = gram()
            self.factor = hessian_factor(g, damping(g.shape[0], tokens))
            self.key = key
        return self.factor


def gptq_codes(weight: Tensor, absmax: Tensor, levels: Tensor, factor: HessianFactor) -> Tensor:
    """Codes [N, K] (int64) of `weight` [N, K] with per-element scales `absmax` [N, K] and per-row sorted
    `levels` [N, L] in [-1, 1], rounded with error feedback (see the module docstring)."""
    order = factor.order.to(weight.device)
    u = factor.u.to(weight.device)
    w = weight.float()[:, order].clone()
    scale = absmax[:, order].clamp_min(torch.finfo(torch.float32).tiny)
    n, k = w.shape
    codes = torch.empty(n, k, dtype=torch.long, device=weight.device)
    for start in range(0, k, _BLOCK):
        end = min(start + _BLOCK, k)
        block = slice(start, end)
        codes[:, block], errors = torch.ops.lowra.gptq_block(w[:, block], scale[:, block], levels, u[block, block])
        w[:, end:] -= errors @ u[start:end, end:]
    out = torch.empty_like(codes)
    out[:, order] = codes
    return out


def output_error(delta: Tensor, gram: Tensor) -> Tensor:
    """dW[n] H dW[n]^T per row [N]: the mean squared output error of each row on the calibration inputs."""
    return ((delta @ gram.to(delta.device)) * delta).sum(1)
