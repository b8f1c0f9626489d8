"""Room in Dynamo's recompile limit for a frame that lowra makes compile once per layer.

Dynamo compiles one code object at most `torch._dynamo.config.recompile_limit` times (8 by default) and runs
it eagerly after that, on every call. Three cases compile a frame once per layer:
- a graph break inside a repeated module's forward (a decoder layer, its MLP), when the backend quantizes
  on its first call: the frame's graph takes the layer's weights as inputs, and each layer's weights are
  still dense Parameters when its turn comes, while the graphs compiled for the layers before expect
  `ReleasedWeight`s (`backend`);
- PEFT's LoRA on a mixture's experts: PEFT's cached read of the stack keys on `id(module)`, which Dynamo
  guards (`experts_class`);
- a new model of a class compiled before, each in its turn (a sweep over budgets in one process): the
  graphs compiled for the models before expect `ReleasedWeight`s where the new one still has dense
  Parameters, and Dynamo keeps those graphs after their models are freed (their guards hold no reference to
  the model), so they still take room.
The first two happen on the first step only. Past the limit the other layers would keep their dense
weights, or run unfused, for good (and the ninth model of a sweep would train dense, silently). Raising the
limit leaves room for each layer the frame compiled for, freed or not, plus the default's room for other
recompiles; lowra never lowers it.

    a graph break in each MLP of a 12-layer model, compiled straight away (tiny Llama, 2.0 bits):
        before:  layers 1-8 packed and fused, layers 9-12 dense and unfused (Dynamo: "hit recompile_limit")
        after:   all 12 packed and fused; later steps compile nothing
    ten tiny PEFT models built, compiled, trained one step and freed, one after the other:
        before:  models 1-8 packed, models 9 and 10 dense
        after:   all 10 packed
"""

from __future__ import annotations

import weakref
from typing import Hashable

import torch

DEFAULT_LIMIT = 8  # torch._dynamo.config.recompile_limit's default
# A frame compiled once per layer on the training step compiles once per layer again for each other grad
# mode and phase it runs in: a mixture with LoRA on its experts, trained, then evaluated with and without
# grad, compiled its experts' frame 3 times per layer (24 on 8 layers), and transformers' deprecation
# wrapper, one frame for the many functions it wraps, 13 times on 2 layers; at one per layer the evaluation
# ran every stack eagerly, dequantized whole (measured 2026-12-04).
COMPILES_PER_LAYER = 4

# a frame -> its live layers, and how many layers it compiled for, freed ones included
_LIVE: dict[Hashable, weakref.WeakValueDictionary[int, object]] = {}
_COMPILED: dict[Hashable, int] = {}


def count_layer(frame: Hashable | None, layer: object) -> None:
    """The frame `frame` (its code object, or what else names it) compiles for `layer` (its first weight, its
    module): once it has compiled for more than one layer, leave room for `COMPILES_PER_LAYER` compiles per
    layer it compiled for (a freed model's still take room in Dynamo's cache), plus the default's room for
    other recompiles.
    A live layer counted again counts once. Never lowers the limit; `frame` None (no frame) counts nothing."""
    if frame is None:
        return
    live = _LIVE.setdefault(frame, weakref.WeakValueDictionary())
    if live.get(id(layer)) is not layer:
        live[id(layer)] = layer
        _COMPILED[frame] = _COMPILED.get(frame, 0) + 1
    if _COMPILED[frame] > 1:
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, COMPILES_PER_LAYER * _COMPILED[frame] + DEFAULT_LIMIT)
