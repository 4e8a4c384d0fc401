"""Time one whole TSCNC regulariser step (``reg()`` forward + backward) against exact baselines and the memory floor.

    python benchmarks/tscnc_step.py [--model resnet50] [--sparsity 0 0.95] [--repeats 20] [--profile 3] [--out DIR]

impls, all computing lambda_tsc * TSC + lambda_cnc * sum_l log kappa(W_l) over every Conv2d/Linear and its gradient:
  fastcnc        ``fastcnc.TSCNC(model)()`` warm-started (the state of the previous step), then ``.backward()``
  eigvalsh-gram  sigma_max/min from ``eigvalsh`` of the smaller Gram matrix of each layer in the weights' float32,
                 autograd (the fastest baseline; its sigma_min is wrong on ill-conditioned layers)
  eigvalsh-gram64  the same with the Gram in float64 (the exact one)
  eigvalsh-gram64-batched  that with each shape's matrices stacked into one batched call (on a GPU the faster form)
  svdvals        exact: ``torch.linalg.svdvals`` of each layer, autograd
The model is freshly initialised, then (``--sparsity``, one row each) magnitude-pruned layer by layer to each level
in turn (pruned layers are the ill-conditioned and structurally rank-deficient ones the engine exists for).
Times are medians (CUDA events on a GPU); "host ms" is the Python call alone (no sync): host ~= total means the step
is bound by launches and Python, not by the device. ``--profile K`` writes torch.profiler's table of K fastcnc steps
(by device time) next to the results. The memory floor is the least traffic a step needs, every weight read once
and every gradient written once (2 x 4 bytes x parameters), over the device-to-device copy bandwidth measured in the
same run. On CUDA the number of host syncs of one fastcnc step is counted too (tests/sync_count.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from common import exact_extreme_sigmas, git_commit, sync, time_ms

import fastcnc
from fastcnc import as_matrices, spectral

LAMBDA_TSC, LAMBDA_CNC, EPS = 1e-4, 1e-3, 1e-6  # TSCNC's defaults (cnc="log", a=100)


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (median of 10)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = statistics.median(time_ms(lambda: dst.copy_(src), device, 10, 3)[0])
    return 2 * nbytes / (ms * 1e-3)


def _layers(model):
    return [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def exact_step(model, how: str):
    layers = _layers(model)

    def step():
        for m in layers:
            m.weight.grad = None
        weights = [m.weight for m in layers]
        sig = exact_extreme_sigmas([mat for m in layers for mat in as_matrices(m.weight, getattr(m, "groups", 1))],
                                   how)
        log_kappa = torch.log(sig[:, 0] / (sig[:, 1].clamp_min(0) + EPS * sig[:, 0]))
        total = LAMBDA_TSC * fastcnc.tsc_penalty(weights, check_finite=False) + LAMBDA_CNC * log_kappa.sum()
        total.backward()

    return step


def fastcnc_step(model, cuda_graph: bool = True):
    reg = fastcnc.TSCNC(model, lambda_tsc=LAMBDA_TSC, lambda_cnc=LAMBDA_CNC, cuda_graph=cuda_graph)
    layers = _layers(model)

    def step():
        for m in layers:
            m.weight.grad = None
        reg().backward()

    return step, reg


def count_syncs(step) -> tuple[int | None, int | None]:
    """Host syncs and dispatched torch ops of one step (tests/sync_count.py; the graph's replay is not an op)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    try:
        from sync_count import count_host_syncs
    except ImportError:
        return None, None
    with count_host_syncs(simulate=False) as counter:
        step()
    for s in counter.syncs[:20]:
        print(f"  host sync: {s}")
    return len(counter.syncs), sum(counter.ops.values())


def profile_table(step, device: str, steps: int) -> str:
    """torch.profiler's table of ``steps`` calls of ``step``, by self device time (CPU time on CPU), and the number of
    device kernels per call."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync(device)
    events = prof.key_averages()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    kernels = sum(e.count for e in events if getattr(e, "device_type", None) is not None
                  and str(e.device_type).endswith("CUDA") and e.self_device_time_total > 0)
    head = f"{steps} steps; device kernels per step: {kernels / steps:.0f}\n\n" if device == "cuda" else ""
    table = head + "```\n" + events.table(sort_by=key, row_limit=45, max_name_column_width=60) + "\n```\n"
    if device == "cuda":  # what the host spends its time on (the part of the step outside the replayed graph)
        table += ("\nBy self CPU time:\n\n```\n" + events.table(sort_by="self_cpu_time_total", row_limit=30,
                                                                 max_name_column_width=60) + "\n```\n")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(path))
            table += "\n" + stream_table(json.loads(path.read_text()), steps)
    return table


def stream_table(trace: dict, steps: int) -> str:
    """Kernels per CUDA stream in a chrome trace of ``steps`` calls: count, busy ms per step (the sum of kernel
    durations) and the last kernel's end minus the first's start; and for all streams together the busy time (the
    union of kernel intervals) against the sum: how much the graph's branches overlap."""
    per: dict = {}
    names: dict = {}
    spans = []
    for ev in trace.get("traceEvents", []):
        if ev.get("cat") != "kernel" or "dur" not in ev:
            continue
        stream = ev.get("args", {}).get("stream")
        start, end = float(ev["ts"]), float(ev["ts"]) + float(ev["dur"])
        count, busy, lo, hi = per.get(stream, (0, 0.0, math.inf, -math.inf))
        per[stream] = (count + 1, busy + end - start, min(lo, start), max(hi, end))
        name = str(ev.get("name", "?"))[:60]
        n_k, t_k = names.setdefault(stream, {}).get(name, (0, 0.0))
        names[stream][name] = (n_k + 1, t_k + end - start)
        spans.append((start, end))
    if not spans:
        return "No kernel events in the trace.\n"
    union, reach = 0.0, -math.inf
    for start, end in sorted(spans):
        union += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    total = sum(busy for _, busy, _, _ in per.values())
    md = (f"Kernels per CUDA stream ({steps} steps; ms per step): sum of kernel time {total / 1e3 / steps:.2f}, "
          f"device busy (union over streams) {union / 1e3 / steps:.2f}\n\n| stream | kernels per step | busy ms "
          "per step | first start to last end, ms (all steps) |\n|---|---|---|---|\n")
    for stream, (count, busy, lo, hi) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        md += f"| {stream} | {count / steps:.0f} | {busy / 1e3 / steps:.2f} | {(hi - lo) / 1e3:.2f} |\n"
    md += ("\nTop kernels of each stream (ms and launches per step):\n\n| stream | kernel | ms | launches |\n"
           "|---|---|---|---|\n")
    for stream, _ in sorted(per.items(), key=lambda kv: -kv[1][1]):
        for name, (n_k, t_k) in sorted(names[stream].items(), key=lambda kv: -kv[1][1])[:8]:
            md += f"| {stream} | `{name}` | {t_k / 1e3 / steps:.3f} | {n_k / steps:.0f} |\n"
    return md


def _run_fastcnc(model, device: str, repeats: int, warmup: int, cuda_graph: bool, two_rounds: bool = False):
    step, reg = fastcnc_step(model, cuda_graph)
    if two_rounds:  # what TSCNC ran before it learnt to drop to one round (benchmark-only patch of its choice)
        read = reg._read_pending

        def read_and_keep_two(n_mats):
            out = read(n_mats)
            reg._one_round = False
            return out

        reg._read_pending = read_and_keep_two
    for _ in range(warmup):  # the first call is the exact refresh; on CUDA the second captures the graph
        step()
    work_before = dict(reg.work)
    t_dev, t_host = time_ms(step, device, repeats, warmup=0)
    # what the timed calls did (read after timing: the flags of the last call are on the device until now): layers
    # recomputed by float64 SVD (each one is a late refresh of a layer whose sync-free certificate failed) and layers
    # left uncertified by the last call; a fast step that refreshes is not the step the goals are about
    work = {k: reg.work[k] - work_before.get(k, 0) for k in reg.work}
    return step, reg, t_dev, t_host, work


def measure(model, device: str, repeats: int, baseline_repeats: int, warmup: int) -> dict:
    """One row: fastcnc (warm; on CUDA both with the engine replayed as a CUDA graph and eagerly) vs the exact
    baselines on the model's weights as they are."""
    step, reg, t_dev, t_host, work = _run_fastcnc(model, device, repeats, warmup, cuda_graph=True)
    times = {"fastcnc": t_dev}
    est = reg.last_estimate
    graphed = reg._graphed
    graph_info = {"captures": graphed.captures, "replays": graphed.replays, "disabled": graphed.disabled}
    uncertified_last = int((~(est.certified | est.fallback)).sum())
    structural = int(est.structural.sum())
    syncs, host_ops = count_syncs(step) if device == "cuda" else (None, None)
    eager = {}
    if device == "cuda":
        # the same calls without the graph: its time, and how far its last estimate is from the replayed one's
        _, reg_e, e_dev, e_host, _ = _run_fastcnc(model, device, repeats, warmup, cuda_graph=False)
        times["fastcnc-eager"] = e_dev
        a, b = reg.last_estimate, reg_e.last_estimate
        diff = max(float(((x - y).abs() / y.abs().clamp_min(1e-300)).max())
                   for x, y in ((a.sigma_max, b.sigma_max), (a.sigma_min, b.sigma_min)))
        eager = {"fastcnc_eager_host_ms_median": statistics.median(e_host), "graph_vs_eager_max_rel_diff": diff}
        # and the graph with two rounds every call (one-round calls off)
        times["fastcnc-two-rounds"] = _run_fastcnc(model, device, repeats, warmup, cuda_graph=True,
                                                   two_rounds=True)[2]
        # and the graph captured on one stream (the batches one after another instead of side by side)
        branches = spectral._GRAPH_BRANCHES
        spectral._GRAPH_BRANCHES = 0
        try:
            times["fastcnc-one-stream"] = _run_fastcnc(model, device, repeats, warmup, cuda_graph=True)[2]
        finally:
            spectral._GRAPH_BRANCHES = branches
    for how in ("eigvalsh-gram", "eigvalsh-gram64", "eigvalsh-gram64-batched", "svdvals"):
        times[how] = time_ms(exact_step(model, how), device, baseline_repeats,
                             warmup=1 if device == "cuda" else 0)[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"ms_median": med, "ms_all": times, "fastcnc_host_ms_median": statistics.median(t_host), **eager,
            "cuda_graph": graph_info,
            "speedup_vs_svdvals": med["svdvals"] / med["fastcnc"],
            "speedup_vs_eigvalsh_gram": med["eigvalsh-gram"] / med["fastcnc"],
            "speedup_vs_eigvalsh_gram64": med["eigvalsh-gram64"] / med["fastcnc"],
            "speedup_vs_eigvalsh_gram64_batched": med["eigvalsh-gram64-batched"] / med["fastcnc"],
            "host_syncs_per_step": syncs, "host_ops_per_step": host_ops, "timed_calls": repeats,
            "refreshed_in_timed_calls": work["fallbacks"],
            "uncertified_late_in_timed_calls": work["uncertified_late"], "uncertified_in_last_call": uncertified_last,
            "structural_matrices": structural, "factorizations_per_call": work["factorizations"] / repeats,
            "one_round_calls": work["one_round_calls"],
            "step": step}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", choices=["resnet18", "resnet50"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.0],
                   help="magnitude-prune every layer to each of these in turn, one row each (default: 0, dense)")
    p.add_argument("--repeats", type=int, default=None, help="fastcnc repeats (default 30 on CUDA, 3 on CPU)")
    p.add_argument("--baseline-repeats", type=int, default=None, help="exact baselines (default 5 on CUDA, 1 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed fastcnc steps first, the exact refresh included "
                   "(default 5 on CUDA: refresh, the two-round graph, the one-round graph once the flags say so; 1 on "
                   "CPU)")
    p.add_argument("--profile", type=int, default=0, help="also profile this many fastcnc steps (last sparsity)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--tag", default="", help="suffix of the result files' names (e.g. an A/B variant)")
    # A/B knobs of the engine's sync-free choices (CUDA): what a one-round call factors
    p.add_argument("--first-shifts", type=float, nargs="+", default=None, metavar="F",
                   help="fractions of the previous lower bound of sigma_min factored as the first round's shifts "
                        f"(default {spectral._FIRST_SHIFTS}; a safe negative shift is always added)")
    p.add_argument("--certificate-shares", type=float, nargs="+", default=None, metavar="S",
                   help="shares of the kappa budget given to sigma_max by the sync-free certificate's (tau, t) pairs, "
                        f"ascending (default {spectral._SYNC_FREE_SHARES})")
    a = p.parse_args(argv)
    if a.first_shifts is not None:
        spectral._FIRST_SHIFTS = tuple(a.first_shifts)
    if a.certificate_shares is not None:
        if list(a.certificate_shares) != sorted(a.certificate_shares) or not all(0 < s < 1 for s in
                                                                                 a.certificate_shares):
            p.error(f"--certificate-shares must ascend in (0, 1), got {a.certificate_shares}")
        spectral._SYNC_FREE_SHARES = tuple(a.certificate_shares)
    if any(not 0 <= s < 1 for s in a.sparsity) or a.sparsity != sorted(a.sparsity):
        p.error(f"--sparsity must be increasing values in [0, 1), got {a.sparsity}")
    device = a.device
    repeats = a.repeats or (30 if device == "cuda" else 3)
    baseline_repeats = a.baseline_repeats or (5 if device == "cuda" else 1)
    warmup = a.warmup or (5 if device == "cuda" else 1)
    torch.manual_seed(0)
    model = fastcnc.build_model(a.model, num_classes=1000 if a.model == "resnet50" else 10,
                                stem="imagenet" if a.model == "resnet50" else "cifar").to(device)
    params = sum(m.weight.numel() for m in _layers(model))
    n_mats = sum(len(as_matrices(m.weight, getattr(m, "groups", 1))) for m in _layers(model))
    bandwidth = copy_bandwidth(device, 1 << 30 if device == "cuda" else 1 << 26)
    floor_bytes = 2 * 4 * params
    floor_ms = floor_bytes / bandwidth * 1e3
    dev_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    res = {"benchmark": "TSCNC step (reg() forward + backward)", "model": a.model, "matrices": n_mats,
           "params": params, "device": dev_name, "torch": torch.__version__, "commit": git_commit(),
           "date": datetime.date.today().isoformat(), "repeats": repeats, "baseline_repeats": baseline_repeats,
           "copy_bandwidth_GBps": bandwidth / 1e9, "floor_bytes": floor_bytes, "floor_ms": floor_ms,
           "first_shifts": list(spectral._FIRST_SHIFTS), "certificate_shares": list(spectral._SYNC_FREE_SHARES),
           "rows": []}
    md = (f"TSCNC step on {a.model} ({n_mats} matrices, {params / 1e6:.1f}M weights), {dev_name}, torch "
          f"{res['torch']}, commit {res['commit']}, {res['date']}; medians (fastcnc of {repeats}, baselines of "
          f"{baseline_repeats}). Memory floor {floor_ms:.3f} ms ({bandwidth / 1e9:.0f} GB/s copy). Sync-free "
          f"choices: first shifts {spectral._FIRST_SHIFTS}, certificate shares {spectral._SYNC_FREE_SHARES}.\n\n"
          "| sparsity | fastcnc ms | host ms | one stream ms | two rounds ms | eager ms (host) | graph vs eager | "
          "eigvalsh-gram ms (float32) | eigvalsh-gram64 ms | batched ms | svdvals ms | x vs svdvals | "
          "x vs eigvalsh-gram | x vs eigvalsh-gram64 | x vs batched | fastcnc / floor | host syncs | host ops | "
          "structural | refreshed | uncertified late | one-round calls | factorizations/call |\n" + "|---" * 23 + "|\n")
    step = None
    for sparsity in a.sparsity:
        if sparsity > 0:
            fastcnc.prune_magnitude(model, sparsity, scope="layer")
        row = measure(model, device, repeats, baseline_repeats, warmup)
        step = row.pop("step")
        med = row["ms_median"]
        row = {"sparsity": sparsity, **row, "fastcnc_over_floor": med["fastcnc"] / floor_ms}
        res["rows"].append(row)
        syncs = row["host_syncs_per_step"]
        eager = (f"{med['fastcnc-one-stream']:.2f} | {med['fastcnc-two-rounds']:.2f} | {med['fastcnc-eager']:.2f} "
                 f"({row['fastcnc_eager_host_ms_median']:.2f}) | "
                 f"{row['graph_vs_eager_max_rel_diff']:.1e}" if "fastcnc-eager" in med else "- | - | - | -")
        md += (f"| {sparsity:.0%} | {med['fastcnc']:.3f} | {row['fastcnc_host_ms_median']:.3f} | {eager} | "
               f"{med['eigvalsh-gram']:.2f} | {med['eigvalsh-gram64']:.2f} | {med['eigvalsh-gram64-batched']:.2f} | "
               f"{med['svdvals']:.2f} | {row['speedup_vs_svdvals']:.1f} | {row['speedup_vs_eigvalsh_gram']:.1f} | "
               f"{row['speedup_vs_eigvalsh_gram64']:.1f} | {row['speedup_vs_eigvalsh_gram64_batched']:.1f} | "
               f"{row['fastcnc_over_floor']:.0f} | "
               f"{syncs if syncs is not None else '-'} | "
               f"{row['host_ops_per_step'] if row['host_ops_per_step'] is not None else '-'} | "
               f"{row['structural_matrices']} | "
               f"{row['refreshed_in_timed_calls']} | {row['uncertified_late_in_timed_calls']} | "
               f"{row['one_round_calls']}/{repeats} | {row['factorizations_per_call']:.0f} |\n")
        print(md.splitlines()[-1], flush=True)
    graph = res["rows"][-1]["cuda_graph"] if res["rows"] else {}
    md += (f"\nfastcnc: the engine replayed as a CUDA graph on CUDA (TSCNC's default, its batches side by side on "
           f"{spectral._GRAPH_BRANCHES} streams; last row: {graph}); one stream: the same graph captured with the "
           "batches one after another; eager: "
           "the same step with cuda_graph=False; two rounds: the graph with two sync-free rounds every call (TSCNC "
           "drops to one while the previous call's first round certified every layer); graph vs eager: largest "
           "relative difference of sigma_max / sigma_min between the two last estimates.\n")
    md += ("\nrefreshed: matrices recomputed by float64 SVD during the timed calls (late refreshes of failed "
           "sync-free certificates); uncertified late: certificates that failed and were reported one call later; "
           "host ops: torch ops dispatched by one step (the graph's replay is one call, not an op).\n")
    print(md)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        tag = "gpu" if device == "cuda" else "cpu"
        (a.out / f"tscnc-step-{tag}-{a.model}{a.tag}.json").write_text(json.dumps(res, indent=2))
        (a.out / f"tscnc-step-{tag}-{a.model}{a.tag}.md").write_text(md)
    if a.profile > 0:
        table = profile_table(step, device, a.profile)
        print(table)
        if a.out is not None:
            (a.out / f"tscnc-step-{tag}-{a.model}{a.tag}-profile.md").write_text(
                f"torch.profiler, fastcnc TSCNC step on {a.model} at sparsity {a.sparsity[-1]:.0%}, {dev_name}, "
                f"commit {res['commit']}\n\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
