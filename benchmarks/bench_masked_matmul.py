"""pytest-benchmark: masked matmul forward + backward (y, dX, dW) against dense W*M and torch.sparse.

Shapes are the im2col matmuls of ResNet-18's 3x3 convolutions on CIFAR (32x32 input): ``M = batch * H_out * W_out``,
``N = C_out``, ``K = C_in * 9`` (Conv2d on the kernel path is exactly this matmul after ``F.unfold``). Masks are
unstructured (random) or block-sparse (whole 32x32 tiles), sparsity 0..99%.

impls (one benchmark group per shape x mask x sparsity, ``dense`` is the baseline of the ratio column):
  dense         ``F.linear(x, W * M)`` + autograd (cuBLAS / MKL-DNN)
  fastcnc       ``MaskedLinear`` with the library's dispatch rule (CPU: the torch path; CUDA: cuBLAS on W*M unless
                ``fastcnc.masked.CUDA_KERNELS`` is set, then the kernels where the tile-density rule says)
  triton        the block-sparse Triton kernels, forced (CUDA only: on CPU they only run in the interpreter)
  torch_csr     ``torch.sparse.mm`` on a CSR weight, torch's own backward (dW sampled on the sparsity pattern)
  torch_bsr     ``W_bsr @ x^T`` and ``W^T_bsr @ dy^T`` (BSR 32x32; torch has no BSR backward on CPU) + dense masked
                dW; both sparse formats are built once outside the timed region, which favours them (training would
                rebuild them after every optimizer step)

Run: ``pytest benchmarks/bench_masked_matmul.py --benchmark-json out.json`` (on a shared CPU, ``OMP_NUM_THREADS=1``
gives far steadier numbers: a 2-thread GEMM stalls whenever a neighbour takes one of the cores) then
``python benchmarks/run.py masked-report out.json > out.md`` for the ratio table. ``--benchmark-disable`` runs
each target once (a smoke test).

Quick fixed set for a GPU session (ResNet-18 shapes, block-32 masks at 0% and 90%, one table of ratios to dense):
``python benchmarks/bench_masked_matmul.py [--batch 128] [--dtypes float32 bfloat16] [--out DIR]``.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from common import device_name, environment, graph_replay_ms, render_ratio_table, time_ms

from fastcnc import MaskedLinear, masked

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BATCH = 128 if CUDA else 4  # CIFAR batch; 4 on CPU keeps the whole run to minutes on 2 cores
# (name, M, N, K): ResNet-18 stage 1..4 3x3 convs, spatial 32, 16, 8, 4
LAYERS = [
    ("layer1-64x576", BATCH * 32 * 32, 64, 64 * 9),
    ("layer2-128x1152", BATCH * 16 * 16, 128, 128 * 9),
    ("layer3-256x2304", BATCH * 8 * 8, 256, 256 * 9),
    ("layer4-512x4608", BATCH * 4 * 4, 512, 512 * 9),
]
SPARSITIES = [0.0, 0.5, 0.9, 0.95, 0.99]
MASKS = ["unstructured", "block32"]
IMPLS = ["dense", "fastcnc", pytest.param("triton", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA")),
         "torch_csr", "torch_bsr"]
TILE = 32
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


def make_mask(n: int, k: int, kind: str, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    if kind == "unstructured":
        return (torch.rand(n, k, generator=gen) >= sparsity).float()
    tiles = (torch.rand(n // TILE, k // TILE, generator=gen) >= sparsity).float()
    return tiles.repeat_interleave(TILE, 0).repeat_interleave(TILE, 1)


@contextlib.contextmanager
def forced_kernels():
    """The block-sparse kernels whatever the device's dispatch rule and the mask's tile density."""
    saved = masked.CUDA_KERNELS, masked.DENSE_FALLBACK_TILE_DENSITY
    masked.CUDA_KERNELS, masked.DENSE_FALLBACK_TILE_DENSITY = True, 1.01
    try:
        yield
    finally:
        masked.CUDA_KERNELS, masked.DENSE_FALLBACK_TILE_DENSITY = saved


def make_step(impl: str, x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, dy: torch.Tensor):
    """A closure doing forward + backward; returns (y, dx, dw) with dw dense for the agreement check."""
    if impl == "dense":
        w = w.clone().requires_grad_(True)

        def step():
            y = F.linear(x, w * mask)
            return (y, *torch.autograd.grad(y, (x, w), dy))
    elif impl in ("fastcnc", "triton"):
        layer = MaskedLinear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
        layer.set_mask(mask)
        layer.tile_table()  # built once, as set_mask does on CUDA
        rule = forced_kernels if impl == "triton" else contextlib.nullcontext

        def step():
            with rule():
                y = layer(x)
                return (y, *torch.autograd.grad(y, (x, layer.weight), dy))
    elif impl == "torch_csr":
        w_csr = (w * mask).to_sparse_csr().requires_grad_(True)

        def step():
            y = torch.sparse.mm(w_csr, x.t()).t()
            dx, dw = torch.autograd.grad(y, (x, w_csr), dy)
            return y, dx, dw
    elif impl == "torch_bsr":
        w_bsr = (w * mask).to_sparse_bsr((TILE, TILE))
        w_t_bsr = (w * mask).t().contiguous().to_sparse_bsr((TILE, TILE))

        def step():
            y = (w_bsr @ x.t()).t()
            dx = (w_t_bsr @ dy.t()).t()
            dw = (dy.t() @ x) * mask
            return y, dx, dw
    else:
        raise ValueError(impl)
    return step


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.layout != torch.strided else t


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"s{round(s * 100)}")
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("layer", LAYERS, ids=lambda s: s[0])
def test_masked_matmul_fwd_bwd(benchmark, layer, kind, sparsity, impl):
    name, m, n, k = layer
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(DEVICE).requires_grad_(True)
    w = torch.randn(n, k, generator=gen).to(DEVICE)
    dy = torch.randn(m, n, generator=gen).to(DEVICE)
    mask = make_mask(n, k, kind, sparsity, gen).to(DEVICE)

    step = make_step(impl, x, w, mask, dy)
    # never time a wrong answer: agree with dense W*M in float64 (fp32 sums of K terms; TF32 off by default)
    with torch.no_grad():
        w64, x64, dy64, m64 = w.double() * mask.double(), x.detach().double(), dy.double(), mask.double()
        want = (x64 @ w64.t(), dy64 @ w64, (dy64.t() @ x64) * m64)
    got = step()
    for g, r in zip(got, want, strict=True):
        err = (_dense(g).double() - r).abs().max() / r.abs().max().clamp_min(1.0)
        assert err < 1e-4, f"{impl}: relative error {err:.2e}"
    assert torch.count_nonzero(_dense(got[2])[mask == 0]) == 0  # pruned weights: exactly zero gradient

    benchmark.group = f"{name}-{kind}-s{round(sparsity * 100)}"
    tiles = masked.build_tile_table(mask, block=TILE)
    benchmark.extra_info.update(layer=name, M=m, N=n, K=k, mask=kind, sparsity=sparsity, impl=impl,
                                tile_density=tiles.density, device=device_name(DEVICE), torch=torch.__version__)

    def run():
        step()
        if CUDA:
            torch.cuda.synchronize()

    slow = impl.startswith("torch_") and sparsity < 0.9
    benchmark.pedantic(run, rounds=3 if slow else 15, warmup_rounds=1)


# ------------------------------------------------------------------------------------------------------------ report


def render(path: str) -> str:
    """Markdown table of a ``--benchmark-json`` file of this benchmark (``python benchmarks/run.py masked-report``)."""
    notes = [
        "- shapes: im2col matmuls of ResNet-18 3x3 convs (CIFAR), M = batch x H x W, N = C_out, K = 9 C_in",
        "- rounds: 3 for torch.sparse below 90% sparsity, else 15; fwd + bwd (y, dX, dW)",
        "- torch_csr / torch_bsr weights are converted once outside the timed region (a training step would have to"
        " rebuild them after every optimizer step)",
    ]
    with open(path) as f:
        timed = {b["extra_info"]["impl"] for b in json.load(f)["benchmarks"]}
    if "triton" not in timed:
        notes.append("- no GPU: the Triton kernels are not timed; on CPU `fastcnc` runs the same code as `dense` (W*M"
                     " then matmul), so its ratio shows the noise floor of the run")
    return render_ratio_table(
        path, title="Masked matmul forward + backward: fastcnc vs dense (W*M) vs torch.sparse", notes=notes,
        impls=["dense", "fastcnc", "triton", "torch_csr", "torch_bsr"], baseline="dense",
        row_columns=[("layer (M x N x K)", lambda i: f"{i['layer']} ({i['M']}x{i['N']}x{i['K']})"),
                     ("mask", lambda i: i["mask"]), ("sparsity", lambda i: f"{i['sparsity']:.0%}"),
                     ("tile density (32x32)", lambda i: f"{i['tile_density']:.2f}")])


# ------------------------------------------------------------------------------------------- quick CLI (GPU session)


def _median_ms(fn, device: str, repeats: int, warmup: int) -> tuple[float, float]:
    """Median total and host milliseconds (see ``common.time_ms``)."""
    times, host = time_ms(fn, device, repeats, warmup)
    return statistics.median(times), statistics.median(host)


TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def quick(batch: int, dtypes: list[str], sparsities: list[float], repeats: int, out_dir: str | None) -> int:
    """Fixed small set for one GPU session: ResNet-18 im2col shapes x block-32 masks at ``sparsities`` x dtypes,
    forward + backward of dense ``W*M`` (cuBLAS), ``fastcnc`` (dispatch rule) and ``triton`` (kernels forced, GPU
    only), each checked against float64 before it is timed. Ratios are to ``dense`` measured in the same run."""

    layers = [(name, batch * (m // BATCH), n, k) for name, m, n, k in LAYERS]
    impls = ["dense", "fastcnc"] + (["triton"] if CUDA else [])
    rows, failures = [], 0
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for name, m, n, k in layers:
            for sparsity in sparsities:
                gen = torch.Generator().manual_seed(0)
                x = torch.randn(m, k, generator=gen).to(DEVICE, dtype).requires_grad_(True)
                w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
                dy = torch.randn(m, n, generator=gen).to(DEVICE, dtype)
                mask = make_mask(n, k, "block32", sparsity, gen).to(DEVICE, dtype)
                w64, x64, dy64, m64 = w.double() * mask.double(), x.detach().double(), dy.double(), mask.double()
                want = (x64 @ w64.t(), dy64 @ w64, (dy64.t() @ x64) * m64)
                row = {"layer": name, "M": m, "N": n, "K": k, "dtype": dtype_name, "sparsity": sparsity,
                       "tile_density": masked.build_tile_table(mask, block=TILE).density, "ms": {}, "host_ms": {},
                       "graph_ms": {}, "error": {}}
                steps = {}
                for impl in impls:
                    try:
                        step = make_step(impl, x, w, mask, dy)
                        got = step()
                        err = max(float((_dense(g).double() - r).norm() / r.norm().clamp_min(1e-30))
                                  for g, r in zip(got, want, strict=True))
                        row["error"][impl] = err
                        if not err < TOLERANCE[dtype] or torch.count_nonzero(_dense(got[2])[mask == 0]):
                            raise AssertionError(f"relative error {err:.2e} (or a pruned weight got a gradient)")
                        row["ms"][impl], row["host_ms"][impl] = _median_ms(step, DEVICE, repeats, warmup=2)
                        steps[impl] = step
                    except Exception as exc:  # one broken impl must not hide the other rows
                        failures += 1
                        row["ms"][impl] = None
                        row.setdefault("failed", {})[impl] = f"{type(exc).__name__}: {exc}"[:300]
                # captures after every eager timing of the row: a failed capture can leave CUDA state (the RNG's
                # capture flag) that breaks the next eager call, so it must cost its own column only
                for impl, step in steps.items() if CUDA else ():
                    try:
                        row["graph_ms"][impl] = statistics.median(
                            graph_replay_ms(step, repeats, warmup_calls=3, timing_warmup=2))
                    except Exception as exc:  # noqa: BLE001
                        row["graph_ms"][impl] = None
                        row.setdefault("failed", {})[f"{impl} (graph)"] = f"{type(exc).__name__}: {exc}"[:300]
                base = row["ms"].get("dense")
                row["ratio"] = {i: (t / base if t and base else None) for i, t in row["ms"].items() if i != "dense"}
                gbase = row["graph_ms"].get("dense")
                row["graph_ratio"] = {i: (t / gbase if t and gbase else None) for i, t in row["graph_ms"].items()
                                      if i != "dense"}
                rows.append(row)
                _quick_result(rows, batch, repeats, out_dir)
                cells = "  ".join(f"{i} {t:.3f} ms (host {row['host_ms'][i]:.3f})" if t else f"{i} FAILED"
                                  for i, t in row["ms"].items())
                print(f"{dtype_name:9s} {name:16s} M={m:<7d} s={sparsity:.0%}  {cells}", flush=True)
    md = render_quick(_quick_result(rows, batch, repeats, out_dir))
    print(md)
    return 1 if failures else 0


def _quick_result(rows: list[dict], batch: int, repeats: int, out_dir: str | None) -> dict:
    """The result so far; written after every row, so a run stopped by a timeout keeps what it measured."""
    import os

    res = {"benchmark": "masked layer fwd+bwd, quick set", **environment(DEVICE), "batch": batch, "repeats": repeats,
           "rows": rows}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        tag = "gpu" if CUDA else "cpu"
        with open(os.path.join(out_dir, f"masked-quick-{tag}.json"), "w") as f:
            json.dump(res, f, indent=2)
        with open(os.path.join(out_dir, f"masked-quick-{tag}.md"), "w") as f:
            f.write(render_quick(res))
    return res


def render_quick(res: dict) -> str:
    out = [f"Masked layer fwd+bwd (y, dX, dW), block-32 masks. Device: {res['device']}; torch {res['torch']}; "
           f"date {res['date']}; batch {res['batch']}; median of {res['repeats']}; ratio = time / dense (same run); "
           "host ms = the Python call alone (enqueue time, no sync): close to the wall time means host-bound; "
           "graph ms = the same fwd+bwd replayed from a CUDA graph (device time alone, no Python; '-' off CUDA).",
           "",
           "| dtype | layer (MxNxK) | sparsity | tile density | dense ms | fastcnc ms (ratio) | triton ms (ratio) "
           "| host ms dense / fastcnc / triton | graph ms dense / fastcnc (ratio) / triton (ratio) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        def cell(impl, r=r):
            t = r["ms"].get(impl)
            if impl not in r["ms"]:
                return "-"
            if t is None:
                return "FAILED"
            return f"{t:.3f} ({r['ratio'][impl]:.2f})" if r["ratio"].get(impl) else f"{t:.3f}"
        dense = r["ms"].get("dense")
        host = " / ".join(f"{h:.3f}" if h is not None else "-"
                          for h in (r.get("host_ms", {}).get(i) for i in ("dense", "fastcnc", "triton")))
        out.append(f"| {r['dtype']} | {r['layer']} ({r['M']}x{r['N']}x{r['K']}) | {r['sparsity']:.0%} | "
                   f"{r['tile_density']:.2f} | {dense:.3f} | {cell('fastcnc')} | {cell('triton')} | {host} | "
                   f"{_graph_cells(r)} |"
                   if dense else f"| {r['dtype']} | {r['layer']} | {r['sparsity']:.0%} | - | FAILED | | | | |")
    return "\n".join(out) + "\n"


def _graph_cells(r: dict) -> str:
    graph, ratio = r.get("graph_ms", {}), r.get("graph_ratio", {})

    def one(impl):
        t = graph.get(impl)
        if impl not in graph:
            return "-"
        if t is None:
            return "FAILED"
        return f"{t:.3f} ({ratio[impl]:.2f})" if ratio.get(impl) else f"{t:.3f}"

    return " / ".join(one(i) for i in ("dense", "fastcnc", "triton"))


def main(argv: list[str] | None = None) -> int:
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description="quick masked-layer benchmark (fixed shapes, ratios to dense)")
    p.add_argument("--batch", type=int, default=128 if CUDA else 2)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"] if CUDA else ["float32"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.9])
    p.add_argument("--repeats", type=int, default=20 if CUDA else 3)
    p.add_argument("--out", default=None, help="directory for masked-quick-<gpu|cpu>.json/.md")
    p.add_argument("--host-profile", type=int, default=0, metavar="CALLS",
                   help="then cProfile CALLS eager fwd+bwd of the fastcnc layer (layer2 shape, 90%% block sparsity, "
                        "first dtype): where the host time goes (masked-host-profile-<gpu|cpu>.txt)")
    a = p.parse_args(argv)
    rc = quick(a.batch, a.dtypes, a.sparsities, a.repeats, a.out)
    if a.host_profile:
        host_profile(a.batch, a.dtypes[0], a.host_profile, a.out)
    return rc


def _forced(layer, x):
    with forced_kernels():
        return layer(x)


def _launcher_host_times(x, w, mask, dy, calls: int) -> str:
    """Host microseconds per call (no sync) of the layer's forward alone, of each kernel launcher alone, and of an
    empty ``torch.empty`` for scale: which part of the eager fwd+bwd is the launch path."""
    from fastcnc.kernels._common import INTERPRET

    from fastcnc._backend import kernels

    k = kernels("masked_matmul")
    tiles = masked.build_tile_table(mask)
    a, g = x.detach().t().unsqueeze(0), dy.t().unsqueeze(0)
    y = torch.empty(1, w.shape[0], a.shape[2], device=x.device, dtype=x.dtype)
    da, dw = torch.empty_like(a), torch.empty_like(w)
    layer = MaskedLinear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    layer.set_mask(mask)
    cases = {
        "torch.empty (scale)": lambda: torch.empty(8, device=x.device),
        "layer forward on the kernels (no grad)": lambda: _forced(layer, x.detach()),
        "masked_mm_fwd launcher": lambda: k.masked_mm_fwd(a, w, tiles.keep, tiles.k_idx, tiles.k_cnt, None, y,
                                                          groups=1, block=tiles.block),
        "masked_mm_bwd_dx launcher": lambda: k.masked_mm_bwd_dx(g, w, tiles.keep, tiles.n_idx, tiles.n_cnt, da,
                                                                groups=1, block=tiles.block),
        "masked_mm_bwd_dw launcher": lambda: k.masked_mm_bwd_dw(g, a, tiles.keep, tiles.nonzero, dw, groups=1,
                                                                block=tiles.block, busy_tiles=tiles.n_nonzero),
    }
    if not CUDA and not INTERPRET:  # no kernel to launch here
        cases = {c: f for c, f in cases.items() if "launcher" not in c}
    lines = ["| host us per call (median of 5 x calls) | |", "|---|---|"]
    for label, fn in cases.items():
        with torch.no_grad():
            fn()
            reps = []
            for _ in range(5):
                if CUDA:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                reps.append((time.perf_counter() - t0) / calls * 1e6)
        lines.append(f"| {label} | {statistics.median(reps):.1f} |")
    if CUDA:
        torch.cuda.synchronize()
    return "\n".join(lines)


def host_profile(batch: int, dtype_name: str, calls: int, out_dir: str | None) -> str:
    """cProfile of ``calls`` eager fwd+bwd of a masked layer on the kernels (no device sync inside the
    profiled loop, so the table is the host's own time), sorted by own time."""
    import cProfile
    import io
    import os
    import pstats

    name, m, n, k = LAYERS[1]
    m = batch * (m // BATCH)
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    dy = torch.randn(m, n, generator=gen).to(DEVICE, dtype)
    mask = make_mask(n, k, "block32", 0.9, gen).to(DEVICE, dtype)
    step = make_step("triton", x, w, mask, dy)
    for _ in range(3):
        step()
    if CUDA:
        torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        step()
    prof.disable()
    if CUDA:
        torch.cuda.synchronize()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    buf.write(f"host profile: {calls} eager fwd+bwd, {name} ({m}x{n}x{k}), {dtype_name}, 90% block-32 mask, "
              f"{device_name(DEVICE)}; {stats.total_tt / calls * 1e3:.3f} ms per call under cProfile (main thread "
              "only: autograd runs a CUDA backward on its own thread, so the launchers are also timed alone)\n")
    buf.write(_launcher_host_times(x, w, mask, dy, calls) + "\n")
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(25)
    text = buf.getvalue()
    print(text)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"masked-host-profile-{'gpu' if CUDA else 'cpu'}.txt"), "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    raise SystemExit(main())
