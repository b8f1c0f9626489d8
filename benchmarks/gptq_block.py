"""One block of GPTQ rounding (128 columns): the Triton kernel at a few tile configs against the eager
column loop (runtime.reference), on the tallest matrix quantizing a Llama-2-7B gate/up projection makes
(its 11,008 rows at all four widths stacked: 44,032 rows, levels padded to 16).

A 7B model has 1.14 M columns to round (32 blocks x (6 x 4,096 + 11,008)), i.e. ~8,900 blocks of 128 at
this height or less: "model_s" is that count times the block's time, the floor of the column loops in
benchmarks/plan_speed.py --rounding gptq (the pushes onto later blocks are GEMMs on top).

    python benchmarks/gptq_block.py            # GPU
    python benchmarks/gptq_block.py --quick    # CPU smoke test (interpreter)
"""

from __future__ import annotations

import os
import sys

if "--quick" in sys.argv:  # the kernel runs in Triton's interpreter on the CPU, which must be on before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import lowra_compile  # noqa: E402, F401  (defines the ops)
from bench_utils import bench, environment, parser, write_json  # noqa: E402
from lowra_compile.codegen.gptq_block import gptq_block  # noqa: E402
from lowra_compile.runtime import reference  # noqa: E402

CONFIGS = [(16, 4), (32, 4), (32, 8), (64, 8)]  # (block_n, num_warps)
BLOCKS_7B = 32 * (6 * 4096 + 11008) // 128


def inputs(n: int, b: int, device: torch.device) -> list[torch.Tensor]:
    w = torch.randn(n, b, device=device) * 0.02
    scale = torch.rand(n, b, device=device) * 0.05 + 0.01
    levels = torch.sort(torch.rand(n, 16, device=device) * 2 - 1, dim=1).values
    x = torch.randn(4 * b, b, device=device)
    h = x.t() @ x / (4 * b) + 0.1 * torch.eye(b, device=device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return [w, scale, levels, u]


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__).parse_args(argv)
    if not args.quick and not torch.cuda.is_available():  # the full size on the CPU would fail late, at the kernel
        raise SystemExit("this benchmark needs a CUDA GPU; use --quick for a CPU smoke test")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    n, b = (44032, 128) if not args.quick else (64, 32)
    args_ = inputs(n, b, device)
    want = reference.gptq_block(*args_)
    rows = [{"variant": "eager column loop", "ms": bench(lambda: reference.gptq_block(*args_), device, args.quick)}]
    for block_n, warps in CONFIGS if not args.quick else CONFIGS[:1]:
        codes, _ = gptq_block(*args_, block_n=block_n, num_warps=warps)
        rows.append({"variant": f"triton n{block_n}-w{warps}", "same_codes": (codes == want[0]).float().mean().item(),
                     "ms": bench(lambda: gptq_block(*args_, block_n=block_n, num_warps=warps), device, args.quick)})
    for r in rows:
        r["model_s"] = r["ms"] * BLOCKS_7B / 1e3
        print(f"{r['variant']:22s} {r['ms']:9.3f} ms/block  {r['model_s']:7.1f} s for 7B  same codes {r.get('same_codes', 1.0):.5f}")
    write_json("gptq_block", {"benchmark": "gptq_block", "env": environment(device), "rows_per_block": n,
                              "columns": b, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
