"""Codegen: Triton kernels per bit width, registered as the device implementations of the `lowra::*` ops.

    dequant.py         packed weight -> dense rows in original order (memory-bound, one launch per bit group)
    dora_norm.py       DoRA's weight norm ||W + s B A|| per row from the packed weight, W never stored
    lora_gemm.py       C = X Wt + alpha S Bt + bias in one GEMM (forward, and dx = dy W + dS A)
    lora_grad.py       dS = alpha dy B and dB = alpha dy^T S from one read of dy
    fused_small_m.py   dequant in the GEMM main loop for small M, LoRA folded in, rows scattered via perm
    grouped_gemm.py    a mixture's stacked experts: dequant inside each expert's GEMM, forward and dx
    gptq_block.py      one 128-column block of GPTQ rounding in one launch (quantizing, not training)
    select.py          kernel mode, tile configs, selection table and autotune per shape bucket
    log.py             the kernel log the report reads (optionally timed)
    register.py        the op implementations and their registration

Public API: `register_kernels()`, `set_kernel_mode("auto"|"triton"|"reference")`, `kernel_log()`,
`clear_log()`, `set_timing(on)`, `free_scratch()`; selection tables: `measured()`, `save_table()`.
"""

from .dequant import free_scratch
from .log import clear_log, kernel_log, set_timing
from .register import register_kernels
from .select import kernel_mode, measured, save_table, set_kernel_mode

__all__ = [
    "clear_log", "free_scratch", "kernel_log", "kernel_mode", "measured", "register_kernels", "save_table",
    "set_kernel_mode", "set_timing",
]
