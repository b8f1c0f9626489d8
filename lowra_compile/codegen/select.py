"""Which kernel path and tile config runs for a shape: kernel mode, config lists, selection table, autotune.

Paths (the kernel log and the report name them):
    "fused-small-m"   forward only: dequant inside the GEMM main loop (fused_small_m.py), W never stored
    "dequant+gemm"    dequant into a scratch buffer (dequant.py), then a GEMM with the LoRA term folded in:
                      gemm "triton" = lora_gemm.py (and lora_grad.py for dS, dB in the backward),
                      gemm "cublas" = torch.matmul + addmm for the base and LoRA pieces
    "reference"       runtime.reference (pure torch): mode "reference", CPU, fake tensors, unsupported input
A mixture's stacked experts (ops "grouped_forward", "grouped_backward") have two paths of their own:
    "fused-grouped"       dequant inside each expert's GEMM (grouped_gemm.py), the stack never stored
    "dequant+grouped mm"  the whole stack dequantized into a scratch buffer, then torch's grouped product
                          (a product per expert where it refuses the operands)

A choice is made once per (device, op, M bucket, K, N, rank bucket) and cached for the process:
  1. the selection table (JSON; `benchmarks/layer_step.py --write-table` fills it on a GPU) names the
     measured winner for that bucket on that device;
  2. otherwise, on CUDA, a small autotune times every candidate (path x config) with do_bench and keeps
     the fastest; `measured()` returns these results so a benchmark can save them as a table;
  3. otherwise (the interpreter on CPU, or LOWRA_AUTOTUNE=0) a fixed rule: forward with M <= SMALL_M
     takes the fused path, everything else dequant+gemm with Triton; the grouped ops take the fused
     path up to M = SMALL_M rows in all. Interpreter runs use tiny tiles.
Mode "triton" drops the cuBLAS GEMMs of the LoRA ops (a mixture's "dequant+grouped mm" stays: it is the
grouped ops' only path for many rows); mode "reference" never gets here.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

MODES = ("auto", "triton", "reference")
PATHS = ("fused-small-m", "dequant+gemm")
SMALL_M = 256  # the fused path is a candidate up to here; above it the layer is compute-bound
TABLE_PATH = Path(__file__).with_name("selection_table.json")

# Tile configs. GPU starting points from docs/kernels.md (LoRAFusion's and gemlite's H100 configs,
# num_stages 1-2 always tried for packed weights); "interp" is for the CPU interpreter, where every
# program runs in Python and small tiles keep tests fast.
FUSED_CONFIGS = {
    "n64-k128-w4-s2": dict(block_n=64, block_k=128, num_warps=4, num_stages=2, lut="where"),
    "n128-k64-w4-s3": dict(block_n=128, block_k=64, num_warps=4, num_stages=3, lut="where"),
    "n128-k128-w8-s1-gather": dict(block_n=128, block_k=128, num_warps=8, num_stages=1, lut="gather"),
    "interp": dict(block_n=32, block_m=16, block_k=32),
}
GEMM_CONFIGS = {
    "128x256x64-w8-s3": dict(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
    "128x128x64-w8-s4": dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4),
    "64x128x64-w4-s4": dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
    "interp": dict(block_m=16, block_n=32, block_k=32, group_m=2),
}
DEQUANT_CONFIGS = {"gpu": dict(block_r=16, block_k=256, num_warps=4), "interp": dict(block_r=16, block_k=64)}
DORA_NORM_CONFIGS = {"gpu": dict(block_r=16, block_k=128, num_warps=4), "interp": dict(block_r=16, block_k=64)}
# grouped_gemm.py, forward and dx alike: BLOCK_N rows of W per tile (the forward's output, the dx
# reduction), BLOCK_K columns (the forward's reduction, dx's output)
GROUPED_CONFIGS = {
    "m16-n64-k128-w4-s2": dict(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=2),
    "m64-n64-k128-w4-s2": dict(block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=2),
    "m128-n128-k64-w8-s3": dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    "interp": dict(block_m=16, block_n=16, block_k=32),
}
GROUPED_PATHS = ("fused-grouped", "dequant+grouped mm")
GRAD_CONFIGS = {"gpu": dict(block_m=64, block_n=128, num_warps=8, num_stages=3), "interp": dict(block_m=16, block_n=32)}


@dataclass(frozen=True)
class Choice:
    """One way to run an op: path, GEMM backend ("triton" / "cublas", dequant+gemm only), config name."""

    path: str
    gemm: str = ""
    config: str = ""

    def label(self) -> str:
        return self.path + "".join(f" {p}" for p in (self.gemm, self.config) if p)

    def tiles(self, kernel: str, device: torch.device) -> dict:
        """Keyword arguments of one launcher ("fused", "gemm", "grouped", "dequant", "dora_norm", "grad") under
        this choice.

        Off CUDA the kernels run in the interpreter, which always gets the tiny "interp" tiles."""
        gpu = device.type == "cuda"
        if kernel in ("fused", "gemm", "grouped"):
            configs = {"fused": FUSED_CONFIGS, "gemm": GEMM_CONFIGS, "grouped": GROUPED_CONFIGS}[kernel]
            return configs[self.config if gpu else "interp"]
        configs = {"dequant": DEQUANT_CONFIGS, "dora_norm": DORA_NORM_CONFIGS, "grad": GRAD_CONFIGS}[kernel]
        return configs["gpu" if gpu else "interp"]


REFERENCE = Choice("reference")
GROUPED_DEQUANT = Choice("dequant+grouped mm")
_mode = "auto"
_chosen: dict[tuple, Choice] = {}
_measured: list[dict] = []
_table: list[dict] | None = None


def set_kernel_mode(mode: str) -> None:
    """"auto" (table / autotune per shape bucket), "triton" (no cuBLAS GEMM for the LoRA ops) or "reference"
    (pure torch)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"lowra: kernels={mode!r} is not one of {MODES}")
    if mode != _mode:
        _chosen.clear()
    _mode = mode


def kernel_mode() -> str:
    return _mode


def device_name(device: torch.device) -> str:
    """The key a selection table is measured under: the GPU's name, or the device type."""
    return _cuda_name(device.index or 0) if device.type == "cuda" else device.type


@functools.cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def bucket_key(op: str, m: int, k: int, n: int, rank: int) -> tuple:
    """M and the rank round up to a power of two; K and N are exact (few distinct layer shapes)."""
    return (op, 1 << max(m - 1, 0).bit_length(), k, n, 1 << max(rank - 1, 0).bit_length() if rank else 0)


def candidates(op: str, m: int, device: torch.device) -> list[Choice]:
    if device.type != "cuda":
        return [_rule(op, m, gpu=False)]
    if op.startswith("grouped"):
        return [Choice("fused-grouped", "", c) for c in GROUPED_CONFIGS if c != "interp"] + [GROUPED_DEQUANT]
    gemms = [Choice("dequant+gemm", "triton", c) for c in GEMM_CONFIGS if c != "interp"]
    if _mode == "auto":
        gemms.append(Choice("dequant+gemm", "cublas"))
    fused = [Choice("fused-small-m", "", c) for c in FUSED_CONFIGS if c != "interp"]
    return (fused if op == "forward" and m <= SMALL_M else []) + gemms


def _rule(op: str, m: int, gpu: bool) -> Choice:
    """The fixed choice without a table or autotune: the fused paths for few rows, else dequant+gemm; a GPU's
    default tiles, or the interpreter's."""
    if op.startswith("grouped"):
        return Choice("fused-grouped", "", "m16-n64-k128-w4-s2" if gpu else "interp") if m <= SMALL_M else GROUPED_DEQUANT
    if op == "forward" and m <= SMALL_M:
        return Choice("fused-small-m", "", "n64-k128-w4-s2" if gpu else "interp")
    return Choice("dequant+gemm", "triton", "128x128x64-w8-s4" if gpu else "interp")


def choose(op: str, m: int, k: int, n: int, rank: int, device: torch.device, run: Callable[[Choice], object]) -> Choice:
    """The choice for this shape bucket: table, else autotune (CUDA), else the rule; cached per process."""
    key = (device_name(device), *bucket_key(op, m, k, n, rank))
    if key in _chosen:
        return _chosen[key]
    allowed = candidates(op, m, device)
    choice = _table_choice(key, allowed)
    if choice is None and device.type == "cuda" and os.environ.get("LOWRA_AUTOTUNE", "1") != "0" and len(allowed) > 1:
        choice = _autotune(key, allowed, run)
    _chosen[key] = choice or (allowed[0] if device.type != "cuda" else _rule(op, m, gpu=True))
    return _chosen[key]


def _autotune(key: tuple, allowed: list[Choice], run: Callable[[Choice], object]) -> Choice:
    """Time every candidate; one that fails to compile or launch (a config too big for this GPU) is skipped."""
    from triton.testing import do_bench

    times, error = {}, None
    for c in allowed:
        try:
            times[c] = do_bench(lambda c=c: run(c), warmup=5, rep=20, return_mode="median")
        except Exception as e:  # noqa: BLE001  (any compile or launch failure of that one config)
            times[c], error = float("inf"), e
    best = min(times, key=times.get)
    if times[best] == float("inf"):
        raise error
    device, op, m, k, n, r = key
    _measured.append(dict(device=device, op=op, m=m, k=k, n=n, r=r, **asdict(best), time_ms=times[best],
                          candidates={c.label(): None if math.isinf(t) else t for c, t in times.items()}))
    return best


def _table_choice(key: tuple, allowed: list[Choice]) -> Choice | None:
    device, op = key[:2]
    for e in load_table():
        if _entry_key(e) == key:
            choice = Choice(e["path"], e.get("gemm", ""), e.get("config", ""))
            if choice in allowed or (device == "cpu" and choice.path in _paths(op)):  # CPU: any path, interp tiles
                return choice
    return None


def _entry_key(e: dict) -> tuple:
    return e["device"], e["op"], e["m"], e["k"], e["n"], e["r"]


def _paths(op: str) -> tuple[str, ...]:
    """The paths that can run `op`: the fused small-M path has no backward."""
    if op.startswith("grouped"):
        return GROUPED_PATHS
    return PATHS if op == "forward" else tuple(p for p in PATHS if p != "fused-small-m")


def load_table() -> list[dict]:
    """Entries of the selection table: $LOWRA_SELECTION_TABLE, else `selection_table.json` next to this module
    when present (none ships yet: docs/kernels.md)."""
    global _table
    if _table is None:
        path = Path(os.environ.get("LOWRA_SELECTION_TABLE", TABLE_PATH))
        _table = json.loads(path.read_text())["entries"] if path.exists() else []
    return _table


def measured() -> list[dict]:
    """Selection-table entries autotuned in this process (what `save_table` writes)."""
    return [dict(e) for e in _measured]


def save_table(path: str | Path, entries: list[dict], note: str = "") -> None:
    """Write entries as a selection table (merged over the entries already in that file)."""
    path = Path(path)
    old = json.loads(path.read_text())["entries"] if path.exists() else []
    keys = {_entry_key(e) for e in entries}
    kept = [e for e in old if _entry_key(e) not in keys]
    path.write_text(json.dumps({"note": note, "entries": kept + entries}, indent=1) + "\n")


def forget_choices() -> None:
    """Forget the cached choices but keep the measurements: the next call of each bucket chooses again (a
    benchmark timing several bit mixes of one shape, which share a bucket, tunes each)."""
    _chosen.clear()


def reset() -> None:
    """Forget cached choices, measurements and the loaded table (the next call re-reads $LOWRA_SELECTION_TABLE)."""
    global _table
    forget_choices()
    _measured.clear()
    _table = None
