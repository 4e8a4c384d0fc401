"""The spectral engine's small-block steps, one program per matrix of a batch, all in float64 registers:

- ``cholesky_qr(X)``: Cholesky QR of [B, n, r] blocks (the engine sends r <= 8: the register tiles grow as r^2):
  S = X^T X, its Cholesky factor L and L^-1 formed in registers, then X L^-T written out; one launch per pass instead
  of a product, a batched r x r Cholesky (several cuSOLVER kernels and a pointer-array set-up) and a batched
  triangular solve.
- ``bottom_eigvec(H)``: the eigenvector of the smallest eigenvalue of each symmetric positive definite [r, r] H (the
  Rayleigh-Ritz matrix of a bottom block), as the dominant eigenvector of H^-1 by repeated squaring; one launch
  instead of some twenty small ones.

Both follow the pure-torch steps in ``fastcnc.spectral`` (``_orth``, ``_bottom_ritz``) operation for operation; the
engine computes every value and certificate from the resulting vectors afresh, so these steps affect the quality of
an iterate, never a bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import device_guard


@triton.jit
def _inverse_cholesky_factor(S, R: tl.constexpr):
    """L^-1 for the Cholesky factor L of the symmetric positive definite [R, R] register tile S (S = L L^T)."""
    cols = tl.arange(0, R)
    ii = cols[:, None]
    jj = cols[None, :]
    # L one column per step: L[:, j] = (S[:, j] - L L[j, :]^T) / sqrt(that at j), below j
    L = tl.zeros((R, R), dtype=tl.float64)
    for j in tl.static_range(R):
        l_row = tl.sum(tl.where(ii == j, L, 0.0), axis=0)
        c = tl.sum(tl.where(jj == j, S, 0.0), axis=1) - tl.sum(L * l_row[None, :], axis=1)
        d = tl.sum(tl.where(cols == j, c, 0.0), axis=0)
        L = tl.where((jj == j) & (ii >= j), c[:, None] / tl.sqrt(d), L)
    # Z = L^-1 by forward substitution, one row per step
    Z = tl.zeros((R, R), dtype=tl.float64)
    for j in tl.static_range(R):
        l_row = tl.sum(tl.where(ii == j, L, 0.0), axis=0)
        l_jj = tl.sum(tl.where(cols == j, l_row, 0.0), axis=0)
        acc = tl.sum(tl.where(ii < j, l_row[:, None] * Z, 0.0), axis=0)
        z_row = (tl.where(cols == j, 1.0, 0.0) - acc) / l_jj
        Z = tl.where(ii == j, z_row[None, :], Z)
    return Z


@triton.jit
def _cholesky_qr_kernel(x_ptr, y_ptr, n, r, sxb, sxn, sxr, syb, syn, syr,
                        R: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, R)
    cols64 = cols.to(tl.int64)  # (offsets in int64: a stride times an index may pass 2^31)
    col_ok = cols < r
    ii = cols[:, None]
    jj = cols[None, :]
    x_base = x_ptr + b * sxb
    y_base = y_ptr + b * syb

    # S = X^T X, accumulated over row tiles
    S = tl.zeros((R, R), dtype=tl.float64)
    for start in range(0, n, BLOCK_N):
        rows = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (rows[:, None] < n) & col_ok[None, :]
        x = tl.load(x_base + rows[:, None] * sxn + cols64[None, :] * sxr, mask=mask, other=0.0)
        S += tl.sum(x[:, :, None] * x[:, None, :], axis=0)
    # the torch path's diagonal term (keeps nearly dependent columns factorable); padding columns get I. (Float
    # literals in the range of float32 are float32 in Triton: 1 + 1e-14 would round to 1, so it is built in float64)
    S = tl.where(ii == jj, S * tl.full((), 1 + 1e-14, tl.float64) + 1e-300, S)
    S = tl.where((ii == jj) & (ii >= r), 1.0, S)

    Z = _inverse_cholesky_factor(S, R)

    # Y = X L^-T: y_i = Z x_i for every row i
    Zt = tl.trans(Z)
    for start in range(0, n, BLOCK_N):
        rows = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (rows[:, None] < n) & col_ok[None, :]
        x = tl.load(x_base + rows[:, None] * sxn + cols64[None, :] * sxr, mask=mask, other=0.0)
        y = tl.sum(x[:, :, None] * Zt[None, :, :], axis=1)
        tl.store(y_base + rows[:, None] * syn + cols64[None, :] * syr, y, mask=mask)


@triton.jit
def _bottom_eigvec_kernel(h_ptr, z_ptr, r, shb, shr, shc, szb, szr,
                          R: tl.constexpr, SQUARINGS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, R)
    col_ok = cols < r
    ii = cols[:, None]
    jj = cols[None, :]
    mask = col_ok[:, None] & col_ok[None, :]
    H = tl.load(h_ptr + b * shb + ii.to(tl.int64) * shr + jj.to(tl.int64) * shc, mask=mask, other=0.0)
    H = 0.5 * (H + tl.trans(H))
    trace = tl.sum(tl.sum(tl.where(ii == jj, H, 0.0), axis=1), axis=0)
    H = tl.where(ii == jj, H + (tl.full((), 1e-15, tl.float64) * trace + 1e-300), H)
    H = tl.where((ii == jj) & (ii >= r), 1.0, H)  # padding: I (its inverse's block is I, below the matrix's own)
    Z = tl.where(mask, _inverse_cholesky_factor(H, R), 0.0)  # H^-1 = Z^T Z on the matrix's own block only

    # K = Z^T Z = H^-1, then K^(2^SQUARINGS), rescaled by its trace every third squaring (as _dominant)
    K = tl.sum(Z[:, :, None] * Z[:, None, :], axis=0)
    for k in tl.static_range(SQUARINGS):
        if k % 3 == 0:
            tr = tl.sum(tl.sum(tl.where(ii == jj, K, 0.0), axis=1), axis=0)
            K = K / tl.maximum(tr, 2.2250738585072014e-308)
        K = tl.sum(K[:, :, None] * K[None, :, :], axis=1)
    diag = tl.sum(tl.where(ii == jj, K, 0.0), axis=1)
    diag = tl.where(col_ok, diag, -1.0)
    best = tl.max(diag, axis=0)
    j = tl.min(tl.where(diag == best, cols, R), axis=0)  # first index of the largest diagonal entry (argmax)
    z = tl.sum(tl.where(jj == j, K, 0.0), axis=1)
    z = z / tl.maximum(tl.sqrt(tl.sum(z * z, axis=0)), 2.2250738585072014e-308)
    tl.store(z_ptr + b * szb + cols.to(tl.int64) * szr, z, mask=col_ok)


def _tile_rows(R: int) -> int:
    # [BLOCK_N, R, R] float64 products per tile: about 2048 values per program keeps them in registers
    return max(16, 2048 // (R * R))


def cholesky_qr(X: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """Orthonormal columns spanning each [n, r] block of the float64 [B, n, r] ``X`` (Cholesky QR, ``passes``
    times); any strides. Returns a new contiguous tensor."""
    B, n, r = X.shape
    R = triton.next_power_of_2(r)
    with device_guard(X):
        for _ in range(passes):
            Y = torch.empty((B, n, r), dtype=X.dtype, device=X.device)
            if B > 0 and n > 0:
                _cholesky_qr_kernel[(B,)](X, Y, n, r, *X.stride(), *Y.stride(), R=R, BLOCK_N=_tile_rows(R),
                                          num_warps=4)
            X = Y
    return X


def bottom_eigvec(H: torch.Tensor, squarings: int = 12) -> torch.Tensor:
    """[B, r] unit eigenvectors of the smallest eigenvalue of the symmetric positive definite float64 [B, r, r] ``H``
    (where the bottom is clustered, some unit vector of the cluster)."""
    B, r, _ = H.shape
    z = torch.empty((B, r), dtype=H.dtype, device=H.device)
    if B > 0:
        with device_guard(H):
            _bottom_eigvec_kernel[(B,)](H, z, r, *H.stride(), *z.stride(), R=triton.next_power_of_2(r),
                                        SQUARINGS=squarings, num_warps=1)
    return z
