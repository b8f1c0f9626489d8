import torch

from lowra_compile.passes.loftq import loftq_init
from lowra_compile.passes.quantize import quantize_rows
from lowra_compile.runtime.reference import dequantize


def test_loftq_factors_reduce_the_quantization_error():
    torch.manual_seed(0)
    n, k, rank, s = 64, 128, 8, 2.0
    low_rank = torch.randn(n, rank) @ torch.randn(rank, k) * 0.05
    w = torch.randn(n, k) * 0.02 + low_rank
    bits = torch.tensor([1, 2] * (n // 2))
    plain = quantize_rows(w, bits, 64, "lloyd", None, 6)
    plain_error = (w - dequantize(plain.tensors(), k, 64, torch.float32)).norm()
    errors = []
    for iters in (1, 3):
        packed, a, b = loftq_init(w, bits, rank, s, iters, 64, "lloyd", None, 6)
        assert a.shape == (rank, k) and b.shape == (n, rank)
        assert packed.rows_per_width() == {1: n // 2, 2: n // 2, 3: 0, 4: 0}
        errors.append((w - dequantize(packed.tensors(), k, 64, torch.float32) - s * b @ a).norm())
    assert errors[0] < 0.8 * plain_error
    assert errors[1] <= errors[0] * 1.05
