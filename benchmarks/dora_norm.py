"""DoRA's weight norm on a 2-bit base: PEFT's dense chain against lowra's one op, time and memory.

Every DoRA layer computes ||W + s B A|| per output row on every call. Variants per Llama-2-7B shape (N, K)
and rank, bf16 weights with fp32 adapters (PEFT's default), median ms by do_bench:
    peft dense     what PEFT's DoRA runs on lowra's packed base before the rewrite: W dequantized, B A from
                   an identity [K, K] through both adapters, their sum, then the row norms, all in fp32 (PEFT
                   casts x to fp32 adapters, and the identity and W to x's dtype)
    lowra op       `lowra::dora_row_norms` on the packed weight and the adapters (codegen/dora_norm.py)
Reported besides the time: the peak memory each variant allocates above what it was given ("extra_mib")
and the largest relative difference of the lowra op from the dense chain computed in fp32.

    python benchmarks/dora_norm.py            # GPU
    python benchmarks/dora_norm.py --quick    # CPU smoke test of the script
"""

from __future__ import annotations

import torch

import lowra_compile  # noqa: F401  (registers the ops and their kernels)
from bench_utils import bench, device_and_dtype, environment, packed_at_budget, parser, peak_mib, write_json
from lowra_compile import codegen

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K): attention, gate/up, down
RANKS = [16, 64]


def peft_dense(packed: list[torch.Tensor], k: int, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """PEFT's `DoraLinearLayer` norm, computed in the adapters' dtype (PEFT casts its input to them, then the
    identity and W to the input's dtype)."""
    w = torch.ops.lowra.dequant(packed, k, 64, a.dtype)
    lora_weight = (torch.eye(k, device=w.device, dtype=a.dtype) @ a.t() @ b.t()).t()
    return torch.linalg.norm(w + s * lora_weight, dim=1)


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__).parse_args(argv)
    device, dtype = device_and_dtype(args.quick)
    shapes, ranks = (SHAPES, RANKS) if not args.quick else ([(96, 128)], [8])
    rows = []
    with torch.no_grad():
        for n, k in shapes:
            packed = packed_at_budget(n, k, 2.0, device, dtype)
            for rank in ranks:
                a = torch.randn(rank, k, device=device) / k**0.5
                b = torch.randn(n, rank, device=device) * 0.01
                codegen.clear_log()
                fns = {"peft dense": lambda: peft_dense(packed, k, a, b, 2.0),
                       "lowra op": lambda: torch.ops.lowra.dora_row_norms(packed, k, 64, a, b, 2.0)}
                exact = fns["peft dense"]()
                error = ((fns["lowra op"]() - exact).abs() / exact).max().item()
                for name, fn in fns.items():
                    ms, mib = bench(fn, device, args.quick), peak_mib(fn, device)
                    rows.append({"N": n, "K": k, "rank": rank, "variant": name, "ms": ms, "extra_mib": mib,
                                 **({"max_rel_error": error} if name == "lowra op" else {})})
                    print(f"N={n} K={k} r={rank:3d}  {name:10s} {ms:8.3f} ms  extra {mib} MiB", flush=True)
                rows[-1]["kernels"] = codegen.kernel_log()
    write_json("dora_norm", {"benchmark": "dora_norm", "env": environment(device), "dtype": str(dtype), "rows": rows},
               args.out)


if __name__ == "__main__":
    main()
