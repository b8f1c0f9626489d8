"""LowRAConfig: every option of the `lowra` backend, validated once.

`torch.compile(model, backend="lowra", options={...})` hands the options dict to the backend, which
turns it into a `LowRAConfig` through `LowRAConfig.from_options`. Unknown names and bad values raise a
`ValueError` that says what is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

SUPPORTED_BITS = (1, 2, 3, 4)
CODEBOOKS = ("lloyd", "nf", "uniform")
KERNELS = ("auto", "triton", "reference")
INNER_COMPILERS = ("inductor", "aot_eager", "eager")
CALIBRATION = ("fisher", "activation", "off")
ROUNDING = ("auto", "nearest", "gptq")
SCALES = ("absmax", "fitted")
# The options that make a packed base what it is; the others (kernels, inner, mode, progress, skip,
# pack_routers, candidates_dir) only change how it is run or which layers are new.
QUANTIZING = (
    "bits", "bit_choices", "group_size", "codebook", "scales", "calibrate", "rounding", "refit_rounds",
    "loftq_iters", "lloyd_iters", "min_bits", "max_bits",
)
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


@dataclass(frozen=True)
class LowRAConfig:
    """Options of the LowRA pipeline (all have defaults; see README "Options").

    bits:         average code bits per frozen weight over the whole model (the budget), in [1, 4].
    bit_choices:  bit widths a single output channel may get; the paper's set is (1, 2, 4).
    group_size:   K elements sharing one absmax scale.
    codebook:     "lloyd" (weighted Lloyd-Max per channel), "nf" (NormalFloat levels), "uniform" (RTN grid).
    scales:       "fitted" (the default: per width, the group scale that minimises the E[x^2]-weighted error
                  of the channel's codebook; passes/quantize.py) or "absmax" (each group's largest |weight|,
                  QLoRA's).
    calibrate:    "fisher" (E[x^2] and E[g^2] from the first batch, or every batch given to quantize_),
                  "activation" (E[x^2] only) or "off" (plain weight error, the paper's data-free criterion).
                  True means "fisher", False "off".
    rounding:     "gptq" (error-feedback rounding on the calibrated E[x x^T] of each layer's input; needs
                  calibration), "nearest" (each weight to its nearest level), or "auto" (the default):
                  "gptq" when calibrating, "nearest" with calibrate="off" (a built config holds the result).
    refit_rounds: with rounding="gptq", times each channel's group scales (when fitted) and levels are
                  refitted to its codes by least squares on E[x x^T] (the codes rounded again onto them
                  in between); 0 (the default) keeps those fitted on the weights. 2 lowers the layers'
                  output error by 5-10% but not the perplexity, for 3-5x the packing time
                  (docs/accuracy.md).
    loftq_iters:  alternating LoftQ steps for LoRA init when adapters exist, B is zero and A trains (0 = off).
    lloyd_iters:  Lloyd-Max iterations per codebook.
    skip:         substrings of parameter or module names whose linears stay dense (e.g. "lm_head").
    pack_routers: quantize a mixture's routers (transformers' *Router modules) too; by default they stay
                  dense: one row per expert, and their error changes which experts a token takes.
    kernels:      "auto" (on CUDA, per shape, the fastest of the Triton kernels and cuBLAS by the selection table
                  or a short autotune; the reference elsewhere), "triton" (on CUDA, no cuBLAS GEMM for the LoRA
                  ops; the reference elsewhere too, as `report()` shows) or "reference" (pure torch).
    inner:        compiler run on the rewritten graph ("eager" runs a graph holding a checkpointed region
                  through "aot_eager": run as it is, its recomputation draws new dropout masks).
    mode:         torch.compile's `mode` for that compiler (Inductor only), given here so that it goes with
                  the other options: torch.compile takes `mode` or `options`, not both. CUDA graphs stay
                  off (backend.mode_options).
    min_bits / max_bits: per-channel floor and ceiling applied on top of bit_choices.
    progress:     show progress bars during quantization.
    candidates_dir: a directory where each layer's candidates (codebooks, scales and errors at every width)
                  are saved and found again: compiling the same model at another budget or bit set then
                  skips the quantize stage (passes/candidates.py). None (the default) keeps nothing.
    """

    bits: float = 2.0
    bit_choices: tuple[int, ...] = SUPPORTED_BITS
    group_size: int = 64
    codebook: str = "lloyd"
    scales: str = "fitted"
    calibrate: str = "fisher"
    rounding: str = "auto"
    refit_rounds: int = 0
    loftq_iters: int = 1
    lloyd_iters: int = 12
    skip: tuple[str, ...] = ("lm_head",)
    pack_routers: bool = False
    kernels: str = "auto"
    inner: str = "inductor"
    mode: str | None = None
    min_bits: int = 1
    max_bits: int = 4
    progress: bool = True
    candidates_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("bit_choices", "skip"):  # a generator is read once: keep what it gave for every check
            value = getattr(self, name)
            if isinstance(value, Iterable) and not isinstance(value, (str, tuple)):
                object.__setattr__(self, name, tuple(value))
        self._check_types()
        if isinstance(self.bit_choices, Real):  # one width
            object.__setattr__(self, "bit_choices", (self.bit_choices,))
        if any(int(b) != b for b in self.bit_choices):
            raise ValueError(f"lowra: bit_choices {self.bit_choices} must be whole numbers of bits from {SUPPORTED_BITS}")
        choices = tuple(sorted(set(int(b) for b in self.bit_choices)))
        object.__setattr__(self, "bit_choices", choices)
        object.__setattr__(self, "skip", (self.skip,) if isinstance(self.skip, str) else tuple(self.skip))  # one name
        if "" in self.skip:  # a part of every name: it would keep every layer dense
            raise ValueError(f"lowra: skip {self.skip} holds an empty name, which is part of every layer's name and "
                             "would keep them all dense; give parts of the names to keep dense, e.g. ('lm_head',), or "
                             "skip=() to skip none")
        if self.calibrate is True:
            object.__setattr__(self, "calibrate", "fisher")
        elif self.calibrate is False:
            object.__setattr__(self, "calibrate", "off")
        bad = [b for b in choices if b not in SUPPORTED_BITS]
        if not choices or bad:
            raise ValueError(f"lowra: bit_choices {self.bit_choices} must be a non-empty subset of {SUPPORTED_BITS}")
        allowed = self.allowed_bits
        if not allowed:
            raise ValueError(
                f"lowra: no bit width in bit_choices={choices} lies within min_bits={self.min_bits} "
                f"and max_bits={self.max_bits}; widen the range"
            )
        if not (1.0 <= float(self.bits) <= 4.0):
            raise ValueError(f"lowra: bits={self.bits} is outside [1, 4]; pick an average budget such as 2.0 or 1.5")
        if float(self.bits) < min(allowed) - 1e-9:
            fix = (f"lower min_bits={self.min_bits}" if min(choices) < min(allowed)
                   else "add smaller widths to bit_choices")
            raise ValueError(
                f"lowra: bits={self.bits} is below the smallest allowed width {min(allowed)}; {fix} or raise the budget"
            )
        if float(self.bits) > max(allowed) + 1e-9:
            fix = (f"raise max_bits={self.max_bits}" if max(choices) > max(allowed)
                   else "add larger widths to bit_choices")
            raise ValueError(
                f"lowra: bits={self.bits} is above the largest allowed width {max(allowed)}; {fix} or lower the budget"
            )
        _check_choice("codebook", self.codebook, CODEBOOKS)
        _check_choice("scales", self.scales, SCALES)
        _check_choice("kernels", self.kernels, KERNELS)
        _check_choice("inner", self.inner, INNER_COMPILERS)
        if self.mode is not None:
            _check_choice("mode", self.mode, MODES)
        _check_choice("calibrate", self.calibrate, CALIBRATION)
        _check_choice("rounding", self.rounding, ROUNDING)
        if self.rounding == "auto":
            object.__setattr__(self, "rounding", "nearest" if self.calibrate == "off" else "gptq")
        if self.rounding == "gptq" and self.calibrate == "off":
            raise ValueError(
                'lowra: rounding="gptq" needs the input statistics of calibration; use calibrate="fisher" '
                'or "activation", or rounding="nearest"'
            )
        if self.group_size <= 0 or self.group_size % 8:
            raise ValueError(f"lowra: group_size={self.group_size} must be a positive multiple of 8 (64 is the default)")
        if self.loftq_iters < 0 or self.lloyd_iters < 0 or self.refit_rounds < 0:
            raise ValueError("lowra: loftq_iters, lloyd_iters and refit_rounds must be >= 0")
        if self.refit_rounds and self.rounding != "gptq":
            raise ValueError(f'lowra: refit_rounds={self.refit_rounds} refits to error-feedback codes; it needs '
                             f'rounding="gptq" (rounding is {self.rounding!r})')

    def _check_types(self) -> None:
        """Each option's type, before any value is read: a string for a number fails here, naming the option,
        not deep in the first compile."""
        def bad(name: str, expected: str) -> ValueError:
            value = getattr(self, name)
            return ValueError(f"lowra: {name}={value!r} must be {expected}")

        if not _is_number(self.bits):
            raise bad("bits", "a number of bits, e.g. 2.0")
        choices = self.bit_choices
        if not (_is_number(choices) or isinstance(choices, Iterable) and not isinstance(choices, str)
                and all(_is_number(b) for b in choices)):
            raise bad("bit_choices", f"a tuple of widths from {SUPPORTED_BITS}")
        for name in ("group_size", "refit_rounds", "loftq_iters", "lloyd_iters", "min_bits", "max_bits"):
            if not isinstance(getattr(self, name), Integral) or isinstance(getattr(self, name), bool):
                raise bad(name, "a whole number")
        if not (isinstance(self.skip, str) or isinstance(self.skip, Iterable) and all(isinstance(n, str) for n in self.skip)):
            raise bad("skip", "a tuple of layer names (or parts of them), e.g. ('lm_head',)")
        for name in ("progress", "pack_routers"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if self.candidates_dir is not None:
            # refused now, not after the calibration: "" (an unset environment variable) would fill the working
            # folder, a file would fail in the first layer's save
            path = os.path.expanduser(self.candidates_dir) if isinstance(self.candidates_dir, (str, os.PathLike)) else ""
            if not os.fspath(path) or os.path.exists(path) and not os.path.isdir(path):
                raise bad("candidates_dir", "a folder's path (made if missing) or None")

    @property
    def allowed_bits(self) -> tuple[int, ...]:
        return tuple(b for b in self.bit_choices if self.min_bits <= b <= self.max_bits)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | "LowRAConfig" | None) -> "LowRAConfig":
        """Build a config from `torch.compile(..., options=...)`; unknown names raise with the valid list."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"lowra: options must be a dict of option names to values, e.g. {{'bits': 2.0}}; got "
                             f"{type(options).__name__} {options!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"lowra: unknown option(s) {unknown}; valid options are {sorted(names)}")
        return cls(**dict(options))

    def quantizing(self) -> dict[str, Any]:
        """The options that decide a packed base (QUANTIZING), as JSON values: each packed weight keeps them."""
        return {name: list(v) if isinstance(v := getattr(self, name), tuple) else v for name in QUANTIZING}


def skips(skip: tuple[str, ...], name: str) -> bool:
    """Whether `skip` keeps the layer of this parameter or module name dense: an entry is any part of the name."""
    return any(entry in name for entry in skip)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"lowra: {name}={value!r} is not one of {valid}")

