"""TSCNC: the model-level regulariser, lambda_tsc * TSC + lambda_cnc * CNC over every Conv2d/Linear weight."""

from __future__ import annotations

import torch
from torch import nn

from fastcnc._checks import check_choice, check_int, check_positive
from fastcnc.cnc import CNC_KINDS, cnc_penalty
from fastcnc.pruning import tensor_sparsity
from fastcnc.spectral import SpectralEstimate, SpectralState, as_matrices, extreme_singular_values
from fastcnc.spectral_math import kappa
from fastcnc.tsc import tsc_penalty

__all__ = ["TSCNC", "constrained_layers"]


def constrained_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every nn.Conv2d / nn.Linear (fastcnc's masked layers included) in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _effective_weight(layer: nn.Module) -> torch.Tensor:
    # masked layers constrain the weight they compute with (pruned entries are zero in it)
    return layer.effective_weight() if hasattr(layer, "effective_weight") else layer.weight


class TSCNC(nn.Module):
    """``reg = TSCNC(model, lambda_tsc=..., lambda_cnc=...)``; ``loss = task_loss + reg()``.

    Each call estimates sigma_max / sigma_min of every layer (all layers batched, warm-started from the previous call:
    the state is kept in this module and saved in its ``state_dict``), then returns
    ``lambda_tsc * sum_l TSC(W_l) + lambda_cnc * sum_l CNC(W_l)`` as a differentiable 0-dim tensor (float32).

    Args:
        model: the network (pass the unwrapped module, not a DDP wrapper).
        lambda_tsc, lambda_cnc: weights of the two penalties (>= 0; 0 switches a term off).
        cnc: ``"log"`` | ``"kappa"`` | ``"hinge"`` (see ``fastcnc.cnc``); kappa_target and eps as there.
        a: TSC parameter (default 100, as the paper's code).
        iters, depth, block: spectral-engine work per call (default: one restart of depth 1 = 3 passes + 1).
        refresh_every: recompute exactly (float64 SVD) every N calls (0: only when needed: on the first call, which has
            no state, and whenever a masked layer's mask changed since the last call, i.e. after a pruning step, which
            can create a new smallest singular value far from the tracked one).
        tol: exact fallback for layers whose residual bound exceeds ``tol`` relative (see extreme_singular_values).
        layers: restrict to these module names (default: all Conv2d/Linear).
    """

    def __init__(self, model: nn.Module, lambda_tsc: float = 1e-4, lambda_cnc: float = 1e-3, *, cnc: str = "log",
                 kappa_target: float = 10.0, eps: float = 1e-6, a: float = 100.0, iters: int = 1, depth: int = 1,
                 block: int = 4, refresh_every: int = 0, tol: float | None = None,
                 layers: list[str] | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("model must be the unwrapped module (ddp_model.module), not the DDP wrapper")
        self.lambda_tsc = check_positive("lambda_tsc", lambda_tsc, allow_zero=True)
        self.lambda_cnc = check_positive("lambda_cnc", lambda_cnc, allow_zero=True)
        self.cnc = check_choice("cnc", cnc, CNC_KINDS)
        self.kappa_target = check_positive("kappa_target", kappa_target)
        self.eps = check_positive("eps", eps)
        if self.eps >= 1:
            raise ValueError(f"eps must be < 1 (kappa is capped at 1/eps), got {eps}")
        self.a = check_positive("a", a)
        self.engine = dict(iters=check_int("iters", iters, minimum=1), depth=check_int("depth", depth, minimum=1),
                           block=check_int("block", block, minimum=2),
                           tol=None if tol is None else check_positive("tol", tol))
        if block * (depth + 1) > 16:
            raise ValueError(f"block * (depth + 1) must be <= 16, got {block} * ({depth} + 1)")
        self.refresh_every = check_int("refresh_every", refresh_every, minimum=0)
        found = constrained_layers(model)
        if layers is not None:
            if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
                raise TypeError(f"layers must be a list of module names (str), got {layers!r}")
            known = {n for n, _ in found}
            missing = [n for n in layers if n not in known]
            if missing:
                raise ValueError(f"layers names unknown Conv2d/Linear modules: {missing}")
            found = [(n, m) for n, m in found if n in set(layers)]
        if not found:
            raise ValueError("model has no nn.Conv2d or nn.Linear layers to regularise")
        object.__setattr__(self, "_layers", found)  # not submodules: the model owns (and saves) them
        self.state = SpectralState()
        self._mask_signature = None
        self.calls = 0
        self.last_estimate: SpectralEstimate | None = None

    # -- checkpointing of the warm-start state
    def get_extra_state(self):
        return {"spectral": self.state.to_dict(), "calls": self.calls}

    def set_extra_state(self, extra) -> None:
        if not (isinstance(extra, dict) and isinstance(extra.get("spectral"), dict) and "calls" in extra
                and {"shapes", "blocks"} <= set(extra["spectral"])):
            raise ValueError("TSCNC state must be a dict {'spectral': {'shapes', 'blocks'}, 'calls'} as saved by "
                             f"TSCNC.state_dict(), got {type(extra).__name__}")
        self.state = SpectralState.from_dict(extra["spectral"])
        self.calls = int(extra["calls"])
        # the saved warm state belongs to the masks the model holds now (load the model's state first): a mask
        # change is detected from here on, so a resumed run does not pay (or differ by) a spurious exact refresh
        self._mask_signature = self._mask_signature_now()

    def _mask_signature_now(self) -> tuple:
        # torch bumps a tensor's _version on every in-place write: a free way to notice that pruning changed a mask
        return tuple((id(m.mask), m.mask._version) for _, m in self._layers if isinstance(
            getattr(m, "mask", None), torch.Tensor))

    def _matrices(self, weights: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[int]]:
        """The CNC matrices of every layer (one per conv group) and the layer index each belongs to.

        ``weights``: the layers' effective weights when the caller already formed them (W*M costs a pass)."""
        if weights is None:
            weights = [_effective_weight(layer) for _, layer in self._layers]
        mats, owner = [], []
        for j, ((_, layer), w) in enumerate(zip(self._layers, weights, strict=True)):
            for m in as_matrices(w, getattr(layer, "groups", 1)):
                mats.append(m)
                owner.append(j)
        return mats, owner

    def forward(self) -> torch.Tensor:
        weights = [_effective_weight(layer) for _, layer in self._layers]
        total = weights[0].new_zeros((), dtype=torch.float32)
        if self.lambda_tsc > 0:
            # with CNC on, the spectral engine below rejects NaN/Inf weights anyway: check here only without it
            total = total + self.lambda_tsc * tsc_penalty(weights, a=self.a, check_finite=self.lambda_cnc == 0).float()
        if self.lambda_cnc > 0 or self.last_estimate is None:
            mats, _ = self._matrices(weights)
            masks = self._mask_signature_now()
            refresh = self.calls == 0 or not self.state.matches([tuple(m.shape) for m in mats]) or (
                self.refresh_every > 0 and self.calls % self.refresh_every == 0) or masks != self._mask_signature
            self._mask_signature = masks
            with torch.no_grad():
                est = extreme_singular_values([m.detach() for m in mats], state=self.state, refresh=refresh,
                                              **self.engine)
            self.last_estimate = est
            if self.lambda_cnc > 0:
                cnc = cnc_penalty(mats, kind=self.cnc, kappa_target=self.kappa_target, eps=self.eps, estimate=est,
                                  check_finite=False)  # est was computed from these very weights, which it checked
                total = total + self.lambda_cnc * cnc.float()
        self.calls += 1
        return total

    @torch.no_grad()
    def refresh(self) -> SpectralEstimate:
        """Recompute every layer exactly (float64 SVD) and reset the warm state from it."""
        mats, _ = self._matrices()
        self.last_estimate = extreme_singular_values([m.detach() for m in mats], state=self.state, refresh=True)
        return self.last_estimate

    @torch.no_grad()
    def report(self, exact: bool = False) -> list[dict]:
        """Per-layer sigma_max, sigma_min, kappa, their residual bounds and sparsity (a grouped conv as a whole).

        ``exact=True`` (or no estimate yet) recomputes exactly first.
        """
        est = self.refresh() if exact or self.last_estimate is None else self.last_estimate
        _, owner = self._matrices()
        rows = []
        for j, (name, layer) in enumerate(self._layers):
            idx = [i for i, o in enumerate(owner) if o == j]
            w = _effective_weight(layer)
            smax = max(float(est.sigma_max[i]) for i in idx)  # a grouped conv is block-diagonal over its groups
            smin = min(float(est.sigma_min[i]) for i in idx)
            rows.append({
                "name": name, "shape": list(w.shape), "sigma_max": smax, "sigma_min": smin,
                "kappa": kappa(smax, smin),
                "err_max": max(float(est.err_max[i]) for i in idx),
                "err_min": max(float(est.err_min[i]) for i in idx),
                "sparsity": tensor_sparsity(w),
            })
        return rows
