"""The GPTQ column-loop kernel against runtime.reference: full and ragged blocks, 2-16 levels (with the
repeated top levels of stacked widths), strided views, and the op's dispatch to it."""

import pytest
import torch

from lowra_compile import codegen
from lowra_compile.codegen import select
from lowra_compile.codegen.gptq_block import gptq_block
from lowra_compile.runtime import reference


def _inputs(n: int, b: int, levels: int, seed: int, device: str, repeat_top: int = 0):
    """A [N, K] weight of which columns 5 .. 5 + b are the block (a strided view, as the caller passes),
    per-row sorted levels, and a well-conditioned upper factor."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, b + 9, generator=g)[:, 5 : 5 + b]
    scale = torch.rand(n, b + 9, generator=g)[:, 5 : 5 + b] * 2 + 0.5
    lv = torch.sort(torch.rand(n, levels - repeat_top, generator=g) * 2 - 1, dim=1).values
    lv = torch.cat([lv, lv[:, -1:].expand(n, repeat_top)], 1)  # stacked widths pad with their top level
    x = torch.randn(4 * b, b, generator=g) * torch.linspace(0.3, 2.0, b)
    h = x.t() @ x / (4 * b) + 0.05 * torch.eye(b)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return [t.to(device) for t in (w, scale, lv, u)]


def _assert_matches(got, want, device):
    (codes, errors), (ref_codes, ref_errors) = got, want
    same = codes == ref_codes
    # the interpreter is bit-exact; on the GPU the update may fuse into an FMA, moving a value on a
    # threshold by an ulp to the equally near other level
    assert same.float().mean() >= (1.0 if device == "cpu" else 0.999)
    torch.testing.assert_close(errors[same], ref_errors[same], **({} if device == "cpu" else dict(atol=1e-3, rtol=1e-3)))


@pytest.mark.parametrize("n,b,levels,repeat_top", [(37, 128, 4, 0), (50, 100, 16, 0), (8, 3, 2, 0), (40, 128, 16, 12)])
@pytest.mark.parametrize("block_n", [16, 32])
@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_block_matches_reference(n, b, levels, repeat_top, block_n, seed, device):
    w, scale, lv, u = _inputs(n, b, levels, seed, device, repeat_top)
    want = reference.gptq_block(w, scale, lv, u)
    _assert_matches(gptq_block(w, scale, lv, u, block_n=block_n), want, device)
    assert int(want[0].max()) < levels and int(want[0].min()) >= 0


def test_gptq_block_rejects_blocks_over_its_tile(device):
    w, scale, lv, u = _inputs(4, 129, 4, 0, device)
    with pytest.raises(ValueError, match="at most 128 columns"):
        gptq_block(w, scale, lv, u)


def test_the_op_runs_the_kernel_and_logs_it(monkeypatch, device):
    if device == "cpu":
        monkeypatch.setenv("LOWRA_FORCE_TRITON", "1")
    codegen.clear_log()
    w, scale, lv, u = _inputs(24, 60, 8, 3, device)
    got = torch.ops.lowra.gptq_block(w, scale, lv, u)
    _assert_matches(got, reference.gptq_block(w, scale, lv, u), device)
    codegen.set_kernel_mode("reference")
    try:
        torch.ops.lowra.gptq_block(w, scale, lv, u)
    finally:
        codegen.set_kernel_mode("auto")
    paths = [(e["op"], e["path"], e["config"]) for e in codegen.kernel_log()]
    assert paths == [("gptq_block", "gptq_block", "gpu" if device == "cuda" else "interp"), ("gptq_block", select.REFERENCE.path, select.REFERENCE.config)]
