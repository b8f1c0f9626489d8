"""PEFT DoRA's reads of a frozen weight besides its linear, which `match` accepts and `rewrite` serves from
the packed weight (`DoraRead`)."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from .fx_nodes import ADD, MUL, example_value, is_dequant_of, is_linear, is_placeholder, linear_args, only_user


@dataclass
class DoraRead:
    """PEFT's DoRA reads its layer's frozen W once more, cast to the input's dtype (W's own, or the float32 of
    the adapters of a bf16 base), for the norm of each row of W + s * B A, which it detaches, and, in training
    with lora_dropout, for the base output of the dropped-out input:

        %wc = to(%W, torch.float32)
        %l  = getattr(linear(linear(eye(K), %A, None), %B, None), "T")      # B A, PEFT's lora_weight
        %ws = add(%wc, mul(2.0, detach(to(%l, torch.float32))))
        %n  = linalg_norm(%ws, dim=1)
        %yd = linear(%xd, %wc, None)                                        # lora_dropout > 0 only
        %s  = truediv(%magnitude, detach(to(%n, torch.float32)))            # the norm's reader

    For a weight stored (in, out) (GPT-2's Conv1D) each reader of `%wc` reads `detach(getattr(%wc, "T"))`
    instead, PEFT's transpose. `reads` are the nodes holding the (out, in) matrix (`%wc`, or those transposes);
    `rewrite` serves them from the packed weight (each `%yd` a packed op). `lora_a`, `lora_b` and `scaling`
    are the adapter whose B A the norm adds, which LoftQ starts, `magnitude` the one the norm divides, which
    the pipeline sets to the quantized layer's norms, and `norm` the norm `%n`, which `rewrite` computes
    from the packed weight and the adapters without PEFT's dense B A and W (all None where the chain reads
    otherwise: then the norm's W is one dequantization per call, as PEFT's DoRA dequantizes a 4-bit base)."""

    reads: tuple[fx.Node, ...]
    lora_a: fx.Node | None = None
    lora_b: fx.Node | None = None
    scaling: float | fx.Node | None = None
    magnitude: fx.Node | None = None
    norm: fx.Node | None = None


_ROW_NORMS = (torch.linalg.norm, torch._C._linalg.linalg_norm, torch.linalg.vector_norm, torch._C._linalg.linalg_vector_norm)


def dora_cast_reads(node: fx.Node, transposed: bool) -> list[fx.Node] | None:
    """The (out, in) reads (`_dora_reads`) of `node` if it is DoRA's cast of a weight to a floating dtype on its
    own device (`W.to(x.dtype)`: W's own dtype, or float32 where PEFT keeps the adapters of a bf16 base in
    float32 and casts the input to them) whose reads are read only by linears, as their weight, and by `add`s
    whose one reader is a row norm (`DoraRead`); else None."""
    if not _is_float_cast(node):
        return None
    reads = _dora_reads(node, transposed)
    if reads is None or not all(_read_as_dora_does(read) for read in reads):
        return None
    return reads


def _read_as_dora_does(read: fx.Node) -> bool:
    """Every reader of `read` (W as the (out, in) matrix) is a linear taking it as its weight, or the sum whose
    row norm DoRA takes."""
    return all((is_linear(u) and u.args[0] is not read and u.args[1] is read) or _row_norm_of(u) for u in read.users)


def _dora_reads(cast: fx.Node, transposed: bool) -> list[fx.Node] | None:
    """The nodes that hold a DoRA cast of W as the (out, in) matrix: the cast itself, or, for a weight stored
    (in, out) (GPT-2's Conv1D), each `detach(getattr(cast, "T"))` that PEFT's transpose makes of it (with
    lowra's stand-in, `peft_tracing`); None if the cast is read otherwise."""
    if not transposed:
        return [cast]
    reads = []
    for view in cast.users:
        read = only_user(view)
        if not (view.target is getattr and view.args[1] == "T" and read is not None
                and read.op == "call_method" and read.target == "detach"):
            return None
        reads.append(read)
    return reads


def _row_norm_of(node: fx.Node) -> bool:
    """`node` is an add (`W + ...`, or `W.add(...)` where W is a released weight) whose only reader is the norm of
    each of its rows, `linalg_norm(node, dim=1)`."""
    norm = only_user(node)
    is_add = (node.op == "call_function" and node.target in ADD) or (node.op == "call_method" and node.target == "add")
    return (
        is_add and norm is not None and norm.op == "call_function"
        and norm.target in _ROW_NORMS and norm.args == (node,) and norm.kwargs == {"dim": 1}
    )


def dora_read(w: fx.Node, transposed: bool) -> DoraRead | None:
    """PEFT DoRA's reads of the frozen weight `w`, if it has any (`DoraRead`)."""
    return _dora_read_of(tuple(r for u in w.users for r in dora_cast_reads(u, transposed) or ()))


def packed_dora_read(packed: list[fx.Node]) -> DoraRead | None:
    """PEFT DoRA's reads of a weight already packed (a model quantized ahead or loaded, or a recompile): each
    a `lowra.dequant` of the same packed tensors (or its cast to float32), read only by linears, as their
    weight, and by the sum whose row norm DoRA takes; for a weight stored (in, out) nothing (its reads pass
    through PEFT's transpose, left to dequantize)."""
    dequants = [u for u in packed[0].users if is_dequant_of(u, packed)]
    # a dequantization cast to another dtype (DoRA's float32 reads of a bf16 base) is read through its casts
    return _dora_read_of(tuple(r for d in dequants for r in (d, *filter(_is_float_cast, d.users))
                               if _read_as_dora_does(r)))


def _is_float_cast(node: fx.Node) -> bool:
    """`node` is `W.to(dtype)` of a node W to a floating dtype on W's own device (DoRA's `W.to(x.dtype)`)."""
    w = node.args[0] if node.args else None
    if node.op != "call_method" or node.target != "to" or not isinstance(w, fx.Node):
        return False
    value, cast = example_value(w), example_value(node)
    return isinstance(cast, torch.Tensor) and cast.device == value.device and cast.dtype.is_floating_point


def _dora_read_of(reads: tuple[fx.Node, ...]) -> DoraRead | None:
    """The `DoraRead` of the nodes holding W as the (out, in) matrix: with its adapter, magnitude and norm
    where the one row norm among their readers reads them as DoRA does."""
    if not reads:
        return None
    sums = [u for read in reads for u in read.users if _row_norm_of(u)]
    factors = _norm_adapter(sums[0]) if len(sums) == 1 else None
    magnitude = _norm_magnitude(only_user(sums[0])) if factors else None
    return DoraRead(reads, *factors, magnitude, only_user(sums[0])) if magnitude is not None else DoraRead(reads)


def _norm_magnitude(norm: fx.Node) -> fx.Node | None:
    """The trainable magnitude that DoRA divides by the row norm `norm`: `truediv(%m, detach(to(norm)))`."""
    node = norm
    while (reader := only_user(node)) is not None and reader.op == "call_method" and reader.target in ("detach", "to"):
        node = reader
    if reader is None or reader.target is not operator.truediv or reader.args[1] is not node:
        return None
    return reader.args[0] if is_placeholder(reader.args[0]) else None


def _norm_adapter(add: fx.Node) -> tuple[fx.Node, fx.Node, float | fx.Node] | None:
    """(A, B, s) of the `add(%wc, mul(s, detach(to(getattr(linear(linear(eye, A), B), "T")))))` that DoRA
    takes the norm of, or None."""
    scaled = next((a for a in add.args if isinstance(a, fx.Node) and a.target in MUL), None)
    if scaled is None or len(scaled.args) != 2:
        return None
    node, scaling = scaled.args if isinstance(scaled.args[0], fx.Node) else scaled.args[::-1]
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("detach", "to"):
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.target is getattr and node.args[1] == "T"):
        return None
    lin_b = node.args[0]
    if not is_linear(lin_b) or not is_linear(lin_b.args[0]):
        return None
    h, lora_b, b_bias = linear_args(lin_b)
    eye, lora_a, a_bias = linear_args(h)
    if not isinstance(eye, fx.Node) or eye.target is not torch.eye or a_bias is not None or b_bias is not None:
        return None
    if not (is_placeholder(lora_a) and is_placeholder(lora_b) and isinstance(scaling, (int, float, fx.Node))):
        return None
    return lora_a, lora_b, scaling
