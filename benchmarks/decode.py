"""Forward only at small M (decode, eval): lowra 2-bit against bf16 F.linear and bitsandbytes NF4 (issue 3).

At M = 1..128 a layer is bound by reading its weight, so the low-bit paths should win by up to the
byte ratio (16 / bits). Variants per (M, K, N), median ms by do_bench, no LoRA (rank 0):
    bf16 F.linear          dense weight
    bnb NF4                bitsandbytes matmul_4bit (its GEMV kernel at M=1; when importable)
    lowra 2-bit            every row at 2 bits
    lowra 2.0 mix          rows at 1, 2 and 3 bits (a planned 2.0-bit layer)
The lowra rows run mode "auto"; "autotune" in the JSON lists every (path, config) candidate's time,
so the fused-small-m vs dequant+gemm crossover can be read off directly.

    python benchmarks/decode.py            # GPU
    python benchmarks/decode.py --quick    # CPU smoke test of the script
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import lowra_compile  # noqa: F401  (registers the ops and their kernels)
from bench_utils import (bench, bnb_available, device_and_dtype, environment, packed_at_budget, packed_widths, parser,
                         write_json)
from lowra_compile import codegen
from lowra_compile.codegen import select

MS = [1, 16, 128]
SHAPES = [(4096, 4096), (4096, 11008)]  # (K, N)


def variants(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype) -> dict:
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
    out = {"bf16 F.linear": lambda: F.linear(x, w)}
    if bnb_available():
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        w4, state = bnbf.quantize_4bit(w, quant_type="nf4")
        out["bnb NF4"] = lambda: bnb.matmul_4bit(x, w4.t(), quant_state=state)
    two_bit = packed_widths(n, k, (2,), device, dtype)
    mix = packed_at_budget(n, k, 2.0, device, dtype)
    out["lowra 2-bit"] = lambda: torch.ops.lowra.lora_linear(x, x, two_bit, 64, None, None, None, 1.0)
    out["lowra 2.0 mix"] = lambda: torch.ops.lowra.lora_linear(x, x, mix, 64, None, None, None, 1.0)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__).parse_args(argv)
    device, dtype = device_and_dtype(args.quick)
    ms, shapes = (MS, SHAPES) if not args.quick else ([1, 16], [(128, 96)])
    env = environment(device)
    rows, kernels = [], []
    with torch.no_grad():
        for k, n in shapes:
            for m in ms:
                codegen.clear_log()
                times = {}
                for name, fn in variants(m, k, n, device, dtype).items():
                    if name.startswith("lowra"):
                        select.forget_choices()  # each bit mix gets its own autotune (they share a shape bucket)
                    times[name] = bench(fn, device, args.quick)
                base = times["bf16 F.linear"]
                for name, t in times.items():
                    rows.append({"M": m, "K": k, "N": n, "variant": name, "ms": t, "speedup_vs_bf16": base / t})
                    print(f"M={m:4d} K={k} N={n}  {name:16s} {t:8.4f} ms  {base / t:5.2f}x bf16", flush=True)
                kernels.append({"M": m, "K": k, "N": n, "log": codegen.kernel_log()})
    write_json("decode", {"benchmark": "decode", "env": env, "dtype": str(dtype), "rows": rows,
                          "kernels": kernels, "autotune": select.measured()}, args.out)


if __name__ == "__main__":
    main()
