"""Turn linear layers written as matrix products into `F.linear`, so that `match` finds them.

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

Others store the weight as (in, out) and multiply by it as it is: GPT-2's `Conv1D` flattens the input,
calls `addmm(b, x, W)` and unflattens the result (`addmm(b, x, W.t())` of an (out, in) weight is taken too). Its W becomes a linear's transposed weight, which
`match` quantizes as the (out, in) matrix it is (a transposed site); on a recompile the released weight
hands Dynamo the packed op directly (`release`), and only the flattening is left to undo:

    before (first compile)                    after
    %x2 = view(%x, -1, K)                     %wt = t(%W)
    %y2 = addmm(%b, %x2, %W)                  %y  = linear(%x, %wt, %b)
    %y  = view(%y2, (B, T, N))

    before (recompile)                        after
    %x2 = view(%x, -1, K)                     %y = lowra.lora_linear(%x, %x, [%p0..%p10], 64, %b,
    %y2 = lowra.lora_linear(%x2, %x2, [%p0..%p10], 64, %b,                  None, None, 0.0)
                            None, None, 0.0)
    %y  = view(%y2, (B, T, N))

A LoRA branch written with matrix products of its trainable factors (litgpt's `(x @ A.T @ B.T) * s`) becomes
linears the same way, `linear(linear(x, A), B)`, the form PEFT's branch has.

All right-hand forms are what `match` already knows (a LoRA branch added onto `%y` is then fused as
usual). Only a transpose or a flattening whose one user is the product is rewritten, so nothing else
reads it. Dynamo's own graph is left as it is: the result is a copy when there is anything to rewrite.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

from .fx_nodes import example_value, is_dequant, is_frozen_matrix, is_lowra_op, is_trainable_placeholder
from .match import checkpoint_bodies
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


def _trainable_factor(node) -> bool:
    """A trainable 2-D graph input: a LoRA factor multiplied as `x @ A.T` (litgpt's LoRA), made a linear so that
    `match` finds the branch (any other such product is a linear of a trainable weight all the same)."""
    return is_trainable_placeholder(node) and example_value(node).dim() == 2


_PRODUCTS = (operator.matmul, torch.matmul, torch.mm, "matmul", "mm", "__matmul__")  # x @ W, as a linear's
_ADDMMS = (torch.addmm, "addmm")
_RESHAPES = (torch.reshape,)
_RESHAPE_METHODS = ("view", "reshape")


def _linear_form(node: fx.Node) -> tuple | None:
    """(target, args, in_out) of the linear that the product `node` computes, or None; `in_out`: args[1] is
    a weight stored (in, out), which `_rewrite` transposes with a new node."""
    if node.op not in ("call_function", "call_method") or node.kwargs:
        return None
    if node.target in _ADDMMS and len(node.args) == 3 and isinstance(node.args[0], fx.Node):
        bias, x, w = node.args  # Conv1D: addmm(b, x, W), W (in, out); or addmm(b, x, W.t()), W (out, in)
    elif node.target in _PRODUCTS and len(node.args) == 2:
        (x, w), bias = node.args, None
    else:
        return None
    if _frozen_weight(w):  # x @ W, W (in, out)
        return F.linear, (x, w, bias), True
    w = _transposed(w)
    if _frozen_weight(w) or _trainable_factor(w):
        return F.linear, (x, w, bias), False
    if is_dequant(w):
        packed, _, group_size, _ = w.args
        return torch.ops.lowra.lora_linear.default, (x, x, packed, group_size, bias, None, None, 0.0), False
    return None


def _is_reshape(node) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.args[0] if node.args else None, fx.Node) and (
        (node.op == "call_method" and node.target in _RESHAPE_METHODS)
        or (node.op == "call_function" and node.target in _RESHAPES)
    )


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(statically_known_true(sym_eq(i, j)) for i, j in zip(a, b))


def _unflattened(node: fx.Node) -> tuple | None:
    """(target, args) of a row-wise product of a frozen or packed weight computed on the flattened input
    and unflattened again (`node` is the unflattening view), as one call on the unflattened input; or None."""
    if not _is_reshape(node) or len(node.args[0].users) != 1:
        return None
    inner = node.args[0]
    if inner.op != "call_function" or not inner.args or not _is_reshape(inner.args[0]) or len(inner.args[0].users) != 1:
        return None
    flat = inner.args[0]
    x = flat.args[0]
    if inner.target is F.linear:
        weight = inner.args[1]
        if not (_frozen_weight(weight) or (weight.target is torch.t and _frozen_weight(weight.args[0]))):
            return None
        args = (x, *inner.args[1:])
    elif is_lowra_op(inner) and inner.args[1] is flat and inner.args[5] is None:
        args = (x, x, *inner.args[2:])
    else:
        return None
    x_value, flat_value, out_value = example_value(x), example_value(flat), example_value(node)
    if any(not isinstance(v, torch.Tensor) for v in (x_value, flat_value, out_value)):
        return None
    if flat_value.dim() != 2 or not _same_shape(flat_value.shape[-1:], x_value.shape[-1:]):
        return None  # not a flattening of x's leading dimensions
    if not _same_shape(out_value.shape[:-1], x_value.shape[:-1]):
        return None  # not their unflattening
    return inner.target, args


def _rewrite(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        form = _linear_form(node)
        if form is None:
            continue
        target, args, in_out = form
        operand = node.args[-1]  # W, or W.T (of a placeholder, or of the recompile's dequantization)
        with graph.inserting_before(node):
            if in_out:
                args = (args[0], _transpose(graph, args[1]), *args[2:])
            linear = graph.call_function(target, args)
        linear.meta = dict(node.meta)
        node.replace_all_uses_with(linear)
        graph.erase_node(node)
        if operand.op != "placeholder" and not operand.users:
            source = operand.args[0]
            graph.erase_node(operand)
            if source.op != "placeholder" and not source.users:
                graph.erase_node(source)
    for node in list(graph.nodes):
        form = _unflattened(node)
        if form is None:
            continue
        inner, flat = node.args[0], node.args[0].args[0]
        with graph.inserting_before(node):
            linear = graph.call_function(*form)
        linear.meta = dict(node.meta)
        node.replace_all_uses_with(linear)
        for old in (node, inner, flat):
            graph.erase_node(old)
    graph.lint()


def _transpose(graph: fx.Graph, w: fx.Node) -> fx.Node:
    wt = graph.call_function(torch.t, (w,))
    wt.meta["example_value"] = example_value(w).t()  # what `match` reads of a weight
    return wt


def _has_form(graph: fx.Graph) -> bool:
    return any(_linear_form(n) or _unflattened(n) for n in graph.nodes)


def linear_forms(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` with every matrix product of a frozen or packed weight that computes a linear layer as a
    linear (a copy), or `gm` itself when it has none."""
    graphs = [gm.graph, *(body.graph for _, body in checkpoint_bodies(gm))]
    if not any(_has_form(g) for g in graphs):
        return gm
    new, _ = copy_graph_module(gm)
    _rewrite(new.graph)
    for call, body in checkpoint_bodies(new):
        if _has_form(body.graph):
            body, _ = copy_graph_module(body)
            _rewrite(body.graph)
            body.recompile()
            setattr(new, call.args[0].target, body)  # Dynamo's module keeps its own body
    new.recompile()
    return new
