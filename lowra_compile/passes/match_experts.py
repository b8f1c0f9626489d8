"""The grouped sites of `match`: a mixture's experts stacked in one tensor and run by a grouped product.

A mixture of experts stacked in one [E, N, K] tensor (transformers 5) is a grouped site: its E experts are
packed as one [E*N, K] matrix, whose rows are planned like any layer's (no LoRA branch: the experts stay
frozen)

    before (first compile)                          before (recompile, weight already packed)
    %wt = transpose(%W_experts, -2, -1)             %w  = lowra.dequant([%p0..%p10], K, 64, dtype)
    %y  = grouped_mm(%x, %wt, offs=%offsets)        %wv = view(%w, (E, N, K));  %wt = transpose(%wv, -2, -1)
    (or %y = grouped_mm(%x, %W_experts_t, ...)      %y  = grouped_mm(%x, %wt, offs=%offsets)
     for experts stored (E, K, N): gpt-oss)

(grouped_mm: torch._grouped_mm, torch.nn.functional.grouped_mm or transformers' fallback op).
With PEFT's LoRA on the experts themselves (`target_parameters`, one active adapter), the product reads the
stack through PEFT's parametrization, W + s * lhs @ rhs per expert, whose value PEFT also caches (a graph
output); lhs and rhs are views of the adapter's A and B:

    %u  = baddbmm(%W_experts, %lhs, %rhs, alpha=s)  # or, after a recompile, of view(lowra.dequant(...))
    %ut = transpose(%u, -2, -1)                     # absent for experts stored (E, K, N): gpt-oss
    %y  = grouped_mm(%x, %ut, offs=%offsets)
    return (..., %u)

`grouped_site` reads one grouped product; `match` scans for them, `rewrite` makes each a `lowra.grouped_linear`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

from .fx_nodes import example_value, is_dequant, is_frozen_matrix
from .sites import LinearSite
from .sources import packed_site_name, placeholder_name


@dataclass
class ExpertsLora:
    """PEFT's LoRA on a mixture's stacked experts: the grouped product reads `update` = W + scaling * lhs @ rhs,
    through a transpose when `transposed` (so each expert's rows get x @ (lhs @ rhs)^T, or x @ lhs @ rhs)."""

    lhs: fx.Node
    rhs: fx.Node
    scaling: float
    update: fx.Node  # the baddbmm; also a graph output when PEFT caches it
    transposed: bool


def is_grouped_mm(node: fx.Node) -> bool:
    """A grouped matrix product (torch._grouped_mm, or transformers' fallback op for it): how transformers
    runs a mixture of experts whose weights are stacked in one [experts, out, in] tensor."""
    return node.op == "call_function" and "grouped_mm" in str(node.target)


_GROUPED_KWARGS = ("offs", "bias", "out_dtype")


def grouped_site(node: fx.Node, outer: dict, index: dict, stays_dense: Callable[..., bool],
                 scope: fx.Node | None) -> LinearSite | None:
    """A grouped product of rows sorted by expert with the transpose of frozen experts stacked (E, N, K),
    `grouped_mm(x, W.transpose(-2, -1), offs=offsets)`, possibly through PEFT's LoRA update of the stack,
    or, after a recompile, of such a weight already packed (read through `lowra.dequant`). None for any
    other grouped product (it stays dense)."""
    if not 2 <= len(node.args) <= 5:
        return None
    args = list(node.args) + [node.kwargs.get(k) for k in _GROUPED_KWARGS[len(node.args) - 2:]]
    if len(args) != 5 or any(a is not None for a in args[3:]) or set(node.kwargs) - set(_GROUPED_KWARGS):
        return None
    x, wt, offsets = args[:3]
    if not (isinstance(wt, fx.Node) and isinstance(offsets, fx.Node)):
        return None
    read = _stack_read(wt)
    if read is None:
        return None
    source, transposes, lora, chain = read
    if source in outer and transposes < 2:  # one transpose: stored (E, N, K); none: stored (E, K, N), gpt-oss
        site = _stacked_site(node, x, source, offsets, outer, index, stays_dense, scope, transposes == 0, chain, lora)
    else:
        dequant = source.args[0] if source.op == "call_method" and source.target == "view" else None
        if transposes != 1 or len(source.users) != 1 or not is_dequant(dequant):
            return None
        packed, k, group_size = dequant.args[:3]
        experts, n = example_value(source).shape[:2]
        name = packed_site_name(packed[0], outer)
        site = LinearSite(name, node, x, None, None, None, list(packed), group_size, None, (experts * n, k),
                          scope, experts=experts, offsets=offsets, erased=(dequant, source, *chain), experts_lora=lora)
    return site


def _stack_read(wt: fx.Node) -> tuple[fx.Node, int, ExpertsLora | None, tuple[fx.Node, ...]] | None:
    """How a grouped product reads its stacked weight `wt`: (source, transposes, lora, chain). `source` is
    what the chain starts from (a placeholder, or a view of `lowra.dequant`), `transposes` how many
    transposes of the last two dims lie between, `lora` PEFT's update among them, and `chain` the nodes
    between, in graph order (read by nothing else, but for the update, which PEFT also caches). None when
    something else reads the source too."""
    chain: list[fx.Node] = []

    def past_transpose(node: fx.Node) -> fx.Node:
        if _is_last_two_transpose(node) and len(node.users) == 1:
            chain.insert(0, node)
            return node.args[0]
        return node

    node = past_transpose(wt)
    outer_transposes = len(chain)
    lora = None
    if _is_experts_update(node):
        lhs, rhs = node.args[1:]
        lora = ExpertsLora(lhs, rhs, float(node.kwargs.get("alpha", 1.0)), node, transposed=outer_transposes == 1)
        chain.insert(0, node)
        node = past_transpose(node.args[0])
    transposes = len(chain) - (lora is not None)
    return (node, transposes, lora, tuple(chain)) if len(node.users) == 1 else None


def _is_experts_update(node: fx.Node) -> bool:
    """PEFT's parametrization of stacked experts under one LoRA adapter, `baddbmm(W, lhs, rhs, alpha=scaling)`:
    W + scaling * lhs @ rhs, expert by expert."""
    return (
        node.op == "call_function" and node.target is torch.baddbmm and len(node.args) == 3
        and all(isinstance(a, fx.Node) for a in node.args) and set(node.kwargs) <= {"alpha"}
        and isinstance(node.kwargs.get("alpha", 1.0), (int, float))
    )


def _stacked_site(node, x, w, offsets, outer, index, stays_dense, scope, transposed: bool, chain: tuple,
                  lora: ExpertsLora | None) -> LinearSite | None:
    """The grouped site of frozen experts `w`, stacked (E, N, K) and read through a transpose, or stacked
    (E, K, N) and read as they are (`transposed`); either way packed as the (E*N, K) matrix."""
    value = example_value(w)
    if not is_frozen_matrix(value, dims=(3,)):
        return None
    name = placeholder_name(outer[w])
    if stays_dense(name, node):
        return None
    experts, n, k = (value.shape[0], value.shape[2], value.shape[1]) if transposed else value.shape
    return LinearSite(name, node, x, None, w, index[outer[w]], None, None, None, (experts * n, k), scope,
                      transposed=transposed, experts=experts, offsets=offsets, erased=chain, experts_lora=lora)


def _is_last_two_transpose(node: fx.Node) -> bool:
    """`t.transpose(-2, -1)` (or (1, 2), or torch.transpose) of a 3-D tensor."""
    is_transpose = (node.op == "call_method" and node.target == "transpose") or (
        node.op == "call_function" and node.target is torch.transpose
    )
    return is_transpose and len(node.args) == 3 and {d % 3 for d in node.args[1:]} == {1, 2}


def experts_hint(names: list[str]) -> str:
    """How to get a mixture's stacked experts packed, for those among the dense weights."""
    if any("parametrizations." in n for n in names):  # PEFT's target_parameters, several adapters: W + dW
        return (". With several active adapters on the experts themselves (PEFT's target_parameters), PEFT adds "
                "their dense update to the stack, so those experts stay dense: keep one adapter active on them "
                "(lowra packs the experts and runs that adapter's factors), or put the others on target_modules.")
    if names:
        return (". A mixture's experts stacked in one tensor are packed when transformers runs them with a "
                "grouped product, grouped_mm(x, W.transpose(-2, -1), offs=...): load the model with "
                "experts_implementation=\"grouped_mm\" (its default where torch has a grouped product).")
    return "."
