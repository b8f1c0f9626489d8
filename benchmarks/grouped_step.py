"""A mixture's expert layer, forward + dx (the experts are frozen), per path of `lowra::grouped_linear`.

Variants per layout and token count, bf16 on one GPU, a 2.0-bit width mix, median ms by do_bench, and the
peak memory a step adds over its inputs:
    floor: bf16 grouped_mm        torch's grouped product on the dense stack, forward and dx
    dequant+grouped mm            the whole stack dequantized (Triton), then torch's grouped product, twice
    fused-grouped <config>        codegen/grouped_gemm.py: each expert's tiles dequantized inside its GEMM
    lowra op (auto)               torch.ops.lowra.grouped_linear and its backward, as a model calls them
Layouts: Mixtral-8x7B's up projection (8 experts of 4096 -> 14336, top-2) and Qwen3-30B-A3B's (128 experts
of 2048 -> 768, top-8); tokens 1 (decode), 64 (a short prompt) and 4096 (a training batch).

    python benchmarks/grouped_step.py            # GPU
    python benchmarks/grouped_step.py --quick    # CPU smoke test of the script (the floor and the op only;
                                                 # with TRITON_INTERPRET=1 the kernels too, interpreted)
"""

from __future__ import annotations

import os

import torch

import lowra_compile  # noqa: F401  (registers the ops and their kernels)
from bench_utils import bench, device_and_dtype, environment, packed_at_budget, parser, peak_mib, write_json
from lowra_compile import codegen
from lowra_compile.codegen import select
from lowra_compile.codegen.register import run_grouped
from lowra_compile.runtime import reference

LAYOUTS = {"mixtral-8x7b": dict(experts=8, k=4096, n=14336, top=2), "qwen3-30b-a3b": dict(experts=128, k=2048, n=768, top=8)}
TOKENS = [1, 64, 4096]


def _routed(tokens: int, experts: int, top: int, device: torch.device) -> torch.Tensor:
    """Cumulative row ends of `tokens` tokens routed to `top` distinct experts each, uniformly."""
    g = torch.Generator().manual_seed(0)
    choice = torch.rand(tokens, experts, generator=g).topk(top, dim=1).indices.flatten()
    return choice.bincount(minlength=experts).cumsum(0).to(device=device, dtype=torch.int32)


def variants(layout: dict, tokens: int, device: torch.device, dtype: torch.dtype) -> dict:
    e, k, n = layout["experts"], layout["k"], layout["n"]
    offsets = _routed(tokens, e, layout["top"], device)
    m = tokens * layout["top"]
    x = torch.randn(m, k, device=device, dtype=dtype)
    dy = torch.randn(m, n, device=device, dtype=dtype)
    packed = packed_at_budget(e * n, k, 2.0, device, dtype)
    dense = reference.dequantize(packed, k, 64, dtype).view(e, n, k)
    xg = x.clone().requires_grad_()
    out = {"floor: bf16 grouped_mm": lambda: (reference.per_expert_mm(x, dense.transpose(1, 2), offsets),
                                              reference.per_expert_mm(dy, dense, offsets))}

    def op_step():
        torch.autograd.grad(torch.ops.lowra.grouped_linear(xg, offsets, packed, 64, e), xg, dy)

    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":  # the Triton kernels (or the interpreter)
        choices = [select.GROUPED_DEQUANT] + [select.Choice("fused-grouped", "", c) for c in select.GROUPED_CONFIGS if c != "interp"]
        for c in choices:
            out[c.label()] = lambda c=c: (run_grouped(c, x, offsets, packed, 64, e, k, backward=False),
                                          run_grouped(c, dy, offsets, packed, 64, e, k, backward=True))
    out["lowra op (auto)"] = op_step
    return out


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__).parse_args(argv)
    device, dtype = device_and_dtype(args.quick)
    layouts = LAYOUTS if not args.quick else {"tiny": dict(experts=4, k=128, n=96, top=2)}
    tokens_list = TOKENS if not args.quick else [8]
    rows, kernels, env = [], [], environment(device)
    for name, layout in layouts.items():
        for tokens in tokens_list:
            codegen.clear_log()
            steps = variants(layout, tokens, device, dtype)
            times = {v: bench(fn, device, args.quick) for v, fn in steps.items()}
            floor = times["floor: bf16 grouped_mm"]
            for v, ms in times.items():
                peak = peak_mib(steps[v], device)
                rows.append({"layout": name, "tokens": tokens, **layout, "variant": v, "ms": ms, "x_floor": ms / floor,
                             "peak_mib": peak})
                print(f"{name} tokens={tokens:5d}  {v:36s} {ms:8.3f} ms  {ms / floor:5.2f}x floor"
                      + (f"  +{peak:8.1f} MiB" if peak is not None else ""), flush=True)
            kernels.append({"layout": name, "tokens": tokens, "log": codegen.kernel_log()})
            del steps
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # after every (layout, tokens): a GPU call cut off by its limit keeps what was measured before
            result = {"benchmark": "grouped_step", "env": env, "dtype": str(dtype), "bits": 2.0, "rows": rows,
                      "kernels": kernels, "autotune": select.measured()}
            write_json("grouped_step", result, args.out)


if __name__ == "__main__":
    main()
