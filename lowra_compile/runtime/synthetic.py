"""Random packed weights of any shape and width mix, for kernel tests and benchmarks.

Kernel speed does not depend on trained values, so benchmarks at 7B shapes build their weights here
instead of running the quantizer.
"""

from __future__ import annotations

import torch

from .format import PackedWeight, pack_weight, quantize_absmax


def random_packed_weight(
    n: int,
    k: int,
    widths: tuple[int, ...] = (1, 2, 3, 4),
    group_size: int = 64,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> PackedWeight:
    """A [n, k] weight whose rows share the given widths equally (n / len(widths) rows each, shuffled)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bits = torch.tensor(widths, dtype=torch.int64)[torch.randperm(n, generator=gen) % len(widths)]
    codes = (torch.rand(n, k, generator=gen) * (2 ** bits[:, None])).long()
    levels = torch.sort(torch.rand(n, 16, generator=gen) * 2 - 1, dim=1).values
    absmax = torch.rand(n, -(-k // group_size), generator=gen) * 0.1 + 0.01
    a_codes, a_scale = quantize_absmax(absmax)
    packed = pack_weight(codes, bits, levels, a_codes, a_scale, group_size, dtype)
    return packed.to(device)
