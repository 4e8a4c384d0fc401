"""Batched, warm-started estimation of the extreme singular values (sigma_max, sigma_min) of many matrices.

Method: restarted block Krylov with Rayleigh-Ritz (a block Golub-Kahan-Lanczos), run on every layer at once.
Each matrix is taken in its *tall* orientation A (m >= n, so sigma_min = min_x |Ax|/|x| is the min(m, n)-th singular
value). From a warm block X (n x r: the previous Ritz vectors for sigma_max and the r-1 smallest), one iteration builds
the orthonormal basis Q = [X, K_1, .., K_d] with K_j = orth(A^T A K_{j-1}), forms A Q (computed along the way) and
takes the SVD of the small m x s matrix A Q. Ritz values are bracketed by the truth: sigma_max(AQ) <= sigma_max(A) and
sigma_min(AQ) >= sigma_min(A). One iteration costs 2d+1 passes over the weights (+1 for the certified residual), the
same as d+1 power-iteration steps, but converges to *both* ends. Matrices with n <= s are solved exactly (float64 SVD).

The heavy part, the block products A @ X and A^T @ Y, runs for all layers in one Triton launch per pass (CUDA, or the
interpreter in tests) or as one torch.bmm per distinct shape (CPU). The orthogonalisation and the small SVDs are
batched torch ops on zero-padded [L, n_max, s] blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from fastcnc import _backend
from fastcnc._checks import check_int, check_tensor
from fastcnc.spectral_math import kappa

__all__ = ["SpectralEstimate", "SpectralState", "extreme_singular_values", "as_matrices"]


@dataclass
class SpectralEstimate:
    """Estimates for L matrices. ``W_l @ v_max[l] ~= sigma_max[l] * u_max[l]`` in each matrix's own orientation.

    ``err_max``/``err_min`` are residual bounds max(|W v - s u|, |W^T u - s v|): some singular value of W_l lies within
    that distance of the estimate. Moreover ``sigma_max`` never exceeds the true sigma_max and ``sigma_min`` is never
    below the true sigma_min (Rayleigh-Ritz bracketing, up to rounding), so the true kappa is >= the estimated one.
    """

    sigma_max: torch.Tensor  # [L] float64-or-compute dtype
    sigma_min: torch.Tensor  # [L]
    err_max: torch.Tensor  # [L]
    err_min: torch.Tensor  # [L]
    u_max: list[torch.Tensor]  # left vectors, [m_l]
    v_max: list[torch.Tensor]  # right vectors, [n_l]
    u_min: list[torch.Tensor]
    v_min: list[torch.Tensor]
    refreshed: torch.Tensor  # [L] bool: computed exactly (tiny matrix, refresh=True, or the tol fallback)

    @property
    def kappa(self) -> torch.Tensor:
        """sigma_max / sigma_min (inf where sigma_min == 0 and sigma_max > 0, nan-free: 0/0 gives 1)."""
        return kappa(self.sigma_max, self.sigma_min)


class SpectralState:
    """Warm-start state: for each matrix, the retained Ritz block X [n_l, r] in tall orientation.

    Kept between training steps like ``spectral_norm`` keeps u/v. ``to_dict``/``from_dict`` make it checkpointable.
    """

    def __init__(self) -> None:
        self.blocks: list[torch.Tensor] | None = None
        self.shapes: list[tuple[int, int]] | None = None

    def matches(self, shapes: list[tuple[int, int]]) -> bool:
        return self.blocks is not None and self.shapes == shapes

    def to_dict(self) -> dict:
        return {"shapes": self.shapes, "blocks": self.blocks}

    @classmethod
    def from_dict(cls, d: dict) -> SpectralState:
        s = cls()
        s.shapes = None if d["shapes"] is None else [tuple(x) for x in d["shapes"]]
        s.blocks = d["blocks"]
        return s


def _as_list(name: str, weights) -> list:
    """One tensor or a non-empty sequence of them, as a list (elements are checked by the caller)."""
    if isinstance(weights, torch.Tensor):
        return [weights]
    if not isinstance(weights, (Sequence, Iterable)) or isinstance(weights, (str, bytes, dict)):
        raise TypeError(f"{name} must be a tensor or a list of tensors, got {type(weights).__name__}")
    mats = list(weights)
    if not mats:
        raise ValueError(f"{name} must be a tensor or a non-empty list of tensors")
    return mats


def as_matrices(weight: torch.Tensor, groups: int = 1) -> list[torch.Tensor]:
    """The matrices whose spectra CNC constrains: Linear [out, in] as is; Conv [out, in/g, *k] -> g matrices of
    [out/g, in/g * prod(k)] (one per group; a grouped conv is block-diagonal, so its extremes are the groups')."""
    check_tensor("weight", weight, ndim=(2, 3, 4, 5), floating=True, nonempty=True)
    check_int("groups", groups, minimum=1)
    out = weight.shape[0]
    if out % groups:
        raise ValueError(f"groups={groups} must divide the weight's first dimension {out}")
    mat = weight.reshape(out, -1)
    if groups == 1:
        return [mat]
    return list(mat.reshape(groups, out // groups, -1).unbind(0))


# ----------------------------------------------------------------------------------------------------------------
# batched products: one Triton launch for all layers (CUDA), or one mm per matrix (CPU)


class _LayerProducts:
    """The matrices in tall orientation, ready for the block products: views of the weights (no copy) for the torch
    path; the weights themselves plus a device pointer table for the Triton path."""

    def __init__(self, mats: list[torch.Tensor], compute_dtype: torch.dtype) -> None:
        self.tall = [m.detach().T if m.shape[0] < m.shape[1] else m.detach() for m in mats]
        self.rows = [t.shape[0] for t in self.tall]
        self.cols = [t.shape[1] for t in self.tall]
        self.m_max, self.n_max = max(self.rows), max(self.cols)
        self.use_triton = _backend.use_triton(mats[0])
        if self.use_triton:
            self._kernels = _backend.kernels("spectral")
            # the kernel reads the weights in place; only mixed dtypes or strided views cost a copy
            same = all(m.dtype == mats[0].dtype for m in mats)
            self.weights = [m.detach().contiguous() if same else m.detach().to(compute_dtype).contiguous()
                            for m in mats]
            self.table = self._kernels.layer_table(self.weights)
        else:  # CPU: one mm per matrix on the original storage (a stacked copy costs more than the loop)
            self.mats = [t if t.dtype == compute_dtype else t.to(compute_dtype) for t in self.tall]

    def matmul(self, x: torch.Tensor, trans: bool) -> torch.Tensor:
        """A_l @ x_l ([L, n_max, R] -> [L, m_max, R]) or A_l^T @ x_l ([L, m_max, R] -> [L, n_max, R])."""
        L, _, R = x.shape
        out = x.new_zeros(L, self.n_max if trans else self.m_max, R)
        if self.use_triton:
            return self._kernels.ragged_bmm(self.weights, x.contiguous(), out, trans=trans, table=self.table)
        for i, A in enumerate(self.mats):
            m, n = A.shape
            if trans:
                torch.mm(A.T, x[i, :m], out=out[i, :n])
            else:
                torch.mm(A, x[i, :n], out=out[i, :m])
        return out


def _orthonormalize(z: torch.Tensor, basis: torch.Tensor | None, row_mask: torch.Tensor) -> torch.Tensor:
    """Orthonormal block spanning z minus its projection on basis (classical Gram-Schmidt twice, then Householder QR).

    Householder keeps Q orthonormal even when z is (numerically) inside span(basis): the extra directions are then
    arbitrary but valid for Rayleigh-Ritz. The padded rows of every layer stay exactly zero (pivots lie in real rows).
    """
    for _ in range(2 if basis is not None else 0):
        z = z - basis @ (basis.transpose(1, 2) @ z)
    q = torch.linalg.qr(z * row_mask).Q
    if basis is not None:  # QR of a near-zero z can rotate in old directions: clean once more
        q = q - basis @ (basis.transpose(1, 2) @ q)
        q = torch.linalg.qr(q * row_mask).Q
    return q * row_mask


def _random_block(n: int, r: int, generator: torch.Generator | None, dtype, device) -> torch.Tensor:
    x = torch.randn(n, r, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    return torch.linalg.qr(x).Q


def extreme_singular_values(
    weights: torch.Tensor | Sequence[torch.Tensor],
    *,
    iters: int = 16,
    depth: int = 3,
    block: int = 4,
    state: SpectralState | None = None,
    refresh: bool = False,
    compute_dtype: torch.dtype | None = None,
    tol: float | None = None,
    seed: int = 0,
) -> SpectralEstimate:
    """Estimate sigma_max and sigma_min (the min(m, n)-th singular value), with their singular vectors and a residual
    error bound, for one matrix or a list of matrices of any shapes, batched.

    Args:
        weights: a 2-D tensor or a list of 2-D tensors (use ``as_matrices`` for conv weights). Any float dtype;
            products accumulate in ``compute_dtype``.
        iters: Rayleigh-Ritz restarts (each costs 2*depth+1 passes over the weights, plus one for the residuals).
        depth: Krylov blocks per restart.
        block: retained Ritz vectors per matrix (1 for sigma_max, block-1 for the bottom: more helps clustered spectra).
        state: a ``SpectralState`` to warm-start from and update in place (pass the same object every step). A state
            for other shapes or another ``block`` is ignored (cold start); one holding NaN/Inf raises ValueError.
        refresh: compute exactly (float64 SVD per matrix) and reset ``state`` from the exact vectors.
        compute_dtype: float32 (default for fp32/bf16/fp16) or float64 (default for fp64 weights). kappa beyond ~1e3
            needs float64: fp32 products bound the attainable sigma_min accuracy at about 1e-6 * sigma_max.
        tol: if given, every matrix whose residual bound is not within ``tol`` of its estimate
            (``err_min > tol * sigma_min`` or ``err_max > tol * sigma_max``) is recomputed exactly (float64 SVD) and
            its warm state reset from the exact vectors; ``SpectralEstimate.refreshed`` says which. Krylov methods
            converge slowly to a sigma_min that is tiny relative to sigma_max (kappa >~ 1e3 from a cold start):
            this fallback is what makes the estimate trustworthy there, at the price of an SVD for those layers.
        seed: seed of the random start when there is no warm state.

    Returns:
        a ``SpectralEstimate`` (float64 values, vectors in ``compute_dtype``). An all-zero matrix gives sigma_max =
        sigma_min = 0 (kappa 1). NaN/Inf weights, or finite weights whose products overflow ``compute_dtype``, raise
        ValueError naming ``weights[i]``.
    """
    mats = _as_list("weights", weights)
    for i, m in enumerate(mats):
        check_tensor(f"weights[{i}]", m, ndim=2, floating=True, nonempty=True)
        if m.device != mats[0].device:
            raise ValueError(f"weights[{i}] is on {m.device}, expected all on {mats[0].device}")
    check_int("iters", iters, minimum=0)
    check_int("depth", depth, minimum=1)
    check_int("block", block, minimum=2)
    if block * (depth + 1) > 16:
        raise ValueError(f"block * (depth + 1) must be <= 16, got {block} * ({depth} + 1)")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0):
        raise ValueError(f"tol must be None or a positive number, got {tol!r}")
    if state is not None and not isinstance(state, SpectralState):
        raise TypeError(f"state must be None or a fastcnc.SpectralState, got {type(state).__name__}")
    if not isinstance(refresh, bool):
        raise TypeError(f"refresh must be a bool, got {type(refresh).__name__}")
    check_int("seed", seed, minimum=-(2**63))
    if compute_dtype is None:
        compute_dtype = torch.float64 if any(m.dtype == torch.float64 for m in mats) else torch.float32
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    device = mats[0].device
    shapes = [tuple(m.shape) for m in mats]
    s_total = block * (depth + 1)
    # tiny matrices (min dim <= s) are solved exactly: the Krylov basis would fill their whole space anyway
    small = [min(sh) <= s_total or refresh for sh in shapes]
    n_est = sum(not f for f in small)

    out = {k: [None] * len(mats) for k in ("smax", "smin", "emax", "emin", "umax", "vmax", "umin", "vmin")}
    new_blocks: list[torch.Tensor | None] = [None] * len(mats)
    refreshed = [False] * len(mats)

    def solve_exactly(i: int) -> None:
        m = mats[i]
        check_tensor(f"weights[{i}]", m, finite=True)
        U, S, Vh = torch.linalg.svd(m.detach().double(), full_matrices=False)
        out["smax"][i], out["smin"][i] = S[0], S[-1]
        out["umax"][i], out["vmax"][i], out["umin"][i], out["vmin"][i] = U[:, 0], Vh[0], U[:, -1], Vh[-1]
        out["emax"][i] = out["emin"][i] = 0.0
        refreshed[i] = True
        if min(m.shape) > block:  # warm state from the exact right vectors (tall orientation)
            V = Vh.T if m.shape[0] >= m.shape[1] else U
            new_blocks[i] = torch.cat([V[:, :1], V[:, -(block - 1):]], 1).to(compute_dtype)

    for i in range(len(mats)):
        if small[i]:
            solve_exactly(i)

    if n_est:
        idx = [i for i in range(len(mats)) if not small[i]]
        ops = _LayerProducts([mats[i] for i in idx], compute_dtype)
        L, n_max = len(idx), ops.n_max
        cols = torch.tensor(ops.cols, device=device)
        rows = torch.tensor(ops.rows, device=device)
        col_mask = (torch.arange(n_max, device=device)[None, :] < cols[:, None]).to(compute_dtype)[:, :, None]
        row_mask = (torch.arange(ops.m_max, device=device)[None, :] < rows[:, None]).to(compute_dtype)[:, :, None]
        X = torch.zeros(L, n_max, block, dtype=compute_dtype, device=device)
        gen = torch.Generator().manual_seed(seed)
        # a state saved with another ``block`` (or a damaged one) cannot warm-start: start cold instead
        warm = state is not None and state.matches(shapes) and len(state.blocks) == len(mats) and all(
            isinstance(state.blocks[i], torch.Tensor) and tuple(state.blocks[i].shape) == (ops.cols[j], block)
            for j, i in enumerate(idx))
        for j, i in enumerate(idx):
            n = ops.cols[j]
            X[j, :n] = state.blocks[i].to(device=device, dtype=compute_dtype) if warm else _random_block(
                n, block, gen, compute_dtype, device)
        X = _orthonormalize(X, None, col_mask)
        tiny = torch.finfo(compute_dtype).tiny
        for _ in range(max(iters, 1)):
            Q_blocks, AQ_blocks = [X], [ops.matmul(X, trans=False)]
            for _d in range(depth):
                # scale each layer's block by a power of two (exact) to max |.| ~ 1 first: only span(A^T A Q) matters,
                # and A^T A would under/overflow fp32 for weights of magnitude <~1e-19 or >~1e19 (a torn Krylov
                # basis then breaks the bracketing). One scale per layer keeps the columns' relative sizes.
                AQ_last = AQ_blocks[-1]
                exponent = torch.frexp(AQ_last.abs().amax(dim=(1, 2), keepdim=True)).exponent
                Z = ops.matmul(torch.ldexp(AQ_last, -exponent.to(AQ_last.dtype)), trans=True)
                Qn = _orthonormalize(Z, torch.cat(Q_blocks, 2), col_mask)
                Q_blocks.append(Qn)
                AQ_blocks.append(ops.matmul(Qn, trans=False))
            Q, AQ = torch.cat(Q_blocks, 2), torch.cat(AQ_blocks, 2)
            if not bool(torch.isfinite(AQ).all()):
                # NaN/Inf weights propagate into the products: find the culprit only then (a full check is a pass)
                for i in idx:
                    check_tensor(f"weights[{i}]", mats[i], finite=True)
                if warm and not all(bool(torch.isfinite(state.blocks[i]).all()) for i in idx):
                    raise ValueError("state holds NaN/Inf warm-start blocks (a corrupt SpectralState); "
                                     "pass a fresh fastcnc.SpectralState()")
                bad = idx[int((~torch.isfinite(AQ)).flatten(1).any(1).nonzero()[0, 0])]
                raise ValueError(f"weights[{bad}] is finite but its products overflow {compute_dtype} "
                                 f"(max |w| = {float(mats[bad].detach().abs().max()):.3g}); rescale it or pass "
                                 "compute_dtype=torch.float64")
            Us, S, Vh = torch.linalg.svd(AQ, full_matrices=False)  # S descending, [L, s]
            V = Q @ Vh.transpose(1, 2)  # right Ritz vectors [L, n_max, s]
            X = torch.cat([V[:, :, :1], V[:, :, -(block - 1):]], 2)
        smax, smin = S[:, 0], S[:, -1]
        v2 = torch.cat([V[:, :, :1], V[:, :, -1:]], 2)  # [L, n, 2]
        u2 = torch.cat([Us[:, :, :1], Us[:, :, -1:]], 2) * row_mask  # [L, m, 2]
        s2 = torch.stack([smax, smin], 1)[:, None, :]
        # certified residuals: |A v - s u| (rounding only, by construction) and |A^T u - s v| (one more pass)
        # (norms taken relative to sigma_max: squares of tiny or huge residuals would under/overflow)
        scale = smax.clamp_min(tiny)[:, None, None]
        res_fwd = ((AQ @ Vh.transpose(1, 2)[:, :, [0, -1]] - u2 * s2) / scale).norm(dim=1)
        res_bwd = ((ops.matmul(u2, trans=True) - v2 * s2) / scale).norm(dim=1)
        err = torch.maximum(res_fwd, res_bwd) * scale[:, 0]
        for j, i in enumerate(idx):
            m_l, n_l = ops.rows[j], ops.cols[j]
            vmax, vmin, umax, umin = v2[j, :n_l, 0], v2[j, :n_l, 1], u2[j, :m_l, 0], u2[j, :m_l, 1]
            if mats[i].shape[0] < mats[i].shape[1]:  # back to the matrix's own orientation: W = A^T
                vmax, umax, vmin, umin = umax, vmax, umin, vmin
            out["smax"][i], out["smin"][i] = smax[j], smin[j]
            out["emax"][i], out["emin"][i] = err[j, 0], err[j, 1]
            out["umax"][i], out["vmax"][i], out["umin"][i], out["vmin"][i] = umax, vmax, umin, vmin
            new_blocks[i] = X[j, :n_l].clone()
        if tol is not None:
            uncertified = (err[:, 1] > tol * smin) | (err[:, 0] > tol * smax)
            for j in uncertified.nonzero().flatten().tolist():
                solve_exactly(idx[j])

    if state is not None:
        state.shapes = shapes
        state.blocks = [b if b is not None else torch.empty(0) for b in new_blocks]

    def vec(key):
        return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in out[key]])

    def vecs(key):
        return [torch.as_tensor(v).to(device=device, dtype=compute_dtype) for v in out[key]]

    return SpectralEstimate(vec("smax"), vec("smin"), vec("emax"), vec("emin"),
                            vecs("umax"), vecs("vmax"), vecs("umin"), vecs("vmin"),
                            torch.tensor(refreshed, device=device))
