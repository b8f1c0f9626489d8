"""The `lowra` command: demo, plan, report, bench.

    lowra demo                     2-bit LoRA fine-tune of the packaged SmolLM2 (perplexities + report)
    lowra plan --bits 1.5          quantize SmolLM2 at a budget, calibrated on Bible text; print the plan
    lowra report --bits 2 --json r.json --markdown r.md --png r.png   same, written to files
    lowra bench --m 64 --k 1024 --n 1024 --bits 2                      time one layer step on this device
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import time
from pathlib import Path

import torch

from .config import CALIBRATION, INNER_COMPILERS, LowRAConfig


def _at_least(text: str, minimum: int, why: str = "") -> int:
    value = int(text)  # argparse reports the ValueError of a non-number as "invalid <type's name> value"
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}{why}; got {value}")
    return value


def _count(text: str) -> int:
    """argparse type: a whole number of at least 1 (windows, batches, steps, sizes)."""
    return _at_least(text, 1)


def _window(text: str) -> int:
    """argparse type: tokens per window, at least 2 (a window of one token has no next token to predict)."""
    return _at_least(text, 2, ", a token and the next one to predict")


def _learning_rate(text: str) -> float:
    """argparse type: a finite learning rate above 0 (AdamW refuses the rest, minutes into the demo)."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0; got {text}")
    return value


def _widths(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated bit widths such as 1,2,4 (LowRAConfig checks their values)."""
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated bit widths such as 1,2,4; got {text!r}") from None


def _output_file(text: str) -> Path:
    """argparse type: a file to write, with ~ expanded (the shell leaves the ~ of --json=~/r.json alone)."""
    return Path(text).expanduser()


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=float, default=2.0, help="average code bits per weight (budget)")
    p.add_argument("--choices", type=_widths, default=(1, 2, 3, 4), help="bit widths a channel may take, comma separated")
    p.add_argument("--calibrate", default="fisher", choices=CALIBRATION,
                   help="sensitivity the plan weighs each channel's error by (README, Options)")
    p.add_argument("--window", type=_window, default=256, help="tokens per calibration window")
    # 4,096 tokens, what the demo calibrates on: below that the plan is worse and quantize_ says so
    p.add_argument("--windows", type=_count, default=16, help="calibration windows")
    p.add_argument("--batch", type=_count, default=4, help="windows per calibration batch (batches run one at a time)")


def _add_demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bits", type=float, default=2.0, help="average code bits per frozen weight (budget)")
    parser.add_argument("--rank", type=_count, default=8, help="LoRA rank")
    parser.add_argument("--steps", type=_count, default=30, help="fine-tuning steps")
    parser.add_argument("--batch-size", type=_count, default=4, help="windows per step")
    parser.add_argument("--window", type=_window, default=256, help="tokens per window (training and evaluation)")
    parser.add_argument("--eval-windows", type=_count, default=32, help="held-out windows for perplexity")
    parser.add_argument("--lr", type=_learning_rate, default=1e-3, help="AdamW learning rate")
    parser.add_argument(
        "--calib-batches", type=_count, default=4,
        help="training batches quantize_ calibrates on (more tokens: a better plan and rounding, docs/accuracy.md)",
    )
    parser.add_argument("--inner", default="eager", choices=INNER_COMPILERS,
                        help="compiler run on the rewritten graph (inductor compiles slowly on CPU)")
    parser.add_argument("--dora", action="store_true", help="PEFT's DoRA (a magnitude per output channel) instead of plain LoRA")
    parser.add_argument("--seed", type=int, default=0, help="seed of the text split, batch order, adapters and dropout")


def plan_config(args: argparse.Namespace) -> LowRAConfig:
    """The options `lowra plan` / `report` quantize with (no LoftQ: the plan is of the base alone)."""
    return LowRAConfig(bits=args.bits, bit_choices=args.choices, calibrate=args.calibrate, loftq_iters=0)


def quantize_for_plan(model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> torch.nn.Module:
    """`model` frozen and quantized in place at the budget of `args`, calibrated on the windows `ids`, in
    batches of `args.batch`."""
    from .finetune import quantize_on

    # A model loaded for training has trainable weights, which lowra leaves dense: the plan is of the base
    # that LoRA would train on, so freeze it (the loss gradient still reaches every layer: calibrate.py).
    quantize_on(model.requires_grad_(False), list(ids.split(args.batch)), plan_config(args))
    return model


def _check(args: argparse.Namespace) -> None:
    """What can be refused before the model loads (minutes): the quantizing options, the demo's calibration
    batches, the report's output files. Raises ValueError."""
    from . import demo

    try:
        if args.command in ("plan", "report"):
            plan_config(args)
        if args.command == "demo":
            LowRAConfig.from_options(demo.options(args))
    except ValueError as e:  # named as the flags that set them
        raise ValueError(re.sub(r"\bbit_choices\b", "--choices", re.sub(r"\bbits=", "--bits=", str(e)))) from e
    if args.command == "demo":
        if args.calib_batches > args.steps:
            raise ValueError(f"--calib-batches must lie in [1, --steps={args.steps}]; got {args.calib_batches}")
    if args.command == "report":
        outputs = [path for path in (args.json, args.markdown, args.png) if path]
        if not outputs:
            raise ValueError("give at least one of --json, --markdown, --png (lowra plan prints the plan)")
        if len({path.resolve() for path in outputs}) < len(outputs):
            raise ValueError("--json, --markdown and --png name one file twice: the second would overwrite the first")
        for path in outputs:
            _check_writable(path)
        if args.png and importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--png needs matplotlib: pip install matplotlib (or the project's [demo] extra)")


def _check_writable(path: Path) -> None:
    """Refuse an output file now, rather than after the minutes of quantizing (and the files before it)."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name in it")
    if not path.resolve().parent.is_dir():
        raise ValueError(f"the folder of {path} does not exist")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror}") from None
    if not existed:
        path.unlink()


def _planned_model(args: argparse.Namespace) -> torch.nn.Module:
    """SmolLM2 quantized in place at the requested budget, calibrated on Bible text."""
    from .smollm import load_smollm2
    from .texts import kjv_text, token_windows

    model, tokenizer = load_smollm2()
    return quantize_for_plan(model, token_windows(tokenizer, kjv_text(), window=args.window, max_windows=args.windows), args)


def _report(args: argparse.Namespace) -> None:
    """`lowra plan` and `lowra report`: print the report of a planned SmolLM2; `report` writes it to files too."""
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
    parser = argparse.ArgumentParser(prog="lowra", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo_args(sub.add_parser("demo", help="2-bit LoRA fine-tune of SmolLM2 with perplexities and the report"))
    plan = sub.add_parser("plan", help="print the bits-per-layer plan for SmolLM2 at a budget")
    _add_plan_args(plan)
    plan.set_defaults(json=None, markdown=None, png=None)  # the report's, no files
    rep = sub.add_parser("report", help="write the kernel report of a planned SmolLM2 to files")
    _add_plan_args(rep)
    rep.add_argument("--json", type=_output_file, help="write the report as JSON to this file")
    rep.add_argument("--markdown", type=_output_file, help="write the report as a Markdown table to this file")
    rep.add_argument("--png", type=_output_file, help="plot bits per layer (and kernel times) to this PNG (matplotlib)")
    bench = sub.add_parser("bench", help="time one layer step on this device")
    for name, default, meaning in (("m", 512, "tokens (rows of x)"), ("k", 1024, "input features"),
                                   ("n", 1024, "output features"), ("rank", 16, "LoRA rank"),
                                   ("iters", 5, "timed forward + backward steps, after 2 warm-up steps")):
        bench.add_argument(f"--{name}", type=_count, default=default, help=f"{meaning} (default {default})")
    bench.add_argument("--bits", type=float, default=2.0, choices=sorted(_BENCH_WIDTHS),
                       help="code bits per weight of the random packed layer; 1.5 and 2.5 mix widths (default 2.0)")
    return parser


def main(argv: list[str] | None = None) -> None:
    from . import demo

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check(args)
    except ValueError as err:
        parser.exit(2, f"{parser.prog} {args.command}: error: {str(err).removeprefix('lowra: ')} "
                       f"(see {parser.prog} {args.command} --help)\n")
    {"demo": demo.run, "plan": _report, "report": _report, "bench": _bench}[args.command](args)


if __name__ == "__main__":
    main()
