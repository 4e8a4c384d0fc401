"""Backward of the CNC bilinear forms for many matrices in one launch: for every matrix i,
``grad_i = c_i0 u_i0 v_i0^T + c_i1 u_i1 v_i1^T`` (the exact gradient of sigma_hat = u^T W v with frozen unit vectors),
written in the weights' dtype, or added in place to another gradient already in a flat buffer (TSCNC's fused
backward adds it to the TSC gradient).

Each program owns one [BLOCK_M, BLOCK_N] tile of one matrix (a tile -> matrix table, cached per layout, as the TSC
kernel's layer table). The vectors are fresh tensors every step, so instead of a table of their pointers (an upload
per step) they come in one float64 buffer (the estimate's packed vectors, or a concatenation) whose layout, and so
every offset into it, is the same every step. Products are formed in float64 (the vectors' dtype) and rounded to the
output dtype through float32 (as the torch path) or directly for float64.
"""

from __future__ import annotations

import collections
import math

import torch
import triton
import triton.language as tl

from ._common import device_guard, upload

BLOCK_M = 32
BLOCK_N = 128
ALIGN = 16  # elements: every matrix's gradient starts at this boundary of the flat buffer (aligned vector stores)


@triton.jit
def _rank2_grad_kernel(
    table_ptr,  # *i64: [rows | cols | out_offset | first_tile | tiles_n | left | right (L each) | tile_matrix (T)]
    vec_ptr,  # *f64: every group's U then V, flattened ([B, m, 2] and [B, n, 2]: column 0 the max pair, 1 the min)
    coef_ptr,  # *f64 [L, 2]: the coefficients c_i0, c_i1
    grad_ptr,  # *OUT: flat gradient buffer
    n_mats,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    OUT_F64: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # add to what the buffer holds (another penalty's gradient) instead of overwriting it
):
    pid = tl.program_id(0)
    i = tl.load(table_ptr + 7 * n_mats + pid)
    rows = tl.load(table_ptr + i)
    cols = tl.load(table_ptr + n_mats + i)
    out_offset = tl.load(table_ptr + 2 * n_mats + i)
    local = pid - tl.load(table_ptr + 3 * n_mats + i)
    tiles_n = tl.load(table_ptr + 4 * n_mats + i)
    left = vec_ptr + tl.load(table_ptr + 5 * n_mats + i)  # the matrix's own left vectors (u), interleaved pairs
    right = vec_ptr + tl.load(table_ptr + 6 * n_mats + i)
    r = (local // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    c = (local % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    r_ok = r < rows
    c_ok = c < cols
    u0 = tl.load(left + 2 * r, mask=r_ok, other=0.0)
    u1 = tl.load((left + 1) + 2 * r, mask=r_ok, other=0.0)
    v0 = tl.load(right + 2 * c, mask=c_ok, other=0.0)
    v1 = tl.load((right + 1) + 2 * c, mask=c_ok, other=0.0)
    c0 = tl.load(coef_ptr + 2 * i)
    c1 = tl.load(coef_ptr + 2 * i + 1)
    g = (c0 * u0)[:, None] * v0[None, :] + (c1 * u1)[:, None] * v1[None, :]
    if not OUT_F64:  # narrower outputs are rounded from float32, as the torch path's float32 product
        g = g.to(tl.float32)
    out = grad_ptr + out_offset + r[:, None] * cols + c[None, :]
    ok = r_ok[:, None] & c_ok[None, :]
    if ACCUMULATE:  # added in float32 (float64) and rounded once: as autograd's sum for float32 / float64 outputs
        g = g + tl.load(out, mask=ok, other=0.0).to(tl.float64 if OUT_F64 else tl.float32)
    tl.store(out, g.to(grad_ptr.dtype.element_ty), mask=ok)


_TABLES: collections.OrderedDict[tuple, tuple[torch.Tensor, int, list[int]]] = collections.OrderedDict()
MAX_TABLES = 32


def _table(device: torch.device, layout: tuple, shapes: tuple[tuple[int, int], ...], at_offsets: tuple | None = None):
    """Device table for this layout of the vector groups and these matrix shapes, the tile count and each gradient's
    offset in the flat buffer (cached: both are the same every step, so no upload after the first). ``at_offsets``:
    the offsets of gradients that already exist in a flat buffer (else each starts at an ALIGN boundary)."""
    key = (device, layout, shapes, at_offsets)
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    n_mats = len(shapes)
    left, right, at = [0] * n_mats, [0] * n_mats, 0
    for index, wide, (B, m, _), (_, n, _) in layout:
        for j, (i, w) in enumerate(zip(index, wide, strict=True)):
            u, v = at + j * m * 2, at + B * m * 2 + j * n * 2  # (tall orientation: U is [m, 2], V is [n, 2])
            left[i], right[i] = (v, u) if w else (u, v)
        at += B * (m + n) * 2
    offsets, first, tiles_n, tile_matrix, at = [], [], [], [], 0
    for i, (m, n) in enumerate(shapes):
        offsets.append(at if at_offsets is None else at_offsets[i])
        at += triton.cdiv(m * n, ALIGN) * ALIGN
        first.append(len(tile_matrix))
        tiles_n.append(triton.cdiv(n, BLOCK_N))
        tile_matrix.extend([i] * (triton.cdiv(m, BLOCK_M) * tiles_n[-1]))
    rows, cols = [s[0] for s in shapes], [s[1] for s in shapes]
    hit = (upload([*rows, *cols, *offsets, *first, *tiles_n, *left, *right, *tile_matrix], torch.int64, device),
           len(tile_matrix), [*offsets, at])
    _TABLES[key] = hit
    if len(_TABLES) > MAX_TABLES:
        _TABLES.popitem(last=False)
    return hit


def rank2_grads(layout: list[tuple[list[int], list[bool], tuple[int, ...], tuple[int, ...]]], vectors: torch.Tensor,
                coef: torch.Tensor, shapes: list[tuple[int, int]], dtype: torch.dtype,
                add_to: tuple[torch.Tensor, list[int]] | None = None) -> list[torch.Tensor]:
    """``[c_i0 u_i0 v_i0^T + c_i1 u_i1 v_i1^T]`` for every matrix i, as [rows_i, cols_i] tensors of ``dtype``.

    Args:
        layout: per group of vectors (matrix indices, wide flags, shape of U [B, m, 2], shape of V [B, n, 2]), in the
            tall orientation (a wide matrix's left vectors are in V): column 0 holds the (u, v) pair of c_i0, column 1
            that of c_i1.
        vectors: float64, contiguous: every group's U then V, each flattened, in ``layout`` order (one tensor, so the
            kernel's table of offsets into it is the same every step: no pointer upload).
        coef: float64 [L, 2] coefficients.
        shapes: per matrix its own (rows, cols).
        dtype: the gradients' dtype.
        add_to: (flat buffer of ``dtype``, per matrix the element offset of its contiguous row-major [rows, cols]
            block in it): add the products to those blocks in place instead of writing a new buffer.

    Returns:
        views into one flat buffer, each contiguous (none with ``add_to``).
    """
    assert coef.dtype == torch.float64 and coef.shape == (len(shapes), 2)
    device = coef.device
    layout = tuple((tuple(index), tuple(wide), tuple(u), tuple(v)) for index, wide, u, v in layout)
    assert all(u[-1] == 2 and v[-1] == 2 for *_, u, v in layout)
    assert vectors.dtype == torch.float64 and vectors.is_contiguous() and vectors.numel() == sum(
        math.prod(u) + math.prod(v) for *_, u, v in layout), "vectors must hold the groups' U and V in order"
    if add_to is not None:
        flat, at = add_to
        assert flat.dtype == dtype and flat.device == device and flat.is_contiguous() and len(at) == len(shapes)
        assert all(0 <= o and o + m * n <= flat.numel() for o, (m, n) in zip(at, shapes, strict=True))
        at = tuple(int(o) for o in at)
    table, n_tiles, offsets = _table(device, layout, tuple(shapes), None if add_to is None else at)
    if add_to is None:
        flat = torch.empty(offsets[-1], dtype=dtype, device=device)
    if n_tiles:
        with device_guard(coef):
            _rank2_grad_kernel[(n_tiles,)](table, vectors, coef.contiguous(), flat, len(shapes), BLOCK_M=BLOCK_M,
                                           BLOCK_N=BLOCK_N, OUT_F64=dtype == torch.float64,
                                           ACCUMULATE=add_to is not None, num_warps=4)
    if add_to is not None:  # (the caller holds its views)
        return []
    return [flat[offsets[i]:offsets[i] + m * n].view(m, n) for i, (m, n) in enumerate(shapes)]
