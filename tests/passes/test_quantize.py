import pytest
import torch

from lowra_compile.passes.gptq import gptq_codes, hessian_factor
from lowra_compile.passes.quantize import (
    CodebookFit, _assign, _normalise, assemble, nf_levels, quantize_layer, quantize_rows, uniform_levels,
)
from lowra_compile.runtime.reference import dequantize

CHOICES = (1, 2, 3, 4)


def _layer(n=48, k=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    w[:, :5] *= 8  # a few outlier columns, as in real LLM weights
    x2 = torch.rand(k, generator=gen) + 0.05
    return w, x2


@pytest.mark.parametrize("bits", CHOICES)
def test_level_sets_are_sorted_in_unit_interval(bits):
    for levels in (nf_levels(bits), uniform_levels(bits)):
        assert levels.shape == (2**bits,)
        assert (levels.diff() > 0).all() and levels.min() >= -1 and levels.max() <= 1


@pytest.mark.parametrize("x2", [False, True])
def test_weighted_lloyd_never_worse_than_normalfloat_per_row(x2):
    w, act = _layer()
    act = act if x2 else None
    lloyd = quantize_layer(w, CHOICES, CodebookFit(64, "lloyd", 10), act)
    nf = quantize_layer(w, CHOICES, CodebookFit(64, "nf", 10), act)
    assert (lloyd.error <= nf.error * (1 + 1e-6)).all()
    assert (lloyd.error.sum(0) < nf.error.sum(0)).all(), "Lloyd-Max should improve the layer at every width"
    assert (lloyd.error[:, :-1] >= lloyd.error[:, 1:]).float().mean() > 0.95, "more bits, less error"


@pytest.mark.parametrize("bits", [2, 4])
def test_lloyd_gives_every_level_weights_in_rows_of_one_sign_and_keeps_a_short_row_s_weights_apart(bits):
    # a level whose cell was empty kept the NF start's place: a row of one sign used half its levels, and a
    # row of two weights (its group's others zero) rounded both to one level at every width
    w = _layer(k=64)[0].abs()
    w[-1] = 0.0
    w[-1, :2] = torch.tensor([-0.582, -0.520])
    q = quantize_layer(w, (bits,), CodebookFit(64, "lloyd", 12), None)
    nf = quantize_layer(w, (bits,), CodebookFit(64, "nf", 12), None)
    v, _ = _normalise(w, 64, q.groups[bits])
    codes = _assign(v, q.levels[bits])
    used = torch.zeros_like(q.levels[bits]).scatter_add_(1, codes, torch.ones_like(v)) > 0
    assert used[:-1].all()  # every level of every row of one sign holds weights
    assert (q.error[:-1, 0] < 0.6 * nf.error[:-1, 0]).all()
    assert codes[-1, 0] != codes[-1, 1]


@pytest.mark.parametrize("k,group", [(200, 64), (128, 64), (90, 32)])
@pytest.mark.parametrize("codebook,fit_scales", [("lloyd", False), ("nf", False), ("uniform", False), ("lloyd", True), ("nf", True)])
def test_errors_describe_exactly_what_the_runtime_dequantizes(k, group, codebook, fit_scales):
    w, x2 = _layer(k=k)
    lq = quantize_layer(w, CHOICES, CodebookFit(group, codebook, 6, fit_scales=fit_scales), x2)
    bits = torch.tensor(CHOICES).repeat(w.shape[0] // 4)
    packed = assemble(lq, w, bits)
    deq = dequantize(packed.tensors(), k, group, torch.float32)
    recomputed = ((w - deq) ** 2 * x2).sum(1)
    planned = lq.error.gather(1, (bits - 1)[:, None]).squeeze(1)
    torch.testing.assert_close(recomputed, planned, rtol=1e-4, atol=1e-9)
    assert packed.rows_per_width() == {b: w.shape[0] // 4 for b in CHOICES}


@pytest.mark.parametrize("codebook", ["lloyd", "nf"])
@pytest.mark.parametrize("x2", [False, True])
def test_fitted_scales_are_never_worse_than_the_absmax_and_pay_at_low_bits(codebook, x2):
    w, act = _layer()
    act = act if x2 else None
    absmax = quantize_layer(w, CHOICES, CodebookFit(64, codebook, 10), act)
    fitted = quantize_layer(w, CHOICES, CodebookFit(64, codebook, 10, fit_scales=True), act)
    assert (fitted.error <= absmax.error).all()
    assert (fitted.error.sum(0)[:2] < 0.97 * absmax.error.sum(0)[:2]).all(), "1 and 2 bits should gain 3% or more"
    # each width keeps its own scales; the absmax is the same for all of them
    assert not torch.equal(fitted.groups[1][0], fitted.groups[2][0])
    assert all(torch.equal(absmax.groups[1][0], absmax.groups[b][0]) for b in CHOICES)


@pytest.mark.parametrize("bits", [1, 2])
def test_fitted_scales_help_the_groups_the_rows_codebook_fits_badly(bits):
    # One group per row holds a weight 10x the others: normalised by their absmax, its other weights crowd
    # near 0 while the other groups span [-1, 1], and one codebook per row cannot fit both.
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 256, generator=gen) * 0.02
    w[:, 3] = 0.2
    absmax = quantize_layer(w, (bits,), CodebookFit(64, "lloyd", 10))
    fitted = quantize_layer(w, (bits,), CodebookFit(64, "lloyd", 10, fit_scales=True))
    assert (fitted.error < absmax.error).all() and (fitted.error / absmax.error).mean() < 0.97
    assert not torch.equal(fitted.groups[bits][0], absmax.groups[bits][0])


def test_activation_weighting_moves_error_off_busy_inputs():
    w, _ = _layer()
    x2 = torch.ones(w.shape[1])
    x2[:50] = 100.0
    plain = quantize_layer(w, (2,), CodebookFit(64, "lloyd", 10))
    weighted = quantize_layer(w, (2,), CodebookFit(64, "lloyd", 10), x2)

    def busy_error(lq):
        deq = dequantize(assemble(lq, w, torch.full((w.shape[0],), 2)).tensors(), w.shape[1], 64, torch.float32)
        return ((w - deq)[:, :50] ** 2).sum()

    assert busy_error(weighted) < busy_error(plain)


def test_bfloat16_weights_are_accepted():
    w, x2 = _layer()
    lq = quantize_layer(w.bfloat16(), (2, 4), CodebookFit(64, "lloyd", 4), x2)
    packed = assemble(lq, w.bfloat16(), torch.full((w.shape[0],), 4))
    assert packed.dtype == torch.bfloat16 and packed.code_bits() == 4


@pytest.mark.parametrize(
    "weight,choices,message",
    [
        (torch.zeros(4, 64, dtype=torch.int32), (2,), "int32"),
        (torch.zeros(4, 64, dtype=torch.complex64), (2,), "complex64"),
        (torch.zeros(4, 8, 8), (2,), "2-D"),
        (torch.zeros(4, 64), (5,), "not supported"),
    ],
)
def test_bad_input_raises(weight, choices, message):
    with pytest.raises(ValueError, match=message):
        quantize_layer(weight, choices, CodebookFit(64, "lloyd", 2))


def test_assemble_rejects_widths_that_were_not_quantized():
    w, _ = _layer()
    lq = quantize_layer(w, (2, 4), CodebookFit(64, "nf", 0))
    with pytest.raises(ValueError, match="not quantized"):
        assemble(lq, w, torch.full((w.shape[0],), 3))


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
@pytest.mark.parametrize("fit_scales", [False, True])
def test_mixed_widths_pack_each_row_as_rounding_it_on_its_own_levels(rounding, fit_scales):
    # all widths are rounded in one pass (levels padded to 16): each row must still dequantize to its own
    # width's levels and scales, rounded without the padding
    w, x2 = _layer(n=40, k=136)
    factor = None
    if rounding == "gptq":
        x = torch.randn(400, 136, generator=torch.Generator().manual_seed(3)) @ (torch.eye(136) + 0.1)
        factor = hessian_factor(x.t() @ x / 400, 0.1)
    lq = quantize_layer(w, CHOICES, CodebookFit(32, "lloyd", 4, fit_scales=fit_scales), x2, factor)
    bits = torch.arange(40) % 4 + 1
    mixed = dequantize(assemble(lq, w, bits, factor).tensors(), 136, 32, torch.float32)
    for b in CHOICES:
        rows = bits == b
        v, scale = _normalise(w[rows], 32, tuple(t[rows] for t in lq.groups[b]))
        levels = lq.levels[b][rows]
        codes = _assign(v, levels) if factor is None else gptq_codes(w[rows], scale, levels, factor)
        torch.testing.assert_close(mixed[rows], scale * torch.gather(levels, 1, codes), rtol=0, atol=0)


@pytest.mark.parametrize("refit_rounds", [0, 1])
def test_kept_error_feedback_codes_pack_as_rounding_again(refit_rounds):
    # the codes of the one pass that measured every width's error, read back for the planned rows, must
    # pack the weight as rounding those rows again does
    w, x2 = _layer(n=40, k=136)
    x = torch.randn(400, 136, generator=torch.Generator().manual_seed(3)) @ (torch.eye(136) + 0.1)
    factor = hessian_factor(x.t() @ x / 400, 0.1)
    fit = CodebookFit(32, "lloyd", 4, fit_scales=True)
    kept = quantize_layer(w, CHOICES, fit, x2, factor, keep_codes=True)
    again = quantize_layer(w, CHOICES, fit, x2, factor)
    assert again.codes is None and set(kept.codes) == set(CHOICES)
    assert all(kept.codes[b].dtype == torch.uint8 and int(kept.codes[b].max()) < 2**b for b in CHOICES)
    bits = torch.arange(40) % 4 + 1
    packed = assemble(kept, w, bits, factor, refit_rounds).tensors()
    for a, b in zip(packed, assemble(again, w, bits, factor, refit_rounds).tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert quantize_layer(w, CHOICES, fit, x2, keep_codes=True).codes is None  # nearest


@pytest.mark.parametrize("fit_scales", [False, True])
def test_rows_with_their_own_input_moments_quantize_as_layers_of_their_own(fit_scales):
    # a mixture's experts read different tokens: x2 per row [N, K] weighs each row's codebook and group
    # scales by its own inputs, exactly as quantizing each block of rows alone on its E[x^2]
    w, x2 = _layer(n=48, k=136)
    other = x2.flip(0)
    per_row = torch.cat([x2.expand(20, -1), other.expand(28, -1)])
    fit = CodebookFit(32, "lloyd", 6, fit_scales=fit_scales)
    both = quantize_layer(w, CHOICES, fit, per_row)
    first = quantize_layer(w[:20], CHOICES, fit, x2)
    second = quantize_layer(w[20:], CHOICES, fit, other)
    torch.testing.assert_close(both.error, torch.cat([first.error, second.error]))
    for b in CHOICES:
        torch.testing.assert_close(both.levels[b], torch.cat([first.levels[b], second.levels[b]]))
        for whole, a, c in zip(both.groups[b], first.groups[b], second.groups[b]):
            torch.testing.assert_close(whole, torch.cat([a, c]))
    assert not torch.allclose(first.levels[2], quantize_layer(w[:20], CHOICES, fit, other).levels[2])

    bits = torch.arange(48) % 4 + 1  # fixed widths (LoftQ's step) take the moments of their own rows too
    fixed = dequantize(quantize_rows(w, bits, fit, per_row).tensors(), 136, 32, torch.float32)
    for rows, moments in ((slice(0, 20), x2), (slice(20, 48), other)):
        alone = quantize_rows(w[rows], bits[rows], fit, moments)
        torch.testing.assert_close(fixed[rows], dequantize(alone.tensors(), 136, 32, torch.float32))
