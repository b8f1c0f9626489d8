"""Error-feedback rounding: equal to nearest rounding when inputs are uncorrelated, better when they are not."""

import pytest
import torch

from lowra_compile.passes import gptq
from lowra_compile.passes.gptq import damping, gptq_codes, hessian_factor, output_error
from lowra_compile.passes.quantize import _assign, _normalise, fit_levels, group_absmax


def _layer(n: int, k: int, bits: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    v, absmax = _normalise(w, 16, group_absmax(w, 16))
    levels, _ = fit_levels(v, absmax**2, bits, "lloyd", 6)
    return w, v, absmax, levels


def _correlated_inputs(k: int, tokens: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return torch.randn(tokens, k, generator=g) @ mix * torch.linspace(0.2, 3.0, k)


def _dequant(codes, absmax, levels):
    return absmax * torch.gather(levels, 1, codes)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_diagonal_hessian_is_nearest_rounding(bits):
    w, v, absmax, levels = _layer(24, 80, bits)
    factor = hessian_factor(torch.diag(torch.linspace(0.5, 2.0, 80)), 0.1)
    assert torch.equal(gptq_codes(w, absmax, levels, factor), _assign(v, levels))


@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("k", [40, 200])  # one block and several (the block is 128 columns)
def test_lowers_output_error_on_correlated_inputs(bits, k):
    w, v, absmax, levels = _layer(32, k, bits)
    x = _correlated_inputs(k, 4 * k)
    gram = x.t() @ x / x.shape[0]
    nearest = output_error(w - _dequant(_assign(v, levels), absmax, levels), gram)
    def feedback(factor):
        return output_error(w - _dequant(gptq_codes(w, absmax, levels, factor), absmax, levels), gram).sum()

    assert feedback(hessian_factor(gram, damp=0.01)) < 0.8 * nearest.sum()  # light damping
    assert feedback(hessian_factor(gram, damp=1.0)) < nearest.sum()  # the heaviest damping still helps
    # the error on the inputs themselves is what `output_error` says it is
    direct = ((x @ (w - _dequant(_assign(v, levels), absmax, levels)).t()) ** 2).mean(0)
    torch.testing.assert_close(nearest, direct, rtol=1e-4, atol=1e-6)


def test_rows_are_rounded_independently_and_blocks_do_not_change_the_codes(monkeypatch):
    w, _, absmax, levels = _layer(20, 150, 2)
    x = _correlated_inputs(150, 400)
    factor = hessian_factor(x.t() @ x / 400, 0.1)
    whole = gptq_codes(w, absmax, levels, factor)
    rows = torch.tensor([3, 7, 11, 19])
    assert torch.equal(gptq_codes(w[rows], absmax[rows], levels[rows], factor), whole[rows])
    monkeypatch.setattr(gptq, "_BLOCK", 1)  # the plain one-column-at-a-time algorithm
    assert torch.equal(gptq_codes(w, absmax, levels, factor), whole)


def test_rank_deficient_hessian_is_damped():
    x = torch.randn(8, 64)  # 8 tokens, 64 input channels: E[x x^T] is singular
    factor = hessian_factor(x.t() @ x / 8, damping(64, 8))
    assert torch.isfinite(factor.u).all()
    assert sorted(factor.order.tolist()) == list(range(64))


def test_damping_shrinks_with_tokens_per_input_within_its_bounds():
    assert damping(64, 8) == gptq.DAMP_MAX  # fewer tokens than inputs
    assert damping(64, 640) == pytest.approx(0.1)
    assert damping(64, 10**9) == gptq.DAMP_MIN
    assert damping(64, 0) == gptq.DAMP_MAX


@pytest.mark.parametrize("tokens", [48, 6000])
def test_damping_by_tokens_rounds_better_on_unseen_inputs_than_either_extreme_fits(tokens):
    # Calibrated on `tokens` inputs, judged on other inputs of the same distribution: the tokens-aware
    # damping is at least as good as the worse of the two fixed extremes and close to the better one.
    k = 96
    w, v, absmax, levels = _layer(32, k, 2)
    seen, unseen = _correlated_inputs(k, tokens, seed=2), _correlated_inputs(k, 20000, seed=2)[-8000:]
    gram, held = seen.t() @ seen / tokens, unseen.t() @ unseen / len(unseen)

    def held_out_error(damp):
        codes = gptq_codes(w, absmax, levels, hessian_factor(gram, damp))
        return output_error(w - _dequant(codes, absmax, levels), held).sum().item()

    fixed = [held_out_error(gptq.DAMP_MIN), held_out_error(gptq.DAMP_MAX)]
    assert held_out_error(damping(k, tokens)) <= min(fixed) * 1.05


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_refit_levels_solve_the_least_squares_problem_of_the_fixed_codes(bits):
    k = 96
    w, v, absmax, levels = _layer(16, k, bits)
    x = _correlated_inputs(k, 4 * k)
    factor = hessian_factor(x.t() @ x / x.shape[0], 0.1)
    codes = gptq_codes(w, absmax, levels, factor)
    new, new_codes = gptq.refit_levels(w, absmax, codes, levels, factor)
    assert torch.equal(new, new.sort(dim=1).values) and new.abs().max() <= 1.0
    assert torch.equal(new, new.half().float())  # what the format stores
    # the same dequantized weight as the unsorted solution: each code follows its level
    damped = factor.gram + factor.ridge * torch.eye(k)
    root = torch.linalg.cholesky(damped).t()  # damped = root^T root
    for n in range(w.shape[0]):
        onehot = torch.nn.functional.one_hot(codes[n], 2**bits).float() * absmax[n, :, None]
        best = torch.linalg.lstsq(root @ onehot, root @ w[n]).solution
        expect = (w[n] - onehot @ best) @ damped @ (w[n] - onehot @ best)
        got = w[n] - absmax[n] * new[n, new_codes[n]]
        assert got @ damped @ got <= expect * 1.01 + 1e-6  # optimal up to the fp16 rounding of the levels
    before = output_error(w - _dequant(codes, absmax, levels), factor.gram).sum()
    assert output_error(w - _dequant(new_codes, absmax, new), factor.gram).sum() < before


def test_refit_keeps_a_level_no_code_uses():
    w, v, absmax, levels = _layer(4, 64, 2)
    x = _correlated_inputs(64, 256)
    factor = hessian_factor(x.t() @ x / 256, 0.1)
    codes = gptq_codes(w, absmax, levels, factor).clamp_max(2)  # level 3 unused in every row
    new, _ = gptq.refit_levels(w, absmax, codes, levels, factor)
    assert torch.isfinite(new).all()
    for n in range(4):  # the ridge leaves the unused level where Lloyd-Max put it
        assert torch.isclose(new[n], levels[n, 3], atol=1e-3, rtol=0).any()


def test_latest_factor_is_built_once_per_input_and_only_the_latest_is_kept():
    built = []

    def gram(seed):
        built.append(seed)
        return torch.eye(8) * (seed + 1)

    latest = gptq.LatestFactor()
    first = latest(0, lambda: gram(0), 100)
    assert latest(0, lambda: gram(0), 100) is first  # q, k, v: one input
    second = latest(1, lambda: gram(1), 100)
    assert second is not first and latest.factor is second
    assert latest(0, lambda: gram(0), 100) is not first  # built again, as for packing
    assert built == [0, 1, 0]
    assert second.ridge == pytest.approx(damping(8, 100) * 2.0)
