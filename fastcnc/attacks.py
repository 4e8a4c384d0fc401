"""L-infinity attacks and the TRADES loss, as pure functions on images in [0, 1].

The functions do not switch the model between train and eval mode: the caller decides (the training loop crafts
attacks in eval mode, so batch-norm statistics are not updated by attack iterates). They run under whatever autocast
context the caller opened.

Step sizes follow the radius: ``default_step_size(eps, steps) = 2.5 * eps / steps`` (Madry et al. 2018 use 2.5 eps /
steps, so that ``steps`` signed steps can cross the ball even from a random start). A step that cannot reach the
radius (``steps * step_size < eps``) makes the attack weaker than its name says; ``pgd`` and ``trades_adversary`` warn
with ``StepSizeWarning`` then.

Every attack takes a floating-point ``x`` (any other dtype is an error) and checks that its values lie in [0, 1] on
CPU tensors. On CUDA the range is not checked: that would read the tensor on the host, a stall in every training step.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fastcnc._checks import check_choice, check_images, check_int, check_labels, check_positive

ATTACK_LOSSES = ("ce", "cw")
STEP_FACTOR = 2.5  # default step = STEP_FACTOR * eps / steps


class StepSizeWarning(UserWarning):
    """An attack's steps cannot reach the L-inf radius: ``steps * step_size < eps``."""


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode for the block, then every submodule back in its own mode (``model.train(flag)`` would
    set them all alike: a batch norm frozen in eval inside a training model would start updating its statistics)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def default_step_size(eps: float, steps: int) -> float:
    """``2.5 * eps / steps``: the step that lets ``steps`` signed steps cross the L-inf ball of radius ``eps``."""
    check_positive("eps", eps, allow_zero=True)
    check_int("steps", steps, minimum=1)
    return STEP_FACTOR * eps / steps


def check_step_size(eps: float, step_size: float, steps: int, *, what: str = "attack") -> bool:
    """Warn (``StepSizeWarning``) and return False when ``steps * step_size < eps``: such an attack cannot reach the
    boundary of the ball it claims to search, so its robust accuracy is an overestimate."""
    if steps >= 1 and eps > 0 and steps * step_size < eps * (1 - 1e-9):
        warnings.warn(f"{what}: {steps} steps of {step_size:.4g} cover only {steps * step_size:.4g} < eps {eps:.4g}; "
                      f"the attack cannot reach the radius (use step_size >= eps / steps, e.g. the default "
                      f"{STEP_FACTOR} * eps / steps = {default_step_size(eps, steps):.4g})", StepSizeWarning,
                      stacklevel=3)
        return False
    return True


def cw_margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin ``max_{j != y} z_j - z_y`` summed over the batch (positive = misclassified)."""
    true_logit = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return (other - true_logit).sum()


def _attack_loss(name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if name == "ce":
        return F.cross_entropy(logits.float(), y, reduction="sum")
    return cw_margin_loss(logits.float(), y)


def _check_attack(eps, step_size, steps) -> None:
    """The radius, step and step count that ``pgd`` and ``trades_adversary`` share."""
    check_positive("eps", eps, allow_zero=True)
    check_positive("step_size", step_size, allow_zero=True)
    check_int("steps", steps, minimum=0)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method: one step of size ``eps`` up the cross-entropy gradient, clipped to [0, 1].

    ``x``: images ``[N, ...]`` in [0, 1] (the range is checked on CPU tensors only, see the module docstring);
    ``y``: int64 labels ``[N]``.
    """
    return pgd(model, x, y, eps=eps, step_size=eps, steps=1, random_start=False)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float, steps: int,
        random_start: bool = True, loss: str = "ce", generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent in the L-infinity ball of radius ``eps`` around ``x`` (Madry et al. 2018).

    Args:
        x: clean images ``[N, C, H, W]`` in [0, 1] (floating point; the range is checked on CPU tensors only, see the
            module docstring). y: int64 labels ``[N]``.
        eps, step_size, steps: radius, signed-gradient step and number of steps.
        random_start: start from a uniform point in the ball (drawn from ``generator`` or the global RNG).
        loss: ``"ce"`` (cross-entropy) or ``"cw"`` (Carlini-Wagner margin; PGD on it is the "CW-Linf" attack).
    Returns:
        adversarial images, detached, same shape as ``x``.
    """
    _check_attack(eps, step_size, steps)
    check_images("x", x)
    check_labels("y", y, len(x))
    check_choice("loss", loss, ATTACK_LOSSES)
    check_step_size(eps, step_size, steps, what=f"PGD-{steps}")
    x = x.detach()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, device="cpu" if generator is not None else x.device)
        delta = (noise.to(device=x.device, dtype=x.dtype) * 2 - 1) * eps
        x_adv = (x + delta).clamp(0, 1)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            objective = _attack_loss(loss, model(x_adv), y)
            (grad,) = torch.autograd.grad(objective, x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def trades_adversary(model: nn.Module, x: torch.Tensor, *, eps: float, step_size: float, steps: int) -> torch.Tensor:
    """TRADES inner maximisation: PGD on ``KL(p(x) || p(x'))`` from a small Gaussian start (Zhang et al. 2019).

    ``x``: clean images ``[N, ...]`` in [0, 1] (floating point; the range is checked on CPU tensors only, see the
    module docstring). ``eps``, ``step_size``, ``steps``: as in ``pgd``.
    """
    _check_attack(eps, step_size, steps)
    check_images("x", x)
    check_step_size(eps, step_size, steps, what=f"TRADES-{steps}")
    x = x.detach()
    with torch.no_grad():
        p_clean = F.softmax(model(x).float(), dim=1)
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            kl = F.kl_div(F.log_softmax(model(x_adv).float(), dim=1), p_clean, reduction="sum")
            (grad,) = torch.autograd.grad(kl, x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def trades_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """``CE(f(x), y) + beta * KL(p(x) || p(x_adv))`` with the KL averaged over the batch."""
    natural = F.cross_entropy(logits_clean.float(), y)
    robust = F.kl_div(F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits_clean.float(), dim=1),
                      reduction="batchmean")
    return natural + beta * robust


def minimal_linf_radius(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, max_eps: float = 0.5,
                        bisections: int = 10, steps: int = 50, restarts: int = 2,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image smallest L-inf radius at which PGD finds an adversarial example, by bisection on each image's eps.

    For every image the bracket ``[lo, hi]`` starts at ``[0, max_eps]``; each bisection runs PGD-``steps`` (step
    ``2.5 * eps / steps``, random start, ``restarts`` tries, cross-entropy and CW-margin losses alternating) at the
    midpoint and keeps the half that contains the boundary. Returns ``hi`` ``[N]`` (float64): an upper bound of
    the true minimal radius (an attack only ever shows that a radius suffices), ``0`` for images that are
    misclassified clean and ``inf`` for images no attack fooled at ``max_eps``.

    ``x``: images ``[N, ...]`` in [0, 1] (the range is checked on CPU tensors only, see the module docstring);
    ``y``: int64 labels ``[N]``.
    """
    check_images("x", x)
    check_labels("y", y, len(x))
    check_positive("max_eps", max_eps)
    check_int("bisections", bisections, minimum=1)
    check_int("steps", steps, minimum=1)
    check_int("restarts", restarts, minimum=1)
    x, n = x.detach(), len(x)

    def fooled(eps: torch.Tensor) -> torch.Tensor:
        """Whether PGD at per-image radius ``eps`` [N] fools the model on each image."""
        radius = eps.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        hit = torch.zeros(n, dtype=torch.bool, device=x.device)
        for r in range(restarts):
            noise = torch.rand(x.shape, generator=generator, device="cpu" if generator is not None else x.device)
            x_adv = (x + (noise.to(device=x.device, dtype=x.dtype) * 2 - 1) * radius).clamp(0, 1)
            for _ in range(steps):
                x_adv.requires_grad_(True)
                with torch.enable_grad():
                    (grad,) = torch.autograd.grad(_attack_loss(ATTACK_LOSSES[r % 2], model(x_adv), y), x_adv)
                x_adv = x_adv.detach() + (STEP_FACTOR / steps) * radius * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - radius), x + radius).clamp(0, 1)
            with torch.no_grad():
                hit |= model(x_adv).argmax(1) != y
        return hit

    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    lo = torch.zeros(n, dtype=torch.float64, device=x.device)
    hi = torch.full((n,), float(max_eps), dtype=torch.float64, device=x.device)
    never = ~fooled(hi) & ~wrong
    for _ in range(bisections):
        mid = (lo + hi) / 2
        hit = fooled(mid)
        hi = torch.where(hit, mid, hi)
        lo = torch.where(hit, lo, mid)
    hi = torch.where(wrong, torch.zeros_like(hi), hi)
    # inf only where no attack fooled the image at all: a midpoint attack can succeed where the one at max_eps failed
    # (its random start and steps differ), and then hi is a found radius
    never = never & (hi == max_eps)
    return torch.where(never, torch.full_like(hi, float("inf")), hi)
