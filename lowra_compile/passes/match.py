"""Find the frozen linear layers of a Dynamo graph and the PEFT LoRA branches on them.

A site is one frozen linear, in one of two forms, optionally followed by a LoRA branch:

    before (first compile)                          before (recompile, weight already packed)
    %y  = linear(%x, %W_frozen, %b)                 %y = lowra.lora_linear(%x, %x, [%p0..%p10], 64, %b,
    (or %y = linear(%x, t(%W_frozen), %b) for a                            None, None, 0.0)
     weight stored (in, out): a transposed site)
    then, optionally, the LoRA branch:
    %xl = dropout(%x, p, True, False)     # absent when lora_dropout=0; x_lora may be any node
    %h  = linear(%xl, %A, None)
    %z  = linear(%h, %B, None)
    %m  = mul(%z, scaling)                # scaling: python float, or a SymFloat node under dynamic=True
    %o  = add(%y, %m)                     # (or mul(scaling, %z), truediv(%z, c); a hand-written LoRA
                                          #  with trainable A and B may add %z itself: scaling 1)

A mixture's experts stacked in one tensor and run by a grouped product are grouped sites (`match_experts`).
`match_sites` only reads the graph (`sites` holds what it finds); `rewrite` turns each site into one
`lowra.lora_linear` call, or one `lowra.grouped_linear` call for a grouped site.
A weight is only a site when every use of it in the graph is such a linear, or PEFT's DoRA reading it again
(`match_dora.DoraRead`); anything else (a tied embedding) leaves the layer dense, with one warning that names it.
Products that compute a linear layer another way (`x @ W.T`, `x @ W`, GPT-2's Conv1D `addmm(b, x, W)`) are
made linears beforehand (`linear_forms`); frozen weights that still reach a matrix product (a batched or
scaled one, einsum, a grouped product this module does not recognise, a linear of the weight scaled or
converted) stay dense, with one warning per graph that names them.
"""

from __future__ import annotations

import operator
import re
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx

from ..config import skips
from .fx_nodes import (
    ADD, DIV, MUL, example_value, is_frozen_matrix, is_linear, is_lowra_op, is_placeholder, is_trainable_placeholder, linear_args,
    only_user,
)
from .match_dora import dora_cast_reads, dora_read, packed_dora_read
from .match_experts import experts_hint, grouped_site, is_grouped_mm
from .sites import LinearSite, LoraBranch
from .sources import is_parameter, is_peft_factor, packed_site_name, placeholder_name

# Matrix products other than F.linear, and the views a weight may pass through on its way to one.
# (and nn.MultiheadAttention's forward, which Dynamo keeps as one call that runs all its projections inside)
_MATMULS = {operator.matmul, torch.matmul, torch.mm, torch.addmm, torch.bmm, torch.baddbmm, torch.einsum,
            F.multi_head_attention_forward}
_MATMUL_METHODS = {"matmul", "mm", "addmm", "__matmul__"}
# (a slice or chunk of W too: a fused weight read in parts, which no site packs)
_VIEWS = {torch.t, torch.transpose, torch.permute, torch.reshape, torch.unsqueeze, torch.squeeze, operator.getitem,
          torch.narrow, torch.chunk, torch.split}
_VIEW_METHODS = {"t", "transpose", "permute", "view", "reshape", "contiguous", "unsqueeze", "squeeze", "expand",
                 "narrow", "chunk", "split"}
# ops that make of one weight another it still stands for (scaled, converted): a product of one reads the weight
_DERIVED = {operator.mul, operator.truediv, operator.neg, torch.mul, torch.div}
_DERIVED_METHODS = {"mul", "div", "neg", "to", "float", "half", "bfloat16", "clone", "detach"}


def _match_lora(base: fx.Node) -> LoraBranch | None:
    """The LoRA branch added onto `base`, if `base`'s only user is `add(base, mul(linear(linear(xl, A), B, bB), s))`
    (bB, B's bias, may be None; the scaling as `_scaled`)."""
    add = only_user(base)
    # (no kwargs: torch.add's alpha scales the branch, and the op would drop it)
    if add is None or add.op != "call_function" or add.target not in ADD or len(add.args) != 2 or add.kwargs:
        return None
    scaled = _scaled(add.args[1] if add.args[0] is base else add.args[0])
    if scaled is None:
        return None
    lin_b, scaling, scaling_nodes = scaled
    if not isinstance(lin_b, fx.Node) or not is_linear(lin_b) or len(lin_b.users) != 1:
        return None
    h, lora_b, b_bias = linear_args(lin_b)  # b_bias: a node, or None
    if not is_linear(h) or len(h.users) != 1:
        return None
    x_lora, lora_a, a_bias = linear_args(h)
    if a_bias is not None or not _lora_factors(lora_a, lora_b):
        return None
    if not scaling_nodes and not (is_trainable_placeholder(lora_a) and is_trainable_placeholder(lora_b)):
        return None  # two frozen low-rank linears added unscaled: a base model's own layers, not an adapter
    if not _constant_scalar(scaling):
        return None
    return LoraBranch(x_lora, lora_a, lora_b, scaling, (h, lin_b, *scaling_nodes, add), add, b_bias)


def _constant_scalar(scaling: object) -> bool:
    """Whether the packed op can take `scaling` as its float, and the pipeline read it for LoftQ: a number, a
    graph input that is a symbolic one (dynamic=True) or a 0-dim tensor nothing trains (PEFT keeps the scaling
    so for a compiled hotswap), or the `item()` of a graph input. A trainable scale would get no
    gradient through the op, a per-channel one is no scalar, and one computed in the forward is no input: such a
    branch runs unfused."""
    if isinstance(scaling, (int, float)):
        return True
    if not isinstance(scaling, fx.Node):
        return False
    value = example_value(scaling)
    if isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):
        # (PEFT's float scaling under dynamic=True: `item()` of a placeholder Dynamo made of it)
        return is_placeholder(scaling) or (scaling.target == "item" and is_placeholder(scaling.args[0]))
    return (is_placeholder(scaling) and isinstance(value, torch.Tensor) and value.dim() == 0
            and not value.requires_grad and value.dtype.is_floating_point)


def _scaled(branch: object) -> tuple[object, object, tuple[fx.Node, ...]] | None:
    """(z, s, the nodes that scale z) of the branch a LoRA layer adds onto its base output: `mul(z, s)` or
    `mul(s, z)` (PEFT's, torchtune's), `truediv(z, c)` of a number c (s = 1 / c), or `z` alone (s = 1: a
    hand-written LoRA without a scaling)."""
    if not isinstance(branch, fx.Node) or len(branch.users) != 1:
        return None
    if branch.target in MUL and len(branch.args) == 2 and not branch.kwargs:
        z, s = branch.args
        return (s, z, (branch,)) if isinstance(s, fx.Node) and is_linear(s) else (z, s, (branch,))
    if branch.target in DIV and len(branch.args) == 2 and not branch.kwargs and isinstance(branch.args[1], (int, float)):
        return (branch.args[0], 1 / branch.args[1], (branch,)) if branch.args[1] else None
    return branch, 1.0, ()


def _lora_factors(lora_a, lora_b) -> bool:
    """Whether A and B are a LoRA adapter's factors: trainable graph inputs, or graph inputs of low rank,
    r < min(k, n), which no base layer has, with one or both frozen: an adapter loaded for inference (PEFT's
    `from_pretrained` freezes both) or LoRA-FA's (PEFT's `create_lorafa_optimizer` freezes A)."""
    if is_trainable_placeholder(lora_a) and is_trainable_placeholder(lora_b):
        return True
    if not (is_placeholder(lora_a) and is_placeholder(lora_b)):
        return False
    a, b = example_value(lora_a), example_value(lora_b)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 2 and t.dtype.is_floating_point for t in (a, b)):
        return False
    return a.shape[0] == b.shape[1] and a.shape[0] < min(a.shape[1], b.shape[0])


def _branch_linears(graph: fx.Graph) -> set[fx.Node]:
    """The adapter products of every LoRA branch in `graph`: they are part of their base layer's site, never
    sites of their own, even when the adapter is frozen."""
    branches = (_match_lora(n) for n in graph.nodes if is_linear(n) or is_lowra_op(n))
    return {node for lora in branches if lora is not None for node in lora.nodes[:2]}


def checkpoint_bodies(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.GraphModule]]:
    """(call, body) of each activation-checkpointed region, whose linears are rewritten inside the body.

    Non-reentrant checkpointing reaches the backend as a higher-order op over a subgraph whose
    placeholders are the call's operands, in order:
        %out = tag_activation_checkpoint(%wrap_body_0, %x, %W_q, %A_q, %B_q, ..., use_reentrant=False)
    A body that more than one call shares is left alone (its sites would belong to several weights).
    """
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.higher_order.tag_activation_checkpoint:
            get_body = node.args[0]
            body = getattr(gm, get_body.target, None) if get_body.op == "get_attr" else None
            if isinstance(body, fx.GraphModule) and len(get_body.users) == 1:
                out.append((node, body))
    return out


def body_inputs(call: fx.Node, body: fx.GraphModule) -> dict[fx.Node, object]:
    """Each placeholder of a checkpoint body -> the operand of `call` that feeds it."""
    return dict(zip((n for n in body.graph.nodes if n.op == "placeholder"), call.args[1:]))


def match_sites(gm: fx.GraphModule, skip: tuple[str, ...] = (), pack_routers: bool = False,
                model_frozen: Callable[[], bool] = lambda: False) -> list[LinearSite]:
    """All rewritable frozen linears of `gm` and of its checkpointed regions, in graph order.

    Layers named in `skip` stay dense, and so do a mixture's routers unless `pack_routers`. Warns once per
    layer it must leave dense, and when the graph's linears are all trainable, unless `model_frozen()`: the
    model around the graph holds frozen weights (a graph break can leave its trainable head alone in a graph).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = {n: i for i, n in enumerate(placeholders)}
    stays_dense = _dense_rule(skip, pack_routers)
    sites = _scan(gm.graph, {n: n for n in placeholders}, index, stays_dense, None)
    bodies = [(body.graph, {n: w for n, w in body_inputs(call, body).items() if w in index}, call)
              for call, body in checkpoint_bodies(gm)]
    for graph, outer, call in bodies:
        sites += _scan(graph, outer, index, stays_dense, call)
    if not sites and not model_frozen():
        _warn_trainable_only([(gm.graph, {n: n for n in placeholders}), *((g, o) for g, o, _ in bodies)])
    return sites


def _warn_trainable_only(graphs: list[tuple[fx.Graph, dict[fx.Node, fx.Node]]]) -> None:
    """A graph whose linears have trainable weights (not LoRA adapters) and that holds no frozen matrix is a
    model nobody froze (frozen weights left dense for a reason of their own were warned about as such)."""
    if any(node.op == "placeholder" and node in outer and is_parameter(outer[node])
           and is_frozen_matrix(example_value(node), dims=(2, 3)) for graph, outer in graphs for node in graph.nodes):
        return
    names = [
        placeholder_name(outer[node.args[1]])
        for graph, outer in graphs for node in graph.nodes
        if is_linear(node) and node.args[1] in outer and is_trainable_placeholder(node.args[1])
    ]
    names = [n for n in names if not is_peft_factor(n)]
    if names:
        warnings.warn(
            f"lowra: nothing in this graph is quantized: its {len(names)} linear layer(s) have trainable weights "
            f"(e.g. {names[0]!r}). lowra quantizes frozen weights: add LoRA adapters (PEFT's get_peft_model "
            "freezes the base) or freeze the layers to quantize with requires_grad_(False).",
            stacklevel=4,
        )


def _scan(graph: fx.Graph, outer: dict[fx.Node, fx.Node], index: dict[fx.Node, int], stays_dense: Callable[..., bool],
          scope) -> list[LinearSite]:
    """Sites of one graph; `outer` maps its placeholders to the top-level placeholders that feed them."""
    sites: list[LinearSite] = []
    other_products: dict[str, str] = {}  # frozen weight name -> the op that reads it instead of F.linear
    stacked: dict[fx.Node, str] = {}  # frozen 3-D weights (a mixture's experts): packed only as grouped sites
    adapters = _branch_linears(graph)
    told: set[fx.Node] = set()  # frozen weights already warned about
    for node in graph.nodes:
        if is_grouped_mm(node):
            site = grouped_site(node, outer, index, stays_dense, scope)
            if site is not None:
                sites.append(site)
                continue
        if is_matmul(node) or is_grouped_mm(node):
            for w in filter(None, map(_viewed_placeholder, node.all_input_nodes)):
                frozen = is_frozen_matrix(example_value(w), dims=(2, 3))  # 3: stacked experts
                if w in outer and frozen and is_parameter(outer[w]):  # not an activation after a graph break
                    other_products[placeholder_name(outer[w])] = _op_name(node)
        elif node.op == "placeholder" and node in outer and is_parameter(outer[node]) and _stack_of_matrices(node):
            stacked[node] = placeholder_name(outer[node])
        if is_linear(node) and node not in adapters:
            x, w, bias = linear_args(node)
            transposed = _is_transpose(w) and w.args[0] in outer
            if transposed:
                w = w.args[0]
            value = example_value(w) if isinstance(w, fx.Node) else None
            if w not in outer or not isinstance(value, torch.Tensor) or value.requires_grad or value.dim() != 2:
                source = _viewed_placeholder(w) if isinstance(w, fx.Node) and w not in outer else None
                if source in outer and is_frozen_matrix(example_value(source)) and is_parameter(outer[source]):
                    other_products[placeholder_name(outer[source])] = f"linear of {_op_name(w)}(W)"  # e.g. W * 0.5
                continue
            name = placeholder_name(outer[w])
            if stays_dense(name, node) or is_peft_factor(name):
                continue
            if not value.dtype.is_floating_point:
                raise ValueError(
                    f"lowra: layer {name!r} has {value.dtype} weights; only real floating-point weights can be "
                    f"quantized. Convert the model to float32/bfloat16 or skip the layer with options={{'skip': ({name!r},)}}"
                )
            reason = _unsupported(w, transposed)
            if reason:
                if w not in told:  # one weight read by two linears (as W and as W^T): one warning
                    caller = _module_name(_module_path(node))
                    layer = f"{caller!r} (its weight: {name!r})" if caller and not name.startswith(caller) else repr(name)
                    warnings.warn(f"lowra: layer {layer} stays dense: {reason}", stacklevel=3)
                    told.add(w)
                continue
            lora = _match_lora(node)
            if lora is not None and _match_lora(lora.add) is not None:
                warnings.warn(
                    f"lowra: layer {name!r} has several active LoRA adapters: the first is fused into the "
                    "low-bit op, the others run as separate ops",
                    stacklevel=3,
                )
            shape = tuple(value.shape[::-1] if transposed else value.shape)
            sites.append(LinearSite(name, node, x, bias, w, index[outer[w]], None, None, lora, shape, scope, transposed,
                                    dora=dora_read(w, transposed)))
        elif is_lowra_op(node) and node.args[5] is None:
            x, _, packed, group_size, bias = node.args[:5]
            shape = (example_value(packed[0]).shape[0], example_value(x).shape[-1])
            name = packed_site_name(packed[0], outer)
            # one weight may have several packed ops (DoRA with dropout: the base output of the dropped-out
            # input too); its DoRA reads belong to the first
            dora = None if any(s.packed == list(packed) for s in sites) else packed_dora_read(list(packed))
            sites.append(LinearSite(name, node, x, bias, None, None, list(packed), group_size, _match_lora(node), shape, scope,
                                    dora=dora))
    grouped = {site.weight for site in sites if site.experts}
    for site in sites:  # a site's weight is read only as its linear, DoRA's reads, or (experts) LoRA's update
        other_products.pop(site.name, None)
    for w, name in stacked.items():
        readers = [u for u in w.users if u.target is not torch.ops.higher_order.tag_activation_checkpoint]
        if w not in grouped and readers and name not in other_products:  # checkpointed bodies: scanned apart
            other_products[name] = _op_name(readers[0])
    _warn_other_products(other_products, stacked, stays_dense)
    return sites


def _stack_of_matrices(node: fx.Node) -> bool:
    """A frozen 3-D parameter holding more than one matrix: a mixture's experts, not a tensor of one broadcast
    over the batch (ViT's class token and position embeddings, [1, T, D]), which no product reads as weights."""
    value = example_value(node)
    return is_frozen_matrix(value, dims=(3,)) and value.shape[0] > 1


def is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MATMULS) or (
        node.op == "call_method" and node.target in _MATMUL_METHODS
    )


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _viewed_placeholder(node: fx.Node) -> fx.Node | None:
    """The placeholder that `node` is a view of or is computed from alone (W, W.T, W.t(), W.view(...),
    W.expand(...), W * 0.5, W.float(), ...), or None."""
    while True:
        if node.op == "placeholder":
            return node
        is_view = (
            (node.op == "call_function" and node.target in _VIEWS | _DERIVED)
            or (node.op == "call_method" and node.target in _VIEW_METHODS | _DERIVED_METHODS)
            or (node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"))
        )
        if not is_view or not isinstance(node.args[0], fx.Node) or any(isinstance(a, fx.Node) for a in node.args[1:]):
            return None
        node = node.args[0]


def _warn_other_products(other_products: dict[str, str], stacked: dict[fx.Node, str], stays_dense) -> None:
    names = [n for n in other_products if not stays_dense(n)]
    if names:
        ops = ", ".join(sorted({other_products[n] for n in names}))
        listed = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        warnings.warn(
            f"lowra: {len(names)} frozen weight(s) stay dense: {listed}. They are read by {ops}, not F.linear; "
            "lowra quantizes the layers that call F.linear (torch.nn.Linear) or compute x @ W.T, x @ W or "
            "addmm(b, x, W) (GPT-2's Conv1D), so these keep their full size"
            + experts_hint([n for n in names if n in stacked.values()])
            + (_MULTI_HEAD_HINT if F.multi_head_attention_forward.__name__ in ops else ""),
            stacklevel=4,
        )


_MULTI_HEAD_HINT = (
    " torch.nn.MultiheadAttention runs its projections inside one call, F.multi_head_attention_forward: to have "
    "them packed, write the attention with torch.nn.Linear projections and F.scaled_dot_product_attention."
)


def _dense_rule(skip: tuple[str, ...], pack_routers: bool) -> Callable[..., bool]:
    """stays_dense(name, node=None): whether a weight stays dense, by name (or its calling module's path) or, unless
    `pack_routers`, because a mixture's router reads it."""
    def dense(name: str, node: fx.Node | None = None) -> bool:
        if skips(skip, name):
            return True
        return node is not None and (skips(skip, _module_path(node)) or (not pack_routers and _in_router(node)))
    return dense


def _in_router(node: fx.Node) -> bool:
    """Whether a mixture's router made the call: transformers' routers are modules named *Router
    (MixtralTopKRouter, Qwen3MoeTopKRouter, GptOssTopKRouter, DeepseekV3TopkRouter, ...). Their few rows
    (one per expert) pick the experts: an error there flips a token's experts rather than nudging its output,
    and keeping them dense costs one row per expert."""
    stack = node.meta.get("nn_module_stack")
    cls = next(reversed(stack.values()))[1] if stack else ""
    return (cls if isinstance(cls, str) else getattr(cls, "__name__", "")).lower().endswith("router")


def _module_path(node: fx.Node) -> str:
    """The module that made the call, e.g. "L['args'][0].lm_head": a tied lm_head's weight is named after
    the embedding, so `skip` also looks at the module."""
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else ""


def _module_name(path: str) -> str:
    """A module path of Dynamo's as the model names the module: "L['args'][0].lm_head" -> "lm_head",
    "L['self'].__dict__['_modules']['model'].output_projection" -> "model.output_projection" (BioGPT's)."""
    path = re.sub(r"^L\[[^.]*\.?", "", path)
    return re.sub(r"(?:__dict__\['_modules'\]|_modules)\['([^']+)'\]", r"\1", path)


def _is_transpose(node) -> bool:
    """`torch.t(W)`, as `linear_forms` writes an (in, out) weight's linear."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.t


def _unsupported(w: fx.Node, transposed: bool) -> str | None:
    """Why weight `w` cannot be packed, or None when every read of it is a linear's weight (of `t(w)` when
    `transposed`)."""
    weights = [t for t in w.users if _is_transpose(t)] if transposed else [w]
    others = [u for u in w.users if u not in weights] if transposed else []
    others += [u for n in weights for u in n.users if not (is_linear(u) and u.args[1] is n)]
    others = [u for u in others if dora_cast_reads(u, transposed) is None]
    if any(u.target is F.embedding for u in others):
        return "it is tied to an embedding table (F.embedding needs the dense rows)"
    if others:
        ops = sorted({str(getattr(u.target, "__name__", u.target)) for u in others})
        return (f"its weight is also read outside its F.linear ({', '.join(ops)}; e.g. a tied output layer, or the "
                "weight used as a matrix), which needs it dense")
    return None
