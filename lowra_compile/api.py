"""Ahead-of-time helpers around the backend: quantize a model in place, and give dense weights back."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .config import LowRAConfig
from .experts_class import hold_peft_experts, release_class
from .passes.pipeline import quantize_layers
from .passes.ddp_names import leave_out_of_ddp_sync
from .passes.release import ReleasedWeight, materialize_weight, release
from .recording import record_model
from .wrappers import bare_model


def quantize_(
    model: torch.nn.Module,
    example_batch: Mapping[str, Any] | Iterable[Mapping[str, Any]],
    config: LowRAConfig | Mapping | None = None,
) -> torch.nn.Module:
    """Quantize `model`'s frozen linear weights in place now, calibrating on `example_batch` (kwargs of one
    forward) or on every batch of a list or other iterable of them (a DataLoader: all of it, so give
    `itertools.islice(loader, n)` for its first n batches); returns `model`. A batch's tensors move to the
    model's device when its parameters are all on one, as a training loop would move them. With
    `calibrate="off"` only the first batch runs: it finds the layers, and there is nothing to measure.
    The run goes through a compile of its own, whose graphs must not keep the model alive; so it ends with
    `torch._dynamo.reset()`, and whatever was compiled before compiles again on its next call.

    The backend does the same on the first call of `torch.compile(model, backend="lowra")`, one graph at a
    time on that call's batch. This helper runs the whole model on each batch first (training batches with
    labels: it weighs errors by the gradient of the model's loss), through all its graphs and the code
    between them, then plans every layer under one budget. So it calibrates on more tokens than fit in one
    batch (the batches run one at a time, at the memory of one; below 3 bits more tokens give a better plan
    and rounding: docs/accuracy.md), and across graph breaks. Then save, inspect or report the model, or
    compile it: `torch.compile(model, backend="lowra")` finds the packed weights and quantizes nothing again.
    """
    if torch.is_inference_mode_enabled():  # its packed tensors would be inference tensors, which training refuses
        raise ValueError("lowra: quantize_ cannot run under torch.inference_mode(): the packed base would be made of "
                         "inference tensors, which autograd cannot save for training; call it outside (no_grad is fine)")
    if not isinstance(example_batch, (Mapping, Iterable)):
        raise ValueError(f"lowra: quantize_ takes a batch (the kwargs of a forward call, e.g. {{'input_ids': ids, "
                         f"'labels': ids}}) or a list or iterable of them, not a {type(example_batch).__name__}")
    batches = [example_batch] if isinstance(example_batch, Mapping) else list(example_batch)
    _check_batches(batches)
    options = config
    config = LowRAConfig.from_options(options)
    if config.skip != LowRAConfig().skip:  # the default, lm_head, is for the models that have one
        _warn_unmatched_skip(model, config.skip)
    hold_peft_experts(model.modules())  # one class for every layer's experts: one compiled frame serves all
    layers, stats, seconds = record_model(model, batches, options, config)
    if layers:
        inner = bare_model(model)  # the module DDP wraps, inside a torch.compile wrapper
        quantize_layers(layers, stats, config, list(inner.modules()), batches=len(batches), calibrate_seconds=seconds)
        for layer in layers:
            release(layer.weight)
        leave_out_of_ddp_sync(inner)
    return model


def _warn_unmatched_skip(model: torch.nn.Module, skip: tuple[str, ...]) -> None:
    """A `skip` entry that is part of no name keeps nothing dense; a typo, or a name from before PEFT wrapped the
    model, would quantize the layer it meant with no word (and an entry replaces the default, lm_head)."""
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_modules()]
    for entry in skip:
        if not any(entry in name for name in names):
            example = next((f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)), "")
            warnings.warn(
                f"lowra: skip entry {entry!r} is part of no parameter or module name of this model, so it keeps "
                f"nothing dense; give a part of a name as the model has it now, e.g. {example!r} (a PEFT model's "
                "names start with 'base_model.model.', and a LoRA layer's weight ends in '.base_layer.weight')",
                stacklevel=3,
            )


def _check_batches(batches: list) -> None:
    if not batches:
        raise ValueError("lowra: quantize_ needs at least one example batch (kwargs of a forward call)")
    for b, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise ValueError(f"lowra: calibration batch {b} is a {type(batch).__name__}; give each batch as the "
                             "kwargs of a forward call (a dict, e.g. {'input_ids': ids, 'labels': ids})")


def materialize(model: torch.nn.Module) -> torch.nn.Module:
    """Give every released weight of `model` its dense (dequantized) storage and plain Parameter class, and
    every module whose class lowra held (`experts_class`) its own class."""
    for p in model.parameters():
        if isinstance(p, ReleasedWeight):
            materialize_weight(p)
    leave_out_of_ddp_sync(bare_model(model))
    release_class(model)
    return model


def merge(model: torch.nn.Module) -> torch.nn.Module:
    """Fold the LoRA adapters into dense weights: dequantize the base, then PEFT's `merge_and_unload`.

    Returns the merged plain transformers model (dense, in the base weights' dtype), ready for export or
    for quantizing again with a new `torch.compile(..., backend="lowra")`. Every `module.compile(...)` of
    the PEFT model and its modules (what the Trainer holds; each decoder layer compiled on its own) is
    undone: the next call (`trainer.evaluate()`) would otherwise quantize the merged weights again, in
    place, and the returned model with them. A `torch.compile(model)` wrapper cannot be undone: call the
    returned model, not the wrapper.
    """
    base = bare_model(model)
    if not hasattr(base, "merge_and_unload"):  # before materializing: a refused model stays packed
        raise ValueError("lowra: merge needs a PEFT model (it has no merge_and_unload); use materialize() instead")
    materialize(model)
    for module in base.modules():
        module._compiled_call_impl = None  # nn.Module.compile's compiled call; None: the module runs eagerly
    return base.merge_and_unload()
