"""Let Dynamo trace transformers' layers inside activation checkpointing again (transformers 5.25 and later).

transformers 5.25 requires the `kernels` package (0.19.1), whose `use_kernelized_func` wraps the forward of
layers such as Llama's attention. The wrapper stores this layer's kernel routes in a module-level
`_ACTIVE_KERNEL_FUNCS` for the duration of the call: a context variable in eager, but under compilation a
plain attribute of a global object (`CompileableContextVar.set`). That attribute write is a side effect,
which Dynamo refuses inside activation checkpointing ("HOP: Unsafe side effect"). The whole model's frame
then runs eager, so with gradient checkpointing on, no layer is packed and the report lists every base
weight as dense. Plain `torch.compile` loses its graphs there too; this is not lowra's doing, but lowra's
users are the ones who checkpoint.

The routes only matter for a layer that `kernels.kernelize` gave a hub kernel. For any other layer, the
compiled kernel function falls back to the plain function whether or not the routes were stored (it
compares the route's forward with its own class's forward). So under compilation, a `set` whose every route
is such a plain forward stores nothing, and its `reset` restores nothing: the graph is the same, without the
write. A model with kernelized layers stores its routes as before (and under checkpointing still breaks, as
with plain `torch.compile`). Eager calls are unchanged.

`kernels` is not imported for this: the change is made when its layer module is imported, or at once if it
is. A `kernels` without `_ACTIVE_KERNEL_FUNCS` (before 0.19) is left as it is.
"""

from __future__ import annotations

from types import ModuleType

import torch

from .after_import import call_after_import

_KERNELS_LAYER = "kernels._internals.layer.layer"
_NOTHING_STORED = object()  # the token of a `set` that stored nothing


def routes_nothing(routes: object) -> bool:
    """Whether the routes `use_kernelized_func` is about to store change no call: a dict whose every route
    is `(kernel_func, forward)` with `forward` the function class's own (no hub kernel chosen)."""
    if not isinstance(routes, dict):
        return False
    for route in routes.values():
        if not (isinstance(route, tuple) and len(route) == 2):
            return False
        kernel_func, forward = route
        if forward is not type(kernel_func).forward:
            return False
    return True


def _register(layer_module: ModuleType) -> None:
    """Give the module's `_ACTIVE_KERNEL_FUNCS` a `set` and `reset` that, while compiling, skip routes
    that change nothing (module docstring). Only that one object is changed, not its class."""
    active = getattr(layer_module, "_ACTIVE_KERNEL_FUNCS", None)
    original_set, original_reset = getattr(active, "set", None), getattr(active, "reset", None)
    if original_set is None or original_reset is None or getattr(original_set, "_skips_routes_that_change_nothing", False):
        return

    def set(routes):  # noqa: A001 - the method it stands in for
        if torch.compiler.is_compiling() and routes_nothing(routes):
            return _NOTHING_STORED
        return original_set(routes)

    def reset(token):
        if token is not _NOTHING_STORED:
            original_reset(token)

    set._skips_routes_that_change_nothing = True
    active.set, active.reset = set, reset


def trace_hub_kernel_layers() -> None:
    """Make the change now if `kernels`' layer module is imported, else as soon as it is."""
    call_after_import(_KERNELS_LAYER, _register)
