"""Per-layer quantization: absmax groups, per-channel codebooks at every candidate width, their errors.

For a weight W [N, K] (rows = output channels):

    absmax[n, g]  = max |W[n, g*S:(g+1)*S]|, double-quantized (runtime.format.quantize_absmax; S the group
                    size, g < G the number of groups)
    v[n, k]       = W[n, k] / absmax[n, k // S]                    in [-1, 1]
    u[n, k]       = absmax[n, k // S]^2 * E[x_k^2]                 (E[x^2] = 1 without calibration; [K], or
                                                                    [N, K] when rows see different inputs:
                                                                    a mixture's experts)
    levels_b[n]   = 2^b sorted levels per row: weighted Lloyd-Max on (v[n], u[n]) from NormalFloat init,
                    or fixed NF / uniform levels
    error[n, b]   = sum_k u[n, k] * (v[n, k] - levels_b[n][code])^2 = sum_k (dW[n, k])^2 * E[x_k^2]

With `fit_scales` (option scales="fitted") each width then replaces the absmax by the group scale that
minimises that error for the codes just found, which the format stores in the absmax's place:

    s_b[n, g]     = sum_k E[x_k^2] W[n, k] l_k / sum_k E[x_k^2] l_k^2     over the group, l_k = levels_b[n][code]

(within 0.25-2x the absmax, double-quantized), and, for Lloyd-Max codebooks, one more step refits the levels
to the new v; a row keeps its absmax where that is not better. The absmax spends the top level on the
group's largest weight; with 1-4 levels per sign that is rarely where the group's error is smallest.

All rows of a layer are processed at once; codes count the per-row thresholds (midpoints of sorted
levels) below each weight, never an argmin over all levels. Levels are rounded to
the stored fp16 before the final assignment, so errors describe exactly what `runtime` dequantizes.
Per width only levels, group scales and errors are kept (the error-feedback codes too with `keep_codes`,
for passes/candidates.py); `assemble` recomputes the codes of the chosen width, so
planning a large model never holds codes for every width at once (passes/candidates.py keeps the
error-feedback codes on disk instead, and `assemble` reads them back rather than rounding again).

With `rounding="gptq"` (a `HessianFactor` from the calibrated E[x x^T]) the levels are fitted the same
way, but codes come from error-feedback rounding (passes/gptq.py) and the error is the full output error
dW[n] H dW[n]^T, so the plan sees what each width really costs after compensation. Packing rounds all
rows in one pass, whatever their widths, and can then refit each width's scales and levels to its codes
(`refit_rounds`, passes/refit.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..runtime.format import BIT_WIDTHS, CODEBOOK_DTYPE, PackedWeight, dequantize_absmax, pack_weight, quantize_absmax
from .gptq import HessianFactor, gptq_codes, output_error
from .refit import refit_levels, refit_scales

NF_OFFSET = 0.9677  # QLoRA's NF4 quantile offset


def nf_levels(bits: int) -> Tensor:
    """NormalFloat levels: 2^(b-1) positive and 2^(b-1) - 1 negative normal quantiles plus 0, in [-1, 1]
    (1 bit: -1 and 1)."""
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


# A fitted group scale stays within these multiples of the group's absmax: outside them the group is
# degenerate (all its codes on a level near 0), and the absmax's double quantization keeps its range.
SCALE_RANGE = (0.25, 2.0)

Groups = tuple[Tensor, Tensor]  # double-quantized group scales: uint8 codes [N, G], fp32 scales [N, ceil(G/256)]


@dataclass(frozen=True)
class CodebookFit:
    """How every width's levels and group scales are fitted (LowRAConfig's group_size, codebook,
    lloyd_iters and scales): groups of `group_size` input channels; levels "lloyd" (weighted Lloyd-Max,
    `lloyd_iters` steps from NF), "nf" or "uniform"; group scales fitted to the codes (`fit_scales`) or
    the absmax (the default here; LowRAConfig's default fits them)."""

    group_size: int
    codebook: str
    lloyd_iters: int
    fit_scales: bool = False


@dataclass(frozen=True)
class LayerQuant:
    """Candidates of one layer. Tensors per width b: groups {b: (uint8 [N, G], float32 [N, ceil(G/256)])}
    (the group scales, stored as the format's absmax; the same for every width unless fitted), levels
    {b: [N, 2^b] float32, fp16-exact}; error [N, len(bit_choices)] float32 (None when the widths were fixed
    beforehand: `quantize_rows`); codes {b: [N, K] uint8}, the error-feedback codes behind the error, when
    kept (`keep_codes`; else None: `assemble` rounds again). Attribute fitted: whether the group scales were
    fitted (else absmax)."""

    bit_choices: tuple[int, ...]
    group_size: int
    fitted: bool
    groups: dict[int, Groups]
    levels: dict[int, Tensor]
    error: Tensor | None
    codes: Mapping[int, Tensor] | None = None


def _check_weight(weight: Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"lowra: expected a 2-D linear weight, got shape {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"lowra: cannot quantize {weight.dtype} weights; convert the model to float32/bfloat16")


def _normalise(weight: Tensor, group_size: int, groups: Groups, clip: bool = True) -> tuple[Tensor, Tensor]:
    """v = W / scale and the per-element group scale, both [N, K] float32. v is clipped to [-1, 1], which
    only moves it by the rounding of an absmax; a fitted scale can be below a group's largest weight, whose
    error then counts in full (clip=False)."""
    absmax = _element_scale(groups, group_size, weight.shape[1])
    v = weight.float() / absmax.clamp_min(torch.finfo(torch.float32).tiny)
    return (v.clamp(-1.0, 1.0) if clip else v), absmax


def _element_scale(groups: Groups, group_size: int, k: int) -> Tensor:
    """The group scale of every element, [N, K] float32."""
    return dequantize_absmax(*groups).repeat_interleave(group_size, dim=1)[:, :k]


def _importance(absmax: Tensor, x2: Tensor | None) -> Tensor:
    """u = absmax^2 * E[x^2] per element (x2 [K] or per row [N, K]; None: the plain weight error)."""
    return absmax**2 if x2 is None else absmax**2 * x2.float().to(absmax.device)


def _in_groups(values: Tensor, group_size: int) -> Tensor:
    """[N, K] as [N, G, group_size], the last group padded with zeros."""
    n, k = values.shape
    groups = -(-k // group_size)
    return torch.nn.functional.pad(values, (0, groups * group_size - k)).view(n, groups, group_size)


def _group_sums(values: Tensor, group_size: int) -> Tensor:
    return _in_groups(values, group_size).sum(-1)


def group_absmax(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Double-quantized absmax of every `group_size` run along K (the last run may be shorter)."""
    return quantize_absmax(_in_groups(weight.float().abs(), group_size).amax(-1))


def _assign(v: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest level per element (levels sorted per row): the number of midpoints below it.

    Counting with one comparison per midpoint (at most 15) gives what `torch.searchsorted` gives, ties
    included, 1.6-5x faster on CPU (135M shapes, 2 to 16 levels), where it is the inner step of Lloyd-Max.
    """
    thresholds = (levels[:, 1:] + levels[:, :-1]) / 2
    codes = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for j in range(thresholds.shape[1]):
        codes += v > thresholds[:, j : j + 1]
    return codes.long()


def _weighted_error(v: Tensor, u: Tensor, levels: Tensor) -> Tensor:
    return (u * (v - torch.gather(levels, 1, _assign(v, levels))) ** 2).sum(1)


def _lloyd(v: Tensor, u: Tensor, levels: Tensor, iters: int) -> Tensor:
    """Weighted 1-D k-means per row: levels <- weighted centroid of their cells. A level whose cell holds no
    weight moves onto one of its row's worst-rounded weights (`_reseed`): a row of one sign left the NF
    start's other half unused, and a row of few distinct weights rounded some of them together. (On SmolLM2's
    decoder no level is left empty at 1-3 bits and 22 of 2.5 M at 4: this is for such rows.)"""
    for _ in range(iters):
        codes = _assign(v, levels)
        num = torch.zeros_like(levels).scatter_add_(1, codes, u * v)
        den = torch.zeros_like(levels).scatter_add_(1, codes, u)
        centroids = torch.where(den > 0, num / den.clamp_min(1e-30), levels)
        empty = torch.zeros_like(levels).scatter_add_(1, codes, torch.ones_like(v)) == 0
        if empty.any():
            centroids = torch.where(empty, _reseed(v, u, centroids, codes, empty), centroids)
        levels = centroids.sort(dim=1).values
    return levels


def _reseed(v: Tensor, u: Tensor, levels: Tensor, codes: Tensor, empty: Tensor) -> Tensor:
    """New places for each row's empty levels (`empty` [N, L]): the values of its weights that its levels round
    worst (importance times squared error), the worst first, one per empty level; the next assignment then
    splits their cells. Zeros in the rows without an empty level."""
    rows = empty.any(dim=1).nonzero().squeeze(1)
    v, u, codes = v[rows], u[rows], codes[rows]
    error = u * (v - levels[rows].gather(1, codes)) ** 2
    worst = v.gather(1, error.topk(min(levels.shape[1], v.shape[1]), dim=1).indices)
    rank = (empty[rows].cumsum(dim=1) - 1).clamp(0, worst.shape[1] - 1)  # each empty level's place among its row's
    out = torch.zeros_like(levels)
    out[rows] = worst.gather(1, rank)
    return out


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


def _prepare(weight: Tensor, bit_choices: tuple[int, ...], group_size: int) -> Groups:
    """Checked inputs -> the double-quantized group absmax."""
    _check_weight(weight)
    bad = [b for b in bit_choices if b not in BIT_WIDTHS]
    if bad:
        raise ValueError(f"lowra: bit widths {bad} are not supported; choose from {', '.join(map(str, BIT_WIDTHS))}")
    return group_absmax(weight, group_size)


def fit_group_scales(
    weight: Tensor, v: Tensor, x2: Tensor | None, levels: Tensor, group_size: int, absmax: Groups
) -> Groups:
    """Double-quantized group scales that minimise sum_k E[x_k^2] (W[n, k] - s * l_k)^2 per group, l_k the
    level nearest to v = W / absmax (least squares: s = sum E[x^2] W l / sum E[x^2] l^2), within SCALE_RANGE."""
    x2 = torch.ones_like(v[0]) if x2 is None else x2.float().to(v.device)  # [K] or [N, K]
    level = torch.gather(levels, 1, _assign(v, levels))
    num = _group_sums(x2 * weight.float() * level, group_size)
    den = _group_sums(x2 * level * level, group_size)
    old = dequantize_absmax(*absmax)
    return _bounded(torch.where(den > 0, num / den.clamp_min(1e-30), old), old)


def _bounded(scales: Tensor, absmax: Tensor) -> Groups:
    """Fitted group scales [N, G], kept within SCALE_RANGE of the groups' `absmax` and double-quantized."""
    return quantize_absmax(torch.minimum(torch.maximum(scales, SCALE_RANGE[0] * absmax), SCALE_RANGE[1] * absmax))


def fit_width(
    weight: Tensor, x2: Tensor | None, bits: int, fit: CodebookFit, absmax: Groups
) -> tuple[Groups, Tensor, Tensor]:
    """Group scales, levels [N, 2^b] (fp16-exact) and weighted error [N] of one width for all rows (see the
    module docstring)."""
    v, scale = _normalise(weight, fit.group_size, absmax)
    u = _importance(scale, x2)
    levels, error = fit_levels(v, u, bits, fit.codebook, fit.lloyd_iters)
    if not fit.fit_scales:
        return absmax, levels, error
    groups = fit_group_scales(weight, v, x2, levels, fit.group_size, absmax)
    v, scale = _normalise(weight, fit.group_size, groups, clip=False)
    u = _importance(scale, x2)
    refit = _fp16_exact(_lloyd(v, u, levels, 1).clamp(-1.0, 1.0)) if fit.codebook == "lloyd" else levels
    refit_error = _weighted_error(v, u, refit)
    better = refit_error < error
    groups = tuple(torch.where(better[:, None], new, old) for new, old in zip(groups, absmax))
    return groups, torch.where(better[:, None], refit, levels), torch.where(better, refit_error, error)


def _refit(
    weight: Tensor, groups: Groups, levels: Tensor, codes: Tensor, group_size: int, factor: HessianFactor, rounds: int,
    fit_scales: bool,
) -> tuple[Tensor, Tensor, Groups]:
    """Codes, levels and group scales of rows of one width after `rounds` times refitting the group scales
    (when fitted) and the levels to the error-feedback codes (passes/refit.py), each round after the first
    rounding again onto them."""
    scale = _element_scale(groups, group_size, weight.shape[1])
    absmax = dequantize_absmax(*group_absmax(weight, group_size)) if fit_scales else None
    for i in range(rounds):
        if i:
            codes = gptq_codes(weight, scale, levels, factor)
        if absmax is not None:
            solved = refit_scales(weight, dequantize_absmax(*groups), codes, levels, group_size, factor)
            groups = _bounded(solved, absmax)
            scale = _element_scale(groups, group_size, weight.shape[1])
        levels, codes = refit_levels(weight, scale, codes, levels, factor)
    return codes, levels, groups


def _padded(levels: Tensor) -> Tensor:
    """Levels [N, 2^b] -> [N, 16], the top level repeated: nearest and error-feedback rounding give the same
    values on them (a code past 2^b - 1 points at a copy of the top level)."""
    return torch.cat([levels, levels[:, -1:].expand(-1, 16 - levels.shape[1])], 1)


def quantize_layer(
    weight: Tensor,
    bit_choices: tuple[int, ...],
    fit: CodebookFit,
    x2: Tensor | None = None,
    factor: HessianFactor | None = None,
    keep_codes: bool = False,
) -> LayerQuant:
    """Codebooks and errors of `weight` at every width in `bit_choices` (see the module docstring), weighted
    by the input's E[x^2] `x2` (None: 1); with a Hessian factor, rounded with error feedback, and with
    `keep_codes` the codes of every width kept."""
    absmax = _prepare(weight, bit_choices, fit.group_size)
    groups, levels, errors = {}, {}, []
    for bits in bit_choices:
        groups[bits], levels[bits], err = fit_width(weight, x2, bits, fit, absmax)
        errors.append(err)
    lq = LayerQuant(tuple(bit_choices), fit.group_size, fit.fit_scales, groups, levels, None)
    if factor is None:
        return dataclasses.replace(lq, error=torch.stack(errors, 1))
    error, codes = _feedback_error(weight, lq, factor)
    # a code past 2^b - 1 points at a copy of the top level (_padded): clamped, it is the same value
    kept = {b: codes[j].clamp_max(2**b - 1).to(torch.uint8) for j, b in enumerate(bit_choices)} if keep_codes else None
    return dataclasses.replace(lq, error=error, codes=kept)


def _feedback_error(weight: Tensor, lq: LayerQuant, factor: HessianFactor) -> tuple[Tensor, Tensor]:
    """Output error [N, widths] after error-feedback rounding at every width, in one pass over the columns,
    and the codes [widths, N, K] (int64; a code past 2^b - 1 points at a copy of the top level).

    Rows are rounded independently, so the widths are stacked as one tall matrix; each width's levels are
    padded to 16 by repeating its top level, which rounds to the same values (only the codes would differ).
    """
    n, levels = weight.shape[0], lq.levels
    stacked = torch.cat([_padded(lv) for lv in levels.values()])
    tall_absmax = torch.cat([_element_scale(lq.groups[b], lq.group_size, weight.shape[1]) for b in levels])
    tall_weight = weight.float().repeat(len(levels), 1)
    codes = gptq_codes(tall_weight, tall_absmax, stacked, factor)
    rounded = tall_absmax * torch.gather(stacked, 1, codes)
    return output_error(tall_weight - rounded, factor.gram).view(len(levels), n).t(), codes.view(len(levels), n, -1)


def assemble(
    lq: LayerQuant, weight: Tensor, bits_per_row: Tensor, factor: HessianFactor | None = None, refit_rounds: int = 0
) -> PackedWeight:
    """Pack `weight` with each row at its planned width, using the levels and group scales found by
    `quantize_layer` (with a Hessian factor, rounded with error feedback, or the codes `lq` kept of that
    rounding; then refitted to those codes `refit_rounds` times, the scales only where they were fitted)."""
    n, k = weight.shape
    bits_per_row = bits_per_row.to(weight.device)
    unplanned = set(bits_per_row.unique().tolist()) - set(lq.bit_choices)
    if unplanned:
        raise ValueError(f"lowra: rows planned at {sorted(unplanned)} bits, which were not quantized ({lq.bit_choices})")
    levels = torch.zeros(n, 16, device=weight.device)
    groups = tuple(torch.zeros_like(t) for t in lq.groups[lq.bit_choices[0]])
    rows_of = {b: rows for b in lq.bit_choices if len(rows := (bits_per_row == b).nonzero().squeeze(1))}
    for bits, rows in rows_of.items():
        levels[rows] = _padded(lq.levels[bits][rows])
        _put_rows(groups, rows, tuple(t[rows] for t in lq.groups[bits]))
    if factor is not None and lq.codes is not None:  # the quantize stage's error-feedback codes
        codes = torch.empty(n, k, dtype=torch.long, device=weight.device)
        for bits, rows in rows_of.items():
            codes[rows] = lq.codes[bits].to(weight.device)[rows].long()
    else:  # every width in one rounding pass: the column loop of error feedback costs the same for a few rows
        v, scale = _normalise(weight, lq.group_size, groups)
        codes = _assign(v, levels) if factor is None else gptq_codes(weight, scale, levels, factor)
    codes = torch.minimum(codes, 2 ** bits_per_row[:, None] - 1)
    for bits, rows in rows_of.items() if factor is not None and refit_rounds else ():
        row_groups = tuple(t[rows] for t in groups)
        codes[rows], levels[rows, : 2**bits], row_groups = _refit(
            weight[rows], row_groups, levels[rows, : 2**bits], codes[rows], lq.group_size, factor, refit_rounds, lq.fitted
        )
        _put_rows(groups, rows, row_groups)
    return pack_weight(codes, bits_per_row, levels, *groups, lq.group_size, weight.dtype)


def _put_rows(groups: tuple[Tensor, ...], rows: Tensor, part: tuple[Tensor, ...]) -> None:
    """Write `rows`' group scales (absmax codes and their scales) into a layer's."""
    for whole, values in zip(groups, part):
        whole[rows] = values


def quantize_rows(
    weight: Tensor,
    bits_per_row: Tensor,
    fit: CodebookFit,
    x2: Tensor | None = None,
    factor: HessianFactor | None = None,
    refit_rounds: int = 0,
) -> PackedWeight:
    """Quantize with the widths already fixed per row (LoftQ's inner step): each width's scales and levels
    are fitted on its own rows only, and no errors are computed."""
    widths = tuple(sorted(set(bits_per_row.tolist())))
    absmax = _prepare(weight, widths, fit.group_size)
    bits_per_row = bits_per_row.to(weight.device)
    groups, levels = {}, {}
    for bits in widths:
        rows = (bits_per_row == bits).nonzero().squeeze(1)
        row_x2 = x2[rows] if x2 is not None and x2.dim() == 2 else x2
        row_groups, row_levels, _ = fit_width(weight[rows], row_x2, bits, fit, tuple(t[rows] for t in absmax))
        groups[bits] = tuple(t.clone() for t in absmax)
        _put_rows(groups[bits], rows, row_groups)
        levels[bits] = torch.zeros(weight.shape[0], 2**bits, device=weight.device)
        levels[bits][rows] = row_levels
    lq = LayerQuant(widths, fit.group_size, fit.fit_scales, groups, levels, None)
    return assemble(lq, weight, bits_per_row, factor, refit_rounds)
