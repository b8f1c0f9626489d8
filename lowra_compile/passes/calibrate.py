"""Sensitivity statistics of the frozen linears, from runs of their graphs on calibration batches.

For each site, over all the tokens it was run on:

    x2[k]  = E[x_k^2] per input channel                               (always)
    g2[n]  = E[(dL/dy_n)^2] per output channel, each batch's rows     (when the run ends in a scalar loss)
             scaled by their count (its loss is their mean)
    gram   = E[x x^T] [K, K], per input                                 (for rounding="gptq"; sites reading the
                                                                         same input share one tensor; kept in
                                                                         host memory: ~22 GB over a 7B model)

Two callers. The backend (`calibrate`) runs one graph on the real first batch Dynamo hands it, and takes
the gradient of that graph's loss. `lowra_compile.quantize_` (`ModelCalibration`) runs every graph of the
model, through the eager code between them, on each of its batches, and takes the gradient of the model's
loss once per batch: so the layers of a graph that ends before the loss (a graph break) get their E[g^2]
too, and each layer's statistics add up under its weight, whichever graph (or graph call) ran it.

For the experts of a mixture stacked in one grouped site, x2 is [E, K], each expert's own E[x^2] over the
tokens routed to it, which weighs its codebooks and group scales; gram is pooled over the rows of all the
experts (each expert's own would take E times the host memory); and g2[e*N + n] sums expert e's rows over
all rows, so an expert's rows weigh as much as the share of tokens it took. An expert no calibration token
reached has neither of its own: it takes the other experts' pooled x2 and their mean g2 (with a warning),
not zero, which would plan it at the lowest width.

Together they give the diagonal-Fisher (OBD) error estimate the plan weighs each row's error by (E[g^2] x
the row's error on E[x^2]; docs/design.md, "Backend"). The gradient is
taken with `torch.autograd.grad` against the site outputs only, so no `.grad` of any parameter changes
and the user's first optimizer step is unaffected. Batches are run one at a time and summed into running
totals, so calibrating on many batches costs the memory of one.

Calibrating on more tokens pays below 3 bits: on SmolLM2-135M, quantized at 2.5 bits (no LoRA), held-out
KJV perplexity is 27.1 / 24.8 / 24.3 / 23.7 on 1k / 4k / 16k / 32k tokens (docs/accuracy.md).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, fx

from .sites import LinearSite


@dataclass(frozen=True)
class SiteStats:
    x2: Tensor  # [K] float32; [E, K] for a grouped site: each expert's own
    g2: Tensor | None  # [N] float32 ([E*N] for a grouped site); None when no loss gradient reached the site
    gram: Tensor | None = None  # [K, K] float32 on the CPU, only when asked for
    tokens: int = 0  # rows of x the means are taken over (sets the damping of gram: passes/gptq.py)
    expert_tokens: Tensor | None = None  # [E] int64, of a grouped site: the rows each expert's x2 is over


def _rows(t: Tensor) -> Tensor:
    return t.detach().float().reshape(-1, t.shape[-1])


class _Sums:
    """Running totals over the calibration batches, per layer key (a site's index in one graph, or its
    weight across the graphs of a model), shared by the recorders of a graph and its checkpoint bodies.
    Grams are summed per input, so sites reading one input keep sharing one tensor."""

    def __init__(self):
        self.x2: dict[Hashable, Tensor] = {}  # sum of x^2 over rows, per layer
        self.tokens: dict[Hashable, int] = {}  # rows summed, per layer
        self.g2: dict[Hashable, Tensor] = {}  # sum over rows of (n dL/dy)^2, n its batch's rows (_add_loss_gradients)
        self.g2_rows: dict[Hashable, int] = {}  # rows summed into each of those
        self.grams: dict[tuple, Tensor] = {}  # sum of x x^T over rows, per input, on the CPU
        self.gram_tokens: dict[tuple, int] = {}  # rows summed into each of those
        self.gram_of: dict[Hashable, list[tuple]] = {}  # the inputs each layer reads: (node, key of its first reader)
        self.expert_rows: dict[Hashable, Tensor] = {}  # rows routed to each expert, per grouped layer
        self.float16 = False  # whether a layer ran in float16: its loss gradients are taken scaled


def _find_loss(out) -> Tensor | None:
    """The scalar loss in a run's output: `out["loss"]` of a model's output (a mapping), else the first
    differentiable scalar of a graph's output tuple, or the output itself."""
    if isinstance(out, Mapping):
        out = out.get("loss")
    leaves = out if isinstance(out, (tuple, list)) else (out,)
    for t in leaves:
        if isinstance(t, Tensor) and t.numel() == 1 and t.dtype.is_floating_point and t.requires_grad:
            return t
    return None


class _Recorder(fx.Interpreter):
    """Interpreter that adds the input of each site in `keys` to the totals under its key, and makes its
    output differentiable (`probes`: (key, output, the grouped site's offsets or None))."""

    def __init__(
        self, gm: fx.GraphModule, sites: list[LinearSite], sums: _Sums, want_grad: bool, want_gram: bool,
        keys: Mapping[int, Hashable],
    ):
        super().__init__(gm)
        self.sites, self.sums, self.keys = sites, sums, keys
        self.inputs = {sites[i].base: i for i in keys}
        self.outputs = {sites[i].output: i for i in keys}
        self.scopes = {sites[i].scope for i in keys if sites[i].scope is not None}
        # an input's gram is the first reader's: the key tells one layer's input from another's when the
        # same graph runs for several layers (after a graph break inside a repeated module)
        self.first_reader: dict[fx.Node, Hashable] = {}
        for i in sorted(keys):
            self.first_reader.setdefault(sites[i].base.args[0], keys[i])
        self.probes: list[tuple[Hashable, Tensor, Tensor | None]] = []
        self.offsets: dict[Hashable, Tensor] = {}  # each grouped site's offsets in this batch
        self.want_grad, self.want_gram = want_grad, want_gram
        self._gram_added: set[tuple] = set()  # this batch's x x^T, added once for all readers
        self._x_added: set[tuple] = set()  # (layer key, input node) whose rows this run has added

    def run_node(self, n: fx.Node):
        if n in self.scopes:
            # A checkpointed region holding sites: run its body here, recording inside it. This one
            # calibration pass keeps the region's activations (no recomputation); training does not.
            (body, *operands), _ = self.fetch_args_kwargs_from_env(n)
            inner = _Recorder(body, self.sites, self.sums, self.want_grad, self.want_gram, self.keys)
            result = inner.run(*operands)
            self.probes += inner.probes
            self.offsets.update(inner.offsets)
            return result
        result = super().run_node(n)
        if n in self.inputs and (self.keys[self.inputs[n]], n.args[0]) not in self._x_added:
            site = self.sites[self.inputs[n]]
            key, x = self.keys[self.inputs[n]], n.args[0]
            self._x_added.add((key, x))  # one weight on one input twice (a layer called twice): its rows count once
            # a float16 model (whose probed output, summed with a float32 adapter, may be float32): the backward
            # runs in float16 (_loss_gradients)
            self.sums.float16 |= self.env[x].dtype == torch.float16
            rows = _rows(self.env[x])
            if site.experts:
                _add(self.sums.x2, key, _expert_sums(rows.pow(2), self.env[site.offsets].long()))
            else:
                _add(self.sums.x2, key, rows.pow(2).sum(0))
            self.sums.tokens[key] = self.sums.tokens.get(key, 0) + len(rows)
            if self.want_gram:
                gram = (x, self.first_reader[x])
                if gram not in self._gram_added:
                    _add(self.sums.grams, gram, (rows.t() @ rows).cpu())  # moved back per layer
                    self.sums.gram_tokens[gram] = self.sums.gram_tokens.get(gram, 0) + len(rows)
                    self._gram_added.add(gram)
                if gram not in self.sums.gram_of.setdefault(key, []):  # a layer called on two inputs reads both
                    self.sums.gram_of[key].append(gram)
        if n in self.outputs and self.sites[self.outputs[n]].experts:
            key = self.keys[self.outputs[n]]
            self.offsets[key] = offsets = self.env[self.sites[self.outputs[n]].offsets].long()
            _add(self.sums.expert_rows, key, torch.diff(offsets, prepend=offsets.new_zeros(1)).cpu())
        if n in self.outputs and self.want_grad and isinstance(result, Tensor) and torch.is_grad_enabled():
            # Adding a zero that requires grad makes even a layer with no trainable input differentiable.
            probe = torch.zeros((), device=result.device, dtype=result.dtype, requires_grad=True)
            result = result + probe
            self.sums.float16 |= result.dtype == torch.float16  # float16 autocast: inputs may be float32
            key = self.keys[self.outputs[n]]
            self.probes.append((key, result, self.offsets.get(key)))
        return result


def _add(totals: dict, key, value: Tensor) -> None:
    if key in totals:
        totals[key] += value
    else:
        totals[key] = value


def _concrete(gm: fx.GraphModule, example_inputs: list) -> list:
    """`example_inputs` with every SymInt replaced by its value: the run needs the values of this batch.

    Under dynamic shapes Dynamo passes sizes as SymInts. A backed one carries its value as a hint; an unbacked
    one (a packed weight's row count, `release._share_one_graph_across_layers`, in a graph that also holds a
    layer not yet quantized) has none, so its value is read off the tensor it is a size of."""
    sizes = {}
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        fake = node.meta.get("example_value")
        if isinstance(value, Tensor) and isinstance(fake, Tensor):
            for size, real in zip(fake.shape, value.shape):
                if isinstance(size, torch.SymInt):
                    sizes.setdefault(size.node.expr, real)

    def concrete(value):
        if not isinstance(value, (torch.SymInt, torch.SymFloat)):
            return value
        if value.node.hint is not None:
            return value.node.hint
        if value.node.expr in sizes:
            return sizes[value.node.expr]
        raise ValueError(f"lowra: the graph takes a size {value} that no input tensor has, so it cannot run on "
                         "the calibration batch; quantize the model ahead with lowra_compile.quantize_")

    return [concrete(v) for v in example_inputs]


def _add_loss_gradients(sums: _Sums, loss: Tensor, probes: list[tuple[Hashable, Tensor, Tensor | None]]) -> None:
    """Add this batch's (dL/dy)^2 of every probed output to its layer's g2, per row and weighted by rows.

    A loss that is a mean over a batch's n rows gives each row a gradient 1/n of its own: scaled back by n,
    every row counts alike, so a short last batch weighs by its rows (it took over E[g^2] as 1/n^2, 5,000
    times the three long batches beside it). Only a common scale is left, which the plan does not see."""
    grads, scale = _loss_gradients(loss, [p for _, p, _ in probes], sums.float16)
    found = [(key, offsets, g) for (key, _, offsets), g in zip(probes, grads) if g is not None]
    # the batch's rows, one scale for every layer: what a plain linear reads (a grouped layer reads each token
    # once per expert it takes)
    plain = [g for _, offsets, g in found if offsets is None] or [g for *_, g in found]
    n = max((g.numel() // g.shape[-1] for g in plain), default=0)
    for key, offsets, g in found:
        rows = _rows(g)
        squares = rows.pow(2) * (n / scale) ** 2
        if offsets is None:
            _add(sums.g2, key, squares.sum(0))
        else:  # [E*N]: what each expert's output error costs, its routed rows counted as a share of the n
            _add(sums.g2, key, (_expert_sums(squares, offsets) * n / len(rows)).reshape(-1))
        _add(sums.g2_rows, key, n)


# float16 gradients of a mean loss over thousands of tokens fall mostly below float16's normal range (6.1e-5;
# 72% of a tiny Llama's down_proj dL/dy on 16,384 tokens, q_proj's E[g^2] 40% off float32's): the loss is scaled
# as GradScaler scales a training step's, from 2^16 down by 2^4 while any gradient overflows.
_FP16_LOSS_SCALES = tuple(2.0 ** e for e in range(16, -1, -4))


def _loss_gradients(loss: Tensor, probes: list[Tensor], float16: bool) -> tuple[list[Tensor | None], float]:
    """(d(scale * L)/d(probe) for each probe, None where the loss does not reach it; scale): 1, unless the
    graph ran layers in float16 (`float16`). The backward at 2^16 keeps its graph for a retry at a smaller
    scale, so it frees no saved activation before it ends (float16 graphs only)."""
    if not float16:
        return list(torch.autograd.grad(loss, probes, allow_unused=True)), 1.0
    for scale in _FP16_LOSS_SCALES:
        with torch.enable_grad():  # the backend quantizes under no_grad: `loss * scale` needs its grad_fn
            scaled = loss * scale
        grads = torch.autograd.grad(scaled, probes, allow_unused=True, retain_graph=scale > 1)
        finite = [torch.isfinite(g).all() for g in grads if g is not None]
        if scale == 1 or not finite or bool(torch.stack(finite).all()):  # one device sync per try
            return list(grads), scale


def _expert_sums(values: Tensor, offsets: Tensor) -> Tensor:
    """[E, C]: the sum of `values` [rows, C] over each expert's rows (sorted by expert, `offsets` their ends)."""
    expert = torch.searchsorted(offsets, torch.arange(len(values), device=values.device), right=True)
    keep = expert < len(offsets)  # rows past the last offset belong to no expert
    return values.new_zeros(len(offsets), values.shape[1]).index_add_(0, expert[keep], values[keep])


def _expert_x2(names: Mapping[Hashable, str], sums: _Sums) -> dict[Hashable, Tensor]:
    """Each grouped layer's x2 [E, K]: every expert's own mean over its rows. An expert no calibration row
    reached takes the others' pooled x2 and mean g2 (set here in place; no expert reached: x2 of ones, the
    plain weight error), with a warning."""
    means = {}
    for key, rows in sums.expert_rows.items():
        x2, counts = sums.x2[key], rows.to(sums.x2[key])  # rows are counted on the CPU
        reached = counts > 0
        pooled = x2[reached].sum(0) / counts[reached].sum() if reached.any() else torch.ones_like(x2[0])
        means[key] = torch.where(reached[:, None], x2 / counts.clamp_min(1)[:, None], pooled)
        unreached = rows == 0
        if not unreached.any():
            continue
        if key in sums.g2 and not unreached.all():
            g2 = sums.g2[key].view(len(rows), -1)
            g2[unreached] = g2[~unreached].mean(0)
        warnings.warn(
            f"lowra: {int(unreached.sum())} of the {len(rows)} experts of {names[key]!r} received no calibration "
            "tokens; their codebooks and widths are planned on the other experts' statistics. Calibrate on more tokens "
            "(lowra_compile.quantize_ takes several batches) so that every expert is seen",
            stacklevel=4,
        )
    return means


def _statistics(sums: _Sums, names: Mapping[Hashable, str]) -> dict[Hashable, SiteStats]:
    """The means of the totals, per layer key of `names`. A layer no row reached (tokens 0) gets zeros, for
    the pipeline to fill from the layers of its shape (`pipeline.planning_statistics`)."""
    _check_inputs(sums, names)
    experts = _expert_x2(names, sums)
    grams = {gram: total / sums.gram_tokens[gram] for gram, total in sums.grams.items() if sums.gram_tokens[gram]}
    return {
        key: SiteStats(
            experts[key] if key in experts else sums.x2[key] / max(sums.tokens[key], 1),
            # all zero (a loss with no tokens to count, as the Trainer's under gradient accumulation): no
            # gradient reached the layer, and every error weighed by it would be 0
            sums.g2[key] / sums.g2_rows[key] if key in sums.g2 and sums.g2[key].any() else None,
            _gram(sums, grams, key),
            sums.tokens[key],
            sums.expert_rows.get(key),
        )
        for key in names
    }


def _gram(sums: _Sums, grams: dict[tuple, Tensor], key: Hashable) -> Tensor | None:
    """The layer's E[x x^T]: its input's, shared with the other readers of that input, or, for a layer called
    on several inputs, over all their rows."""
    parts = [gram for gram in sums.gram_of.get(key, ()) if gram in grams]
    if len(parts) <= 1:
        return grams[parts[0]] if parts else None
    return sum(sums.grams[gram] for gram in parts) / sum(sums.gram_tokens[gram] for gram in parts)


def _check_inputs(sums: _Sums, names: Mapping[Hashable, str]) -> None:
    """Raise, naming the first such layer, when a layer ran on non-finite inputs: its means would be NaN, and
    planned and rounded on them its weight would come out garbage (nearest rounding: no error at all) or fail
    deep in a Cholesky factorisation."""
    for key, name in names.items():
        if not torch.isfinite(sums.x2[key]).all():
            raise ValueError(
                f"lowra: the calibration inputs of layer {name!r} are not finite (NaN or inf), so its statistics are "
                "too; check the calibration batches for NaN or inf, and that the model does not overflow in its "
                "dtype (run it once in float32)")


def calibrate(
    gm: fx.GraphModule, sites: list[LinearSite], example_inputs: list, use_loss: bool = True, gram: bool = False
) -> list[SiteStats]:
    """Statistics per site, from one run of `gm` on `example_inputs` (the real first batch). The sites of one
    weight (a layer called more than once) share theirs, over all its calls."""
    keys = {i: ("site", i) if s.weight_index is None else ("weight", s.weight_index) for i, s in enumerate(sites)}
    calibration = ModelCalibration(use_loss, gram)
    with _inputs_kept(example_inputs):
        with torch.enable_grad() if use_loss else torch.no_grad():
            out = calibration.run(gm, sites, keys, _concrete(gm, example_inputs))
        calibration.end_batch(out)  # before the inputs are written back: autograd may have saved them
    stats = calibration.statistics({keys[i]: s.name for i, s in enumerate(sites)})
    return [stats[keys[i]] for i in range(len(sites))]


@contextlib.contextmanager
def _inputs_kept(inputs: list):
    """Give back what the run writes into its inputs. It is a call of the graph more than the user made: the
    compiled graph then runs on the same batch, and a graph that updates an input in place (a buffer that
    counts calls, BatchNorm's running statistics, transformers' StaticCache writing a prompt's keys and values
    at its running position) would be updated twice by the first call. The batch's tensors and the buffers
    (not the parameters, nor anything autograd tracks) are copied first, and those whose values the run
    changed are written back (by value: BatchNorm's update does not count in a tensor's version)."""
    kept = [(t, t.clone()) for t in inputs if isinstance(t, Tensor) and not isinstance(t, torch.nn.Parameter)
            and not t.requires_grad and not t.is_inference() and not _overlapping(t)]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, before in kept:
                if not torch.equal(t, before):
                    t.copy_(before)


def _overlapping(t: Tensor) -> bool:
    """Whether elements of `t` share memory (an expanded tensor): nothing can write into it in place."""
    return any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape))


class ModelCalibration:
    """Statistics of the layers of all the graphs of a model, over several batches (`quantize_`).

    Each graph call runs through `run`, which adds the statistics of its sites under the keys it is given;
    `end_batch` then adds the gradient of that batch's loss to every layer the batch ran."""

    def __init__(self, use_loss: bool, gram: bool):
        self.use_loss, self.gram = use_loss, gram
        self.sums = _Sums()
        self.probes: list[tuple[Hashable, Tensor, Tensor | None]] = []

    def run(self, gm: fx.GraphModule, sites: list[LinearSite], keys: Mapping[int, Hashable], inputs: list) -> object:
        """Run `gm` on `inputs` (its real arguments), recording `sites[i]` under `keys[i]` for each i in keys."""
        recorder = _Recorder(gm, sites, self.sums, want_grad=self.use_loss, want_gram=self.gram, keys=keys)
        out = recorder.run(*inputs)
        self.probes += recorder.probes
        return out

    def end_batch(self, out: object) -> None:
        """Add the gradient of the loss in `out`, the batch's output (`_find_loss`), to every layer it ran."""
        loss = _find_loss(out) if self.use_loss else None
        if loss is not None and not torch.isfinite(loss.detach()).all():
            # a batch whose every label is -100 has a NaN mean loss; its gradients would make every error NaN,
            # and the plan would put every channel at the smallest width
            warnings.warn(f"lowra: a calibration batch's loss is {loss.item()} (are all its labels -100?); its "
                          "loss gradients are left out of the plan", stacklevel=3)
            loss = None
        if loss is not None and self.probes:
            _add_loss_gradients(self.sums, loss, self.probes)
        self.probes = []

    def statistics(self, names: Mapping[Hashable, str]) -> dict[Hashable, SiteStats]:
        """SiteStats per layer key of `names` (key -> the layer's name, for warnings)."""
        return _statistics(self.sums, names)
