"""The `lowra::*` torch.library ops: schemas, fake functions, autograd, and the reference implementation.

    lowra::dequant(packed, k, group_size, dtype) -> W [N, K]
    lowra::dora_row_norms(packed, k, group_size, lora_a, lora_b, scaling) -> ||W + s B A|| per row [N], fp32
        (DoRA's detached weight norm: no autograd; the caller passes detached adapters)
    lowra::lora_linear(x, x_lora, packed, group_size, bias?, lora_a?, lora_b?, scaling) -> y
    lowra::lora_linear_backward(grad, x_lora, packed, group_size, k, lora_a?, lora_b?, scaling, need_dx, merge_dx,
        compute_dtype) -> (dx, dx_lora, dA, dB)     merge_dx: x_lora is x (no dropout), so dx = dy W + dS A in one
        GEMM; compute_dtype: x's, which the products run in (grad and x_lora may be fp32 next to fp32 adapters)
    lowra::grouped_linear(x, offsets, packed, group_size, experts) -> y     a mixture's stacked experts
    lowra::grouped_linear_backward(grad, offsets, packed, group_size, experts, k) -> dx
    lowra::gptq_block(weight, scale, levels, u) -> (codes, errors)     one block of GPTQ rounding (quantizing)

The default implementation (every device) is `runtime.reference`. The codegen package registers the Triton
kernels on the same ops (`op.register_kernel` for "cuda", and "cpu", where they run in the interpreter only
when forced and take the reference otherwise: codegen/register.py), so graphs rewritten by the
passes call `torch.ops.lowra.*` and pick up whichever implementation the device has. The backward of
`lora_linear` is itself an op, so aot_autograd and inductor keep it as one opaque call.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._dynamo import compiled_autograd
from torch.library import custom_op

from . import reference


# The reference functions are the ops' default implementations; their annotations give the schemas.
dequant = custom_op("lowra::dequant", reference.dequantize, mutates_args=())


@dequant.register_fake
def _(packed, k, group_size, dtype):
    return packed[0].new_empty(packed[0].shape[0], k, dtype=dtype)


dora_row_norms = custom_op("lowra::dora_row_norms", reference.dora_row_norms, mutates_args=())


@dora_row_norms.register_fake
def _(packed, k, group_size, lora_a, lora_b, scaling):
    return packed[0].new_empty(packed[0].shape[0], dtype=torch.float32)


lora_linear = custom_op("lowra::lora_linear", reference.lora_linear, mutates_args=())


@lora_linear.register_fake
def _(x, x_lora, packed, group_size, bias, lora_a, lora_b, scaling):
    dtype = reference.lora_output_dtype(x, lora_a)
    return x.new_empty(*x.shape[:-1], packed[0].shape[0], dtype=dtype)


lora_linear_backward = custom_op("lowra::lora_linear_backward", reference.lora_linear_backward, mutates_args=())


@lora_linear_backward.register_fake
def _(grad, x_lora, packed, group_size, k, lora_a, lora_b, scaling, need_dx, merge_dx, compute_dtype):
    dx = grad.new_empty(*grad.shape[:-1], k) if need_dx else reference.no_output(grad)
    if lora_a is None:
        return dx, reference.no_output(grad), reference.no_output(grad), reference.no_output(grad)
    dx_lora = reference.no_output(grad) if merge_dx else x_lora.new_empty(x_lora.shape)
    return dx, dx_lora, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, x_lora, packed, group_size, bias, lora_a, lora_b, scaling = inputs
    has_lora = lora_a is not None
    ctx.save_for_backward(x_lora if has_lora else None, lora_a, lora_b, *packed)
    ctx.group_size, ctx.scaling, ctx.k = group_size, scaling, x.shape[-1]
    ctx.x_dtype, ctx.has_bias, ctx.has_lora = x.dtype, bias is not None, has_lora
    ctx.merge_dx = has_lora and x_lora is x  # no dropout: both gradients flow into the same tensor


def _merged_away(x_lora: Tensor) -> Tensor | None:
    """The gradient of x_lora when dx already holds it (x_lora is x): None, which autograd skips. Compiled
    autograd instead adds the two gradients of the one tensor and fails on None (torch 2.11 and 2.13), so
    there it is a zero tensor."""
    return torch.zeros_like(x_lora) if compiled_autograd.in_compiled_autograd_region else None


def _backward(ctx, grad: Tensor):
    x_lora, lora_a, lora_b, *packed = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    merge_dx = ctx.merge_dx and need_dx
    if x_lora is None:
        x_lora = grad.new_empty(0)
    dx, dx_lora, da, db = torch.ops.lowra.lora_linear_backward(
        grad, x_lora, packed, ctx.group_size, ctx.k, lora_a, lora_b, ctx.scaling, need_dx, merge_dx, ctx.x_dtype
    )
    dbias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
    no_packed_grad = [None] * len(packed)
    if not ctx.has_lora:
        return (dx.to(ctx.x_dtype) if need_dx else None), None, no_packed_grad, None, dbias, None, None, None
    return (
        dx.to(ctx.x_dtype) if need_dx else None,
        _merged_away(x_lora) if merge_dx else (dx_lora if ctx.needs_input_grad[1] else None),
        no_packed_grad,
        None,
        dbias,
        da if ctx.needs_input_grad[5] else None,
        db if ctx.needs_input_grad[6] else None,
        None,
    )


lora_linear.register_autograd(_backward, setup_context=_setup_context)


# Under torch.autocast, F.linear runs in the autocast dtype, and so must lora_linear, which stands in for
# it: the floating inputs a linear's autocast would cast (x, bias, the adapters; not float64) are cast, the
# weight dequantizes to that dtype, and the output comes out in it. The packed tensors are not inputs a
# linear has: their levels and scales stay exact. Without this rule the op had no autocast kernel: traced,
# it ran in float32 where the dense model ran in bfloat16 (twice the activation memory, float32 GEMMs),
# and its reference implementation cast inside while its fake said float32.
_autocast_library = torch.library.Library("lowra", "IMPL")


def _register_autocast(device_type: str) -> None:
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def autocast(x, x_lora, packed, group_size, bias, lora_a, lora_b, scaling):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(t: Tensor | None) -> Tensor | None:
            eligible = t is not None and t.is_floating_point() and t.dtype != torch.float64
            return t.to(dtype) if eligible else t

        cast_x = cast(x)
        cast_x_lora = cast_x if x_lora is x else cast(x_lora)  # keeps the no-dropout case one tensor
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return torch.ops.lowra.lora_linear.default(
                cast_x, cast_x_lora, packed, group_size, cast(bias), cast(lora_a), cast(lora_b), scaling
            )

    _autocast_library.impl("lora_linear", lambda _keyset, *args: autocast(*args), key, with_keyset=True)


for _device_type in ("cpu", "cuda"):
    _register_autocast(_device_type)


grouped_linear = custom_op("lowra::grouped_linear", reference.grouped_linear, mutates_args=())


@grouped_linear.register_fake
def _(x, offsets, packed, group_size, experts):
    return x.new_empty(x.shape[0], packed[0].shape[0] // experts)


grouped_linear_backward = custom_op("lowra::grouped_linear_backward", reference.grouped_linear_backward, mutates_args=())


@grouped_linear_backward.register_fake
def _(grad, offsets, packed, group_size, experts, k):
    return grad.new_empty(grad.shape[0], k)


def _grouped_setup_context(ctx, inputs, output) -> None:
    x, offsets, packed, group_size, experts = inputs
    ctx.save_for_backward(offsets, *packed)
    ctx.group_size, ctx.experts, ctx.k, ctx.x_dtype = group_size, experts, x.shape[-1], x.dtype


def _grouped_backward(ctx, grad: Tensor):
    offsets, *packed = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.lowra.grouped_linear_backward(grad, offsets, packed, ctx.group_size, ctx.experts, ctx.k)
        dx = dx.to(ctx.x_dtype)
    return dx, None, [None] * len(packed), None, None


grouped_linear.register_autograd(_grouped_backward, setup_context=_grouped_setup_context)


gptq_block = custom_op("lowra::gptq_block", reference.gptq_block, mutates_args=())


@gptq_block.register_fake
def _(weight, scale, levels, u):
    return weight.new_empty(weight.shape, dtype=torch.long), weight.new_empty(weight.shape, dtype=torch.float32)
