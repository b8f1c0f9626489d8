import pytest
import torch

from lowra_compile.runtime.format import (
    BIT_WIDTHS,
    dequantize_absmax,
    pack_codes,
    pack_weight,
    quantize_absmax,
    unpack_codes,
    words_per_row,
)
from lowra_compile.runtime.reference import dequantize
from lowra_compile.runtime.synthetic import random_packed_weight


@pytest.mark.parametrize("bits", BIT_WIDTHS)
@pytest.mark.parametrize("k", [1, 31, 64, 100, 257])
def test_pack_unpack_round_trip(bits, k):
    gen = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 2**bits, (5, k), generator=gen)
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (5, words_per_row(bits, k))
    assert torch.equal(unpack_codes(words, bits, k), codes)


def test_pack_rejects_unknown_width():
    with pytest.raises(ValueError, match="5-bit"):
        pack_codes(torch.zeros(2, 8, dtype=torch.long), 5)


def test_absmax_double_quantization_bounds_from_above():
    absmax = torch.rand(7, 300) * torch.logspace(-3, 0, 300)
    codes, scale = quantize_absmax(absmax)
    assert codes.dtype == torch.uint8 and scale.shape == (7, 2)
    deq = dequantize_absmax(codes, scale)
    assert (deq >= absmax * (1 - 1e-6)).all(), "rounded up: normalised weights stay in [-1, 1]"
    assert ((deq - absmax) <= scale.repeat_interleave(256, 1)[:, :300] + 1e-9).all(), "within one step"


def test_reference_dequantize_matches_the_format_formula():
    n, k, gs = 10, 70, 32
    gen = torch.Generator().manual_seed(0)
    bits = torch.tensor([1, 2, 3, 4, 4, 3, 2, 1, 2, 2])
    codes = (torch.rand(n, k, generator=gen) * 2 ** bits[:, None]).long()
    levels = torch.sort(torch.rand(n, 16, generator=gen) * 2 - 1, dim=1).values.half().float()
    absmax = torch.rand(n, 3, generator=gen)
    a_codes, a_scale = quantize_absmax(absmax)
    packed = pack_weight(codes, bits, levels, a_codes, a_scale, gs, torch.float32)
    expected = torch.gather(levels, 1, codes) * dequantize_absmax(a_codes, a_scale).repeat_interleave(gs, 1)[:, :k]
    torch.testing.assert_close(dequantize(packed.tensors(), k, gs, torch.float32), expected)
    assert packed.rows_per_width() == {1: 2, 2: 4, 3: 2, 4: 2}
    assert packed.code_bits() == pytest.approx(bits.float().mean().item())


def test_packed_weight_accounting():
    pw = random_packed_weight(64, 256, widths=(2,))
    assert pw.code_bits() == 2.0
    # codes 2 bits + absmax 8/64 + scale 32/(256*64)... + codebook 4*16/256 + perm 32/256
    assert 2.0 < pw.effective_bits() < 2.0 + 8 / 64 + 4 * 16 / 256 + 32 / 256 + 32 / 256 + 1e-9
    again = type(pw).from_tensors(pw.tensors(), pw.shape, pw.dtype, pw.group_size)
    assert all(torch.equal(a, b) for a, b in zip(again.tensors(), pw.tensors()))
