"""Trajectory benchmark: the CNC penalty's value+grad on weights recorded along real training runs.

Recording (cached under runs/trajectories/, deterministic): the project's own pieces (``fastcnc.models.build_model``,
the embedded digits via ``fastcnc.data``, SGD with Nesterov momentum, ``fastcnc.GradualPruner``, and ``fastcnc.TSCNC``
in the loss for ResNet-18) run a dense phase, gradual magnitude pruning to the target sparsity, then fine-tuning; the
effective weights W*M of every conv/linear layer are saved every ``record_every`` steps. Clean cross-entropy (no PGD)
keeps the CPU recording affordable; the pruning schedule, optimiser and regulariser are the main job's.

Evaluation, per recorded step and side by side in one run:
  fastcnc      the certified engine as TSCNC runs it on that device (warm state carried from the previous snapshot,
               so the drift between two calls is ``record_every`` training steps: harder than training itself);
               the 1-step column (warm from one training step back, as in training) replays a captured CUDA graph
               on CUDA, as TSCNC does (the copy of the warm state into the graph's buffers is timed too), with two
               sync-free rounds (TSCNC runs one while the previous call's first round certified every layer)
  eigh64       exact penalty through torch.linalg.eigvalsh of the float64 small-side Gram, autograd backward
  eigh64r      eigh64 after each matrix's zero rows and columns are dropped (pruning empties whole inputs and
               outputs), through the smaller Gram of what is left, per matrix; sigma_min = 0 where fewer rows or
               columns remain than the small side (the zero pattern alone makes the matrix rank-deficient): what a
               user who knows the tricks would write (fastcnc does both, on CPU)
  eigh32       the same in float32 (faster, but fp32 rounding of the Gram swamps sigma_min^2 once kappa >~ 300)
  svdvals      torch.linalg.svdvals of the weights (their dtype), autograd backward
Every method's kappa is compared with float64 SVD (not timed) for every layer; fastcnc also reports its certified
bracket, certification flags, fallbacks and work. Baselines are batched per shape group, like the engine.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import common
import torch
import torch.nn.functional as F
from common import environment, write_result

import fastcnc
from fastcnc.cnc import penalty_from_estimate
from fastcnc.data import load_dataset
from fastcnc.graphed import GraphedEngine
from fastcnc.models import build_model
from fastcnc.pruning import GradualPruner
from fastcnc.regularizer import TSCNC, constrained_layers
from fastcnc.spectral import SpectralState, as_matrices, extreme_singular_values

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "runs" / "trajectories"
EPS = 1e-6  # the CNC floor (TSCNC's default eps)
METHODS = ("fastcnc", "eigh64", "eigh64r", "eigh32", "svdvals")
STEP = "fastcnc-1step"  # fastcnc warm from the previous training step (what TSCNC sees), not the previous snapshot
_FORMAT = 2  # snapshot format (2: each snapshot after the first also holds the weights one step before it)


@dataclass(frozen=True)
class Run:
    """One recorded training run."""

    model: str
    width: int
    sparsity: float
    dense_steps: int
    prune_steps: int
    finetune_steps: int
    record_every: int
    batch_size: int = 32
    tscnc: bool = True  # TSCNC(lambda_tsc=1e-5, lambda_cnc=1e-3) in the loss while recording
    lr: float = 0.05
    prune_every: int = 2  # steps between two gradual mask updates (each one costs TSCNC an exact refresh)
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.model}-w{self.width}-s{round(self.sparsity * 100)}"

    @property
    def steps(self) -> int:
        return self.dense_steps + self.prune_steps + self.finetune_steps

    def phase(self, step: int) -> str:
        if step < self.dense_steps:
            return "dense"
        return "pruning" if step < self.dense_steps + self.prune_steps else "finetune"


PRESETS = {
    # CPU-sized: every phase covered, full-width runs shorter
    "cpu": [
        Run("resnet18", 16, 0.95, 10, 30, 10, 5), Run("resnet18", 16, 0.99, 10, 30, 10, 5),
        Run("resnet18", 64, 0.95, 6, 18, 6, 6), Run("resnet18", 64, 0.99, 6, 18, 6, 6),
        Run("resnet50", 64, 0.95, 2, 8, 2, 4, batch_size=8, tscnc=False),
        Run("resnet50", 64, 0.99, 2, 8, 2, 4, batch_size=8, tscnc=False),
    ],
    # for the GPU session (sized to finish in < 3 min on an H100, recording included)
    "gpu": [
        Run("resnet18", 64, 0.95, 10, 30, 10, 10, prune_every=5),
        Run("resnet18", 64, 0.99, 10, 30, 10, 10, prune_every=5),
        Run("resnet50", 64, 0.95, 4, 16, 4, 8, batch_size=16, prune_every=4),
        Run("resnet50", 64, 0.99, 4, 16, 4, 8, batch_size=16, prune_every=4),
    ],
    # seconds: the pytest-benchmark smoke test and CI
    "tiny": [Run("resnet18", 16, 0.95, 2, 4, 2, 2, batch_size=16)],
}


# ------------------------------------------------------------------------------------------------ recording


def _cache_path(run: Run, device: str) -> Path:
    key = "-".join(f"{v}" for v in [*asdict(run).values(), _FORMAT])  # (hashlib: str hashes are salted per process)
    return CACHE / f"{run.name}-{device}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt"


def record(run: Run, device: torch.device, *, refresh: bool = False, log=print) -> list[dict]:
    """Snapshots [{step, phase, sparsity, names, weights (CPU fp32, W*M per layer), groups, prev_weights (the
    weights one training step earlier; absent in the first snapshot)}] of one run (cached)."""
    path = _cache_path(run, device.type)
    if path.exists() and not refresh:
        return torch.load(path, weights_only=False)
    torch.manual_seed(run.seed)
    data = load_dataset("digits")
    x_all = data.x_train.repeat(1, 3, 1, 1).to(device)  # 3 channels: the first conv is the CIFAR 64x27 one
    y_all = data.y_train.to(device)
    model = build_model(run.model, data.num_classes, in_channels=3, width=run.width).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=run.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    pruner = GradualPruner(model, run.sparsity, start_step=run.dense_steps,
                           end_step=run.dense_steps + run.prune_steps - 1, frequency=run.prune_every)
    reg = TSCNC(model, lambda_tsc=1e-5, lambda_cnc=1e-3) if run.tscnc else None
    gen = torch.Generator().manual_seed(run.seed)
    layers = constrained_layers(model)
    snaps, t0, before = [], time.perf_counter(), None

    def recorded(step: int) -> bool:
        return step % run.record_every == 0 or step == run.steps

    for step in range(run.steps + 1):
        if recorded(step):
            weights = [_effective(m).detach().float().cpu().clone() for _, m in layers]
            total = sum(w.numel() for w in weights)
            snaps.append({"step": step, "phase": run.phase(min(step, run.steps - 1)),
                          "sparsity": sum(int((w == 0).sum()) for w in weights) / total,
                          "names": [n for n, _ in layers], "weights": weights,
                          "groups": [getattr(m, "groups", 1) for _, m in layers]})
            if before is not None:
                snaps[-1]["prev_weights"] = before
        if step == run.steps:
            break
        before = [_effective(m).detach().float().cpu().clone() for _, m in layers] if recorded(step + 1) else None
        pruner.step(step)
        idx = torch.randint(0, len(y_all), (run.batch_size,), generator=gen).to(device)
        model.train()
        ce = F.cross_entropy(model(x_all[idx]), y_all[idx])
        penalty = reg() if reg is not None else ce.new_zeros(())
        opt.zero_grad(set_to_none=True)
        (ce + penalty).backward()
        _check_finite(run, step, layers, ce, penalty)  # (a host sync per step: recording is not timed)
        opt.step()
        _apply_masks(model)
    log(f"recorded {run.name}: {run.steps} steps, {len(snaps)} snapshots, {time.perf_counter() - t0:.1f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(snaps, path)
    return snaps


def _check_finite(run: Run, step: int, layers, ce: torch.Tensor, penalty: torch.Tensor) -> None:
    """Stop a recording at the first non-finite loss or gradient, naming the term and the layers it reached."""
    grads = [m.weight.grad for _, m in layers]
    ok = torch.stack([torch.isfinite(ce), torch.isfinite(penalty)]
                     + [torch.isfinite(g).all() if g is not None else ce.new_ones((), dtype=torch.bool)
                        for g in grads]).tolist()
    if all(ok):
        return
    bad = [n for (n, _), good in zip(layers, ok[2:], strict=True) if not good]
    raise FloatingPointError(f"recording {run.name}: step {step}: cross-entropy {float(ce):.4g}, regulariser "
                             f"{float(penalty):.4g}, non-finite weight gradients in {bad}")


def _effective(layer):
    return layer.effective_weight() if hasattr(layer, "effective_weight") else layer.weight


@torch.no_grad()
def _apply_masks(model) -> None:
    for m in model.modules():
        if isinstance(getattr(m, "mask", None), torch.Tensor):
            m.weight.mul_(m.mask)


# ------------------------------------------------------------------------------------------------ methods


def _matrices(snap: dict, device: torch.device, key: str = "weights") -> list[torch.Tensor]:
    mats = []
    for w, g in zip(snap[key], snap["groups"], strict=True):
        mats.extend(as_matrices(w.to(device), g))
    return mats


def _log_kappa(smax: torch.Tensor, smin: torch.Tensor) -> torch.Tensor:
    return torch.log(smax / (smin.clamp_min(0) + EPS * smax))


_BASELINE_PER_MATRIX = 1 << 17  # entries from which the CPU baselines run one matrix at a time (faster there)


def _exact_method(mats: list[torch.Tensor], kind: str) -> tuple[torch.Tensor, list[float]]:
    """Penalty sum and per-matrix kappa via eigvalsh of the small-side Gram (float64/float32; eigh64r: float64, zero
    rows dropped) or svdvals."""
    total = mats[0].new_zeros((), dtype=torch.float64)
    kappas: list = [None] * len(mats)
    if kind == "eigh64r":  # per matrix: the counts of nonzero rows and columns differ
        for i, w in enumerate(mats):
            A = w.to(torch.float64)
            n = min(A.shape)
            nz = A != 0
            A = A[nz.any(1)][:, nz.any(0)]
            if A.numel() == 0:  # all zero: kappa 1, no penalty
                kappas[i] = (A.new_zeros(()), A.new_zeros(()))
                continue
            G = A @ A.mT if A.shape[0] <= A.shape[1] else A.mT @ A  # the smaller Gram
            lam = torch.linalg.eigvalsh(G)
            smax = lam[-1].clamp_min(0).sqrt()
            smin = lam[0].clamp_min(0).sqrt() if min(A.shape) == n else smax.new_zeros(())  # (pattern: rank < n)
            total = total + _log_kappa(smax, smin).double()
            kappas[i] = (smax, smin)
        return total, kappas
    for idx in common.indices_by_shape(mats):
        # the faster of the two ways a user could write it: one batched call per shape for small matrices, one call
        # per matrix for large ones on CPU (autograd through a batched Gram of 3 x 512 x 4608 float64 is 1.4x slower
        # than three products: its backward's bmm and accumulation; measured in docs/spectral.md)
        per_matrix = mats[idx[0]].device.type == "cpu" and mats[idx[0]].numel() >= _BASELINE_PER_MATRIX
        for part in ([[i] for i in idx] if per_matrix else [idx]):
            W = mats[part[0]][None] if per_matrix else torch.stack([mats[i] for i in part])
            if per_matrix:  # 2-D ops (a batch of one still pays the batched backward)
                W = W[0]
            if kind == "svdvals":
                s = torch.linalg.svdvals(W)
                smax, smin = s[..., 0], s[..., -1]
            else:
                A = W.to(torch.float64 if kind == "eigh64" else torch.float32)
                G = A.mT @ A if A.shape[-2] >= A.shape[-1] else A @ A.mT
                lam = torch.linalg.eigvalsh(G)
                smax, smin = lam[..., -1].clamp_min(0).sqrt(), lam[..., 0].clamp_min(0).sqrt()
            total = total + _log_kappa(smax, smin).double().sum()
            smax, smin = smax.reshape(-1), smin.reshape(-1)
            for j, i in enumerate(part):
                kappas[i] = (smax[j], smin[j])
    return total, kappas


def _time_exact(mats, kind, device):
    """(seconds, kappa_eps per matrix), or (nan, None) where the LAPACK/cuSOLVER routine gave up (it does: eigh
    fails to converge on some pruned layers' Grams)."""
    leaves = [m.detach().clone().requires_grad_() for m in mats]
    common.sync(device)
    t = time.perf_counter()
    try:
        total, sig = _exact_method(leaves, kind)
        total.backward()
    except torch.linalg.LinAlgError:
        return math.nan, None
    common.sync(device)
    dt = time.perf_counter() - t
    return dt, [float(a) / (float(b) + EPS * float(a)) if float(a) > 0 else 1.0 for a, b in
                ((a.detach(), b.detach()) for a, b in sig)]


def _time_fastcnc(mats, state: SpectralState, device, refresh, graphed: GraphedEngine | None = None):
    """What TSCNC does per step: synchronous certificates on CPU; on CUDA two fixed sync-free rounds, and the
    matrices whose certificate failed at the previous call recomputed exactly (``refresh``); with ``graphed`` (CUDA,
    already captured for these shapes) the call is a replay of the captured graph, as TSCNC's default."""
    leaves = [m.detach().clone().requires_grad_() for m in mats]
    sync = device.type != "cuda"
    common.sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        est = graphed([m.detach() for m in leaves], state) if graphed is not None and refresh is False else None
        if est is None:
            est = extreme_singular_values([m.detach() for m in leaves], floor=EPS, state=state, sync=sync,
                                          refresh=refresh)
    p = penalty_from_estimate(leaves, est, eps=EPS, from_these_weights=True)
    p.backward()
    common.sync(device)
    return time.perf_counter() - t, est


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate(run: Run, snaps: list[dict], device: torch.device, *, repeats: int = 1, log=print) -> dict:
    state = SpectralState()
    steps, refresh, prev = [], False, None
    for k, snap in enumerate(snaps):
        mats = _matrices(snap, device)
        ref = [torch.linalg.svdvals(m.double().cpu()) for m in mats]
        ref_kappa = [float(s[0] / s[-1]) if float(s[-1]) > 0 else math.inf for s in ref]
        ref_kfloor = [float(s[0] / (s[-1] + EPS * s[0])) if float(s[0]) > 0 else 1.0 for s in ref]  # 1: all-zero
        times, kappa_err = {}, {}
        failed = []
        for kind in ("eigh64", "eigh64r", "eigh32", "svdvals"):
            best, kap = math.inf, None
            for _ in range(repeats):
                dt, kap = _time_exact(mats, kind, device)
                best = min(best, dt)
            times[kind] = best
            if kap is None:
                failed.append(kind)
                kappa_err[kind] = math.inf
            else:
                kappa_err[kind] = max(_rel(a, b) for a, b in zip(kap, ref_kfloor, strict=True))
        if k == 0:  # the state a training run would hold: warm from the first snapshot on (the first call is cold)
            extreme_singular_values([m.detach() for m in mats], floor=EPS, state=state)
        best, est = math.inf, None
        for _ in range(repeats):
            trial = copy.deepcopy(state)
            dt, est = _time_fastcnc(mats, trial, device, refresh)
            best = min(best, dt)
        one_step = _time_one_step(snap, state, device, refresh, repeats, ref_kfloor) if k > 0 else None
        state = trial
        late = sum(refresh) if isinstance(refresh, list) else 0
        flags = est.certified.tolist()  # read after the timed call (TSCNC reads them one step late on CUDA)
        refresh = [not c for c in flags] if not all(flags) else False
        times["fastcnc"] = best
        smax, smin = est.sigma_max.tolist(), est.sigma_min.tolist()
        kfloor = [a / (b + EPS * a) if a > 0 else 1.0 for a, b in zip(smax, smin, strict=True)]
        errs = [_rel(a, b) for a, b in zip(kfloor, ref_kfloor, strict=True)]
        smax_errs = [_rel(a, float(r[0])) for a, r in zip(smax, ref, strict=True)]
        certified = est.certified.tolist()
        layers = []
        lo_min, hi_min = est.sigma_min_lo.tolist(), est.sigma_min_hi.tolist()
        lo_max, hi_max = est.sigma_max_lo.tolist(), est.sigma_max_hi.tolist()
        contains = []
        for i, m in enumerate(mats):
            s0, s1 = float(ref[i][0]), float(ref[i][-1])
            slack = 1e-13 * s0
            ok = lo_min[i] - slack <= s1 <= hi_min[i] + slack and lo_max[i] - slack <= s0 <= hi_max[i] + slack
            contains.append(ok)
            layers.append({"shape": list(m.shape), "kappa_exact": ref_kappa[i], "kappa_eps_exact": ref_kfloor[i],
                           "kappa_eps_est": kfloor[i], "rel_err": errs[i], "sigma_max_rel_err": smax_errs[i],
                           "certified": certified[i],
                           "fallback": bool(est.fallback[i]), "structural": bool(est.structural[i]),
                           "bracket_contains_truth": ok, "sigma_min_bracket": [lo_min[i], hi_min[i]],
                           "sigma_max_bracket": [lo_max[i], hi_max[i]]})
        kappa_err["fastcnc"] = max(errs)
        times[STEP], kappa_err[STEP] = (one_step[0], one_step[1]) if one_step else (math.nan, math.nan)
        weyl = _weyl_carry(prev, mats, run.record_every, est.rtol) if prev is not None else None
        prev = (mats, lo_min, hi_min, lo_max, hi_max)
        row = {"step": snap["step"], "phase": snap["phase"], "sparsity": snap["sparsity"], "matrices": len(mats),
               "kappa_exact_max": max(ref_kappa), "times_s": times, "kappa_rel_err_max": kappa_err,
               "sigma_max_rel_err_max": max(smax_errs), "structural": int(est.structural.sum()),
               "baseline_failures": failed,
               "certified": sum(certified), "brackets_contain_truth": sum(contains),
               "certified_1step": one_step[2] if one_step else None,
               "certified_1step_one_round": one_step[3] if one_step else None,
               "fallbacks": est.work["fallbacks"], "refreshed_after_failed_certificate": late,
               "rounds": est.work["rounds"],
               "factorizations": est.work["factorizations"], "weyl_carry_would_certify": weyl, "layers": layers}
        steps.append(row)
        log(f"  {run.name} step {snap['step']:4d} {snap['phase']:8s} sparsity {snap['sparsity']:.3f} "
            f"kappa_max {max(ref_kappa):9.3g} | fastcnc err {kappa_err['fastcnc']:.1e} cert {sum(certified)}/"
            f"{len(mats)} fb {est.work['fallbacks']} rounds {est.work['rounds']} | "
            + " ".join(f"{k} {times[k] * 1e3:7.1f} ms" for k in (*METHODS, STEP)))
    return {"run": asdict(run) | {"name": run.name}, "steps": steps, "summary": _summary(steps)}


def _time_one_step(snap: dict, state: SpectralState, device, refresh, repeats: int, ref_kfloor: list[float]):
    """fastcnc as TSCNC runs it in training: warm from the weights one step before this snapshot (the state is brought
    there by an untimed call from the previous snapshot's). Returns (seconds, max kappa_eps error, certified count)."""
    warm = copy.deepcopy(state)
    with torch.no_grad():
        extreme_singular_values(_matrices(snap, device, "prev_weights"), floor=EPS, state=warm, refresh=refresh)
    mats = _matrices(snap, device)
    graphed = None
    if device.type == "cuda":  # TSCNC replays a graph captured once per run; the capture is not part of a step
        graphed = GraphedEngine(dict(floor=EPS))
        graphed(mats, copy.deepcopy(warm))
    best, est = math.inf, None
    for _ in range(repeats):
        dt, est = _time_fastcnc(mats, copy.deepcopy(warm), device, False, graphed)
        best = min(best, dt)
    smax, smin = est.sigma_max.tolist(), est.sigma_min.tolist()
    err = max(_rel(a / (b + EPS * a) if a > 0 else 1.0, r) for a, b, r in zip(smax, smin, ref_kfloor, strict=True))
    # how often one sync-free round would do (TSCNC on CUDA runs one while the previous call's first round
    # certified every layer): untimed, from the same warm state
    with torch.no_grad():
        one = extreme_singular_values(mats, floor=EPS, state=copy.deepcopy(warm), sync=False, max_rounds=1)
    return best, err, int(est.certified.sum()), int(one.certified.sum())


def _weyl_carry(prev, mats, steps_between: int, rtol: float) -> float:
    """Fraction of matrices whose previous certified bracket, widened by one training step's drift (Weyl:
    |sigma_i(A + dA) - sigma_i(A)| <= |dA|_2 <= |dA|_F, with |dA|_F estimated as the drift between the two snapshots
    divided by the steps between them), would still certify kappa_eps to rtol: how often a certificate carried from
    step to step could skip the Gram."""
    old, lo_min, hi_min, lo_max, hi_max = prev
    ok = 0
    for i, (a, b) in enumerate(zip(old, mats, strict=True)):
        d = float((b.double() - a.double()).norm()) / steps_between
        smin_lo, smin_hi = max(lo_min[i] - d, 0.0), hi_min[i] + d
        smax_lo, smax_hi = max(lo_max[i] - d, 0.0), hi_max[i] + d
        if smax_lo <= 0:
            continue
        ok += (smin_hi / smax_lo + EPS) <= (1 + rtol) * (smin_lo / smax_hi + EPS)
    return ok / len(mats)


def _rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a / b - 1)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _median(xs: list[float]) -> float:
    ok = sorted(x for x in xs if math.isfinite(x))
    return ok[len(ok) // 2] if ok else math.nan


def _median_times(steps: list[dict]) -> dict:
    med = {}
    for k in (*METHODS, STEP):
        ok = sorted(s["times_s"][k] for s in steps if math.isfinite(s["times_s"][k]))
        med[k] = ok[len(ok) // 2] if ok else math.nan
    return med


def _summary(steps: list[dict]) -> dict:
    n = sum(s["matrices"] for s in steps)
    med = _median_times(steps)
    one = [s for s in steps if s.get("certified_1step") is not None]
    # each 1-step ratio over the snapshots where both times exist (the first, cold snapshot has no 1-step time; a
    # baseline that failed at a snapshot has none there)
    med_one = {k: _median_times([s for s in one if math.isfinite(s["times_s"][k])]) for k in METHODS}
    return {
        "snapshots": len(steps), "matrix_evaluations": n,
        "sigma_max_rel_err_max": max(s["sigma_max_rel_err_max"] for s in steps),
        "kappa_rel_err_max": {k: max(s["kappa_rel_err_max"][k] for s in steps) for k in METHODS}
        | {STEP: max((s["kappa_rel_err_max"][STEP] for s in one), default=math.nan)},
        "certified_fraction_1step_one_round": (sum(s["certified_1step_one_round"] for s in one)
                                               / sum(s["matrices"] for s in one) if one else math.nan),
        "certified_fraction_1step": (sum(s["certified_1step"] for s in one) / sum(s["matrices"] for s in one)
                                     if one else math.nan),
        "speedup_median_1step": {k: med_one[k][k] / med_one[k][STEP] for k in METHODS if k != "fastcnc"},
        # per snapshot the faster of the two float64 exact baselines (the strongest a user could pick), then the median
        "speedup_median_1step_best": _median([
            min((t for t in (s["times_s"]["eigh64"], s["times_s"]["eigh64r"]) if math.isfinite(t)), default=math.nan)
            / s["times_s"][STEP] for s in one]),
        "certified_fraction": sum(s["certified"] for s in steps) / n,
        "brackets_contain_truth_fraction": sum(s["brackets_contain_truth"] for s in steps) / n,
        "fallbacks": sum(s["fallbacks"] for s in steps),
        "weyl_carry_would_certify": _mean([s["weyl_carry_would_certify"] for s in steps[1:]]),
        "median_time_s": med,
        "speedup_median": {k: med[k] / med["fastcnc"] for k in METHODS if k != "fastcnc"},
        "baseline_failures": {k: sum(k in s["baseline_failures"] for s in steps) for k in METHODS},
    }


# ------------------------------------------------------------------------------------------------ report


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# Trajectory benchmark: CNC value+grad along recorded training runs ({meta['device']})", "",
             f"date {meta['date']} {meta['time']}, commit {meta['commit']}, torch {meta['torch']}, "
             f"preset `{meta['preset']}`, CPU threads {meta['threads']}, wall {meta['wall_s']:.0f} s, "
             f"repeats {meta['repeats']} (min). Times are for all layers of the model together (one value+grad).",
             "kappa error: relative error of kappa_eps = sigma_max / (sigma_min + 1e-6 sigma_max) (the quantity the "
             "penalty uses) vs float64 SVD, max over every layer and every recorded step; `inf` where the routine "
             "failed (eigh not converging) at some step (count in the JSON, `baseline_failures`).", "",
             "sigma_max err: relative error of fastcnc's sigma_max, max over layers and steps (for a structurally "
             "rank-deficient layer, kappa_eps = 1/eps exactly and sigma_max is an uncertified power-iteration value "
             "with a proven lower bound and a loose proven upper bound; see `tight_max`).", "",
             "| run | snapshots | kappa_max (exact) | fastcnc err | sigma_max err | certified | brackets hold | "
             "fallbacks | "
             "Weyl carry | eigh64 err | eigh32 err | svdvals err | fastcnc ms | eigh64 ms | eigh64r ms | eigh32 ms | "
             "svdvals ms | x vs eigh64 | x vs eigh64r | x vs eigh32 | x vs svdvals | 1-step: ms | err | certified | "
             "1 round certified | x vs eigh64 | x vs eigh64r | x vs best exact | x vs svdvals |", "|---" * 29 + "|"]
    for r in result["runs"]:
        s, e, t, x = r["summary"], r["summary"]["kappa_rel_err_max"], r["summary"]["median_time_s"], r[
            "summary"]["speedup_median"]
        kmax = max(st["kappa_exact_max"] for st in r["steps"])
        lines.append(f"| {r['run']['name']} | {s['snapshots']} | {kmax:.3g} | {e['fastcnc']:.1e} | "
                     f"{s['sigma_max_rel_err_max']:.1e} | "
                     f"{s['certified_fraction']:.1%} | {s['brackets_contain_truth_fraction']:.1%} | {s['fallbacks']} "
                     f"| {s['weyl_carry_would_certify']:.1%} "
                     f"| {e['eigh64']:.1e} | {e['eigh32']:.1e} | {e['svdvals']:.1e} | {t['fastcnc'] * 1e3:.1f} | "
                     f"{t['eigh64'] * 1e3:.1f} | {t['eigh64r'] * 1e3:.1f} | {t['eigh32'] * 1e3:.1f} | "
                     f"{t['svdvals'] * 1e3:.1f} | {x['eigh64']:.2f} | {x['eigh64r']:.2f} | {x['eigh32']:.2f} | "
                     f"{x['svdvals']:.2f} | {t[STEP] * 1e3:.1f} | {e[STEP]:.1e} | "
                     f"{s['certified_fraction_1step']:.1%} | {s['certified_fraction_1step_one_round']:.1%} | "
                     f"{s['speedup_median_1step']['eigh64']:.2f} | "
                     f"{s['speedup_median_1step']['eigh64r']:.2f} | {s['speedup_median_1step_best']:.2f} | "
                     f"{s['speedup_median_1step']['svdvals']:.2f} |")
    lines += ["", "Times are medians over the recorded steps. fastcnc is warm-started from the previous recorded "
              "snapshot (several steps and a pruning event back: harder than training); the 1-step columns warm-start "
              "it from the weights one training step before each snapshot, as TSCNC runs in training (first "
              "snapshot: cold, left out; each 1-step ratio is over the snapshots where both times exist); "
              "'x vs best exact': per snapshot the faster of eigh64 and eigh64r (a failed one left out), then the "
              "median over the snapshots; "
              "'1 round certified': the fraction certified by one sync-free round from the same warm state (untimed; "
              "TSCNC on CUDA runs one while the previous call's first round certified every layer). Per step and per "
              "layer: the JSON file next to this one. Weyl carry: fraction of layers whose previous certified "
              "bracket, widened by one training step's drift, would still certify (how often carrying a certificate "
              "could skip the Gram).", ""]
    for r in result["runs"]:
        lines += [f"## {r['run']['name']}", "", "| step | phase | sparsity | kappa_max | fastcnc err | sigma_max err | "
                  "structural | certified | fallbacks | rounds | fastcnc ms | 1-step ms | eigh64 ms | eigh64r ms | "
                  "eigh32 ms | svdvals ms | eigh32 err |", "|---" * 17 + "|"]
        for st in r["steps"]:
            t = st["times_s"]
            lines.append(f"| {st['step']} | {st['phase']} | {st['sparsity']:.3f} | {st['kappa_exact_max']:.3g} | "
                         f"{st['kappa_rel_err_max']['fastcnc']:.1e} | {st['sigma_max_rel_err_max']:.1e} | "
                         f"{st['structural']} | {st['certified']}/{st['matrices']} | "
                         f"{st['fallbacks']} | {st['rounds']} | {t['fastcnc'] * 1e3:.1f} | {t[STEP] * 1e3:.1f} | "
                         f"{t['eigh64'] * 1e3:.1f} | {t['eigh64r'] * 1e3:.1f} | {t['eigh32'] * 1e3:.1f} | "
                         f"{t['svdvals'] * 1e3:.1f} | "
                         f"{st['kappa_rel_err_max']['eigh32']:.1e} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python benchmarks/run.py trajectory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="run list (default: cpu or gpu by device)")
    p.add_argument("--runs", default="", help="comma-separated run names to keep (e.g. resnet18-w16-s95)")
    p.add_argument("--repeats", type=int, default=1, help="timed repetitions per method and step (min is kept)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default: 1 on CPU, stable on a shared machine; untouched on CUDA)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the JSON and markdown")
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--rerecord", action="store_true", help="record the trajectories again (ignore the cache)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    runs = PRESETS[preset]
    if args.runs:
        keep = set(args.runs.split(","))
        runs = [r for r in runs if r.name in keep]
        if not runs:
            p.error(f"--runs {args.runs!r} names none of the preset's runs: {[r.name for r in PRESETS[preset]]}")
    t0 = time.perf_counter()
    results = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"trajectory-{device.type}{('-' + args.tag) if args.tag else ''}"
    for run in runs:
        snaps = record(run, device, refresh=args.rerecord)
        results.append(evaluate(run, snaps, device, repeats=args.repeats))
        # written after every run, so a time limit keeps what was measured
        meta = environment(device) | {
            "time": _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M UTC"), "fastcnc": fastcnc.__version__,
            "preset": preset, "repeats": args.repeats, "threads": torch.get_num_threads(),
            "wall_s": time.perf_counter() - t0}
        result = {"meta": meta, "runs": results}
        write_result(out, stem, result, markdown(result))
    print(markdown(result).split("\n\n## ")[0])
    print(f"wrote {out / stem}.json/.md in {meta['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
