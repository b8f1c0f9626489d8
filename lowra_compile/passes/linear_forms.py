"""Turn linear layers written as `x @ W.T` into `F.linear`, so that `match` finds them.

Some models compute a linear layer as a matrix product with the transposed weight (Falcon's
`FalconLinear`: `input @ self.weight.T`). On the first compile W is a frozen placeholder; on a recompile
it is released, and its `__torch_function__` hands Dynamo a dequantization for `W.T`:

    before (first compile)                    after
    %wt = getattr(%W, "T")                    %y = linear(%x, %W, None)
    %y  = matmul(%x, %wt)

    before (recompile)                        after
    %w  = lowra.dequant([%p0..%p10], K, 64, dtype)
    %wt = getattr(%w, "T")                    %y = lowra.lora_linear(%x, %x, [%p0..%p10], 64, None,
    %y  = matmul(%x, %wt)                                             None, None, 0.0)

Both right-hand forms are what `match` already knows (a LoRA branch added onto `%y` is then fused as
usual). Only a transpose whose one user is the product is rewritten, so nothing else reads it.
Dynamo's own graph is left as it is: the result is a copy when there is anything to rewrite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from .match import checkpoint_bodies, example_value, is_frozen_matrix, is_matmul
from .rewrite import copy_graph_module


def _transposed(node) -> fx.Node | None:
    """The 2-D node that `node` transposes (W.T, W.mT, W.t(), W.transpose(0, 1), torch.t(W)), or None."""
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return None
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        return node.args[0]
    if (node.op == "call_method" and node.target == "t") or (node.op == "call_function" and node.target is torch.t):
        return node.args[0]
    if node.op == "call_method" and node.target == "transpose" and set(node.args[1:]) in ({0, 1}, {-1, -2}):
        return node.args[0]
    return None


def _frozen_weight(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "placeholder" and is_frozen_matrix(example_value(node))


def _is_dequant(node) -> bool:
    return (
        isinstance(node, fx.Node) and node.op == "call_function"
        and node.target in (torch.ops.lowra.dequant.default, torch.ops.lowra.dequant) and len(node.users) == 1
    )


def _linear_form(node: fx.Node) -> tuple | None:
    """(target, args) of the linear that the product `node` computes, or None."""
    if not is_matmul(node) or len(node.args) != 2 or node.kwargs:  # matmul, @, mm; not addmm's 3 operands
        return None
    x, w = node.args[0], _transposed(node.args[1])
    if _frozen_weight(w):
        return F.linear, (x, w, None)
    if _is_dequant(w):
        packed, _, group_size, _ = w.args
        return torch.ops.lowra.lora_linear.default, (x, x, packed, group_size, None, None, None, 0.0)
    return None


def _rewrite(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        form = _linear_form(node)
        if form is None:
            continue
        transpose = node.args[1]
        with graph.inserting_before(node):
            linear = graph.call_function(*form)
        linear.meta = dict(node.meta)
        node.replace_all_uses_with(linear)
        graph.erase_node(node)
        source = transpose.args[0]
        graph.erase_node(transpose)
        if source.op != "placeholder" and not source.users:  # the recompile's dequantization
            graph.erase_node(source)
    graph.lint()


def linear_forms(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` with every `x @ W.T` of a frozen or packed weight as a linear (a copy), or `gm` itself when it
    has none."""
    graphs = [gm.graph, *(body.graph for _, body in checkpoint_bodies(gm))]
    if not any(_linear_form(n) for g in graphs for n in g.nodes):
        return gm
    new, _ = copy_graph_module(gm)
    _rewrite(new.graph)
    for call, body in checkpoint_bodies(new):
        if any(_linear_form(n) for n in body.graph.nodes):
            body, _ = copy_graph_module(body)
            _rewrite(body.graph)
            body.recompile()
            setattr(new, call.args[0].target, body)  # Dynamo's module keeps its own body
    new.recompile()
    return new
