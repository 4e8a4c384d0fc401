"""L-infinity attacks and the TRADES loss, as pure functions on images in [0, 1].

The functions do not switch the model between train and eval mode: the caller decides (the training loop crafts
attacks in eval mode, so batch-norm statistics are not updated by attack iterates). They run under whatever autocast
context the caller opened.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastcnc._checks import check_choice, check_int, check_positive

ATTACK_LOSSES = ("ce", "cw")


def cw_margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin ``max_{j != y} z_j - z_y`` summed over the batch (positive = misclassified)."""
    true_logit = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return (other - true_logit).sum()


def _attack_loss(name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if name == "ce":
        return F.cross_entropy(logits.float(), y, reduction="sum")
    return cw_margin_loss(logits.float(), y)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method: one step of size ``eps`` up the cross-entropy gradient, clipped to [0, 1]."""
    return pgd(model, x, y, eps=eps, step_size=eps, steps=1, random_start=False)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float, steps: int,
        random_start: bool = True, loss: str = "ce", generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent in the L-infinity ball of radius ``eps`` around ``x`` (Madry et al. 2018).

    Args:
        x: clean images ``[N, C, H, W]`` in [0, 1]. y: labels ``[N]``.
        eps, step_size, steps: radius, signed-gradient step and number of steps.
        random_start: start from a uniform point in the ball (drawn from ``generator`` or the global RNG).
        loss: ``"ce"`` (cross-entropy) or ``"cw"`` (Carlini-Wagner margin; PGD on it is the "CW-Linf" attack).
    Returns:
        adversarial images, detached, same shape as ``x``.
    """
    check_positive("eps", eps, allow_zero=True)
    check_positive("step_size", step_size, allow_zero=True)
    check_int("steps", steps, minimum=0)
    check_choice("loss", loss, ATTACK_LOSSES)
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
    """TRADES inner maximisation: PGD on ``KL(p(x) || p(x'))`` from a small Gaussian start (Zhang et al. 2019)."""
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
