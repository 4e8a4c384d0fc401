"""AutoAttack-grade robust accuracy through the real ``pyautoattack`` package (Croce & Hein 2020), not a copy of it.

``pyautoattack`` (0.2.0, the packaged ``fra31/auto-attack``) is an optional dependency: ``pip install
'fastcnc[autoattack]'``. It needs only torch and numpy (it does not import torchvision), and it is imported only when
an AutoAttack evaluation is asked for. Two routes, both at L-inf radius ``eps``:

- ``standard``: the standard AutoAttack ensemble, APGD-CE, APGD-T (9 target classes), FAB-T, Square (5,000
  queries), run as a cascade on the images still robust, with the library's own standard settings.
- ``apgd``: APGD-CE + APGD-T with the same settings as in ``standard`` (100 iterations each, 1 restart, 9 targets):
  the white-box part of the ensemble, much cheaper, and on non-obfuscated models usually within a few tenths of a
  point of ``standard``.

The robust accuracy is ``mean(y_adv == y)`` over the library's returned labels, i.e. exactly the library's number.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time

import torch
from torch import nn

from fastcnc._checks import check_choice, check_images, check_int, check_labels, check_positive
from fastcnc.attacks import eval_mode

AUTOATTACK_VERSIONS = ("standard", "apgd")
APGD_ATTACKS = ["apgd-ce", "apgd-t"]


def import_autoattack():
    """The ``pyautoattack.AutoAttack`` class, or an ImportError naming the extra that provides it."""
    try:
        from pyautoattack import AutoAttack
    except ImportError as exc:
        raise ImportError("AutoAttack evaluation needs the optional package pyautoattack: pip install "
                          "'fastcnc[autoattack]' (pyautoattack==0.2.0)") from exc
    return AutoAttack


def build_autoattack(model: nn.Module, *, eps: float, version: str = "standard", seed: int = 0,
                     device: torch.device | str = "cpu"):
    """The configured ``pyautoattack.AutoAttack`` object for ``version`` (``standard`` | ``apgd``), L-inf."""
    check_choice("version", version, AUTOATTACK_VERSIONS)
    check_positive("eps", eps)
    AutoAttack = import_autoattack()
    if version == "standard":
        return AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, device=device)
    adversary = AutoAttack(model, norm="Linf", eps=eps, version="custom", attacks=list(APGD_ATTACKS), seed=seed,
                           device=device)
    # the settings the library's standard version gives these two attacks (AutoAttack._set_version('standard'))
    adversary.apgd.n_restarts = 1
    adversary.apgd_targeted.n_restarts = 1
    adversary.apgd_targeted.n_target_classes = 9
    return adversary


class _RobustAccuracyLog(logging.Handler):
    """Collects the library's 'robust accuracy after ATTACK: P%' lines: the accuracy after each attack of the
    cascade (informational; the final number is computed from the returned labels)."""

    pattern = re.compile(r"robust accuracy after ([A-Z0-9-]+): ([0-9.]+)%")

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.after: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        match = self.pattern.search(record.getMessage())
        if match:
            self.after[match.group(1).lower()] = float(match.group(2)) / 100


@contextlib.contextmanager
def _capture(logger_name: str):
    logger = logging.getLogger(logger_name)
    handler, level, propagate = _RobustAccuracyLog(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # keep the library's per-batch debug lines off the user's root logger
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def autoattack_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                        version: str = "standard", seed: int = 0, batch_size: int = 250) -> dict:
    """Run ``pyautoattack`` on ``(x, y)`` with the model in eval mode and return its robust accuracy.

    Args:
        x: images ``[N, C, H, W]`` in [0, 1], N >= 1 (floating point; the range is checked on CPU tensors only, as in
            ``fastcnc.attacks``); y: int64 labels ``[N]`` (on the model's device).
        eps: L-inf radius. version: ``standard`` | ``apgd`` (see the module docstring). seed: the library's seed.
    Returns:
        ``{"version", "attacks", "eps", "n", "robust_acc", "after_attack": {attack: accuracy}, "time_s",
        "robust": BoolTensor [N]}``; ``robust`` is per image (correct after every attack), for worst-case rows.
    """
    check_images("x", x, nonempty=True)
    check_labels("y", y, len(x))
    check_int("batch_size", batch_size, minimum=1)
    t0 = time.perf_counter()
    with eval_mode(model):
        adversary = build_autoattack(model, eps=eps, version=version, seed=seed, device=x.device)
        with _capture("auto-attack") as log:
            _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    robust = (y_adv.to(y.device) == y).cpu()
    return {"version": version, "attacks": list(adversary.attacks_to_run), "eps": float(eps), "n": len(y),
            "robust_acc": float(robust.double().mean()), "after_attack": log.after,
            "time_s": time.perf_counter() - t0, "robust": robust}
