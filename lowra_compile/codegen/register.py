"""The device implementations of the `lowra::*` ops, registered on the runtime's custom ops.

CUDA tensors run the Triton kernels (or cuBLAS pieces) that `select` chooses; mode "reference" sends
them to `runtime.reference`. CPU tensors take the reference too, unless LOWRA_FORCE_TRITON=1 and the
kernels were built for the interpreter (TRITON_INTERPRET=1 before lowra_compile is imported): then the
real kernels run on the CPU tensors, which is how CI tests them. Fake tensors always take the
reference (the interpreter cannot trace), and so does anything the kernels do not cover (float64, bf16
in the interpreter, a group size that is not a power of two, no tokens). Every call is logged.

Precision: every product runs in x's dtype with fp32 accumulation, as autocast would run it, also when
the adapters are fp32 (PEFT's default next to a bf16 base); results take the dtypes the fake functions
promise (y: promote(x, A); dx: grad's; dx_lora: x_lora's; dA, dB: the adapters'). With fp32 adapters
that rounds S, dS and the adapters to bf16 inside the products, where the reference computes the
LoRA terms in fp32; an fp32 GEMM at 7B shapes would cost more than the whole bf16 step.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..runtime import ops as _ops  # noqa: F401  (defines the ops registered on below)
from ..runtime import reference
from . import log, select
from .dequant import bit_groups, dequantize, scratch
from .dora_norm import dora_row_norms
from .fused_small_m import fused_small_m
from .grouped_gemm import grouped_dx, grouped_forward
from .gptq_block import gptq_block
from .lora_gemm import lora_gemm
from .lora_grad import lora_dys_dyb
from .select import REFERENCE, Choice

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read when the kernels above were decorated
_registered = False


def _use_triton(t: Tensor, dtype: torch.dtype, group_size: int, m: int) -> bool:
    """For the ops on packed weights: the Triton kernels address absmax groups of a power-of-two size."""
    return not group_size & (group_size - 1) and _triton_runs(t, dtype, m)


def _triton_runs(t: Tensor, dtype: torch.dtype, m: int) -> bool:
    """Whether a Triton kernel may run on `t` here: kernel mode, device, dtype, not fake, not empty."""
    if select.kernel_mode() == "reference" or torch._subclasses.fake_tensor.is_fake(t) or m == 0:
        return False
    if t.device.type == "cuda":
        return dtype in (torch.float16, torch.bfloat16, torch.float32)
    if t.device.type != "cpu" or os.environ.get("LOWRA_FORCE_TRITON") != "1":
        return False
    if not INTERPRETED:
        raise RuntimeError("lowra: LOWRA_FORCE_TRITON=1 on CPU needs TRITON_INTERPRET=1 set before importing lowra_compile")
    return dtype in (torch.float16, torch.float32)  # the interpreter has no bf16 arithmetic


def _bits(packed: list[Tensor]) -> dict[int, int]:
    return {bits: rows for bits, _, rows, _, _ in bit_groups(packed)}


def _whole_weight_op(op: str, kernel: str, packed: list[Tensor], k: int, group_size: int, dtype: torch.dtype,
                     rank: int, reference_fn: Callable[[], Tensor], kernel_fn: Callable[..., Tensor], **counts) -> Tensor:
    """An op with one kernel over the whole packed weight (no shape buckets, nothing to choose): the kernel
    with its tiles where a Triton kernel runs, else the reference; logged either way."""
    n, device = packed[0].shape[0], packed[0].device
    if not _use_triton(packed[0], dtype, group_size, n):
        return log.record(op, REFERENCE, 0, k, n, rank, _bits(packed), reference_fn, device, **counts)
    choice = Choice(op, "", "gpu" if device.type == "cuda" else "interp")
    tiles = choice.tiles(kernel, device)
    return log.record(op, choice, 0, k, n, rank, _bits(packed), lambda: kernel_fn(**tiles), device, **counts)


def dequant_impl(packed: list[Tensor], k: int, group_size: int, dtype: torch.dtype) -> Tensor:
    nbytes = sum(t.numel() * t.element_size() for t in packed) + packed[0].shape[0] * k * dtype.itemsize
    return _whole_weight_op(
        "dequant", "dequant", packed, k, group_size, dtype, 0,
        lambda: reference.dequantize(packed, k, group_size, dtype),
        lambda **tiles: dequantize(packed, k, group_size, dtype, **tiles), nbytes=nbytes,
    )


def dora_row_norms_impl(packed: list[Tensor], k: int, group_size: int, lora_a: Tensor, lora_b: Tensor,
                        scaling: float) -> Tensor:
    args = (packed, k, group_size, lora_a, lora_b, scaling)
    rank = lora_a.shape[0]
    return _whole_weight_op(
        "dora_row_norms", "dora_norm", packed, k, group_size, lora_a.dtype, rank,
        lambda: reference.dora_row_norms(*args), lambda **tiles: dora_row_norms(*args, **tiles),
        flops=2 * packed[0].shape[0] * k * (rank + 1),
    )


def _forward(c: Choice, x2: Tensor, xl2: Tensor | None, packed: list[Tensor], group_size: int, bias: Tensor | None,
             lora_a: Tensor | None, lora_b: Tensor | None, scaling: float, out_dtype: torch.dtype) -> Tensor:
    k, n, cd = x2.shape[1], packed[0].shape[0], x2.dtype
    s = xl2.to(cd) @ lora_a.t().to(cd) if lora_a is not None else None  # S = x_lora A^T: its own GEMM
    if c.path == "fused-small-m":
        return fused_small_m(x2, packed, group_size, bias, s, lora_b, scaling, out_dtype, **c.tiles("fused", x2.device))
    w = dequantize(packed, k, group_size, cd, out=scratch(n, k, cd, x2.device), **c.tiles("dequant", x2.device))
    if c.gemm == "cublas":
        y = F.linear(x2, w, bias)
        return (y if s is None else y.addmm_(s, lora_b.t().to(cd), alpha=scaling)).to(out_dtype)
    return lora_gemm(x2, w.t(), s, None if s is None else lora_b.t(), scaling, bias, out_dtype, **c.tiles("gemm", x2.device))


def lora_linear_impl(x: Tensor, x_lora: Tensor, packed: list[Tensor], group_size: int, bias: Tensor | None,
                     lora_a: Tensor | None, lora_b: Tensor | None, scaling: float) -> Tensor:
    k, n = x.shape[-1], packed[0].shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    rank = lora_a.shape[0] if lora_a is not None else 0
    flops = 2 * m * n * k + 2 * m * rank * (k + n)
    if not _use_triton(x, x.dtype, group_size, m):
        return log.record("lora_linear", REFERENCE, m, k, n, rank, _bits(packed), lambda: reference.lora_linear(
            x, x_lora, packed, group_size, bias, lora_a, lora_b, scaling), x.device, flops=flops)
    xl2 = x_lora.reshape(-1, k) if lora_a is not None else None
    out_dtype = reference.lora_output_dtype(x, lora_a)

    def run(c: Choice) -> Tensor:
        return _forward(c, x2, xl2, packed, group_size, bias, lora_a, lora_b, scaling, out_dtype)

    choice = select.choose("forward", m, k, n, rank, x.device, run)
    y = log.record("lora_linear", choice, m, k, n, rank, _bits(packed), lambda: run(choice), x.device, flops=flops)
    return y.view(*x.shape[:-1], n)


def _backward(c: Choice, grad: Tensor, x_lora: Tensor, packed: list[Tensor], group_size: int, k: int,
              lora_a: Tensor | None, lora_b: Tensor | None, scaling: float, need_dx: bool, merge_dx: bool,
              cd: torch.dtype):
    n = packed[0].shape[0]
    g2 = grad.reshape(-1, n).to(cd)
    ds, dx_lora, da, db = None, reference.no_output(grad), reference.no_output(grad), reference.no_output(grad)
    if lora_a is not None:
        xl2 = x_lora.reshape(-1, k).to(cd)  # PEFT casts x_lora to fp32 adapters: the products stay in x's dtype
        s = xl2 @ lora_a.t().to(cd)
        if c.gemm == "triton":  # dS and dB from one read of dy
            ds32, db32 = lora_dys_dyb(g2, s, lora_b, scaling, **c.tiles("grad", grad.device))
            ds, db = ds32.to(cd), db32.to(lora_b.dtype)
        else:
            ds, db = scaling * (g2 @ lora_b.to(cd)), (scaling * (g2.t() @ s)).to(lora_b.dtype)
        da = (ds.t() @ xl2).to(lora_a.dtype)
        if not merge_dx:
            dx_lora = (ds @ lora_a.to(cd)).view(x_lora.shape).to(x_lora.dtype)
    dx = reference.no_output(grad)
    if need_dx:
        w = dequantize(packed, k, group_size, cd, out=scratch(n, k, cd, grad.device), **c.tiles("dequant", grad.device))
        fold = merge_dx and lora_a is not None  # dx = dy W + dS A: the LoRA term as extra K-steps
        if c.gemm == "triton":
            dx = lora_gemm(g2, w, ds if fold else None, lora_a if fold else None, 1.0, None, grad.dtype, **c.tiles("gemm", grad.device))
        else:
            dx = g2 @ w
            dx = (dx.addmm_(ds, lora_a.to(cd)) if fold else dx).to(grad.dtype)
        dx = dx.view(*grad.shape[:-1], k)
    return dx, dx_lora, da, db


def lora_linear_backward_impl(grad: Tensor, x_lora: Tensor, packed: list[Tensor], group_size: int, k: int,
                              lora_a: Tensor | None, lora_b: Tensor | None, scaling: float, need_dx: bool,
                              merge_dx: bool, compute_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n = packed[0].shape[0]
    m = grad.numel() // n
    rank = lora_a.shape[0] if lora_a is not None else 0
    flops = (2 * m * n * k if need_dx else 0) + 2 * m * rank * (3 * k + 2 * n)  # S, dA, dS A and dS, dB
    args = (grad, x_lora, packed, group_size, k, lora_a, lora_b, scaling, need_dx, merge_dx, compute_dtype)
    if not _use_triton(grad, compute_dtype, group_size, m):
        return log.record("lora_linear_backward", REFERENCE, m, k, n, rank, _bits(packed),
                          lambda: reference.lora_linear_backward(*args), grad.device, flops=flops)

    def run(c: Choice):
        return _backward(c, *args)

    choice = select.choose("backward", m, k, n, rank, grad.device, run)
    return log.record("lora_linear_backward", choice, m, k, n, rank, _bits(packed), lambda: run(choice), grad.device, flops=flops)


def run_grouped(c: Choice, x: Tensor, offsets: Tensor, packed: list[Tensor], group_size: int, experts: int, k: int,
                backward: bool) -> Tensor:
    """A mixture's experts under choice c: y = grouped(x, W^T) (forward) or dx = grouped(dy, W) (backward).
    What the grouped ops run once a choice is made (benchmarks/grouped_step.py times each choice with it)."""
    if c.path == "fused-grouped":
        tiles = c.tiles("grouped", x.device)
        if backward:
            return grouped_dx(x, offsets, packed, group_size, experts, k, **tiles)
        return grouped_forward(x, offsets, packed, group_size, experts, **tiles)
    n = packed[0].shape[0]
    w = dequantize(packed, k, group_size, x.dtype, out=scratch(n, k, x.dtype, x.device), **c.tiles("dequant", x.device))
    w = w.view(experts, -1, k)
    return reference.per_expert_mm(x, w if backward else w.transpose(1, 2), offsets)


def _grouped_impl(op: str, x: Tensor, offsets: Tensor, packed: list[Tensor], group_size: int, experts: int,
                  k: int) -> Tensor:
    """Shared by the forward (x [M, K]) and the backward (x = dy [M, N/E]); n is the whole stack's rows."""
    m, n = x.shape[0], packed[0].shape[0]
    backward = op == "grouped_linear_backward"
    flops = 2 * m * k * n // experts
    if not _use_triton(x, x.dtype, group_size, m):
        fn = reference.grouped_linear_backward if backward else reference.grouped_linear
        args = (x, offsets, packed, group_size, experts) + ((k,) if backward else ())
        return log.record(op, REFERENCE, m, k, n, 0, _bits(packed), lambda: fn(*args), x.device, flops=flops)

    def run(c: Choice) -> Tensor:
        return run_grouped(c, x, offsets, packed, group_size, experts, k, backward)

    choice = select.choose("grouped_backward" if backward else "grouped_forward", m, k, n, 0, x.device, run)
    return log.record(op, choice, m, k, n, 0, _bits(packed), lambda: run(choice), x.device, flops=flops)


def grouped_linear_impl(x: Tensor, offsets: Tensor, packed: list[Tensor], group_size: int, experts: int) -> Tensor:
    return _grouped_impl("grouped_linear", x, offsets, packed, group_size, experts, x.shape[-1])


def grouped_linear_backward_impl(grad: Tensor, offsets: Tensor, packed: list[Tensor], group_size: int, experts: int,
                                 k: int) -> Tensor:
    return _grouped_impl("grouped_linear_backward", grad, offsets, packed, group_size, experts, k)


def gptq_block_impl(weight: Tensor, scale: Tensor, levels: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    n, b = weight.shape  # logged as K = the block's columns, N = its rows
    if not _triton_runs(weight, weight.dtype, n) or weight.dtype != torch.float32 or b > 128 or levels.shape[1] > 16:
        return log.record("gptq_block", REFERENCE, 0, b, n, 0, {},
                          lambda: reference.gptq_block(weight, scale, levels, u), weight.device)
    choice = Choice("gptq_block", "", "gpu" if weight.device.type == "cuda" else "interp")
    return log.record("gptq_block", choice, 0, b, n, 0, {}, lambda: gptq_block(weight, scale, levels, u), weight.device)


def register_kernels() -> None:
    """Attach the implementations above to the runtime ops for CUDA and CPU (idempotent, fine without a GPU)."""
    global _registered
    if _registered:
        return
    for op, fn in (("lowra::dequant", dequant_impl), ("lowra::dora_row_norms", dora_row_norms_impl),
                   ("lowra::lora_linear", lora_linear_impl),
                   ("lowra::lora_linear_backward", lora_linear_backward_impl), ("lowra::gptq_block", gptq_block_impl),
                   ("lowra::grouped_linear", grouped_linear_impl),
                   ("lowra::grouped_linear_backward", grouped_linear_backward_impl)):
        torch.library.register_kernel(op, ("cuda", "cpu"), fn)
    _registered = True
