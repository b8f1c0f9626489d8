"""Sensitivity statistics from the batches the backend is compiled on.

Runs the graph on the real example inputs (Dynamo hands the backend the real parameters and the first
batch), and on any further calibration batches given to `lowra_compile.quantize_`, and records, for each
site, over all of their tokens:

    x2[k]  = E[x_k^2] per input channel                               (always)
    g2[n]  = E[(dL/dy_n)^2] per output channel, the mean over batches  (when the graph returns a scalar loss)
    gram   = E[x x^T] [K, K], per input                                 (for rounding="gptq"; sites reading the
                                                                         same input share one tensor; kept in
                                                                         host memory: ~22 GB over a 7B model)

For the experts of a mixture stacked in one grouped site, x2 and gram are pooled over the rows of all the
experts (every token each expert was routed), and g2[e*N + n] sums expert e's rows over all rows, so an
expert's rows weigh as much as the share of tokens it took. An expert no calibration token reached has
no g2 of its own: it takes the mean of the others' (with a warning), not zero, which would plan it at the
lowest width.

Together they give the diagonal-Fisher (OBD) error estimate of DESIGN.md section 6. The gradient is
taken with `torch.autograd.grad` against the site outputs only, so no `.grad` of any parameter changes
and the user's first optimizer step is unaffected. Batches are run one at a time and summed into running
totals, so calibrating on many batches costs the memory of one.

Calibrating on more tokens pays below 3 bits: on SmolLM2-135M, quantized at 2.5 bits (no LoRA), held-out
KJV perplexity is 27.1 / 24.8 / 24.3 / 23.7 on 1k / 4k / 16k / 32k tokens (docs/accuracy.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, fx

from .match import LinearSite


@dataclass(frozen=True)
class SiteStats:
    x2: Tensor  # [K] float32
    g2: Tensor | None  # [N] float32, None when the graph has no loss
    gram: Tensor | None = None  # [K, K] float32 on the CPU, only when asked for
    tokens: int = 0  # rows of x the means are taken over (sets the damping of gram: passes/gptq.py)


# (first batch, further batches) while `lowra_compile.quantize_` runs the first call on several batches
_batches: ContextVar[tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]] | None] = ContextVar(
    "lowra_calibration_batches", default=None
)


@contextmanager
def more_batches(first: Mapping[str, Any], others: Sequence[Mapping[str, Any]]) -> Iterator[None]:
    """While active, a graph compiled on the call with the kwargs `first` also calibrates on each of `others`
    (kwargs of the same names and shapes)."""
    token = _batches.set((first, others))
    try:
        yield
    finally:
        _batches.reset(token)


def more_inputs(example_inputs: list) -> list[list]:
    """The graph's inputs for each further calibration batch (see `more_batches`): `example_inputs` with
    every tensor of the first batch replaced by the other batch's tensor of the same name."""
    batches = _batches.get()
    if batches is None:
        return []
    first, others = batches
    slots = {}  # position among the graph inputs -> kwarg name
    for j, value in enumerate(example_inputs):
        name = next((k for k, t in first.items() if isinstance(t, Tensor) and t is value), None)
        if name is not None:
            slots[j] = name
    if not slots:
        # A graph after a graph break reads activations of the first batch, which no other batch gives.
        warnings.warn(
            "lowra: a graph with frozen linears does not take the calibration batch as input (it follows a graph "
            f"break); its layers are calibrated on the first batch only, not on the {len(others)} more given to "
            "quantize_. Remove the graph break (torch._dynamo.explain shows it) to calibrate them on all.",
            stacklevel=2,
        )
        return []
    return [[other[slots[j]] if j in slots else v for j, v in enumerate(example_inputs)] for other in others]


def _rows(t: Tensor) -> Tensor:
    return t.detach().float().reshape(-1, t.shape[-1])


class _Sums:
    """Running totals over the calibration batches, shared by the recorders of a graph and its checkpoint
    bodies. Grams are summed per input node, so sites reading one input keep sharing one tensor."""

    def __init__(self):
        self.x2: dict[int, Tensor] = {}  # sum of x^2 over rows, per site
        self.tokens: dict[int, int] = {}  # rows summed, per site
        self.g2: dict[int, Tensor] = {}  # sum over batches of each batch's E[(dL/dy)^2], per site
        self.grams: dict[fx.Node, Tensor] = {}  # sum of x x^T over rows, per input node, on the CPU
        self.gram_tokens: dict[fx.Node, int] = {}  # rows summed into each of those
        self.gram_node: dict[int, fx.Node] = {}  # the input node each site reads
        self.expert_rows: dict[int, Tensor] = {}  # rows routed to each expert, per grouped site


def _find_loss(out) -> Tensor | None:
    leaves = out if isinstance(out, (tuple, list)) else (out,)
    for t in leaves:
        if isinstance(t, Tensor) and t.numel() == 1 and t.dtype.is_floating_point and t.requires_grad:
            return t
    return None


class _Recorder(fx.Interpreter):
    """Interpreter that adds each site's input to the totals and makes its output differentiable."""

    def __init__(self, gm: fx.GraphModule, sites: list[LinearSite], sums: _Sums, want_grad: bool, want_gram: bool):
        super().__init__(gm)
        self.sites, self.sums = sites, sums
        self.inputs = {s.base: i for i, s in enumerate(sites)}
        self.outputs = {s.output: i for i, s in enumerate(sites)}
        self.scopes = {s.scope for s in sites if s.scope is not None}
        self.probes: dict[int, Tensor] = {}
        self.offsets: dict[int, Tensor] = {}  # each grouped site's offsets in this batch
        self.want_grad, self.want_gram = want_grad, want_gram
        self._gram_added: set[fx.Node] = set()  # this batch's x x^T, added once for all readers

    def run_node(self, n: fx.Node):
        if n in self.scopes:
            # A checkpointed region holding sites: run its body here, recording inside it. This one
            # calibration pass keeps the region's activations (no recomputation); training does not.
            (body, *operands), _ = self.fetch_args_kwargs_from_env(n)
            inner = _Recorder(body, self.sites, self.sums, self.want_grad, self.want_gram)
            result = inner.run(*operands)
            self.probes.update(inner.probes)
            self.offsets.update(inner.offsets)
            return result
        result = super().run_node(n)
        if n in self.inputs:
            i, x = self.inputs[n], n.args[0]
            rows = _rows(self.env[x])
            _add(self.sums.x2, i, rows.pow(2).sum(0))
            self.sums.tokens[i] = self.sums.tokens.get(i, 0) + len(rows)
            if self.want_gram:
                if x not in self._gram_added:
                    _add(self.sums.grams, x, (rows.t() @ rows).cpu())  # moved back per layer
                    self.sums.gram_tokens[x] = self.sums.gram_tokens.get(x, 0) + len(rows)
                    self._gram_added.add(x)
                self.sums.gram_node[i] = x
        if n in self.outputs and self.sites[self.outputs[n]].experts:
            i = self.outputs[n]
            self.offsets[i] = offsets = self.env[self.sites[i].offsets].long()
            _add(self.sums.expert_rows, i, torch.diff(offsets, prepend=offsets.new_zeros(1)).cpu())
        if n in self.outputs and self.want_grad and isinstance(result, Tensor) and torch.is_grad_enabled():
            # Adding a zero that requires grad makes even a layer with no trainable input differentiable.
            probe = torch.zeros((), device=result.device, dtype=result.dtype, requires_grad=True)
            result = result + probe
            self.probes[self.outputs[n]] = result
        return result


def _add(totals: dict, key, value: Tensor) -> None:
    if key in totals:
        totals[key] += value
    else:
        totals[key] = value


def _concrete(value):
    """Under dynamic shapes Dynamo passes sizes as SymInts; the run needs the values of this batch."""
    return value.node.hint if isinstance(value, (torch.SymInt, torch.SymFloat)) else value


def _record(gm, sites, sums: _Sums, inputs: list, use_loss: bool, gram: bool) -> None:
    """Add one batch's statistics to `sums`."""
    recorder = _Recorder(gm, sites, sums, want_grad=use_loss, want_gram=gram)
    with torch.enable_grad() if use_loss else torch.no_grad():
        out = recorder.run(*[_concrete(v) for v in inputs])
    loss = _find_loss(out) if use_loss else None
    if loss is not None and recorder.probes:
        keys = list(recorder.probes)
        grads = torch.autograd.grad(loss, [recorder.probes[k] for k in keys], allow_unused=True)
        for k, g in zip(keys, grads):
            if g is not None:
                g2 = _per_expert_g2(_rows(g), recorder.offsets[k]) if k in recorder.offsets else _rows(g).pow(2).mean(0)
                _add(sums.g2, k, g2)


def _per_expert_g2(g: Tensor, offsets: Tensor) -> Tensor:
    """[E*N]: each expert's sum of (dL/dy)^2 over its rows (sorted by expert, `offsets` their ends), over all
    rows: the mean over tokens of what the expert's output error costs."""
    expert = torch.searchsorted(offsets, torch.arange(len(g), device=g.device), right=True)
    keep = expert < len(offsets)  # rows past the last offset belong to no expert
    sums = g.new_zeros(len(offsets), g.shape[1]).index_add_(0, expert[keep], g[keep].pow(2))
    return (sums / len(g)).reshape(-1)


def _unreached_experts(sites: list[LinearSite], sums: _Sums) -> None:
    """Give each expert that no calibration row reached the mean g2 of the other experts, and say so."""
    for i, rows in sums.expert_rows.items():
        unreached = rows == 0
        if i not in sums.g2 or not unreached.any():
            continue
        g2 = sums.g2[i].view(len(rows), -1)
        if not unreached.all():
            g2[unreached] = g2[~unreached].mean(0)
        warnings.warn(
            f"lowra: {int(unreached.sum())} of the {len(rows)} experts of {sites[i].name!r} received no calibration "
            "tokens; their widths are planned on the other experts' mean sensitivity. Calibrate on more tokens "
            "(lowra_compile.quantize_ takes several batches) so that every expert is seen",
            stacklevel=4,
        )


def calibrate(
    gm: fx.GraphModule,
    sites: list[LinearSite],
    example_inputs: list,
    use_loss: bool = True,
    gram: bool = False,
    more_inputs: Sequence[list] = (),
) -> list[SiteStats]:
    """Statistics per site, from runs of `gm` on `example_inputs` (the real first batch) and on each of
    `more_inputs` (the same graph inputs with another batch's tensors in place of the first one's)."""
    sums = _Sums()
    for inputs in (example_inputs, *more_inputs):
        _record(gm, sites, sums, inputs, use_loss, gram)
    batches = 1 + len(more_inputs)
    _unreached_experts(sites, sums)
    for node, total in sums.grams.items():
        total /= sums.gram_tokens[node]
    return [
        SiteStats(
            sums.x2[i] / sums.tokens[i],
            sums.g2[i] / batches if i in sums.g2 else None,
            sums.grams[sums.gram_node[i]] if i in sums.gram_node else None,
            sums.tokens[i],
        )
        for i in range(len(sites))
    ]
