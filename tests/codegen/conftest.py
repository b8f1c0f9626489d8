"""Kernel tests run the real Triton kernels; without a GPU they run in the interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1 there before anything imports triton)."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 is exact up to summation order; fp16 rounds the dot operands (W, x, S, B) to 11 bits
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture
def tol():
    return TOL


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def forced_kernels(monkeypatch):
    """The ops run their registered Triton kernels (on CPU: the interpreter), with a fresh selection and log."""
    from lowra_compile import codegen
    from lowra_compile.codegen import select

    if not torch.cuda.is_available():
        monkeypatch.setenv("LOWRA_FORCE_TRITON", "1")
    select.reset()
    codegen.clear_log()
    yield
    codegen.set_kernel_mode("auto")
    codegen.set_timing(False)
    select.reset()
