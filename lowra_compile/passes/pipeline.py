"""Quantize the new sites of a graph: calibrate -> quantize -> plan -> LoftQ -> attach packed weights.

This is the one place where the per-site passes meet the whole-model plan. Every result is cached on
the weight Parameter (`release.attach`), so a later graph (recompile, eval, generation) finds it and
never quantizes the same weight twice. In a torch.distributed job of several ranks, `replicas` averages
the statistics over the ranks and gives every rank rank 0's plan, packed weights and LoftQ adapters.
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import fx
from tqdm.auto import tqdm

from ..config import LowRAConfig
from .calibrate import SiteStats, calibrate, more_inputs
from .candidates import quantize_layer_cached
from .gptq import HessianFactor, LatestFactor
from .loftq import loftq_init
from .match import LinearSite, body_inputs, checkpoint_bodies
from .plan import plan_bits
from .quantize import assemble
from .release import attach
from .replicas import average_statistics, first_rank_plan, replicated, share_first_rank


def placeholder_values(gm: fx.GraphModule, example_inputs: list) -> dict[fx.Node, object]:
    """The value of every placeholder: the top-level ones, and those of checkpoint bodies fed by them."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, example_inputs))
    for call, body in checkpoint_bodies(gm):
        values.update({n: values[w] for n, w in body_inputs(call, body).items() if w in values})
    return values


def _scaling_value(scaling: float | fx.Node, values: dict[fx.Node, object]) -> float:
    """The LoRA scaling as a number: a python float, or `item()` of a placeholder under dynamic=True."""
    if not isinstance(scaling, fx.Node):
        return float(scaling)
    source = scaling.args[0] if scaling.args else None
    if isinstance(source, fx.Node) and source in values:
        return float(values[source])
    raise ValueError(f"lowra: cannot read the LoRA scaling from graph node {scaling.format_node()}")


def _statistics(gm, sites, new, example_inputs, others: list[list], config: LowRAConfig) -> list[SiteStats | None]:
    if config.calibrate == "off":
        return [None] * len(sites)
    stats = calibrate(
        gm, sites, example_inputs, use_loss=config.calibrate == "fisher", gram=config.rounding == "gptq",
        more_inputs=others,
    )
    if config.calibrate == "fisher":
        missing = [sites[i].name for i in new if stats[i].g2 is None]
        if missing:
            # Fisher errors of some layers and activation errors of others are not comparable: use E[x^2] for all.
            warnings.warn(
                f"lowra: no loss gradient reached {len(missing)} layer(s) (e.g. {missing[0]!r}); planning on "
                "activation-weighted error instead. The plan is better when the first call is a training batch "
                "with labels and the layers and the loss are in one graph (no graph break between them: see "
                "torch._dynamo.explain; with gradient checkpointing, model.disable_input_require_grads() "
                "removes the hook that breaks it)",
                stacklevel=3,
            )
            stats = [SiteStats(s.x2, None, s.gram, s.tokens) for s in stats]
    return stats


# Fewer calibration tokens than this overfit the plan to one batch (SmolLM2 at 2.5 bits, fine-tuned KJV
# perplexity: 21.16 on 1,024 tokens, 20.76 on 4,096, 20.16 on 16,384; docs/accuracy.md).
ENOUGH_CALIBRATION_TOKENS = 4096


def _hint_more_calibration(stats: list[SiteStats | None], batches: int) -> None:
    tokens = max((s.tokens for s in stats if s is not None), default=0)
    if 0 < tokens < ENOUGH_CALIBRATION_TOKENS:
        given, fix = (
            ("the first batch", "quantize ahead on several batches with lowra_compile.quantize_(model, [batch, ...], "
             "options) before the first step") if batches == 1 else
            (f"{batches} batches", "give lowra_compile.quantize_ more batches")
        )
        warnings.warn(
            f"lowra: calibrating on {tokens:,} tokens ({given}); the plan, codebooks and rounding are better on "
            f"{ENOUGH_CALIBRATION_TOKENS:,} or more (16,384-32,768 measured best): {fix}",
            stacklevel=3,
        )


def site_matrix(site: LinearSite, weight: torch.Tensor) -> torch.Tensor:
    """The site's weight as the (out, in) matrix the format packs (a copy for a weight stored (in, out); a
    mixture's stacked experts [E, N, K] as [E*N, K], stored [E, K, N] as that too)."""
    if site.experts:  # rows of expert e are rows e*N .. (e+1)*N - 1; a stack stored (E, K, N) is copied
        return (weight.detach().transpose(1, 2) if site.transposed else weight.detach()).reshape(site.shape)
    return weight.detach().t().contiguous() if site.transposed else weight.detach()


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


@torch.no_grad()
def quantize_sites(
    gm: fx.GraphModule, sites: list[LinearSite], new: list[int], example_inputs: list, config: LowRAConfig
) -> None:
    """Quantize `sites[i]` for i in `new` under one whole-model bit budget and attach the packed weights.

    Each weight also gets the seconds spent on it per stage (the report sums them): its own quantize,
    pack and LoftQ time, and an equal share of the calibration and the plan, which are whole-model."""
    device = example_inputs[sites[new[0]].weight_index].device
    start = device_clock(device)
    values = placeholder_values(gm, example_inputs)
    others = more_inputs(example_inputs)  # quantize_'s further calibration batches
    stats = _statistics(gm, sites, new, example_inputs, others, config)
    if replicated():
        stats = average_statistics(stats)
    _hint_more_calibration(stats, 1 + len(others))
    factors = _HessianFactors(stats)  # None for every site unless rounding="gptq"
    choices = config.allowed_bits
    calibrate_share = (device_clock(device) - start) / len(new)
    seconds = [{"calibrate": calibrate_share} for _ in new]
    layers, errors = [], []
    for j, i in enumerate(tqdm(new, desc="lowra: quantize", disable=not config.progress, unit="layer")):
        site, weight = sites[i], example_inputs[sites[i].weight_index]
        start = device_clock(weight.device)
        x2 = stats[i].x2.to(weight.device) if stats[i] is not None else None
        factor = factors(i, weight.device)
        lq = quantize_layer_cached(
            config.candidates_dir, site_matrix(site, weight), choices, config.group_size, config.codebook, x2,
            config.lloyd_iters, factor, config.scales == "fitted",
        )
        err = lq.error
        if stats[i] is not None and stats[i].g2 is not None:
            err = err * stats[i].g2.to(err.device)[:, None]
        layers.append(lq)
        errors.append(err)
        seconds[j]["quantize"] = device_clock(weight.device) - start
    start = device_clock(device)
    bits = plan_bits(errors, [sites[i].shape[1] for i in new], choices, config.bits)
    if replicated():
        bits = first_rank_plan(bits)
    plan_share = (device_clock(device) - start) / len(new)
    for row in seconds:
        row["plan"] = plan_share
    for j, i in enumerate(tqdm(new, desc="lowra: pack", disable=not config.progress, unit="layer")):
        site, weight = sites[i], example_inputs[sites[i].weight_index]
        matrix = site_matrix(site, weight)
        start = device_clock(weight.device)
        factor = factors(i, weight.device)
        packed = assemble(layers[j], matrix, bits[j], factor, config.refit_rounds)
        seconds[j]["pack"] = device_clock(weight.device) - start
        start = device_clock(weight.device)
        if site.lora is not None and config.loftq_iters > 0:
            lora_a, lora_b = values[site.lora.lora_a], values[site.lora.lora_b]
            if not lora_b.any():
                s = _scaling_value(site.lora.scaling, values)
                x2 = stats[i].x2.to(weight.device) if stats[i] is not None else None
                packed, a, b = loftq_init(
                    matrix, packed, bits[j], lora_a.shape[0], s, config.loftq_iters, config.group_size,
                    config.codebook, x2, config.lloyd_iters, factor, config.refit_rounds, config.scales == "fitted",
                )
                lora_a.copy_(a.to(lora_a.dtype))
                lora_b.copy_(b.to(lora_b.dtype))
        seconds[j]["loftq"] = device_clock(weight.device) - start
        attach(weight, packed.to(weight.device), seconds[j], site.transposed, config.quantizing())
        layers[j] = None  # free the candidate codes of every width as we go
    if replicated():
        adapters = [values[sites[i].lora.lora_a] for i in new if sites[i].lora is not None]
        adapters += [values[sites[i].lora.lora_b] for i in new if sites[i].lora is not None]
        share_first_rank([example_inputs[sites[i].weight_index] for i in new], adapters)
