import gc

import torch

from lowra_compile.recompile_room import DEFAULT_LIMIT, count_layer


def _code():
    def forward():
        pass

    return forward.__code__


def test_a_frame_that_quantizes_a_second_layer_leaves_room_for_one_compile_per_layer():
    code = _code()
    layers = [torch.empty(1) for _ in range(3)]
    with torch._dynamo.config.patch(recompile_limit=2):
        count_layer(code, layers[0])
        assert torch._dynamo.config.recompile_limit == 2  # one layer: a frame compiled once, nothing to do
        count_layer(code, layers[1])
        count_layer(code, layers[2])
        assert torch._dynamo.config.recompile_limit == 3 + DEFAULT_LIMIT
        count_layer(None, layers[0])  # no frame (a direct call of the backend)
        assert torch._dynamo.config.recompile_limit == 3 + DEFAULT_LIMIT


def test_a_freed_model_s_layers_no_longer_count_and_the_limit_is_never_lowered():
    code = _code()
    count_layer(code, torch.empty(1))  # freed at once
    gc.collect()
    with torch._dynamo.config.patch(recompile_limit=2):
        count_layer(code, torch.empty(1))  # the only live layer of this frame
        assert torch._dynamo.config.recompile_limit == 2
    layers = [torch.empty(1) for _ in range(3)]
    with torch._dynamo.config.patch(recompile_limit=100):
        for layer in layers:
            count_layer(code, layer)
        assert torch._dynamo.config.recompile_limit == 100
