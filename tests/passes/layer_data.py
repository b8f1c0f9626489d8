"""Synthetic layers and correlated inputs for the rounding and refit tests."""

import torch

from lowra_compile.passes.quantize import _normalise, fit_levels, group_absmax

GROUP = 16


def layer(n: int, k: int, bits: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random weight [n, k], its v = W / absmax, the per-element absmax (groups of 16) and Lloyd-Max levels."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    v, absmax = _normalise(w, GROUP, group_absmax(w, GROUP))
    levels, _ = fit_levels(v, absmax**2, bits, "lloyd", 6)
    return w, v, absmax, levels


def correlated_inputs(k: int, tokens: int, seed: int = 1) -> torch.Tensor:
    """[tokens, k] inputs with correlated channels of growing scale (E[x x^T] far from diagonal)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return torch.randn(tokens, k, generator=g) @ mix * torch.linspace(0.2, 3.0, k)


def dequant(codes: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return scale * torch.gather(levels, 1, codes)
