"""Free the dense frozen weights that every graph now reads through their packed form.

    before: W  Parameter [N, K], N*K*4 bytes, read by lowra.lora_linear's caller only as a placeholder
    after:  W  ReleasedWeight [N, K], storage resized to 0; W._lowra_packed = (perm, absmax, ..., codebook_4)

The Parameter object stays (same id, shape, dtype, requires_grad), so Dynamo's guards still hold and no
recompile follows. Its class becomes `ReleasedWeight`, whose `__torch_function__` sends `F.linear` (and,
for a weight stored (in, out) like GPT-2's Conv1D, `addmm(b, x, W)` and `x @ W`) to the packed op and
dequantizes for anything else, so eager calls of the model, `state_dict()` and `torch.save`
keep working. On a recompile Dynamo inlines that `__torch_function__`, so the new graph holds the packed
op directly. `materialize` undoes it all.

A few calls are special. `detach()`, which `state_dict()` calls on every parameter and whose results it
holds all at once, gives a dequantized copy on the CPU: a checkpoint (PEFT's `save_pretrained` builds the
whole state dict before it keeps the adapters) then never needs the dense model's memory on the GPU, only
one layer's at a time. On the meta device, which holds no values, it gives the weight itself
(`model.to("meta")`). `copy_()`, which `load_state_dict()` calls, and `.data =` accept only the weight's own
values (a checkpoint of this model); any other values raise instead of being dropped, and so does any
other write (an in-place op such as an initialiser's `normal_`, `w[i] = v`, an `out=`), which would land in a
dequantized copy. `F.linear` of an input the weight cannot take (another width, an integer dtype) raises
torch's own error, as for the dense weight. `requires_grad_(True)`
raises too (`model.requires_grad_(True)` calls it): the packed op gives the weight no gradient, so it would
stay as it is while the loop believed it trained. And `to()`, `cuda()`,
`half()` and the like (what `model.to(...)` calls) return the weight itself when nothing changes, and
otherwise a released weight of the new device and dtype holding the packed form moved there, which the
`.data =` of `Module._apply` makes the weight's own: a move copies only the packed tensors, and a cast
only changes what dequantization returns. The Parameter stays the same object; Dynamo's guards see its
new device or dtype and recompile.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._dynamo.decorators import mark_unbacked
from torch.utils._pytree import tree_map

from ..runtime.format import BIT_WIDTHS, TENSOR_COUNT, PackedWeight

# Tensor methods that only read metadata: safe on a weight whose storage is gone. Tuples, not sets: on a
# recompile Dynamo inlines `__torch_function__`, and a set lookup hashes a builtin, which breaks the graph
# there (Falcon's `W.T` became a graph of its own, dequantized on every call).
_METADATA = (
    Tensor.size, Tensor.dim, Tensor.stride, Tensor.is_contiguous, Tensor.numel, Tensor.element_size,
    Tensor.untyped_storage, Tensor.data_ptr, Tensor.__repr__,
    Tensor.shape.__get__, Tensor.dtype.__get__, Tensor.device.__get__, Tensor.requires_grad.__get__,
    Tensor.is_leaf.__get__, Tensor.grad.__get__, Tensor.ndim.__get__, Tensor.layout.__get__,
    Tensor.is_cuda.__get__, Tensor.is_sparse.__get__, Tensor.is_quantized.__get__, Tensor.is_meta.__get__,
    Tensor.__hash__,
    # what Dynamo reads when it makes a fake copy of the weight on a recompile: one full dequantization
    # each otherwise (13 per weight, measured)
    Tensor._is_view, Tensor.storage_offset, Tensor.is_conj, Tensor.is_neg, Tensor.is_nested.__get__,
    Tensor.is_mkldnn.__get__,
    # torch 2.11's guard builder counts the bytes of every parameter it guards (param_bytes)
    Tensor.nbytes.__get__, Tensor.itemsize.__get__,
    # what Module._apply (model.to, model.float, ...) asks of every parameter
    Tensor.is_floating_point, Tensor.is_complex, torch._has_compatible_shallow_copy_type,
)


# Moves and casts: `model.to(...)` calls them on every parameter.
_CONVERSIONS = (Tensor.to, Tensor.cuda, Tensor.cpu, Tensor.half, Tensor.float, Tensor.bfloat16, Tensor.double)


def packed_weight(p: Tensor) -> PackedWeight | None:
    """The packed form cached on a parameter by the backend, if any."""
    return getattr(p, "_lowra_weight", None)


def dequantized(p: Tensor) -> Tensor:
    """The dense weight, in `p`'s shape: the packed (out, in) matrix, transposed for a weight stored (in, out),
    viewed as [E, N, K] for the experts of a mixture stacked in one tensor (packed as [E*N, K]), and
    transposed to [E, K, N] for a stack stored that way."""
    pw = p._lowra_weight
    w = torch.ops.lowra.dequant(list(p._lowra_packed), pw.shape[1], pw.group_size, pw.dtype)
    return in_stored_shape(w, tuple(p.shape), p._lowra_transposed)


def in_stored_shape(w: Tensor, shape: tuple[int, ...], transposed: bool) -> Tensor:
    """The dense (out, in) matrix `w` of a packed weight in the shape `shape` the weight is stored in (see
    `dequantized`); on tensors, and on fx proxies when a graph rebuilds the stored weight."""
    if len(shape) == 3:
        stack = w.view(shape[0], -1, shape[1] if transposed else shape[2])
        return stack.transpose(1, 2) if transposed else stack
    return w.t() if transposed else w


def packed_shape(shape: tuple[int, ...], transposed: bool) -> tuple[int, int]:
    """The (out, in) matrix a weight of `shape` is packed as: its transpose when stored (in, out), its
    experts' rows one after another when they are stacked (E, N, K)."""
    if len(shape) == 3:
        return (shape[0] * shape[2], shape[1]) if transposed else (shape[0] * shape[1], shape[2])
    return (shape[1], shape[0]) if transposed else (shape[0], shape[1])


class ReleasedWeight(torch.nn.Parameter):
    """A frozen weight whose dense storage was freed; reads go through its packed form."""

    def __new__(cls, data=None, requires_grad=False):
        # `type(p)(value, requires_grad=...)`, how accelerate's set_module_tensor_to_device (and other loaders)
        # wrap a parameter again: only `release` makes a released weight, so the class itself would make one
        # without a packed form, which fails on its first read
        if isinstance(data, ReleasedWeight):
            if requires_grad:
                _refuse_training(data, True)
            return data
        return torch.nn.Parameter(torch.empty(0) if data is None else data, requires_grad)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            linear = _linear_call(func, args, kwargs)
            if linear is not None:
                x, w, bias = linear
                return torch.ops.lowra.lora_linear(x, x, list(w._lowra_packed), w._lowra_group_size, bias, None, None, 0.0)
            if func in (Tensor.requires_grad_, Tensor.requires_grad.__set__) and isinstance(args[0], ReleasedWeight):
                _refuse_training(args[0], args[1] if len(args) > 1 else kwargs.get("requires_grad", True),
                                 sys._getframe(1))
                return func(*args, **kwargs)  # on the weight itself: PEFT freezes every base so, each dequantized before
            if func in _METADATA:
                return func(*args, **kwargs)
            if func == Tensor.data.__get__ and isinstance(args[0], ReleasedWeight) and not torch.compiler.is_compiling():
                return _data_alias(args[0])
            if func is Tensor.detach and isinstance(args[0], ReleasedWeight):
                return _detached(args[0], sys._getframe(1).f_code is _PARAMETER_NEW)
            if func == Tensor.data.__set__ and isinstance(args[0], ReleasedWeight) and isinstance(args[1], ReleasedWeight):
                _adopt(args[0], args[1])  # Module._apply after a move or cast (`_converted`), or `p.data = p`
                return None
            if func in (Tensor.copy_, Tensor.data.__set__) and isinstance(args[0], ReleasedWeight):
                _copy_own_values(args[0], args[1])
                return args[0] if func is Tensor.copy_ else None
            if func in _CONVERSIONS and isinstance(args[0], ReleasedWeight):
                return _converted(func, args[0], args[1:], kwargs)
            if func is Tensor.set_ and len(args) == 2 and args[1] is args[0]:
                # what registering a parametrization does to the parameter (PEFT's LoRA on stacked experts, on
                # every forward): a no-op; densified, it would dequantize the whole stack twice each time
                return args[0]

            if not torch.compiler.is_compiling():  # the model's own code never writes a frozen weight
                written = _written_in_place(func, args, kwargs)
                if written is not None:
                    _refuse_write(written, func)

            def densify(a):
                return dequantized(a) if isinstance(a, ReleasedWeight) else a

            return func(*tree_map(densify, args), **tree_map(densify, kwargs))

    def __reduce_ex__(self, proto):
        # torch.save / pickle never touch the freed storage: they store the dequantized weight.
        with torch._C.DisableTorchFunctionSubclass():
            return (torch.nn.Parameter, (dequantized(self), False))

    def __deepcopy__(self, memo):
        with torch._C.DisableTorchFunctionSubclass():
            return torch.nn.Parameter(dequantized(self), requires_grad=False)

    def __repr__(self) -> str:
        pw = self._lowra_weight
        packed = "packed transposed" if self._lowra_transposed else "packed"
        return f"ReleasedWeight(shape={tuple(self.shape)}, code_bits={pw.code_bits():.2f}, {packed})"


# Dynamo inlines `__torch_function__` where it traces a caller, but must not compile it as a frame of its own:
# it runs as one in the eager code between graphs (torch.nn.utils.parametrize, which PEFT's LoRA on stacked
# experts calls on every forward, reads the weight's shape there), and compiling it recursed without end.
torch._dynamo.eval_frame.skip_code(ReleasedWeight.__torch_function__.__func__.__code__)


def _linear_call(func, args: tuple, kwargs: dict) -> tuple | None:
    """(x, weight, bias) when the call computes a linear layer on a released weight, as the packed op can:
    F.linear(x, W, b) of a weight stored (out, in), or addmm(b, x, W) / x @ W of one stored (in, out)."""
    if func is F.linear and len(args) >= 2:
        x, w, bias = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias")
        transposed = False
    elif func in (torch.addmm, Tensor.addmm) and len(args) == 3 and not kwargs:
        bias, x, w = args
        transposed = True
    elif func in (torch.matmul, Tensor.matmul, Tensor.__matmul__) and len(args) == 2 and not kwargs:
        (x, w), bias = args, None
        transposed = True
    else:
        return None
    if not isinstance(w, ReleasedWeight) or isinstance(x, ReleasedWeight) or w._lowra_transposed != transposed:
        return None
    if w.dim() != 2:  # a mixture's stacked experts: dequantized, for the product to read as it is
        return None
    # the packed op takes K from x and dequantizes to x's dtype: a wrong width would read a truncated weight and an
    # integer x would round it to zeros, silently; densified, torch raises its own error for both
    if x.shape[-1] != w.shape[0 if transposed else 1] or not x.dtype.is_floating_point:
        return None
    return x, w, bias


# In-place operators: `w += 1` and the like.
_IN_PLACE_DUNDERS = (
    "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__", "__imatmul__",
    "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__setitem__",
)
# In-place by name but harmless on a packed weight: handled above, or (Module.share_memory) leaving it as it is.
_IN_PLACE_ALLOWED = ("requires_grad_", "share_memory_", "detach_", "retain_grad")


def _written_in_place(func, args: tuple, kwargs: dict) -> "ReleasedWeight | None":
    """The released weight `func` would write into (its first argument, or `out=`), if any: densified, the
    write would land in a temporary dequantized copy and be lost without a word."""
    out = kwargs.get("out")
    for t in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(t, ReleasedWeight):
            return t
    name = getattr(func, "__name__", "")
    if not (name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.endswith("__"))) or name in _IN_PLACE_ALLOWED:
        return None
    first = args[0] if args else next(iter(kwargs.values()), None)  # nn.init's pass it as `tensor=`
    for t in first if isinstance(first, (tuple, list)) else (first,):  # torch._foreach_mul_([w, ...], ...)
        if isinstance(t, ReleasedWeight):
            return t
    return None


def _refuse_write(p: "ReleasedWeight", func) -> None:
    raise RuntimeError(
        f"lowra: {getattr(func, '__name__', func)} cannot write into a quantized frozen weight of shape "
        f"{tuple(p.shape)}: its dense storage is freed and only its packed form is kept, so the write would be lost. "
        "Leave the packed layers' weights as they are (an initialiser run through model.apply: skip the layers whose "
        "weight is a lowra ReleasedWeight), or lowra_compile.materialize(model) first to change them dense (compile "
        "the model again to quantize the new values). " + _MERGE_HINT
    )


# what both write refusals say of PEFT's merges, which write the merged values into the base weight
_MERGE_HINT = (
    "PEFT's merge_and_unload, merge_adapter and unmerge_adapter write so: to fold the adapters into the base, call "
    "lowra_compile.merge(model), which dequantizes first; an adapter merged before the model was quantized is part "
    "of the packed base and cannot be unmerged."
)


# `Parameter(data, requires_grad)` of a tensor subclass is `data.detach().requires_grad_(requires_grad)`, and
# raises unless that is of `data`'s class (torch's own message, naming detach()). Module._apply calls it on
# every moved or cast weight under `torch.__future__.set_overwrite_module_params_on_conversion(True)` or
# `set_swap_module_params_on_conversion(True)`, and `model.to("meta")` always.
_PARAMETER_NEW = torch.nn.Parameter.__new__.__code__


def _detached(p: "ReleasedWeight", for_parameter: bool = False) -> Tensor:
    """`p.detach()`: the dequantized weight on the CPU (see the module's docstring), or `p` itself where a
    dense copy would be wrong: on the meta device, which holds no values to dequantize or copy, and when
    `Parameter(p, ...)` calls it (`for_parameter`: the caller's frame is `Parameter.__new__`), which wants a
    `ReleasedWeight` back: `Parameter(p, requires_grad=False)` is then `p` itself, as `ReleasedWeight(p)` is,
    and `Parameter(p)` (requires_grad=True) raises as unfreezing `p` does. The weight is frozen, so
    detaching it changes nothing else."""
    if p.is_meta or for_parameter:
        return p
    return dequantized(p).cpu()


_PACKED_ATTRIBUTES = ("_lowra_weight", "_lowra_packed", "_lowra_group_size", "_lowra_seconds", "_lowra_transposed")


def _data_alias(p: "ReleasedWeight") -> "ReleasedWeight":
    """`p.data`: a released weight on `p`'s own (freed) storage and packed form, frozen, as `p.data` of a dense
    weight is `p`'s values without autograd. Densified, it was a dequantized copy, so `w.data.mul_(...)`,
    `w.data.copy_(...)` and `w.data[i] = v` (the writes an initialiser or a weight surgery makes) landed in it
    and were lost without a word; on the alias they raise as on `p`, while reads (`w.data.float()`,
    `F.linear(x, w.data)`, `w.data.shape`) read `p`'s packed form. No copy: the alias shares the packed tensors."""
    alias = Tensor.data.__get__(p)  # a plain tensor on p's storage (size 0), without autograd
    alias.__class__ = ReleasedWeight
    for attr in _PACKED_ATTRIBUTES:
        setattr(alias, attr, getattr(p, attr))
    return alias


# `Module.requires_grad_(True)` is `for p in self.parameters(): p.requires_grad_(True)`: the refusal of the first
# packed weight comes after the parameters before it were unfrozen, and their earlier flags are gone by then
# (nothing records them), so they cannot be set back; the error names them instead.
_MODULE_REQUIRES_GRAD = torch.nn.Module.requires_grad_.__code__


def _refuse_training(p: "ReleasedWeight", requires_grad: bool, caller=None) -> None:
    """`p.requires_grad_(True)` (`model.requires_grad_(True)` calls it on every parameter): a packed weight has
    no dense values to update and the packed op gives it no gradient, so it would stay as it is, silently.
    `caller`: the frame that asked, when known: `torch.nn.Parameter(p)` (whose requires_grad is True unless
    given), or `Module.requires_grad_`, whose parameters before `p` it already unfroze (named in the error)."""
    if not requires_grad:
        return
    code = getattr(caller, "f_code", None)
    state = ""
    if code is _PARAMETER_NEW:
        state = (" torch.nn.Parameter(w) asks for a trainable parameter by default; "
                 "torch.nn.Parameter(w, requires_grad=False) gives the packed weight itself.")
    elif code is _MODULE_REQUIRES_GRAD and isinstance(caller.f_locals.get("self"), torch.nn.Module):
        state = _unfrozen_before(caller.f_locals["self"], p)
    raise RuntimeError(
        f"lowra: a quantized frozen weight of shape {tuple(p.shape)} cannot train: its dense storage is freed "
        f"and only its packed form is kept, which gets no gradient.{state} Keep the packed layers frozen and "
        "unfreeze the others by name, or lowra_compile.materialize(model) first to train every weight dense."
    )


def _unfrozen_before(module: torch.nn.Module, p: "ReleasedWeight") -> str:
    """What `module.requires_grad_(True)` changed before it reached the packed weight `p`, for the error."""
    names = []
    for where, q in module.named_parameters():
        if q is p:
            break
        names.append(where)
    else:
        return ""
    if not names:
        return f" requires_grad_(True) stopped at {where!r}, its first parameter: nothing was changed."
    shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (
        f" requires_grad_(True) stopped at {where!r}, after setting requires_grad=True on the {len(names)} "
        f"parameter(s) before it ({shown}), whatever they were; the parameters from {where!r} on are unchanged. "
        "Set those back as you had them (e.g. model.get_parameter(name).requires_grad_(False) for each one that "
        "was frozen, such as the embedding) before training."
    )


def _copy_own_values(p: "ReleasedWeight", source: Tensor) -> None:
    """`p.copy_(source)` for a packed weight: a no-op when `source` holds `p`'s dequantized values, each up to one
    bf16 step of itself (a checkpoint written in bf16, or dequantized on another device), an error otherwise.
    Value by value, not by the norm: a norm-wise allowance let a small change through unapplied, such as a
    merged LoRA update (a fraction of a percent of the weight's norm)."""
    dense = dequantized(p).float()
    source = source.to(dense.device, torch.float32).expand_as(dense)
    # (2^-7: one bf16 step at the bottom of a binade; 2^-24: float16's subnormal step, for values near zero)
    if ((source - dense).abs() > 2**-7 * dense.abs() + 2**-24).any():
        raise RuntimeError(
            f"lowra: cannot write new values into a quantized frozen weight of shape {tuple(p.shape)}: its dense "
            f"storage is freed and only its packed form is kept. {_MERGE_HINT} To resume on "
            "the same packed base, load_quantized the file save_quantized wrote into a fresh model, then its "
            "adapters. To load other weights, load the checkpoint before compiling, or "
            "lowra_compile.materialize(model), load it, and compile the model anew (which quantizes it again)."
        )


def _converted(func, p: "ReleasedWeight", args: tuple, kwargs: dict) -> "ReleasedWeight":
    """`p.to(...)` and the like for a packed weight: `p` itself when nothing changes (as for any tensor; no
    dequantization, so `model.to(its own device)` costs nothing), otherwise a released weight of the target
    device and dtype whose packed form is `p`'s, moved there. The packed tensors do not depend on the dense
    dtype, which only sets what dequantization returns; only they move, never a dense weight."""
    target = func(torch.empty(0, dtype=p.dtype, device=p.device), *args, **kwargs)
    if (target.device, target.dtype) == (p.device, p.dtype):
        return p
    if torch.compiler.is_compiling():  # a cast in the model's code (DoRA's W.to(x.dtype)), not model.to(...)
        return func(dequantized(p), *args, **kwargs)
    if not target.dtype.is_floating_point:
        raise RuntimeError(
            f"lowra: a quantized frozen weight of shape {tuple(p.shape)} cannot become {target.dtype}: it "
            "dequantizes to real floating point only"
        )
    pw = p._lowra_weight
    # one layer's worth, uninitialised, freed at once by `release`: the tensor only needs p's shape and stride
    dense = torch.empty_strided(p.shape, p.stride(), dtype=target.dtype, device=target.device)
    moved = torch.nn.Parameter(dense, requires_grad=False)
    packed = PackedWeight.from_tensors([t.to(target.device) for t in pw.tensors()], pw.shape, target.dtype, pw.group_size)
    _attach_like(moved, packed, p)
    release(moved)
    return moved


def _adopt(p: "ReleasedWeight", source: "ReleasedWeight") -> None:
    """`p.data = source` for released weights: `p` takes `source`'s device, dtype and packed form."""
    if source is p:
        return
    Tensor.data.__set__(p, source)
    _attach_like(p, source._lowra_weight, source)


def _attach_like(p: Tensor, packed: PackedWeight, like: "ReleasedWeight") -> None:
    """Attach `packed` to `p` with `like`'s seconds, layout and quantizing options."""
    attach(p, packed, like._lowra_seconds, like._lowra_transposed, quantized_with(like._lowra_packed[0]))


def attach(
    p: Tensor, packed: PackedWeight, seconds: dict[str, float] | None = None, transposed: bool = False,
    options: dict | None = None,
) -> None:
    """Cache the packed form on the parameter, so recompiles never quantize again; `seconds`: the time
    spent quantizing it, per stage (none when it was loaded from a checkpoint); `transposed`: `p` is stored
    (in, out) and `packed` holds its transpose (GPT-2's Conv1D); `options`: the quantizing options it was
    made with (`LowRAConfig.quantizing()`; None: unknown, a checkpoint written before they were kept)."""
    p._lowra_weight = packed
    p._lowra_packed = tuple(packed.tensors())
    _share_one_graph_across_layers(p._lowra_packed)
    # on the first packed tensor, not the parameter: a recompiled graph holds only the packed tensors
    p._lowra_packed[0]._lowra_options = options
    p._lowra_group_size = packed.group_size
    p._lowra_seconds = dict(seconds or {})
    p._lowra_transposed = transposed


# How Dynamo names a released weight's codes and codebooks (packed tensors 3 to 10: their row counts are the
# plan's, so they differ from layer to layer) when a frame reads them through its own module's attributes:
# the frame of one layer, or of a part of one, which Dynamo runs for every layer after a graph break inside
# the layer. Not through a numbered child (`_modules['3']`): a frame over a whole stack of layers reads each
# layer's packed tensors as inputs of their own, and traced with symbolic sizes it compiled 8x slower.
_CODES_AND_CODEBOOKS = range(TENSOR_COUNT - 2 * len(BIT_WIDTHS), TENSOR_COUNT)
PER_LAYER_PACKED_SOURCES = (
    r"^(?!.*_modules\['\d+'\]).*\._lowra_packed\[(" + "|".join(map(str, _CODES_AND_CODEBOOKS)) + r")\]"
)


def _share_one_graph_across_layers(packed: tuple[Tensor, ...]) -> None:
    """Let one graph of a frame Dynamo runs for every layer serve all of them.

    Dynamo keeps the sizes of a parameter's attributes static, so each layer's packed tensors failed the
    guards of the graph compiled for the layer before: one compile per layer, and past Dynamo's
    recompile limit (8) the other layers ran eagerly, unfused. Sources in `torch.compiler.config.
    dynamic_sources` escape that rule, and a row count marked unbacked is not specialized when it is 0 or 1
    (a width a layer does not use). The packed op reads every size at run time, so nothing in a graph
    depends on them."""
    sources = torch.compiler.config.dynamic_sources
    if PER_LAYER_PACKED_SOURCES not in sources.split(","):
        torch.compiler.config.dynamic_sources = ",".join(filter(None, (sources, PER_LAYER_PACKED_SOURCES)))
    for i in _CODES_AND_CODEBOOKS:
        mark_unbacked(packed[i], 0)


def quantized_with(packed: Tensor) -> dict | None:
    """The quantizing options of a packed weight, given its first packed tensor (None: unknown)."""
    return getattr(packed, "_lowra_options", None)


def release(p: Tensor) -> None:
    """Free `p`'s dense storage; it must already carry its packed form (`attach`).

    A storage `p` does not own alone is left to its other owners, and `p` gets a storage of its own first,
    allocated and never touched: one that cannot be resized (memory-mapped from a checkpoint: transformers'
    `from_pretrained` and `torch.load(mmap=True)` on the CPU), one that holds more than `p` (a view into a
    fused buffer), or one another tensor also views (`head.weight = Parameter(embed.weight.data)`: freed in
    place, the embedding would lose its rows). The memory then goes when its last owner lets it go."""
    if isinstance(p, ReleasedWeight):
        return
    with torch.no_grad():
        storage = p.untyped_storage()
        if not _owned_alone(p, storage):
            p.data = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=p.device)
        del storage
        p.untyped_storage().resize_(0)
    p.__class__ = ReleasedWeight


def _owned_alone(p: Tensor, storage: torch.UntypedStorage) -> bool:
    """Whether `p` is the only tensor on `storage`, spans all of it, and it can be freed in place."""
    if not storage.resizable() or storage.nbytes() != p.numel() * p.element_size():
        return False
    # counted: p itself and the `storage` handle; one more is another tensor (or a view) on the same memory.
    # A private count: a torch without it gets the other way, which is right for every storage and frees
    # this one too, once its last owner (`p`) moves to a storage of its own.
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return use_count is not None and use_count(storage._cdata) <= 2


def materialize_weight(p: Tensor) -> None:
    """Give a released weight its dense storage back (dequantized) and its plain Parameter class."""
    if not isinstance(p, ReleasedWeight):
        return
    with torch._C.DisableTorchFunctionSubclass():
        dense = dequantized(p)
        p.__class__ = torch.nn.Parameter
        with torch.no_grad():
            p.untyped_storage().resize_(dense.numel() * dense.element_size())
            p.copy_(dense)
    for attr in _PACKED_ATTRIBUTES:
        delattr(p, attr)
    p.__dict__.pop("_lowra_graphs", None)  # graphs compiled for its packed form (backend.BoundGraph)
