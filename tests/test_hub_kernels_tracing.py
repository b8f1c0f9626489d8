"""`hub_kernels_tracing`: a layer wrapped by the `kernels` package's `use_kernelized_func` (transformers 5.25's
Llama attention) compiles inside activation checkpointing without a graph break, computes what it did, and a
layer given a hub kernel still runs that kernel when compiled; whichever of transformers and lowra_compile is
imported first."""

import subprocess
import sys
from types import MethodType

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lowra_compile.hub_kernels_tracing import routes_nothing

kernels = pytest.importorskip("kernels")
layer_module = pytest.importorskip("kernels._internals.layer.layer")
if not hasattr(layer_module, "_ACTIVE_KERNEL_FUNCS"):
    pytest.skip("this kernels stores no routes (before 0.19)", allow_module_level=True)


@kernels.use_kernel_forward_from_hub("LowraTestScale")
def scale(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@kernels.use_kernelized_func(scale)
class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scale(self.linear(x))


def _give_a_hub_kernel(layer: Scaled) -> None:
    """What `kernels.kernelize` does to a layer it finds a kernel for: the private wrapper's forward is replaced."""
    kernel_func = layer._kernel_funcs["LowraTestScale"]
    kernel_func.forward = MethodType(lambda self, x: x * 3, kernel_func)


def test_only_routes_to_the_functions_own_forward_route_nothing():
    layer = Scaled()
    kernel_func = layer._kernel_funcs["LowraTestScale"]
    assert routes_nothing({1: (kernel_func, type(kernel_func).forward)})
    _give_a_hub_kernel(layer)
    assert not routes_nothing({1: (kernel_func, kernel_func.forward.__func__)})
    assert not routes_nothing(None) and not routes_nothing({1: "a route of another form"})


def test_a_kernelized_func_layer_compiles_inside_checkpointing_in_one_graph_and_computes_the_same():
    layer, x = Scaled(), torch.randn(3, 4, requires_grad=True)
    compiled = torch.compile(lambda x: checkpoint(layer, x, use_reentrant=False), backend="aot_eager", fullgraph=True)
    compiled(x).sum().backward()
    expected_grad, x.grad = x.grad, None
    layer(x).sum().backward()
    torch.testing.assert_close(expected_grad, x.grad)


def test_a_layer_given_a_hub_kernel_runs_it_when_compiled():
    layer, x = Scaled(), torch.randn(3, 4)
    _give_a_hub_kernel(layer)
    compiled = torch.compile(layer, backend="eager")
    torch.testing.assert_close(compiled(x), layer.linear(x) * 3)


@pytest.mark.parametrize("imports", [("lowra_compile", "transformers"), ("transformers", "lowra_compile")])
def test_the_routes_are_changed_whichever_of_transformers_and_lowra_is_imported_first(imports):
    script = (
        f"import {imports[0]}\nimport {imports[1]}\nimport kernels._internals.layer.layer as layer\n"
        "assert layer._ACTIVE_KERNEL_FUNCS.set._skips_routes_that_change_nothing\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
