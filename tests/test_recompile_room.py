import gc

import torch

import lowra_compile
from lowra_compile.recompile_room import COMPILES_PER_LAYER, DEFAULT_LIMIT, count_layer

from .tiny_models import batch, tiny_peft_llama


def _frame():
    """A frame of its own for each test (code objects of one function compare equal: the counts would add up)."""
    return object()


def test_a_frame_that_quantizes_a_second_layer_leaves_room_for_the_compiles_of_each_layer():
    frame = _frame()
    layers = [torch.empty(1) for _ in range(3)]
    with torch._dynamo.config.patch(recompile_limit=2):
        count_layer(frame, layers[0])
        assert torch._dynamo.config.recompile_limit == 2  # one layer: a frame compiled once, nothing to do
        count_layer(frame, layers[1])
        count_layer(frame, layers[2])
        assert torch._dynamo.config.recompile_limit == 3 * COMPILES_PER_LAYER + DEFAULT_LIMIT
        count_layer(None, layers[0])  # no frame (a direct call of the backend)
        assert torch._dynamo.config.recompile_limit == 3 * COMPILES_PER_LAYER + DEFAULT_LIMIT


def test_a_freed_model_s_layers_still_count_a_layer_counted_again_counts_once_and_the_limit_is_never_lowered():
    frame = _frame()
    count_layer(frame, torch.empty(1))  # freed at once: Dynamo keeps what the frame compiled for it
    gc.collect()
    with torch._dynamo.config.patch(recompile_limit=2):
        layer = torch.empty(1)
        count_layer(frame, layer)
        assert torch._dynamo.config.recompile_limit == 2 * COMPILES_PER_LAYER + DEFAULT_LIMIT
        count_layer(frame, layer)
        assert torch._dynamo.config.recompile_limit == 2 * COMPILES_PER_LAYER + DEFAULT_LIMIT
    layers = [torch.empty(1) for _ in range(3)]
    with torch._dynamo.config.patch(recompile_limit=100):
        for layer in layers:
            count_layer(frame, layer)
        assert torch._dynamo.config.recompile_limit == 100


def test_models_of_one_class_compiled_one_after_another_are_all_packed():
    # a sweep over budgets in one process: each model's first call compiles the frame anew, and the graphs of
    # the freed models before it keep their room in Dynamo's cache (the default limit of 8 reached sooner)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2):
        for bits in (1.5, 2.0, 3.0):
            model = tiny_peft_llama(layers=1)
            compiled = torch.compile(model, backend="lowra", options={"bits": bits, "progress": False, "inner": "eager"})
            compiled(**batch(16)).loss.backward()
            assert len(lowra_compile.report(compiled).layers) == 7, bits
            del model, compiled
            gc.collect()
