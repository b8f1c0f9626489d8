import pytest
import torch

from lowra_compile.passes.gptq import hessian_factor
from lowra_compile.passes.loftq import loftq_init
from lowra_compile.passes.quantize import CodebookFit, assemble, quantize_layer, quantize_rows
from lowra_compile.runtime.reference import dequantize


def test_loftq_factors_reduce_the_quantization_error():
    torch.manual_seed(0)
    n, k, rank, s = 64, 128, 8, 2.0
    low_rank = torch.randn(n, rank) @ torch.randn(rank, k) * 0.05
    w = torch.randn(n, k) * 0.02 + low_rank
    bits = torch.tensor([1, 2] * (n // 2))
    fit = CodebookFit(64, "lloyd", 6)
    plain = quantize_rows(w, bits, fit)
    plain_error = (w - dequantize(plain.tensors(), k, 64, torch.float32)).norm()
    errors = []
    for iters in (1, 3):
        packed, a, b = loftq_init(w, plain, bits, rank, s, iters, fit)
        assert a.shape == (rank, k) and b.shape == (n, rank)
        assert packed.rows_per_width() == {1: n // 2, 2: n // 2, 3: 0, 4: 0}
        errors.append((w - dequantize(packed.tensors(), k, 64, torch.float32) - s * b @ a).norm())
    assert errors[0] < 0.8 * plain_error
    assert errors[1] <= errors[0] * 1.05


@pytest.mark.parametrize("n", [1, 4])
def test_a_layer_narrower_than_the_rank_gets_its_components_and_zeros_for_the_rest(n):
    # a 1-output gate under target_modules="all-linear": broadcast into [rank, K] its one component would count
    # rank times, and a rank above N did not fit at all
    torch.manual_seed(0)
    k, rank, s = 128, 8, 2.0
    w = torch.randn(n, k) * 0.02
    bits = torch.full((n,), 2)
    fit = CodebookFit(64, "lloyd", 6)
    plain = quantize_rows(w, bits, fit)
    plain_error = (w - dequantize(plain.tensors(), k, 64, torch.float32)).norm()
    packed, a, b = loftq_init(w, plain, bits, rank, s, 1, fit)
    assert a.shape == (rank, k) and b.shape == (n, rank)
    assert not a[n:].any() and not b[:, n:].any()
    assert (w - dequantize(packed.tensors(), k, 64, torch.float32) - s * b @ a).norm() < 0.5 * plain_error


@pytest.mark.parametrize("fit_scales", [False, True])
@pytest.mark.parametrize("gptq", [False, True])
def test_the_pipelines_first_quantization_is_what_loftq_would_fit_itself(gptq, fit_scales):
    # The pipeline hands LoftQ the layer packed from the codebooks of every width (quantize_layer); fitted on
    # the planned widths' rows alone (quantize_rows), the codebooks and codes are the same: rows are independent.
    torch.manual_seed(0)
    n, k = 48, 192
    w = torch.randn(n, k) * 0.02
    x = torch.randn(512, k) * torch.linspace(0.2, 2.0, k)
    x2 = (x**2).mean(0)
    factor = hessian_factor(x.t() @ x / 512, 0.1) if gptq else None
    bits = torch.tensor([1, 2, 3, 4] * (n // 4))
    fit = CodebookFit(64, "lloyd", 6, fit_scales=fit_scales)
    from_all = assemble(quantize_layer(w, (1, 2, 3, 4), fit, x2, factor), w, bits, factor, 2 * gptq)
    own = quantize_rows(w, bits, fit, x2, factor, 2 * gptq)
    for mine, theirs in zip(from_all.tensors(), own.tensors()):
        assert torch.equal(mine, theirs)
