"""The engine's float64 Cholesky factorizations by route, on the batches one TSCNC step factors, then the whole TSCNC
step under each route, in one run.

    python benchmarks/cholesky_routes.py [--model resnet50] [--sparsity 0.95] [--repeats 20] [--out DIR]

Part 1 (kernels): the model's matrices, pruned to ``--sparsity``, bucketed as the CUDA engine batches them
(``spectral._batch_n``; a batch's n is its largest member's), each batch as ``[4 b, n, n]`` (the sync-free step
factors four shifted copies of every matrix twice per call: the first factor's shifts and the certificate's pairs)
of the layers' own float64 Grams scaled to lambda_max ~ 1 plus 1e-3 I, factored by
  batched        ``torch.linalg.cholesky_ex`` on the whole batch (cuSOLVER's potrfBatched): the default
  halves S/L     ``spectral._chol`` recursing on halves above n = S down to leaves of L (``_CHOL_HALVES``)
  looped         ``cholesky_ex`` per matrix (cuSOLVER's potrf)
  magma          the batched call with ``torch.backends.cuda.preferred_linalg_library("magma")`` (where it exists)
On CUDA each is captured in a CUDA graph and replayed (device time: the engine runs from a graph); medians of
``--repeats``; ``max diff`` is the largest difference from the batched factor relative to its largest entry.

Part 2 (step): ``tscnc_step.py``'s fastcnc step (``TSCNC(model)()`` + backward, warm, replayed as a graph on CUDA)
with each Cholesky route set in turn on the same weights: median ms, and what the timed calls did (late
certificates, exact refreshes, one-round calls) and how far each estimate is from the first route's.

Measured on an H200 (benchmarks/results/gpu-2026-11-27-h200-s12-start/): the batched call won at every n, so it is
the CUDA default.

Part 3 (CUDA): ``tscnc_step.py``'s whole row (graph, eager, two rounds, host syncs, eigvalsh-of-Gram and svdvals in
the same run) with the fastest route of part 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import traceback
from pathlib import Path

import torch
from common import environment, graph_replay_ms, sync, time_ms
from tscnc_step import _layers, _run_fastcnc, measure

import fastcnc
from fastcnc import as_matrices, spectral

HALVES = [(64, 64), (128, 64), (128, 128), (256, 128), (256, 256)]  # (split above n, leaf) timed per batch
STEP_ROUTES = [None, (128, 64), (128, 128), (256, 128), (256, 256)]


def replay_ms(fn, device: str, repeats: int) -> tuple[list[float], str]:
    """Per-call ms of ``fn`` replayed from a CUDA graph (eagerly where capture fails, or on CPU)."""
    if device != "cuda":
        return time_ms(fn, device, repeats)[0], "eager"
    try:
        return graph_replay_ms(fn, repeats), "graph"
    except RuntimeError as err:
        print(f"  (capture failed, timed eagerly: {str(err).splitlines()[0][:120]})")
        torch.cuda.synchronize()
        return time_ms(fn, device, repeats)[0], "eager"


def batches_of(model, device: str) -> dict[int, list[torch.Tensor]]:
    """float64 Grams of the model's matrices (small side), keyed by the engine's CUDA batch n."""
    grams: dict[int, list[torch.Tensor]] = {}
    for m in _layers(model):
        for W in as_matrices(m.weight.detach(), getattr(m, "groups", 1)):
            A = W.to(device=device, dtype=torch.float64)
            G = A.mT @ A if A.shape[0] >= A.shape[1] else A @ A.mT
            grams.setdefault(spectral._batch_n(G.shape[0], 4), []).append(G / G.diagonal().sum().clamp_min(1e-300))
    out = {}
    for _, gs in sorted(grams.items()):
        n = max(G.shape[0] for G in gs)
        H = torch.eye(n, dtype=torch.float64, device=device).repeat(len(gs), 1, 1)
        for i, G in enumerate(gs):
            H[i, :G.shape[0], :G.shape[0]] = G
        H.diagonal(dim1=-2, dim2=-1).add_(1e-3)
        out[n] = H
    return out


def routes_for(H4: torch.Tensor, key: str) -> dict:
    """name -> call: the factorizations of ``H4`` by each route."""
    n = H4.shape[-1]

    def halves(split, leaf):
        def call():
            spectral._CHOL_HALVES[key] = (split, leaf)
            return spectral._chol(H4.clone())[0]
        return call

    def magma():
        torch.backends.cuda.preferred_linalg_library("magma")
        try:
            return torch.linalg.cholesky_ex(H4.clone(), check_errors=False)[0]
        finally:
            torch.backends.cuda.preferred_linalg_library("default")

    routes = {"batched": lambda: torch.linalg.cholesky_ex(H4.clone(), check_errors=False)[0]}
    routes.update({f"halves {s}/{f}": halves(s, f) for s, f in HALVES if n > s})
    routes["looped"] = lambda: torch.stack([torch.linalg.cholesky_ex(h, check_errors=False)[0] for h in H4])
    if key == "cuda":
        routes["magma"] = magma
    return routes


def kernel_table(model, device: str, repeats: int) -> tuple[list[dict], str]:
    rows = []
    md = ("| n | matrices | route | ms | vs batched | max diff | timed as |\n|---|---|---|---|---|---|---|\n")
    key = "cuda" if device == "cuda" else "cpu"
    saved = spectral._CHOL_HALVES[key]
    for n, H in batches_of(model, device).items():
        H4 = H.repeat(4, 1, 1)
        ref, _ = torch.linalg.cholesky_ex(H4)
        base = None
        for name, fn in routes_for(H4, key).items():
            try:
                got = fn()
                diff = float((got.tril() - ref).abs().max() / ref.abs().max())
                if name == "magma":  # (its calls may synchronise: a failed capture could poison the stream)
                    ms, how = time_ms(fn, device, repeats)[0], "eager"
                else:
                    ms, how = replay_ms(fn, device, repeats)
            except RuntimeError as err:
                md += f"| {n} | {H.shape[0]} | {name} | failed: {str(err).splitlines()[0][:80]} | | | |\n"
                continue
            finally:
                spectral._CHOL_HALVES[key] = saved
            med = statistics.median(ms)
            base = med if name == "batched" else base
            rows.append({"n": n, "matrices": H.shape[0], "factored": H4.shape[0], "route": name, "ms_median": med,
                         "ms_all": ms, "max_rel_diff": diff, "timed_as": how})
            md += f"| {n} | {H.shape[0]} | {name} | {med:.3f} | {base / med:.2f}x | {diff:.1e} | {how} |\n"
            print(md.splitlines()[-1], flush=True)
    return rows, md


def step_table(model, device: str, repeats: int, warmup: int) -> tuple[list[dict], str]:
    rows, first = [], None
    md = ("| Cholesky route | step ms | vs first | host ms | late | refreshed | one-round calls | "
          "max rel diff of sigmas |\n|---|---|---|---|---|---|---|---|\n")
    key = "cuda" if device == "cuda" else "cpu"
    saved = spectral._CHOL_HALVES[key]
    for route in STEP_ROUTES:
        spectral._CHOL_HALVES[key] = route if route is not None or key == "cuda" else saved
        try:
            _, reg, t_dev, t_host, work = _run_fastcnc(model, device, repeats, warmup, cuda_graph=True)
            est = reg.last_estimate
            sigmas = torch.stack([est.sigma_max, est.sigma_min]).double().cpu()
        finally:
            spectral._CHOL_HALVES[key] = saved
        med = statistics.median(t_dev)
        if first is None:
            first = (med, sigmas)
        diff = float(((sigmas - first[1]).abs() / first[1].abs().clamp_min(1e-300)).max())
        name = "batched" if route is None else f"halves {route[0]}/{route[1]}"
        rows.append({"route": name, "halves": route, "ms_median": med, "ms_all": t_dev,
                     "host_ms_median": statistics.median(t_host), "uncertified_late": work["uncertified_late"],
                     "refreshed": work["fallbacks"], "one_round_calls": work["one_round_calls"],
                     "max_rel_diff_vs_first": diff})
        md += (f"| {name} | {med:.2f} | {first[0] / med:.2f}x | {statistics.median(t_host):.2f} | "
               f"{work['uncertified_late']} | {work['fallbacks']} | {work['one_round_calls']}/{repeats} | "
               f"{diff:.1e} |\n")
        print(md.splitlines()[-1], flush=True)
    return rows, md


def final_row(model, device: str, best: dict) -> str:
    """``tscnc_step.measure`` (graph, eager, two rounds, one stream, svdvals, eigvalsh-of-Gram, host syncs) with the
    fastest step route set; its numbers are added to ``best``."""
    saved = spectral._CHOL_HALVES["cuda"]
    spectral._CHOL_HALVES["cuda"] = best["halves"]
    try:
        row = measure(model, device, 30, 5, 5)
    finally:
        spectral._CHOL_HALVES["cuda"] = saved
    row.pop("step")
    best["measure"] = row
    med = row["ms_median"]
    return (f"route {best['route']}: fastcnc {med['fastcnc']:.2f} ms (host {row['fastcnc_host_ms_median']:.2f}; "
            f"two rounds {med['fastcnc-two-rounds']:.2f}; eager {med['fastcnc-eager']:.2f}), eigvalsh-gram "
            f"{med['eigvalsh-gram']:.1f} ms, svdvals {med['svdvals']:.1f} ms: **{row['speedup_vs_eigvalsh_gram']:.1f}x "
            f"vs eigvalsh, {row['speedup_vs_svdvals']:.1f}x vs svdvals**; host syncs {row['host_syncs_per_step']}, "
            f"refreshed {row['refreshed_in_timed_calls']}, late {row['uncertified_late_in_timed_calls']}, one-round "
            f"calls {row['one_round_calls']}/30, graph vs eager {row['graph_vs_eager_max_rel_diff']:.1e}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", choices=["resnet18", "resnet50"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--repeats", type=int, default=None, help="default 20 on CUDA, 2 on CPU")
    p.add_argument("--skip-step", action="store_true", help="part 1 only")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if not 0 <= a.sparsity < 1:
        p.error(f"--sparsity must be in [0, 1), got {a.sparsity}")
    repeats = a.repeats or (20 if a.device == "cuda" else 2)
    torch.manual_seed(0)
    model = fastcnc.build_model(a.model, num_classes=1000 if a.model == "resnet50" else 10,
                                stem="imagenet" if a.model == "resnet50" else "cifar").to(a.device)
    if a.sparsity > 0:
        fastcnc.prune_magnitude(model, a.sparsity, scope="layer")
    env = environment(a.device)
    head = (f"Cholesky routes, {a.model} pruned to {a.sparsity:.0%}, {env['device']}, torch {torch.__version__}, "
            f"commit {env['commit']}, {env['date']}; medians of {repeats}.\n\n")
    kernels, kmd = kernel_table(model, a.device, repeats)
    sync(a.device)
    md = head + "## Factorizations, per batch\n\n" + kmd
    steps = []
    if not a.skip_step:
        steps, smd = step_table(model, a.device, repeats, warmup=5 if a.device == "cuda" else 1)
        md += "\n## The TSCNC step under each route\n\n" + smd
        if a.device == "cuda":
            md += "\n## The fastest route against the exact baselines (tscnc_step.py's row)\n\n"
            try:
                md += final_row(model, a.device, min(steps, key=lambda r: r["ms_median"]))
            except Exception as err:  # (parts 1 and 2 are still written)
                traceback.print_exc()
                md += f"failed: {err!r}\n"
    print(md)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        tag = "gpu" if a.device == "cuda" else "cpu"
        (a.out / f"cholesky-routes-{tag}-{a.model}.json").write_text(json.dumps(
            {**env, "model": a.model, "sparsity": a.sparsity, "repeats": repeats, "kernels": kernels,
             "steps": steps}, indent=2))
        (a.out / f"cholesky-routes-{tag}-{a.model}.md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
