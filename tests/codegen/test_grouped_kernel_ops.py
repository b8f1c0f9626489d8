"""`lowra::grouped_linear` through the registered kernels (LOWRA_FORCE_TRITON=1 on CPU): both paths, the
gradient, the rule and the selection table, against a float64 per-expert product."""

import json

import pytest
import torch

from lowra_compile import codegen
from lowra_compile.codegen import select
from lowra_compile.runtime import reference
from lowra_compile.runtime.synthetic import random_packed_weight

E, N, K, GROUP = 4, 24, 80, 32


pytestmark = pytest.mark.usefixtures("forced_kernels")


def _dense(x, offsets, packed, e=E, group_size=GROUP):
    """The per-expert product on the dequantized stack, differentiable, in x's dtype."""
    k = x.shape[1]
    w = reference.dequantize(packed, k, group_size, x.dtype).view(e, -1, k)
    ends = offsets.tolist()
    return torch.cat([x[s:t] @ w[i].t() for i, (s, t) in enumerate(zip([0, *ends[:-1]], ends))])


def _check(counts, dtype, device, tol):
    torch.manual_seed(0)
    packed = random_packed_weight(E * N, K, group_size=GROUP, device=device).tensors()
    x = torch.randn(sum(counts), K, device=device).to(dtype).requires_grad_()
    offsets = torch.cumsum(torch.tensor(counts), 0).to(device=device, dtype=torch.int32)
    y = torch.ops.lowra.grouped_linear(x, offsets, packed, GROUP, E)
    x64 = x.detach().double().requires_grad_()
    want = _dense(x64, offsets, packed)
    torch.testing.assert_close(y.double(), want, **tol)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    (want_dx,) = torch.autograd.grad(want, x64, g.double())
    assert dx.dtype == dtype
    torch.testing.assert_close(dx.double(), want_dx, **tol)
    return {e["op"]: e["path"] for e in codegen.kernel_log()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_few_rows_take_the_fused_grouped_kernels(dtype, device, tol):
    paths = _check((3, 0, 9, 2), dtype, device, tol[dtype])
    if device == "cpu":  # the rule; on CUDA the autotune picks
        assert paths == {"grouped_linear": "fused-grouped", "grouped_linear_backward": "fused-grouped"}


def test_a_table_sends_a_bucket_to_dequant_then_grouped_product(monkeypatch, tmp_path, device, tol):
    m = 14
    dev = torch.device(device)
    entries = []
    for op in ("grouped_forward", "grouped_backward"):
        _, mb, k, n, r = select.bucket_key(op, m, K, E * N, 0)
        entries.append(dict(device=select.device_name(dev), op=op, m=mb, k=k, n=n, r=r, path="dequant+grouped mm"))
    (tmp_path / "table.json").write_text(json.dumps({"entries": entries}))
    monkeypatch.setenv("LOWRA_SELECTION_TABLE", str(tmp_path / "table.json"))
    select.reset()
    paths = _check((3, 0, 9, 2), torch.float32, device, tol[torch.float32])
    assert paths["grouped_linear"] == paths["grouped_linear_backward"] == "dequant+grouped mm"
    assert "dequant" not in paths  # the stack is dequantized by the kernel directly, not through the op


def test_many_rows_take_dequant_then_grouped_product_by_the_rule(device, tol):
    paths = _check((100, 60, 0, 120), torch.float32, device, tol[torch.float32])
    if device == "cpu":
        assert paths["grouped_linear"] == "dequant+grouped mm"


def test_unforced_cpu_and_float64_take_the_reference(monkeypatch):
    packed = random_packed_weight(E * N, K, group_size=GROUP).tensors()
    offsets = torch.tensor([2, 2, 4, 5], dtype=torch.int32)
    torch.ops.lowra.grouped_linear(torch.randn(5, K, dtype=torch.float64), offsets, packed, GROUP, E)
    monkeypatch.delenv("LOWRA_FORCE_TRITON", raising=False)
    torch.ops.lowra.grouped_linear(torch.randn(5, K), offsets, packed, GROUP, E)
    assert [(e["path"], e["calls"]) for e in codegen.kernel_log() if e["op"] == "grouped_linear"] == [("reference", 2)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [2, 4096])
def test_cuda_bf16_mixtral_shapes_autotuned(tokens):
    # 8 experts of 1024 -> 4096 (a Mixtral layer's up projection, narrowed), top-2 routing
    e, n, k = 8, 4096, 1024
    torch.manual_seed(0)
    packed = random_packed_weight(e * n, k, dtype=torch.bfloat16, device="cuda").tensors()
    counts = torch.multinomial(torch.ones(e), 2 * tokens, replacement=True).bincount(minlength=e)
    offsets = counts.cumsum(0).to(device="cuda", dtype=torch.int32)
    x = torch.randn(2 * tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.ops.lowra.grouped_linear(x, offsets, packed, 64, e)
    x32 = x.detach().float().requires_grad_()
    want = _dense(x32, offsets, packed, e, 64)
    torch.testing.assert_close(y.float(), want, atol=1.1e-2 * want.abs().max().item(), rtol=1.1e-2)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    (want_dx,) = torch.autograd.grad(want, x32, g.float())
    torch.testing.assert_close(dx.float(), want_dx, atol=1.1e-2 * want_dx.abs().max().item(), rtol=1.1e-2)


def test_a_compiled_mixture_runs_the_fused_grouped_kernels_and_trains_as_the_dequantized_model(tol):
    import copy

    import lowra_compile
    from lowra_compile.passes.release import ReleasedWeight

    from ..tiny_models import StackedExperts

    model = StackedExperts(experts=4, n=24, k=64)
    offsets = torch.tensor([5, 5, 12, 20], dtype=torch.int32)
    x, target = torch.randn(20, 64), torch.randn(20, 24)
    compiled = torch.compile(model, backend="lowra", options={"progress": False, "inner": "eager", "group_size": 32})
    compiled(x, offsets, target).backward()
    assert isinstance(model.weight, ReleasedWeight)
    reference = copy.deepcopy(model)  # the dequantized stack, transformers' own grouped product
    lowra_compile.materialize(reference)
    model.zero_grad(set_to_none=True)
    codegen.clear_log()
    loss = compiled(x, offsets, target)
    loss.backward()
    ref_loss = reference(x, offsets, target)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, **tol[torch.float32])
    torch.testing.assert_close(model.head.grad, reference.head.grad, **tol[torch.float32])
    paths = {e["op"]: e["path"] for e in codegen.kernel_log()}
    if not torch.cuda.is_available():  # the rule
        assert paths["grouped_linear"] == "fused-grouped"
