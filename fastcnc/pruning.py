"""Magnitude pruning of MaskedLinear / MaskedConv2d layers: one-shot, gradual (Zhu & Gupta 2017), and a report.

Scores are ``|W * M|`` per weight, or per ``(bh, bw)`` tile of the weight viewed as a matrix ``[C_out, fan_in]``
(conv weights ``[C_out, C_in/groups * kh * kw]``, the view the block-sparse kernels tile) with the tile's RMS (L2 norm
/ sqrt(#entries)) or mean absolute value (L1 / #entries): dividing by the entry count makes the partial tiles at the
matrix edges comparable with full ones. Pruning never revives a weight: the new mask is ``old mask AND keep``, and
entries that are already pruned rank below every live one, so masks only shrink as the target sparsity grows.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from fastcnc._checks import check_choice, check_int
from fastcnc.layers import MASKED_LAYERS


def masked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every MaskedLinear / MaskedConv2d in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MASKED_LAYERS)]


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Zero the stored pruned weights; call it after each optimizer step. The layers compute with ``weight * mask``
    and a pruned weight's gradient is 0, but optimizer state from before a pruning event (momentum, Adam's moments)
    and weight decay's coupling keep moving the stored value; magnitude ranking and exports should see exact zeros."""
    for _, m in masked_layers(model):
        m._zero_pruned()


def _check_sparsity(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {type(value).__name__}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def _check_block(block) -> tuple[int, int] | None:
    if block is None:
        return None
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise ValueError(f"block must be None or a pair of positive ints (bh, bw), got {block!r}")
    return int(block[0]), int(block[1])


def _targets(model: nn.Module, keep_first_last: bool) -> list[nn.Module]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [m for _, m in masked_layers(model)]
    if not layers:
        raise ValueError("model has no MaskedLinear/MaskedConv2d layers: call fastcnc.sparsify(model) first")
    if keep_first_last:
        layers = layers[1:-1]
        if not layers:
            raise ValueError("keep_first_last=True leaves no layer to prune: the model has only "
                             f"{len(masked_layers(model))} masked layer(s)")
    return layers


# ------------------------------------------------------------------------------------------------------------ scores


def _matrix(t: torch.Tensor) -> torch.Tensor:
    """A weight or mask as the ``[C_out, fan_in]`` matrix that block pruning tiles."""
    return t.reshape(t.shape[0], -1)


@torch.no_grad()
def _block_scores(layer: nn.Module, block: tuple[int, int], block_score: str):
    """Per-tile (score, entry count, live-entry count, tile grid) of ``layer``; pruned tiles score -1."""
    w = _matrix(layer.weight.detach() * layer.mask).float()
    live = _matrix(layer.mask != 0).float()
    bh, bw = block
    r, c = w.shape
    rt, ct = -(-r // bh), -(-c // bw)
    pad = (0, ct * bw - c, 0, rt * bh - r)

    def tile_sum(t):
        return torch.nn.functional.pad(t, pad).view(rt, bh, ct, bw).sum(dim=(1, 3))

    entries = tile_sum(torch.ones_like(w))
    if block_score == "l2":
        score = (tile_sum(w * w) / entries).sqrt()
    else:
        score = tile_sum(w.abs()) / entries
    n_live = tile_sum(live)
    score = torch.where(n_live > 0, score, torch.full_like(score, -1.0))
    return score.flatten(), entries.flatten(), n_live.flatten(), (rt, ct)


@torch.no_grad()
def _apply_unstructured(layers: list[nn.Module], sparsity: float) -> None:
    scores = [torch.where(m.mask != 0, m.weight.detach().abs().float(), torch.full_like(m.mask, -1.0,
                                                                                        dtype=torch.float32))
              for m in layers]
    flat = torch.cat([s.flatten().to(scores[0].device) for s in scores])
    n_prune = int(round(sparsity * flat.numel()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_prune > 0:
        keep[torch.topk(flat, n_prune, largest=False, sorted=False).indices] = False
    offset = 0
    for m, s in zip(layers, scores, strict=True):
        k = keep[offset:offset + s.numel()].view_as(m.mask).to(m.mask.device)
        offset += s.numel()
        m.set_mask((m.mask != 0) & k)


@torch.no_grad()
def _apply_block(layers: list[nn.Module], sparsity: float, block: tuple[int, int], block_score: str) -> None:
    per_layer = [_block_scores(m, block, block_score) for m in layers]
    dev = per_layer[0][0].device
    scores = torch.cat([s.to(dev) for s, _, _, _ in per_layer])
    entries = torch.cat([e.to(dev) for _, e, _, _ in per_layer])
    live = torch.cat([n.to(dev) for _, _, n, _ in per_layer])
    n_prune = int(round(sparsity * float(entries.sum())))
    zeros = float(entries.sum() - live.sum())  # already pruned, inside kept tiles too (a model pruned before)
    order = torch.argsort(scores, stable=True)
    # prune the lowest-scoring tiles until the zeros reach n_prune: each adds its live entries (tile granularity:
    # may overshoot by < 1 tile)
    covered = zeros + torch.cumsum(live[order], 0)
    n_tiles = int(torch.searchsorted(covered, torch.tensor(float(n_prune), device=dev), right=False)) + 1
    n_tiles = 0 if n_prune <= zeros else min(n_tiles, order.numel())
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[order[:n_tiles]] = False
    offset = 0
    bh, bw = block
    for m, (s, _, _, (rt, ct)) in zip(layers, per_layer, strict=True):
        k = keep[offset:offset + s.numel()].view(rt, ct)
        offset += s.numel()
        r, c = _matrix(m.mask).shape
        k = k.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:r, :c].reshape(m.mask.shape).to(m.mask.device)
        m.set_mask((m.mask != 0) & k)


def _prune_layers(layers, sparsity, scope, block, block_score):
    for m in layers:  # a NaN score would rank above every finite weight: refuse before changing any mask
        if not bool(torch.isfinite(m.weight.detach()[m.mask != 0]).all()):
            raise ValueError(f"cannot prune by magnitude: a {type(m).__name__} of shape {tuple(m.weight.shape)} has "
                             "NaN or Inf weights")
    groups = [layers] if scope == "global" else [[m] for m in layers]
    for g in groups:
        if block is None:
            _apply_unstructured(g, sparsity)
        else:
            _apply_block(g, sparsity, block, block_score)


def zero_fraction(numel: int, nonzero: int) -> float:
    """The sparsity of ``numel`` entries of which ``nonzero`` are live (0 for no entries): the one formula every
    sparsity number of the package (layers, reports, the regulariser's stats) goes through."""
    return 1.0 - nonzero / numel if numel else 0.0


def tensor_sparsity(t: torch.Tensor) -> float:
    """Fraction of zero entries of a mask or weight tensor."""
    return zero_fraction(t.numel(), int(t.count_nonzero()))


def _sparsity_of(layers) -> float:
    return zero_fraction(sum(m.mask.numel() for m in layers), sum(int(m.mask.count_nonzero()) for m in layers))


def prune_magnitude(model: nn.Module, sparsity: float, *, scope: str = "global", block=None,
                    keep_first_last: bool = False, block_score: str = "l2") -> float:
    """One-shot magnitude pruning of all MaskedLinear / MaskedConv2d layers of ``model`` to ``sparsity``.

    Args:
        sparsity: fraction of weights to zero, ``0 <= sparsity < 1`` (counted over the pruned layers).
        scope: ``"global"`` (one threshold over all layers) or ``"layer"`` (every layer to ``sparsity``).
        block: None (unstructured) or ``(bh, bw)``: prune whole tiles of the ``[C_out, fan_in]`` weight matrix.
        keep_first_last: leave the first and the last masked layer (module order) untouched.
        block_score: ``"l2"`` (tile RMS) or ``"l1"`` (tile mean |w|).

    Returns the achieved sparsity over the pruned layers (block pruning rounds up to whole tiles).
    Existing masks are respected (weights already pruned stay pruned).
    """
    sparsity = _check_sparsity("sparsity", sparsity)
    check_choice("scope", scope, {"global", "layer"})
    check_choice("block_score", block_score, {"l2", "l1"})
    block = _check_block(block)
    layers = _targets(model, keep_first_last)
    _prune_layers(layers, sparsity, scope, block, block_score)
    return _sparsity_of(layers)


# ----------------------------------------------------------------------------------------------------------- gradual


class GradualPruner:
    """Gradual magnitude pruning with the cubic schedule of Zhu & Gupta (2017, arXiv 1710.01878).

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))**3`` for ``t0 <= t <= t0 + n dt = end_step``. ``step(t)``
    prunes to ``s_t`` at the first call in each window ``[start_step + i * frequency, start_step + (i+1) * frequency)``
    (so skipped or uneven step numbers still follow the schedule) and once more at the first call with
    ``t >= end_step``, so ``s_f`` is always reached. Pruning is ``prune_magnitude`` with the given
    ``scope``/``block``/``keep_first_last``/``block_score``.
    """

    def __init__(self, model: nn.Module, final_sparsity: float, start_step: int, end_step: int, frequency: int = 100,
                 *, initial_sparsity: float = 0.0, scope: str = "global", block=None, keep_first_last: bool = False,
                 block_score: str = "l2"):
        self.final_sparsity = _check_sparsity("final_sparsity", final_sparsity)
        self.initial_sparsity = _check_sparsity("initial_sparsity", initial_sparsity)
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"initial_sparsity ({initial_sparsity}) must be <= final_sparsity ({final_sparsity})")
        self.start_step = check_int("start_step", start_step, minimum=0)
        self.end_step = check_int("end_step", end_step, minimum=start_step + 1)
        self.frequency = check_int("frequency", frequency, minimum=1)
        self.scope = check_choice("scope", scope, {"global", "layer"})
        self.block_score = check_choice("block_score", block_score, {"l2", "l1"})
        self.block = _check_block(block)
        self.keep_first_last = bool(keep_first_last)
        _targets(model, self.keep_first_last)  # fail early on a model without masked layers
        self.model = model
        self.last_pruned_step: int | None = None
        self.last_sparsity: float | None = None

    def sparsity_at(self, step: int) -> float:
        """The schedule's target sparsity at ``step`` (``s_i`` before ``start_step``, ``s_f`` after ``end_step``)."""
        t = min(max(step, self.start_step), self.end_step)
        frac = (t - self.start_step) / (self.end_step - self.start_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - frac) ** 3

    def step(self, step: int) -> float | None:
        """Prune if ``step`` is a pruning step; returns the sparsity target applied, or None if nothing was done."""
        check_int("step", step, minimum=0)
        if step < self.start_step:
            return None
        last = self.last_pruned_step
        # a step that reaches a new point of the grid start + i * frequency (steps may be skipped or uneven)
        new_grid_point = step <= self.end_step and (
            last is None or last < self.start_step
            or (step - self.start_step) // self.frequency > (last - self.start_step) // self.frequency)
        final_due = step >= self.end_step and (last is None or last < self.end_step)
        if not (new_grid_point or final_due):
            return None
        target = self.sparsity_at(step)
        _prune_layers(_targets(self.model, self.keep_first_last), target, self.scope, self.block, self.block_score)
        self.last_pruned_step, self.last_sparsity = step, target
        return target

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("final_sparsity", "initial_sparsity", "start_step", "end_step",
                                              "frequency", "scope", "block", "keep_first_last", "block_score",
                                              "last_pruned_step", "last_sparsity")}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()`` (the schedule and how far it got; masks live in the model's own state_dict)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from GradualPruner.state_dict(), got {type(state).__name__}")
        missing = {"final_sparsity", "start_step", "end_step", "frequency", "last_pruned_step"} - set(state)
        if missing:
            raise KeyError(f"GradualPruner state is missing {sorted(missing)}")
        unknown = set(state) - set(self.state_dict())
        if unknown:
            raise KeyError(f"GradualPruner state has unknown keys {sorted(unknown)}")
        s = {**self.state_dict(), **state}
        # validate everything before touching self, so a bad state leaves the pruner as it was
        checked = {
            "final_sparsity": _check_sparsity("final_sparsity", s["final_sparsity"]),
            "initial_sparsity": _check_sparsity("initial_sparsity", s["initial_sparsity"]),
            "start_step": check_int("start_step", s["start_step"], minimum=0),
            "frequency": check_int("frequency", s["frequency"], minimum=1),
            "scope": check_choice("scope", s["scope"], {"global", "layer"}),
            "block": _check_block(tuple(s["block"]) if s["block"] is not None else None),
            "keep_first_last": bool(s["keep_first_last"]),
            "block_score": check_choice("block_score", s["block_score"], {"l2", "l1"}),
        }
        checked["end_step"] = check_int("end_step", s["end_step"], minimum=checked["start_step"] + 1)
        if checked["initial_sparsity"] > checked["final_sparsity"]:
            raise ValueError(f"initial_sparsity ({checked['initial_sparsity']}) must be <= final_sparsity "
                             f"({checked['final_sparsity']})")
        last, last_s = s["last_pruned_step"], s["last_sparsity"]
        if last is not None:
            check_int("last_pruned_step", last, minimum=0)
        if last_s is not None:
            _check_sparsity("last_sparsity", last_s)
        for k, v in checked.items():
            setattr(self, k, v)
        self.last_pruned_step, self.last_sparsity = last, last_s


# ------------------------------------------------------------------------------------------------------------ report


def sparsity_report(model: nn.Module) -> list[dict]:
    """One dict per masked layer ``{name, shape, numel, nonzero, sparsity}`` (nonzero = live mask entries), followed
    by a ``{"name": "total", "shape": None, ...}`` row over all of them."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    rows = []
    for name, m in masked_layers(model):
        numel = m.mask.numel()
        nonzero = int(m.mask.count_nonzero())
        rows.append({"name": name, "shape": tuple(m.weight.shape), "numel": numel, "nonzero": nonzero,
                     "sparsity": zero_fraction(numel, nonzero)})
    numel = sum(r["numel"] for r in rows)
    nonzero = sum(r["nonzero"] for r in rows)
    rows.append({"name": "total", "shape": None, "numel": numel, "nonzero": nonzero,
                 "sparsity": zero_fraction(numel, nonzero)})
    return rows
