"""Attacks against independent references.

torchattacks could not serve as the cross-check: its wheel requires torchvision, and torchvision from PyPI would
replace this torch build. The reference PGD below is written independently (float64, per-example loop, explicit
clipping by projection onto the box intersection) and the attacks are also checked against closed-form optima of
linear models.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcnc.attacks import cw_margin_loss, fgsm, pgd, trades_adversary, trades_loss
from fastcnc.evaluate import clean_accuracy, robust_accuracy

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def reference_pgd(model, x, y, eps, step_size, steps, start, loss="ce"):
    """Textbook PGD, one example at a time: ascend sign(grad), then project onto [x-eps, x+eps] and [0, 1]."""
    out = []
    for i in range(len(x)):
        x0, xi = x[i:i + 1], (x[i:i + 1] + start[i:i + 1]).clamp(0, 1)
        lo, hi = (x0 - eps).clamp(min=0), (x0 + eps).clamp(max=1)
        for _ in range(steps):
            xi = xi.clone().requires_grad_(True)
            logits = model(xi)
            if loss == "ce":
                obj = -torch.log_softmax(logits, 1)[0, y[i]]
            else:
                others = torch.cat([logits[0, :y[i]], logits[0, y[i] + 1:]])
                obj = others.max() - logits[0, y[i]]
            (g,) = torch.autograd.grad(obj, xi)
            xi = torch.maximum(torch.minimum(xi.detach() + step_size * torch.sign(g), hi), lo)
        out.append(xi)
    return torch.cat(out)


def small_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 5, 6)).double()


@pytest.mark.parametrize("loss", ["ce", "cw"])
@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_matches_reference(loss, random_start):
    model = small_net()
    x = torch.rand(7, 1, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 6, (7,))
    eps, step, steps = 0.1, 0.03, 6
    gen = torch.Generator().manual_seed(3)
    ours = pgd(model, x, y, eps=eps, step_size=step, steps=steps, random_start=random_start, loss=loss, generator=gen)
    start = ((torch.rand(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float32).double() * 2 - 1)
             * eps) if random_start else torch.zeros_like(x)
    ref = reference_pgd(model, x, y, eps, step, steps, start, loss)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_pgd_stays_in_the_ball_and_the_box_noncontiguous():
    model = small_net()
    x = torch.rand(5, 5, 1, 5, dtype=torch.float64).permute(0, 2, 3, 1)  # non-contiguous view
    assert not x.is_contiguous()
    y = torch.randint(0, 6, (5,))
    x_adv = pgd(model, x, y, eps=0.2, step_size=0.1, steps=5)
    assert (x_adv - x).abs().max() <= 0.2 + 1e-12
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_pgd_reaches_the_closed_form_optimum_of_a_linear_model():
    # For logits W x + b the CW margin z_j - z_y is linear in x: its max over the L-inf ball (inside the box) is at
    # x + eps * sign(w_j - w_y) for the best j, and PGD with step >= eps gets there in one step.
    torch.manual_seed(5)
    lin = nn.Linear(12, 2).double()
    x = 0.3 + 0.4 * torch.rand(4, 12, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.int64)
    eps = 0.05
    optimum = x + eps * torch.sign(lin.weight[1] - lin.weight[0]).detach()
    got = pgd(lin, x, y, eps=eps, step_size=eps, steps=3, random_start=True, loss="cw")
    torch.testing.assert_close(got, optimum, rtol=0, atol=1e-12)
    # FGSM on cross-entropy of a 2-class linear model moves along the same signs
    torch.testing.assert_close(fgsm(lin, x, y, eps), optimum, rtol=0, atol=1e-12)


def test_pgd_increases_the_loss_more_than_fgsm_on_average():
    model = small_net()
    x = torch.rand(64, 1, 5, 5, dtype=torch.float64)
    y = model(x).argmax(1)  # attack correctly classified points
    base = F.cross_entropy(model(x), y)
    l_fgsm = F.cross_entropy(model(fgsm(model, x, y, 0.1)), y)
    l_pgd = F.cross_entropy(model(pgd(model, x, y, eps=0.1, step_size=0.025, steps=20)), y)
    assert base < l_fgsm <= l_pgd


def test_cw_margin_loss_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 0.0]])
    y = torch.tensor([2, 0])
    assert float(cw_margin_loss(logits, y)) == pytest.approx((3.0 - 2.0) + (0.0 - 5.0))


def test_trades_loss_terms():
    logits = torch.randn(6, 4)
    y = torch.randint(0, 4, (6,))
    torch.testing.assert_close(trades_loss(logits, logits, y, 6.0), F.cross_entropy(logits, y))
    other = torch.randn(6, 4)
    kl = (F.softmax(logits, 1) * (F.log_softmax(logits, 1) - F.log_softmax(other, 1))).sum(1).mean()
    torch.testing.assert_close(trades_loss(logits, other, y, 2.5), F.cross_entropy(logits, y) + 2.5 * kl)


def test_trades_adversary_increases_the_kl_and_respects_eps():
    model = small_net()
    x = torch.rand(16, 1, 5, 5, dtype=torch.float64)
    x_adv = trades_adversary(model, x, eps=0.1, step_size=0.03, steps=5)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-12
    p = F.softmax(model(x), 1)
    kl = F.kl_div(F.log_softmax(model(x_adv), 1), p, reduction="batchmean")
    kl_noise = F.kl_div(F.log_softmax(model((x + 0.001 * torch.randn_like(x)).clamp(0, 1)), 1), p,
                        reduction="batchmean")
    assert kl > 10 * kl_noise


def test_robust_accuracy_is_ordered_and_reproducible():
    model = small_net().float()
    x = torch.rand(40, 1, 5, 5)
    y = model(x).argmax(1)
    y[::4] = (y[::4] + 1) % 6  # some wrong labels, so clean accuracy is 0.75
    kwargs = dict(eps=0.1, step_size=0.03, pgd_steps=10, cw_steps=10, batch_size=16, seed=1)
    acc = robust_accuracy(model, x, y, **kwargs)
    assert acc["clean_acc"] == pytest.approx(0.75) == pytest.approx(clean_accuracy(model, x, y, 7))
    assert acc["pgd_acc"] <= acc["clean_acc"] and acc["fgsm_acc"] <= acc["clean_acc"]
    assert acc["cw_acc"] <= acc["clean_acc"]
    assert robust_accuracy(model, x, y, **kwargs) == acc


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"eps": -0.1}, "eps must be >= 0"),
    ({"steps": 1.5}, "steps must be an int"),
    ({"loss": "hinge"}, "loss must be one of"),
])
def test_pgd_rejects_bad_arguments(kwargs, match):
    args = {"eps": 0.1, "step_size": 0.01, "steps": 2, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        pgd(small_net(), torch.rand(2, 1, 5, 5, dtype=torch.float64), torch.zeros(2, dtype=torch.int64), **args)


# ---------------------------------------------------------------- step sizes that follow eps


def test_default_step_size_follows_eps():
    from fastcnc.attacks import default_step_size

    assert default_step_size(0.1, 10) == pytest.approx(0.025)
    assert default_step_size(0.3, 50) == pytest.approx(0.015)
    with pytest.raises(ValueError, match="steps"):
        default_step_size(0.1, 0)


def test_step_size_warning_fires_when_steps_cannot_reach_eps():
    import warnings

    from fastcnc.attacks import StepSizeWarning, check_step_size

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    with pytest.warns(StepSizeWarning, match="cannot reach"):
        pgd(model, x, y, eps=0.2, step_size=2 / 255, steps=20)  # 20 * 2/255 = 0.157 < 0.2
    with pytest.warns(StepSizeWarning):
        trades_adversary(model, x, eps=0.2, step_size=0.01, steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StepSizeWarning)
        pgd(model, x, y, eps=0.2, step_size=0.01, steps=20)  # exactly reaches eps: no warning
        fgsm(model, x, y, 0.2)
        assert check_step_size(0.1, 0.025, 10)
    with pytest.warns(StepSizeWarning):
        assert not check_step_size(0.1, 0.009, 10)


def test_minimal_linf_radius_of_a_linear_model_matches_the_closed_form():
    """For a binary linear classifier the minimal L-inf radius is |margin| / ||w||_1 (inside the [0, 1] box)."""
    from fastcnc.attacks import minimal_linf_radius

    torch.manual_seed(0)
    w = torch.randn(2, 8, dtype=torch.float64)
    model = nn.Linear(8, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w)
    x = 0.4 + 0.2 * torch.rand(32, 8, dtype=torch.float64)  # far from the box edges
    y = model(x).argmax(1)
    d = w[0] - w[1]
    exact = (x @ d).abs() / d.abs().sum()
    keep = exact < 0.35  # the attack must stay inside the box for the closed form to hold
    radii = minimal_linf_radius(model, x[keep], y[keep], max_eps=0.5, bisections=12, steps=30, restarts=1)
    assert torch.all(radii >= exact[keep] - 1e-9)  # an attack cannot beat the true minimum
    assert torch.allclose(radii, exact[keep], atol=0.5 / 2**12 + 1e-6)
