"""Predicates and accessors over the nodes of a Dynamo graph, shared by the matching and rewriting passes."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

ADD = (operator.add, torch.add)
MUL = (operator.mul, torch.mul)
DIV = (operator.truediv, torch.div)


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.linear


def is_lowra_op(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (
        torch.ops.lowra.lora_linear.default,
        torch.ops.lowra.lora_linear,
    )


def is_dequant(node: fx.Node) -> bool:
    """A `lowra.dequant` call whose only reader is the product it feeds (a packed weight seen after a recompile)."""
    return isinstance(node, fx.Node) and _calls_dequant(node) and len(node.users) == 1


def is_dequant_of(node: fx.Node, packed: list[fx.Node]) -> bool:
    """A `lowra.dequant` call of the packed tensors `packed` (a released weight read otherwise than by a linear)."""
    return _calls_dequant(node) and list(node.args[0]) == list(packed)


def _calls_dequant(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch.ops.lowra.dequant.default, torch.ops.lowra.dequant)


def example_value(node: fx.Node) -> object:
    """The fake (or real) value Dynamo recorded for `node`."""
    return node.meta.get("example_value", node.meta.get("val"))


def linear_args(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return x, w, bias


def is_placeholder(node: object) -> bool:
    """A graph input: a parameter, frozen or trained, or an activation after a graph break."""
    return isinstance(node, fx.Node) and node.op == "placeholder"


def is_trainable_placeholder(node: object) -> bool:
    if not is_placeholder(node):
        return False
    value = example_value(node)
    return isinstance(value, torch.Tensor) and value.requires_grad


def only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def is_frozen_matrix(value: object, dims: tuple[int, ...] = (2,)) -> bool:
    """A frozen floating-point tensor of `dims` dimensions (a weight matrix; 3 for experts stacked in one)."""
    return (
        isinstance(value, torch.Tensor) and not value.requires_grad and value.dim() in dims
        and value.dtype.is_floating_point
    )
