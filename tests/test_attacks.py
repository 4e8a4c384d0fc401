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


# ---------------------------------------------------------------- bad input: images, labels, attack settings


def _attack_calls():
    """Every public attack entry point, as ``call(model, x, y)``."""
    from fastcnc.attacks import minimal_linf_radius

    return {
        "fgsm": lambda m, x, y: fgsm(m, x, y, 0.1),
        "pgd": lambda m, x, y: pgd(m, x, y, eps=0.1, step_size=0.05, steps=2),
        "trades_adversary": lambda m, x, y: trades_adversary(m, x, eps=0.1, step_size=0.05, steps=2),
        "minimal_linf_radius": lambda m, x, y: minimal_linf_radius(m, x, y, bisections=1, steps=1, restarts=1),
        "robust_accuracy": lambda m, x, y: robust_accuracy(m, x, y, eps=0.1, pgd_steps=1, cw_steps=1),
    }


_IMAGES = torch.rand(3, 1, 5, 5, dtype=torch.float64)
BAD_IMAGES = [
    ("scaled-to-minus-one-one", lambda x: x * 2 - 1, ValueError, r"x must hold images with values in \[0, 1\]"),
    ("above-one", lambda x: x + 1, ValueError, r"x must hold images with values in \[0, 1\], got values in"),
    ("one-nan", lambda x: x.index_put((torch.tensor([1]),), torch.tensor(float("nan"), dtype=x.dtype)), ValueError,
     r"x contains NaN"),
    ("inf", lambda x: x.index_put((torch.tensor([0]),), torch.tensor(float("inf"), dtype=x.dtype)), ValueError,
     r"x must hold images with values in \[0, 1\]"),
    ("uint8", lambda x: (x * 255).to(torch.uint8), TypeError, r"x must be a floating-point tensor, got dtype"),
    ("int64-in-range", lambda x: x.round().long(), TypeError, r"x must be a floating-point tensor"),
    ("list", lambda x: x.tolist(), TypeError, r"x must be a torch.Tensor"),
    ("1-d", lambda x: x.flatten(), ValueError, r"x must be a batch \[N, ...\] with at least 2 dimensions"),
]


@pytest.mark.parametrize("entry", ["fgsm", "pgd", "trades_adversary", "minimal_linf_radius", "robust_accuracy"])
@pytest.mark.parametrize(("make", "error", "match"), [c[1:] for c in BAD_IMAGES], ids=[c[0] for c in BAD_IMAGES])
def test_attacks_reject_images_outside_the_unit_box_or_of_a_wrong_dtype(entry, make, error, match):
    # without the check, fgsm at eps=0 returned images up to ~1 away from x, and pgd turned uint8 pixels into floats
    model, y = small_net(), torch.tensor([0, 1, 2])
    with pytest.raises(error, match=match):
        _attack_calls()[entry](model, make(_IMAGES.clone()), y)


def test_fgsm_at_eps_zero_on_valid_images_returns_them():
    model, y = small_net(), torch.tensor([0, 1, 2])
    x = _IMAGES.clone()
    x[0], x[1] = 0.0, 1.0  # the box's edges are inside the domain
    torch.testing.assert_close(fgsm(model, x, y, 0.0), x, rtol=0, atol=0)


@pytest.mark.parametrize("entry", ["fgsm", "pgd", "minimal_linf_radius", "robust_accuracy"])
@pytest.mark.parametrize(("y", "error", "match"), [
    (torch.tensor([0, 1]), ValueError, r"y must have the same length as x \(3\), got 2"),
    (torch.tensor([0, 1, 2], dtype=torch.int32), TypeError, r"y must be torch.int64 class labels"),
    (torch.tensor([[0, 1, 2]]), ValueError, r"y must have 1 dimensions"),
], ids=["short", "int32", "2-d"])
def test_attacks_reject_bad_labels(entry, y, error, match):
    with pytest.raises(error, match=match):
        _attack_calls()[entry](small_net(), _IMAGES.clone(), y)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"eps": float("nan")}, ValueError, r"eps must be >= 0 and finite, got nan"),
    ({"eps": float("inf")}, ValueError, r"eps must be >= 0 and finite"),
    ({"eps": -0.1}, ValueError, r"eps must be >= 0"),
    ({"eps": "0.1"}, TypeError, r"eps must be a number"),
    ({"step_size": -0.01}, ValueError, r"step_size must be >= 0"),
    ({"step_size": float("nan")}, ValueError, r"step_size must be >= 0 and finite"),
    ({"steps": "3"}, TypeError, r"steps must be an int, got str"),
    ({"steps": -1}, ValueError, r"steps must be >= 0"),
    ({"steps": True}, TypeError, r"steps must be an int"),
])
@pytest.mark.parametrize("attack", ["pgd", "trades_adversary"])
def test_pgd_and_trades_adversary_validate_their_settings_alike(attack, kwargs, error, match):
    # trades_adversary used to accept all of these: eps=nan gave all-NaN images, a negative eps was used as given
    args = {"eps": 0.1, "step_size": 0.05, "steps": 2, **kwargs}
    x, y = _IMAGES.clone(), torch.tensor([0, 1, 2])
    with pytest.raises(error, match=match):
        if attack == "pgd":
            pgd(small_net(), x, y, **args)
        else:
            trades_adversary(small_net(), x, **args)


def test_range_check_is_skipped_on_the_cuda_code_path(monkeypatch):
    # on CUDA reading x's values would stall every training step: there the attack only projects onto the box
    from fastcnc import _backend

    monkeypatch.setattr(_backend, "on_cuda", lambda t: True)
    x_adv = pgd(small_net(), _IMAGES * 2 - 1, torch.tensor([0, 1, 2]), eps=0.1, step_size=0.1, steps=1)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):  # dtype checks cost nothing: still on
        pgd(small_net(), (_IMAGES * 255).to(torch.uint8), torch.tensor([0, 1, 2]), eps=0.1, step_size=0.1, steps=1)


# ---------------------------------------------------------------- bad input: evaluation


@pytest.mark.parametrize("fn", ["robust_accuracy", "clean_accuracy"])
@pytest.mark.parametrize(("x", "y", "kwargs", "error", "match"), [
    (_IMAGES[:0], torch.zeros(0, dtype=torch.int64), {}, ValueError, r"x must be non-empty, got shape \(0, 1, 5, 5\)"),
    (_IMAGES, torch.tensor([0, 1, 2]), {"batch_size": 0}, ValueError, r"batch_size must be >= 1, got 0"),
    (_IMAGES, torch.tensor([0, 1, 2]), {"batch_size": -4}, ValueError, r"batch_size must be >= 1, got -4"),
    (_IMAGES, torch.tensor([0, 1, 2]), {"batch_size": 2.0}, TypeError, r"batch_size must be an int"),
    (_IMAGES, torch.tensor([0, 1]), {}, ValueError, r"y must have the same length as x \(3\), got 2"),
    (_IMAGES, torch.tensor([0, 1, 2, 0, 1]), {"batch_size": 2}, ValueError, r"y must have the same length as x"),
], ids=["empty", "batch-0", "batch-negative", "batch-float", "y-short", "y-long"])
def test_evaluation_rejects_empty_data_bad_batch_sizes_and_mismatched_labels(fn, x, y, kwargs, error, match):
    # empty data used to score 0.0 on every accuracy, and batch_size=0 failed inside range()
    model = small_net()
    with pytest.raises(error, match=match):
        if fn == "robust_accuracy":
            robust_accuracy(model, x, y, eps=0.1, pgd_steps=1, cw_steps=1, **kwargs)
        else:
            clean_accuracy(model, x, y, **kwargs)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"pgd_steps": "2"}, TypeError, r"pgd_steps must be an int, got str"),
    ({"cw_steps": -1}, ValueError, r"cw_steps must be >= 0"),
    ({"eps": float("nan")}, ValueError, r"eps must be >= 0 and finite"),
    ({"step_size": -0.1}, ValueError, r"step_size must be >= 0"),
])
def test_robust_accuracy_validates_its_attack_settings(kwargs, error, match):
    args = {"eps": 0.1, "pgd_steps": 1, "cw_steps": 1, **kwargs}
    with pytest.raises(error, match=match):
        robust_accuracy(small_net(), _IMAGES, torch.tensor([0, 1, 2]), **args)


def test_evaluation_restores_each_submodules_own_mode():
    # a batch norm frozen in eval inside a training model stays frozen after an evaluation
    from fastcnc.evaluate import clean_accuracy, robust_accuracy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10))
    model.train()
    model[1].eval()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    clean_accuracy(model, x, y)
    robust_accuracy(model, x, y, eps=0.1, pgd_steps=1, cw_steps=1)
    assert model.training and model[0].training and not model[1].training


def test_minimal_radius_is_inf_only_where_no_attack_fooled_the_image():
    from fastcnc.attacks import minimal_linf_radius

    class Bump(nn.Module):  # wrong only in a thin shell around d = 0.1: random starts find it more often at small radii
        def forward(self, x):
            d = x.flatten(1)[:, 0] - 0.5
            wrong = 20 * F.relu(0.1 - (d - 0.1).abs()) - 0.8
            return torch.stack([torch.zeros_like(wrong), wrong], 1)

    x, y = torch.full((400, 1, 1, 1), 0.5), torch.zeros(400, dtype=torch.long)
    r = minimal_linf_radius(Bump(), x, y, max_eps=0.5, bisections=6, steps=10, restarts=1,
                            generator=torch.Generator().manual_seed(0))
    found = torch.isfinite(r)
    assert int(found.sum()) > 100 and bool((r[found] <= 0.5).all())  # (it returned inf for most of them)
