"""Ragged batched matrix-block products for the spectral engine, all layers in one launch: for every layer l,
Y_l = A_l @ X_l (TRANS=False) or Y_l = A_l^T @ X_l (TRANS=True), where A_l is the *tall* orientation of the layer's
row-major weight W_l (A_l = W_l if W_l has at least as many rows as columns, else W_l^T).

The weights are read in place through a device table of their data pointers (no packed copy); a wide layer simply
swaps which product it computes, so every load walks W_l's contiguous rows. X and Y are zero-padded [L, n_max, R]
blocks. One program computes BLOCK_M output rows of one layer; a (layer, tile) table balances ragged layers.
"""

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _ragged_bmm_kernel(
    # pointers
    meta_ptr,  # *i64: [w_ptrs (L) | rows of W (L) | cols of W (L) | wide flags (L)]
    w_type_ptr,  # any weight of the launch: only its element type is used
    x_ptr, y_ptr, tiles_ptr,
    # sizes
    n_layers, R,
    # strides
    stride_xl, stride_xk, stride_xr, stride_yl, stride_ym, stride_yr,
    # meta
    TRANS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # -- which layer, which block of output rows, and which product of W_l that is
    pid = tl.program_id(0)
    layer = tl.load(tiles_ptr + 2 * pid)
    tile = tl.load(tiles_ptr + 2 * pid + 1)
    w_base = tl.load(meta_ptr + layer).to(w_type_ptr.dtype, bitcast=True)
    rows = tl.load(meta_ptr + n_layers + layer)
    cols = tl.load(meta_ptr + 2 * n_layers + layer)
    wide = tl.load(meta_ptr + 3 * n_layers + layer)
    # A = W (tall) or W^T (wide); A^T flips it again: the product is W^T z exactly when TRANS != wide
    use_wt = wide == 0 if TRANS else wide != 0
    out_len = tl.where(use_wt, cols, rows)
    in_len = tl.where(use_wt, rows, cols)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < out_len
    mask_r = offs_r < R
    x_base = x_ptr + layer.to(tl.int64) * stride_xl
    # -- reduction over the inner dimension, accumulated in ACC_DTYPE (fp32 for fp32/bf16/fp16 weights)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=ACC_DTYPE)
    for k0 in range(0, in_len, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < in_len
        if use_wt:  # (W^T)[m, k] = W[k, m]
            w_ptrs = w_base + offs_k[None, :].to(tl.int64) * cols + offs_m[:, None]
        else:
            w_ptrs = w_base + offs_m[:, None].to(tl.int64) * cols + offs_k[None, :]
        a = tl.load(w_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(ACC_DTYPE)
        x = tl.load(x_base + offs_k[:, None] * stride_xk + offs_r[None, :] * stride_xr,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(ACC_DTYPE)
        # the vectors are few (R <= 16): a broadcast-multiply-reduce is exact in ACC_DTYPE (no TF32, works for fp64)
        acc += tl.sum(a[:, :, None] * x[None, :, :], axis=1)
    y_ptrs = y_ptr + layer.to(tl.int64) * stride_yl + offs_m[:, None] * stride_ym + offs_r[None, :] * stride_yr
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@functools.lru_cache(maxsize=64)
def _tile_table(out_lens: tuple[int, ...], block_m: int, device: torch.device) -> torch.Tensor:
    """[(layer, tile)] pairs covering ceil(out_len_l / block_m) tiles of every layer, int32 [T, 2] on ``device``."""
    pairs = [(layer, t) for layer, n in enumerate(out_lens) for t in range(triton.cdiv(n, block_m))]
    return torch.tensor(pairs, dtype=torch.int32).to(device)


def layer_table(weights: list[torch.Tensor]) -> torch.Tensor:
    """The int64 device table the kernel reads: data pointers, rows, cols and wide flags of the layers."""
    assert weights, "weights must be a non-empty list"
    dtype, device = weights[0].dtype, weights[0].device
    for w in weights:
        assert w.dim() == 2 and w.is_contiguous(), "weights must be contiguous 2-D tensors"
        assert w.dtype == dtype and w.device == device, "weights must share one dtype and one device"
    meta = [w.data_ptr() for w in weights] + [w.shape[0] for w in weights] + [w.shape[1] for w in weights] + [
        int(w.shape[0] < w.shape[1]) for w in weights]
    return torch.tensor(meta, dtype=torch.int64).to(device)


def ragged_bmm(weights: list[torch.Tensor], x: torch.Tensor, out: torch.Tensor, *, trans: bool,
               table: torch.Tensor | None = None, block_m: int = 32) -> torch.Tensor:
    """Y_l = A_l @ X_l (or A_l^T @ X_l when ``trans``) for every layer in one launch; A_l is W_l's tall orientation.

    Args:
        weights: L contiguous 2-D tensors of one dtype on one device (read in place).
        x: [L, n_max, R] zero-padded input block (R <= 16), fp32 or fp64; row k of layer l is read for k < in_len_l.
        out: [L, m_max, R] output block (x's dtype); rows beyond each layer's output length are left untouched.
        table: ``layer_table(weights)`` when the caller reuses it across calls (built here otherwise).
    """
    assert x.dim() == 3 and out.dim() == 3 and x.shape[0] == out.shape[0] == len(weights), "x/out must be [L, n, R]"
    assert x.shape[2] == out.shape[2] <= 16, "at most 16 vectors per layer"
    assert x.dtype == out.dtype and x.dtype in (torch.float32, torch.float64), "x/out must share fp32 or fp64"
    table = layer_table(weights) if table is None else table
    tall = [max(w.shape) for w in weights]
    short = [min(w.shape) for w in weights]
    tiles = _tile_table(tuple(short if trans else tall), block_m, x.device)
    R = x.shape[2]
    _ragged_bmm_kernel[(tiles.shape[0],)](
        meta_ptr=table, w_type_ptr=weights[0], x_ptr=x, y_ptr=out, tiles_ptr=tiles,
        n_layers=len(weights), R=R,
        stride_xl=x.stride(0), stride_xk=x.stride(1), stride_xr=x.stride(2),
        stride_yl=out.stride(0), stride_ym=out.stride(1), stride_yr=out.stride(2),
        # the block is padded only to a power of two: R is usually 4 (and 2 for the residual pass)
        TRANS=trans, ACC_DTYPE=tl.float64 if x.dtype == torch.float64 else tl.float32,
        BLOCK_M=block_m, BLOCK_K=32, BLOCK_R=max(2, triton.next_power_of_2(R)),
    )
    return out
