"""Ragged batched matrix-block products for the spectral engine: for every layer l of a packed set of matrices,
Y_l = A_l @ X_l (TRANS=False) or Y_l = A_l^T @ X_l (TRANS=True), all layers in one launch.

A_l is row-major [rows_l, cols_l] at offset offs[l] of one flat buffer; X and Y are zero-padded [L, n_max, R] blocks.
One program computes BLOCK_M output rows of one layer; a (layer, tile) table balances ragged layers over the grid.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _ragged_bmm_kernel(
    # pointers
    a_ptr, x_ptr, y_ptr, tiles_ptr, offs_ptr, rows_ptr, cols_ptr,
    # sizes
    R,
    # strides
    stride_xl, stride_xk, stride_xr, stride_yl, stride_ym, stride_yr,
    # meta
    TRANS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # -- which layer and which block of output rows
    pid = tl.program_id(0)
    layer = tl.load(tiles_ptr + 2 * pid)
    tile = tl.load(tiles_ptr + 2 * pid + 1)
    base = tl.load(offs_ptr + layer)
    rows = tl.load(rows_ptr + layer)
    cols = tl.load(cols_ptr + layer)
    if TRANS:
        out_len = cols
        in_len = rows
    else:
        out_len = rows
        in_len = cols
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < out_len
    mask_r = offs_r < R
    x_base = x_ptr + layer.to(tl.int64) * stride_xl
    # -- reduction over the layer's inner dimension, accumulated in ACC_DTYPE (fp32 for fp32/bf16/fp16 weights)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=ACC_DTYPE)
    for k0 in range(0, in_len, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < in_len
        if TRANS:
            a_ptrs = a_ptr + base + offs_k[None, :].to(tl.int64) * cols + offs_m[:, None]
        else:
            a_ptrs = a_ptr + base + offs_m[:, None].to(tl.int64) * cols + offs_k[None, :]
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(ACC_DTYPE)
        x = tl.load(x_base + offs_k[:, None] * stride_xk + offs_r[None, :] * stride_xr,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(ACC_DTYPE)
        # the vectors are few (R <= 16): a broadcast-multiply-reduce is exact in ACC_DTYPE (no TF32, works for fp64)
        acc += tl.sum(a[:, :, None] * x[None, :, :], axis=1)
    y_ptrs = y_ptr + layer.to(tl.int64) * stride_yl + offs_m[:, None] * stride_ym + offs_r[None, :] * stride_yr
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


def ragged_tile_table(out_lens: torch.Tensor, block_m: int) -> torch.Tensor:
    """[(layer, tile)] pairs covering ``ceil(out_len_l / block_m)`` tiles of every layer, as int32 [T, 2]."""
    n_tiles = (out_lens + block_m - 1) // block_m
    layers = torch.repeat_interleave(torch.arange(len(out_lens)), n_tiles)
    starts = torch.cumsum(n_tiles, 0) - n_tiles
    tiles = torch.arange(int(n_tiles.sum())) - torch.repeat_interleave(starts, n_tiles)
    return torch.stack([layers, tiles], 1).to(torch.int32).contiguous()


def ragged_bmm(packed: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
               x: torch.Tensor, out: torch.Tensor, *, trans: bool, tiles: torch.Tensor, block_m: int = 32) -> torch.Tensor:
    """Y_l = A_l @ X_l (or A_l^T @ X_l when ``trans``) for every layer in one launch.

    Args:
        packed: flat buffer holding every A_l row-major, any float dtype.
        offsets, rows, cols: int64 [L] on packed's device: start, rows and cols of A_l.
        x: [L, n_max, R] zero-padded input block (R <= 16), fp32 or fp64.
        out: [L, m_max, R] output block (same dtype as x); rows beyond each layer's length are left untouched.
        tiles: ``ragged_tile_table(out_lens, block_m)`` on packed's device, out_lens = cols if trans else rows.
    """
    assert packed.dim() == 1 and packed.is_contiguous(), "packed must be a contiguous 1-D buffer"
    assert x.dim() == 3 and out.dim() == 3 and x.shape[0] == out.shape[0] == len(offsets), "x/out must be [L, n, R]"
    assert x.shape[2] == out.shape[2] <= 16, "at most 16 vectors per layer"
    assert x.dtype == out.dtype and x.dtype in (torch.float32, torch.float64), "x/out must share fp32 or fp64"
    R = x.shape[2]
    acc_dtype = tl.float64 if x.dtype == torch.float64 else tl.float32
    grid = (tiles.shape[0],)
    _ragged_bmm_kernel[grid](
        a_ptr=packed, x_ptr=x, y_ptr=out, tiles_ptr=tiles, offs_ptr=offsets, rows_ptr=rows, cols_ptr=cols,
        R=R,
        stride_xl=x.stride(0), stride_xk=x.stride(1), stride_xr=x.stride(2),
        stride_yl=out.stride(0), stride_ym=out.stride(1), stride_yr=out.stride(2),
        # the block is padded only to a power of two: R is usually 4 (and 2 for the residual pass)
        TRANS=trans, ACC_DTYPE=acc_dtype, BLOCK_M=block_m, BLOCK_K=32, BLOCK_R=max(2, triton.next_power_of_2(R)),
    )
    return out
