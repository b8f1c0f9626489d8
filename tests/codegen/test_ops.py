"""`torch.ops.lowra.*` through the registered kernels (LOWRA_FORCE_TRITON=1 on CPU): forward, every gradient,
both paths (forced through a selection table), the modes, the kernel log and timing."""

import json

import pytest
import torch
import torch.nn.functional as F

from lowra_compile import codegen
from lowra_compile.codegen import select
from lowra_compile.runtime import reference
from lowra_compile.runtime.synthetic import random_packed_weight

N, K, R, GROUP = 45, 100, 4, 32
FUSED, TRITON, CUBLAS = "fused-small-m", "dequant+gemm triton", "dequant+gemm cublas"


def _choices(variant: str, cuda: bool) -> tuple[select.Choice, select.Choice]:
    """(forward, backward) choices of a variant; the backward has no fused path (it uses Triton then)."""
    gemm = select.Choice("dequant+gemm", "triton", "128x128x64-w8-s4" if cuda else "interp")
    if variant == CUBLAS:
        return select.Choice("dequant+gemm", "cublas"), select.Choice("dequant+gemm", "cublas")
    if variant == FUSED:
        return select.Choice(FUSED, "", "n64-k128-w4-s2" if cuda else "interp"), gemm
    return gemm, gemm


pytestmark = pytest.mark.usefixtures("forced_kernels")


def _force(monkeypatch, tmp_path, device, variant, m, rank):
    """A selection table that sends this shape bucket to `variant`; returns the (forward, backward) choices."""
    dev = torch.device(device)
    choices = _choices(variant, dev.type == "cuda")
    entries = []
    for op, c in zip(("forward", "backward"), choices):
        _, mb, k, n, r = select.bucket_key(op, m, K, N, rank)
        entries.append(dict(device=select.device_name(dev), op=op, m=mb, k=k, n=n, r=r, path=c.path, gemm=c.gemm, config=c.config))
    (tmp_path / "table.json").write_text(json.dumps({"entries": entries}))
    monkeypatch.setenv("LOWRA_SELECTION_TABLE", str(tmp_path / "table.json"))
    select.reset()
    return choices


def _layer(m, lora, bias, dtype, device, widths=(1, 2, 3, 4), lora_dtype=None):
    torch.manual_seed(0)
    packed = random_packed_weight(N, K, widths, group_size=GROUP, seed=m, device=device).tensors()
    x = torch.randn(m, K, device=device).to(dtype).requires_grad_()
    xl = x if lora != "dropout" else torch.randn(m, K, device=device).to(dtype).requires_grad_()
    a = (0.1 * torch.randn(R, K, device=device)).to(lora_dtype or dtype).requires_grad_() if lora != "none" else None
    b = (0.1 * torch.randn(N, R, device=device)).to(lora_dtype or dtype).requires_grad_() if lora != "none" else None
    bb = torch.randn(N, device=device).to(dtype).requires_grad_() if bias else None
    return packed, x, xl, a, b, bb


def _check(packed, x, xl, a, b, bb, tol):
    y = torch.ops.lowra.lora_linear(x, xl, packed, GROUP, bb, a, b, 0.5)
    assert y.dtype == reference.lora_output_dtype(x, a)
    leaves = list({id(t): t for t in (x, xl, a, b, bb) if t is not None}.values())
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    sub = dict(zip(map(id, leaves), ref_leaves))
    r = (lambda t: None if t is None else sub[id(t)])
    w = reference.dequantize(packed, K, GROUP, torch.float64)
    want = F.linear(r(x), w, r(bb)) + (0.5 * F.linear(F.linear(r(xl), r(a)), r(b)) if a is not None else 0)
    torch.testing.assert_close(y.double(), want, **tol)
    g = torch.randn_like(y)
    for t, got, ref in zip(leaves, torch.autograd.grad(y, leaves, g), torch.autograd.grad(want, ref_leaves, g.double())):
        assert got.dtype == t.dtype
        torch.testing.assert_close(got.double(), ref, **tol)  # dx (with dS A folded in when x_lora is x), dx_lora, dA, dB, dbias


@pytest.mark.parametrize("variant", [FUSED, TRITON, CUBLAS])
@pytest.mark.parametrize("m", [1, 64])  # m = 7 (a partial tile) in the fp16 tests below
@pytest.mark.parametrize("lora", ["none", "shared", "dropout"])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_fp32(variant, m, lora, bias, monkeypatch, tmp_path, device, tol):
    fwd, bwd = _force(monkeypatch, tmp_path, device, variant, m, 0 if lora == "none" else R)
    _check(*_layer(m, lora, bias, torch.float32, device), tol[torch.float32])
    ran = {(e["op"], select.Choice(e["path"], e["gemm"], e["config"])) for e in codegen.kernel_log()}
    assert ran == {("lora_linear", fwd), ("lora_linear_backward", bwd)}


@pytest.mark.parametrize("variant", [FUSED, TRITON])
@pytest.mark.parametrize("widths", [(1,), (2,), (3,), (4,), (1, 2, 3, 4)])
@pytest.mark.parametrize("lora", ["shared", "dropout"])
def test_lora_linear_fp16_per_width(variant, widths, lora, monkeypatch, tmp_path, device, tol):
    _force(monkeypatch, tmp_path, device, variant, 7, R)
    _check(*_layer(7, lora, True, torch.float16, device, widths), tol[torch.float16])


@pytest.mark.parametrize("variant", [FUSED, TRITON, CUBLAS])
@pytest.mark.parametrize("lora", ["shared", "dropout"])
def test_lora_linear_fp16_input_fp32_adapters(variant, lora, monkeypatch, tmp_path, device, tol):
    """PEFT's default next to a half-precision base: y is fp32, the products run in x's dtype."""
    _force(monkeypatch, tmp_path, device, variant, 7, R)
    _check(*_layer(7, lora, True, torch.float16, device, lora_dtype=torch.float32), tol[torch.float16])


@pytest.mark.parametrize("variant", [FUSED, TRITON, CUBLAS])
def test_an_fp32_x_lora_next_to_fp32_adapters_keeps_both_passes_in_x_s_dtype(variant, monkeypatch, tmp_path, device, tol):
    """PEFT casts x to fp32 adapters before the adapter: x is fp16, x_lora and dy fp32. W still dequantizes to
    x's dtype in the backward, as the dense linear's backward runs in it (it dequantized to fp32 before)."""
    from lowra_compile.codegen import register

    _force(monkeypatch, tmp_path, device, variant, 7, R)
    dtypes, dequantize = [], register.dequantize
    monkeypatch.setattr(register, "dequantize", lambda *args, **kw: dtypes.append(args[3]) or dequantize(*args, **kw))
    packed, x, _, a, b, bb = _layer(7, "shared", True, torch.float16, device, lora_dtype=torch.float32)
    _check(packed, x, x.detach().float().requires_grad_(), a, b, bb, tol[torch.float16])
    assert dtypes and set(dtypes) == {torch.float16}
    assert {e["op"] for e in codegen.kernel_log()} == {"lora_linear", "lora_linear_backward"}  # no reference fallback


def test_a_table_naming_the_fused_path_for_the_backward_is_not_followed(monkeypatch, tmp_path, device, tol):
    """The fused small-M kernel has no backward: a table entry naming it there ran torch's product on CPU while
    the log said fused; the backward takes its rule instead."""
    _force(monkeypatch, tmp_path, device, FUSED, 7, R)
    table = json.loads((tmp_path / "table.json").read_text())
    fused = next(e for e in table["entries"] if e["op"] == "forward")
    table["entries"] = [fused, {**fused, "op": "backward"}]
    (tmp_path / "table.json").write_text(json.dumps(table))
    select.reset()
    _check(*_layer(7, "shared", False, torch.float32, device), tol[torch.float32])
    paths = {e["op"]: e["path"] for e in codegen.kernel_log()}
    assert paths == {"lora_linear": FUSED, "lora_linear_backward": "dequant+gemm"}


def test_batched_input_and_rule(device, tol):
    """[B, T, K] input; without a table the CPU rule picks the fused path for few tokens."""
    packed, x, xl, a, b, bb = _layer(6, "shared", True, torch.float32, device)
    x3 = x.detach().view(2, 3, K)
    y = torch.ops.lowra.lora_linear(x3, x3, packed, GROUP, bb, a, b, 0.5)
    assert y.shape == (2, 3, N)
    torch.testing.assert_close(y, reference.lora_linear(x3, x3, packed, GROUP, bb, a, b, 0.5), **tol[torch.float32])
    if device == "cpu":
        assert codegen.kernel_log()[0]["path"] == "fused-small-m"


def test_dequant_op_log_and_reference_mode(device):
    packed = random_packed_weight(24, 70, group_size=32, device=device).tensors()
    want = reference.dequantize(packed, 70, 32, torch.float32)
    torch.testing.assert_close(torch.ops.lowra.dequant(packed, 70, 32, torch.float32), want, atol=0, rtol=0)
    codegen.set_kernel_mode("reference")
    torch.testing.assert_close(torch.ops.lowra.dequant(packed, 70, 32, torch.float32), want, atol=0, rtol=0)
    assert [(e["op"], e["path"], e["bits"]) for e in codegen.kernel_log()] == [
        ("dequant", "dequant", {1: 6, 2: 6, 3: 6, 4: 6}), ("dequant", "reference", {1: 6, 2: 6, 3: 6, 4: 6})]


@pytest.mark.parametrize("adapters", [torch.float32, torch.bfloat16])
def test_dora_row_norms_op_log_and_reference_mode(device, adapters):
    packed = random_packed_weight(24, 70, group_size=32, device=device).tensors()
    a, b = torch.randn(4, 70, device=device, dtype=adapters), torch.randn(24, 4, device=device, dtype=adapters)
    want = reference.dora_row_norms(packed, 70, 32, a, b, 0.5)
    torch.testing.assert_close(torch.ops.lowra.dora_row_norms(packed, 70, 32, a, b, 0.5), want, atol=1e-5, rtol=1e-5)
    codegen.set_kernel_mode("reference")
    torch.testing.assert_close(torch.ops.lowra.dora_row_norms(packed, 70, 32, a, b, 0.5), want, atol=0, rtol=0)
    logged = [(e["op"], e["path"], e["rank"], e["calls"]) for e in codegen.kernel_log()]
    if device == "cpu" and adapters == torch.bfloat16:  # the interpreter has no bf16 arithmetic: the reference
        assert logged == [("dora_row_norms", "reference", 4, 2)]
    else:
        assert logged == [("dora_row_norms", "dora_row_norms", 4, 1), ("dora_row_norms", "reference", 4, 1)]


def test_timing_fills_time_and_throughput(device):
    codegen.set_timing(True)
    packed, x, xl, a, b, bb = _layer(7, "shared", False, torch.float32, device)
    for _ in range(2):
        torch.ops.lowra.lora_linear(x.detach(), x.detach(), packed, GROUP, None, a.detach(), b.detach(), 0.5)
    (entry,) = codegen.kernel_log()
    assert entry["calls"] == 2 and entry["time_ms"] > 0 and entry["tflops"] > 0
    assert (entry["M"], entry["K"], entry["N"], entry["rank"]) == (7, K, N, R)


def test_unforced_cpu_and_float64_take_the_reference(monkeypatch):
    packed, x, xl, a, b, bb = _layer(7, "shared", True, torch.float64, "cpu")
    torch.ops.lowra.lora_linear(x.detach(), x.detach(), packed, GROUP, bb, a, b, 0.5)  # float64: not a kernel dtype
    monkeypatch.delenv("LOWRA_FORCE_TRITON", raising=False)
    torch.ops.lowra.lora_linear(x.detach().float(), x.detach().float(), packed, GROUP, None, None, None, 0.5)
    assert [e["path"] for e in codegen.kernel_log()] == ["reference", "reference"]


def test_fake_tensors_take_the_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    packed, x, xl, a, b, bb = _layer(7, "shared", True, torch.float32, "cpu")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx = mode.from_tensor(x.detach())
        y = torch.ops.lowra.lora_linear(fx, fx, [mode.from_tensor(t) for t in packed], GROUP, None, None, None, 0.5)
    assert y.shape == (7, N) and codegen.kernel_log() == []


def test_opcheck_and_aot_eager_run_the_kernels(device, tol):
    """Compiled graphs trace the fake kernel and call the real one at run time (on CPU: the interpreter)."""
    packed, x, xl, a, b, bb = _layer(7, "shared", True, torch.float32, device)
    args = (x.detach(), x.detach(), packed, GROUP, bb.detach(), a.detach(), b.detach(), 0.5)
    torch.library.opcheck(torch.ops.lowra.lora_linear.default, args, test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda *t: torch.ops.lowra.lora_linear(*t), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), reference.lora_linear(*args), **tol[torch.float32])
    assert "reference" not in {e["path"] for e in codegen.kernel_log()}


def test_modes_and_registration():
    with pytest.raises(ValueError, match="kernels"):
        codegen.set_kernel_mode("cuda")
    codegen.register_kernels()
    codegen.register_kernels()  # idempotent
    codegen.set_kernel_mode("triton")
    assert codegen.kernel_mode() == "triton"


def test_save_table_merges(tmp_path):
    e = dict(device="cpu", op="forward", m=8, k=K, n=N, r=4, path="fused-small-m", gemm="", config="interp")
    select.save_table(tmp_path / "t.json", [e])
    select.save_table(tmp_path / "t.json", [dict(e, m=16), dict(e, path="dequant+gemm", gemm="triton")])
    entries = json.loads((tmp_path / "t.json").read_text())["entries"]
    assert sorted((x["m"], x["path"]) for x in entries) == [(8, "dequant+gemm"), (16, "fused-small-m")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [16, 512, 4096])
@pytest.mark.parametrize("widths", [(1,), (2,), (3,), (4,), (1, 2, 3, 4)])
def test_cuda_bf16_large_shapes_autotuned(m, widths):
    torch.manual_seed(0)
    k, n, r = 4096, 4096, 64
    packed = random_packed_weight(n, k, widths, dtype=torch.bfloat16, device="cuda").tensors()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(r, k, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    b = (torch.randn(n, r, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    y = torch.ops.lowra.lora_linear(x, x, packed, 64, None, a, b, 2.0)
    w = reference.dequantize(packed, k, 64, torch.float32)
    want = x.float() @ w.t() + 2.0 * (x.float() @ a.float().t()) @ b.float().t()
    torch.testing.assert_close(y.float(), want, atol=1.1e-2 * want.abs().max().item(), rtol=1.1e-2)
    g = torch.randn_like(y)
    dx, da, db = torch.autograd.grad(y, [x, a, b], g)
    s, ds = x.float() @ a.float().t(), 2.0 * g.float() @ b.float()
    for got, ref in ((dx, g.float() @ w + ds @ a.float()), (da, ds.t() @ x.float()), (db, 2.0 * g.float().t() @ s)):
        torch.testing.assert_close(got.float(), ref, atol=1.1e-2 * ref.abs().max().item(), rtol=2e-2)
    assert select.measured(), "autotune ran for the new buckets"
