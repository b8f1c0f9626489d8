"""Ahead-of-time helpers around the backend: quantize a model in place, and give dense weights back."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .config import LowRAConfig
from .passes.release import ReleasedWeight, materialize_weight


def quantize_(model: torch.nn.Module, example_batch: Mapping[str, Any], config: LowRAConfig | Mapping | None = None) -> torch.nn.Module:
    """Run the `lowra` pipeline on `model` now, calibrating on `example_batch` (kwargs of one forward).

    The same thing happens on the first call of `torch.compile(model, backend="lowra")`; this helper
    does it eagerly (inner compiler "eager"), so the model can be saved, inspected or reported before
    training. The model's frozen linear weights are packed and released in place; returns `model`.
    """
    options = LowRAConfig.from_options(config).replace(inner="eager")
    compiled = torch.compile(model, backend="lowra", options=options)
    compiled(**example_batch)
    torch._dynamo.reset()  # the throwaway graph must not keep the model alive or its guards active
    return model


def materialize(model: torch.nn.Module) -> torch.nn.Module:
    """Give every released weight of `model` its dense (dequantized) storage and plain Parameter class."""
    for p in model.parameters():
        if isinstance(p, ReleasedWeight):
            materialize_weight(p)
    return model


def merge(model: torch.nn.Module) -> torch.nn.Module:
    """Fold the LoRA adapters into dense weights: dequantize the base, then PEFT's `merge_and_unload`.

    Returns the merged plain transformers model (dense, in the base weights' dtype), ready for export or
    for quantizing again with a new `torch.compile(..., backend="lowra")`.
    """
    materialize(model)
    base = getattr(model, "_orig_mod", model)
    if not hasattr(base, "merge_and_unload"):
        raise ValueError("lowra: merge needs a PEFT model (it has no merge_and_unload); use materialize() instead")
    return base.merge_and_unload()
