"""Error-feedback rounding: equal to nearest rounding when inputs are uncorrelated, better when they are not."""

import pytest
import torch

from lowra_compile.passes import gptq
from lowra_compile.passes.gptq import damping, gptq_codes, hessian_factor, output_error
from lowra_compile.passes.quantize import _assign

from .layer_data import correlated_inputs, dequant, layer


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_diagonal_hessian_is_nearest_rounding(bits):
    w, v, absmax, levels = layer(24, 80, bits)
    factor = hessian_factor(torch.diag(torch.linspace(0.5, 2.0, 80)), 0.1)
    assert torch.equal(gptq_codes(w, absmax, levels, factor), _assign(v, levels))


@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("k", [40, 200])  # one block and several (the block is 128 columns)
def test_lowers_output_error_on_correlated_inputs(bits, k):
    w, v, absmax, levels = layer(32, k, bits)
    x = correlated_inputs(k, 4 * k)
    gram = x.t() @ x / x.shape[0]
    nearest = output_error(w - dequant(_assign(v, levels), absmax, levels), gram)
    def feedback(factor):
        return output_error(w - dequant(gptq_codes(w, absmax, levels, factor), absmax, levels), gram).sum()

    assert feedback(hessian_factor(gram, damp=0.01)) < 0.8 * nearest.sum()  # light damping
    assert feedback(hessian_factor(gram, damp=1.0)) < nearest.sum()  # the heaviest damping still helps
    # the error on the inputs themselves is what `output_error` says it is
    direct = ((x @ (w - dequant(_assign(v, levels), absmax, levels)).t()) ** 2).mean(0)
    torch.testing.assert_close(nearest, direct, rtol=1e-4, atol=1e-6)


def test_rows_are_rounded_independently_and_blocks_do_not_change_the_codes(monkeypatch):
    w, _, absmax, levels = layer(20, 150, 2)
    x = correlated_inputs(150, 400)
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
    w, v, absmax, levels = layer(32, k, 2)
    seen, unseen = correlated_inputs(k, tokens, seed=2), correlated_inputs(k, 20000, seed=2)[-8000:]
    gram, held = seen.t() @ seen / tokens, unseen.t() @ unseen / len(unseen)

    def held_out_error(damp):
        codes = gptq_codes(w, absmax, levels, hessian_factor(gram, damp))
        return output_error(w - dequant(codes, absmax, levels), held).sum().item()

    fixed = [held_out_error(gptq.DAMP_MIN), held_out_error(gptq.DAMP_MAX)]
    assert held_out_error(damping(k, tokens)) <= min(fixed) * 1.05


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
