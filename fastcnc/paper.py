"""Reproduction only: the condition-number term as the TSCNC authors' public code computes it.

The paper (Feng, Lin, Gao, Wei: "Lipschitz Constant Meets Condition Number: Learning Robust and Compact Deep Neural
Networks", arXiv 2503.20454) is about the *condition number* kappa = sigma_max / sigma_min of each weight matrix:
its title, its analysis (kappa bounds the local Lipschitz behaviour of a pruned layer) and its name for the term,
"Condition Number Constraint". fastcnc's CNC forms (``fastcnc.cnc``: ``log`` = log kappa, ``kappa``, ``hinge``)
penalise kappa itself; that is what the title describes.

The authors' released code penalises something else on the fully connected layers: the squared log-determinant of
the normalised Gram matrix,

    CNC_code(W) = (log det(W^T W / n_out))^2 = (sum_i log(sigma_i^2 / n_out))^2,

where ``W`` is the layer's weight in the ``y = x W`` layout, ``[n_in, n_out]`` (torch's ``weight.T``), so the Gram is
``[n_out, n_out]`` and non-singular for a full-rank classifier (``n_out <= n_in``). It pulls the geometric mean of
the squared singular values towards ``n_out`` (a volume constraint); it does not bound kappa (a matrix with
``sigma = (c, 1/c)`` times ``sqrt(n_out)`` has CNC_code 0 for any c). ``paper_cnc_penalty`` computes it so that
runs can be compared with the authors' numbers; it is not one of fastcnc's CNC forms and is not used by ``TSCNC``.

``ridge`` (default 0, as the code) adds ``ridge * I`` to the Gram before the log-determinant: a pruned classifier
with an all-zero output row has a singular Gram and an infinite penalty otherwise (the training loop then stops
with a non-finite loss).
"""

from __future__ import annotations

import torch
from torch import nn

from fastcnc._checks import check_positive


def paper_cnc_term(weight: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """``(log det(W^T W / n_out + ridge I))^2`` for one FC weight ``[n_out, n_in]`` (torch layout; ``W = weight.T``),
    in float64 (the log-determinant of a Gram squares the condition number), returned as a 0-dim float64 tensor."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D fully connected weight [n_out, n_in], got shape {tuple(weight.shape)}")
    check_positive("ridge", ridge, allow_zero=True)
    n_out, n_in = weight.shape
    if n_out > n_in:
        raise ValueError(f"the code-form CNC needs n_out <= n_in (a non-singular [n_out, n_out] Gram), got weight "
                         f"shape {tuple(weight.shape)}")
    w = weight.double()
    gram = w @ w.T / n_out  # = W^T W / n_out with W = weight.T
    if ridge:
        gram = gram + ridge * torch.eye(n_out, dtype=gram.dtype, device=gram.device)
    sign, logabsdet = torch.linalg.slogdet(gram)
    logdet = torch.where(sign > 0, logabsdet, torch.full_like(logabsdet, float("-inf")))
    return logdet.square()


def fc_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every nn.Linear (fastcnc's MaskedLinear included) in module order: the layers the code form constrains."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def paper_cnc_penalty(model: nn.Module, ridge: float = 0.0) -> torch.Tensor:
    """Sum of ``paper_cnc_term`` over the model's fully connected layers (their effective weights ``W * M``), float32
    0-dim tensor, differentiable in the weights. Raises ValueError when the model has no fully connected layer."""
    layers = fc_layers(model)
    if not layers:
        raise ValueError("model has no nn.Linear layer: the code-form CNC constrains fully connected layers only")
    total = None
    for _, layer in layers:
        weight = layer.effective_weight() if hasattr(layer, "effective_weight") else layer.weight
        term = paper_cnc_term(weight, ridge)
        total = term if total is None else total + term
    return total.float()
