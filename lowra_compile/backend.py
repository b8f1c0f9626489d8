"""The `lowra` torch.compile backend: `torch.compile(model, backend="lowra", options={...})`.

Per graph Dynamo hands over:
    linear_forms  `x @ W.T` of a frozen (or packed) weight as a linear, in a copy of the graph
    match     frozen linears (+ LoRA branches), already-packed ops after a recompile
    pipeline  for weights never seen before: calibrate on this (first) batch, quantize, plan, LoftQ, attach
    rewrite   a copy of the graph with one lowra.lora_linear per site, packed tensors as extra inputs
    inner     inductor / aot_eager / eager on the rewritten graph
    release   free every dense weight that all graphs now read through its packed form

This module must not register the backend itself: the `torch_dynamo_backends` entry point does that
(and `lowra_compile/__init__.py` for source checkouts).
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch
from torch import fx

from . import codegen
from .config import QUANTIZING, LowRAConfig, skips
from .experts_class import hold_peft_experts
from .passes.linear_forms import linear_forms
from .passes.match import match_sites
from .passes.pipeline import placeholder_values, quantize_sites
from .passes.release import packed_weight, quantized_with, release
from .passes.rewrite import rewrite
from .passes.sites import LinearSite
from .passes.sources import MODULE_PATHS
from .prequantized import warn_prequantized
from .recompile_room import count_layer
from .wrappers import bare_model


# torch's compile caches key a graph on its nodes, not on the Python behind a custom op's autograd and
# autocast rules (runtime/ops.py) or its schema (runtime/reference.py): after an upgrade that changed them, a
# cached backward traced by the old code was found again and failed ("missing value for argument"). Their
# source goes into the key of every graph lowra compiles.
_OPS_DIGEST = hashlib.blake2b(
    b"".join((Path(__file__).parent / "runtime" / name).read_bytes() for name in ("ops.py", "reference.py")),
    digest_size=8,
).hexdigest()


# The `kernels` option of the last graph compiled in this process (None: none yet). The ops read one kernel
# mode when they run, forward and backward, so the option is process-wide.
_kernels_asked: str | None = None


def _set_kernel_mode(kernels: str) -> None:
    global _kernels_asked
    if _kernels_asked is not None and kernels != _kernels_asked:
        warnings.warn(
            f"lowra: kernels={kernels!r} now applies to every model compiled with lowra in this process, those "
            f"compiled with kernels={_kernels_asked!r} before it too: the kernel choice is process-wide",
            stacklevel=3,
        )
    _kernels_asked = kernels
    codegen.set_kernel_mode(kernels)


def _compile_inner(gm: fx.GraphModule, inputs: list, inner: str, inductor_options: dict | None = None) -> Callable:
    if inner == "eager" and _checkpoints(gm):
        # Run as it is, a checkpointed region recomputes its forward with preserve_rng_state=False (the op
        # leaves the random numbers to a compiler), so dropout draws new masks and the gradients are wrong
        # (plain backend="eager" too). aot_eager replays the forward's random numbers.
        inner = "aot_eager"
    if inner == "eager":
        return gm.forward
    tag = f"{torch.compiler.config.cache_key_tag}lowra-ops-{_OPS_DIGEST}"
    with torch.compiler.config.patch(cache_key_tag=tag):
        if inner == "aot_eager":
            return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, inputs, config_patches=inductor_options or None)


def _checkpoints(gm: fx.GraphModule) -> bool:
    """Whether `gm` holds an activation-checkpointed region."""
    return any(n.target is torch.ops.higher_order.tag_activation_checkpoint for n in gm.graph.nodes)


def mode_options(mode: str | None, inner: str) -> dict:
    """Inductor's options for torch.compile's `mode`, less CUDA graphs, with a warning for what is dropped.

    CUDA graphs ("reduce-overhead", "max-autotune") are not applied: they were never run with the packed ops
    (no GPU test so far), so lowra does not switch them on rather than risk a failure mid-training."""
    if not mode or mode == "default":
        return {}
    options = dict(torch._inductor.list_mode_options(mode))  # raises on an unknown mode
    if options.pop("triton.cudagraphs", False):
        rest = "the mode's other options are applied" if options else "nothing else changes"
        warnings.warn(
            f"lowra: mode={mode!r} asks for CUDA graphs, which the lowra backend does not apply (not yet tested "
            f"with its packed ops); {rest}",
            stacklevel=3,
        )
    if options and inner != "inductor":
        warnings.warn(f"lowra: mode={mode!r} only applies to options={{'inner': 'inductor'}}; inner is {inner!r}", stacklevel=3)
        return {}
    return options


def _frame():
    """Dynamo's translator of the frame it is compiling, or None outside a compile (a direct call of the
    backend). Dynamo's backend API does not hand the frame over; its translator does."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx()
    except (AttributeError, AssertionError):
        return None


def _frame_locals() -> dict:
    """The local variables of the frame Dynamo is compiling (`self`: the module whose forward the graph is)."""
    tx = _frame()
    return tx.output.local_scope if tx is not None else {}


def _frame_module_paths() -> dict[str, str]:
    """Where each module among the compiled frame's locals sits in the outermost module on the Python stack that
    holds it, by local name: the model's own name for it ("" for the model itself; {} outside a compile), so that
    names and `skip` read as in model.named_parameters() in a graph that a graph break cut out of the model.
    Locals, not `self` alone: a forward may name its module otherwise (`def forward(s, x)`), and a graph resumed
    after a break reads modules from Dynamo's stack locals (`___stack0`: the `self.head` of `self.head(...)`)."""
    owned = {name: v for name, v in _frame_locals().items() if isinstance(v, torch.nn.Module)}
    paths: dict[str, str] = {}
    for outer in reversed(_module_calls() if owned else []):  # the outermost module that holds a local names it
        names = {id(m): name for name, m in bare_model(outer).named_modules()}
        paths.update({local: names[id(m)] for local, m in owned.items() if local not in paths and id(m) in names})
    return paths


def _frame_model_roots() -> list[torch.nn.Module]:
    """The model whose piece Dynamo compiles: the outermost module call on the stack, else (a compiled function
    that calls the model) the modules the compiled frame holds, in its locals, closure or arguments ([] outside
    a compile); each without its torch.compile or DDP wrapper."""
    calls = _module_calls()
    return [bare_model(root) for root in ([calls[-1]] if calls else _frame_modules())]


def _frame_model_modules() -> list[torch.nn.Module]:
    """The modules of the model whose piece Dynamo compiles (`_frame_model_roots`)."""
    return [m for root in _frame_model_roots() for m in root.modules()]


def _module_calls() -> list[torch.nn.Module]:
    """The modules whose calls the compiled frame runs inside, innermost first, up to the model torch.compile was
    given."""
    calls, frame = [], sys._getframe(1)
    while frame is not None:
        # only the frames of module calls: reading a frame's f_locals keeps a copy of them on the frame (Python
        # 3.11, 3.12), which in the user's own function would hold its tensors after it dropped them; a module
        # call's frame ends with the call
        if frame.f_code in _MODULE_CALLS and isinstance(outer := frame.f_locals.get("self"), torch.nn.Module):
            calls.append(outer)
            if _compiled_here(outer):  # the model torch.compile was given: a module around it is not the model's
                break
        frame = frame.f_back
    return calls


def _compiled_here(module: torch.nn.Module) -> bool:
    """Whether `module` is where compilation starts: a torch.compile or DDP wrapper, or a module compiled in
    place (`model.compile()`)."""
    wrapped = bare_model(module) is not module
    return wrapped or getattr(module, "_compiled_call_impl", None) is not None


_MODULE_CALLS = (torch.nn.Module._wrapped_call_impl.__code__, torch.nn.Module._call_impl.__code__)


def _frame_modules() -> list[torch.nn.Module]:
    """The modules among the compiled frame's locals, in its `args` and `kwargs` (a decorated forward's
    wrapper gets the model as `args[0]`), and among the globals its code reads (a compiled step function
    that calls a model of its script)."""
    tx = _frame()
    code_globals = [tx.f_globals[n] for n in tx.f_code.co_names if n in tx.f_globals] if tx is not None else []
    values = list(_frame_locals().values()) + code_globals
    values += [v for c in values if isinstance(c, (tuple, list)) for v in c]
    values += [v for c in values if isinstance(c, dict) for v in c.values()]
    return [v for v in values if isinstance(v, torch.nn.Module)]


def _frame_holds_frozen_matrix() -> bool:
    """Whether a module of the compiled frame has a frozen matrix: its graph is then a piece of a model someone
    froze, not a model nobody did (a graph break leaves a trainable head alone in the graph after it)."""
    return any(not p.requires_grad and p.dim() >= 2 for m in _frame_modules() for p in m.parameters())


def _fsdp_module() -> str | None:
    """The class of the FSDP-sharded module whose forward Dynamo is compiling, or None.

    FSDP's hooks break the graph at every module it shards, so each graph is the forward of one (its
    `self`), run on dense weights FSDP gathered for this call and frees after it."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # no torch.distributed
        return None
    owner = _frame_locals().get("self")
    return type(owner).__name__ if isinstance(owner, (FSDPModule, FullyShardedDataParallel)) else None


def hold_experts_classes() -> None:
    """Keep the class of each experts module that PEFT's LoRA parametrizes (`experts_class`) among the
    modules the compiled frame reaches: the experts module itself when the graph is its forward (PEFT's
    parametrization breaks the graph around it), and every layer's when the graph is the whole model's.
    The frame's guards are built after this backend returns, so they see the class held."""
    hold_peft_experts(m for owner in _frame_modules() for m in owner.modules())


def refuse_fsdp(sites: list[LinearSite]) -> None:
    owner = _fsdp_module()
    if owner:
        raise ValueError(
            f"lowra: layer {sites[0].name!r} belongs to {owner}, which FSDP shards. lowra cannot quantize "
            "FSDP-sharded weights: FSDP gathers them dense for every forward, so a packed copy would save "
            "nothing, and the shards, the state_dict and the report would stay dense. A 1-4 bit base fits "
            "where a sharded dense one was needed: train without FSDP, the whole model on each GPU under "
            "DistributedDataParallel (lowra_compile.quantize_(model, batches) on every rank, then DDP; docs/usage.md, "
            "'Data-parallel training')."
        )


def refuse_ddp_split(site: LinearSite) -> None:
    """Dynamo's DDP optimizer splits a DDP model's graph at DDP's gradient buckets (the first holds 1 MB of
    gradients: any model's adapters fill more) and hands each piece over on stand-in tensors. Quantizing
    there would calibrate nothing (the values are not there) and spread one budget per piece; a base packed
    before DDP wraps the model compiles piece by piece as well as whole."""
    if getattr(torch._guards.TracingContext.try_get(), "ddp_optimizer_ctx", None) is None:
        return
    raise ValueError(
        f"lowra: layer {site.name!r} comes in one of the pieces Dynamo's DDP optimizer splits a DDP model's graph "
        "into (at DDP's gradient buckets), on stand-in tensors: lowra cannot calibrate it there nor plan the "
        "whole model's bit budget over the pieces. Quantize before DDP wraps the model: "
        "lowra_compile.quantize_(model, batches) on every rank (or load_quantized), then DDP(model) and "
        "torch.compile; or set torch._dynamo.config.optimize_ddp = False before the first step (docs/usage.md, "
        "'Data-parallel training')."
    )


def warn_kept_quantization(
    gm: fx.GraphModule, sites: list[LinearSite], example_inputs: list, options: Mapping | LowRAConfig | None,
    config: LowRAConfig,
) -> None:
    """A layer packed earlier keeps its quantization whatever a later compile asks (its dense weights are
    gone). When this compile names quantizing options other than a packed layer's, or a `skip` that names a
    packed layer, say so: the run would otherwise train on another base than the one asked for. Options left
    at their defaults ask nothing (`quantize_` with options, then a plain compile, is the usual way); of a
    `LowRAConfig`, the options that differ from the defaults are the ones asked."""
    if isinstance(options, LowRAConfig):
        defaults = LowRAConfig()
        asked = [k for k in (*QUANTIZING, "skip") if getattr(options, k) != getattr(defaults, k)]
    else:
        asked = [k for k in options or {} if k in (*QUANTIZING, "skip")]
    if not asked:
        return
    wanted, values = config.quantizing(), placeholder_values(gm, example_inputs)
    names, made_with, skipped = [], {}, []
    for site in sites:
        weight = example_inputs[site.weight_index] if site.packed is None else None
        if weight is not None and packed_weight(weight) is None:
            continue  # quantized now, with these options
        if "skip" in asked and skips(config.skip, site.name):
            skipped.append(site.name)
        made = quantized_with(weight._lowra_packed[0] if weight is not None else values.get(site.packed[0]))
        differ = {k: made[k] for k in asked if made and k in made and made[k] != wanted[k]}
        if differ:
            names.append(site.name)
            made_with.update(differ)
    keep = ("a packed layer keeps its quantization (its dense weights are gone). To quantize with other options, "
            "load the model again (e.g. from_pretrained) and quantize or compile that")
    if names:
        was = ", ".join(f"{k}={v!r}" for k, v in made_with.items())
        now = ", ".join(f"{k}={wanted[k]!r}" for k in made_with)
        warnings.warn(f"lowra: {len(names)} layer(s) (e.g. {names[0]!r}) were quantized earlier with {was}; the "
                      f"{now} asked for now does not apply to them: {keep}.", stacklevel=2)
    if skipped:
        warnings.warn(f"lowra: skip={config.skip!r} names {len(skipped)} layer(s) quantized earlier (e.g. "
                      f"{skipped[0]!r}), which stay packed: {keep}, or lowra_compile.materialize(model) to make every "
                      "layer dense again.", stacklevel=2)


def graph_sites(gm: fx.GraphModule, example_inputs: list, options: Mapping | LowRAConfig | None,
                config: LowRAConfig) -> tuple[fx.GraphModule, list[LinearSite]]:
    """`gm` with its linears written as such (`linear_forms`, a copy) and its sites; warns of layers another
    library quantized; a graph with sites raises under FSDP and warns when it asks other quantizing options of
    layers packed earlier."""
    gm = linear_forms(gm)
    gm.meta[MODULE_PATHS] = _frame_module_paths()
    warn_prequantized(_frame_model_roots())
    sites = match_sites(gm, config.skip, config.pack_routers, _frame_holds_frozen_matrix)
    if sites:
        refuse_fsdp(sites)
        warn_kept_quantization(gm, sites, example_inputs, options, config)
    return gm, sites


def lowra_backend(gm: fx.GraphModule, example_inputs: list, *, options: Mapping | LowRAConfig | None = None,
                  mode: str | None = None) -> Callable:
    """Rewrite `gm`'s frozen linears to packed low-bit `lowra.lora_linear` calls and compile the result."""
    config = LowRAConfig.from_options(options)
    inductor_options = mode_options(mode or config.mode, config.inner)
    _set_kernel_mode(config.kernels)
    graph = gm  # Dynamo's own, which BoundGraph falls back to
    gm, sites = graph_sites(graph, example_inputs, options, config)
    hold_experts_classes()
    if not sites:
        return _compile_inner(gm, example_inputs, config.inner, inductor_options)
    dense = [i for i, s in enumerate(sites) if s.packed is None]
    new = [i for i in dense if packed_weight(example_inputs[sites[i].weight_index]) is None]
    if new:
        refuse_ddp_split(sites[new[0]])
        quantize_sites(gm, sites, new, example_inputs, config, _frame_model_modules())
        # a frame Dynamo compiles once per layer (a graph break in a repeated module) must reach every layer
        count_layer(getattr(_frame(), "f_code", None), example_inputs[sites[new[0]].weight_index])
    weights = {i: example_inputs[sites[i].weight_index] for i in dense}
    packed = {i: list(w._lowra_packed) for i, w in weights.items()}
    group_size = {i: s.group_size if s.packed is not None else weights[i]._lowra_group_size for i, s in enumerate(sites)}
    fake_mode = torch._guards.detect_fake_mode()
    new_gm, extra = rewrite(gm, sites, packed, group_size, fake_mode)
    fakes = [fake_mode.from_tensor(t, static_shapes=True) for t in extra] if fake_mode else extra
    compiled = _compile_inner(new_gm, [*example_inputs, *fakes], config.inner, inductor_options)
    for weight in weights.values():
        release(weight)
    if not weights:  # every packed tensor is a graph input: the graph is right for any module's weights
        return lambda *args: compiled(*args, *extra)
    return BoundGraph(graph, compiled, extra, [sites[i].weight_index for i in weights], next(iter(weights.values())))


class BoundGraph:
    """A compiled graph that reads the packed tensors of the weights it is called with.

    The graph was compiled on the step that quantized its weights, so Dynamo passes it the weights (now
    `ReleasedWeight`s), not their packed tensors; each call appends the packed tensors of the weights it gets,
    as long as they have the shapes the graph was compiled for. The graph holds none of them: a deleted
    model's packed base is freed, and a base loaded into the model afterwards (`load_quantized`) is the one
    read. Dynamo may run one graph for weights of other shapes: after a graph break inside a repeated
    module's forward its frame's graph takes each layer's weights, and the guards of the graph compiled for
    the last layer hold for every layer. Such a call goes to the graph compiled for its own weights (each
    compile leaves its graph on its first weight), or, failing that, runs the original graph eagerly, where
    the released weights' `__torch_function__` reads their own packed forms: unfused, but right.
    """

    def __init__(self, graph: fx.GraphModule, compiled: Callable, extra: list, weight_indices: list[int], first: torch.Tensor):
        self.graph, self.compiled, self.weight_indices = graph, compiled, weight_indices
        self.shapes = [(t.shape, t.dtype, t.device) for t in extra]  # what the graph was compiled for
        self.key = graph.code
        first.__dict__.setdefault("_lowra_graphs", {})[self.key] = self
        self.warned = False

    def packed_inputs(self, args: tuple) -> list | None:
        """The packed tensors of this call's weights, in the graph's order; None where a weight has none or
        they differ in shape from those the graph was compiled for."""
        extra = []
        for j in self.weight_indices:
            extra += getattr(args[j], "_lowra_packed", [None])
        if any(t is None for t in extra) or [(t.shape, t.dtype, t.device) for t in extra] != self.shapes:
            return None
        return extra

    def __call__(self, *args: object) -> object:
        own = args[self.weight_indices[0]].__dict__.get("_lowra_graphs", {}).get(self.key)
        for graph in filter(None, (self, own)):
            extra = graph.packed_inputs(args)
            if extra is not None:
                return graph.compiled(*args, *extra)
        if not self.warned:
            self.warned = True
            warnings.warn(
                "lowra: Dynamo runs one graph for weights packed in another shape than those it was compiled for "
                "(a graph break inside a repeated module's forward, or a base quantized apart from the model "
                "compiled before it in this process); those run the graph eagerly, unfused and slower. Remove the "
                "graph break (torch._dynamo.explain shows it), quantize ahead with lowra_compile.quantize_ so that "
                "every graph reads the packed weights as inputs, or call torch._dynamo.reset() before compiling "
                "another model",
                stacklevel=2,
            )
        return self.graph(*args)
