"""Evaluation: clean and robust accuracy (FGSM, PGD-k, CW-Linf, optionally AutoAttack) and per-layer spectra.

Attacks run at the evaluation radius (``eval_eps``, the training radius unless set), each with the step that follows
it, ``2.5 * eps / steps`` (``fastcnc.attacks.default_step_size``), so ``fastcnc eval --eps 0.3`` attacks as hard at
0.3 as the defaults do at the training eps. ``worst_acc`` is the per-image worst case: an image counts only if it
is classified correctly clean and under every attack that was run (with AutoAttack on a subset, on that subset).

The spectra are exact: singular values of every masked layer's effective weight ``W * M`` viewed as the matrix
``[C_out, C_in * kh * kw]`` (the view the regulariser and the pruners use), from ``torch.linalg.svdvals`` in float64.
``sigma_min`` is the smallest of the ``min(rows, cols)`` singular values; a numerically singular layer (for instance
one whose pruning left more all-zero rows than ``rows - cols``) gets ``kappa = inf``; ``dead_rows`` / ``dead_cols``
count the all-zero rows / columns of ``W * M``. When the run used TSCNC, the regulariser's own estimates
(``reg.report()``) are stored beside them.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys

import torch
from torch import nn

from fastcnc._checks import check_images, check_int, check_labels, check_positive, check_tensor
from fastcnc.attacks import default_step_size, eval_mode, fgsm, pgd
from fastcnc.config import Config, config_to_dict, eval_radius, train_step_size
from fastcnc.layers import MASKED_LAYERS
from fastcnc.pruning import sparsity_report, tensor_sparsity
from fastcnc.spectral_math import kappa


@torch.no_grad()
def clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
                   amp_ctx=contextlib.nullcontext, memory_format=torch.contiguous_format) -> float:
    """Fraction of the (non-empty) batch ``x`` ``[N, ...]`` the model classifies as ``y`` ``[N]``, in eval mode."""
    check_tensor("x", x, nonempty=True)
    if x.dim() == 0:
        raise ValueError("x must be a batch [N, ...], got a 0-dim tensor")
    check_labels("y", y, len(x), dtype=None)
    check_int("batch_size", batch_size, minimum=1)
    correct = 0
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].contiguous(memory_format=memory_format)
            with amp_ctx():
                correct += int((model(xb).argmax(1) == y[i:i + batch_size]).sum())
    return correct / len(x)


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, pgd_steps: int,
                    cw_steps: int, step_size: float | None = None, batch_size: int = 256, seed: int = 0,
                    amp_ctx=contextlib.nullcontext, memory_format=torch.contiguous_format,
                    progress: bool = False, return_correct: bool = False) -> dict:
    """Accuracy on clean inputs and under FGSM, PGD-``pgd_steps`` (random start) and CW-Linf (PGD on the CW margin,
    random start), and ``worst_acc``, correct under all of them. Random starts come from a generator seeded with
    ``seed``, so the numbers are reproducible.

    ``step_size``: None (default) gives each attack the step ``2.5 * eps / steps``; a number is used by both (a
    ``StepSizeWarning`` says when it cannot reach ``eps``). ``return_correct``: add ``"correct"``, the per-image
    bool tensors ``[N]`` of each attack (on the CPU), for worst-case rows over further attacks.

    ``x``: a non-empty batch of images ``[N, ...]`` in [0, 1] (the range is checked on CPU tensors only, as in
    ``fastcnc.attacks``); ``y``: int64 labels ``[N]``; ``batch_size`` >= 1.
    """
    check_images("x", x, nonempty=True)
    check_labels("y", y, len(x))
    check_int("batch_size", batch_size, minimum=1)
    check_positive("eps", eps, allow_zero=True)
    check_int("pgd_steps", pgd_steps, minimum=0)
    check_int("cw_steps", cw_steps, minimum=0)
    if step_size is not None:
        check_positive("step_size", step_size, allow_zero=True)
    generator = torch.Generator().manual_seed(seed)

    def step_for(steps: int) -> float:
        return step_size if step_size is not None else default_step_size(eps, max(steps, 1))

    correct: dict[str, list[torch.Tensor]] = {"clean": [], "fgsm": [], "pgd": [], "cw": []}
    batches = range(0, len(x), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="eval", unit="batch", file=sys.stderr, dynamic_ncols=True)
    with eval_mode(model):
        for i in batches:
            xb = x[i:i + batch_size].contiguous(memory_format=memory_format)
            yb = y[i:i + batch_size]
            with amp_ctx():
                adversarial = {
                    "clean": xb,
                    "fgsm": fgsm(model, xb, yb, eps),
                    "pgd": pgd(model, xb, yb, eps=eps, step_size=step_for(pgd_steps), steps=pgd_steps,
                               generator=generator),
                    "cw": pgd(model, xb, yb, eps=eps, step_size=step_for(cw_steps), steps=cw_steps, loss="cw",
                              generator=generator),
                }
                with torch.no_grad():
                    for key, xa in adversarial.items():
                        correct[key].append((model(xa).argmax(1) == yb).cpu())
    flags = {k: torch.cat(v) for k, v in correct.items()}
    flags["worst"] = flags["clean"] & flags["fgsm"] & flags["pgd"] & flags["cw"]
    out = {f"{k}_acc": int(v.sum()) / len(x) for k, v in flags.items()}
    out["pgd_step_size"], out["cw_step_size"] = step_for(pgd_steps), step_for(cw_steps)
    if return_correct:
        out["correct"] = flags
    return out


@torch.no_grad()
def layer_spectra(model: nn.Module) -> list[dict]:
    """Exact ``sigma_max``, ``sigma_min``, ``kappa`` and sparsity of every Conv2d / Linear layer, masked ones through
    ``weight * mask`` (float64 SVD on CPU)."""
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        mask = m.mask if isinstance(m, MASKED_LAYERS) else (m.weight.detach() != 0).to(m.weight.dtype)
        w = (m.weight.detach() * mask).double().cpu().reshape(m.weight.shape[0], -1)
        s = torch.linalg.svdvals(w)
        s_max, s_min = float(s[0]), float(s[-1])
        # numerically singular (numpy.linalg.matrix_rank's tolerance): report kappa = inf, not 1e16
        singular = s_min <= s_max * max(w.shape) * torch.finfo(torch.float64).eps
        rows.append({"name": name, "shape": list(m.weight.shape), "sigma_max": s_max, "sigma_min": s_min,
                     "kappa": math.inf if singular else kappa(s_max, s_min),
                     "sparsity": tensor_sparsity(mask),
                     "dead_rows": int((w.abs().sum(1) == 0).sum()), "dead_cols": int((w.abs().sum(0) == 0).sum())})
    return rows


def _json_safe(value):
    """inf/nan are not JSON: write them as strings the report reader turns back into floats."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def evaluate_run(cfg: Config, model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, *, reg=None,
                 amp_ctx=contextlib.nullcontext, memory_format=torch.contiguous_format) -> dict:
    """Everything ``report.json`` holds: config, accuracies, sparsity, per-layer spectra (exact and, with TSCNC,
    the regulariser's estimates). ``x_test``: non-empty images ``[N, ...]`` in [0, 1]; ``y_test``: int64 labels
    ``[N]``."""
    check_images("x_test", x_test, nonempty=True)
    check_labels("y_test", y_test, len(x_test), images="x_test")
    if cfg.eval_max_examples:
        x_test, y_test = x_test[:cfg.eval_max_examples], y_test[:cfg.eval_max_examples]
    eps = eval_radius(cfg)
    result: dict = {"config": config_to_dict(cfg), "n_eval": len(x_test), "eval_eps": eps,
                    "train_eps": cfg.attack_eps, "train_step_size": train_step_size(cfg)}
    accuracies = robust_accuracy(model, x_test, y_test, eps=eps, pgd_steps=cfg.eval_pgd_steps,
                                 cw_steps=cfg.eval_cw_steps, batch_size=cfg.eval_batch_size, seed=cfg.seed,
                                 amp_ctx=amp_ctx, memory_format=memory_format, progress=cfg.progress,
                                 return_correct=True)
    correct = accuracies.pop("correct")
    result.update(accuracies)
    if cfg.autoattack:
        from fastcnc.autoattack import autoattack_accuracy

        n_aa = min(cfg.autoattack_max_examples or len(x_test), len(x_test))
        aa = autoattack_accuracy(model, x_test[:n_aa], y_test[:n_aa], eps=eps, version=cfg.autoattack,
                                 seed=cfg.seed, batch_size=cfg.eval_batch_size)
        worst = correct["worst"][:n_aa] & aa.pop("robust")
        result["autoattack"] = {**aa, "worst_acc": float(worst.double().mean()),
                                "worst_builtin_acc": float(correct["worst"][:n_aa].double().mean())}
        result["autoattack_acc"] = aa["robust_acc"]
        # the worst case over every attack run, on the images every attack saw
        result["worst_acc"], result["n_worst"] = result["autoattack"]["worst_acc"], n_aa
    else:
        result["n_worst"] = len(x_test)
    sparsity = sparsity_report(model)
    result["sparsity"] = sparsity[-1]["sparsity"]
    result["layers"] = layer_spectra(model)
    kappas = [r["kappa"] for r in result["layers"]]
    result["kappa_max"] = max(kappas, default=math.nan)
    # over every layer, inf included (a singular layer ranks last), the mean of the middle two for an even count
    result["kappa_median"] = statistics.median(kappas) if kappas else math.nan
    result["n_layers_kappa_inf"] = sum(not math.isfinite(k) for k in kappas)
    if reg is not None:
        result["regularizer_report"] = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()}
                                        for row in reg.report()]
    return _json_safe(result)
