"""CNC penalty timing on SYNTHETIC drift: the easy case (``python benchmarks/run.py penalty ...``).

A freshly initialised dense network moved by random noise is the easiest input there is (well-conditioned, nothing
pruned, no structure in the drift); ``benchmarks/trajectory.py`` is the benchmark on weights recorded along real
training runs, pruning included. Times the CNC penalty value + gradient over the full layer set, side by side:
  fastcnc        the certified engine, warm-started (state from the previous step; the default TSCNC setting)
  eigvalsh-gram  eigvalsh of the smaller Gram matrix W W^T / W^T W in the weights' float32 (autograd through eigh):
                 the fastest baseline, not exact on ill-conditioned layers
  eigvalsh-gram64  the same with the Gram in float64: the exact one
  svdvals        exact: torch.linalg.svdvals (autograd through the SVD)
The weights of the timed call are the previous step's weights plus an SGD-sized drift, and fastcnc's kappa error is
measured against a float64 SVD of exactly those weights. Ratios are against the baselines timed in the same run.
"""

from __future__ import annotations

import statistics

import torch
from common import environment, exact_extreme_sigmas, time_call

from fastcnc.cnc import cnc_from_sigmas, cnc_penalty
from fastcnc.models import build_model
from fastcnc.reference import sigma_extremes_ref
from fastcnc.regularizer import constrained_layers
from fastcnc.spectral import SpectralState, as_matrices, extreme_singular_values
from fastcnc.spectral_math import kappa

IMPLS = ("fastcnc", "eigvalsh-gram", "eigvalsh-gram64", "svdvals")


def layer_matrices(model_name: str, device: str, dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """The CNC matrices (one per conv group) of a freshly initialised model, as leaf tensors."""
    torch.manual_seed(seed)
    model = build_model(model_name, num_classes=1000 if model_name == "resnet50" else 10,
                        stem="imagenet" if model_name == "resnet50" else "cifar")
    mats = []
    for _, layer in constrained_layers(model):
        mats += [m.detach().to(device=device, dtype=dtype).contiguous() for m in
                 as_matrices(layer.weight, getattr(layer, "groups", 1))]
    return mats


def drift(mats: list[torch.Tensor], scale: float = 1e-3, seed: int = 1) -> list[torch.Tensor]:
    """One SGD-sized step: every weight moves by ``scale`` times the layer's mean |w|, in a random direction."""
    g = torch.Generator(device=mats[0].device).manual_seed(seed)
    return [m + scale * m.abs().mean() * torch.randn(m.shape, generator=g, device=m.device, dtype=m.dtype)
            for m in mats]


def penalty_exact(mats: list[torch.Tensor], how: str) -> torch.Tensor:
    return cnc_from_sigmas(exact_extreme_sigmas(mats, how)).sum()


def make_step(impl: str, mats: list[torch.Tensor], **engine):
    """A closure computing penalty value + gradient for ``mats`` (leaf tensors with requires_grad)."""
    if impl == "fastcnc":
        state = SpectralState()
        extreme_singular_values(mats, state=state, refresh=True)  # the state left by the previous step

        def step():
            for m in mats:
                m.grad = None
            # the engine's options (iters, block, ...) go to the engine; the penalty takes its estimate, as TSCNC does
            with torch.no_grad():
                est = extreme_singular_values([m.detach() for m in mats], state=state, **engine)
            p = cnc_penalty(mats, estimate=est)
            p.backward()
            return p
        return step

    def step():
        for m in mats:
            m.grad = None
        p = penalty_exact(mats, impl)
        p.backward()
        return p
    return step


def kappa_errors(mats_prev: list[torch.Tensor], mats: list[torch.Tensor], **engine) -> tuple[torch.Tensor, dict]:
    """Relative kappa error of one warm-started call (state from mats_prev) on mats, vs a float64 SVD of mats, and
    the engine's work counters."""
    state = SpectralState()
    extreme_singular_values(mats_prev, state=state, refresh=True)
    est = extreme_singular_values(mats, state=state, **engine)
    true = torch.tensor([kappa(*sigma_extremes_ref(m)) for m in mats])
    return (est.kappa.cpu() / true - 1).abs(), est.work | {"certified": int(est.certified.sum())}


def bench_penalty(models: list[str], device: str, repeats: int, rtol: float, iters: int, block: int,
                  drift_scale: float = 1e-3) -> dict:
    from tqdm import tqdm

    engine = dict(rtol=rtol, iters=iters, block=block)
    rows = []
    for name in models:
        prev = layer_matrices(name, device)
        mats = [m.requires_grad_(True) for m in drift(prev, drift_scale)]
        err, work = kappa_errors(prev, [m.detach() for m in mats], **engine)
        times = {}
        for impl in tqdm(IMPLS, desc=f"{name}", leave=False):
            step = make_step(impl, mats, **engine) if impl == "fastcnc" else make_step(impl, mats)
            times[impl] = statistics.median(time_call(step, device, repeats))
        n_params = sum(m.numel() for m in mats)
        rows.append({
            "model": name, "layers": len(mats), "params": n_params,
            "ms": {k: v * 1e3 for k, v in times.items()},
            "speedup_vs_svdvals": times["svdvals"] / times["fastcnc"],
            "speedup_vs_eigvalsh": times["eigvalsh-gram"] / times["fastcnc"],
            "speedup_vs_eigvalsh64": times["eigvalsh-gram64"] / times["fastcnc"],
            "kappa_rel_err_max": float(err.max()), "kappa_rel_err_median": float(err.median()),
            "engine_work": work,
        })
    return {"benchmark": "cnc-penalty value+grad", **environment(device), "threads": torch.get_num_threads(),
            "engine": engine, "drift": drift_scale,
            "repeats": repeats, "rows": rows}


def to_markdown(res: dict) -> str:
    lines = [f"CNC penalty value+grad, full layer set, SYNTHETIC drift (the easy case; see the trajectory benchmark "
             f"for recorded training runs). Device: {res['device']}; date {res['date']}; commit "
             f"{res['commit']}; torch {res['torch']}; engine {res['engine']}; weight drift since the warm state "
             f"{res['drift']} x mean|w|; median of {res['repeats']}.", "",
             f"Threads: {res.get('threads', '-')}. eigvalsh-gram: the Gram in the weights' float32; "
             "eigvalsh-gram64: in float64.", "",
             "| model | matrices | params | fastcnc ms | eigvalsh-gram ms | eigvalsh-gram64 ms | svdvals ms | "
             "x vs svdvals | x vs eigvalsh-gram | x vs eigvalsh-gram64 | kappa rel err max (median) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        ms = r["ms"]
        lines.append(f"| {r['model']} | {r['layers']} | {r['params'] / 1e6:.1f}M | {ms['fastcnc']:.1f} | "
                     f"{ms['eigvalsh-gram']:.1f} | {ms['eigvalsh-gram64']:.1f} | {ms['svdvals']:.1f} | "
                     f"{r['speedup_vs_svdvals']:.1f} | {r['speedup_vs_eigvalsh']:.2f} | "
                     f"{r['speedup_vs_eigvalsh64']:.2f} | {r['kappa_rel_err_max']:.2e} "
                     f"({r['kappa_rel_err_median']:.1e}) |")
    return "\n".join(lines) + "\n"
