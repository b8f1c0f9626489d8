"""The dequant kernel against runtime.reference: every width, mixed layers, every LUT, ragged K."""

import pytest
import torch

from lowra_compile.codegen.dequant import LUTS, dequantize, free_scratch, scratch
from lowra_compile.runtime import reference
from lowra_compile.runtime.synthetic import random_packed_weight

WIDTHS = [(1,), (2,), (3,), (4,), (1, 2, 3, 4)]


@pytest.mark.parametrize("widths", WIDTHS)
@pytest.mark.parametrize("n,k,group", [(37, 100, 32), (20, 200, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequant_matches_reference(widths, n, k, group, dtype, device):
    packed = random_packed_weight(n, k, widths, group_size=group, seed=n + k, device=device).tensors()
    got = dequantize(packed, k, group, dtype, block_r=16, block_k=64)
    torch.testing.assert_close(got, reference.dequantize(packed, k, group, dtype), atol=0, rtol=0)


@pytest.mark.parametrize("lut", LUTS)
@pytest.mark.parametrize("block_k,group", [(32, 64), (128, 16)])  # tile inside one group / many groups per tile
def test_dequant_luts_and_tiles(lut, block_k, group, device):
    n, k = 29, 150
    packed = random_packed_weight(n, k, (1, 2, 3, 4), group_size=group, seed=3, device=device).tensors()
    got = dequantize(packed, k, group, torch.float32, block_r=16, block_k=block_k, lut=lut)
    torch.testing.assert_close(got, reference.dequantize(packed, k, group, torch.float32), atol=0, rtol=0)


def test_dequant_into_scratch(device):
    packed = random_packed_weight(24, 70, group_size=32, device=device).tensors()
    buf = scratch(24, 70, torch.float32, torch.device(device))
    assert scratch(24, 70, torch.float32, torch.device(device)) is buf  # one buffer per shape/dtype/device
    out = dequantize(packed, 70, 32, torch.float32, out=buf, block_k=64)
    assert out is buf
    torch.testing.assert_close(out, reference.dequantize(packed, 70, 32, torch.float32), atol=0, rtol=0)
    free_scratch()
    assert scratch(24, 70, torch.float32, torch.device(device)) is not buf


def test_bad_tiles_raise():
    packed = random_packed_weight(8, 64, group_size=32).tensors()
    with pytest.raises(ValueError, match="powers of two"):
        dequantize(packed, 64, 32, torch.float32, block_k=48)
    with pytest.raises(ValueError, match="lut"):
        dequantize(packed, 64, 32, torch.float32, lut="asm")
