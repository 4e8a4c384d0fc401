"""HYDRA score-based pruning (Sehwag et al., NeurIPS 2020): learned importance scores, straight-through top-k mask.

Every prunable layer (MaskedLinear / MaskedConv2d) gets a score tensor ``s`` of its weight's shape. While scoring,
the layer computes with ``W * topk(|s|)``: the forward uses the binary mask of the ``keep`` largest scores, the
backward passes the mask's gradient to ``|s|`` unchanged (straight-through estimator), so
``d loss / d s = d loss / d W_eff * W * sign(s)``. The method has three stages:

1. pre-train the dense network (adversarially; the caller's ordinary training);
2. prune: freeze the network's parameters and optimise only the scores (``begin_scoring`` ... ``end_scoring``),
   with the same adversarial loss; scores start from the weights, ``s = sqrt(6 / fan_in) * W / max|W|`` per layer
   (HYDRA's scaled initialisation, which makes the first mask the magnitude mask);
3. fine-tune: ``end_scoring`` writes ``topk(|s|)`` into the layers' masks, fixed from then on, and restores the
   parameters' ``requires_grad``; the caller trains the weights under the fixed mask.

``scope="layer"`` (HYDRA's choice) keeps the same fraction in every layer; ``scope="global"`` ranks all scores
together (scores are scaled per layer by their initialisation, so a global ranking is meaningful only roughly).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastcnc._checks import check_choice, check_int, check_positive
from fastcnc.layers import MaskedConv2d, MaskedLinear
from fastcnc.pruning import masked_layers

HYDRA_SCOPES = ("layer", "global")


class TopKMaskFunction(torch.autograd.Function):
    """Forward: binary mask of the ``n_keep`` largest entries of ``scores``; backward: identity (straight-through)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, n_keep: int) -> torch.Tensor:
        mask = torch.zeros_like(scores)
        if n_keep > 0:
            mask.view(-1)[torch.topk(scores.flatten(), n_keep, sorted=False).indices] = 1
        return mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def topk_mask(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Binary mask of the ``n_keep`` largest ``scores`` (ties broken by ``torch.topk``), straight-through gradient."""
    if not 0 <= n_keep <= scores.numel():
        raise ValueError(f"n_keep must be in [0, {scores.numel()}], got {n_keep}")
    return TopKMaskFunction.apply(scores, int(n_keep))


def _n_keep(numel: int, sparsity: float) -> int:
    return numel - int(round(sparsity * numel))


class HydraPruner(nn.Module):
    """Scores for every masked layer of ``model`` and the three HYDRA stages (see the module docstring).

    Args:
        model: a network with MaskedLinear / MaskedConv2d layers (``fastcnc.sparsify`` or fastcnc's models).
        sparsity: fraction of weights to prune, in [0, 1).
        scope: ``layer`` (the same fraction in each layer, as HYDRA) or ``global``.
        keep_first_last: leave the first and the last masked layer dense (not scored).
    The scores are this module's parameters (``self.scores``, one per pruned layer) and are saved in its
    ``state_dict``; give them to their own optimizer for stage 2.
    """

    def __init__(self, model: nn.Module, sparsity: float, *, scope: str = "layer", keep_first_last: bool = False):
        super().__init__()
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        self.sparsity = float(sparsity)
        self.scope = check_choice("scope", scope, HYDRA_SCOPES)
        layers = masked_layers(model)
        if not layers:
            raise ValueError("model has no MaskedLinear/MaskedConv2d layers: call fastcnc.sparsify(model) first")
        if keep_first_last:
            layers = layers[1:-1]
            if not layers:
                raise ValueError("keep_first_last=True leaves no layer to prune")
        object.__setattr__(self, "_model", model)  # not a submodule: the model owns (and saves) its layers
        object.__setattr__(self, "_layers", layers)
        self.names = [name for name, _ in layers]
        self.scores = nn.ParameterList([nn.Parameter(self._initial_scores(m)) for _, m in layers])
        self.scoring = False
        self._frozen: list[tuple[nn.Parameter, bool]] = []

    @staticmethod
    @torch.no_grad()
    def _initial_scores(layer: nn.Module) -> torch.Tensor:
        w = layer.weight.detach() * layer.mask
        fan_in = w[0].numel()
        scale = w.abs().max()
        return math.sqrt(6.0 / fan_in) * (w / scale if scale > 0 else w)

    @torch.no_grad()
    def reset_scores(self) -> None:
        """Re-initialise the scores from the current weights (call at the start of stage 2)."""
        for s, (_, m) in zip(self.scores, self._layers, strict=True):
            s.copy_(self._initial_scores(m).to(s.device))

    def masks(self) -> list[torch.Tensor]:
        """The current top-k masks of the scores (differentiable in the scores, straight-through)."""
        magnitudes = [s.abs() for s in self.scores]
        if self.scope == "layer":
            return [topk_mask(a, _n_keep(a.numel(), self.sparsity)) for a in magnitudes]
        flat = torch.cat([a.flatten() for a in magnitudes])
        mask = topk_mask(flat, _n_keep(flat.numel(), self.sparsity))
        return [part.view_as(a) for part, a in zip(mask.split([a.numel() for a in magnitudes]), magnitudes,
                                                 strict=True)]

    # ---- stage 2
    def begin_scoring(self, reset: bool = True) -> list[nn.Parameter]:
        """Freeze every parameter of the model, route the pruned layers' forwards through ``W * topk(|s|)``, and
        return the score parameters (to optimise). ``reset``: initialise the scores from the current weights."""
        if self.scoring:
            raise RuntimeError("begin_scoring() called twice without end_scoring()")
        if reset:
            self.reset_scores()
        self._frozen = [(p, p.requires_grad) for p in self._model.parameters()]
        for p, _ in self._frozen:
            p.requires_grad_(False)
        for index, (_, layer) in enumerate(self._layers):
            layer.forward = _ScoredForward(layer, self, index)
        self.scoring = True
        return list(self.scores)

    @torch.no_grad()
    def end_scoring(self) -> None:
        """Write ``topk(|s|)`` into the layers' masks (fixed from now on: stage 3) and undo ``begin_scoring``."""
        if not self.scoring:
            raise RuntimeError("end_scoring() called without begin_scoring()")
        for (_, layer), mask in zip(self._layers, self.masks(), strict=True):
            del layer.forward  # back to the class's forward
            layer.set_mask(mask.to(layer.mask.device).bool() & (layer.mask != 0))
        for p, requires_grad in self._frozen:
            p.requires_grad_(requires_grad)
        self._frozen = []
        self.scoring = False

    def get_extra_state(self):
        return {"scoring": self.scoring}

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or "scoring" not in state:
            raise ValueError(f"HydraPruner state must be a dict with 'scoring', got {type(state).__name__}")
        if state["scoring"] and not self.scoring:
            self.begin_scoring(reset=False)  # the loaded scores are kept


class _ScoredForward:
    """A pruned layer's forward while scoring: ``W * M * topk(|s|)``. An object, not a closure, so that
    ``copy.deepcopy(model)`` gives the copy a forward on its own weights and scores (a closure would keep computing
    with the original's) and ``torch.save(model)`` can pickle it."""

    def __init__(self, layer: nn.Module, pruner: HydraPruner, index: int) -> None:
        self.layer, self.pruner, self.index = layer, pruner, index

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer, pruner = self.layer, self.pruner
        scores = pruner.scores[self.index]
        # global scope couples the layers: recompute all masks (cheap next to the forward) and take this one's
        mask = pruner.masks()[self.index] if pruner.scope == "global" else topk_mask(
            scores.abs(), _n_keep(scores.numel(), pruner.sparsity))
        weight = layer.weight * layer.mask * mask.to(layer.weight.dtype)
        if isinstance(layer, MaskedConv2d):
            return layer._conv_forward(x, weight, layer.bias)
        if isinstance(layer, MaskedLinear):
            return F.linear(x, weight, layer.bias)
        raise TypeError(f"HYDRA scores only MaskedLinear / MaskedConv2d, got {type(layer).__name__}")


class HydraSchedule:
    """HYDRA's three stages on a training loop's optimizer-step counter.

    Steps ``[0, score_start)`` pre-train the dense network (the loop's own optimizer), ``[score_start, score_end)``
    optimise the scores only (``self.optimizer``: SGD with momentum, cosine lr over the stage; the network's
    parameters are frozen, so the loop's weight optimizer has nothing to update), and from ``score_end`` on the masks
    are fixed and the loop fine-tunes the weights. Call ``step(step)`` before the forward of every optimizer step
    and ``optimizer_step()`` after the backward (it does nothing outside the score stage).
    """

    def __init__(self, pruner: HydraPruner, score_start: int, score_end: int, *, lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 1e-4):
        if not isinstance(pruner, HydraPruner):
            raise TypeError(f"pruner must be a fastcnc.hydra.HydraPruner, got {type(pruner).__name__}")
        check_int("score_start", score_start)
        check_int("score_end", score_end)
        if not score_start < score_end:
            raise ValueError(f"HYDRA needs 0 <= score_start < score_end, got {score_start}, {score_end}")
        lr = check_positive("lr", lr)
        momentum = check_positive("momentum", momentum, allow_zero=True)
        weight_decay = check_positive("weight_decay", weight_decay, allow_zero=True)
        self.pruner, self.start, self.end = pruner, int(score_start), int(score_end)
        self.optimizer = torch.optim.SGD(pruner.scores.parameters(), lr=lr, momentum=momentum,
                                         weight_decay=weight_decay)
        self.base_lr = lr
        self.done = False

    def stage(self, step: int) -> str:
        return "pretrain" if step < self.start else ("score" if step < self.end else "finetune")

    @property
    def scoring(self) -> bool:
        return self.pruner.scoring

    def step(self, step: int) -> None:
        """Enter or leave the score stage as ``step`` requires (idempotent; resumes land in the right stage)."""
        stage = self.stage(step)
        if stage == "score" and not self.pruner.scoring and not self.done:
            self.pruner.begin_scoring(reset=step == self.start)
        if stage == "finetune" and not self.done:
            if not self.pruner.scoring:  # a run that starts (or resumes) past the stage still gets HYDRA's masks
                self.pruner.begin_scoring(reset=False)
            self.pruner.end_scoring()
            self.done = True
        if self.pruner.scoring:
            progress = (step - self.start) / (self.end - self.start)
            for group in self.optimizer.param_groups:
                group["lr"] = self.base_lr * 0.5 * (1 + math.cos(math.pi * progress))

    def optimizer_step(self) -> None:
        if self.pruner.scoring:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"pruner": self.pruner.state_dict(), "optimizer": self.optimizer.state_dict(), "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or not {"pruner", "optimizer", "done"} <= set(state):
            raise ValueError("HydraSchedule state must be a dict with 'pruner', 'optimizer', 'done'")
        self.pruner.load_state_dict(state["pruner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.done = bool(state["done"])
