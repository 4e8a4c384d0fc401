"""The Condition Number Constraint (CNC) penalty, differentiable through the certified extreme singular values.

The engine returns sigma_max = |A y| and sigma_min = |A x| for unit Ritz vectors y, x, i.e. the bilinear forms
sigma_hat(W) = u^T W v with u = W v / |W v|. With (u, v) frozen, the exact gradient of that value is u v^T, so the CNC
gradient of a layer is the rank-2 matrix
    d penalty / dW = (d p / d sigma_max) u_max v_max^T + (d p / d sigma_min) u_min v_min^T,
computed as one batched outer-product sum per shape group (no SVD backward, no host sync).

``smooth_min > 0`` replaces sigma_min by a soft-min over the retained bottom Ritz values,
    s_soft = -T log sum_j exp(-s_j / T),   T = smooth_min * sigma_min (frozen),
whose gradient sum_j softmax(-s/T)_j u_j v_j^T does not jump between near-equal bottom pairs from one step to the
next. s_soft lies in [sigma_min_hat - T log r, sigma_min_hat]; smooth_min log r <= 1/2 is required (above, the
soft-min could reach 0 and pin the penalty at its log(1/eps) ceiling with no gradient). The default (0) is the Ritz
value itself.

Penalty per layer, with kappa_eps = sigma_max / (sigma_min + eps * sigma_max) (finite, <= 1/eps, for rank-deficient
layers, scale-invariant):
    "log":   log kappa_eps                      (default: smooth, scale-free, gradient ~ 1/sigma at both ends)
    "kappa": kappa_eps
    "hinge": max(kappa_eps - kappa_target, 0)^2 (only penalises layers above the target condition number)
All-zero layers (sigma_max = 0) contribute 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from fastcnc import _backend
from fastcnc._checks import check_choice, check_eps_floor, check_positive, check_tensor
from fastcnc.spectral import (
    SpectralEstimate,
    SpectralState,
    VectorGroup,
    extreme_singular_values,
    flat_vectors,
    matrices_list,
)

__all__ = ["BilinearFormsFunction", "cnc_from_sigmas", "cnc_penalty", "penalty_from_estimate"]

CNC_KINDS = {"log", "kappa", "hinge"}


def _tall(w: torch.Tensor, wide: bool) -> torch.Tensor:
    return w.T if wide else w


def _rows_of(index: list[int]):
    """A group's rows of a [B, m, n] batch: a slice where they are consecutive (one shape: always), else the list."""
    return slice(index[0], index[-1] + 1) if index == list(range(index[0], index[0] + len(index))) else index


_PER_MATRIX_CPU = 1 << 16  # on CPU, the rank-k gradient of a matrix with more entries than this is its own product


class BilinearFormsFunction(torch.autograd.Function):
    """[L, k] tensor of u_{l,j}^T W_l v_{l,j} (vectors frozen, stacked per shape group) with the exact rank-k backward.

    ``mats`` are the L matrices, or one [L, m, n] tensor holding L matrices of one shape (its gradient is one tensor:
    thousands of small blocks cost a product per group, not ops per matrix). ``values`` ([L, k], optional) skips the
    forward products when the caller already holds them (the engine's Ritz values are these forms for the very
    weights it was given); ``None`` computes them from ``mats``.
    """

    @staticmethod
    def forward(ctx, values, groups, *mats):
        batch = mats[0] if len(mats) == 1 and mats[0].dim() == 3 else None
        if values is None:
            parts = []
            for grp in groups:
                if batch is not None:
                    A = batch[_rows_of(grp.index)]
                    A = (A.mT if grp.wide[0] else A).to(torch.float64)
                else:
                    A = torch.stack([_tall(mats[i], w).to(torch.float64) for i, w in zip(grp.index, grp.wide,
                                                                                          strict=True)])
                parts.append(torch.einsum("bmk,bmn,bnk->bk", grp.U, A, grp.V))
            values = torch.cat(parts)
            index = [i for grp in groups for i in grp.index]
            if index != list(range(len(index))):  # back to input order, a row per matrix (an index upload would be
                at = {i: k for k, i in enumerate(index)}  # a host sync on CUDA)
                values = torch.stack([values[at[i]] for i in range(len(index))])
        ctx.groups = groups
        ctx.batch = batch is not None
        ctx.meta = [(m.dtype, m.shape) for m in mats]
        return values.detach().clone()

    @staticmethod
    @once_differentiable  # u, v are frozen: a second derivative would miss their rotation (wrong curvature): refuse
    def backward(ctx, grad_values):
        grads: list = [None] * len(ctx.meta)
        if not any(ctx.needs_input_grad[2:]):
            return (None, None, *grads)
        dtypes = {dtype for dtype, _ in ctx.meta}
        if (not ctx.batch and grad_values.shape[1] == 2 and len(dtypes) == 1 and _backend.use_triton(grad_values)
                and all(ctx.needs_input_grad[2:])):
            # CUDA: every matrix's rank-2 gradient in one launch (the loop below is ~5 ops per group and one per
            # matrix, each a launch and host time: the step outside the engine's graph is bound by them)
            shapes = [(shape[0], shape[1]) for _, shape in ctx.meta]
            grads = _backend.kernels("bilinear").rank2_grads(*flat_vectors(ctx.groups), grad_values.to(torch.float64),
                                                             shapes, dtypes.pop())
            return (None, None, *grads)
        coeff = grad_values.to(torch.float64)
        if ctx.batch:
            dtype, shape = ctx.meta[0]
            out = None
            for grp in ctx.groups:
                rows = _rows_of(grp.index)
                work = torch.promote_types(torch.float32, dtype)
                Gt = (grp.U * coeff[rows, None, :]).to(work) @ grp.V.to(work).mT
                Gt = (Gt.mT if grp.wide[0] else Gt).to(dtype)
                if rows == slice(0, shape[0]):
                    out = Gt
                else:
                    out = Gt.new_zeros(shape) if out is None else out
                    out[rows] = Gt
            return (None, None, out)
        coeff = coeff.unbind(0)
        for grp in ctx.groups:
            if not any(ctx.needs_input_grad[2 + i] for i in grp.index):
                continue
            g = torch.stack([coeff[i] for i in grp.index])  # [B, k]
            # sum_j g_j u_j v_j^T in (at least) float32: the rank-k product needs no float64. Each matrix gets it in
            # its own layout (no transposing pass over a weight-sized tensor). On CPU a large matrix is one product
            # of its own (a batched product with k = 2 columns is ~2x slower, ResNet-18's 512 x 4608 layers) and
            # small ones one batched product (a product per 32 x 32 block costs ~5x the batch's: op overhead); on
            # CUDA one per group, where a group that mixes orientations (one tall shape) gets the tall product,
            # transposed per wide matrix, rather than an index upload per orientation (a host sync)
            work = torch.float32
            for i in grp.index:
                work = torch.promote_types(work, ctx.meta[i][0])
            U, V = (grp.U * g[:, None, :]).to(work), grp.V.to(work)
            per_matrix = not _backend.on_cuda(U) and U.shape[1] * V.shape[1] > _PER_MATRIX_CPU
            all_wide = all(grp.wide)
            G = None if per_matrix else V @ U.mT if all_wide else U @ V.mT
            same = G is not None and len({ctx.meta[i][0] for i in grp.index}) == 1
            if same:  # one cast for the group
                G = G.to(ctx.meta[grp.index[0]][0])
            for j, (i, wide) in enumerate(zip(grp.index, grp.wide, strict=True)):
                if ctx.needs_input_grad[2 + i]:
                    dtype, shape = ctx.meta[i]
                    if per_matrix:
                        Gj = V[j] @ U[j].mT if wide else U[j] @ V[j].mT
                    else:
                        Gj = G[j].mT if wide and not all_wide else G[j]
                    grads[i] = (Gj if same else Gj.to(dtype)).reshape(shape)
        return (None, None, *grads)


def cnc_from_sigmas(sigmas: torch.Tensor, *, kind: str = "log", kappa_target: float = 10.0,
                    eps: float = 1e-6) -> torch.Tensor:
    """Per-layer CNC penalty [L] from a [L, 2] tensor of (sigma_max, sigma_min); differentiable in ``sigmas``."""
    smax, smin = sigmas[:, 0], sigmas[:, 1]
    alive = smax > 0
    safe_max = torch.where(alive, smax, torch.ones_like(smax))
    kappa = safe_max / (smin.clamp_min(0) + eps * safe_max)
    if kind == "log":
        p = torch.log(kappa)
    elif kind == "kappa":
        p = kappa
    else:
        p = torch.relu(kappa - kappa_target) ** 2
    return torch.where(alive, p, torch.zeros_like(p))


def check_smooth_min(smooth_min, block: int, name: str = "smooth_min", block_name: str = "block") -> float:
    """smooth_min >= 0, small enough that the soft-min over ``block`` bottom Ritz values stays above sigma_min / 2 (it
    lies in [sigma_min (1 - smooth_min log r), sigma_min] for r values: a larger temperature can drive it to 0 and the
    penalty to its log(1/eps) ceiling, where its gradient vanishes). ``name`` / ``block_name``: how the error calls
    the two values (a config's fields)."""
    smooth_min = check_positive(name, smooth_min, allow_zero=True)
    if block > 1 and smooth_min * math.log(block) > 0.5:
        raise ValueError(f"{name} must be <= {0.5 / math.log(block):.3g} with {block_name} = {block} (the soft-min "
                         f"would fall below sigma_min / 2), got {smooth_min}")
    return smooth_min


def check_kappa_target(kind: str, kappa_target) -> float:
    """A positive kappa_target, and >= 1 for the hinge (a condition number is)."""
    kappa_target = check_positive("kappa_target", kappa_target)
    if kind == "hinge" and kappa_target < 1:
        raise ValueError(f"kappa_target must be >= 1 (a condition number is), got {kappa_target}")
    return kappa_target


def _check_options(kind, kappa_target, eps, reduction, smooth_min, block: int = 4) -> None:
    check_choice("kind", kind, CNC_KINDS)
    check_choice("reduction", reduction, {"sum", "mean", "none"})
    check_kappa_target(kind, kappa_target)
    check_eps_floor("eps", eps)
    check_smooth_min(smooth_min, block)


def _softmin_groups(estimate: SpectralEstimate, mats) -> tuple[list[VectorGroup], torch.Tensor]:
    """One group per matrix holding [u_max, bottom block] (padded to a common width) and the valid-column mask."""
    if estimate.bottom is None:
        raise ValueError("smooth_min > 0 needs an estimate computed with ritz_block=True")
    k = 1 + max(b[0].numel() for b in estimate.bottom)
    groups, valid = [], []
    for i, (s, U, V) in enumerate(estimate.bottom):
        r = s.numel()
        Ui = torch.zeros(U.shape[0], k, dtype=torch.float64, device=U.device)
        Vi = torch.zeros(V.shape[0], k, dtype=torch.float64, device=V.device)
        Ui[:, 0], Vi[:, 0], Ui[:, 1:1 + r], Vi[:, 1:1 + r] = estimate.u_max[i], estimate.v_max[i], U, V
        groups.append(VectorGroup([i], [False], Ui[None], Vi[None]))
        valid.append(torch.arange(k, device=U.device) <= r)
    return groups, torch.stack(valid)


def _estimate_shapes(estimate: SpectralEstimate) -> list[tuple[int, int]]:
    """The shape each matrix of the estimate has, read from its groups (no per-matrix views: thousands of blocks)."""
    shapes: list = [None] * len(estimate.u_max)
    for g in estimate.groups:
        m, n = g.u_shape[1], g.v_shape[1]
        for i, wide in zip(g.index, g.wide, strict=True):
            shapes[i] = (n, m) if wide else (m, n)
    return [s if s is not None else (estimate.u_max[i].shape[0], estimate.v_max[i].shape[0])
            for i, s in enumerate(shapes)]


def penalty_from_estimate(mats: list[torch.Tensor], estimate: SpectralEstimate, *, kind: str = "log",
                          kappa_target: float = 10.0, eps: float = 1e-6, reduction: str = "sum",
                          smooth_min: float = 0.0, from_these_weights: bool = False) -> torch.Tensor:
    """CNC penalty of ``mats`` (a list of matrices, or one [B, m, n] tensor of B matrices) with the singular vectors
    of ``estimate`` frozen (the building block of ``cnc_penalty`` and ``TSCNC``). ``from_these_weights=True`` reuses
    the estimate's values instead of recomputing the forms (only valid when the estimate was computed from exactly
    these weights)."""
    inputs = (mats,) if isinstance(mats, torch.Tensor) else tuple(mats)
    if smooth_min > 0:
        groups, valid = _softmin_groups(estimate, mats)
        check_smooth_min(smooth_min, valid.shape[1] - 1)
        forms = BilinearFormsFunction.apply(None, groups, *inputs)  # [L, 1 + r]
        smax, bottom = forms[:, 0], forms[:, 1:]
        temp = (smooth_min * estimate.sigma_min.clamp_min(torch.finfo(torch.float64).tiny))[:, None]
        z = torch.where(valid[:, 1:], -bottom / temp, torch.full_like(bottom, -torch.inf))
        smin = torch.where(estimate.structural, torch.zeros_like(smax), -temp[:, 0] * torch.logsumexp(z, 1))
        sigmas = torch.stack([smax, smin], 1)
    else:
        values = torch.stack([estimate.sigma_max, estimate.sigma_min], 1) if from_these_weights else None
        sigmas = BilinearFormsFunction.apply(values, estimate.groups, *inputs)
    if not from_these_weights and not sigmas.is_cuda and not bool(torch.isfinite(sigmas).all()):
        bad = int((~torch.isfinite(sigmas)).any(1).nonzero()[0, 0])
        raise ValueError(f"weights[{bad}] contains NaN or Inf; expected finite values")
    per_layer = cnc_from_sigmas(sigmas, kind=kind, kappa_target=kappa_target, eps=eps)
    if reduction == "none":
        return per_layer
    return per_layer.sum() if reduction == "sum" else per_layer.mean()


def cnc_penalty(
    weights: torch.Tensor | Sequence[torch.Tensor],
    *,
    kind: str = "log",
    kappa_target: float = 10.0,
    eps: float = 1e-6,
    reduction: str = "sum",
    smooth_min: float = 0.0,
    estimate: SpectralEstimate | None = None,
    state: SpectralState | None = None,
    rtol: float = 1e-2,
    refresh: bool = False,
) -> torch.Tensor:
    """Condition-number penalty of one or more weight matrices, with the exact gradient of the certified estimate.

    Args:
        weights: a 2-D tensor, a list of 2-D tensors (``fastcnc.spectral.as_matrices`` turns conv weights into
            them), or a [B, m, n] tensor of B matrices of one shape (e.g. a convolution's per-frequency blocks: one
            input, one gradient tensor; a Conv1d weight goes through ``as_matrices``, not as a batch).
        kind: ``"log"`` (log kappa), ``"kappa"`` or ``"hinge"`` (max(kappa - kappa_target, 0)^2); see module doc.
        kappa_target: target condition number of the hinge.
        eps: relative floor of sigma_min (kappa <= 1/eps), 0 < eps < 1: rank-deficient layers get a finite penalty.
            It is also the engine's ``floor``: kappa_eps is certified to ``rtol``.
        reduction: ``"sum"``, ``"mean"`` or ``"none"`` ([L]).
        smooth_min: 0 (default) differentiates the smallest Ritz value; > 0 a soft-min over the bottom block with
            temperature ``smooth_min * sigma_min`` (see module doc).
        estimate: None (default) runs the engine on these weights (``state``, ``rtol``, ``refresh`` are passed to it).
            Given, its singular vectors are frozen and the penalty is the exact function u^T W v of these weights
            (NaN/Inf weights raise ValueError on CPU; on CUDA they give a NaN penalty, checked by nobody: no sync).
        state: warm-start state of the engine (updated in place); only without ``estimate``.
        rtol: the engine's accuracy target (relative, kappa_eps); only without ``estimate``.
        refresh: exact float64 SVD instead of the iteration; only without ``estimate``.

    Returns:
        float64 penalty (0-dim, or [L] with ``reduction="none"``).
    """
    if isinstance(weights, torch.Tensor) and weights.dim() == 3:  # B matrices of one shape: one input, one grad
        mats = check_tensor("weights", weights, floating=True, nonempty=True)
        shapes = [tuple(weights.shape[1:])] * weights.shape[0]
    else:
        mats = matrices_list("weights", weights)
        for i, m in enumerate(mats):
            check_tensor(f"weights[{i}]", m, ndim=2, floating=True, nonempty=True)
        shapes = [tuple(m.shape) for m in mats]
    _check_options(kind, kappa_target, eps, reduction, smooth_min)
    if estimate is None:
        with torch.no_grad():
            estimate = extreme_singular_values(
                mats.detach() if isinstance(mats, torch.Tensor) else [m.detach() for m in mats], rtol=rtol,
                floor=eps, state=state, refresh=refresh, ritz_block=smooth_min > 0)
        fresh = True
    else:
        if not isinstance(estimate, SpectralEstimate):
            raise TypeError(f"estimate must be None or a fastcnc.SpectralEstimate, got {type(estimate).__name__}")
        if state is not None or refresh:
            raise ValueError("state and refresh configure the engine; they cannot be combined with estimate")
        if len(estimate.u_max) != len(shapes):
            raise ValueError(f"estimate covers {len(estimate.u_max)} matrices, weights has {len(shapes)}")
        for i, (fits, shape) in enumerate(zip(_estimate_shapes(estimate), shapes, strict=True)):
            if fits != shape:
                raise ValueError(f"estimate's vectors for matrix {i} fit a {fits[0]}x{fits[1]} matrix, weights[{i}] "
                                 f"has shape {shape}")
        fresh = False
    return penalty_from_estimate(mats, estimate, kind=kind, kappa_target=kappa_target, eps=eps, reduction=reduction,
                                 smooth_min=smooth_min, from_these_weights=fresh)
