"""The authors' code-form CNC, (log det(W^T W / n_out))^2 on fully connected layers, against a float64 SVD."""

import math

import pytest
import torch
from torch import nn

from fastcnc.layers import MaskedLinear
from fastcnc.paper import paper_cnc_penalty, paper_cnc_term


def test_term_matches_the_singular_values():
    torch.manual_seed(0)
    w = torch.randn(10, 64, dtype=torch.float64) * 0.1
    s = torch.linalg.svdvals(w)
    expected = float(torch.log(s**2 / 10).sum()) ** 2
    assert float(paper_cnc_term(w)) == pytest.approx(expected, rel=1e-10)


def test_term_does_not_see_kappa():
    """The code form is a volume constraint: sigma = sqrt(n_out) * (c, 1/c) gives 0 for every condition number c^2."""
    q1, _ = torch.linalg.qr(torch.randn(2, 2, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    for c in (1.0, 10.0, 1e3):
        w = q1 @ torch.diag(torch.tensor([c, 1 / c], dtype=torch.float64)) * math.sqrt(2) @ q2[:2]
        assert float(paper_cnc_term(w)) == pytest.approx(0.0, abs=1e-8)  # 0 up to the rounding of kappa^2 ~ 1e12


def test_gradcheck_and_penalty_over_fc_layers():
    torch.manual_seed(0)
    w = (torch.randn(3, 6, dtype=torch.float64) * 0.5).requires_grad_(True)
    torch.autograd.gradcheck(lambda t: paper_cnc_term(t), (w,))
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), MaskedLinear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    expected = paper_cnc_term(model[2].effective_weight()) + paper_cnc_term(model[4].weight)
    penalty = paper_cnc_penalty(model)
    assert penalty.dtype == torch.float32 and float(penalty) == pytest.approx(float(expected), rel=1e-6)
    penalty.backward()
    assert model[4].weight.grad is not None and model[0].weight.grad is None  # convs are not constrained


def test_singular_and_bad_inputs():
    w = torch.zeros(3, 6)
    w[0, 0] = w[1, 1] = 1.0  # an all-zero output row: singular Gram
    assert math.isinf(float(paper_cnc_term(w)))
    assert math.isfinite(float(paper_cnc_term(w, ridge=1e-6)))
    with pytest.raises(ValueError, match="n_out <= n_in"):
        paper_cnc_term(torch.randn(6, 3))
    with pytest.raises(ValueError, match="2-D"):
        paper_cnc_term(torch.randn(2, 3, 3))
    with pytest.raises(ValueError, match="no nn.Linear"):
        paper_cnc_penalty(nn.Sequential(nn.Conv2d(1, 2, 3)))
