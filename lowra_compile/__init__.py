"""lowra-compile: `torch.compile(model, backend="lowra")` for LoRA on 1-4 bit mixed-precision base weights.

    model = torch.compile(peft_model, backend="lowra", options={"bits": 2.0})
    ...train as usual...
    print(lowra_compile.report(model))
"""

import torch

from . import codegen, runtime
from .api import materialize, merge, quantize_
from .backend import lowra_backend
from .checkpoint import load_quantized, save_quantized
from .config import LowRAConfig
from .hub_kernels_tracing import trace_hub_kernel_layers
from .peft_tracing import trace_peft_dora
from .report import KernelReport, report

codegen.register_kernels()
trace_peft_dora()
trace_hub_kernel_layers()

# An installed package publishes the backend through its `torch_dynamo_backends` entry point, which
# list_backends() already includes; a source checkout on PYTHONPATH has none, so register it here.
if "lowra" not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(lowra_backend, name="lowra")

__all__ = ["KernelReport", "LowRAConfig", "lowra_backend", "materialize", "merge", "quantize_", "report", "runtime", "load_quantized", "save_quantized"]
