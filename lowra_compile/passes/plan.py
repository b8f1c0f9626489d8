"""The precision plan: a bit width per output channel of every layer, under one average budget.

    minimise   sum_rows err[row, b_row]
    subject to sum_rows b_row * K_row <= budget * sum_rows K_row        (code bits, averaged over weights)

Solved as in LowRA, but without an ILP: Lagrangian relaxation (bisection on lambda; every row takes
argmin_b err[row, b] + lambda * b * K_row, so spending falls as lambda rises), then a greedy fix-up
that spends what the relaxation left over on the upgrades with the best error saved per bit. All of it is
vectorised over the rows of all layers at once: a 7B model's ~1M rows plan in about a second.
"""

from __future__ import annotations

import torch
from torch import Tensor

_BISECTION_STEPS = 60
_FIXUP_ROUNDS = 8


def _choose(err: Tensor, cost: Tensor, lam: float) -> Tensor:
    return torch.argmin(err + lam * cost, dim=1)


def _spend(cost: Tensor, choice: Tensor) -> float:
    return torch.gather(cost, 1, choice[:, None]).sum().item()


def _fix_up(err: Tensor, cost: Tensor, choice: Tensor, limit: float) -> Tensor:
    """Spend the slack left below `limit` (the budget's total bits) on single-step upgrades, best error saved
    per bit first."""
    top = err.shape[1] - 1
    for _ in range(_FIXUP_ROUNDS):
        slack = limit - _spend(cost, choice)
        up = (choice + 1).clamp_max(top)
        extra = torch.gather(cost, 1, up[:, None]).squeeze(1) - torch.gather(cost, 1, choice[:, None]).squeeze(1)
        gain = torch.gather(err, 1, choice[:, None]).squeeze(1) - torch.gather(err, 1, up[:, None]).squeeze(1)
        usable = (choice < top) & (extra <= slack) & (gain > 0)
        if not usable.any():
            break
        idx = usable.nonzero().squeeze(1)
        order = idx[torch.argsort(gain[idx] / extra[idx], descending=True)]
        take = order[torch.cumsum(extra[order], 0) <= slack]
        if len(take) == 0:
            break
        choice = choice.clone()
        choice[take] = up[take]
    return choice


def plan_bits(errors: list[Tensor], in_features: list[int], bit_choices: tuple[int, ...], budget: float) -> list[Tensor]:
    """Bits per row for each layer (int64 tensors on the errors' device), average code bits <= budget.

    errors[i] is [N_i, len(bit_choices)], the predicted loss increase of each row of layer i at each width
    (bit_choices ascending); in_features[i] is that layer's K.
    """
    choices = tuple(sorted(bit_choices))
    if list(choices) != list(bit_choices):
        raise ValueError(f"lowra: bit_choices {bit_choices} must be given in ascending order")
    if budget < choices[0] - 1e-9:
        raise ValueError(f"lowra: budget {budget} bits is below the smallest width {choices[0]}")
    device = errors[0].device
    rows = [e.shape[0] for e in errors]
    err = torch.cat([e.to(device=device, dtype=torch.float64) for e in errors])
    k = torch.cat([torch.full((n,), float(kk), dtype=torch.float64, device=device) for n, kk in zip(rows, in_features)])
    cost = k[:, None] * torch.tensor(choices, dtype=torch.float64, device=device)[None, :]
    limit = budget * k.sum().item()
    if budget >= choices[-1]:
        choice = torch.full((err.shape[0],), len(choices) - 1, dtype=torch.long, device=device)
    else:
        # lambda (error per bit-weight) is bracketed: at `hi` every row takes its smallest width, near 0 the
        # most accurate one. Bisect in log space for the smallest lambda whose plan fits.
        hi = max(err.max().item(), 1e-30) / k.min().item() + 1.0
        lo = hi * 1e-40
        if _spend(cost, _choose(err, cost, lo)) <= limit:
            hi = lo  # even the most accurate plan fits
        else:
            for _ in range(_BISECTION_STEPS):
                mid = (lo * hi) ** 0.5
                if _spend(cost, _choose(err, cost, mid)) <= limit:
                    hi = mid
                else:
                    lo = mid
        choice = _fix_up(err, cost, _choose(err, cost, hi), limit)
    bits = torch.tensor(choices, device=device)[choice]
    return list(bits.split(rows))


def average_bits(bits: list[Tensor], in_features: list[int]) -> float:
    """Code bits per weight of a plan (the quantity the budget bounds)."""
    total = sum(b.double().sum().item() * k for b, k in zip(bits, in_features))
    return total / sum(len(b) * k for b, k in zip(bits, in_features))
