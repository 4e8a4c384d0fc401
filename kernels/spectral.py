"""Ragged batched matrix-block products for the spectral engine, all layers in one launch: for every layer l,
Y_l = A_l @ X_l (TRANS=False) or Y_l = A_l^T @ X_l (TRANS=True), where A_l is the *tall* orientation of the layer's
row-major weight W_l (A_l = W_l if W_l has at least as many rows as columns, else W_l^T).

The weights are read in place through a device table of their data pointers (no packed copy); a wide layer simply
swaps which product it computes, so every load walks W_l's contiguous rows. X and Y are zero-padded [L, n_max, R]
blocks. One program computes BLOCK_M output rows of one layer; a (layer, tile) table balances ragged layers.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from ._common import device_guard, upload

# The launcher checks this alignment of every weight's data pointer, so the kernel's multiple_of hint is true.
POINTER_ALIGN = 16


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
    BLOCK_R: tl.constexpr, COLS_MULTIPLE: tl.constexpr, USE_DOT: tl.constexpr,
):
    # -- which layer, which block of output rows, and which product of W_l that is
    pid = tl.program_id(0)
    layer = tl.load(tiles_ptr + 2 * pid)
    tile = tl.load(tiles_ptr + 2 * pid + 1)
    # typed, 16-byte aligned base pointer and a row length known to be a multiple of COLS_MULTIPLE (the launcher
    # checks both): with them the compiler can prove that row segments are aligned and use vector loads
    w_base = tl.multiple_of(tl.load(meta_ptr + layer).to(w_type_ptr.dtype, bitcast=True), 16)
    rows = tl.load(meta_ptr + n_layers + layer)
    cols = tl.multiple_of(tl.load(meta_ptr + 2 * n_layers + layer), COLS_MULTIPLE)
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
        if USE_DOT:
            # fp32 with R = 16: triton 3.6 rewrites the broadcast-multiply-reduce below into a dot of default
            # (TF32) precision; an explicit IEEE dot keeps the product exact in fp32
            acc = tl.dot(a, x, acc, input_precision="ieee")
        else:
            # the vectors are few (R <= 16): a broadcast-multiply-reduce is exact in ACC_DTYPE (works for fp64)
            acc += tl.sum(a[:, :, None] * x[None, :, :], axis=1)
    y_ptrs = y_ptr + layer.to(tl.int64) * stride_yl + offs_m[:, None] * stride_ym + offs_r[None, :] * stride_yr
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@functools.lru_cache(maxsize=64)
def _tile_table(out_lens: tuple[int, ...], block_m: int, device: torch.device) -> torch.Tensor:
    """[(layer, tile)] pairs covering ceil(out_len_l / block_m) tiles of every layer, int32 [T, 2] on ``device``."""
    pairs = [v for layer, n in enumerate(out_lens) for t in range(triton.cdiv(n, block_m)) for v in (layer, t)]
    return upload(pairs, torch.int32, device).view(-1, 2)


def layer_table(weights: list[torch.Tensor]) -> torch.Tensor:
    """The int64 device table the kernel reads: data pointers, rows, cols and wide flags of the layers."""
    assert weights, "weights must be a non-empty list"
    dtype, device = weights[0].dtype, weights[0].device
    for w in weights:
        assert w.dim() == 2 and w.is_contiguous(), "weights must be contiguous 2-D tensors"
        assert w.dtype == dtype and w.device == device, "weights must share one dtype and one device"
        assert w.data_ptr() % POINTER_ALIGN == 0, f"weight data pointers must be {POINTER_ALIGN}-byte aligned"
    meta = [w.data_ptr() for w in weights] + [w.shape[0] for w in weights] + [w.shape[1] for w in weights] + [
        int(w.shape[0] < w.shape[1]) for w in weights]
    return upload(meta, torch.int64, device)


def _block_k(block_m: int, block_r: int, acc_bytes: int) -> int:
    # the broadcast-reduce holds a BLOCK_M x BLOCK_K x BLOCK_R product in registers: at most 16 KiB of it (32 fp32
    # per thread at 4 warps); fp64 with R = 16 and BLOCK_K = 32 spilled (ptxas, sm_90)
    return max(2, min(32, 16384 // (acc_bytes * block_m * block_r)))


def _cols_multiple(weights: list[torch.Tensor]) -> int:
    # the largest power of two (<= 16) dividing every row length: the kernel's contiguity hint
    g = math.gcd(*(w.shape[1] for w in weights), 16)
    return g & -g


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
    block_r = max(2, triton.next_power_of_2(R))  # padded only to a power of two: R is usually 4 (2 in the residual)
    # tl.dot needs every dimension >= 16; fp64 keeps the exact broadcast-reduce
    use_dot = x.dtype == torch.float32 and block_r >= 16 and block_m >= 16
    with device_guard(x):
        _ragged_bmm_kernel[(tiles.shape[0],)](
            meta_ptr=table, w_type_ptr=weights[0], x_ptr=x, y_ptr=out, tiles_ptr=tiles,
            n_layers=len(weights), R=R,
            stride_xl=x.stride(0), stride_xk=x.stride(1), stride_xr=x.stride(2),
            stride_yl=out.stride(0), stride_ym=out.stride(1), stride_yr=out.stride(2),
            TRANS=trans, ACC_DTYPE=tl.float64 if x.dtype == torch.float64 else tl.float32,
            BLOCK_M=block_m, BLOCK_K=32 if use_dot else _block_k(block_m, block_r, x.element_size()), BLOCK_R=block_r,
            COLS_MULTIPLE=_cols_multiple(weights),
            USE_DOT=use_dot,
        )
    return out
