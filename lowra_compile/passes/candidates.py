"""A directory of quantization candidates, so that planning a model again at another budget skips quantizing.

`quantize_layer` (the costly stage: Lloyd-Max codebooks, fitted scales and error-feedback errors at every
width) depends only on the weight, its input statistics and a few options, never on the budget. With the
option `candidates_dir`, each layer's `LayerQuant` is saved there per width, under a digest of everything
it depends on; a later compile whose layer has the same digest loads the widths found and quantizes only
the missing ones. Sweeping budgets or bit sets over one model then quantizes each layer once:

    first compile, bits=3.0:             quantize widths 1-4   -> save  <digest>.safetensors {1, 2, 3, 4}
    next compile, bits=2.0:              load widths 1-4
    next compile, bit_choices=(2,):      load width 2

The digest covers the weight's bytes, E[x^2], the Hessian factor's E[x x^T] and damping, the group size,
codebook, Lloyd-Max iterations, scale fitting, the torch version, the device type (CUDA kernels round
differently from the CPU reference) and the source of the modules that compute the candidates; a change
in any of them misses. Rows are quantized independently at every width, so a width loaded from a larger
set equals that width quantized alone (up to the float summation order of the error-feedback pass).
Files (safetensors) hold levels, group scales and errors, and with error-feedback rounding the codes that
rounding gave at every width (bit-packed), which `assemble` reads back for the planned rows instead of
rounding them again: 163 MB for SmolLM2-135M's 210 layers at four widths (30 MB without the codes), and
packing a lowra point of the reduced accuracy grid takes 7 s instead of 33-40 s on 2 cores, the packed
weights unchanged. A file that cannot be read is quantized again and replaced, with a warning.

Several processes may share one directory (parallel compiles of one model at several budgets: the
accuracy grid's shards). A layer's candidates are computed under an exclusive lock on `<digest>.lock`
(`fcntl.flock`, which the system drops if its process dies; the file is removed when done), so a second
process asking for the same layer waits for the first and loads its file instead of quantizing the layer
again alongside it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no lock; processes sharing a directory may then quantize a layer twice
    fcntl = None

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..runtime.format import pack_codes, unpack_codes
from .gptq import HessianFactor
from .quantize import CodebookFit, LayerQuant, quantize_layer

_FIELDS = ("absmax_codes", "absmax_scale", "levels", "error")  # per width; and "codes" with error feedback
# the code whose results the files hold (read, not imported: passes do not depend on codegen); editing any
# of these modules invalidates every file
_PACKAGE = Path(__file__).resolve().parent.parent
_SOURCES = hashlib.blake2b(b"".join(
    (_PACKAGE / name).read_bytes()
    for name in ("passes/candidates.py", "passes/quantize.py", "passes/gptq.py", "runtime/format.py", "runtime/reference.py", "codegen/gptq_block.py")
))


def _digest(weight: Tensor, fit: CodebookFit, x2: Tensor | None, factor: HessianFactor | None) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(_SOURCES.digest())
    options = (torch.__version__, weight.device.type, tuple(weight.shape), str(weight.dtype), fit,
               None if factor is None else factor.ridge)
    h.update(repr(options).encode())
    for t in (weight, x2, None if factor is None else factor.gram):
        # a copy: numpy() of the tensor itself would mark the weight's storage not resizable, and the
        # backend frees the dense weight by resizing its storage to 0
        h.update(b"-" if t is None else t.detach().flatten().view(torch.uint8).cpu().clone().numpy())
    return h.hexdigest()


def _load(path: Path, device: torch.device, quiet: bool = False) -> dict[int, tuple[Tensor, ...]]:
    """width -> (absmax codes, absmax scales, levels, error) saved in `path`; {} with a warning (unless
    `quiet`) when it cannot be read."""
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            # the codes stay on disk until packing reads the planned widths' (_SavedCodes)
            return {b: tuple(f.get_tensor(f"{b}.{name}") for name in _FIELDS)
                    for b in {int(name.split(".")[0]) for name in f.keys()}}
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file must not stop a compile)
        if not quiet:
            warnings.warn(f"lowra: cannot read the saved candidates {path} ({e!r}); quantizing the layer again", stacklevel=4)
        return {}


class _SavedCodes(Mapping):
    """width -> error-feedback codes [N, K] uint8 of one layer, read from its file when asked: a model's
    candidates never hold the codes of every layer and width in memory at once."""

    def __init__(self, path: Path, widths: tuple[int, ...], k: int, device: torch.device):
        self.path, self.widths, self.k, self.device = path, widths, k, device

    def __getitem__(self, bits: int) -> Tensor:
        if bits not in self.widths:
            raise KeyError(bits)
        try:
            with safe_open(self.path, framework="pt", device=str(self.device)) as f:
                words = f.get_tensor(f"{bits}.codes")
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"lowra: the saved candidates {self.path} went missing during the compile ({e!r}); "
                               "compile again") from e
        return unpack_codes(words, bits, self.k).to(torch.uint8)

    def __iter__(self) -> Iterator[int]:
        return iter(self.widths)

    def __len__(self) -> int:
        return len(self.widths)


def quantize_layer_cached(
    directory: str | Path | None,
    weight: Tensor,
    bit_choices: tuple[int, ...],
    fit: CodebookFit,
    x2: Tensor | None = None,
    factor: HessianFactor | None = None,
) -> LayerQuant:
    """`quantize_layer` with its widths loaded from / saved to `directory` (None: no cache)."""
    if directory is None:
        return quantize_layer(weight, bit_choices, fit, x2, factor)
    path = Path(directory).expanduser() / f"{_digest(weight, fit, x2, factor)}.safetensors"
    # width -> (absmax codes, absmax scales, levels, error). Not torch.load: inside the backend's compile
    # it detects the fake mode of the tracing context and returns meta tensors.
    stored = _load(path, weight.device, quiet=True) if path.exists() else {}  # read again, warning, under the lock
    if any(b not in stored for b in bit_choices):
        with _one_process_at_a_time(path):
            # another process may have saved them while this one waited
            stored = _load(path, weight.device) if path.exists() else {}
            missing = tuple(b for b in bit_choices if b not in stored)
            if missing:
                stored = _quantize_and_save(path, stored, weight, missing, fit, x2, factor)
    codes = None if factor is None else _SavedCodes(path, tuple(bit_choices), weight.shape[1], weight.device)
    return LayerQuant(
        tuple(bit_choices), fit.group_size, fit.fit_scales, {b: tuple(stored[b][:2]) for b in bit_choices},
        {b: stored[b][2] for b in bit_choices}, torch.stack([stored[b][3] for b in bit_choices], 1), codes,
    )


@contextmanager
def _one_process_at_a_time(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path`'s lock file (none where `fcntl` is missing: Windows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    name = path.with_suffix(".lock")
    with open(name, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            locked = True
        except OSError:  # a file system without locks: go on unlocked, as without fcntl
            locked = False
        try:
            yield
        finally:
            if locked:
                # Gone before it is released: whoever opens the name next makes a new lock, and finds the
                # file saved under it (at worst, after a failure here, two processes quantize the layer alike).
                name.unlink(missing_ok=True)
                fcntl.flock(lock, fcntl.LOCK_UN)


def _quantize_and_save(
    path: Path, stored: dict[int, tuple[Tensor, ...]], weight: Tensor, missing: tuple[int, ...], fit: CodebookFit,
    x2: Tensor | None, factor: HessianFactor | None,
) -> dict[int, tuple[Tensor, ...]]:
    """Quantize the `missing` widths, save them with the `stored` ones to `path`, and return all of them."""
    new = quantize_layer(weight, missing, fit, x2, factor, keep_codes=True)
    flat = {} if not stored else load_file(path)  # the stored widths' tensors, codes included
    for j, b in enumerate(missing):
        flat.update({f"{b}.{f}": t for f, t in zip(_FIELDS, (*new.groups[b], new.levels[b], new.error[:, j]))})
        if new.codes is not None:
            flat[f"{b}.codes"] = pack_codes(new.codes[b], b)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    # a copy of each: with absmax scales every width holds the same group tensors, which safetensors refuses
    save_file({name: t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
               for name, t in flat.items()}, tmp)
    tmp.replace(path)  # whole files only: another process may be reading the same digest
    return {**stored, **{b: (*new.groups[b], new.levels[b], new.error[:, j]) for j, b in enumerate(missing)}}
