"""The packed weight format: one `PackedWeight` per frozen linear of shape [N, K].

Output channels (rows) are sorted by bit width; `perm[i]` is the original row of packed row i, so the
rows of one width are contiguous and each width is packed on its own. Every per-row tensor below is in
packed (sorted) row order.

Tensor data (in the fixed order of `PackedWeight.tensors()`, which is how ops receive them):
    perm           int32 [N]                  packed row -> original row
    absmax_codes   uint8 [N, G]               G = ceil(K / group_size); double-quantized group scale (the
                                              absmax, or the fitted scale of option scales="fitted")
    absmax_scale   float32 [N, ceil(G/256)]   one scale per row and 256 consecutive absmax values
    codes_b        int32 [N_b, words_b]       for b in 1, 2, 3, 4 (empty [0, words_b] if no row has b bits)
    codebook_b     float16 [N_b, 2^b]         sorted levels in [-1, 1]

Non-tensor attributes: shape (N, K), dtype (of the dense weight), group_size.

Codes are packed along K, little end first: a 1/2/4-bit word holds 32/16/8 codes, code j of a word at
bits [j*b, (j+1)*b). A 3-bit row stores two planes side by side: the low 2 bits ([words_2] words),
then the high bit ([words_1] words). K need not divide the word size; the tail is zero-padded.

Exact dense value: W[perm[i], k] = codebook_b[i', code[i', k]] * absmax(i, k // group_size), where
absmax(i, g) = absmax_codes[i, g] * absmax_scale[i, g // 256] and i' = i minus the group's offset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

BIT_WIDTHS = (1, 2, 3, 4)
ABSMAX_BLOCK = 256
CODEBOOK_DTYPE = torch.float16
TENSOR_COUNT = 3 + 2 * len(BIT_WIDTHS)  # length of PackedWeight.tensors()


def words_per_row(bits: int, k: int) -> int:
    """int32 words one packed row of `bits`-bit codes takes (3 bits: a 2-bit and a 1-bit plane)."""
    if bits == 3:
        return words_per_row(2, k) + words_per_row(1, k)
    return math.ceil(k / (32 // bits))


def _to_int32(words: Tensor) -> Tensor:
    """Reinterpret non-negative values below 2**32 (held in int64) as int32 bit patterns."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_plane(codes: Tensor, bits: int) -> Tensor:
    per_word = 32 // bits
    rows, k = codes.shape
    padded = math.ceil(k / per_word) * per_word
    c = torch.zeros(rows, padded, dtype=torch.int64, device=codes.device)
    c[:, :k] = codes.to(torch.int64)
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    words = (c.view(rows, -1, per_word) << shifts).sum(-1)
    return _to_int32(words)


def _unpack_plane(words: Tensor, bits: int, k: int) -> Tensor:
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    codes = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(words.shape[0], -1)[:, :k]


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """[R, K] integer codes in [0, 2^bits) -> int32 [R, words_per_row(bits, K)]."""
    if bits not in BIT_WIDTHS:
        raise ValueError(f"lowra: cannot pack {bits}-bit codes; widths are {BIT_WIDTHS}")
    if bits == 3:
        return torch.cat([_pack_plane(codes & 3, 2), _pack_plane(codes >> 2, 1)], dim=1)
    return _pack_plane(codes, bits)


def unpack_codes(words: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of `pack_codes`: int32 [R, words] -> int64 codes [R, K]."""
    if bits == 3:
        w2 = words_per_row(2, k)
        return _unpack_plane(words[:, :w2], 2, k) | (_unpack_plane(words[:, w2:], 1, k) << 2)
    return _unpack_plane(words, bits, k)


def quantize_absmax(absmax: Tensor) -> tuple[Tensor, Tensor]:
    """Double-quantize group absmax [N, G] (>= 0) to uint8 codes and fp32 scales [N, ceil(G/256)].

    Blocks of 256 absmax values never cross a row, so reordering rows keeps every value exact. Codes
    are rounded up: the dequantized absmax falls at most ~1e-6 (relative) below the true one (the factor
    below keeps an exact multiple from rounding up a whole step), so every normalised weight stays inside
    [-1, 1] once clamped (`passes/quantize._normalise`).
    """
    n, g = absmax.shape
    blocks = math.ceil(g / ABSMAX_BLOCK)
    padded = torch.zeros(n, blocks * ABSMAX_BLOCK, device=absmax.device)
    padded[:, :g] = absmax.float()
    padded = padded.view(n, blocks, ABSMAX_BLOCK)
    scale = padded.amax(-1).clamp_min(torch.finfo(torch.float32).tiny) / 255.0
    codes = torch.ceil(padded / scale[..., None] * (1 - 1e-6)).clamp(0, 255)
    return codes.view(n, -1)[:, :g].to(torch.uint8).contiguous(), scale


def dequantize_absmax(codes: Tensor, scale: Tensor) -> Tensor:
    """uint8 [N, G] codes and [N, ceil(G/256)] scales -> fp32 absmax [N, G]."""
    g = codes.shape[1]
    return codes.float() * scale.repeat_interleave(ABSMAX_BLOCK, dim=1)[:, :g]


@dataclass
class PackedWeight:
    """A frozen linear weight in the LowRA packed format (see the module docstring)."""

    shape: tuple[int, int]
    dtype: torch.dtype
    group_size: int
    perm: Tensor
    absmax_codes: Tensor
    absmax_scale: Tensor
    codes: dict[int, Tensor]
    codebooks: dict[int, Tensor]

    def tensors(self) -> list[Tensor]:
        """The flat tensor list the `lowra::*` ops take: perm, absmax codes/scale, (codes, codebook) x 4."""
        out = [self.perm, self.absmax_codes, self.absmax_scale]
        for b in BIT_WIDTHS:
            out += [self.codes[b], self.codebooks[b]]
        return out

    @classmethod
    def from_tensors(cls, tensors: list[Tensor], shape: tuple[int, int], dtype: torch.dtype, group_size: int) -> "PackedWeight":
        perm, absmax_codes, absmax_scale, *rest = tensors
        codes = {b: rest[2 * i] for i, b in enumerate(BIT_WIDTHS)}
        books = {b: rest[2 * i + 1] for i, b in enumerate(BIT_WIDTHS)}
        return cls(tuple(shape), dtype, group_size, perm, absmax_codes, absmax_scale, codes, books)

    @property
    def device(self) -> torch.device:
        return self.perm.device

    def rows_per_width(self) -> dict[int, int]:
        return {b: int(self.codes[b].shape[0]) for b in BIT_WIDTHS}

    def code_bits(self) -> float:
        """Average code bits per weight (the planner's budget unit)."""
        n, _ = self.shape
        return sum(b * r for b, r in self.rows_per_width().items()) / n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def effective_bits(self) -> float:
        """Bits per weight including codebooks, scales and the permutation."""
        n, k = self.shape
        return 8 * self.nbytes() / (n * k)

    def layout_errors(self) -> list[str]:
        """What in the tensors does not fit `shape` and `group_size` (none: all of it does), as in a damaged file."""
        n, k = self.shape
        groups = math.ceil(k / self.group_size)
        rows = self.rows_per_width()
        expected = {"perm": (n,), "absmax codes": (n, groups), "absmax scales": (n, math.ceil(groups / ABSMAX_BLOCK))}
        for b in BIT_WIDTHS:
            expected[f"{b}-bit codes"] = (rows[b], words_per_row(b, k))
            expected[f"{b}-bit codebooks"] = (rows[b], 2**b)
        errors = [f"{what} are {tuple(t.shape)}, not {shape}"
                  for (what, shape), t in zip(expected.items(), self.tensors()) if tuple(t.shape) != shape]
        if sum(rows.values()) != n:
            errors.append(f"{sum(rows.values())} rows of codes, not {n}")
        elif not errors and not torch.equal(self.perm.sort().values.cpu(), torch.arange(n, dtype=self.perm.dtype)):
            errors.append("perm is not a permutation of the rows")
        return errors

    def to(self, device: torch.device | str) -> "PackedWeight":
        moved = [t.to(device) for t in self.tensors()]
        return PackedWeight.from_tensors(moved, self.shape, self.dtype, self.group_size)


def pack_weight(
    codes: Tensor,
    bits: Tensor,
    levels: Tensor,
    absmax_codes: Tensor,
    absmax_scale: Tensor,
    group_size: int,
    dtype: torch.dtype,
) -> PackedWeight:
    """Pack per-row quantization results (all in original row order) into a `PackedWeight`.

    codes [N, K] int codes; bits [N] width per row; levels [N, >= 2^max_bits] sorted codebook per row
    (row r uses its first 2^bits[r] entries); absmax_codes [N, G] uint8 with absmax_scale computed on
    the same original row order by `quantize_absmax`.
    """
    n, k = codes.shape
    bits = bits.to(torch.int64).cpu()
    order = torch.argsort(bits * n + torch.arange(n), stable=True)  # by width, then by original row
    perm = order.to(device=codes.device, dtype=torch.int32)
    sorted_bits = bits[order]
    a_codes, a_scale = absmax_codes[perm.long()].contiguous(), absmax_scale[perm.long()].contiguous()
    packed_codes, books = {}, {}
    for b in BIT_WIDTHS:
        rows = perm.long()[(sorted_bits == b).to(perm.device)]
        packed_codes[b] = pack_codes(codes[rows].to(torch.int64), b) if len(rows) else torch.zeros(
            0, words_per_row(b, k), dtype=torch.int32, device=codes.device
        )
        books[b] = levels[rows, : 2**b].to(CODEBOOK_DTYPE).contiguous()
    return PackedWeight((n, k), dtype, group_size, perm, a_codes, a_scale, packed_codes, books)
