"""The DoRA norm kernel against runtime.reference: every width, mixed layers, ranks below and above 16,
adapters in fp32 and fp16, ragged K, every LUT."""

import pytest
import torch

from lowra_compile.codegen.dequant import LUTS
from lowra_compile.codegen.dora_norm import dora_row_norms, norm_tiles
from lowra_compile.runtime import reference
from lowra_compile.runtime.synthetic import random_packed_weight


def _adapters(n: int, k: int, rank: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    a = torch.randn(rank, k, generator=g) / k**0.5
    b = torch.randn(n, rank, generator=g)
    return a.to(device, dtype), b.to(device, dtype)


@pytest.mark.parametrize("widths", [(1,), (2,), (3,), (4,), (1, 2, 3, 4)])
@pytest.mark.parametrize("n,k,group,rank", [(37, 100, 32, 4), (20, 200, 64, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dora_norm_matches_reference(widths, n, k, group, rank, dtype, device):
    packed = random_packed_weight(n, k, widths, group_size=group, seed=n + k, device=device).tensors()
    a, b = _adapters(n, k, rank, dtype, device)
    got = dora_row_norms(packed, k, group, a, b, 1.5, block_r=16, block_k=64)
    expected = reference.dora_row_norms(packed, k, group, a, b, 1.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    dense = reference.dequantize(packed, k, group, torch.float32) + 1.5 * b.float() @ a.float()
    torch.testing.assert_close(expected, torch.linalg.vector_norm(dense, dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lut", LUTS)
@pytest.mark.parametrize("block_k,group", [(32, 64), (128, 16)])  # tile inside one group / many groups per tile
def test_dora_norm_luts_and_tiles(lut, block_k, group, device):
    n, k = 29, 150
    packed = random_packed_weight(n, k, (1, 2, 3, 4), group_size=group, seed=3, device=device).tensors()
    a, b = _adapters(n, k, 8, torch.float32, device)
    got = dora_row_norms(packed, k, group, a, b, 0.5, block_k=block_k, lut=lut)
    torch.testing.assert_close(got, reference.dora_row_norms(packed, k, group, a, b, 0.5), atol=1e-5, rtol=1e-5)


def test_zero_adapter_gives_the_weights_own_row_norms(device):
    packed = random_packed_weight(24, 70, group_size=32, device=device).tensors()
    a, b = _adapters(24, 70, 16, torch.float32, device)
    got = dora_row_norms(packed, 70, 32, a, torch.zeros_like(b), 2.0, block_k=64)
    dense = reference.dequantize(packed, 70, 32, torch.float32)
    torch.testing.assert_close(got, torch.linalg.vector_norm(dense, dim=1), atol=1e-5, rtol=1e-5)


def test_a_rank_above_64_takes_shorter_k_steps_and_matches(device):
    assert norm_tiles(300, 128) == (512, 32) and norm_tiles(64, 128) == (64, 128) and norm_tiles(4, 128) == (16, 128)
    packed = random_packed_weight(24, 150, (2, 3), group_size=16, seed=5, device=device).tensors()
    a, b = _adapters(24, 150, 300, torch.float32, device)
    got = dora_row_norms(packed, 150, 16, a, b, 0.25, block_k=128)
    torch.testing.assert_close(got, reference.dora_row_norms(packed, 150, 16, a, b, 0.25), atol=1e-5, rtol=1e-5)
