"""Per-layer quantization: absmax groups, per-channel codebooks at every candidate width, their errors.

For a weight W [N, K] (rows = output channels):

    absmax[n, g]  = max |W[n, g*G:(g+1)*G]|, double-quantized (runtime.format.quantize_absmax)
    v[n, k]       = W[n, k] / absmax[n, k // G]                    in [-1, 1]
    u[n, k]       = absmax[n, k // G]^2 * E[x_k^2]                 (E[x^2] = 1 without calibration)
    levels_b[n]   = 2^b sorted levels per row: weighted Lloyd-Max on (v[n], u[n]) from NormalFloat init,
                    or fixed NF / uniform levels
    error[n, b]   = sum_k u[n, k] * (v[n, k] - levels_b[n][code])^2 = sum_k (dW[n, k])^2 * E[x_k^2]

All rows of a layer are processed at once; codes come from `torch.searchsorted` on the per-row
thresholds (midpoints of sorted levels), never from an argmin over all levels. Levels are rounded to
the stored fp16 before the final assignment, so errors describe exactly what `runtime` dequantizes.
Only levels and errors are kept per width; `assemble` recomputes the codes of the chosen width, so
planning a large model never holds codes for every width at once.

With `rounding="gptq"` (a `HessianFactor` from the calibrated E[x x^T]) the levels are fitted the same
way, but codes come from error-feedback rounding (passes/gptq.py) and the error is the full output error
dW[n] H dW[n]^T, so the plan sees what each width really costs after compensation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..runtime.format import CODEBOOK_DTYPE, PackedWeight, dequantize_absmax, pack_weight, quantize_absmax
from .gptq import HessianFactor, gptq_codes, output_error, refit_levels

NF_OFFSET = 0.9677  # QLoRA's NF4 quantile offset


def nf_levels(bits: int) -> Tensor:
    """NormalFloat levels: 2^(b-1) positive and 2^(b-1) - 1 negative normal quantiles plus 0, in [-1, 1]."""
    if bits == 1:
        return torch.tensor([-1.0, 1.0])
    normal = torch.distributions.Normal(0.0, 1.0)
    half = 2 ** (bits - 1)
    pos = normal.icdf(torch.linspace(NF_OFFSET, 0.5, half + 1)[:-1])
    neg = -normal.icdf(torch.linspace(NF_OFFSET, 0.5, half)[:-1])
    levels = torch.cat([neg, torch.zeros(1), pos]).sort().values
    return levels / levels.abs().max()


def uniform_levels(bits: int) -> Tensor:
    """The round-to-nearest grid: 2^b evenly spaced levels from -1 to 1."""
    return torch.linspace(-1.0, 1.0, 2**bits)


@dataclass(frozen=True)
class LayerQuant:
    """Candidates of one layer. Tensors: absmax_codes uint8 [N, G], absmax_scale [N, ceil(G/256)],
    levels {b: [N, 2^b] float32, fp16-exact}, error [N, len(bit_choices)] float32 (None when the widths
    were fixed beforehand: `quantize_rows`)."""

    bit_choices: tuple[int, ...]
    group_size: int
    absmax_codes: Tensor
    absmax_scale: Tensor
    levels: dict[int, Tensor]
    error: Tensor | None


def _check_weight(weight: Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"lowra: expected a 2-D linear weight, got shape {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"lowra: cannot quantize {weight.dtype} weights; convert the model to float32/bfloat16")


def _normalise(weight: Tensor, group_size: int, absmax_codes: Tensor, absmax_scale: Tensor) -> tuple[Tensor, Tensor]:
    """v = W / absmax (in [-1, 1]) and the per-element absmax, both [N, K] float32."""
    k = weight.shape[1]
    absmax = dequantize_absmax(absmax_codes, absmax_scale).repeat_interleave(group_size, dim=1)[:, :k]
    v = weight.float() / absmax.clamp_min(torch.finfo(torch.float32).tiny)
    return v.clamp(-1.0, 1.0), absmax


def group_absmax(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Double-quantized absmax of every `group_size` run along K (the last run may be shorter)."""
    n, k = weight.shape
    groups = -(-k // group_size)
    padded = weight.new_zeros(n, groups * group_size, dtype=torch.float32)
    padded[:, :k] = weight.float().abs()
    return quantize_absmax(padded.view(n, groups, group_size).amax(-1))


def _assign(v: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest level per element (levels sorted per row): search the midpoints."""
    thresholds = (levels[:, 1:] + levels[:, :-1]) / 2
    return torch.searchsorted(thresholds.contiguous(), v.contiguous())


def _weighted_error(v: Tensor, u: Tensor, levels: Tensor) -> Tensor:
    return (u * (v - torch.gather(levels, 1, _assign(v, levels))) ** 2).sum(1)


def _lloyd(v: Tensor, u: Tensor, levels: Tensor, iters: int) -> Tensor:
    """Weighted 1-D k-means per row: levels <- weighted centroid of their cells; empty cells keep theirs."""
    for _ in range(iters):
        codes = _assign(v, levels)
        num = torch.zeros_like(levels).scatter_add_(1, codes, u * v)
        den = torch.zeros_like(levels).scatter_add_(1, codes, u)
        levels = torch.where(den > 0, num / den.clamp_min(1e-30), levels).sort(dim=1).values
    return levels


def _fp16_exact(levels: Tensor) -> Tensor:
    return levels.to(CODEBOOK_DTYPE).float()


def fit_levels(v: Tensor, u: Tensor, bits: int, codebook: str, lloyd_iters: int) -> tuple[Tensor, Tensor]:
    """Levels [N, 2^b] (fp16-exact) and the weighted error [N] of one width for all rows."""
    n = v.shape[0]
    init = (uniform_levels(bits) if codebook == "uniform" else nf_levels(bits)).to(v.device)
    fixed = _fp16_exact(init.expand(n, -1).contiguous())
    fixed_error = _weighted_error(v, u, fixed)
    if codebook != "lloyd":
        return fixed, fixed_error
    learned = _fp16_exact(_lloyd(v, u, fixed, lloyd_iters))
    learned_error = _weighted_error(v, u, learned)
    better = learned_error <= fixed_error  # never worse than NF for any row
    return torch.where(better[:, None], learned, fixed), torch.where(better, learned_error, fixed_error)


def _prepare(
    weight: Tensor, bit_choices: tuple[int, ...], group_size: int, x2: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Checked inputs -> absmax codes and scales, v, per-element absmax and u = absmax^2 * E[x^2] (x2 None:
    the plain weight error)."""
    _check_weight(weight)
    bad = [b for b in bit_choices if b not in (1, 2, 3, 4)]
    if bad:
        raise ValueError(f"lowra: bit widths {bad} are not supported; choose from 1, 2, 3, 4")
    absmax_codes, absmax_scale = group_absmax(weight, group_size)
    v, absmax = _normalise(weight, group_size, absmax_codes, absmax_scale)
    u = absmax**2 if x2 is None else absmax**2 * x2.float().to(absmax.device)[None, :]
    return absmax_codes, absmax_scale, v, absmax, u


def _codes(
    weight: Tensor, v: Tensor, absmax: Tensor, levels: Tensor, factor: HessianFactor | None, refit_rounds: int
) -> tuple[Tensor, Tensor]:
    """Codes and levels of the given rows: the nearest level; or, with a Hessian factor, error-feedback
    rounding, then `refit_rounds` times the levels refitted to the codes (gptq.refit_levels), each round
    after the first rounding again onto the refitted levels."""
    if factor is None:
        return _assign(v, levels), levels
    codes = gptq_codes(weight, absmax, levels, factor)
    for i in range(refit_rounds):
        if i:
            codes = gptq_codes(weight, absmax, levels, factor)
        levels, codes = refit_levels(weight, absmax, codes, levels, factor)
    return codes, levels


def quantize_layer(
    weight: Tensor,
    bit_choices: tuple[int, ...],
    group_size: int,
    codebook: str,
    x2: Tensor | None,
    lloyd_iters: int,
    factor: HessianFactor | None = None,
) -> LayerQuant:
    """Codebooks and errors of `weight` at every width in `bit_choices` (see the module docstring)."""
    absmax_codes, absmax_scale, v, absmax, u = _prepare(weight, bit_choices, group_size, x2)
    levels, errors = {}, []
    for bits in bit_choices:
        levels[bits], err = fit_levels(v, u, bits, codebook, lloyd_iters)
        errors.append(err)
    error = torch.stack(errors, 1) if factor is None else _feedback_error(weight, absmax, levels, factor)
    return LayerQuant(tuple(bit_choices), group_size, absmax_codes, absmax_scale, levels, error)


def _feedback_error(weight: Tensor, absmax: Tensor, levels: dict[int, Tensor], factor: HessianFactor) -> Tensor:
    """Output error [N, widths] after error-feedback rounding at every width, in one pass over the columns.

    Rows are rounded independently, so the widths are stacked as one tall matrix; each width's levels are
    padded to 16 by repeating its top level, which rounds to the same values (only the codes would differ).
    """
    n = weight.shape[0]
    stacked = torch.cat([torch.cat([lv, lv[:, -1:].expand(n, 16 - lv.shape[1])], 1) for lv in levels.values()])
    tall_weight, tall_absmax = weight.float().repeat(len(levels), 1), absmax.repeat(len(levels), 1)
    rounded = tall_absmax * torch.gather(stacked, 1, gptq_codes(tall_weight, tall_absmax, stacked, factor))
    return output_error(tall_weight - rounded, factor.gram).view(len(levels), n).t()


def assemble(
    lq: LayerQuant, weight: Tensor, bits_per_row: Tensor, factor: HessianFactor | None = None, refit_rounds: int = 0
) -> PackedWeight:
    """Pack `weight` with each row at its planned width, using the levels found by `quantize_layer` (with a
    Hessian factor, refitted to the error-feedback codes `refit_rounds` times)."""
    v, absmax = _normalise(weight, lq.group_size, lq.absmax_codes, lq.absmax_scale)
    n, k = weight.shape
    bits_per_row = bits_per_row.to(weight.device)
    unplanned = set(bits_per_row.unique().tolist()) - set(lq.bit_choices)
    if unplanned:
        raise ValueError(f"lowra: rows planned at {sorted(unplanned)} bits, which were not quantized ({lq.bit_choices})")
    codes = torch.zeros(n, k, dtype=torch.uint8, device=weight.device)
    levels = torch.zeros(n, 16, device=weight.device)
    for bits in lq.bit_choices:
        rows = (bits_per_row == bits).nonzero().squeeze(1)
        if len(rows):
            row_codes, row_levels = _codes(
                weight[rows], v[rows], absmax[rows], lq.levels[bits][rows], factor, refit_rounds
            )
            codes[rows] = row_codes.to(torch.uint8)
            levels[rows, : 2**bits] = row_levels
    return pack_weight(codes, bits_per_row, levels, lq.absmax_codes, lq.absmax_scale, lq.group_size, weight.dtype)


def quantize_rows(
    weight: Tensor,
    bits_per_row: Tensor,
    group_size: int,
    codebook: str,
    x2: Tensor | None,
    lloyd_iters: int,
    factor: HessianFactor | None = None,
    refit_rounds: int = 0,
) -> PackedWeight:
    """Quantize with the widths already fixed per row (LoftQ's inner step): each width's levels are fitted
    on its own rows only, and no errors are computed."""
    widths = tuple(sorted(set(bits_per_row.tolist())))
    absmax_codes, absmax_scale, v, absmax, u = _prepare(weight, widths, group_size, x2)
    bits_per_row = bits_per_row.to(weight.device)
    levels = {}
    for bits in widths:
        rows = (bits_per_row == bits).nonzero().squeeze(1)
        levels[bits] = torch.zeros(weight.shape[0], 2**bits, device=weight.device)
        levels[bits][rows] = fit_levels(v[rows], u[rows], bits, codebook, lloyd_iters)[0]
    lq = LayerQuant(widths, group_size, absmax_codes, absmax_scale, levels, None)
    return assemble(lq, weight, bits_per_row, factor, refit_rounds)
