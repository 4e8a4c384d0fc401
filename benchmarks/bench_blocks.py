"""pytest-benchmark: CNC penalty value+grad over thousands of small same-shape matrices, the per-frequency blocks of
the 3x3 convolutions of a recorded (tiny) training run (``blocks.py``; the full table is ``python benchmarks/run.py
blocks``).

Run: pytest benchmarks/bench_blocks.py --benchmark-enable [--benchmark-json out.json]
(`--benchmark-disable` runs each target once: a smoke test.) Group ``cnc-blocks-resnet18-w16`` compares fastcnc
(warm from the blocks one training step earlier, each shape passed as one [B, m, n] tensor) with eigvalsh of the
float64 Gram and svdvals.
"""

import copy

import pytest
import torch
from blocks import _exact, _fastcnc, frequency_blocks, snapshot_blocks
from common import device_name
from trajectory import EPS, PRESETS, record

from fastcnc.spectral import SpectralState, extreme_singular_values


def test_frequency_blocks_are_the_circular_convolution():
    """The blocks' singular values, each twice, are those of the circular convolution as an explicit matrix."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    size = 5
    basis = torch.eye(2 * size * size, dtype=torch.float64).reshape(-1, 2, size, size)
    padded = torch.nn.functional.pad(basis, (1, 1, 1, 1), mode="circular")
    op = torch.nn.functional.conv2d(padded, w).reshape(2 * size * size, -1).T  # [3 * 25, 2 * 25]
    want = torch.linalg.svdvals(op)
    blocks = frequency_blocks(w, size).double()
    assert blocks.shape == (size * size, 6, 4)
    got = torch.linalg.svdvals(blocks).flatten().sort(descending=True).values
    assert torch.allclose(got[0::2], want, rtol=1e-5, atol=1e-6) and torch.allclose(got[1::2], want, rtol=1e-5,
                                                                                     atol=1e-6)


@pytest.fixture(scope="module")
def blocks():
    torch.set_num_threads(1)
    snaps = record(PRESETS["tiny"][0], torch.device("cpu"), log=lambda *_: None)
    batches, before = snapshot_blocks(snaps[-1]), snapshot_blocks(snaps[-1], "prev_weights")
    warm = [SpectralState() for _ in batches]
    with torch.no_grad():
        for b, s in zip(before, warm, strict=True):
            extreme_singular_values(b, floor=EPS, state=s)
    return batches, warm


@pytest.mark.parametrize("impl", ("fastcnc", "eigh64", "svdvals"))
def test_cnc_blocks_value_and_grad(benchmark, impl, blocks):
    batches, warm = blocks
    if impl == "fastcnc":  # never time a wrong answer: every block certified, kappa within rtol of float64 SVD
        _, ests = _fastcnc(batches, copy.deepcopy(warm))
        for b, e in zip(batches, ests, strict=True):
            s = torch.linalg.svdvals(b.double())
            exact = s[:, 0] / (s[:, -1] + EPS * s[:, 0])
            est = e.sigma_max / (e.sigma_min + EPS * e.sigma_max)
            assert bool(e.certified.all()) and float(((est - exact).abs() / exact).max()) <= 1e-2

    def step():
        return _fastcnc(batches, copy.deepcopy(warm)) if impl == "fastcnc" else _exact(batches, impl)

    benchmark.group = "cnc-blocks-resnet18-w16"
    benchmark.extra_info.update(impl=impl, device=device_name("cpu"), torch=torch.__version__,
                                blocks=sum(b.shape[0] for b in batches))
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
