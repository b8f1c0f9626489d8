"""Replace each site by one `lowra.lora_linear` call on its packed weight.

    before                                            after
    %y  = linear(%x, %W, %b)                          %p0 .. %p10 = placeholder   (packed tensors, appended)
    %xl = dropout(%x, 0.1, True, False)               %xl = dropout(%x, 0.1, True, False)
    %h  = linear(%xl, %A, None)                       %o  = lowra.lora_linear(%x, %xl, [%p0..%p10], 64, %b,
    %z  = linear(%h, %B, None)                                                %A, %B, 2.0)
    %m  = mul(%z, 2.0)
    %o  = add(%y, %m)

A grouped site (a mixture's stacked experts, `match`) becomes one `lowra.grouped_linear` call:

    %wt = transpose(%W_experts, -2, -1)               %y = lowra.grouped_linear(%x, %offsets, [%p0..%p10], 64, E)
    %y  = grouped_mm(%x, %wt, offs=%offsets)

and with PEFT's LoRA on the experts (`match_experts.ExpertsLora`), the adapter runs on its factors, expert by expert,
beside the packed experts; the update PEFT caches is rebuilt from the packed weight (W is freed):

    %u  = baddbmm(%W_experts, %lhs, %rhs, alpha=s)    %w  = lowra.dequant([%p0..%p10], K, 64, dtype)
    %ut = transpose(%u, -2, -1)                       %u  = baddbmm(view(%w, (E, N, K)), %lhs, %rhs, alpha=s)
    %y  = grouped_mm(%x, %ut, offs=%offsets)          %b  = lowra.grouped_linear(%x, %offsets, [%p0..%p10], 64, E)
    return (.., %u)                                   %h  = grouped_mm(%x, transpose(%rhs, -2, -1), offs=%offsets)
                                                      %z  = grouped_mm(%h, transpose(%lhs, -2, -1), offs=%offsets)
                                                      %y  = add(%b, mul(%z, s))
                                                      return (.., %u)

(experts stored (E, K, N), read without the transpose: %h = grouped_mm(%x, %lhs), %z = grouped_mm(%h, %rhs)).

B's bias (PEFT's `lora_bias`), if any, stays outside the op: `%o = add(lowra.lora_linear(..), mul(%bB, 2.0))`.
PEFT's DoRA reads of W (`match_dora.DoraRead`) read the packed weight; its adapter runs as ordinary ops, since
DoRA scales the base output and the adapter's by the magnitude over the norm (for a weight stored (in, out),
the same after `detach(getattr(%wc, "T"))`). The norm is one op on the packed weight and the detached
adapters, so neither W nor PEFT's B A (built from an identity [K, K]) is ever dense:

    %e  = eye(K)                                      %n  = lowra.dora_row_norms([%p0..%p10], K, 64,
    %l  = getattr(linear(linear(%e, %A), %B), "T")                                   detach(%A), detach(%B), 2.0)
    %wc = to(%W, torch.float32)
    %ws = add(%wc, mul(2.0, detach(%l)))
    %n  = linalg_norm(%ws, dim=1)
    %yd = linear(%xd, %wc, None)                      %yd = lowra.lora_linear(%xd, %xd, [%p0..%p10], 64, None,
                                                                              None, None, 0.0)

(where `match` finds no adapter in the norm, the norm stays and reads `lowra.dequant([%p0..%p10], ..)` for W).
A weight already packed is read as `%w = lowra.dequant([%p0..%p10], ..)` in place of `%wc`, and the same
norm takes its place (`match_dora.packed_dora_read`).
Dropout stays in the graph (its RNG belongs to the graph, not the op). The dense weight placeholder stays
too, unused, because Dynamo keeps passing it. Dynamo's own graph is never modified: `rewrite` copies it,
keeping `_dynamo_source` on every placeholder and the GraphModule's metadata that aot_autograd reads.
New placeholders carry static fake values; the caller passes the real packed tensors as trailing
arguments.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from .fx_nodes import example_value, linear_args
from .release import in_stored_shape
from .sites import LinearSite

_DYNAMO_ATTRS = ("meta", "_param_name_to_source")


def copy_graph_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A copy of Dynamo's GraphModule that can be changed freely, and the old -> new node map."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        new = graph.node_copy(node, lambda n: env[n])
        if hasattr(node, "_dynamo_source"):
            new._dynamo_source = node._dynamo_source
        env[node] = new
    copy = fx.GraphModule(gm, graph)
    for attr in _DYNAMO_ATTRS:
        if hasattr(gm, attr):
            setattr(copy, attr, getattr(gm, attr))
    return copy, env


def _add_placeholders(graph: fx.Graph, tensors: list[Tensor], prefix: str, fake_mode) -> list[fx.Node]:
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    nodes = []
    with graph.inserting_after(last):
        for i, t in reversed(list(enumerate(tensors))):
            node = graph.placeholder(f"{prefix}_{i}")
            node._dynamo_source = None
            fake = fake_mode.from_tensor(t, static_shapes=True) if fake_mode is not None else t
            node.meta["example_value"] = node.meta["val"] = fake
            node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
            nodes.append(node)
    return nodes[::-1]


def _body_copy(new_gm: fx.GraphModule, call: fx.Node, bodies: dict) -> tuple[fx.GraphModule, dict]:
    """The changeable copy of the checkpoint body that `call` (a node of `new_gm`) runs, made once."""
    if call not in bodies:
        target = call.args[0].target
        body, body_env = copy_graph_module(getattr(new_gm, target))
        setattr(new_gm, target, body)  # only the copy sees it: Dynamo's module keeps its own body
        bodies[call] = body, body_env
    return bodies[call]


def _replace(old_out: fx.Node, op, args: tuple, replaced: list[fx.Node]) -> fx.Node:
    """Put `op(*args)` in place of `old_out`, then drop the nodes of `replaced` (in graph order) and
    `old_out` that nothing reads any more, the last first. Returns the new node."""
    with old_out.graph.inserting_before(old_out):
        fused = old_out.graph.call_function(op, args)
    fused.meta = dict(old_out.meta)
    old_out.replace_all_uses_with(fused)
    _erase_unread(replaced if old_out in replaced else [*replaced, old_out])
    return fused


def _add_scaled(fused: fx.Node, bias: fx.Node, scaling: float | fx.Node) -> None:
    """`fused + bias * scaling` in place of `fused` for its readers: B's bias, which the op does not take."""
    graph = fused.graph
    with graph.inserting_after(fused):
        scaled = graph.call_function(operator.mul, (bias, scaling))
    with graph.inserting_after(scaled):
        out = graph.call_function(operator.add, (fused, scaled))
    fused.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)


def _norm_from_packed(site: LinearSite, nodes: dict, packed: list[fx.Node], group_size: int) -> None:
    """DoRA's row norm of W + s B A as one `lowra.dora_row_norms` call on the packed weight and the detached
    adapters; PEFT's B A, its identity matrix and the sum go (the reads of W stay for the caller)."""
    dora, norm = site.dora, nodes[site.dora.norm]
    scaling = nodes[dora.scaling] if isinstance(dora.scaling, fx.Node) else float(dora.scaling)
    graph = norm.graph
    with graph.inserting_before(norm):
        a, b = (graph.call_method("detach", (nodes[p],)) for p in (dora.lora_a, dora.lora_b))
        out = graph.call_function(torch.ops.lowra.dora_row_norms.default, (packed, site.shape[1], group_size, a, b, scaling))
        dtype = example_value(dora.norm).dtype
        if dtype != torch.float32:
            out = graph.call_method("to", (out, dtype))
    out.meta = dict(norm.meta)
    norm.replace_all_uses_with(out)
    _erase_with_unread_inputs(norm, keep=frozenset(nodes[r] for r in dora.reads))


def _erase_with_unread_inputs(node: fx.Node, keep: frozenset[fx.Node]) -> None:
    """Erase `node`, then every input that nothing else reads, recursively; placeholders and `keep` stay."""
    inputs = node.all_input_nodes
    node.graph.erase_node(node)
    for source in inputs:
        if not source.users and source.op != "placeholder" and source not in keep:
            _erase_with_unread_inputs(source, keep)


def _read_dora_from_packed(site: LinearSite, nodes: dict, packed: list[fx.Node], group_size: int) -> None:
    """DoRA's reads of the site's weight (`match_dora.DoraRead`) served by its packed form: the row norm one op
    (`_norm_from_packed`) where `match` found its adapter, a linear of a read the packed op, anything else
    one dequantization (no dense W is kept); the casts and transposes between W and the reads go."""
    if site.dora.norm is not None:
        _norm_from_packed(site, nodes, packed, group_size)
    weight = nodes[site.weight] if site.weight is not None else None  # None: already packed, reads dequantize
    for read in (nodes[r] for r in site.dora.reads):
        graph, dtype = read.graph, example_value(read).dtype
        dense = read if weight is None else None
        for user in list(read.users):
            if user.target is F.linear:
                x, _, bias = linear_args(user)
                args = (x, x, packed, group_size, bias, None, None, 0.0)
                _replace(user, torch.ops.lowra.lora_linear.default, args, [])
                continue
            if dense is None:
                with graph.inserting_before(read):
                    dense = graph.call_function(torch.ops.lowra.dequant.default, (packed, site.shape[1], group_size, dtype))
            user.replace_input_with(read, dense)
        if read is not weight and not read.users:  # the read, then its transpose and cast once unread
            _erase_with_unread_inputs(read, keep=frozenset({weight} - {None}))


def _erase_unread(nodes: list[fx.Node]) -> None:
    """Drop the nodes (in graph order) that nothing reads any more, the last first."""
    for node in reversed(nodes):
        if not node.users:
            node.graph.erase_node(node)


def _replace_experts_with_lora(site: LinearSite, nodes: dict, args: tuple, erased: list[fx.Node]) -> None:
    """The grouped product of `site` as the packed experts' grouped op plus its LoRA factors' two grouped
    products; PEFT's update of the stack, if a graph output still reads it, made from the packed weight."""
    lora, product = site.experts_lora, nodes[site.base]
    graph, x, offsets = product.graph, nodes[site.x], nodes[site.offsets]
    lhs, rhs = nodes[lora.lhs], nodes[lora.rhs]
    with graph.inserting_before(product):
        first, second = (_transpose(graph, rhs), _transpose(graph, lhs)) if lora.transposed else (lhs, rhs)
        # laid out as the product wants: torch._grouped_mm (what transformers runs in bf16) refuses PEFT's
        # factors as the permuted views they come as, and strides that are not multiples of 16 bytes, which a
        # bf16 rank of 4 is: the rank is padded with zeros to a multiple of 8 (copies the size of the adapters)
        rank = example_value(rhs).shape[-2] if lora.transposed else example_value(lhs).shape[-1]
        pad = -rank % 8
        first = graph.call_function(F.pad, (first, (0, pad)))
        second = graph.call_function(F.pad, (second, (0, 0, 0, pad)))
        h = graph.call_function(product.target, (x, first), {"offs": offsets})
        z = graph.call_function(product.target, (h, second), {"offs": offsets})
        base = graph.call_function(torch.ops.lowra.grouped_linear.default, args)
        out = graph.call_function(operator.add, (base, graph.call_function(operator.mul, (z, lora.scaling))))
    out.meta = dict(product.meta)
    product.replace_all_uses_with(out)
    _erase_unread([*erased, product])
    update = nodes[lora.update]
    if update.users and site.weight is not None:  # still read (PEFT's cache), and W is about to be freed
        weight = nodes[site.weight]
        reader, value = next(iter(weight.users)), example_value(weight)
        with graph.inserting_before(reader):
            dense = graph.call_function(torch.ops.lowra.dequant.default, (args[2], site.shape[1], args[3], value.dtype))
            stack = in_stored_shape(fx.Proxy(dense), tuple(value.shape), site.transposed).node
        reader.replace_input_with(weight, stack)


def _transpose(graph: fx.Graph, node: fx.Node) -> fx.Node:
    return graph.call_method("transpose", (node, -2, -1))


def rewrite(
    gm: fx.GraphModule,
    sites: list[LinearSite],
    packed: dict[int, list[Tensor]],
    group_size: dict[int, int],
    fake_mode=None,
) -> tuple[fx.GraphModule, list[Tensor]]:
    """Copy `gm` and fuse every site listed in `packed` (site index -> packed tensors) into one op call.

    Sites that are already packed ops reuse their own packed inputs. A site inside a checkpointed region
    is rewritten in a copy of the region's body; its packed tensors enter the graph as placeholders, as
    usual, and are passed on to the body as extra operands of the checkpoint call:
        %o = tag_activation_checkpoint(%wrap_body_0, %x, %W_q, ..., %p0, .., %p10)   # body gains %p0..%p10
    Returns the new module and the tensors to append to its arguments, in placeholder order.
    """
    new_gm, env = copy_graph_module(gm)
    graph = new_gm.graph
    bodies: dict[fx.Node, tuple[fx.GraphModule, dict]] = {}
    extra: list[Tensor] = []
    for i, site in enumerate(sites):
        nodes = env  # original node -> node of the graph being changed
        if site.packed is not None:
            if site.scope is not None:
                _, nodes = _body_copy(new_gm, env[site.scope], bodies)
            packed_nodes = [nodes[p] for p in site.packed]
        elif i in packed:
            packed_nodes = _add_placeholders(graph, packed[i], f"lowra_packed_{i}", fake_mode)
            extra += packed[i]
            if site.scope is not None:
                call = env[site.scope]
                body, nodes = _body_copy(new_gm, call, bodies)
                call.args = (*call.args, *packed_nodes)
                packed_nodes = _add_placeholders(body.graph, packed[i], f"lowra_packed_{i}", fake_mode)
        else:
            continue
        if site.experts:
            args = (nodes[site.x], nodes[site.offsets], packed_nodes, group_size[i], site.experts)
            erased = [nodes[n] for n in site.erased]
            if site.experts_lora is None:
                _replace(nodes[site.base], torch.ops.lowra.grouped_linear.default, args, erased)
            else:
                _replace_experts_with_lora(site, nodes, args, erased)
            continue
        lora = site.lora
        args = (
            nodes[site.x],
            nodes[lora.x_lora] if lora else nodes[site.x],
            packed_nodes,
            group_size[i],
            nodes[site.bias] if isinstance(site.bias, fx.Node) else site.bias,
            nodes[lora.lora_a] if lora else None,
            nodes[lora.lora_b] if lora else None,
            (nodes[lora.scaling] if isinstance(lora.scaling, fx.Node) else float(lora.scaling)) if lora else 0.0,
        )
        transpose = [nodes[site.base].args[1]] if site.transposed else []  # t(W) of an (in, out) weight
        replaced = [*transpose, nodes[site.base], *(nodes[n] for n in (lora.nodes if lora else ()))]
        fused = _replace(nodes[site.output], torch.ops.lowra.lora_linear.default, args, replaced)
        if lora is not None and lora.b_bias is not None:
            _add_scaled(fused, nodes[lora.b_bias], args[-1])
        if site.dora is not None:
            _read_dora_from_packed(site, nodes, packed_nodes, group_size[i])
    # Placeholders must keep their relative order: the appended ones come after Dynamo's.
    for body, _ in bodies.values():
        body.graph.lint()
        body.recompile()
    graph.lint()
    new_gm.recompile()
    return new_gm, extra
