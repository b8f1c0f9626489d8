"""Linear layers that another library has quantized already (bitsandbytes' `Linear4bit` and `Linear8bitLt`,
GPTQ's and AWQ's `qweight`, HQQ's `W_q`).

lowra packs floating-point weights only, so it leaves such a layer as it is: it runs and trains as that library
runs it. A QLoRA user who adds `backend="lowra"` and keeps `quantization_config=BitsAndBytesConfig(...)` in
`from_pretrained` would otherwise get bitsandbytes' 4-bit base, and no word that lowra packed nothing.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Iterable

import torch

# where those libraries keep a layer's integer codes
_CODES = ("weight", "qweight", "W_q")


def prequantized_layers(named_modules: Iterable[tuple[str, torch.nn.Module]]) -> list[tuple[str, str]]:
    """(name, class) of each module holding its weight as integer codes, each weight once, by the module that
    holds it (PEFT's wrapper of a layer shows its base layer's weight as its own, through a property)."""
    found, seen = [], set()
    for name, module in named_modules:
        for attr in _CODES:
            codes = module._parameters.get(attr, module._buffers.get(attr, module.__dict__.get(attr)))
            if isinstance(codes, torch.Tensor) and codes.dim() >= 1 and not codes.is_floating_point() \
                    and not codes.is_complex() and id(codes) not in seen:
                seen.add(id(codes))
                found.append((name, type(module).__name__))
                break
    return found


# models already looked at: the backend asks for every graph it compiles (one per layer after a graph break in
# each), and a model's layers keep their form
_checked: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def warn_prequantized(models: Iterable[torch.nn.Module]) -> None:
    """Warn, naming one, when layers of `models` were quantized by another library; once per model."""
    for model in models:
        if model in _checked:
            continue
        _checked.add(model)
        found = prequantized_layers(model.named_modules())
        if found:
            name, kind = found[0]
            warnings.warn(
                f"lowra: {len(found)} layer(s) hold weights another library quantized already (e.g. {name!r}, a "
                f"{kind}): lowra packs floating-point weights only, so these stay as that library runs them. To "
                "have lowra quantize them, load the model in bfloat16 without quantization_config "
                "(BitsAndBytesConfig, GPTQ, AWQ, HQQ).",
                stacklevel=3,
            )
