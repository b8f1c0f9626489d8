"""Shared pieces of the speed benchmarks: timing, environment, weights at a bit budget, JSON output.

Timing on CUDA uses triton.testing.do_bench (CUDA events, L2 flushed between runs, median); on CPU
(--quick smoke runs) a wall-clock median. Results go to --out, else $OUT (the GPU machine's output
folder), else benchmarks/results/, as <name>_<device>_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

import lowra_compile
from lowra_compile.codegen.dequant import free_scratch
from lowra_compile.runtime.synthetic import random_packed_weight

RESULTS = Path(__file__).parent / "results"
# Width mixes whose average is the budget (rows take the widths in turn): what a plan at that budget
# looks like to the kernels, which only see how many rows each width has.
WIDTH_MIX = {1.5: (1, 2), 2.0: (1, 2, 3), 3.0: (2, 3, 4), 4.0: (4,)}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: a CPU smoke test of the script")
    p.add_argument("--out", type=Path, help="JSON path (default: $OUT or benchmarks/results/)")
    return p


def device_and_dtype(quick: bool) -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    if not quick:
        raise SystemExit("this benchmark needs a CUDA GPU; use --quick for a CPU smoke test")
    return torch.device("cpu"), torch.float32


def bench(fn: Callable[[], object], device: torch.device, quick: bool = False) -> float:
    """Median milliseconds of one call of `fn`."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(2 if quick else 10):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn, device: torch.device) -> float | None:
    """Memory one call adds at its peak over what was allocated before it (CUDA only). The dequant paths' dense
    scratch buffers (`codegen.dequant.scratch`, kept between calls) are released first, so that a path which
    needs one counts it: it stays allocated as long as the model runs that path."""
    if device.type != "cuda":
        return None
    free_scratch()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def packed_at_budget(n: int, k: int, bits: float, device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Random packed tensors of an [n, k] weight whose rows average `bits` code bits."""
    return packed_widths(n, k, WIDTH_MIX[bits], device, dtype, seed)


@functools.cache
def packed_widths(n: int, k: int, widths: tuple[int, ...], device: torch.device, dtype: torch.dtype,
                  seed: int = 0) -> list[torch.Tensor]:
    """Random packed tensors of an [n, k] weight whose rows take `widths` in turn. Built once per process and
    argument set (the ops only read them): packing runs on the CPU, ~30 s for a Mixtral expert stack, which a
    benchmark would otherwise pay again per token count, rank or M on the GPU machine's clock."""
    return random_packed_weight(n, k, widths, group_size=64, dtype=dtype, device=device, seed=seed).tensors()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@functools.cache
def code_digest() -> str:
    """A digest of lowra_compile's sources: which code a result ran with, also where the tree is no git clone
    (the GPU machine gets a copy of the working tree)."""
    package = Path(lowra_compile.__file__).parent
    h = hashlib.blake2b(digest_size=6)
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    import triton

    return {"device": device_name(device), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton.__version__, "host": platform.node(), "code": code_digest(),
            # the baselines' versions (PEFT's LoRA and DoRA layers, bitsandbytes' NF4 kernels), read without importing
            **{p: _version(p) for p in ("transformers", "peft", "bitsandbytes")}}


def write_json(name: str, result: dict, out: Path | None) -> Path:
    """Write `result` (which holds "env") and return the path."""
    if out is None:
        folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
        slug = re.sub(r"[^a-z0-9]+", "-", result["env"]["device"].lower()).strip("-")
        out = folder / f"{name}_{slug}_{result['env']['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return out


RESULT = "RESULT "


def print_result(row: dict) -> None:
    """Print a variant's row from its own process, for `variant_in_process` to read back."""
    print(RESULT + json.dumps(row), flush=True)


def variant_in_process(cmd: list[str], variant: str, timeout: float | None = None) -> dict:
    """Run `cmd` (a benchmark script told to run one variant) in its own process, so that its peak memory
    and compiled graphs are its own, and return the row it printed with `print_result` (else the error;
    past `timeout` seconds the process is killed and the row says so)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    return json.loads(lines[-1][len(RESULT):]) if lines else {"variant": variant, "error": proc.stderr[-3000:]}


@functools.cache
def bnb_available() -> bool:
    """bitsandbytes imports and quantizes here (a wheel without binaries for this CUDA imports with a
    warning, then fails on the first quantization)."""
    if not torch.cuda.is_available():
        return False
    try:
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.ones(64, 64, device="cuda", dtype=torch.bfloat16), quant_type="nf4")
    except Exception:  # missing, or built without support for this GPU's CUDA
        return False
    return True
