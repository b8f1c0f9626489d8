"""Refitting group scales and levels to fixed codes: the least-squares optimum of the damped output error."""

import pytest
import torch

from lowra_compile.passes import quantize, refit
from lowra_compile.passes.gptq import gptq_codes, hessian_factor, output_error
from lowra_compile.passes.quantize import SCALE_RANGE, CodebookFit, assemble, group_absmax, quantize_layer
from lowra_compile.runtime.format import dequantize_absmax
from lowra_compile.runtime.reference import dequantize

from .layer_data import GROUP, correlated_inputs, dequant, layer


def _factor(k: int):
    x = correlated_inputs(k, 4 * k)
    return hessian_factor(x.t() @ x / x.shape[0], 0.1)


def _root(factor):
    """R with R^T R = E[x x^T] + ridge I: the damped error as a plain sum of squares."""
    damped = factor.gram + factor.ridge * torch.eye(factor.gram.shape[0])
    return damped, torch.linalg.cholesky(damped).t()


@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("k", [96, 100])  # the last group full, and 4 wide
def test_refit_scales_solve_the_least_squares_problem_of_the_fixed_codes(bits, k):
    w, _, absmax, levels = layer(12, k, bits)
    factor = _factor(k)
    codes = gptq_codes(w, absmax, levels, factor)
    groups = dequantize_absmax(*group_absmax(w, GROUP))
    new = refit.refit_scales(w, groups, codes, levels, GROUP, factor)
    assert new.shape == groups.shape
    damped, root = _root(factor)
    level = torch.gather(levels, 1, codes)
    member = torch.nn.functional.one_hot(torch.arange(k) // GROUP, groups.shape[1]).float()  # [K, G]
    for n in range(w.shape[0]):
        design = level[n, :, None] * member
        best = torch.linalg.lstsq(root @ design, root @ w[n]).solution
        expect = (w[n] - design @ best) @ damped @ (w[n] - design @ best)
        got = w[n] - design @ new[n]
        assert got @ damped @ got <= expect * 1.001 + 1e-6
    before = output_error(w - dequant(codes, absmax, levels), factor.gram).sum()
    after = output_error(w - dequant(codes, new.repeat_interleave(GROUP, 1)[:, :k], levels), factor.gram).sum()
    assert after < before


def test_refit_scales_keep_a_scale_no_code_constrains_and_chunks_agree(monkeypatch):
    w, _, absmax, _ = layer(6, 64, 3)
    levels = quantize.nf_levels(3).expand(6, -1).contiguous()  # has an exact 0
    factor = _factor(64)
    codes = gptq_codes(w, absmax, levels, factor)
    codes[:, :GROUP] = int((levels[0] == 0).nonzero())  # group 0 all on the zero level
    groups = dequantize_absmax(*group_absmax(w, GROUP))
    whole = refit.refit_scales(w, groups, codes, levels, GROUP, factor)
    torch.testing.assert_close(whole[:, 0], groups[:, 0], rtol=1e-3, atol=0)
    monkeypatch.setattr(refit, "_ELEMENTS", 1)  # one row at a time
    torch.testing.assert_close(refit.refit_scales(w, groups, codes, levels, GROUP, factor), whole)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_refit_levels_solve_the_least_squares_problem_of_the_fixed_codes(bits):
    k = 96
    w, _, absmax, levels = layer(16, k, bits)
    factor = _factor(k)
    codes = gptq_codes(w, absmax, levels, factor)
    new, new_codes = refit.refit_levels(w, absmax, codes, levels, factor)
    assert torch.equal(new, new.sort(dim=1).values) and new.abs().max() <= 1.0
    assert torch.equal(new, new.half().float())  # what the format stores
    # the same dequantized weight as the unsorted solution: each code follows its level
    damped, root = _root(factor)
    for n in range(w.shape[0]):
        onehot = torch.nn.functional.one_hot(codes[n], 2**bits).float() * absmax[n, :, None]
        best = torch.linalg.lstsq(root @ onehot, root @ w[n]).solution
        expect = (w[n] - onehot @ best) @ damped @ (w[n] - onehot @ best)
        got = w[n] - absmax[n] * new[n, new_codes[n]]
        assert got @ damped @ got <= expect * 1.01 + 1e-6  # optimal up to the fp16 rounding of the levels
    before = output_error(w - dequant(codes, absmax, levels), factor.gram).sum()
    assert output_error(w - dequant(new_codes, absmax, new), factor.gram).sum() < before


def test_refit_keeps_a_level_no_code_uses():
    w, _, absmax, levels = layer(4, 64, 2)
    factor = _factor(64)
    codes = gptq_codes(w, absmax, levels, factor).clamp_max(2)  # level 3 unused in every row
    new, _ = refit.refit_levels(w, absmax, codes, levels, factor)
    assert torch.isfinite(new).all()
    for n in range(4):  # the ridge leaves the unused level where Lloyd-Max put it
        assert torch.isclose(new[n], levels[n, 3], atol=1e-3, rtol=0).any()


def _rounds(w, factor, bits: int, fit_scales: bool, rounds: int):
    """Output error on the calibration inputs after packing at one width, and the packed group scales [N, G]."""
    lq = quantize_layer(w, (bits,), CodebookFit(GROUP, "lloyd", 6, fit_scales=fit_scales), factor.gram.diagonal(), factor)
    packed = assemble(lq, w, torch.full((w.shape[0],), bits), factor, rounds)  # one width: rows in order
    delta = w - dequantize(packed.tensors(), w.shape[1], GROUP, torch.float32)
    return output_error(delta, factor.gram).sum(), dequantize_absmax(packed.absmax_codes, packed.absmax_scale)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_refit_rounds_lower_the_output_error_and_keep_the_scales_in_range(bits):
    w, *_ = layer(32, 160, bits)
    factor = _factor(160)
    kept, before = _rounds(w, factor, bits, True, 0)
    refitted, scales = _rounds(w, factor, bits, True, 2)
    assert refitted < 0.97 * kept
    assert not torch.equal(scales, before)
    absmax = dequantize_absmax(*group_absmax(w, GROUP))
    assert (scales >= SCALE_RANGE[0] * absmax * (1 - 1e-6)).all()
    assert (scales <= SCALE_RANGE[1] * absmax * (1 + 1e-2)).all()  # up to the double quantization's step


def test_absmax_scales_stay_absmax_when_the_levels_are_refitted():
    w, *_ = layer(16, 96, 2)
    factor = _factor(96)
    kept, before = _rounds(w, factor, 2, False, 0)
    refitted, scales = _rounds(w, factor, 2, False, 2)
    assert refitted < kept
    torch.testing.assert_close(scales, dequantize_absmax(*group_absmax(w, GROUP)), rtol=0, atol=0)
    assert torch.equal(scales, before)
