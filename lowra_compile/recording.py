"""Calibrate a whole model across its graphs, for `quantize_`: the layers it runs and their statistics.

    torch.compile(model, backend=recorder)    each graph: linear_forms, match_sites; no rewrite
    per batch: model(**batch)                 every graph call records its layers under their weights
                                              (calibrate.ModelCalibration); the code between graphs runs
                                              as it always does
               output.loss                    one autograd.grad over the outputs of every layer of every graph
    -> Layers and SiteStats                   one plan over the whole model (pipeline.quantize_layers)

The backend sees one graph at a time, on its first batch. So the layers of a graph that ends before the
loss (a graph break inside the model) get no loss gradient there, a graph fed activations cannot be run
on another batch, and each graph is planned on its own budget. Here the graphs run inside the model, so
all of that works, and nothing changes until every batch has run: a graph that Dynamo runs for several
layers (a graph break inside a repeated module) records each under its own weight, and Dynamo's
recompile limit never stops a layer from being seen.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from .backend import graph_sites
from .config import LowRAConfig, skips
from .passes.calibrate import ModelCalibration, SiteStats
from .passes.pipeline import Layer, graph_layers, one_site_per_weight, planning_statistics
from .passes.release import packed_weight
from .report import dense_linear_weights

# What quantize_'s warning tells a user whose batches give no loss gradient to some layers.
MODEL_FIX = (
    "Give lowra_compile.quantize_ training batches with labels, so that the model returns a loss that every "
    "quantized layer feeds"
)


class _RecordingBackend:
    """A torch.compile backend that only records: each graph call adds its frozen linears' statistics."""

    def __init__(self, options: Mapping | LowRAConfig | None, config: LowRAConfig):
        self.options, self.config = options, config
        self.calibration = ModelCalibration(use_loss=config.calibrate == "fisher", gram=config.rounding == "gptq")
        self.layers: dict[int, Layer] = {}  # id(weight) -> its layer, in the order they first ran
        self.graph_inputs: set[int] = set()  # ids of every tensor a graph was called with

    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        gm, sites = graph_sites(gm, example_inputs, self.options, self.config)
        dense = [i for i, s in enumerate(sites) if s.packed is None]

        def run(*args):
            self.graph_inputs.update(id(a) for a in args if isinstance(a, torch.Tensor))
            if not dense:
                return gm.forward(*args)
            new = [i for i in dense if packed_weight(args[sites[i].weight_index]) is None]
            keys = {i: id(args[sites[i].weight_index]) for i in new}
            unseen = one_site_per_weight(sites, [i for i in new if keys[i] not in self.layers], keys.__getitem__)
            for layer in graph_layers(gm, sites, unseen, list(args)) if unseen else []:
                self.layers[id(layer.weight)] = layer
            return self.calibration.run(gm, sites, keys, list(args))

        return run


def record_model(
    model: torch.nn.Module, batches: Sequence[Mapping[str, Any]], options: Mapping | LowRAConfig | None,
    config: LowRAConfig,
) -> tuple[list[Layer], list[SiteStats | None], float]:
    """Run `model` on each batch (kwargs of a forward) through a recording compile.

    Returns the frozen linears it ran that are not packed yet, their statistics (None each with
    calibrate="off"), and the seconds it took."""
    if config.calibrate == "off":  # one batch finds the layers; there are no statistics to gather
        batches = batches[:1]
    recorder = _RecordingBackend(options, config)
    compiled = torch.compile(model, backend=recorder)
    start = time.perf_counter()
    try:
        with torch.enable_grad() if recorder.calibration.use_loss else torch.no_grad():
            bar = tqdm(batches, desc="lowra: calibrate", disable=not config.progress or len(batches) == 1, unit="batch")
            device = _only_device(model)
            for batch in bar:
                recorder.calibration.end_batch(compiled(**_moved(batch, device)))
    finally:
        torch._dynamo.reset()  # the recording graphs must not keep the model alive or their guards active
    _warn_outside_graphs(model, recorder.graph_inputs, config.skip)
    layers = list(recorder.layers.values())
    if not layers or config.calibrate == "off":
        return layers, [None] * len(layers), time.perf_counter() - start
    names = {id(p): n for n, p in model.named_parameters()}
    by_weight = recorder.calibration.statistics({id(layer.weight): names.get(id(layer.weight), layer.site.name)
                                                 for layer in layers})
    stats = planning_statistics([by_weight[id(layer.weight)] for layer in layers], layers, config, MODEL_FIX)
    return layers, stats, time.perf_counter() - start


def _only_device(model: torch.nn.Module) -> torch.device | None:
    """The device of all of `model`'s parameters; None when they are spread over several (a model split
    over devices moves its inputs itself, as accelerate's hooks do)."""
    devices = {p.device for p in model.parameters()}
    return devices.pop() if len(devices) == 1 else None


def _moved(batch: Mapping[str, Any], device: torch.device | None) -> Mapping[str, Any]:
    """`batch` with its tensors on `device`, as a training loop moves a DataLoader's CPU batches (item by
    item: a tokenizer's BatchEncoding is a Mapping that pytree does not open)."""
    if device is None:
        return batch
    return {k: tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, v) for k, v in batch.items()}


def _warn_outside_graphs(model: torch.nn.Module, graph_inputs: set[int], skip: tuple[str, ...]) -> None:
    """Frozen linear weights, not packed and not skipped, that no compiled graph was called with: Dynamo ran the
    code that calls them eagerly, or no batch called them. They stay dense, and `report().dense` lists them."""
    missed = [name for name, weight in dense_linear_weights(model)
              if id(weight) not in graph_inputs and not skips(skip, name)]
    if missed:
        warnings.warn(
            f"lowra: {len(missed)} frozen linear weight(s) were called in no compiled graph, so they stay dense (e.g. "
            f"{missed[0]!r}): Dynamo runs code eagerly where it cannot compile it (a graph break inside a loop, a "
            "function under torch._dynamo.disable; PEFT's LoHa and LoKr layers call their base layer so), or no "
            "batch called them. torch._dynamo.explain(model)(**batch) shows the breaks; a loop over layers or "
            "experts written out call by call, or the break moved out of it, lets lowra see them",
            stacklevel=3,
        )
