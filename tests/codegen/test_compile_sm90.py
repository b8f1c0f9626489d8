"""Every GPU kernel variant compiles for an H100 (sm_90) and fits its shared memory, without a GPU.

Triton compiles to a cubin without a device (ptxas ships with it), so CPU CI catches kernels that the
interpreter accepts but the compiler rejects, and tile configs too big for Hopper's shared memory.
The kernels must be built without TRITON_INTERPRET, so the compilation runs in a subprocess (this file
as a script).
"""

import os
import subprocess
import sys

import pytest

H100_SHARED_BYTES = 232448  # the per-block opt-in maximum on sm_90


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LOWRA_FORCE_TRITON")}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    compiled = [line.split() for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert len(compiled) == 32
    too_big = [c for c in compiled if int(c[-1]) > H100_SHARED_BYTES]
    assert not too_big, too_big


def _compile_all() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lowra_compile.codegen import select
    from lowra_compile.codegen.dequant import _dequant_kernel
    from lowra_compile.codegen.dora_norm import _dora_norm_kernel, norm_tiles
    from lowra_compile.codegen.fused_small_m import _fused_small_m_kernel
    from lowra_compile.codegen.grouped_gemm import _grouped_dx_kernel, _grouped_forward_kernel, _ranges_kernel
    from lowra_compile.codegen.lora_gemm import _lora_gemm_kernel
    from lowra_compile.codegen.lora_grad import _lora_dys_dyb_kernel, rank_tiles

    def build(label, fn, pointers, consts, num_warps, num_stages=2):
        sig = {a: "constexpr" if a in consts else pointers.get(a, "i32") for a in fn.arg_names}
        sig.update({a: "fp32" for a in ("alpha", "scaling") if a in sig})
        k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=num_warps, num_stages=num_stages))
        print("ok", label, k.metadata.shared, flush=True)

    packed = dict(codes_ptr="*i32", book_ptr="*fp16", perm_ptr="*i32", absmax_codes_ptr="*u8", absmax_scale_ptr="*fp32")
    for bits in (1, 2, 3):  # 1 and 2 bits: small gather tables (see dequant.load_lut)
        for lut in ("where", "gather", "load"):
            cfg = select.DEQUANT_CONFIGS["gpu"]
            build(f"dequant-b{bits}-{lut}", _dequant_kernel, dict(packed, out_ptr="*bf16"),
                  dict(BITS=bits, GROUP=64, LUT=lut, BLOCK_R=cfg["block_r"], BLOCK_K=cfg["block_k"]), cfg["num_warps"])
    cfg = select.DORA_NORM_CONFIGS["gpu"]
    for bits, rank in ((1, 8), (3, 64), (4, 256)):
        block_rank, block_k = norm_tiles(rank, cfg["block_k"])
        build(f"dora_norm-b{bits}-r{rank}", _dora_norm_kernel, dict(packed, a_ptr="*bf16", b_ptr="*bf16", out_ptr="*fp32"),
              dict(BITS=bits, GROUP=64, LUT="where", BLOCK_R=cfg["block_r"], BLOCK_K=block_k, BLOCK_RANK=block_rank),
              cfg["num_warps"])
    fused_ptrs = dict(packed, x_ptr="*bf16", s_ptr="*bf16", b_ptr="*fp32", bias_ptr="*bf16", y_ptr="*bf16")
    cases = [(3, 16, name) for name in select.FUSED_CONFIGS if name != "interp"] + [(4, 128, "n128-k64-w4-s3")]
    for bits, block_m, name in cases:
        cfg = select.FUSED_CONFIGS[name]
        build(f"fused-b{bits}-m{block_m}-{name}", _fused_small_m_kernel, fused_ptrs,
              dict(BITS=bits, GROUP=64, LUT=cfg["lut"], PRECISION="tf32", HAS_LORA=True, HAS_BIAS=True, BLOCK_N=cfg["block_n"],
                   BLOCK_M=block_m, BLOCK_K=cfg["block_k"], BLOCK_R=64), cfg["num_warps"], cfg["num_stages"])
    gemm_ptrs = dict(x_ptr="*bf16", w_ptr="*bf16", s_ptr="*bf16", b_ptr="*fp32", bias_ptr="*bf16", c_ptr="*bf16")
    for name, cfg in select.GEMM_CONFIGS.items():
        if name != "interp":
            build(f"gemm-{name}", _lora_gemm_kernel, gemm_ptrs,
                  dict(HAS_LORA=True, HAS_BIAS=True, PRECISION="tf32", BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
                       BLOCK_K=cfg["block_k"], BLOCK_R=64, GROUP_M=8), cfg["num_warps"], cfg["num_stages"])
    schedule = dict(offsets_ptr="*i32", ranges_ptr="*i32")
    build("grouped-ranges", _ranges_kernel, dict(perm_ptr="*i32", ranges_ptr="*i32"), dict(EXPERTS=256), 4)
    for name, cfg in select.GROUPED_CONFIGS.items():
        if name == "interp":
            continue
        tiles = dict(GROUP=64, LUT="where", PRECISION="tf32", BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
                     BLOCK_K=cfg["block_k"], EXPERTS=128)
        for bits in (1, 3):
            build(f"grouped-forward-b{bits}-{name}", _grouped_forward_kernel, dict(packed, x_ptr="*bf16", y_ptr="*bf16", **schedule),
                  dict(BITS=bits, **tiles), cfg["num_warps"], cfg["num_stages"])
        widths = {f"{p}{b}": t for b in (1, 2, 3, 4) for p, t in (("codes", "*i32"), ("book", "*fp16"))}
        build(f"grouped-dx-{name}", _grouped_dx_kernel, dict(packed, dy_ptr="*bf16", dx_ptr="*bf16", **schedule, **widths),
              dict(HAS1=True, HAS2=True, HAS3=True, HAS4=True, **tiles), cfg["num_warps"], cfg["num_stages"])
    grad_ptrs = dict(dy_ptr="*bf16", s_ptr="*bf16", b_ptr="*fp32", ds_ptr="*fp32", db_ptr="*fp32")
    cfg = select.GRAD_CONFIGS["gpu"]
    for r in (16, 64, 256):
        block_m, block_n, block_r = rank_tiles(r, cfg["block_m"], cfg["block_n"])
        build(f"dys_dyb-r{r}", _lora_dys_dyb_kernel, grad_ptrs,
              dict(PRECISION="tf32", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r), cfg["num_warps"], cfg["num_stages"])


if __name__ == "__main__":
    _compile_all()
