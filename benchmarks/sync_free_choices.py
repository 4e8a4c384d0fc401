"""How often one sync-free round certifies, per choice of what it factors: the data behind the engine's CUDA defaults.

A sync-free call (TSCNC on CUDA: no host sync, so no round can be added for the layers that failed) factors the
first round's shifted Gram at several shifts at once (``spectral._FIRST_SHIFTS`` x the previous certified lower bound
of sigma_min, plus a safe negative shift) and tests (tau, t) certificate pairs at once (``spectral._SYNC_FREE_SHARES``:
the share of the kappa budget each pair gives to sigma_max). Each shift and each pair is one float64 Cholesky per
matrix per call. This script replays one sync-free round on every 1-step snapshot of the recorded trajectories
(``benchmarks/trajectory.py``'s runs, recorded first if not cached) for each choice, from two warm states: a converged
call on the weights one training step earlier (as in training), and an exact refresh of those weights (the first
call after a pruning event), and prints the certified layer-calls and the factorizations each choice costs.

    python benchmarks/sync_free_choices.py [--preset cpu] [--runs NAME,...]

Counts only (no timing): the GPU time of the choices is what ``tscnc_step.py --first-shifts / --certificate-shares``
measures.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from trajectory import EPS, PRESETS, _matrices, record

from fastcnc import spectral
from fastcnc.spectral import SpectralState, extreme_singular_values

CHOICES = {  # name: (first shifts, certificate shares)
    "3 shifts, 2 pairs (8 per matrix)": ((0.99, 0.7, 0.3), (0.3, 0.8)),
    "3 shifts, 1 pair 0.3 (6; default)": ((0.99, 0.7, 0.3), (0.3,)),
    "3 shifts, 1 pair 0.5 (6)": ((0.99, 0.7, 0.3), (0.5,)),
    "3 shifts, 1 pair 0.8 (6)": ((0.99, 0.7, 0.3), (0.8,)),
    "1 shift, 1 pair 0.3 (4)": ((0.99,), (0.3,)),
}


def count(snaps: list[dict], device: torch.device) -> dict[str, list[int]]:
    """{warm start: {choice: [certified, layer-calls, factorizations]}} over the run's 1-step snapshots."""
    saved = spectral._FIRST_SHIFTS, spectral._SYNC_FREE_SHARES
    out = {w: {c: [0, 0, 0] for c in CHOICES} for w in ("converged", "refresh")}
    state = SpectralState()
    try:
        with torch.no_grad():
            for i, snap in enumerate(snaps):
                if i and snap.get("prev_weights") is not None:
                    mats = _matrices(snap, device)
                    for warm_kind, refresh in (("converged", False), ("refresh", True)):
                        warm = copy.deepcopy(state)
                        extreme_singular_values(_matrices(snap, device, "prev_weights"), floor=EPS, state=warm,
                                                refresh=refresh)
                        for name, (shifts, shares) in CHOICES.items():
                            spectral._FIRST_SHIFTS, spectral._SYNC_FREE_SHARES = shifts, shares
                            est = extreme_singular_values(mats, floor=EPS, state=copy.deepcopy(warm), sync=False,
                                                          max_rounds=1)
                            spectral._FIRST_SHIFTS, spectral._SYNC_FREE_SHARES = saved
                            tally = out[warm_kind][name]
                            tally[0] += int(est.certified.sum())
                            tally[1] += len(mats)
                            tally[2] += int(est.work["factorizations"])
                extreme_singular_values(_matrices(snap, device), floor=EPS, state=state)
    finally:
        spectral._FIRST_SHIFTS, spectral._SYNC_FREE_SHARES = saved
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--runs", default=None, help="comma-separated run names of the preset (default: all)")
    a = p.parse_args(argv)
    runs = PRESETS[a.preset]
    if a.runs:
        runs = [r for r in runs if r.name in a.runs.split(",")]
        if not runs:
            p.error(f"--runs {a.runs!r} names none of the preset's runs: {[r.name for r in PRESETS[a.preset]]}")
    device = torch.device("cpu")
    totals = {w: {c: [0, 0, 0] for c in CHOICES} for w in ("converged", "refresh")}
    lines = ["| run | warm from | " + " | ".join(CHOICES) + " |", "|---|---|" + "---|" * len(CHOICES)]
    for run in runs:
        got = count(record(run, device, log=lambda *_: None), device)
        for warm_kind, per in got.items():
            cells = []
            for name, (ok, n, f) in per.items():
                totals[warm_kind][name] = [a + b for a, b in zip(totals[warm_kind][name], (ok, n, f), strict=True)]
                cells.append(f"{ok}/{n} ({f / max(n, 1):.0f})")
            lines.append(f"| {run.name} | {warm_kind} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    for warm_kind, per in totals.items():
        lines.append(f"| **all** | {warm_kind} | " + " | ".join(f"**{ok}/{n}** ({f / max(n, 1):.0f})"
                                                              for ok, n, f in per.values()) + " |")
    print("\nCertified layer-calls of one sync-free round / layer-calls (factorizations per layer-call), every 1-step "
          f"snapshot of the `{a.preset}` trajectories:\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
