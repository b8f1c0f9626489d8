"""Let Dynamo trace PEFT's DoRA layers, so that their base linears reach the graphs lowra packs.

PEFT's DoRA forward reads its base weight through `peft.utils.integrations.dequantize_module_weight`, which
asks `type(module.weight).__module__.startswith("torchao.")`. Dynamo (torch 2.11 and 2.13) cannot trace that
call and breaks the graph there, in every DoRA layer, so the base linear runs outside any graph and keeps
its dense weight. For a weight lowra can pack (a plain floating Parameter, or one it released) the function
only returns `module.weight`; `torch._dynamo.substitute_in_graph` has Dynamo trace a stand-in that does
just that. Any other weight (bitsandbytes, HQQ, torchao) goes to PEFT's own function outside the graph, as
before. For a weight stored (in, out) (GPT-2's Conv1D) DoRA then calls `peft.utils.other.transpose`, which
makes a new Parameter of W.T, another graph break; its stand-in gives W.T detached. Eager calls are
unchanged.

PEFT is not imported for this: the stand-in is registered when `peft.tuners.lora.dora` (which calls the
function) is imported, or at once if it already is.

DoRA's layers also call `_cache_clear` on every training call: `clear()` of a cache that only eval fills
(with PEFT's `ENABLE_DORA_CACHING`), so in training an empty dict. That write is a side effect, which Dynamo
refuses inside activation checkpointing (the whole checkpointed region then runs eager and dense), and a
stand-in does not reach it, because Dynamo inlines a module's own methods without looking for one. So the
layer class gets a `_cache_clear` that clears only a cache that holds something: in eager the same, in a
graph no write at all. A PEFT without that method keeps its own; the report then names Dynamo's flag that
lets the write through (docs/design.md, "DoRA").
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from .after_import import call_after_import
from .passes.release import ReleasedWeight

_PEFT_DORA = "peft.tuners.lora.dora"
_PLAIN_WEIGHTS = (torch.nn.Parameter, ReleasedWeight, torch.Tensor)


def _register(dora: ModuleType) -> None:
    """Register the stand-ins for `dora.dequantize_module_weight` and `dora.transpose`. A PEFT whose DoRA has
    no such function, or one of another signature, is left as it is (its DoRA layers stay dense, as the
    report lists): this runs inside PEFT's import, which must not fail for it."""
    original = getattr(dora, "dequantize_module_weight", None)
    if original is None:
        return
    outside_the_graph = torch._dynamo.disable(original)  # another function: Dynamo does not substitute it again

    def dequantize_module_weight(module: torch.nn.Module) -> torch.nn.Parameter:
        weight = module.weight
        if not hasattr(module, "W_q") and type(weight) in _PLAIN_WEIGHTS:
            return weight
        return outside_the_graph(module)

    # PEFT's `transpose` of a Parameter (a weight stored (in, out), GPT-2's Conv1D) makes a new Parameter of
    # W.T, which Dynamo refuses inside a graph; W.T detached from W is the same value and, for every tensor but
    # that throwaway Parameter, the same gradients
    def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
        if not fan_in_fan_out:
            return weight
        return weight.T.detach() if isinstance(weight, torch.nn.Parameter) else weight.T

    _clear_only_a_filled_cache(getattr(dora, "DoraLinearLayer", None))
    stand_ins = [(original, dequantize_module_weight), (getattr(dora, "transpose", None), transpose)]
    for peft_function, stand_in in stand_ins:
        if peft_function is None:
            continue
        try:
            torch._dynamo.substitute_in_graph(peft_function)(stand_in)
        except (TypeError, ValueError):  # the signature differs
            continue


def _clear_only_a_filled_cache(layer: type | None) -> None:
    """Give PEFT's DoRA layer class (its subclasses inherit it) a `_cache_clear` that calls PEFT's only when the
    cache holds something (module docstring). A class without the method keeps what it has; an instance
    without a `_dora_cache` always goes to PEFT's."""
    original = getattr(layer, "_cache_clear", None)
    if original is None or getattr(original, "_clears_only_a_filled_cache", False):
        return

    @functools.wraps(original)  # PEFT's stays reachable as `__wrapped__`
    def _cache_clear(self) -> None:
        if getattr(self, "_dora_cache", True):  # a PEFT that keeps no `_dora_cache` clears as it did
            original(self)

    _cache_clear._clears_only_a_filled_cache = True
    layer._cache_clear = _cache_clear


def trace_peft_dora() -> None:
    """Register the stand-in now if PEFT's DoRA is imported, else as soon as it is."""
    call_after_import(_PEFT_DORA, _register)
