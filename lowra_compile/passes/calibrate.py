"""Sensitivity statistics from the first real batch the backend is compiled on.

Runs the graph once on the real example inputs (Dynamo hands the backend the real parameters and the
first batch) and records, for each site:

    x2[k]  = E[x_k^2] over all tokens, per input channel        (always)
    g2[n]  = E[(dL/dy_n)^2] over all tokens, per output channel  (when the graph returns a scalar loss)
    gram   = E[x x^T] [K, K], per input                            (for rounding="gptq"; sites reading the
                                                                    same input share one tensor; kept in
                                                                    host memory: ~22 GB over a 7B model)

Together they give the diagonal-Fisher (OBD) error estimate of DESIGN.md section 6. The gradient is
taken with `torch.autograd.grad` against the site outputs only, so no `.grad` of any parameter changes
and the user's first optimizer step is unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx

from .match import LinearSite


@dataclass(frozen=True)
class SiteStats:
    x2: Tensor  # [K] float32
    g2: Tensor | None  # [N] float32, None when the graph has no loss
    gram: Tensor | None = None  # [K, K] float32 on the CPU, only when asked for
    tokens: int = 0  # rows of x the means are taken over (sets the damping of gram: passes/gptq.py)


def _mean_square(t: Tensor) -> Tensor:
    return t.detach().float().pow(2).reshape(-1, t.shape[-1]).mean(0)


def _second_moment(t: Tensor) -> Tensor:
    x = t.detach().float().reshape(-1, t.shape[-1])
    return x.t() @ x / x.shape[0]


def _find_loss(out) -> Tensor | None:
    leaves = out if isinstance(out, (tuple, list)) else (out,)
    for t in leaves:
        if isinstance(t, Tensor) and t.numel() == 1 and t.dtype.is_floating_point and t.requires_grad:
            return t
    return None


class _Recorder(fx.Interpreter):
    """Interpreter that records each site's input and makes its output differentiable."""

    def __init__(self, gm: fx.GraphModule, sites: list[LinearSite], want_grad: bool, want_gram: bool):
        super().__init__(gm)
        self.sites = sites
        self.inputs = {s.base: i for i, s in enumerate(sites)}
        self.outputs = {s.output: i for i, s in enumerate(sites)}
        self.scopes = {s.scope for s in sites if s.scope is not None}
        self.x2: dict[int, Tensor] = {}
        self.tokens: dict[int, int] = {}
        self.probes: dict[int, Tensor] = {}
        self.grams: dict[int, Tensor] = {}
        self.want_grad, self.want_gram = want_grad, want_gram
        self._gram_of_input: dict[fx.Node, Tensor] = {}

    def run_node(self, n: fx.Node):
        if n in self.scopes:
            # A checkpointed region holding sites: run its body here, recording inside it. This one
            # calibration pass keeps the region's activations (no recomputation); training does not.
            (body, *operands), _ = self.fetch_args_kwargs_from_env(n)
            inner = _Recorder(body, self.sites, self.want_grad, self.want_gram)
            result = inner.run(*operands)
            self.x2.update(inner.x2)
            self.tokens.update(inner.tokens)
            self.probes.update(inner.probes)
            self.grams.update(inner.grams)
            return result
        result = super().run_node(n)
        if n in self.inputs:
            x = n.args[0]
            self.x2[self.inputs[n]] = _mean_square(self.env[x])
            self.tokens[self.inputs[n]] = self.env[x].numel() // self.env[x].shape[-1]
            if self.want_gram:
                if x not in self._gram_of_input:
                    self._gram_of_input[x] = _second_moment(self.env[x]).cpu()  # moved back per layer
                self.grams[self.inputs[n]] = self._gram_of_input[x]
        if n in self.outputs and self.want_grad and isinstance(result, Tensor) and torch.is_grad_enabled():
            # Adding a zero that requires grad makes even a layer with no trainable input differentiable.
            probe = torch.zeros((), device=result.device, dtype=result.dtype, requires_grad=True)
            result = result + probe
            self.probes[self.outputs[n]] = result
        return result


def _concrete(value):
    """Under dynamic shapes Dynamo passes sizes as SymInts; the run needs the values of this batch."""
    return value.node.hint if isinstance(value, (torch.SymInt, torch.SymFloat)) else value


def calibrate(
    gm: fx.GraphModule, sites: list[LinearSite], example_inputs: list, use_loss: bool = True, gram: bool = False
) -> list[SiteStats]:
    """Statistics per site, from one run of `gm` on `example_inputs` (the real first batch)."""
    recorder = _Recorder(gm, sites, want_grad=use_loss, want_gram=gram)
    with torch.enable_grad() if use_loss else torch.no_grad():
        out = recorder.run(*[_concrete(v) for v in example_inputs])
    loss = _find_loss(out) if use_loss else None
    g2: dict[int, Tensor] = {}
    if loss is not None and recorder.probes:
        keys = list(recorder.probes)
        grads = torch.autograd.grad(loss, [recorder.probes[k] for k in keys], allow_unused=True)
        g2 = {k: _mean_square(g) for k, g in zip(keys, grads) if g is not None}
    del out, loss, recorder.probes
    r = recorder
    return [SiteStats(r.x2[i], g2.get(i), r.grams.get(i), r.tokens[i]) for i in range(len(sites))]
