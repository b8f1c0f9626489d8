"""`peft_tracing`: Dynamo traces PEFT's DoRA through lowra's stand-in for plain weights only, whichever of PEFT
and lowra_compile is imported first, and a PEFT without the function it stands in for imports as before; DoRA's
cache is cleared only when it holds something."""

import subprocess
import sys
import types

import pytest
import torch

from lowra_compile import peft_tracing

from .tiny_models import batch, tiny_peft_llama


class _ForeignWeight(torch.nn.Parameter):
    """A weight class of another library (bitsandbytes' Params4bit, say): PEFT's own function dequantizes it."""


def test_a_dora_layer_on_a_weight_of_another_class_goes_through_peft_s_function_outside_the_graph():
    model = tiny_peft_llama(use_dora=True, layers=1)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    layer.weight = _ForeignWeight(layer.weight.detach(), requires_grad=False)
    assert torch._dynamo.explain(model)(**batch(8)).graph_break_count >= 1


@pytest.mark.parametrize("imports", [("lowra_compile", "peft"), ("peft", "lowra_compile")])
def test_peft_s_dora_is_traced_whichever_of_peft_and_lowra_is_imported_first(imports):
    script = (
        f"import {imports[0]}\nimport {imports[1]}\nimport torch\n"
        "from peft.utils.integrations import dequantize_module_weight\n"
        "layer = torch.nn.Linear(4, 4)\n"
        "f = torch.compile(lambda m: dequantize_module_weight(m) * 2, backend='eager', fullgraph=True)\n"
        "assert torch.equal(f(layer), layer.weight * 2)\n"
        "from peft.tuners.lora.dora import DoraLinearLayer\n"
        "assert DoraLinearLayer._cache_clear._clears_only_a_filled_cache\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)


def test_a_peft_without_the_function_or_with_another_signature_is_left_as_it_is():
    def dequantize_module_weight(module, adapter):  # another signature
        return module.weight * 3

    changed = types.ModuleType("peft_of_another_version")
    changed.dequantize_module_weight = dequantize_module_weight
    peft_tracing._register(changed)  # no error: PEFT's import goes on
    peft_tracing._register(types.ModuleType("peft_without_it"))
    layer = torch.nn.Linear(4, 4)
    traced = torch.compile(lambda m: changed.dequantize_module_weight(m, None), backend="eager", fullgraph=True)
    assert torch.equal(traced(layer), layer.weight * 3)  # its own body, not lowra's stand-in


def test_dora_s_cache_is_cleared_only_when_it_holds_something_and_the_class_is_changed_once():
    class Layer:
        clears = 0

        def __init__(self):
            self._dora_cache = {}

        def _cache_clear(self):
            self.clears += 1
            getattr(self, "_dora_cache", {}).clear()

    peft_tracing._clear_only_a_filled_cache(Layer)
    changed = Layer._cache_clear
    peft_tracing._clear_only_a_filled_cache(Layer)
    assert Layer._cache_clear is changed and changed.__wrapped__.__name__ == "_cache_clear"
    layer = Layer()
    layer._cache_clear()
    assert layer.clears == 0  # an empty cache: nothing written, so nothing for Dynamo to refuse
    layer._dora_cache["weight-norm-default"] = torch.ones(2)  # eval with PEFT's DoRA caching on
    layer._cache_clear()
    assert layer.clears == 1 and layer._dora_cache == {}
    del layer._dora_cache  # a PEFT that keeps its cache elsewhere clears as it did
    layer._cache_clear()
    assert layer.clears == 2


def test_a_dora_layer_class_without_a_cache_clear_is_left_as_it_is():
    class Layer:
        pass

    peft_tracing._clear_only_a_filled_cache(Layer)
    peft_tracing._clear_only_a_filled_cache(None)
    assert not hasattr(Layer, "_cache_clear")
