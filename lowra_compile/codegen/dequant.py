"""Dequantize a packed mixed-precision weight into dense rows, in original channel order.

What and why
------------
For large M (training) the cheapest way to multiply by a low-bit weight is to expand it once into a
dense scratch buffer and hand that to a dense GEMM. The expansion reads N*K*b/8 bytes and writes N*K*2,
about 300/M of one GEMM's time (docs/kernels.md), and per-channel mixed precision then costs nothing
inside the GEMM. The kernel is memory-bound, so its 10-20 integer ops per element hide under the
traffic.

Rows of one bit width are contiguous in packed order, so there is one launch per bit group and BITS is
a constexpr: every width compiles its own variant with constant shifts and masks. Per element:

    code   = (word >> (j * b)) & (2^b - 1)            j-th code of its int32 word, b = 1, 2, 4
    code   = low2 | high1 << 2                         b = 3: a 2-bit plane and a 1-bit plane
    value  = codebook[row, code] * absmax_code[row, k // GROUP] * absmax_scale[row, k // GROUP // 256]
    out[perm[row], k] = value

A tile loads BLOCK_K / (32/b) whole words per row and expands them with one broadcast shift
([R, words, 1] >> [32/b]) and a reshape, instead of one load per code. The group absmax is loaded once
per (row, group) and broadcast over the group's columns (GROUP and BLOCK_K are powers of two, so one
divides the other).

The codebook lookup has three implementations, a constexpr LUT (measure them on the GPU, docs/kernels.md):
    "where"   2^b compare-and-select steps against each row's levels, loaded as [R] vectors per tile
    "gather"  tl.gather from a [R, 16] register tile (2^b levels, padded), loaded once per program (`load_lut`)
    "load"    a gathered load from the [rows, 2^b] codebook (stays in L1)

The helpers `load_lut` and `dequant_tile` are shared with the fused small-M GEMM (fused_small_m.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..runtime.format import BIT_WIDTHS

LUTS = ("where", "gather", "load")


@triton.jit
def _unpack_plane(codes_ptr, row_base, row_ok, word0, n_words, PLANE_BITS: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_R, BLOCK_K] codes of one plane: load BLOCK_K / (32/b) words per row, expand in registers."""
    PER_WORD: tl.constexpr = 32 // PLANE_BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    w = word0 + tl.arange(0, WORDS)
    words = tl.load(codes_ptr + row_base[:, None] + w[None, :], mask=row_ok[:, None] & (w < n_words)[None, :], other=0)
    shifts = tl.arange(0, PER_WORD) * PLANE_BITS
    codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << PLANE_BITS) - 1)
    return tl.reshape(codes, (BLOCK_R, BLOCK_K))


@triton.jit
def _unpack_tile(codes_ptr, rows, row_ok, k0, K, words_per_row,
                BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 codes [BLOCK_R, BLOCK_K] of group-local `rows` at columns k0 .. k0 + BLOCK_K (k0 % 32 == 0)."""
    row_base = rows * words_per_row
    if BITS == 3:
        low_words = (K + 15) // 16  # the 2-bit plane comes first in each row, then the 1-bit plane
        low = _unpack_plane(codes_ptr, row_base, row_ok, k0 // 16, low_words, 2, BLOCK_R, BLOCK_K)
        high = _unpack_plane(codes_ptr + low_words, row_base, row_ok, k0 // 32, (K + 31) // 32, 1, BLOCK_R, BLOCK_K)
        codes = low | (high << 2)
    else:
        per_word: tl.constexpr = 32 // BITS
        codes = _unpack_plane(codes_ptr, row_base, row_ok, k0 // per_word, words_per_row, BITS, BLOCK_R, BLOCK_K)
    return codes


@triton.jit
def load_lut(book_ptr, rows, row_ok, BITS: tl.constexpr, LUT: tl.constexpr):
    """The [rows, 2^b] fp32 level table for LUT "gather" (load it once, outside a K loop); else a dummy."""
    LEVELS: tl.constexpr = 1 << BITS
    if LUT == "gather":
        # padded to 16 columns whatever the width: Triton 3.6 fails to compile a gather from a table with
        # fewer elements than the program has threads (e.g. 16 rows x 4 levels at 4 warps)
        cols = tl.arange(0, 16)
        ok = row_ok[:, None] & (cols < LEVELS)[None, :]
        table = tl.load(book_ptr + rows[:, None] * LEVELS + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    else:
        table = 0.0
    return table


@triton.jit
def _lookup(book_ptr, table, rows, row_ok, codes, BITS: tl.constexpr, LUT: tl.constexpr):
    """fp32 codebook levels of `codes`; row r of the bit group uses its own 2^b levels."""
    LEVELS: tl.constexpr = 1 << BITS
    if LUT == "where":
        value = tl.zeros(codes.shape, dtype=tl.float32) + tl.load(book_ptr + rows * LEVELS, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        for j in tl.static_range(1, LEVELS):
            level = tl.load(book_ptr + rows * LEVELS + j, mask=row_ok, other=0.0).to(tl.float32)
            value = tl.where(codes == j, level[:, None], value)
    elif LUT == "gather":
        value = tl.gather(table, codes, axis=1)
    else:
        value = tl.load(book_ptr + rows[:, None] * LEVELS + codes, mask=row_ok[:, None], other=0.0).to(tl.float32)
    return value


@triton.jit
def _group_scale(absmax_codes_ptr, absmax_scale_ptr, prows, row_ok, k0, G, S,
                 GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Absmax [BLOCK_R, BLOCK_K] (or [BLOCK_R, 1] when the tile lies in one group) of packed rows `prows`."""
    if BLOCK_K > GROUP:
        NG: tl.constexpr = BLOCK_K // GROUP
        g = k0 // GROUP + tl.arange(0, NG)
        ok = row_ok[:, None] & (g < G)[None, :]
        code = tl.load(absmax_codes_ptr + prows[:, None] * G + g[None, :], mask=ok, other=0).to(tl.float32)
        scale = tl.load(absmax_scale_ptr + prows[:, None] * S + (g // 256)[None, :], mask=ok, other=0.0)
        absmax = tl.reshape(tl.broadcast_to((code * scale)[:, :, None], (BLOCK_R, NG, GROUP)), (BLOCK_R, BLOCK_K))
    else:
        g = k0 // GROUP
        code = tl.load(absmax_codes_ptr + prows * G + g, mask=row_ok, other=0).to(tl.float32)
        absmax = (code * tl.load(absmax_scale_ptr + prows * S + g // 256, mask=row_ok, other=0.0))[:, None]
    return absmax


@triton.jit
def dequant_tile(codes_ptr, book_ptr, table, absmax_codes_ptr, absmax_scale_ptr,
                 rows, row_offset, row_ok, k0, K, words_per_row, G, S,
                 BITS: tl.constexpr, GROUP: tl.constexpr, LUT: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 W tile [BLOCK_R, BLOCK_K]: `rows` index the bit group, row_offset + rows the packed order.

    `table` is `load_lut(book_ptr, rows, ...)` (used by LUT "gather" only)."""
    codes = _unpack_tile(codes_ptr, rows, row_ok, k0, K, words_per_row, BITS, BLOCK_R, BLOCK_K)
    level = _lookup(book_ptr, table, rows, row_ok, codes, BITS, LUT)
    return level * _group_scale(absmax_codes_ptr, absmax_scale_ptr, row_offset + rows, row_ok, k0, G, S, GROUP, BLOCK_R, BLOCK_K)


@triton.jit
def _dequant_kernel(
    codes_ptr, book_ptr, perm_ptr, absmax_codes_ptr, absmax_scale_ptr, out_ptr,
    row_offset, n_rows, K, words_per_row, G, S, stride_out,
    BITS: tl.constexpr, GROUP: tl.constexpr, LUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k0 = tl.program_id(1) * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    table = load_lut(book_ptr, rows, row_ok, BITS, LUT)
    value = dequant_tile(codes_ptr, book_ptr, table, absmax_codes_ptr, absmax_scale_ptr, rows, row_offset, row_ok,
                         k0, K, words_per_row, G, S, BITS, GROUP, LUT, BLOCK_R, BLOCK_K)
    out_rows = tl.load(perm_ptr + row_offset + rows, mask=row_ok, other=0)  # scatter back to original rows
    mask = row_ok[:, None] & (ks < K)[None, :]
    tl.store(out_ptr + out_rows[:, None].to(tl.int64) * stride_out + ks[None, :], value.to(out_ptr.dtype.element_ty), mask=mask)


def bit_groups(packed: list[Tensor]) -> Iterator[tuple[int, int, int, Tensor, Tensor]]:
    """(bits, first packed row, rows, codes, codebook) of every non-empty bit group, in packed order."""
    start = 0
    for i, bits in enumerate(BIT_WIDTHS):
        codes, book = packed[3 + 2 * i], packed[4 + 2 * i]
        if codes.shape[0]:
            yield bits, start, codes.shape[0], codes, book
            start += codes.shape[0]


def check_tiles(group_size: int, block_k: int, lut: str) -> None:
    """The tile rules every kernel reading packed codes relies on (see the module docstring)."""
    if group_size & (group_size - 1) or block_k & (block_k - 1) or block_k < 32:
        raise ValueError(f"lowra: group_size={group_size} and BLOCK_K={block_k} must be powers of two, BLOCK_K >= 32")
    if lut not in LUTS:
        raise ValueError(f"lowra: lut={lut!r} is not one of {LUTS}")


def dequantize(
    packed: list[Tensor], k: int, group_size: int, dtype: torch.dtype, out: Tensor | None = None,
    block_r: int = 16, block_k: int = 256, num_warps: int = 4, lut: str = "where",
) -> Tensor:
    """Dense [N, K] weight in original row order from the packed tensors, one launch per bit group."""
    check_tiles(group_size, block_k, lut)
    perm, absmax_codes, absmax_scale = packed[:3]
    if out is None:
        out = torch.empty(perm.shape[0], k, dtype=dtype, device=perm.device)
    g, s = absmax_codes.shape[1], absmax_scale.shape[1]
    for bits, start, rows, codes, book in bit_groups(packed):
        grid = (triton.cdiv(rows, block_r), triton.cdiv(k, block_k))
        _dequant_kernel[grid](
            codes, book, perm, absmax_codes, absmax_scale, out,
            start, rows, k, codes.shape[1], g, s, out.stride(0),
            BITS=bits, GROUP=group_size, LUT=lut, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps,
        )
    return out


_scratch: dict[tuple, Tensor] = {}


def scratch(n: int, k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A dense [N, K] buffer shared by every layer of that shape: each call re-dequantizes into it, so a
    model holds one dense copy per distinct (shape, dtype, device) instead of one per layer."""
    key = (n, k, dtype, device)
    if key not in _scratch:
        _scratch[key] = torch.empty(n, k, dtype=dtype, device=device)
    return _scratch[key]


def free_scratch() -> None:
    """Release every scratch buffer (they are re-created on the next call that needs one)."""
    _scratch.clear()
