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
    %o  = add(%y, %m)

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

`match_sites` only reads the graph; `rewrite` turns each site into one `lowra.lora_linear` call, or one
`lowra.grouped_linear` call for a grouped site.
A weight is only a site when every use of it in the graph is such a linear, or PEFT's DoRA reading it again
(`DoraRead`); anything else (a tied embedding) leaves the layer dense, with one warning that names it.
Products that compute a linear layer another way (`x @ W.T`, `x @ W`, GPT-2's Conv1D `addmm(b, x, W)`) are
made linears beforehand (`linear_forms`); frozen weights that still reach a matrix product (a batched or
scaled one, einsum, a grouped product this module does not recognise) stay dense, with one warning per
graph that names them.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx

from .sources import is_parameter, placeholder_name

_ADD = (operator.add, torch.add)
_MUL = (operator.mul, torch.mul)
_DROPOUT = (F.dropout, torch.dropout, torch.nn.functional.dropout)
# Matrix products other than F.linear, and the views a weight may pass through on its way to one.
_MATMULS = {operator.matmul, torch.matmul, torch.mm, torch.addmm, torch.bmm, torch.baddbmm, torch.einsum}
_MATMUL_METHODS = {"matmul", "mm", "addmm", "__matmul__"}
_VIEWS = {torch.t, torch.transpose, torch.permute, torch.reshape}
_VIEW_METHODS = {"t", "transpose", "permute", "view", "reshape", "contiguous"}


@dataclass
class LoraBranch:
    """The nodes of one LoRA branch: x_lora feeds linear(A); `add` is the node whose value the site replaces."""

    x_lora: fx.Node
    lora_a: fx.Node
    lora_b: fx.Node
    scaling: float | fx.Node
    nodes: tuple[fx.Node, ...]  # linear(A), linear(B), mul, add: replaced by the fused op
    add: fx.Node
    b_bias: fx.Node | None = None  # B's bias (PEFT's lora_bias), added after the fused op times the scaling


@dataclass
class DoraRead:
    """PEFT's DoRA reads its layer's frozen W once more, cast to the input's dtype (a cast to W's own dtype
    here), for the norm of each row of W + s * B A, which it detaches, and, in training with lora_dropout,
    for the base output of the dropped-out input:

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


@dataclass
class ExpertsLora:
    """PEFT's LoRA on a mixture's stacked experts: the grouped product reads `update` = W + scaling * lhs @ rhs,
    through a transpose when `transposed` (so each expert's rows get x @ (lhs @ rhs)^T, or x @ lhs @ rhs)."""

    lhs: fx.Node
    rhs: fx.Node
    scaling: float
    update: fx.Node  # the baddbmm; also a graph output when PEFT caches it
    transposed: bool


@dataclass
class LinearSite:
    """One frozen linear. `weight_index` is the position of W in the top-level placeholders (= example_inputs).

    The nodes belong to the top-level graph, or to the body of the checkpoint call `scope`.
    """

    name: str
    base: fx.Node
    x: fx.Node
    bias: fx.Node | None
    weight: fx.Node | None  # placeholder of the dense weight (None for an already packed op)
    weight_index: int | None
    packed: list[fx.Node] | None  # packed tensor nodes of an existing lowra op
    group_size: int | None  # of an existing lowra op
    lora: LoraBranch | None
    shape: tuple[int, int]
    scope: fx.Node | None = None  # the checkpoint call whose body holds the site (None: the top-level graph)
    transposed: bool = False  # the weight is stored (in, out) and read as linear(x, t(W)): GPT-2's Conv1D
    experts: int = 0  # a grouped site: E experts stacked in one [E, N, K] weight, packed as [E*N, K] (shape)
    offsets: fx.Node | None = None  # of a grouped site: each expert's cumulative end row in x
    erased: tuple[fx.Node, ...] = ()  # of a grouped site: (dequant, view,) transpose of its weight, to drop
    experts_lora: ExpertsLora | None = None  # of a grouped site: PEFT's LoRA on the experts themselves
    dora: DoraRead | None = None  # PEFT's DoRA reads of the weight besides the linear

    @property
    def adapter(self) -> LoraBranch | DoraRead | None:
        """The LoRA factors on this layer that LoftQ may start: the fused branch's, or DoRA's (with its
        magnitude)."""
        if self.lora is not None:
            return self.lora
        return self.dora if self.dora is not None and self.dora.magnitude is not None else None

    @property
    def output(self) -> fx.Node:
        return self.lora.add if self.lora else self.base


def _is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.linear


def is_lowra_op(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (
        torch.ops.lowra.lora_linear.default,
        torch.ops.lowra.lora_linear,
    )


def example_value(node: fx.Node):
    """The fake (or real) value Dynamo recorded for `node`."""
    return node.meta.get("example_value", node.meta.get("val"))


def linear_args(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return x, w, bias


def _trainable_placeholder(node) -> bool:
    if not isinstance(node, fx.Node) or node.op != "placeholder":
        return False
    value = example_value(node)
    return isinstance(value, torch.Tensor) and value.requires_grad


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _match_lora(base: fx.Node) -> LoraBranch | None:
    """The LoRA branch added onto `base`, if `base`'s only user is `add(base, mul(linear(linear(xl, A), B, bB), s))`
    (bB, B's bias, may be None)."""
    add = _only_user(base)
    if add is None or add.op != "call_function" or add.target not in _ADD or len(add.args) != 2:
        return None
    other = add.args[1] if add.args[0] is base else add.args[0]
    if not isinstance(other, fx.Node) or other.target not in _MUL or len(other.users) != 1:
        return None
    lin_b, scaling = other.args
    if not isinstance(lin_b, fx.Node):
        lin_b, scaling = scaling, lin_b
    if not isinstance(lin_b, fx.Node) or not _is_linear(lin_b) or len(lin_b.users) != 1:
        return None
    h, lora_b, b_bias = linear_args(lin_b)  # b_bias: a node, or None
    if not _is_linear(h) or len(h.users) != 1 or not _trainable_placeholder(lora_b):
        return None
    x_lora, lora_a, a_bias = linear_args(h)
    if a_bias is not None or not _trainable_placeholder(lora_a):
        return None
    if not isinstance(scaling, (int, float, fx.Node)):
        return None
    return LoraBranch(x_lora, lora_a, lora_b, scaling, (h, lin_b, other, add), add, b_bias)


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


def match_sites(gm: fx.GraphModule, skip: tuple[str, ...] = (), pack_routers: bool = False) -> list[LinearSite]:
    """All rewritable frozen linears of `gm` and of its checkpointed regions, in graph order.

    Layers named in `skip` stay dense, and so do a mixture's routers unless `pack_routers`. Warns once per
    layer it must leave dense.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = {n: i for i, n in enumerate(placeholders)}
    stays_dense = _dense_rule(skip, pack_routers)
    sites = _scan(gm.graph, {n: n for n in placeholders}, index, stays_dense, None)
    bodies = [(body.graph, {n: w for n, w in body_inputs(call, body).items() if w in index}, call)
              for call, body in checkpoint_bodies(gm)]
    for graph, outer, call in bodies:
        sites += _scan(graph, outer, index, stays_dense, call)
    if not sites:
        _warn_trainable_only([(gm.graph, {n: n for n in placeholders}), *((g, o) for g, o, _ in bodies)])
    return sites


def _warn_trainable_only(graphs: list[tuple[fx.Graph, dict[fx.Node, fx.Node]]]) -> None:
    """A graph whose linears all have trainable weights (not LoRA adapters) is a model nobody froze."""
    names = [
        placeholder_name(outer[node.args[1]])
        for graph, outer in graphs for node in graph.nodes
        if _is_linear(node) and node.args[1] in outer and _trainable_placeholder(node.args[1])
    ]
    names = [n for n in names if "lora_" not in n]
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
    for node in graph.nodes:
        if _is_grouped_mm(node):
            site = _grouped_site(node, outer, index, stays_dense, scope)
            if site is not None:
                sites.append(site)
                continue
        if is_matmul(node) or _is_grouped_mm(node):
            for w in filter(None, map(_viewed_placeholder, node.all_input_nodes)):
                frozen = is_frozen_matrix(example_value(w), dims=(2, 3))  # 3: stacked experts
                if w in outer and frozen and is_parameter(outer[w]):  # not an activation after a graph break
                    other_products[placeholder_name(outer[w])] = _op_name(node)
        elif node.op == "placeholder" and node in outer and is_parameter(outer[node]) and is_frozen_matrix(example_value(node), dims=(3,)):
            stacked[node] = placeholder_name(outer[node])
        if _is_linear(node):
            x, w, bias = linear_args(node)
            transposed = _is_transpose(w) and w.args[0] in outer
            if transposed:
                w = w.args[0]
            value = example_value(w) if isinstance(w, fx.Node) else None
            if w not in outer or not isinstance(value, torch.Tensor) or value.requires_grad or value.dim() != 2:
                continue
            name = placeholder_name(outer[w])
            if stays_dense(name, node):
                continue
            if not value.dtype.is_floating_point:
                raise ValueError(
                    f"lowra: layer {name!r} has {value.dtype} weights; only real floating-point weights can be "
                    f"quantized. Convert the model to float32/bfloat16 or skip the layer with options={{'skip': ({name!r},)}}"
                )
            reason = _unsupported(w, transposed)
            if reason:
                warnings.warn(f"lowra: layer {name!r} stays dense: {reason}", stacklevel=3)
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
                                    dora=_dora_read(w, transposed)))
        elif is_lowra_op(node) and node.args[5] is None:
            x, _, packed, group_size, bias = node.args[:5]
            shape = (example_value(packed[0]).shape[0], example_value(x).shape[-1])
            name = placeholder_name(outer.get(packed[0], packed[0])).removesuffix("._lowra_packed[0]")
            sites.append(LinearSite(name, node, x, bias, None, None, list(packed), group_size, _match_lora(node), shape, scope))
    grouped = {site.weight for site in sites if site.experts}
    for site in sites:
        if site.experts_lora is not None:  # its update, a baddbmm, is not another product of the weight
            other_products.pop(site.name, None)
    for w, name in stacked.items():
        readers = [u for u in w.users if u.target is not torch.ops.higher_order.tag_activation_checkpoint]
        if w not in grouped and readers and name not in other_products:  # checkpointed bodies: scanned apart
            other_products[name] = _op_name(readers[0])
    _warn_other_products(other_products, stacked, stays_dense)
    return sites


def is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MATMULS) or (
        node.op == "call_method" and node.target in _MATMUL_METHODS
    )


def _is_grouped_mm(node: fx.Node) -> bool:
    """A grouped matrix product (torch._grouped_mm, or transformers' fallback op for it): how transformers
    runs a mixture of experts whose weights are stacked in one [experts, out, in] tensor."""
    return node.op == "call_function" and "grouped_mm" in str(node.target)


_GROUPED_KWARGS = ("offs", "bias", "out_dtype")


def _grouped_site(node: fx.Node, outer: dict, index: dict, stays_dense, scope) -> LinearSite | None:
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
        name = placeholder_name(outer.get(packed[0], packed[0])).removesuffix("._lowra_packed[0]")
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


def is_dequant(node) -> bool:
    """A `lowra.dequant` call whose only reader is the product it feeds (a packed weight seen after a recompile)."""
    return (
        isinstance(node, fx.Node) and node.op == "call_function"
        and node.target in (torch.ops.lowra.dequant.default, torch.ops.lowra.dequant) and len(node.users) == 1
    )


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _viewed_placeholder(node: fx.Node) -> fx.Node | None:
    """The placeholder that `node` is a view of (W, W.T, W.t(), W.view(...), ...), or None."""
    while True:
        if node.op == "placeholder":
            return node
        is_view = (
            (node.op == "call_function" and node.target in _VIEWS)
            or (node.op == "call_method" and node.target in _VIEW_METHODS)
            or (node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"))
        )
        if not is_view or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]


def is_frozen_matrix(value, dims: tuple[int, ...] = (2,)) -> bool:
    """A frozen floating-point tensor of `dims` dimensions (a weight matrix; 3 for experts stacked in one)."""
    return (
        isinstance(value, torch.Tensor) and not value.requires_grad and value.dim() in dims
        and value.dtype.is_floating_point
    )


def _warn_other_products(other_products: dict[str, str], stacked: dict[fx.Node, str], stays_dense) -> None:
    names = [n for n in other_products if not stays_dense(n)]
    if names:
        ops = ", ".join(sorted({other_products[n] for n in names}))
        listed = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        warnings.warn(
            f"lowra: {len(names)} frozen weight(s) stay dense: {listed}. They are read by {ops}, not F.linear; "
            "lowra quantizes the layers that call F.linear (torch.nn.Linear) or compute x @ W.T, x @ W or "
            "addmm(b, x, W) (GPT-2's Conv1D), so these keep their full size"
            + _experts_hint([n for n in names if n in stacked.values()]),
            stacklevel=4,
        )


def _experts_hint(names: list[str]) -> str:
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


def _dense_rule(skip: tuple[str, ...], pack_routers: bool) -> Callable[..., bool]:
    """stays_dense(name, node=None): whether a weight stays dense, by name (or its calling module's path) or, unless
    `pack_routers`, because a mixture's router reads it."""
    def dense(name: str, node: fx.Node | None = None) -> bool:
        if any(s in name for s in skip):
            return True
        return node is not None and (any(s in _module_path(node) for s in skip) or (not pack_routers and _in_router(node)))
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


def _is_transpose(node) -> bool:
    """`torch.t(W)`, as `linear_forms` writes an (in, out) weight's linear."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.t


def _unsupported(w: fx.Node, transposed: bool) -> str | None:
    """Why weight `w` cannot be packed, or None when every read of it is a linear's weight (of `t(w)` when
    `transposed`)."""
    weights = [t for t in w.users if _is_transpose(t)] if transposed else [w]
    others = [u for u in w.users if u not in weights] if transposed else []
    others += [u for n in weights for u in n.users if not (_is_linear(u) and u.args[1] is n)]
    others = [u for u in others if _dora_cast_reads(u, transposed) is None]
    if any(u.target is F.embedding for u in others):
        return "it is tied to an embedding table (F.embedding needs the dense rows)"
    if others:
        ops = sorted({str(getattr(u.target, "__name__", u.target)) for u in others})
        return f"its weight is also read outside F.linear ({', '.join(ops)}), e.g. by a tied embedding"
    return None


_ROW_NORMS = (torch.linalg.norm, torch._C._linalg.linalg_norm, torch.linalg.vector_norm, torch._C._linalg.linalg_vector_norm)


def _dora_cast_reads(node: fx.Node, transposed: bool) -> list[fx.Node] | None:
    """The (out, in) reads (`_dora_reads`) of `node` if it is DoRA's cast of a weight to its own dtype and device
    (`W.to(x.dtype)`) whose reads are read only by linears, as their weight, and by `add`s whose one reader is
    a row norm (`DoraRead`); else None."""
    w = node.args[0] if node.args else None
    if node.op != "call_method" or node.target != "to" or not isinstance(w, fx.Node):
        return None
    value, cast = example_value(w), example_value(node)
    if not isinstance(cast, torch.Tensor) or (cast.dtype, cast.device) != (value.dtype, value.device):
        return None
    reads = _dora_reads(node, transposed)
    if reads is None or not all(
        (_is_linear(u) and u.args[0] is not read and u.args[1] is read) or _row_norm_of(u)
        for read in reads for u in read.users
    ):
        return None
    return reads


def _dora_reads(cast: fx.Node, transposed: bool) -> list[fx.Node] | None:
    """The nodes that hold a DoRA cast of W as the (out, in) matrix: the cast itself, or, for a weight stored
    (in, out) (GPT-2's Conv1D), each `detach(getattr(cast, "T"))` that PEFT's transpose makes of it (with
    lowra's stand-in, `peft_tracing`); None if the cast is read otherwise."""
    if not transposed:
        return [cast]
    reads = []
    for view in cast.users:
        read = _only_user(view)
        if not (view.target is getattr and view.args[1] == "T" and read is not None
                and read.op == "call_method" and read.target == "detach"):
            return None
        reads.append(read)
    return reads


def _row_norm_of(node: fx.Node) -> bool:
    """`node` is an add whose only reader is the norm of each of its rows, `linalg_norm(node, dim=1)`."""
    norm = _only_user(node)
    return (
        node.op == "call_function" and node.target in _ADD and norm is not None and norm.op == "call_function"
        and norm.target in _ROW_NORMS and norm.args == (node,) and norm.kwargs == {"dim": 1}
    )


def _dora_read(w: fx.Node, transposed: bool) -> DoraRead | None:
    """PEFT DoRA's reads of the frozen weight `w`, if it has any (`DoraRead`)."""
    reads = tuple(r for u in w.users for r in _dora_cast_reads(u, transposed) or ())
    if not reads:
        return None
    sums = [u for read in reads for u in read.users if _row_norm_of(u)]
    factors = _norm_adapter(sums[0]) if len(sums) == 1 else None
    magnitude = _norm_magnitude(_only_user(sums[0])) if factors else None
    return DoraRead(reads, *factors, magnitude, _only_user(sums[0])) if magnitude is not None else DoraRead(reads)


def _norm_magnitude(norm: fx.Node) -> fx.Node | None:
    """The trainable magnitude that DoRA divides by the row norm `norm`: `truediv(%m, detach(to(norm)))`."""
    node = norm
    while (reader := _only_user(node)) is not None and reader.op == "call_method" and reader.target in ("detach", "to"):
        node = reader
    if reader is None or reader.target is not operator.truediv or reader.args[1] is not node:
        return None
    return reader.args[0] if _trainable_placeholder(reader.args[0]) else None


def _norm_adapter(add: fx.Node) -> tuple[fx.Node, fx.Node, float | fx.Node] | None:
    """(A, B, s) of the `add(%wc, mul(s, detach(to(getattr(linear(linear(eye, A), B), "T")))))` that DoRA
    takes the norm of, or None."""
    scaled = next((a for a in add.args if isinstance(a, fx.Node) and a.target in _MUL), None)
    if scaled is None or len(scaled.args) != 2:
        return None
    node, scaling = scaled.args if isinstance(scaled.args[0], fx.Node) else scaled.args[::-1]
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("detach", "to"):
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.target is getattr and node.args[1] == "T"):
        return None
    lin_b = node.args[0]
    if not _is_linear(lin_b) or not _is_linear(lin_b.args[0]):
        return None
    h, lora_b, b_bias = linear_args(lin_b)
    eye, lora_a, a_bias = linear_args(h)
    if not isinstance(eye, fx.Node) or eye.target is not torch.eye or a_bias is not None or b_bias is not None:
        return None
    if not (_trainable_placeholder(lora_a) and _trainable_placeholder(lora_b) and isinstance(scaling, (int, float, fx.Node))):
        return None
    return lora_a, lora_b, scaling
