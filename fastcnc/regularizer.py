"""TSCNC: the model-level regulariser, lambda_tsc * TSC + lambda_cnc * CNC over every Conv2d/Linear weight."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import warnings

import torch
from torch import nn

from fastcnc import _backend
from fastcnc._checks import check_choice, check_eps_floor, check_int, check_positive
from fastcnc.cnc import CNC_KINDS, check_kappa_target, check_smooth_min, cnc_from_sigmas, penalty_from_estimate
from fastcnc.graphed import GraphedEngine
from fastcnc.layers import REPLACED_BY, _MaskedMixin, replacement
from fastcnc.pruning import tensor_sparsity
from fastcnc.spectral import SpectralEstimate, SpectralOptions, SpectralState, as_matrices, extreme_singular_values
from fastcnc.spectral_math import kappa
from fastcnc.tsc import check_tsc_a, tsc_penalty
from fastcnc.tscnc_terms import TSCNCTermsFunction

__all__ = ["TSCNC", "constrained_layers"]


def constrained_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every nn.Conv2d / nn.Linear (fastcnc's masked layers included) in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _effective_weight(layer: nn.Module) -> torch.Tensor:
    # masked layers constrain the weight they compute with (pruned entries are zero in it)
    return layer.effective_weight() if hasattr(layer, "effective_weight") else layer.weight


def _effective_weights(layers: list[nn.Module]) -> list[torch.Tensor]:
    """``_effective_weight`` of every layer, the W * M of fastcnc's masked layers as one multi-tensor product: one
    autograd node and one forward launch instead of one per layer (its backward still multiplies tensor by tensor;
    on the Triton backend TSCNC forms W * M without autograd and applies the masks in its own backward, see
    ``fastcnc.tscnc_terms``)."""
    out: list = [None] * len(layers)
    masked = []
    for i, layer in enumerate(layers):
        if getattr(type(layer), "effective_weight", None) is _MaskedMixin.effective_weight:
            masked.append(i)
        else:
            out[i] = _effective_weight(layer)
    if masked:
        products = torch._foreach_mul([layers[i].weight for i in masked], [layers[i].mask for i in masked])
        for i, w in zip(masked, products, strict=True):
            out[i] = w
    return out


_MAX_PENDING = 16  # unread sync-free calls before a step waits for the oldest one's flags


class TSCNC(nn.Module):
    """``reg = TSCNC(model, lambda_tsc=..., lambda_cnc=...)``; ``loss = task_loss + reg()``.

    Each call estimates sigma_max / sigma_min of every layer with the certified spectral engine (all layers batched
    per shape, warm-started from the previous call: the state is kept in this module and saved in its
    ``state_dict``), then returns ``lambda_tsc * sum_l TSC(W_l) + lambda_cnc * sum_l CNC(W_l)`` as a differentiable
    0-dim tensor (float32, or float64 for a float64 model).

    What is guaranteed where: on CPU every call checks the certificates synchronously, so each layer's kappa_eps
    (kappa with sigma_min floored at ``eps * sigma_max``) is proven within ``rtol`` of the truth, or the layer is
    recomputed by float64 SVD in the same call. On CUDA the step runs fixed rounds with no host sync (two, or one
    while the last call read showed that its first round alone certified every layer); the certification flags are
    copied to pinned memory without blocking and read at the first call after the copy has landed (the next call,
    unless the host runs steps ahead of the GPU; no call's flags are dropped, and unread ones travel with
    ``state_dict()``): a layer that did not certify is named in a RuntimeWarning and recomputed exactly at that call
    (so a value may be uncertified for a step or, with the host ahead, a few, never silently; it is still finite and
    one-sided: sigma_min from above, sigma_max from below, even where a factorization broke down), and NaN/Inf
    weights raise ValueError as late.

    Args:
        model: the network (pass the unwrapped module, not a DDP wrapper).
        lambda_tsc, lambda_cnc: weights of the two penalties (>= 0; 0 switches a term off).
        cnc: ``"log"`` | ``"kappa"`` | ``"hinge"`` (see ``fastcnc.cnc``); kappa_target and eps as there. A grouped
            conv contributes one term per group; ``report()`` gives its block-diagonal operator's kappa.
        a: TSC parameter (default 100, as the paper's code).
        rtol: accuracy target of the engine (relative, on kappa_eps; see ``extreme_singular_values``).
        block, iters, max_rounds: engine work (bottom block size, first-round steps, rounds before the exact fallback).
        smooth_min: 0 (default): gradient of the smallest Ritz value; > 0: soft-min over the bottom block with that
            relative temperature (see ``fastcnc.cnc``).
        refresh_every: recompute exactly (float64 SVD) every N calls (0: only when needed: on the first call, which has
            no state, and whenever a masked layer's mask changed since the last call, i.e. after a pruning step).
        layers: restrict to these module names (default: all Conv2d/Linear).
        cuda_graph: on CUDA, run the warm engine call by replaying a captured CUDA graph (``fastcnc.graphed``: same
            results, one launch instead of thousands). Captured at the first warm call and again whenever the shapes
            change; a failed capture warns and the engine runs eagerly. Each graph (at most two per set of shapes:
            one and two rounds) keeps its own CUDA memory pool, holding the engine's float64 copy of the weights and
            its intermediates between steps.
    """

    def __init__(self, model: nn.Module, lambda_tsc: float = 1e-4, lambda_cnc: float = 1e-3, *, cnc: str = "log",
                 kappa_target: float = 10.0, eps: float = 1e-6, a: float = 100.0, rtol: float = 1e-2,
                 block: int = 4, iters: int = 3, max_rounds: int = 4, smooth_min: float = 0.0,
                 refresh_every: int = 0, layers: list[str] | None = None, cuda_graph: bool = True) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("model must be the unwrapped module (ddp_model.module), not the DDP wrapper")
        self.lambda_tsc = check_positive("lambda_tsc", lambda_tsc, allow_zero=True)
        self.lambda_cnc = check_positive("lambda_cnc", lambda_cnc, allow_zero=True)
        self.cnc = check_choice("cnc", cnc, CNC_KINDS)
        self.kappa_target = check_kappa_target(cnc, kappa_target)
        self.eps = check_eps_floor("eps", eps)
        self.a = check_tsc_a(a)
        check_positive("rtol", rtol)
        self.options = SpectralOptions(rtol=rtol, floor=self.eps, block=block, iters=iters, max_rounds=max_rounds)
        self.smooth_min = check_smooth_min(smooth_min, block)
        self.refresh_every = check_int("refresh_every", refresh_every, minimum=0)
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
        o = self.options
        self._graphed = GraphedEngine(dict(rtol=o.rtol, floor=o.floor, block=o.block, iters=o.iters,
                                           max_rounds=o.max_rounds)) if cuda_graph else None
        found = constrained_layers(model)
        if layers is not None:
            if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
                raise TypeError(f"layers must be a list of module names (str), got {layers!r}")
            if not layers:
                raise ValueError("layers must name at least one Conv2d/Linear module (None: all of them), got []")
            known = {n for n, _ in found}
            missing = [n for n in layers if n not in known]
            if missing:
                raise ValueError(f"layers names unknown Conv2d/Linear modules: {missing}")
            found = [(n, m) for n, m in found if n in set(layers)]
        if not found:
            raise ValueError("model has no nn.Conv2d or nn.Linear layers to regularise")
        other = [n for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Bilinear))
                 and not isinstance(m, nn.Conv2d)]
        if other and layers is None:
            warnings.warn(f"TSCNC regularises nn.Conv2d / nn.Linear layers only; not: {other}", UserWarning,
                          stacklevel=2)
        object.__setattr__(self, "_layers", found)  # not submodules: the model owns (and saves) them
        self.state = SpectralState()
        self._mask_signature = None
        self.calls = 0
        self.last_estimate: SpectralEstimate | None = None
        # (pinned flags, event, call, rounds) of each sync-free call whose flags have not been read yet, oldest first:
        # read at the first call after their copy has landed (a host running steps ahead of the GPU reads them late,
        # never drops them)
        self._pending: list[tuple] = []
        self._one_round = False  # sync-free calls run one round (see _read_pending)
        self.work = {"calls": 0, "grams": 0, "factorizations": 0, "inverse_steps": 0, "fallbacks": 0,
                     "uncertified_late": 0, "one_round_calls": 0}

    # -- checkpointing of the warm-start state
    def get_extra_state(self):
        # unread certificate flags travel with the checkpoint (a wait for their copies: not in a step's hot path)
        for _, event, _, _ in self._pending:
            if event is not None:
                event.synchronize()
        pending = [(host.cpu().clone(), call, rounds) for host, _, call, rounds in self._pending]
        return {"spectral": self.state.to_dict(), "calls": self.calls, "one_round": self._one_round,
                "pending": pending}

    def set_extra_state(self, extra) -> None:
        if not (isinstance(extra, dict) and isinstance(extra.get("spectral"), dict) and "calls" in extra
                and {"shapes", "blocks"} <= set(extra["spectral"])):
            raise ValueError("TSCNC state must be a dict {'spectral': {'shapes', 'blocks'}, 'calls'} as saved by "
                             f"TSCNC.state_dict(), got {type(extra).__name__}")
        self.state = SpectralState.from_dict(extra["spectral"])
        self.calls = int(extra["calls"])
        self._one_round = bool(extra.get("one_round", False))  # (absent from checkpoints before it existed)
        self._pending = [(host, None, call, rounds) for host, call, rounds in extra.get("pending", [])]
        # the saved warm state belongs to the masks the model holds now (load the model's state first): a mask
        # change is detected from here on, so a resumed run does not pay (or differ by) a spurious exact refresh
        self._mask_signature = self._mask_signature_now()

    def _mask_signature_now(self) -> tuple:
        # torch bumps a tensor's _version on every in-place write: a free way to notice that pruning changed a mask
        # (a mask made under inference_mode keeps no version counter: such a model is not trained, id() suffices)
        return tuple((id(m.mask), None if m.mask.is_inference() else m.mask._version) for _, m in self._layers
                     if isinstance(getattr(m, "mask", None), torch.Tensor))

    def _follow_replacements(self) -> None:
        """Layers that ``sparsify`` / ``densify`` replaced after this TSCNC was built: regularise their replacements,
        the modules the model computes with (a dict lookup per layer and call; the new masks force an exact refresh
        through the mask signature)."""
        if any(REPLACED_BY in layer.__dict__ for _, layer in self._layers):
            object.__setattr__(self, "_layers", [(name, replacement(layer)) for name, layer in self._layers])

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

    def _engine(self, mats: list[torch.Tensor], refresh) -> SpectralEstimate:
        o = self.options
        sync = not _backend.on_cuda(mats[0])
        # sync-free calls run min(max_rounds, 2) fixed rounds, or one where the last call read showed it enough
        rounds = 1 if not sync and self._one_round else o.max_rounds
        est = None
        if self._use_graph(mats) and refresh is False and self.smooth_min == 0:
            # None: this call runs eagerly
            # (the fused path's matrices are views of W * M formed without autograd: no detach, an op per matrix)
            est = self._graphed([m.detach() if m.requires_grad else m for m in mats], self.state, max_rounds=rounds)
        if est is None:
            with torch.no_grad():
                est = extreme_singular_values([m.detach() for m in mats], rtol=o.rtol, floor=o.floor,
                                              block=o.block, iters=o.iters, max_rounds=rounds,
                                              state=self.state, refresh=refresh, sync=sync,
                                              ritz_block=self.smooth_min > 0)
        for k in ("grams", "factorizations", "inverse_steps", "fallbacks"):
            self.work[k] += est.work[k]
        if not sync:  # certificates are read at the next call, from pinned memory: no host sync in this step
            resolved = est.certified | est.fallback  # (an exact SVD counts as resolved)
            first = est.first_round_certified if est.first_round_certified is not None else resolved
            flags = torch.stack([resolved, est.finite, first])
            self.work["one_round_calls"] += rounds == 1
            if flags.is_cuda:
                host = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
                host.copy_(flags, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:  # the CUDA code path simulated on CPU tensors (tests/test_host_syncs.py)
                host, event = flags, None
            # (an all-exact call, est.first_round_certified None, says nothing about how many rounds are enough)
            self._pending.append((host, event, self.calls,
                                  min(rounds, 2) if est.first_round_certified is not None else None))
            if len(self._pending) > _MAX_PENDING:  # a host this far ahead waits for the oldest copy (not in practice)
                self._pending[0][1].synchronize()
        return est

    def _use_graph(self, mats: list[torch.Tensor]) -> bool:
        return self._graphed is not None and mats[0].is_cuda

    def _read_pending(self, n_mats: int) -> list[bool] | None:
        """Flags of the earlier sync-free calls whose copies have landed, oldest first: warn about (and refresh)
        uncertified layers, raise on NaN/Inf weights. Returns the per-matrix refresh list for this call, or None."""
        late = None
        while self._pending and (self._pending[0][1] is None or self._pending[0][1].query()):
            host, _, call, rounds = self._pending.pop(0)
            certified, finite, first = host.tolist()  # pinned host memory the copy has landed in: no wait
            if len(certified) != n_mats:  # (the layers changed since: those flags describe other matrices)
                continue
            if not all(finite):
                bad = finite.index(False)
                raise ValueError(f"weights[{bad}] contains NaN or Inf (found at call {call}); expected finite values")
            # one round from now on while the first round alone certifies every matrix (seen in a two-round call, or
            # a one-round call that certified all); back to two at the first failure (which is also refreshed below)
            if not all(certified):
                self._one_round = False
            elif rounds is not None:
                self._one_round = rounds == 1 or all(first)
            if all(certified):
                continue
            bad = [i for i, c in enumerate(certified) if not c]
            self.work["uncertified_late"] += len(bad)
            warnings.warn(f"TSCNC: the spectral certificate of matrices {bad} failed at call {call} (kappa not proven "
                          f"within rtol={self.options.rtol:g}); they are recomputed exactly (float64 SVD) now",
                          RuntimeWarning, stacklevel=3)
            late = [a or not c for a, c in zip(late or [False] * n_mats, certified, strict=True)]
        return late

    def _fused_terms(self, layers: list[nn.Module]) -> bool:
        """Whether this call takes both penalties through one autograd node (``TSCNCTermsFunction``): both on, the
        plain Ritz values (no soft-min), the Triton backend, one dtype, and every layer's effective weight W or
        W * M (a buffer mask)."""
        if not (self.lambda_tsc > 0 and self.lambda_cnc > 0 and self.smooth_min == 0):
            return False
        if torch.is_inference_mode_enabled():  # no gradient to fuse (and inference tensors keep no version counter)
            return False
        first = layers[0].weight
        if not _backend.use_triton(first):
            return False
        for layer in layers:
            kind = getattr(type(layer), "effective_weight", None)
            if layer.weight.dtype != first.dtype or not (kind is None or (
                    kind is _MaskedMixin.effective_weight and not layer.mask.requires_grad)):
                return False
        return True

    # under torch.compile the regulariser runs eagerly: tracing the engine would break its graph at every host-side
    # decision (CPU) and would trace around its own CUDA graph (CUDA); the model's graph is compiled as usual
    @torch.compiler.disable
    def forward(self) -> torch.Tensor:
        self._follow_replacements()
        layers = [layer for _, layer in self._layers]
        fused = self._fused_terms(layers)
        with torch.no_grad() if fused else contextlib.nullcontext():
            weights = _effective_weights(layers)
        # the loss's precision: float32, or the weights' own where they are wider (a float64 model)
        dt = functools.reduce(torch.promote_types, {w.dtype for w in weights}, torch.float32)  # (per dtype, not layer)
        total = weights[0].new_zeros((), dtype=dt)
        # the engine first: on CUDA its graph runs on the device while the host goes on with the TSC term
        if self.lambda_cnc > 0 or self.last_estimate is None:
            mats, owner = self._matrices(weights)
            masks = self._mask_signature_now()
            late = self._read_pending(len(mats))
            refresh = self.calls == 0 or not self.state.matches([tuple(m.shape) for m in mats]) or (
                self.refresh_every > 0 and self.calls % self.refresh_every == 0) or masks != self._mask_signature
            if not refresh and late is not None:
                refresh = late
            self._mask_signature = masks
            est = self._engine(mats, refresh)
            self.last_estimate = est
            if fused:
                return self._count(total + self._fused_total(layers, weights, mats, owner, est, dt))
            if self.lambda_cnc > 0:
                cnc = penalty_from_estimate(mats, est, kind=self.cnc, kappa_target=self.kappa_target, eps=self.eps,
                                            smooth_min=self.smooth_min, from_these_weights=True)
                total = total + self.lambda_cnc * cnc.to(dt)
        if self.lambda_tsc > 0:
            # with CNC on, the spectral engine rejects NaN/Inf weights anyway: check here only without it
            total = total + self.lambda_tsc * tsc_penalty(weights, a=self.a, check_finite=self.lambda_cnc == 0).to(dt)
        return self._count(total)

    def _fused_total(self, layers: list[nn.Module], weights: list[torch.Tensor], mats: list[torch.Tensor],
                     owner: list[int], est: SpectralEstimate, dt: torch.dtype) -> torch.Tensor:
        """lambda_cnc * CNC + lambda_tsc * TSC through ``TSCNCTermsFunction`` (``weights``: W * M formed without
        autograd; ``mats``: their matrices, ``owner`` the layer of each)."""
        blocks, next_row = [], {}
        for m, j in zip(mats, owner, strict=True):  # where each matrix lies in its layer's [out, -1] view
            row = next_row.get(j, 0)
            blocks.append((j, row, m.shape[0], m.shape[1]))
            next_row[j] = row + m.shape[0]
        layer_masks = [layer.mask if getattr(type(layer), "effective_weight", None) is not None else None
                       for layer in layers]
        tsc, sigmas = TSCNCTermsFunction.apply(self.a, est.groups, torch.stack([est.sigma_max, est.sigma_min], 1),
                                               blocks, layer_masks, [w.contiguous() for w in weights],
                                               *[layer.weight for layer in layers])
        cnc = cnc_from_sigmas(sigmas, kind=self.cnc, kappa_target=self.kappa_target, eps=self.eps).sum()
        return self.lambda_cnc * cnc.to(dt) + self.lambda_tsc * tsc.sum().to(dt)

    def _count(self, total: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.work["calls"] = self.calls
        return total

    @torch.no_grad()
    def refresh(self) -> SpectralEstimate:
        """Recompute every layer exactly (float64 SVD) and reset the warm state from it."""
        self._follow_replacements()
        return self._refresh(self._matrices()[0])

    def _refresh(self, mats: list[torch.Tensor]) -> SpectralEstimate:
        self.last_estimate = self._engine(mats, True)
        self._mask_signature = self._mask_signature_now()  # (the next call need not refresh for these masks again)
        return self.last_estimate

    @torch.no_grad()
    def report(self, exact: bool = False) -> list[dict]:
        """Per-layer sigma_max, sigma_min, kappa (the engine's), their certified brackets and flags, the exact kappa
        (float64 svdvals, computed here; inf where numerically singular), kappa_eps = sigma_max / (sigma_min + eps
        sigma_max) estimated and exact with ``kappa_rel_err`` between them (the certified quantity), and sparsity (a
        grouped conv as a whole).

        The estimate is of the weights as they are now: a certified call (``sync=True``) warm-started from a copy of
        the state, so training is not changed by reporting. (``last_estimate``, from the last ``reg()`` call, is of
        the weights before the optimizer step that followed it.) ``exact=True`` recomputes every layer exactly
        instead (float64 SVD) and resets the warm state from it, as ``refresh()``.
        """
        self._follow_replacements()
        mats, owner = self._matrices()
        if exact:
            est = self._refresh(mats)
        else:
            o = self.options
            shapes = [tuple(m.shape) for m in mats]
            state = copy.deepcopy(self.state) if self.state.matches(shapes) else None
            est = extreme_singular_values(mats, rtol=o.rtol, floor=o.floor, block=o.block, iters=o.iters,
                                          max_rounds=o.max_rounds, state=state, sync=True)
        vals = {k: getattr(est, k).tolist() for k in ("sigma_max", "sigma_min", "sigma_max_lo", "sigma_max_hi",
                                                       "sigma_min_lo", "sigma_min_hi", "certified", "fallback")}
        exact_s = [torch.linalg.svdvals(m.detach().double().cpu()) for m in mats]
        rows = []
        for j, (name, layer) in enumerate(self._layers):
            idx = [i for i, o in enumerate(owner) if o == j]
            w = _effective_weight(layer)
            # a grouped conv is block-diagonal over its groups: extremes over the groups
            smax, smin = max(vals["sigma_max"][i] for i in idx), min(vals["sigma_min"][i] for i in idx)
            emax, emin = max(float(exact_s[i][0]) for i in idx), min(float(exact_s[i][-1]) for i in idx)
            # numerically singular in float64 (numpy's matrix_rank tolerance): the exact kappa is inf, as evaluate.py
            singular = emin <= max(w.reshape(w.shape[0], -1).shape) * torch.finfo(torch.float64).eps * emax
            k_exact = math.inf if singular and emax > 0 else kappa(emax, emin)
            # the certified quantity: kappa_eps = sigma_max / (sigma_min + eps sigma_max), the penalty's
            keps, keps_exact = _kappa_eps(smax, smin, self.eps), _kappa_eps(emax, emin, self.eps)
            rows.append({
                "name": name, "shape": list(w.shape), "sigma_max": smax, "sigma_min": smin, "kappa": kappa(smax, smin),
                "kappa_exact": k_exact, "kappa_eps": keps, "kappa_eps_exact": keps_exact,
                "kappa_rel_err": abs(keps / keps_exact - 1),
                "sigma_max_bracket": [max(vals["sigma_max_lo"][i] for i in idx),
                                      max(vals["sigma_max_hi"][i] for i in idx)],
                "sigma_min_bracket": [min(vals["sigma_min_lo"][i] for i in idx),
                                      min(vals["sigma_min_hi"][i] for i in idx)],
                "err_max": max(vals["sigma_max_hi"][i] - vals["sigma_max_lo"][i] for i in idx),
                "err_min": max(vals["sigma_min_hi"][i] - vals["sigma_min_lo"][i] for i in idx),
                "certified": all(vals["certified"][i] for i in idx),
                "fallback": any(vals["fallback"][i] for i in idx),
                "sparsity": tensor_sparsity(w),
            })
        return rows


def _kappa_eps(smax: float, smin: float, eps: float) -> float:
    return 1.0 if smax == 0 else smax / (max(smin, 0.0) + eps * smax)
