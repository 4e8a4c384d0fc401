"""Shared by every benchmark: device and environment description, timing, result files, the ratio-table renderer.

Benchmarks import this as ``common`` (pytest puts ``benchmarks/`` on ``sys.path``; ``python benchmarks/run.py`` runs
from here), and import the package only through its public API.
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import torch


def device_name(device: str | torch.device = "cpu") -> str:
    """The GPU's name, or the CPU model with the torch thread count (timings on a shared CPU depend on it)."""
    device = str(device)
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"CPU: {model} ({threads} torch thread{'s' if threads > 1 else ''})"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str | torch.device = "cpu") -> dict:
    """What a result must carry to be comparable: device, date, commit and library versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "date": datetime.date.today().isoformat(), "commit": git_commit(),
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}


def sync(device: str | torch.device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, device: str | torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn``, each ended by a device synchronisation."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def time_ms(fn, device: str | torch.device, repeats: int, warmup: int = 1) -> tuple[list[float], list[float]]:
    """Per call: milliseconds of ``fn`` (CUDA events on a GPU, perf_counter on CPU) and of its host side alone (the
    Python call, no sync: on a GPU the time to enqueue the work; host close to total means host-bound)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times, host = [], []
    cuda = str(device).startswith("cuda")
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        if cuda:
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            times.append(host[-1])
    return times, host


def graph_replay_ms(fn, repeats: int, warmup_calls: int = 2, timing_warmup: int = 1) -> list[float]:
    """Per-call milliseconds of ``fn`` replayed from a CUDA graph (CUDA events): ``warmup_calls`` eager calls on a side
    stream first, as ``torch.cuda.graph`` requires, then one capture. The device's time alone, without Python or
    launch overhead. A capture that fails is tried once more with ``capture_error_mode="thread_local"`` (autograd's
    backward runs on its own thread, whose first calls on a new stream may be ones a global-mode capture forbids);
    raises what the second capture raises."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_calls):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    for mode in ("global", "thread_local"):
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode=mode):
                fn()
            break
        except Exception:
            del graph
            torch.cuda.synchronize()
            if mode == "thread_local":
                raise
    return time_ms(graph.replay, "cuda", repeats, warmup=timing_warmup)[0]


def write_result(out_dir: str | Path, stem: str, result: dict, markdown: str) -> tuple[Path, Path]:
    """``<out_dir>/<stem>.json`` and ``.md``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    paths[0].write_text(json.dumps(result, indent=2))
    paths[1].write_text(markdown)
    return paths


# --------------------------------------------------------------------------------- pytest-benchmark ratio table


STAT = "min"  # the least disturbed round: on a shared machine the median mostly measures the neighbours


def render_ratio_table(path: str | Path, *, title: str, notes: list[str], impls: list[str], baseline: str,
                       row_columns: list[tuple[str, callable]]) -> str:
    """Markdown table of times (``STAT`` of the rounds) and ratios to ``baseline`` from a ``--benchmark-json`` file.

    One row per benchmark group; ``row_columns`` are ``(header, extra_info -> cell)`` pairs describing the row, and
    every ``impls`` entry present in the file gets a "ms (ratio)" column. Each benchmark must record its ``impl``,
    ``device`` and ``torch`` in ``extra_info``.
    """
    with open(path) as f:
        data = json.load(f)
    rows: dict[str, dict[str, dict]] = {}
    for b in data["benchmarks"]:
        rows.setdefault(b["group"], {})[b["extra_info"]["impl"]] = b
    present = [i for i in impls if any(i in r for r in rows.values())]
    first = next(iter(next(iter(rows.values())).values()))["extra_info"]
    date = data.get("datetime", "")[:10] or datetime.date.today().isoformat()
    commit = (data.get("commit_info") or {}).get("id", "")[:7] or "unknown"
    out = [f"# {title}", "", f"- device: {first['device']}",
           f"- torch {first['torch']}, python {platform.python_version()}, date {date}, commit {commit}",
           f"- time: {STAT} of the rounds; ratio = time / time({baseline}) (< 1 is faster)", *notes, ""]
    others = [i for i in present if i != baseline]
    out += ["| " + " | ".join([h for h, _ in row_columns] + [f"{baseline} ms"] + [f"{i} ms (ratio)" for i in others])
            + " |", "|" + "---|" * (len(row_columns) + 1 + len(others))]
    for by_impl in rows.values():
        info = next(iter(by_impl.values()))["extra_info"]
        base = by_impl[baseline]["stats"][STAT] if baseline in by_impl else None
        cells = [cell(info) for _, cell in row_columns] + [f"{base * 1e3:.1f}" if base else "-"]
        for impl in others:
            if impl not in by_impl:
                cells.append("-")
                continue
            t = by_impl[impl]["stats"][STAT]
            cells.append(f"{t * 1e3:.1f} ({t / base:.2f})" if base else f"{t * 1e3:.1f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def indices_by_shape(mats: list[torch.Tensor]) -> list[list[int]]:
    """The indices of ``mats``, grouped by shape (first appearance order)."""
    groups: dict = {}
    for i, m in enumerate(mats):
        groups.setdefault(tuple(m.shape), []).append(i)
    return list(groups.values())


def exact_extreme_sigmas(mats: list[torch.Tensor], how: str) -> torch.Tensor:
    """[L, 2] (sigma_max, sigma_min) of each matrix by a routine a user could pick, differentiable through autograd:
    ``"svdvals"`` of the matrix; ``"eigvalsh-gram"``, eigvalsh of its smaller Gram in the matrices' own dtype (float32
    for a float32 model: the fastest, but its sigma_min is wrong on ill-conditioned layers, see the trajectory
    benchmark's eigh32 column); ``"eigvalsh-gram64"``, the same with the Gram in float64 (the exact one);
    ``"eigvalsh-gram64-batched"``, that with the matrices of one shape stacked into one batched call (on a GPU the
    faster way to write it: the trajectory benchmark's eigh64 on the H200 took half the float32 loop's time)."""
    if how == "eigvalsh-gram64-batched":
        out: list = [None] * len(mats)
        for idx in indices_by_shape(mats):
            W = torch.stack([mats[i] for i in idx]).to(torch.float64)
            gram = W @ W.mT if W.shape[-2] <= W.shape[-1] else W.mT @ W
            ev = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
            for j, i in enumerate(idx):
                out[i] = torch.stack([ev[j, -1], ev[j, 0]])
        return torch.stack(out)
    sig = []
    for m in mats:
        if how == "svdvals":
            s = torch.linalg.svdvals(m)
            sig.append(torch.stack([s[0], s[-1]]))
        else:
            if how == "eigvalsh-gram64":
                m = m.to(torch.float64)
            gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
            ev = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
            sig.append(torch.stack([ev[-1], ev[0]]))
    return torch.stack(sig)
