"""Save and load the packed base weights of a model (safetensors), so a run can skip quantization.

    lowra_compile.save_quantized(model, "base.lowra.safetensors")      # after the first compiled step
    model = build_the_same_architecture(); peft_model.load_adapter(...) # adapters: PEFT as usual
    lowra_compile.load_quantized(model, "base.lowra.safetensors")      # attaches + releases packed weights
                                       # (device="cuda": a model on the CPU gets them on the GPU, then model.to("cuda"))
    torch.compile(model, backend="lowra")                               # finds them: no re-quantization

A DoRA adapter not trained yet (B zero) starts on the loaded base as in the run that quantized: its
magnitude becomes the norm of the packed rows.

One file: tensor "<parameter name>::<i>" is item i of `PackedWeight.tensors()`; the header metadata
"lowra" holds the packed matrix's shape, dtype, group size, orientation (`transposed`: stored (in, out),
the packed matrix being its transpose, as GPT-2's Conv1D weights are; a mixture's experts stacked (E, N, K)
are packed as (E*N, K)) and the quantizing options (`options`) per parameter; "lowra_dense" lists the frozen
linear weights the saving model left dense (its `skip`), which a resumed run is warned of if it quantizes them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .passes.loftq import dora_magnitude
from .passes.ddp_names import leave_out_of_ddp_sync
from .passes.release import attach, packed_shape, packed_weight, quantized_with, release
from .report import dense_linear_weights
from .runtime.format import TENSOR_COUNT, PackedWeight
from .wrappers import bare_model


def save_quantized(model: torch.nn.Module, path: str | Path) -> int:
    """Write every packed weight of `model` to `path`; returns how many layers were saved."""
    tensors, meta, inner = {}, {}, bare_model(model)
    for name, p in inner.named_parameters(remove_duplicate=True):
        pw = packed_weight(p)
        if pw is None:
            continue
        for i, t in enumerate(pw.tensors()):
            tensors[f"{name}::{i}"] = t.detach().contiguous().cpu()
        meta[name] = {
            "shape": list(pw.shape), "dtype": str(pw.dtype).removeprefix("torch."), "group_size": pw.group_size,
            "transposed": p._lowra_transposed, "options": quantized_with(p._lowra_packed[0]),
        }
    if not meta:
        raise ValueError("lowra: the model has no packed weights; run one compiled step (or quantize_) first")
    # the frozen linears this run left dense (`skip`, ties): a resumed run that quantizes them warns
    dense = [name for name, _ in dense_linear_weights(inner)]
    save_file(tensors, str(path), metadata={"lowra": json.dumps(meta), "lowra_dense": json.dumps(dense)})
    return len(meta)


def load_quantized(
    model: torch.nn.Module, path: str | Path, device: torch.device | str | None = None
) -> torch.nn.Module:
    """Attach the packed weights in `path` to `model`'s parameters of the same names (with or without PEFT's
    wrapping), freeze them and free the dense ones.

    `device`: where the packed weights go (default: where each parameter is). A model built on the CPU then
    gets its packed base straight onto the GPU, and `model.to(device)` moves the rest: the dense base never
    has to fit there."""
    device = torch.device(device) if device is not None else None
    inner = bare_model(model)
    # under torch.inference_mode() too, the packed tensors must be ordinary ones: training saves them for backward
    with torch.inference_mode(False), _open(path) as f:
        header = f.metadata() or {}
        if "lowra" not in header:
            raise ValueError(f"lowra: {path} holds no packed weights (it was not written by save_quantized); "
                             "adapters load with PEFT, the packed base with load_quantized")
        meta = json.loads(header["lowra"])
        # every layer checked and read before any is changed: a file of another model, or a damaged one, leaves
        # this one as it was (the packed base is small, read into host memory at once)
        unwrapped = _by_unwrapped_name(inner)
        params = {name: _matching_parameter(inner, unwrapped, name, info, path) for name, info in meta.items()}
        packed = {name: _read_packed(f, name, info, params[name].dtype, path) for name, info in meta.items()}
        for name, info in meta.items():
            p = params[name]
            target = device or p.device
            if target != p.device:
                with torch.no_grad():  # one layer's worth, uninitialised: `release` frees it below
                    p.data = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=target)
            p.__dict__.pop("_lowra_dense_in", None)  # dense in an earlier file's run, packed in this one's
            p.requires_grad_(False)  # a packed weight gets no gradient: loaded into a model not yet frozen, it trains no more
            attach(p, packed.pop(name).to(target), transposed=info.get("transposed", False),
                   options=info.get("options"))  # older files: unknown
            release(p)
        for name in json.loads(header.get("lowra_dense", "[]")):  # older files: not recorded
            p = _parameter(inner, unwrapped, name)
            if p is not None:
                p._lowra_dense_in = str(path)
    _start_dora_on_the_packed_base(inner, set(map(id, params.values())))
    leave_out_of_ddp_sync(inner)
    return model


def _start_dora_on_the_packed_base(model: torch.nn.Module, loaded: set[int]) -> None:
    """A DoRA adapter not yet trained (B zero) on a weight just loaded packed gets the magnitude the quantizing
    run gives it, the norm of each row of deq(Q) + s * B @ A: PEFT set it from the dense weight, whose rows are
    up to a third longer at 2 bits, so the layer would not start as the quantized one. A trained adapter
    loaded before (B not zero) keeps the magnitude it was saved with."""
    for module in model.modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        weight = module.get_base_layer().weight if magnitudes else None
        if weight is None or id(weight) not in loaded:
            continue
        pw = packed_weight(weight)
        for adapter, magnitude in magnitudes.items():
            lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            if lora_b.any():
                continue
            device = pw.device
            with torch.no_grad():
                magnitude.weight.copy_(dora_magnitude(pw, lora_a.to(device), lora_b.to(device),
                                                      module.scaling[adapter]))


def _open(path: str | Path):
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as err:  # "header too large" of a torch.save file, which is what it usually is
        raise ValueError(f"lowra: {path} is not a safetensors file written by save_quantized (a torch.save "
                         f"checkpoint or another format?): {err}") from err


def _read_packed(f, name: str, info: dict, dtype: torch.dtype, path: str | Path) -> PackedWeight:
    """Layer `name`'s packed weight from the open file `f`, dequantizing to `dtype` (the parameter's, which may
    differ from the file's: a model cast before loading); raises naming the layer if the file's is damaged."""
    try:
        tensors = [f.get_tensor(f"{name}::{i}") for i in range(TENSOR_COUNT)]
    except SafetensorError as err:
        raise ValueError(f"lowra: {path} is damaged: layer {name!r} lacks a tensor ({err})") from err
    packed = PackedWeight.from_tensors(tensors, tuple(info["shape"]), dtype, info["group_size"])
    if errors := packed.layout_errors():
        raise ValueError(f"lowra: {path} is damaged: in layer {name!r}, " + "; ".join(errors))
    return packed


def _unwrapped(name: str) -> str:
    """A parameter's name as the model has it without PEFT's LoRA: PEFT wraps the model as `base_model.model`
    and moves each adapted layer's own parameters into its `base_layer` (twice for two parameters of one
    module: a mixture's experts)."""
    return re.sub(r"(\.base_layer)+\.", ".", name.removeprefix("base_model.model."))


def _by_unwrapped_name(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """`model`'s parameters by unwrapped name: a file saved from a PEFT model loads into the plain one (to
    run it, or to wrap it after), and one saved from a plain model into a PEFT one."""
    params: dict[str, torch.nn.Parameter] = {}
    for name, p in model.named_parameters():
        params.setdefault(_unwrapped(name), p)
    return params


def _parameter(model: torch.nn.Module, unwrapped: dict[str, torch.nn.Parameter], name: str) -> torch.nn.Parameter | None:
    """`model`'s parameter `name`, or the one of the same name without PEFT's wrapping; None if neither."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        return unwrapped.get(_unwrapped(name))


def _matching_parameter(model: torch.nn.Module, unwrapped: dict[str, torch.nn.Parameter], name: str, info: dict,
                        path: str | Path) -> torch.nn.Parameter:
    """`model`'s parameter `name`, or the one of the same name without PEFT's wrapping, checked to have the
    shape the file packed it in."""
    p = _parameter(model, unwrapped, name)
    if p is None:
        raise ValueError(
            f"lowra: {path} holds layer {name!r}, which this model does not have (with or without PEFT's "
            "wrapping): load it into the architecture it was saved from"
        )
    transposed = info.get("transposed", False)  # files written before GPT-2's Conv1D was packed lack it
    if packed_shape(tuple(p.shape), transposed) != tuple(info["shape"]):
        raise ValueError(
            f"lowra: layer {name!r} is {tuple(p.shape)} here but packed as {tuple(info['shape'])} in {path}"
            + (" (stored transposed)" if transposed else "")
        )
    return p
