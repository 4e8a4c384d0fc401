"""The Condition Number Constraint (CNC) penalty, differentiable through the estimated extreme singular values.

With (u, v) the estimated singular vectors (treated as constants), the estimate of a singular value is the bilinear
form sigma_hat(W) = u^T W v, whose exact gradient is u v^T. At convergence this is also the gradient of the true
singular value (for a simple one), so the CNC gradient of a layer is the rank-2 matrix
    d penalty / dW = (d p / d sigma_max) u_max v_max^T + (d p / d sigma_min) u_min v_min^T,
and no SVD backward is ever needed.

Penalty per layer, with kappa_eps = sigma_max / (sigma_min + eps * sigma_max) (finite, <= 1/eps, for rank-deficient
layers, scale-invariant):
    "log":   log kappa_eps                      (default: smooth, scale-free, gradient ~ 1/sigma at both ends)
    "kappa": kappa_eps
    "hinge": max(kappa_eps - kappa_target, 0)^2 (only penalises layers above the target condition number)
All-zero layers (sigma_max = 0) contribute 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastcnc._checks import check_choice, check_positive, check_tensor
from fastcnc.spectral import SpectralEstimate, SpectralState, _as_list, extreme_singular_values

__all__ = ["ExtremeSigmasFunction", "cnc_from_sigmas", "cnc_penalty"]

CNC_KINDS = {"log", "kappa", "hinge"}


class ExtremeSigmasFunction(torch.autograd.Function):
    """[L, 2] tensor of (u_max^T W_l v_max, u_min^T W_l v_min) with the rank-2 exact backward.

    ``values`` (optional, [L, 2]) skips the forward products when the caller already holds them (Ritz values equal
    u^T A v by construction); ``None`` computes them from the weights.
    """

    @staticmethod
    def forward(ctx, values, vectors, *mats):
        u_max, v_max, u_min, v_min = vectors
        if values is None:
            values = torch.stack([
                torch.stack([u_max[i] @ (m.to(u_max[i].dtype) @ v_max[i]),
                             u_min[i] @ (m.to(u_min[i].dtype) @ v_min[i])])
                for i, m in enumerate(mats)
            ]).to(torch.float64)
        ctx.vectors = vectors
        ctx.meta = [(m.dtype, m.shape) for m in mats]
        return values.detach().clone()

    @staticmethod
    def backward(ctx, grad_values):
        u_max, v_max, u_min, v_min = ctx.vectors
        grads = []
        for i, (dtype, shape) in enumerate(ctx.meta):
            if not ctx.needs_input_grad[2 + i]:
                grads.append(None)
                continue
            g = grad_values[i].to(u_max[i].dtype)
            grad = torch.outer(g[0] * u_max[i], v_max[i])
            grad.addr_(u_min[i], v_min[i], alpha=g[1])
            grads.append(grad.to(dtype).reshape(shape))
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


def cnc_penalty(
    weights: torch.Tensor | Sequence[torch.Tensor],
    *,
    kind: str = "log",
    kappa_target: float = 10.0,
    eps: float = 1e-6,
    reduction: str = "sum",
    state: SpectralState | None = None,
    estimate: SpectralEstimate | None = None,
    check_finite: bool = True,
    **engine_kwargs,
) -> torch.Tensor:
    """Condition-number penalty of one or more weight matrices, with exact gradients of the estimate.

    Args:
        weights: a 2-D tensor or list of 2-D tensors (``fastcnc.spectral.as_matrices`` turns conv weights into them).
        kind: ``"log"`` (log kappa), ``"kappa"`` or ``"hinge"`` (max(kappa - kappa_target, 0)^2); see module doc.
        kappa_target: target condition number of the hinge.
        eps: relative floor of sigma_min (kappa <= 1/eps), 0 < eps < 1: rank-deficient layers get a finite penalty.
        reduction: ``"sum"``, ``"mean"`` or ``"none"`` ([L]).
        state: warm-start state of the spectral engine (updated in place).
        estimate: reuse the singular vectors of an earlier estimate (skips the engine); the penalty is then the exact
            function sigma_hat(W) = u^T W v of these weights with those vectors frozen.
        check_finite: with ``estimate``, raise if the weights give NaN/Inf values (one device sync; the engine
            checks the weights itself when ``estimate`` is None). Pass False when ``estimate`` came from these weights.
        **engine_kwargs: passed to ``extreme_singular_values`` (iters, depth, block, refresh, tol, compute_dtype).

    Returns:
        float64 penalty (0-dim, or [L] with ``reduction="none"``).
    """
    mats = _as_list("weights", weights)
    for i, m in enumerate(mats):
        check_tensor(f"weights[{i}]", m, ndim=2, floating=True, nonempty=True)
    check_choice("kind", kind, CNC_KINDS)
    check_choice("reduction", reduction, {"sum", "mean", "none"})
    check_positive("kappa_target", kappa_target)
    if check_positive("eps", eps) >= 1:
        raise ValueError(f"eps must be < 1 (kappa is capped at 1/eps), got {eps}")
    if estimate is None:
        with torch.no_grad():
            estimate = extreme_singular_values([m.detach() for m in mats], state=state, **engine_kwargs)
        # Ritz values are u^T W v for these very weights: no need to recompute the bilinear forms
        values = torch.stack([estimate.sigma_max, estimate.sigma_min], 1)
    else:
        if not isinstance(estimate, SpectralEstimate):
            raise TypeError(f"estimate must be None or a fastcnc.SpectralEstimate, got {type(estimate).__name__}")
        if len(estimate.u_max) != len(mats):
            raise ValueError(f"estimate covers {len(estimate.u_max)} matrices, weights has {len(mats)}")
        for i, m in enumerate(mats):
            if (estimate.u_max[i].shape[0], estimate.v_max[i].shape[0]) != tuple(m.shape):
                raise ValueError(f"estimate's vectors for matrix {i} fit a {estimate.u_max[i].shape[0]}x"
                                 f"{estimate.v_max[i].shape[0]} matrix, weights[{i}] has shape {tuple(m.shape)}")
        values = None  # the caller's weights may differ from the estimate's: evaluate u^T W v exactly
    vectors = (estimate.u_max, estimate.v_max, estimate.u_min, estimate.v_min)
    sigmas = ExtremeSigmasFunction.apply(values, vectors, *mats)
    if values is None and check_finite and not bool(torch.isfinite(sigmas).all()):
        bad = int((~torch.isfinite(sigmas)).any(1).nonzero()[0, 0])
        raise ValueError(f"weights[{bad}] contains NaN or Inf; expected finite values")
    per_layer = cnc_from_sigmas(sigmas, kind=kind, kappa_target=kappa_target, eps=eps)
    if reduction == "none":
        return per_layer
    return per_layer.sum() if reduction == "sum" else per_layer.mean()
