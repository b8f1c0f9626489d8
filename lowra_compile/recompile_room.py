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
from typing import Hashable

import torch

DEFAULT_LIMIT = 8  # torch._dynamo.config.recompile_limit's default

# a frame -> the layers it compiled for (weak: a freed model's layers no longer count)
_LAYERS: dict[Hashable, weakref.WeakValueDictionary[int, object]] = {}


def count_layer(frame: Hashable | None, layer: object) -> None:
    """The frame `frame` (its code object, or what else names it) compiles for `layer` (its first weight, its
    module): when it compiled for other live layers before, leave room for one compile per layer, plus the
    default's room for other recompiles. Never lowers the limit; `frame` None (no frame) counts nothing."""
    if frame is None:
        return
    layers = _LAYERS.setdefault(frame, weakref.WeakValueDictionary())
    layers[id(layer)] = layer
    if len(layers) > 1:
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, len(layers) + DEFAULT_LIMIT)
