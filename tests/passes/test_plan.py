import pytest
import torch

from lowra_compile.passes.plan import average_bits, plan_bits


def _errors(layers=6, seed=0):
    """Per-row errors that fall with width, at different scales per layer (like real sensitivities)."""
    gen = torch.Generator().manual_seed(seed)
    out, ks = [], []
    for i in range(layers):
        rows = 50 + 30 * i
        base = torch.rand(rows, 1, generator=gen) * 10 ** (i % 3)
        decay = 0.15 + 0.3 * torch.rand(rows, 4, generator=gen)
        out.append(base * torch.cumprod(decay, 1) * 4)
        ks.append(64 * (1 + i % 4))
    return out, ks


def _total(errors, bits, choices):
    idx = {b: i for i, b in enumerate(choices)}
    return sum(e.gather(1, torch.tensor([idx[int(x)] for x in b])[:, None]).sum().item() for e, b in zip(errors, bits))


@pytest.mark.parametrize("budget", [1.15, 1.5, 2.0, 2.5, 3.0, 4.0])
def test_budget_met_within_a_hundredth_of_a_bit(budget):
    errors, ks = _errors()
    bits = plan_bits(errors, ks, (1, 2, 3, 4), budget)
    avg = average_bits(bits, ks)
    assert avg <= budget + 1e-9 and budget - avg <= 0.01
    assert all(b.shape == (e.shape[0],) for b, e in zip(bits, errors))


def test_total_error_falls_as_the_budget_rises():
    errors, ks = _errors()
    totals = [_total(errors, plan_bits(errors, ks, (1, 2, 3, 4), b), (1, 2, 3, 4)) for b in (1.15, 1.5, 2.0, 2.5, 3.0, 4.0)]
    assert all(a >= b for a, b in zip(totals, totals[1:])), totals
    assert totals[0] > totals[-1]


def test_choices_without_three_bits_never_assign_three():
    errors, ks = _errors()
    three_free = [e[:, [0, 1, 3]] for e in errors]
    for budget in (1.5, 2.5, 3.0):
        bits = plan_bits(three_free, ks, (1, 2, 4), budget)
        values = torch.cat(bits).unique().tolist()
        assert 3 not in values and set(values) <= {1, 2, 4}
        assert budget - 0.01 <= average_bits(bits, ks) <= budget + 1e-9


def test_sensitive_rows_get_more_bits():
    errors = [torch.tensor([[8.0, 4.0, 2.0, 1.0]] * 10 + [[800.0, 400.0, 200.0, 100.0]] * 10)]
    bits = plan_bits(errors, [64], (1, 2, 3, 4), 2.5)[0]
    assert bits[10:].float().mean() > bits[:10].float().mean()


def test_many_rows_plan_exactly():
    gen = torch.Generator().manual_seed(1)
    errors = [torch.rand(200_000, 4, generator=gen).sort(1, descending=True).values]
    bits = plan_bits(errors, [4096], (1, 2, 3, 4), 1.5)
    assert abs(average_bits(bits, [4096]) - 1.5) <= 1e-3


def test_budget_below_smallest_width_raises():
    errors, ks = _errors()
    with pytest.raises(ValueError, match="below the smallest"):
        plan_bits([e[:, 1:] for e in errors], ks, (2, 3, 4), 1.5)
