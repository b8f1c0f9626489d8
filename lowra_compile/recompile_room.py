"""Room in Dynamo's recompile limit for a frame that lowra makes compile once per layer.

Dynamo compiles one code object at most `torch._dynamo.config.recompile_limit` times (8 by default) and runs
it eagerly after that, on every call. Two cases compile a frame once per layer, on the first step only:
- a graph break inside a repeated module's forward (a decoder layer, its MLP), when the backend quantizes
  on its first call: the frame's graph takes the layer's weights as inputs, and each layer's weights are
  still dense Parameters when its turn comes, while the graphs compiled for the layers before expect
  `ReleasedWeight`s (`backend`);
- PEFT's LoRA on a mixture's experts: PEFT's cached read of the stack keys on `id(module)`, which Dynamo
  guards (`experts_class`).
Past the limit the other layers would keep their dense weights, or run unfused, for good. Raising the limit
leaves room for each layer plus the default's room for other recompiles; lowra never lowers it.

    a graph break in each MLP of a 12-layer model, compiled straight away (tiny Llama, 2.0 bits):
        before:  layers 1-8 packed and fused, layers 9-12 dense and unfused (Dynamo: "hit recompile_limit")
        after:   all 12 packed and fused; later steps compile nothing
"""

from __future__ import annotations

import weakref
from types import CodeType

import torch

DEFAULT_LIMIT = 8  # torch._dynamo.config.recompile_limit's default

# a frame's code -> the first weight each of its compiles quantized (weak: a freed model's layers no longer count)
_LAYERS_QUANTIZED: dict[CodeType, weakref.WeakValueDictionary[int, torch.Tensor]] = {}


def leave_room(compiles: int) -> None:
    """Let one frame compile `compiles` times, plus the default's room for other recompiles."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, compiles + DEFAULT_LIMIT)


def count_layer_quantized(code: CodeType | None, weight: torch.Tensor) -> None:
    """A compile of the frame `code` quantized weights never seen before, `weight` the first of them: when the
    frame compiled for other layers' weights before, leave room for one compile per layer."""
    if code is None:
        return
    layers = _LAYERS_QUANTIZED.setdefault(code, weakref.WeakValueDictionary())
    layers[id(weight)] = weight
    if len(layers) > 1:
        leave_room(len(layers))
