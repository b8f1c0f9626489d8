"""Keep the class of a mixture's experts that PEFT's LoRA parametrizes on every forward.

PEFT's LoRA on the experts themselves (`target_parameters`) registers a parametrization on the experts
module at each forward and removes it after. `torch.nn.utils.parametrize` gives a module a class of its
own, `Parametrized<Name>`, when it gets its first parametrization, and takes it back when the last one
goes. Dynamo guards the class of the frame's `self`, so the experts' frame compiled again on every step,
and past `torch._dynamo.config.recompile_limit` ran eagerly, each stack dequantized and kept whole.

A module that keeps one parametrization keeps its class. `hold_class` gives it one that changes nothing:
the identity, on an empty buffer of lowra's own that no state dict holds.

    before, a class per step and layer:  MixtralExperts -> ParametrizedMixtralExperts (PEFT's, step 1) ->
                                         MixtralExperts -> ParametrizedMixtralExperts (another, step 2) -> ...
    after, one class for good:           ParametrizedMixtralExperts, parametrizations = {_lowra_class_anchor}
                                         (+ PEFT's `gate_up_proj`, `down_proj` during each forward)

parametrize also makes a class per module, so Dynamo compiled the frame again for each layer too, and a
model of more layers than the recompile limit ran the rest eagerly. Held modules of one class share one.
PEFT's cached read of the stack still makes Dynamo compile the frame once per layer, on the first step:
`recompile_limit` is raised to leave room for every layer held.

`release_class` takes the anchor off again (`lowra_compile.merge` and `materialize` do), so the model
given back has its own class. A held module pickles (`torch.save(model)`) as its own class without the
anchor: parametrize's class is nobody's to import, and refuses pickling; the next compile holds it again.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from .recompile_room import count_layer

ANCHOR = "_lowra_class_anchor"


class _Identity(nn.Module):
    def forward(self, anchor: torch.Tensor) -> torch.Tensor:
        return anchor


def hold_peft_experts(modules: Iterable[nn.Module]) -> None:
    """Hold the class of every module among `modules` that PEFT's LoRA parametrizes: the base layer of each
    of PEFT's `ParamWrapper`s (a target parameter's owner), and any module PEFT parametrizes now (during the
    forward of its wrapper)."""
    for module in modules:
        if type(module).__name__ == "ParamWrapper" and type(module).__module__.startswith("peft."):
            hold_class(module.get_base_layer())
        elif _carries_peft_lora(module):
            hold_class(module)


def _carries_peft_lora(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module) and any(_is_peft(plist) for plist in module.parametrizations.values())


def _is_peft(parametrizations: nn.ModuleList) -> bool:
    return any(type(p).__module__.startswith("peft.") for p in parametrizations)


# a module's own class -> the parametrized class that every held module of it shares
_SHARED: dict[type, type] = {}


def hold_class(module: nn.Module) -> None:
    """Give `module` a parametrization of its own, the identity on an empty buffer, so that its class stays
    the same when PEFT removes its own after a forward; and the same class as every other module of its own
    class held before, so that one compiled frame serves every layer. Idempotent."""
    if parametrize.is_parametrized(module, ANCHOR):
        return
    module.register_buffer(ANCHOR, torch.empty(0), persistent=False)
    parametrize.register_parametrization(module, ANCHOR, _Identity())
    # parametrize keeps the buffer as `parametrizations._lowra_class_anchor.original`, a persistent one
    module.parametrizations[ANCHOR]._non_persistent_buffers_set.add("original")
    now = type(module)
    # a module with parametrizations of its own (weight_norm, ...) keeps its class: another module's
    # properties for them would shadow its plain parameters of those names
    shareable = all(name == ANCHOR or _is_peft(plist) for name, plist in module.parametrizations.items())
    shared = _SHARED.setdefault(now.__bases__[0], now) if shareable else now
    if shareable:
        shared.__reduce_ex__ = _pickled_without_anchor
    if shared is not now:
        # parametrize reads each parametrized tensor through a property of the class: those of this forward
        # (PEFT's, which PEFT deletes from the class after it) move along
        for name in module.parametrizations:
            setattr(shared, name, vars(now)[name])
        module.__class__ = shared
    # PEFT reads the stack under `parametrize.cached()`, whose cache key is `id(module)`: Dynamo guards each
    # layer's experts by identity and compiles their frame once per layer (the same graph; first step only)
    count_layer(now.__bases__[0], module)


def _pickled_without_anchor(module: nn.Module, protocol: int):
    """`__reduce_ex__` of a held class: the module rebuilt as its own class, without the anchor (and without
    PEFT's parametrizations, which are there only during a forward: should one be, parametrize refuses)."""
    if set(module.parametrizations) != {ANCHOR}:
        return object.__reduce_ex__(module, protocol)
    state = dict(vars(module))
    state["_modules"] = {name: m for name, m in module._modules.items() if name != "parametrizations"}
    state["_non_persistent_buffers_set"] = module._non_persistent_buffers_set - {ANCHOR}
    return _unpickled_module, (type(module).__bases__[0], state)


def _unpickled_module(cls: type, state: dict) -> nn.Module:
    module = cls.__new__(cls)
    module.__setstate__(state)
    return module


def release_class(model: nn.Module) -> None:
    """Take the anchor of `hold_class` off every module of `model`, which gets its own class back when no
    other parametrization is left. By hand, not `remove_parametrizations`: that deletes the anchor's
    property from the shared class, which the other held modules still read."""
    for module in model.modules():
        if parametrize.is_parametrized(module, ANCHOR):
            del module.parametrizations[ANCHOR]
            if not parametrize.is_parametrized(module):
                delattr(module, "parametrizations")
                module.__class__ = module.__class__.__bases__[0]
