"""Both TSCNC penalties of every layer in one autograd node (``TSCNC``'s path on the Triton backend).

Why: as two separate terms, autograd hands each layer's effective weight W*M two gradients (TSC's, and CNC's through
the reshape of the weight into its matrices), adds them (one op per layer), multiplies the sum by the mask (another)
and runs a view node per matrix: four host dispatches and two to three kernels per layer per step, ~220 ops on
ResNet-50. Here the backward writes TSC's gradient of every layer into one flat buffer (one launch), adds CNC's
rank-2 terms into the matrices' blocks of that buffer in place (one launch), multiplies the masked layers' by their
masks (one multi-tensor launch) and returns each weight its gradient. Values and gradients are the separate terms'
(same operations, same rounding order: TSC + CNC in the gradient's dtype, then the mask).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fastcnc import _backend
from fastcnc.spectral import VectorGroup, flat_vectors
from fastcnc.tsc import kernel_inputs, tsc_grads, tsc_values

__all__ = ["TSCNCTermsFunction", "MatrixBlock"]

MatrixBlock = tuple[int, int, int, int]  # (layer, first row in the layer's [out, -1] view, rows, cols) of a matrix


class TSCNCTermsFunction(torch.autograd.Function):
    """``forward(a, groups, sigmas, blocks, masks, effective, *weights) -> (tsc [L], sigmas [M, 2])``.

    Args:
        a: the TSC parameter.
        groups: the engine's vector groups (``SpectralEstimate.groups``) of the M matrices, (u, v) pairs of sigma_max
            then sigma_min.
        sigmas: [M, 2] float64 (sigma_max, sigma_min) of those matrices: the engine's Ritz values, which are the
            bilinear forms u^T E v of exactly these weights (so no forward product is needed).
        blocks: per matrix, where it lies in its layer (``MatrixBlock``).
        masks: per layer its mask, or None (E = W).
        effective: per layer E_l = W_l * M_l (or W_l), formed without autograd, one dtype, contiguous.
        weights: the layers' parameters W_l.

    The backward gives W_l the gradient of lambda-weighted sums of both outputs: M_l * (d TSC / dE_l + sum over its
    matrices of c0 u_max v_max^T + c1 u_min v_min^T).
    """

    @staticmethod
    def forward(ctx, a: float, groups: list[VectorGroup], sigmas: torch.Tensor, blocks: list[MatrixBlock],
                masks: list[torch.Tensor | None], effective: list[torch.Tensor], *weights: torch.Tensor):
        ctx.set_materialize_grads(False)
        ctx.a, ctx.groups, ctx.blocks, ctx.masks, ctx.effective = a, groups, blocks, masks, effective
        # what the TSC kernel reads (W * M at fresh addresses is copied into a shared staging buffer): kept, with its
        # version, so the backward reads it again instead of staging the same values a second time
        staged = kernel_inputs(effective)
        ctx.staged, ctx.staged_versions = staged, [t._version for t in staged]
        return tsc_values(staged, a), sigmas.detach().clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_tsc: torch.Tensor | None, grad_sigmas: torch.Tensor | None):
        effective = ctx.effective
        if all(t._version == v for t, v in zip(ctx.staged, ctx.staged_versions, strict=True)):
            effective = ctx.staged  # (else another call staged over it since: stage this call's values again)
        if grad_tsc is None:
            grad_tsc = torch.zeros(len(effective), dtype=torch.float32, device=effective[0].device)
        grads = tsc_grads(effective, ctx.a, grad_tsc)
        if grad_sigmas is not None:
            _add_rank2(grads, ctx.groups, grad_sigmas.to(torch.float64), ctx.blocks)
        masked = [i for i, m in enumerate(ctx.masks) if m is not None]
        if masked:
            torch._foreach_mul_([grads[i] for i in masked], [ctx.masks[i] for i in masked])
        need = ctx.needs_input_grad[6:]
        return (None,) * 6 + tuple(g if n else None for g, n in zip(grads, need, strict=True))


def _add_rank2(grads: list[torch.Tensor], groups: list[VectorGroup], coef: torch.Tensor,
               blocks: list[MatrixBlock]) -> None:
    """grads[layer][rows of the matrix] += c0 u0 v0^T + c1 u1 v1^T for every matrix, in place, in one launch: the
    TSC gradients are views into one flat buffer (``tsc_grads`` on the Triton backend)."""
    flat = grads[0]._base if grads[0]._base is not None else grads[0]
    size = flat.element_size()
    at = []
    for layer, row, _, cols in blocks:
        g = grads[layer]
        assert g._base is flat or g is flat, "the TSC gradients must share one flat buffer"
        at.append((g.data_ptr() - flat.data_ptr()) // size + row * cols)
    _backend.kernels("bilinear").rank2_grads(*flat_vectors(groups), coef, [(rows, cols) for _, _, rows, cols in blocks],
                                             flat.dtype, add_to=(flat, at))
