"""The kernel log: which path and config ran for each op and shape, and how fast when timing is on.

One record per (op, path/config, M, K, N, rank, bit groups), counting calls:
    {"op": "lora_linear", "path": "dequant+gemm", "gemm": "triton", "config": "128x256x64-w8-s3",
     "bits": {1: 1024, 2: 3072}, "M": 8192, "K": 4096, "N": 4096, "rank": 64, "calls": 12,
     "time_ms": 0.81, "tflops": 690.2}                      # time_ms / tflops / gbps only when timed
Timing (`set_timing(True)` or LOWRA_TIME_KERNELS=1) brackets each op call with CUDA events (wall clock
on CPU) and synchronizes, so it slows training; time_ms is the median over the timed calls, TFLOP/s
counts the op's useful FLOPs (base GEMM plus LoRA products), GB/s (dequant) the bytes read and written.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, TypeVar

import torch

from .select import Choice

T = TypeVar("T")
_MAX_SAMPLES = 101
_timing = os.environ.get("LOWRA_TIME_KERNELS") == "1"
_log: dict[tuple, dict] = {}


def set_timing(on: bool) -> None:
    """Time every op call from now on (True) or stop timing (False)."""
    global _timing
    _timing = bool(on)


def record(op: str, choice: Choice, m: int, k: int, n: int, rank: int, bits: dict[int, int],
           fn: Callable[[], T], device: torch.device, flops: int = 0, nbytes: int = 0) -> T:
    """Run `fn` (the op's implementation under `choice`), log the call, and time it when requested."""
    key = (op, choice, m, k, n, rank, tuple(bits.items()))
    entry = _log.get(key)
    if entry is None:
        entry = _log[key] = dict(op=op, path=choice.path, gemm=choice.gemm, config=choice.config, bits=dict(bits),
                                 M=m, K=k, N=n, rank=rank, calls=0, _samples=[])
    entry["calls"] += 1
    if not _timing:
        return fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
    else:
        t0 = time.perf_counter()
        out = fn()
        ms = (time.perf_counter() - t0) * 1e3
    samples = entry["_samples"]
    samples.append(ms)
    del samples[:-_MAX_SAMPLES]
    entry["time_ms"] = statistics.median(samples)
    if flops:
        entry["tflops"] = flops / entry["time_ms"] / 1e9
    if nbytes:
        entry["gbps"] = nbytes / entry["time_ms"] / 1e6
    return out


def kernel_log() -> list[dict]:
    """A copy of every record, in first-call order."""
    return [{k: v for k, v in e.items() if not k.startswith("_")} for e in _log.values()]


def clear_log() -> None:
    _log.clear()
