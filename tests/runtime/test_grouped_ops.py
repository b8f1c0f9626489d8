"""lowra::grouped_linear: the stacked experts of a mixture, against a dense per-expert product."""

import pytest
import torch
from torch.library import opcheck

import lowra_compile  # noqa: F401  (registers the ops)
from lowra_compile.runtime import reference
from lowra_compile.runtime.synthetic import random_packed_weight

E, N, K = 4, 12, 80


def _inputs(dtype, counts=(3, 0, 5, 2), seed=0):
    """Rows sorted by expert (expert 1 gets none), their cumulative ends, and the packed [E*N, K] stack."""
    torch.manual_seed(seed)
    packed = random_packed_weight(E * N, K, group_size=32, dtype=dtype, seed=seed).tensors()
    x = torch.randn(sum(counts), K, dtype=dtype, requires_grad=True)
    offsets = torch.cumsum(torch.tensor(counts), 0, dtype=torch.int32)
    return x, offsets, packed


def _dense(x, offsets, packed):
    w = torch.ops.lowra.dequant(packed, K, 32, x.dtype).view(E, N, K)
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    return torch.cat([x[s:e] @ w[i].t() for i, (s, e) in enumerate(zip(starts, ends))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_linear_matches_the_dense_product_per_expert(dtype):
    x, offsets, packed = _inputs(dtype)
    y = torch.ops.lowra.grouped_linear(x, offsets, packed, 32, E)
    ref = _dense(x, offsets, packed)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, x, g)
    (want,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(got, want)


def test_grouped_linear_saves_no_dense_weight_for_the_backward():
    x, offsets, packed = _inputs(torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.ops.lowra.grouped_linear(x, offsets, packed, 32, E)
    dense_bytes = E * N * K * x.element_size()
    assert saved and sum(t.numel() * t.element_size() for t in saved) < dense_bytes / 4  # packed + offsets only


def test_opcheck():
    x, offsets, packed = _inputs(torch.float64)
    opcheck(torch.ops.lowra.grouped_linear.default, (x, offsets, packed, 32, E))


def test_gradcheck():
    x, offsets, packed = _inputs(torch.float64)
    assert torch.autograd.gradcheck(lambda x: torch.ops.lowra.grouped_linear(x, offsets, packed, 32, E), (x,))


def test_grouped_linear_computes_in_its_input_dtype_under_autocast():
    # torch's grouped product is not autocast-enabled (transformers casts x to the weight's dtype first):
    # the packed op behaves the same, inside an autocast region too.
    x, offsets, packed = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.lowra.grouped_linear(x, offsets, packed, 32, E)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, _dense(x, offsets, packed))


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="this torch has no grouped product")
def test_aligned_float32_on_cpu_takes_torchs_grouped_product_which_matches_the_loop():
    x, offsets, packed = _inputs(torch.float32)
    w = torch.ops.lowra.dequant(packed, K, 32, torch.float32).view(E, N, K).transpose(1, 2)
    assert reference._grouped_mm_runs(x, w, offsets)
    assert not reference._grouped_mm_runs(x.double(), w.double(), offsets)  # float64 takes the loop
    assert not reference._grouped_mm_runs(x[:1].expand_as(x), w, offsets)  # so does an expanded gradient
    looped = reference.per_expert_mm(x.detach().double(), w.double(), offsets)
    torch.testing.assert_close(reference.per_expert_mm(x, w, offsets), looped.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_linear_in_bf16_on_cuda_matches_the_dense_product_per_expert():
    x, offsets, packed = _inputs(torch.float32)
    x = x.detach().to("cuda", torch.bfloat16).requires_grad_()
    packed, offsets = [t.cuda() for t in packed], offsets.cuda()
    y = torch.ops.lowra.grouped_linear(x, offsets, packed, 32, E)
    ref = _dense(x, offsets, packed)
    torch.testing.assert_close(y, ref, atol=2e-2, rtol=2e-2)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # torch's grouped product, then the loop
def test_rows_past_the_last_offset_are_zero(dtype):
    x, offsets, packed = _inputs(dtype)
    x = torch.cat([x.detach(), torch.randn(3, K, dtype=dtype)])  # 3 rows no expert owns
    y = torch.ops.lowra.grouped_linear(x, offsets, packed, 32, E)
    assert not y[-3:].any()
    torch.testing.assert_close(y[:-3], _dense(x[:-3], offsets, packed))
