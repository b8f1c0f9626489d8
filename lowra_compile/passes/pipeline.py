"""Quantize frozen linears under one bit budget: quantize -> plan -> pack -> LoftQ -> attach packed weights.

This is the one place where the per-site passes meet the whole-model plan. Its layers come from one
graph (`quantize_sites`, the backend: calibrated on that graph's first batch) or from every graph of a
model (`quantize_layers`, called by `lowra_compile.quantize_` with the statistics of
`calibrate.ModelCalibration`). Every result is cached on the weight Parameter (`release.attach`), so a
later graph (recompile, eval, generation) finds it and never quantizes the same weight twice. In a torch.distributed job of several ranks, `replicas` averages
the statistics over the ranks and gives every rank rank 0's plan, packed weights and LoftQ adapters.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable

import torch
from torch import fx
from tqdm.auto import tqdm

from ..config import LowRAConfig
from .calibrate import SiteStats, calibrate
from .candidates import quantize_layer_cached
from .gptq import HessianFactor, LatestFactor
from .loftq import dora_magnitude, loftq_init
from .match import body_inputs, checkpoint_bodies
from .plan import plan_bits
from .quantize import CodebookFit, assemble
from .release import attach
from .replicas import average_statistics, first_rank_plan, replicated, share_first_rank
from .sites import LinearSite


def placeholder_values(gm: fx.GraphModule, example_inputs: list) -> dict[fx.Node, object]:
    """The value of every placeholder: the top-level ones, and those of checkpoint bodies fed by them."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, example_inputs))
    for call, body in checkpoint_bodies(gm):
        values.update({n: values[w] for n, w in body_inputs(call, body).items() if w in values})
    return values


def _scaling_value(scaling: float | fx.Node, values: dict[fx.Node, object]) -> float:
    """The LoRA scaling as a number: a python float, a tensor placeholder (PEFT's compiled hotswap keeps it
    a tensor), or `item()` of a placeholder under dynamic=True."""
    if not isinstance(scaling, fx.Node):
        return float(scaling)
    if scaling in values:
        return float(values[scaling])
    source = scaling.args[0] if scaling.args else None
    if isinstance(source, fx.Node) and source in values:
        return float(values[source])
    raise ValueError(f"lowra: cannot read the LoRA scaling from graph node {scaling.format_node()}")


@dataclass(frozen=True)
class Layer:
    """A frozen linear to quantize: its site, its weight and, for LoftQ, its LoRA factors and their scaling
    (scaling None: B is not zero), whether LoftQ starts them (`loftq`: B is zero and A trains; LoftQ leaves
    LoRA-FA's frozen A as it is, which it would have to move), and DoRA's magnitude, set after LoftQ (None: no
    DoRA, or B is not zero)."""

    site: LinearSite
    weight: torch.Tensor
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scaling: float | None = None
    magnitude: torch.Tensor | None = None
    loftq: bool = False


def one_site_per_weight(sites: list[LinearSite], indices: list[int], weight_of: Callable[[int], Hashable]) -> list[int]:
    """One of `indices` per weight (`weight_of(i)`): the first site with a LoRA adapter (LoftQ starts it), else
    the first site (a weight shared by two modules, an adapter on one of them)."""
    chosen: dict[Hashable, int] = {}
    for i in indices:
        j = chosen.setdefault(weight_of(i), i)
        if sites[j].adapter is None and sites[i].adapter is not None:
            chosen[weight_of(i)] = i
    return list(chosen.values())


def graph_layers(gm: fx.GraphModule, sites: list[LinearSite], indices: list[int], inputs: list) -> list[Layer]:
    """The layers of `sites[i]` for i in `indices`, with the weights and adapters among `inputs` (the graph's
    real arguments)."""
    values = placeholder_values(gm, inputs)
    layers = []
    for i in indices:
        site, weight = sites[i], inputs[sites[i].weight_index]
        # a NaN would take over its row's codebook and scale (the whole row NaN), or fail in an SVD naming nothing
        if not torch.isfinite(weight).all():
            raise ValueError(f"lowra: the weight of layer {site.name!r} holds NaN or inf; check the checkpoint it was "
                             "loaded from, or keep the layer dense with options={'skip': (<part of its name>,)}")
        adapter = site.adapter
        if adapter is None:
            layers.append(Layer(site, weight))
            continue
        lora_a, lora_b = values[adapter.lora_a], values[adapter.lora_b]
        fresh = not lora_b.any()
        scaling = _scaling_value(adapter.scaling, values) if fresh else None
        magnitude = values[adapter.magnitude] if fresh and adapter is site.dora else None
        # (a zero scaling leaves the adapter nothing to start: LoftQ divides by it)
        layers.append(Layer(site, weight, lora_a, lora_b, scaling, magnitude,
                            loftq=fresh and lora_a.requires_grad and scaling != 0))
    return layers


def planning_statistics(
    stats: list[SiteStats | None], layers: list[Layer], config: LowRAConfig, fix: str
) -> list[SiteStats | None]:
    """The statistics to plan on: a layer no calibration row reached takes those of the layers of its shape
    (`_from_layers_alike`); then, with calibrate="fisher" and a layer that no loss gradient reached, every
    layer's E[g^2] is dropped, with a warning that ends with `fix`."""
    if config.calibrate == "off":
        return stats
    stats = _from_layers_alike(stats, layers)
    if config.calibrate != "fisher":
        return stats
    missing = [layer.site.name for layer, s in zip(layers, stats) if s.g2 is None]
    if not missing:
        return stats
    # Fisher errors of some layers and activation errors of others are not comparable: use E[x^2] for all.
    warnings.warn(
        f"lowra: no loss gradient reached {len(missing)} layer(s) (e.g. {missing[0]!r}); planning on "
        f"activation-weighted error instead. {fix}",
        stacklevel=4,
    )
    return [dataclasses.replace(s, g2=None) for s in stats]


def _from_layers_alike(stats: list[SiteStats], layers: list[Layer]) -> list[SiteStats]:
    """A layer no calibration row reached (a mixture written as one Linear per expert, an expert no token was
    routed to), or reached only with inputs that are all zero, takes the pooled E[x^2] and the mean E[g^2] of
    the layers of its weight's shape that were reached, and no E[x x^T] (it is rounded to nearest), with a
    warning. None of its shape was: raise, naming it (its statistics would be all zero, and every rounding of
    it as good as any other: the plan put all its rows at the smallest width)."""
    reached: dict[tuple, list[SiteStats]] = {}
    for layer, s in zip(layers, stats):
        if _reached(s):
            reached.setdefault(tuple(layer.weight.shape), []).append(s)
    filled, unreached = [], []
    for layer, s in zip(layers, stats):
        if _reached(s):
            filled.append(s)
            continue
        name, alike = layer.site.name, reached.get(tuple(layer.weight.shape), [])
        if not alike:
            raise ValueError(
                f"lowra: layer {name!r} ran on no calibration tokens (or only on inputs that are all zero), nor did "
                f"any other layer of its shape here (a branch or an expert the batch never took, or a batch with no "
                f"rows). Quantize ahead with lowra_compile.quantize_(model, batches): it sees the whole model, "
                f"so such a layer takes the statistics of those of its shape; or keep it dense with "
                f"options={{'skip': ({name!r},)}}")
        g2 = None if any(a.g2 is None for a in alike) else sum(a.g2 for a in alike) / len(alike)
        x2 = sum(a.x2 * a.tokens for a in alike) / sum(a.tokens for a in alike)
        filled.append(dataclasses.replace(s, x2=x2, g2=g2, gram=None))
        unreached.append(name)
    if unreached:
        warnings.warn(
            f"lowra: {len(unreached)} layer(s) ran on no calibration tokens, or only on zero inputs (e.g. "
            f"{unreached[0]!r}); each is planned "
            "on the statistics of the layers of its shape and rounded to nearest. Calibrate on more tokens "
            "(lowra_compile.quantize_ takes several batches) so that every layer is reached",
            stacklevel=5,
        )
    return filled


def _reached(s: SiteStats) -> bool:
    """Whether calibration measured the layer: rows ran through it, and not only zeros."""
    return bool(s.tokens) and bool(s.x2.any())


def _graph_statistics(gm, sites, new, example_inputs, config: LowRAConfig) -> list[SiteStats | None]:
    if config.calibrate == "off":
        return [None] * len(new)
    stats = calibrate(gm, sites, example_inputs, use_loss=config.calibrate == "fisher", gram=config.rounding == "gptq")
    return [stats[i] for i in new]


# Fewer calibration tokens than this overfit the plan to one batch (SmolLM2 at 2.5 bits, fine-tuned KJV
# perplexity: 21.16 on 1,024 tokens, 20.76 on 4,096, 20.16 on 16,384; docs/accuracy.md).
ENOUGH_CALIBRATION_TOKENS = 4096


def _hint_more_calibration(stats: list[SiteStats | None], batches: int | None) -> None:
    # a mixture's experts count a token once per expert it was routed to (top-k rows): the other layers count tokens
    plain = [s.tokens for s in stats if s is not None and s.expert_tokens is None]
    tokens = max(plain or [s.tokens for s in stats if s is not None] or [0])
    counted = f"{tokens:,} {'token' if plain else 'row'}{'s' if tokens > 1 else ''}"
    if not plain:  # a graph of experts alone (a frame per layer): its rows are all there is to count
        counted += " routed to the experts, a token once per expert it takes,"
    if 0 < tokens < ENOUGH_CALIBRATION_TOKENS:
        given, fix = (
            ("the first batch", "quantize ahead on several batches with lowra_compile.quantize_(model, [batch, ...], "
             "options) before the first step") if batches is None else
            (f"{batches} batch{'es' if batches > 1 else ''}", "give lowra_compile.quantize_ more batches")
        )
        warnings.warn(
            f"lowra: calibrating on {counted} ({given}); the plan, codebooks and rounding are better on "
            f"{ENOUGH_CALIBRATION_TOKENS:,} or more (16,384-32,768 measured best): {fix}",
            stacklevel=3,
        )


def adapters_the_call_skipped(layers: list[Layer], modules: Iterable[torch.nn.Module]) -> list[Layer]:
    """`layers` with, for a PEFT LoRA layer among `modules` (the one whose `base_layer.weight` is the layer's)
    whose quantizing call ran none of its adapters (under PEFT's disable_adapter(), a reference pass before the
    first step), its first active adapter, as if the call had run it: LoftQ and DoRA's start reach the adapter
    that will train. An adapter merged into the base is quantized with it for good (it cannot be unmerged):
    warns, naming them."""
    if all(layer.site.adapter is not None for layer in layers):  # the call ran every layer's adapter
        return layers
    # LoRA's layers of a linear only: not IA3's (a base_layer too), nor LoRA on a mixture's experts (ParamWrapper,
    # whose base_layer is the experts' module)
    owners = {id(w): m for m in modules if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)
              and isinstance(w := getattr(getattr(m, "base_layer", None), "weight", None), torch.Tensor)}
    started, merged = [], []
    for layer in layers:
        module = owners.get(id(layer.weight)) if layer.site.adapter is None else None
        if module is None:
            started.append(layer)
            continue
        lora_a = module.lora_A
        merged += [layer.site.name] if module.merged_adapters else []
        adapter = next((a for a in module.active_adapters if a in lora_a), None)
        if adapter is None or module.merged_adapters:  # nothing of this layer's trains on the quantized base alone
            started.append(layer)
            continue
        a, b = lora_a[adapter].weight, module.lora_B[adapter].weight
        fresh = not b.any()
        dora = getattr(module, "lora_magnitude_vector", {})
        magnitude = dora[adapter].weight if fresh and adapter in dora else None
        # PEFT's disable_adapter() freezes every adapter until it enables them again: A trains then
        loftq = fresh and (a.requires_grad or module.disable_adapters)
        started.append(dataclasses.replace(layer, lora_a=a, lora_b=b, scaling=module.scaling[adapter] if fresh else None,
                                           magnitude=magnitude, loftq=loftq))
    if merged:
        warnings.warn(
            f"lowra: {len(merged)} PEFT layer(s) (e.g. {merged[0]!r}) have an adapter merged into the base "
            "(merge_adapter): it is quantized with the base for good and cannot be unmerged. To keep it apart, "
            "unmerge_adapter() before the first call (or lowra_compile.quantize_)",
            stacklevel=3,
        )
    return started


def _warn_dense_in_saved_run(layers: list[Layer]) -> None:
    """A layer that the run which saved the loaded packed base left dense (its `skip`) is about to be quantized:
    the base then differs from the one that run's adapters trained on."""
    dense = [(layer.site.name, layer.weight._lowra_dense_in) for layer in layers
             if hasattr(layer.weight, "_lowra_dense_in")]
    if dense:
        name, path = dense[0]
        skip = tuple(name for name, _ in dense)
        warnings.warn(
            f"lowra: {len(dense)} layer(s) (e.g. {name!r}) were left dense by the run that saved {path} (by its "
            "skip, or for a reason its report().dense gave), and are quantized now: the base is no longer the one "
            f"that run's adapters trained on. To keep them dense, compile (or quantize_) with options={{'skip': "
            f"{skip!r}}}",
            stacklevel=4,
        )


def _warn_quantized_before(layers: list[Layer], group_size: int) -> None:
    """A weight that takes at most 16 values in each group of its first rows was dequantized from 1-4 bits, as a
    state dict of a packed model holds it: quantized again, it makes another base than the one its adapters
    trained on (on a tiny Llama at 2 bits, resumed through `load_state_dict`, up to 5.6% of a layer's
    norm away, 0.8% on average)."""
    if group_size < 32:  # groups this small may hold few values in a dense weight too
        return
    names = []
    for layer in layers:
        rows = layer.weight.detach()[0] if layer.site.experts else layer.weight.detach()
        rows = rows[:, :16].t() if layer.site.transposed else rows[:16]  # (16, K), as the format packs it
        k = rows.shape[1] // group_size * group_size
        groups = rows[:, :k].reshape(-1, group_size).sort(dim=1).values
        distinct = (groups.diff(dim=1) != 0).sum(1) + 1 if k else groups.new_zeros(0)
        if distinct.numel() and 1 < distinct.max() <= 16:  # 1: a zero or constant layer, not a quantized one
            names.append(layer.site.name)
    if names:
        warnings.warn(
            f"lowra: {len(names)} layer(s) (e.g. {names[0]!r}) hold at most 16 values in each group of "
            f"{group_size}, as weights dequantized from 1-4 bits do (the state dict of a packed model holds those): "
            "quantizing them again makes another base than the one they came from. To resume on a packed base, "
            "save it with lowra_compile.save_quantized and load it with load_quantized into the fresh model, "
            "rather than through load_state_dict.",
            stacklevel=3,
        )


def site_matrix(site: LinearSite, weight: torch.Tensor) -> torch.Tensor:
    """The site's weight as the (out, in) matrix the format packs (a copy for a weight stored (in, out); a
    mixture's stacked experts [E, N, K] as [E*N, K], stored [E, K, N] as that too)."""
    if site.experts:  # rows of expert e are rows e*N .. (e+1)*N - 1; a stack stored (E, K, N) is copied
        return (weight.detach().transpose(1, 2) if site.transposed else weight.detach()).reshape(site.shape)
    return weight.detach().t().contiguous() if site.transposed else weight.detach()


def _row_moments(stats: SiteStats | None, site: LinearSite, device: torch.device) -> torch.Tensor | None:
    """E[x^2] as the quantizer takes it: [K] for a layer; for a mixture's experts [E*N, K], each row its
    expert's (a transient the size of the stack in float32, like the quantizer's own)."""
    if stats is None:
        return None
    if stats.x2.dim() == 1:
        return stats.x2.to(device)
    return stats.x2.to(device).repeat_interleave(site.shape[0] // site.experts, dim=0)


def codebook_fit(config: LowRAConfig) -> CodebookFit:
    """The options of `config` that say how each width's levels and group scales are fitted."""
    return CodebookFit(config.group_size, config.codebook, config.lloyd_iters, config.scales == "fitted")


def device_clock(device: torch.device) -> float:
    """Seconds so far, after the device's queued work: CUDA kernels run asynchronously."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _HessianFactors:
    """The Hessian factor of site i (None without E[x x^T]), built on first use: `gptq.LatestFactor` keeps
    only the latest. The E[x x^T]s wait in host memory (calibrate); each is copied to the weight's device
    for its factor."""

    def __init__(self, stats: list[SiteStats | None]):
        self.stats = stats
        self.latest = LatestFactor()

    def __call__(self, i: int, device: torch.device) -> HessianFactor | None:
        stats = self.stats[i]
        if stats is None or stats.gram is None:
            return None
        return self.latest(id(stats.gram), lambda: stats.gram.to(device), stats.tokens)


# What the backend's warning tells a user whose graph has no loss, or a graph break before it.
GRAPH_FIX = (
    "The plan is better when the first call is a training batch with labels, the model computes the loss itself "
    "(Trainer computes it from the logits, outside the model, when label_smoothing_factor or compute_loss_func "
    "is set or compute_loss is overridden, and so do trainers of preference losses; TRL's trainers replace the "
    "forward's loss with a fused LM head that breaks the graph before it), and the layers and the loss "
    "are in one graph (no graph break between them: see torch._dynamo.explain; gradient checkpointing keeps one "
    "graph when it is non-reentrant, gradient_checkpointing_kwargs={'use_reentrant': False}, and "
    "model.disable_input_require_grads() removes the hook that breaks it), or when the model is quantized "
    "ahead with lowra_compile.quantize_(model, batches), which calibrates across graph breaks"
)


@torch.no_grad()
def quantize_sites(
    gm: fx.GraphModule, sites: list[LinearSite], new: list[int], example_inputs: list, config: LowRAConfig,
    modules: Iterable[torch.nn.Module],
) -> None:
    """Quantize `sites[i]` for i in `new`, calibrated on this graph's first batch (the backend's path; `modules`:
    the model's). A weight called at several sites is one layer, planned once on the statistics of all its
    calls."""
    new = one_site_per_weight(sites, new, lambda i: sites[i].weight_index)
    layers = graph_layers(gm, sites, new, example_inputs)
    device = layers[0].weight.device
    start = device_clock(device)
    stats = planning_statistics(_graph_statistics(gm, sites, new, example_inputs, config), layers, config, GRAPH_FIX)
    quantize_layers(layers, stats, config, modules, batches=None, calibrate_seconds=device_clock(device) - start)


@torch.no_grad()
def quantize_layers(
    layers: list[Layer], stats: list[SiteStats | None], config: LowRAConfig, modules: Iterable[torch.nn.Module],
    batches: int | None, calibrate_seconds: float,
) -> None:
    """Quantize `layers` under one whole-model bit budget and attach the packed weights; `stats[j]` are
    layer j's statistics (None for all with calibrate="off"), from `batches` batches given to `quantize_`
    (None: the first batch of a compiled model); `modules` are the model's (LoftQ finds there the adapters the
    quantizing call did not run: `adapters_the_call_skipped`).

    Each weight also gets the seconds spent on it per stage (the report sums them): its own quantize,
    pack and LoftQ time, and an equal share of the calibration and the plan, which are whole-model."""
    device = layers[0].weight.device
    if replicated():
        stats = average_statistics(stats)
    _hint_more_calibration(stats, batches)
    _warn_quantized_before(layers, config.group_size)
    _warn_dense_in_saved_run(layers)
    layers = adapters_the_call_skipped(layers, modules)
    factors = _HessianFactors(stats)  # None for every layer unless rounding="gptq"
    choices, fit = config.allowed_bits, codebook_fit(config)
    seconds = [{"calibrate": calibrate_seconds / len(layers)} for _ in layers]
    candidates, errors = [], []
    for j, layer in enumerate(tqdm(layers, desc="lowra: quantize", disable=not config.progress, unit="layer")):
        site, weight = layer.site, layer.weight
        start = device_clock(weight.device)
        x2 = _row_moments(stats[j], site, weight.device)
        factor = factors(j, weight.device)
        lq = quantize_layer_cached(config.candidates_dir, site_matrix(site, weight), choices, fit, x2, factor)
        err = lq.error
        if stats[j] is not None and stats[j].g2 is not None:
            err = err * stats[j].g2.to(err.device)[:, None]
        candidates.append(lq)
        errors.append(err)
        seconds[j]["quantize"] = device_clock(weight.device) - start
    start = device_clock(device)
    bits = plan_bits(errors, [layer.site.shape[1] for layer in layers], choices, config.bits)
    if replicated():
        bits = first_rank_plan(bits)
    plan_share = (device_clock(device) - start) / len(layers)
    for row in seconds:
        row["plan"] = plan_share
    for j, layer in enumerate(tqdm(layers, desc="lowra: pack", disable=not config.progress, unit="layer")):
        site, weight = layer.site, layer.weight
        matrix = site_matrix(site, weight)
        start = device_clock(weight.device)
        factor = factors(j, weight.device)
        packed = assemble(candidates[j], matrix, bits[j], factor, config.refit_rounds)
        seconds[j]["pack"] = device_clock(weight.device) - start
        start = device_clock(weight.device)
        if layer.loftq and config.loftq_iters > 0:
            x2 = _row_moments(stats[j], site, weight.device)
            packed, a, b = loftq_init(
                matrix, packed, bits[j], layer.lora_a.shape[0], layer.scaling, config.loftq_iters, fit, x2, factor,
                config.refit_rounds,
            )
            layer.lora_a.copy_(a.to(layer.lora_a.dtype))
            layer.lora_b.copy_(b.to(layer.lora_b.dtype))
        if layer.magnitude is not None:
            layer.magnitude.copy_(dora_magnitude(packed, layer.lora_a, layer.lora_b, layer.scaling))
        seconds[j]["loftq"] = device_clock(weight.device) - start
        attach(weight, packed.to(weight.device), seconds[j], site.transposed, config.quantizing())
        candidates[j] = None  # free the candidate codes of every width as we go
    if replicated():
        adapters = [layer.lora_a for layer in layers if layer.lora_a is not None]
        adapters += [layer.lora_b for layer in layers if layer.lora_b is not None]
        adapters += [layer.magnitude for layer in layers if layer.magnitude is not None]
        share_first_rank([layer.weight for layer in layers], adapters)
