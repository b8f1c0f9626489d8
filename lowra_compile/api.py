"""Ahead-of-time helpers around the backend: quantize a model in place, and give dense weights back."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .config import LowRAConfig
from .passes.calibrate import more_batches
from .passes.release import ReleasedWeight, materialize_weight


def quantize_(
    model: torch.nn.Module,
    example_batch: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    config: LowRAConfig | Mapping | None = None,
) -> torch.nn.Module:
    """Run the `lowra` pipeline on `model` now, calibrating on `example_batch` (kwargs of one forward), or
    on every batch of a list of them.

    The same thing happens on the first call of `torch.compile(model, backend="lowra")`; this helper
    does it eagerly (inner compiler "eager"), so the model can be saved, inspected or reported before
    training. A list calibrates on more tokens than fit in one batch: the batches (same kwargs, same
    shapes) run one at a time and their statistics are summed, at the memory of one; below 3 bits more
    tokens give a better plan and rounding (docs/accuracy.md). The model's frozen linear weights are
    packed and released in place; returns `model`.
    """
    batches = [example_batch] if isinstance(example_batch, Mapping) else list(example_batch)
    _check_batches(batches)
    options = LowRAConfig.from_options(config).replace(inner="eager")
    compiled = torch.compile(model, backend="lowra", options=options)
    with more_batches(batches[0], batches[1:]):
        compiled(**batches[0])
    torch._dynamo.reset()  # the throwaway graph must not keep the model alive or its guards active
    return model


def _check_batches(batches: list) -> None:
    """Every calibration batch must be a mapping of the first one's kwargs, tensors of the same shapes and
    dtypes: the graph is compiled for the first."""
    if not batches:
        raise ValueError("lowra: quantize_ needs at least one example batch (kwargs of a forward call)")
    first = batches[0]
    for b, batch in enumerate(batches[1:], start=1):
        if not isinstance(batch, Mapping) or batch.keys() != first.keys():
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"lowra: calibration batch {b} has kwargs {got}, the first {sorted(first)}; give every "
                             "batch the same kwargs")
        for name, value in first.items():
            other = batch[name]
            alias = next((k for k, v in first.items() if v is value and isinstance(v, torch.Tensor)), name)
            if alias != name and batch[alias] is not other and not torch.equal(batch[alias], other):
                # the graph reads such kwargs as one input, fed by the first of them
                raise ValueError(f"lowra: calibration batch {b}'s {name!r} differs from its {alias!r}, which are one "
                                 f"tensor in the first batch; give the first batch its own {name!r} tensor")
            if isinstance(value, torch.Tensor):
                same = isinstance(other, torch.Tensor) and (other.shape, other.dtype, other.device) == (
                    value.shape, value.dtype, value.device)
            else:
                same = other == value
            if not same:
                raise ValueError(f"lowra: calibration batch {b}'s {name!r} is {_show(other)}, the first batch's "
                                 f"{_show(value)}; every batch must match the first (split the data into equal batches)")


def _show(value: Any) -> str:
    return f"{tuple(value.shape)} {value.dtype} on {value.device}" if isinstance(value, torch.Tensor) else repr(value)


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
