"""One LoRA layer, forward + backward (dx, dA, dB), side by side with the alternatives (issue 3).

Variants per shape (M, K, N) and rank, bf16 on one GPU, median ms by do_bench:
    floor: 2 bf16 GEMMs       x W^T and dy W: the least any frozen-base LoRA step must do
    bf16 LoRA eager           F.linear(x, W) + s * B(A(x)) with dense bf16 W
    bf16 LoRA inductor        the same under torch.compile
    bnb NF4 LoRA              bitsandbytes matmul_4bit (when importable)
    torch dequant+matmul      runtime.reference.dequantize (plain torch ops) every step, then F.linear
    lowra <b> bits            torch.ops.lowra.lora_linear at a width mix averaging b bits (mode auto)
Plus per shape: the dequant kernel alone for each LUT (GB/s over codes read + bf16 written), and, from
the autotune, the time of every (path, config) candidate for the forward and the backward op.

    python benchmarks/layer_step.py                      # all shapes, ranks 16 and 64 (GPU)
    python benchmarks/layer_step.py --shapes 8192x4096x4096 --ranks 64   # a subset (one GPU call each)
    python benchmarks/layer_step.py --write-table        # also save the autotuned choices as the
                                                         # selection table lowra_compile ships
    python benchmarks/layer_step.py --quick              # CPU smoke test of the script
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import lowra_compile  # noqa: F401  (registers the ops and their kernels)
from bench_utils import bench, bnb_available, device_and_dtype, environment, packed_at_budget, parser, write_json
from lowra_compile import codegen
from lowra_compile.codegen import select
from lowra_compile.codegen.dequant import LUTS, dequantize
from lowra_compile.runtime import reference

SHAPES = [(8192, 4096, 4096), (8192, 4096, 11008), (8192, 11008, 4096), (2048, 4096, 4096)]
RANKS = [16, 64]
BUDGETS = [1.5, 2.0, 3.0, 4.0]
SCALING = 2.0


def _grad_step(forward, x, a, b, dy):
    def step():
        torch.autograd.grad(forward(), (x, a, b), dy)
    return step


def _dense_lora(x, w, a, b):
    return F.linear(x, w) + SCALING * F.linear(F.linear(x, a), b)


def variants(m: int, k: int, n: int, r: int, device: torch.device, dtype: torch.dtype, budgets: list[float]) -> dict:
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=g).requires_grad_()
    w = torch.randn(n, k, device=device, dtype=dtype, generator=g) * 0.02
    a = (torch.randn(r, k, device=device, dtype=dtype, generator=g) * 0.02).requires_grad_()
    b = (torch.randn(n, r, device=device, dtype=dtype, generator=g) * 0.02).requires_grad_()
    dy = torch.randn(m, n, device=device, dtype=dtype, generator=g)
    out = {
        "floor: 2 bf16 GEMMs": lambda: (x @ w.t(), dy @ w),
        "bf16 LoRA eager": _grad_step(lambda: _dense_lora(x, w, a, b), x, a, b, dy),
    }
    torch._dynamo.reset()  # a fresh static compile per shape, never the recompile limit's eager fallback
    compiled = torch.compile(_dense_lora)
    out["bf16 LoRA inductor"] = _grad_step(lambda: compiled(x, w, a, b), x, a, b, dy)
    if bnb_available():
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        w4, state = bnbf.quantize_4bit(w, quant_type="nf4")
        out["bnb NF4 LoRA"] = _grad_step(
            lambda: bnb.matmul_4bit(x, w4.t(), quant_state=state) + SCALING * F.linear(F.linear(x, a), b), x, a, b, dy)
    for bits in budgets:
        packed = packed_at_budget(n, k, bits, device, dtype)
        if bits == 2.0:
            out["torch dequant+matmul 2.0 bits"] = _grad_step(
                lambda p=packed: _dense_lora(x, reference.dequantize(p, k, 64, dtype), a, b), x, a, b, dy)
        out[f"lowra {bits} bits"] = _grad_step(
            lambda p=packed: torch.ops.lowra.lora_linear(x, x, p, 64, None, a, b, SCALING), x, a, b, dy)
    return out


def dequant_rows(k: int, n: int, device: torch.device, dtype: torch.dtype, quick: bool) -> list[dict]:
    """The dequant kernel alone at 2.0 bits, per LUT (Triton: GPU only, or the interpreter)."""
    if device.type != "cuda":
        return []
    packed = packed_at_budget(n, k, 2.0, device, dtype)
    buf = torch.empty(n, k, device=device, dtype=dtype)
    nbytes = sum(t.numel() * t.element_size() for t in packed) + buf.numel() * buf.element_size()
    rows = []
    for lut in LUTS:
        ms = bench(lambda lut=lut: dequantize(packed, k, 64, dtype, out=buf, lut=lut, **select.DEQUANT_CONFIGS["gpu"]), device, quick)
        rows.append({"K": k, "N": n, "lut": lut, "ms": ms, "gbps": nbytes / ms / 1e6})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--write-table", nargs="?", const=str(select.TABLE_PATH),
                   help="save autotuned choices as a selection table (on the GPU machine: a path under $OUT)")
    p.add_argument("--shapes", nargs="+", help="MxKxN shapes to run (default: all four), e.g. 8192x4096x4096")
    p.add_argument("--ranks", nargs="+", type=int, default=RANKS)
    args = p.parse_args(argv)
    device, dtype = device_and_dtype(args.quick)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    shapes, ranks, budgets = (shapes, args.ranks, BUDGETS) if not args.quick else ([(64, 128, 96)], [4], BUDGETS)
    env = environment(device)
    rows, dequant, kernels = [], [], []
    for m, k, n in shapes:
        dequant += dequant_rows(k, n, device, dtype, args.quick)
        for r in ranks:
            codegen.clear_log()
            steps = variants(m, k, n, r, device, dtype, budgets)
            times = {}
            for name, fn in steps.items():
                if name.startswith("lowra"):
                    select.forget_choices()  # each bit mix gets its own autotune (they share a shape bucket)
                times[name] = bench(fn, device, args.quick)
            floor = times["floor: 2 bf16 GEMMs"]
            for name, ms in times.items():
                rows.append({"M": m, "K": k, "N": n, "rank": r, "variant": name, "ms": ms, "x_floor": ms / floor})
                print(f"M={m} K={k} N={n} r={r}  {name:32s} {ms:8.3f} ms  {ms / floor:5.2f}x floor", flush=True)
            kernels.append({"M": m, "K": k, "N": n, "rank": r, "log": codegen.kernel_log()})  # which lowra paths ran
            del steps
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # after every (shape, rank): a GPU call cut off by its limit keeps what was measured before
            result = {"benchmark": "layer_step", "env": env, "dtype": str(dtype), "rows": rows, "dequant": dequant,
                      "kernels": kernels, "autotune": select.measured()}
            write_json("layer_step" + "".join(f"_{s}" for s in args.shapes or []), result, args.out)
    if args.write_table and select.measured():
        select.save_table(args.write_table, select.measured(), note=f"measured by benchmarks/layer_step.py on {env['device']}, {env['date']}")
        print(f"selection table: {args.write_table}")


if __name__ == "__main__":
    main()
