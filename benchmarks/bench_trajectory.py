"""pytest-benchmark: CNC penalty value+grad on weights recorded along a real (tiny) training run.

Run: pytest benchmarks/bench_trajectory.py --benchmark-enable [--benchmark-json out.json]
(`--benchmark-disable` runs each target once: a smoke test.) The trajectory is the ``tiny`` preset of
benchmarks/trajectory.py (ResNet-18 width 16, dense -> 95% gradual pruning -> fine-tuning, recorded and cached under
runs/trajectories/); the timed call is on its last snapshot, fastcnc warm-started from the one before. Group
``cnc-trajectory-resnet18-w16`` compares fastcnc with eigvalsh of the float64 Gram (of the whole matrix, and of its
nonzero rows), of the float32 Gram, and svdvals. The full
benchmark with per-step accuracy and certificates is ``python benchmarks/run.py trajectory``.
"""

import copy

import pytest
import torch
from common import device_name
from trajectory import EPS, PRESETS, _exact_method, _matrices, record

from fastcnc.cnc import penalty_from_estimate
from fastcnc.spectral import SpectralState, extreme_singular_values

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = ("fastcnc", "eigh64", "eigh64r", "eigh32", "svdvals")


@pytest.fixture(scope="module")
def snapshots():
    torch.set_num_threads(1) if DEVICE.type == "cpu" else None
    snaps = record(PRESETS["tiny"][0], DEVICE, log=lambda *_: None)
    prev, last = _matrices(snaps[-2], DEVICE), _matrices(snaps[-1], DEVICE)
    state = SpectralState()
    extreme_singular_values(prev, floor=EPS, state=state)
    return state, last


@pytest.mark.parametrize("impl", IMPLS)
def test_cnc_trajectory_value_and_grad(benchmark, impl, snapshots):
    state0, mats = snapshots
    leaves = [m.clone().requires_grad_(True) for m in mats]

    def step():
        for m in leaves:
            m.grad = None
        if impl == "fastcnc":
            with torch.no_grad():
                est = extreme_singular_values([m.detach() for m in leaves], floor=EPS, state=copy.deepcopy(state0),
                                              sync=DEVICE.type != "cuda")
            p = penalty_from_estimate(leaves, est, eps=EPS, from_these_weights=True)
        else:
            p, _ = _exact_method(leaves, impl)
        p.backward()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return p

    value = step()
    if impl == "fastcnc":  # never time a wrong answer: within the certified accuracy of the exact float64 penalty
        exact, _ = _exact_method([m.detach().double() for m in mats], "svdvals")
        assert abs(float(value) - float(exact)) <= 1e-2 * len(mats)  # |log kappa error| <= rtol per layer
    benchmark.group = "cnc-trajectory-resnet18-w16"
    benchmark.extra_info.update(impl=impl, device=device_name(DEVICE), torch=torch.__version__, matrices=len(mats))
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)


def test_sync_free_choices_count_on_the_tiny_run():
    """benchmarks/sync_free_choices.py on the tiny run: every choice replayed from both warm starts, and the default
    costs the factorizations it should (a safe shift plus three first shifts, and one (tau, t) pair)."""
    from sync_free_choices import CHOICES, count

    got = count(record(PRESETS["tiny"][0], torch.device("cpu"), log=lambda *_: None), torch.device("cpu"))
    for per in got.values():
        assert set(per) == set(CHOICES)
        for ok, n, factorizations in per.values():
            assert n > 0 and 0 <= ok <= n and factorizations > 0
        ok, n, f = per["3 shifts, 1 pair 0.3 (6; default)"]
        assert f <= 6 * n and per["3 shifts, 2 pairs (8 per matrix)"][2] > f
