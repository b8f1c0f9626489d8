"""The `lowra` command: demo, plan, report, bench.

    lowra demo                     2-bit LoRA fine-tune of the packaged SmolLM2 (perplexities + report)
    lowra plan --bits 1.5          quantize SmolLM2 at a budget, calibrated on Bible text; print the plan
    lowra report --bits 2 --json r.json --markdown r.md --png r.png   same, written to files
    lowra bench --m 64 --k 1024 --n 1024 --bits 2                      time one layer step on this device
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .config import CALIBRATION


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=float, default=2.0, help="average code bits per weight (budget)")
    p.add_argument("--choices", default="1,2,3,4", help="bit widths a channel may take, comma separated")
    p.add_argument("--calibrate", default="fisher", choices=CALIBRATION)
    p.add_argument("--window", type=int, default=256, help="tokens per calibration window")
    # 4,096 tokens, what the demo calibrates on: below that the plan is worse and quantize_ says so
    p.add_argument("--windows", type=int, default=16, help="calibration windows")
    p.add_argument("--batch", type=int, default=4, help="windows per calibration batch (batches run one at a time)")


def quantize_for_plan(model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> torch.nn.Module:
    """`model` frozen and quantized in place at the budget of `args`, calibrated on the windows `ids`, in
    batches of `args.batch`."""
    from .config import LowRAConfig
    from .finetune import quantize_on

    config = LowRAConfig(
        bits=args.bits, bit_choices=tuple(int(b) for b in args.choices.split(",")), calibrate=args.calibrate, loftq_iters=0
    )
    # A model loaded for training has trainable weights, which lowra leaves dense: the plan is of the base
    # that LoRA would train on, so freeze it (the loss gradient still reaches every layer: calibrate.py).
    quantize_on(model.requires_grad_(False), list(ids.split(args.batch)), config)
    return model


def _planned_model(args: argparse.Namespace) -> torch.nn.Module:
    """SmolLM2 quantized in place at the requested budget, calibrated on Bible text."""
    if min(args.window, args.windows, args.batch) < 1:  # before the model loads
        raise SystemExit(f"lowra: --window, --windows and --batch must be at least 1; got {args.window}, "
                         f"{args.windows}, {args.batch}")
    from .smollm import load_smollm2
    from .texts import kjv_text, token_windows

    model, tokenizer = load_smollm2()
    return quantize_for_plan(model, token_windows(tokenizer, kjv_text(), window=args.window, max_windows=args.windows), args)


def _plan(args: argparse.Namespace) -> None:
    from .report import report

    print(report(_planned_model(args)))


def _report(args: argparse.Namespace) -> None:
    from .report import report

    rep = report(_planned_model(args))
    print(rep)
    if args.json:
        with open(args.json, "w") as f:
            f.write(rep.to_json())
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(rep.to_markdown())
    if args.png:
        rep.plot(args.png)


# The widths `bench` packs its rows at for each average (random_packed_weight gives each width an equal share).
_BENCH_WIDTHS = {1.0: (1,), 1.5: (1, 2), 2.0: (2,), 2.5: (1, 2, 3, 4), 3.0: (3,), 4.0: (4,)}


def _bench(args: argparse.Namespace) -> None:
    """One layer forward+backward through `lowra.lora_linear` against the dense F.linear LoRA step."""
    from .runtime import random_packed_weight

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    widths = _BENCH_WIDTHS[args.bits]
    packed = random_packed_weight(args.n, args.k, widths, dtype=dtype, device=device).tensors()
    w = torch.ops.lowra.dequant(packed, args.k, 64, dtype)
    x = torch.randn(args.m, args.k, device=device, dtype=dtype, requires_grad=True)
    a = (torch.randn(args.rank, args.k, device=device, dtype=dtype) * 0.01).requires_grad_()
    b = (torch.randn(args.n, args.rank, device=device, dtype=dtype) * 0.01).requires_grad_()
    steps = {
        "dense_lora": lambda: torch.nn.functional.linear(x, w) + 2.0 * (x @ a.t()) @ b.t(),
        "lowra": lambda: torch.ops.lowra.lora_linear(x, x, packed, 64, None, a, b, 2.0),
    }
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "m": args.m, "k": args.k, "n": args.n,
               "widths": list(widths)}
    for name, fn in steps.items():
        for _ in range(2):
            fn().sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            fn().sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        results[f"{name}_ms"] = 1e3 * (time.perf_counter() - t0) / args.iters
    print(json.dumps(results, indent=2))


def build_parser() -> argparse.ArgumentParser:
    from . import demo

    parser = argparse.ArgumentParser(prog="lowra", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(sub.add_parser("demo", help="2-bit LoRA fine-tune of SmolLM2 with perplexities and the report"))
    _add_plan_args(sub.add_parser("plan", help="print the bits-per-layer plan for SmolLM2 at a budget"))
    rep = sub.add_parser("report", help="write the kernel report of a planned SmolLM2 to files")
    _add_plan_args(rep)
    rep.add_argument("--json")
    rep.add_argument("--markdown")
    rep.add_argument("--png")
    bench = sub.add_parser("bench", help="time one layer step on this device")
    for name, default in (("m", 512), ("k", 1024), ("n", 1024), ("rank", 16), ("iters", 5)):
        bench.add_argument(f"--{name}", type=int, default=default)
    bench.add_argument("--bits", type=float, default=2.0, choices=sorted(_BENCH_WIDTHS))
    return parser


def main(argv: list[str] | None = None) -> None:
    from . import demo

    args = build_parser().parse_args(argv)
    {"demo": demo.run, "plan": _plan, "report": _report, "bench": _bench}[args.command](args)


if __name__ == "__main__":
    main()
