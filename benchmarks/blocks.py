"""Thousands of small same-shape matrices: the per-frequency blocks of trained convolutions.

    python benchmarks/run.py blocks [--run resnet18-w16-s95] [--repeats 3] [--device cuda] [--out benchmarks/results]

A k x k convolution with circular padding on an N x N input is, after a 2-D DFT, block-diagonal: one complex
[c_out, c_in] block per frequency, whose singular values together are the operator's (Sedghi, Gupta and Long, "The
singular values of convolutional layers", ICLR 2019). The real [[Re, -Im], [Im, Re]] embedding of a block has the
same singular values, each twice, so every block's bottom is an exact double: a clustered bottom by construction.
The weights are the 3x3 convolutions of snapshots recorded along a real training run (``trajectory.py``: dense,
gradual pruning, fine-tuning), at the spatial sizes of a 32 x 32 input (ResNet-18's stages: 32, 16, 8, 4), so a
snapshot of ResNet-18 at width 16 gives 5,440 blocks in seven shapes (4,096 of 32 x 32).

Per snapshot, one value+grad of the CNC penalty over all blocks: fastcnc cold, fastcnc warm from the blocks one
training step earlier (what a step of training would see), eigvalsh of the float64 Gram with autograd (eigh64, the
strongest exact baseline) and svdvals; kappa_eps errors against float64 SVD of every block; certified counts and
fallbacks. The blocks of one shape are passed as one [B, m, n] tensor. On CUDA the run is recorded on the GPU and
fastcnc runs as TSCNC's eager call does (two sync-free rounds, flags read after the timed call).
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import common
import torch
from common import environment, write_result
from trajectory import EPS, PRESETS, Run, _log_kappa, record

from fastcnc.cnc import penalty_from_estimate
from fastcnc.spectral import SpectralState, extreme_singular_values

STAGE_SIZE = {"stages.0.": 32, "stages.1.": 16, "stages.2.": 8, "stages.3.": 4}  # a 32 x 32 input's maps per stage


def frequency_blocks(weight: torch.Tensor, size: int) -> torch.Tensor:
    """[size * size, 2 c_out, 2 c_in] float32: the real embeddings of the DFT blocks of a circular convolution with
    ``weight`` [c_out, c_in, k, k] on size x size inputs (computed in float64)."""
    co, ci, kh, kw = weight.shape
    if kh > size or kw > size:
        raise ValueError(f"kernel {kh}x{kw} is larger than the {size}x{size} input")
    K = weight.new_zeros(co, ci, size, size, dtype=torch.float64)
    K[:, :, :kh, :kw] = weight.double()
    F = torch.fft.fft2(K).permute(2, 3, 0, 1).reshape(size * size, co, ci)
    return torch.cat([torch.cat([F.real, -F.imag], 2), torch.cat([F.imag, F.real], 2)], 1).float()


def snapshot_blocks(snap: dict, key: str = "weights") -> list[torch.Tensor]:
    """The per-frequency blocks of every 3x3 convolution of a recorded snapshot, one [B, m, n] tensor per shape."""
    by_shape: dict = {}
    for name, w in zip(snap["names"], snap[key], strict=True):
        stage = next((s for s in STAGE_SIZE if name.startswith(s)), None)
        if w.dim() != 4 or w.shape[-1] != 3 or stage is None:
            continue
        blocks = frequency_blocks(w, STAGE_SIZE[stage])
        by_shape.setdefault(tuple(blocks.shape[1:]), []).append(blocks)
    return [torch.cat(v) for v in by_shape.values()]


def _fastcnc(batches, state):
    """Value+grad as TSCNC computes it: host-steered certificates on CPU, two fixed sync-free rounds on CUDA (the
    certification flags are read after the timed call)."""
    leaves = [b.detach().clone().requires_grad_() for b in batches]
    device = batches[0].device
    common.sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        ests = [extreme_singular_values(b.detach(), floor=EPS, state=s, sync=device.type != "cuda")
                for b, s in zip(leaves, state, strict=True)]
    total = sum(penalty_from_estimate(b, e, eps=EPS, from_these_weights=True) for b, e in zip(leaves, ests,
                                                                                               strict=True))
    total.backward()
    common.sync(device)
    return time.perf_counter() - t, ests


def _exact(batches, kind):
    """Value+grad of the exact penalty on each [B, m, n] batch as one tensor: eigvalsh of the smaller float64 Gram
    (eigh64) or svdvals, with autograd."""
    leaves = [b.detach().clone().requires_grad_() for b in batches]
    common.sync(batches[0].device)
    t = time.perf_counter()
    total = leaves[0].new_zeros((), dtype=torch.float64)
    for W in leaves:
        if kind == "svdvals":
            s = torch.linalg.svdvals(W)
            smax, smin = s[:, 0], s[:, -1]
        else:
            A = W.to(torch.float64)
            lam = torch.linalg.eigvalsh(A.mT @ A if A.shape[1] >= A.shape[2] else A @ A.mT)
            smax, smin = lam[:, -1].clamp_min(0).sqrt(), lam[:, 0].clamp_min(0).sqrt()
        total = total + _log_kappa(smax, smin).double().sum()
    total.backward()
    common.sync(batches[0].device)
    return time.perf_counter() - t


def _brackets_hold(ests, ref: torch.Tensor) -> int:
    """Blocks whose float64-SVD sigma_min and sigma_max lie in the estimate's brackets, up to the SVD's own error
    (1e-13 sigma_max, as in trajectory.py)."""
    def cat(key):
        return torch.cat([getattr(e, key) for e in ests]).double().cpu()

    slack = 1e-13 * ref[:, 0]
    ok = ((cat("sigma_min_lo") - slack <= ref[:, 1]) & (ref[:, 1] <= cat("sigma_min_hi") + slack)
          & (cat("sigma_max_lo") - slack <= ref[:, 0]) & (ref[:, 0] <= cat("sigma_max_hi") + slack))
    return int(ok.sum())


def evaluate(run: Run, repeats: int, steps: list[int] | None, device: torch.device | None = None,
             log=print) -> dict:
    device = device or torch.device("cpu")
    snaps = record(run, device, log=log)
    rows = []
    for snap in snaps:
        if "prev_weights" not in snap or (steps and snap["step"] not in steps):
            continue
        batches = [b.to(device) for b in snapshot_blocks(snap)]
        before = [b.to(device) for b in snapshot_blocks(snap, "prev_weights")]
        ref = torch.cat([torch.linalg.svdvals(b.double().cpu())[:, [0, -1]] for b in batches])  # [blocks, (max, min)]
        ref_k = ref[:, 0] / (ref[:, 1] + EPS * ref[:, 0])
        times: dict = {}
        times["fastcnc-cold"] = min(_fastcnc(batches, [None] * len(batches))[0] for _ in range(repeats))
        for kind in ("eigh64", "svdvals"):
            times[kind] = min(_exact(batches, kind) for _ in range(repeats))
        warm = [SpectralState() for _ in batches]
        with torch.no_grad():
            for b, s in zip(before, warm, strict=True):
                extreme_singular_values(b, floor=EPS, state=s, sync=device.type != "cuda")
        best, ests = math.inf, None
        for _ in range(repeats):
            dt, ests = _fastcnc(batches, copy.deepcopy(warm))
            best = min(best, dt)
        times["fastcnc-1step"] = best
        smax = torch.cat([e.sigma_max for e in ests]).cpu()
        smin = torch.cat([e.sigma_min for e in ests]).cpu()
        k = smax / (smin + EPS * smax)
        row = {"step": snap["step"], "phase": snap["phase"], "sparsity": snap["sparsity"],
               "blocks": int(ref.shape[0]), "shapes": [list(b.shape[1:]) for b in batches],
               "kappa_exact_max": float(ref_k.max()), "kappa_rel_err_max": float(((k - ref_k).abs() / ref_k).max()),
               "certified": int(sum(int(e.certified.sum()) for e in ests)),
               "fallbacks": int(sum(e.work["fallbacks"] for e in ests)),
               "brackets_hold": _brackets_hold(ests, ref),
               "times_s": times}
        rows.append(row)
        log(f"step {row['step']:3d} {row['phase']:8s} sparsity {row['sparsity']:.2f}: {row['blocks']} blocks, "
            f"kappa err {row['kappa_rel_err_max']:.1e}, certified {row['certified']}, "
            + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in times.items()))
    return {**environment(device), "run": run.name, "repeats": repeats, "threads": torch.get_num_threads(),
            "rows": rows}


def markdown(res: dict) -> str:
    lines = [f"# Per-frequency blocks of trained convolutions ({res['run']})", "",
             f"{res['device']}, {res['threads']} torch thread(s), torch {res['torch']}, {res['date']}, commit "
             f"{res['commit']}; min of {res['repeats']} per method; value+grad of the CNC penalty (eps {EPS:g}) over "
             "every block. `1-step`: fastcnc warm from the blocks one training step earlier (on CUDA: two sync-free "
             "rounds, as TSCNC's eager call).", "",
             "| step | phase | sparsity | blocks | max kappa | kappa err | certified | brackets hold | fallbacks | "
             "fastcnc cold ms | 1-step ms | eigh64 ms | svdvals ms | 1-step x eigh64 | cold x eigh64 | "
             "1-step x svdvals |", "|" + "---|" * 16]
    for r in res["rows"]:
        t = r["times_s"]
        lines.append(f"| {r['step']} | {r['phase']} | {r['sparsity']:.2f} | {r['blocks']} | "
                     f"{r['kappa_exact_max']:.3g} | {r['kappa_rel_err_max']:.1e} | {r['certified']} | "
                     f"{r['brackets_hold']} | {r['fallbacks']} | {t['fastcnc-cold'] * 1e3:.0f} | "
                     f"{t['fastcnc-1step'] * 1e3:.0f} | {t['eigh64'] * 1e3:.0f} | {t['svdvals'] * 1e3:.0f} | "
                     f"{t['eigh64'] / t['fastcnc-1step']:.2f} | {t['eigh64'] / t['fastcnc-cold']:.2f} | "
                     f"{t['svdvals'] / t['fastcnc-1step']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="resnet18-w16-s95", choices=[r.name for r in PRESETS["cpu"]],
                   help="recorded run whose 3x3 convolutions give the blocks")
    p.add_argument("--tiny", action="store_true", help="the tiny preset's run instead (seconds: dry runs)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (the run is recorded on it)")
    p.add_argument("--steps", default="", help="comma-separated recorded steps to keep (default: all but the first)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the figures in docs)")
    p.add_argument("--out", default=None, help="folder for blocks-cpu-<date>-<run>.{json,md}")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    torch.set_num_threads(args.threads)
    steps = [int(s) for s in args.steps.split(",") if s] or None
    run = PRESETS["tiny"][0] if args.tiny else next(r for r in PRESETS["cpu"] if r.name == args.run)
    device = torch.device(args.device)
    res = evaluate(run, args.repeats, steps, device)
    md = markdown(res)
    print(md)
    if args.out:
        tag = "tiny-" if args.tiny else ""
        paths = write_result(args.out, f"blocks-{device.type}-{res['date']}-{tag}{run.name}", res, md)
        print(f"wrote {paths[0]} and {paths[1]}")
    return res


if __name__ == "__main__":
    main()
