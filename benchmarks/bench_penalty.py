"""pytest-benchmark: CNC penalty value+grad over the ResNet-18 layer set, fastcnc vs exact baselines, on synthetic
drift (the easy case; bench_trajectory.py runs on recorded training weights).

Run: pytest benchmarks/bench_penalty.py --benchmark-enable [--benchmark-json out.json]
(`--benchmark-disable` runs each target once: a smoke test.) Group `cnc-penalty-<model>` compares the impls.
"""

import pytest
import torch
from common import device_name
from penalty import IMPLS, drift, layer_matrices, make_step, penalty_exact

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def resnet18_mats():
    prev = layer_matrices("resnet18", DEVICE)
    return prev, drift(prev)


@pytest.mark.parametrize("impl", IMPLS)
def test_cnc_penalty_value_and_grad(benchmark, impl, resnet18_mats):
    prev, cur = resnet18_mats
    mats = [m.clone().requires_grad_(True) for m in cur]
    step = make_step(impl, mats) if impl == "fastcnc" else make_step(impl, mats)
    value = step()
    # never time a wrong answer: the penalty must agree with the exact float64 one
    exact = penalty_exact([m.detach().double() for m in mats], "svdvals")
    assert abs(value.item() - exact.item()) < 1e-3 * abs(exact.item())
    benchmark.group = "cnc-penalty-resnet18"
    benchmark.extra_info.update(impl=impl, device=device_name(DEVICE), torch=torch.__version__, matrices=len(mats))

    def run():
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=3 if impl == "svdvals" else 10, warmup_rounds=1)
