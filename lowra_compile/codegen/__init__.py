"""Codegen: Triton kernels per bit width, registered as the CUDA implementations of the `lowra::*` ops.

Public API: `register_kernels()`, `set_kernel_mode("auto"|"triton"|"reference")`, `kernel_log()`.
"""

_MODE = "auto"
_LOG: list[dict] = []


def register_kernels() -> None:
    """Register the CUDA implementations on the runtime ops (idempotent; harmless without a GPU)."""


def set_kernel_mode(mode: str) -> None:
    global _MODE
    _MODE = mode


def kernel_log() -> list[dict]:
    return list(_LOG)
