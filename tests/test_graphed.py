"""GraphedEngine: replaying a captured sync-free engine call gives exactly the eager call's estimates and state.

On CPU a stand-in graph re-runs the captured function at each replay and copies its results into the tensors the
capture returned (what a CUDA graph replay does to its static outputs), so the buffer protocol (weights and state
copied in, state written back, results copied out) is checked here; the real capture runs in the GPU session
(tests marked cuda below, benchmarks/tscnc_step.py).
"""

from __future__ import annotations

import pytest
import torch

from fastcnc import _backend
from fastcnc.graphed import GraphedEngine
from fastcnc.spectral import SpectralState, extreme_singular_values, packed_vectors

OPTIONS = dict(rtol=1e-2, floor=1e-6, block=4, iters=3, max_rounds=4)
FIELDS = ("sigma_max", "sigma_min", "sigma_max_lo", "sigma_max_hi", "sigma_min_lo", "sigma_min_hi", "certified",
          "fallback", "structural", "finite")


def _tensors(est):
    out = [getattr(est, f) for f in FIELDS]
    if est.first_round_certified is not None:
        out.append(est.first_round_certified)
    for name in ("u_max", "v_max", "u_min", "v_min"):
        out.extend(getattr(est, name))
    for g in est.groups:
        out.extend([g.U, g.V])
    return out


class ReplayOnCPU:
    """Stand-in for torch.cuda.CUDAGraph: replay recomputes and overwrites the captured outputs in place."""

    def capture(self, fn, warmup):
        warmup()
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self):
        new = self.fn()
        for dst, src in zip(_tensors(self.out), _tensors(new), strict=True):
            dst.copy_(src)


class FailingGraph:
    def capture(self, fn, warmup):
        raise RuntimeError("operation not permitted when stream is capturing")


def _pruned(shape, density, gen):
    w = torch.randn(*shape, generator=gen)
    return w * (torch.rand(*shape, generator=gen) < density)


def _weights(gen):
    # tall, wide, and two shapes that share n; pruned like the recorded layers
    return [_pruned(s, d, gen) for s, d in (((96, 40), 0.3), ((24, 70), 0.5), ((160, 40), 0.2), ((50, 50), 0.6))]


def _drift(mats, gen, scale=1e-3):
    return [m + scale * torch.randn(m.shape, generator=gen) * (m != 0) for m in mats]


def _same(a, b):
    for x, y in zip(_tensors(a), _tensors(b), strict=True):
        assert torch.equal(x, y)
    assert a.work == b.work


def _run_pair(steps, gen, graphed):
    mats = _weights(gen)
    ref, st = SpectralState(), SpectralState()
    extreme_singular_values(mats, state=ref, sync=False, refresh=True, **OPTIONS)
    extreme_singular_values(mats, state=st, sync=False, refresh=True, **OPTIONS)
    assert graphed(mats, SpectralState()) is None  # cold: the caller runs it eagerly
    for _ in range(steps):
        mats = _drift(mats, gen)
        want = extreme_singular_values(mats, state=ref, sync=False, **OPTIONS)
        got = graphed(mats, st)
        assert got is not None
        _same(got, want)
        for a, b in zip(st.blocks + st.lower, ref.blocks + ref.lower, strict=True):
            assert torch.equal(a, b)
    return mats, ref, st


@pytest.fixture(params=["cpu", pytest.param("cuda-path", marks=pytest.mark.interpret)])
def code_path(request):
    """The CPU path, or the CUDA code path on CPU tensors (batches merged by n, the vectors packed in one buffer)."""
    if request.param == "cpu":
        yield request.param
    else:
        with _backend.cuda_code_path():
            yield request.param


def test_replay_equals_the_eager_call_step_after_step(code_path):
    gen = torch.Generator().manual_seed(0)
    graphed = GraphedEngine(OPTIONS, graph_factory=ReplayOnCPU)
    _run_pair(4, gen, graphed)
    assert (graphed.captures, graphed.replays) == (1, 4)


def test_state_replaced_outside_the_graph_is_copied_in():
    gen = torch.Generator().manual_seed(1)
    graphed = GraphedEngine(OPTIONS, graph_factory=ReplayOnCPU)
    mats, ref, st = _run_pair(2, gen, graphed)
    # an exact refresh (a pruning step) rebinds the state's tensors; the next replay must start from them
    mats = _drift(mats, gen)
    extreme_singular_values(mats, state=ref, sync=False, refresh=True, **OPTIONS)
    extreme_singular_values(mats, state=st, sync=False, refresh=True, **OPTIONS)
    mats = _drift(mats, gen)
    _same(graphed(mats, st), extreme_singular_values(mats, state=ref, sync=False, **OPTIONS))
    assert graphed.captures == 1


def test_an_estimate_outlives_the_next_replay(code_path):
    gen = torch.Generator().manual_seed(2)
    graphed = GraphedEngine(OPTIONS, graph_factory=ReplayOnCPU)
    mats, _, st = _run_pair(1, gen, graphed)
    first = graphed(_drift(mats, gen), st)
    # on the CUDA path every group's vectors are views of one buffer, copied out of the graph in one op
    assert (packed_vectors(first.groups) is not None) == (code_path == "cuda-path")
    saved = [t.clone() for t in _tensors(first)]
    second = graphed(_drift(mats, gen, 1e-1), st)
    assert not torch.equal(first.sigma_max, second.sigma_max)
    for a, b in zip(_tensors(first), saved, strict=True):
        assert torch.equal(a, b)


def test_new_shapes_capture_again_and_a_failed_capture_warns_and_runs_eagerly():
    gen = torch.Generator().manual_seed(3)
    graphed = GraphedEngine(OPTIONS, graph_factory=ReplayOnCPU)
    _run_pair(1, gen, graphed)
    other = [_pruned((64, 30), 0.4, gen)]
    st = SpectralState()
    extreme_singular_values(other, state=st, sync=False, refresh=True, **OPTIONS)
    assert graphed(_drift(other, gen), st) is not None
    assert graphed.captures == 2

    failing = GraphedEngine(OPTIONS, graph_factory=FailingGraph)
    with pytest.warns(RuntimeWarning, match="capture of the spectral engine failed"):
        assert failing(_drift(other, gen), st) is None
    assert failing.disabled is not None and failing(_drift(other, gen), st) is None  # off for good, no new warning


def test_options_per_call_get_their_own_graph_on_the_same_buffers():
    # TSCNC switches between one and two fixed rounds: each has its graph, captured once, and each replay starts
    # from the state the other one left
    gen = torch.Generator().manual_seed(6)
    graphed = GraphedEngine(OPTIONS, graph_factory=ReplayOnCPU)
    mats = _weights(gen)
    ref, st = SpectralState(), SpectralState()
    extreme_singular_values(mats, state=ref, sync=False, refresh=True, **OPTIONS)
    extreme_singular_values(mats, state=st, sync=False, refresh=True, **OPTIONS)
    for rounds in (2, 1, 1, 2, 1):
        mats = _drift(mats, gen)
        want = extreme_singular_values(mats, state=ref, sync=False, **(OPTIONS | {"max_rounds": rounds}))
        got = graphed(mats, st, max_rounds=rounds)
        assert got.work["rounds"] == rounds and got.first_round_certified is not None
        _same(got, want)
    assert (graphed.captures, graphed.replays) == (2, 5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_matches_the_eager_call():
    gen = torch.Generator().manual_seed(4)
    mats = [m.cuda() for m in _weights(gen)]
    ref, st = SpectralState(), SpectralState()
    extreme_singular_values(mats, state=ref, sync=False, refresh=True, **OPTIONS)
    extreme_singular_values(mats, state=st, sync=False, refresh=True, **OPTIONS)
    graphed = GraphedEngine(OPTIONS)
    for rounds in (2, 1, 1, 2):  # one graph per round count (TSCNC switches), on the same buffers
        mats = [m.cpu() for m in mats]
        mats = [m.cuda() for m in _drift(mats, gen)]
        want = extreme_singular_values(mats, state=ref, sync=False, **(OPTIONS | {"max_rounds": rounds}))
        got = graphed(mats, st, max_rounds=rounds)
        assert got is not None, graphed.disabled
        for x, y in zip(_tensors(got), _tensors(want), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    assert (graphed.captures, graphed.replays) == (2, 4)


def test_batches_branch_only_inside_a_cuda_capture():
    # side streams exist only for CUDA devices and are used only while a capture is under way: eager calls, CPU
    # tensors and the simulated CUDA path solve their batches in order on the current stream
    from fastcnc import spectral

    spectral.prepare_capture_branches(torch.device("cpu"))
    assert torch.device("cpu") not in spectral._branch_streams
    assert spectral._capture_branches(torch.device("cpu")) is None
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        spectral.prepare_capture_branches(device)
        assert len(spectral._branch_streams[device]) == spectral._GRAPH_BRANCHES
        assert spectral._capture_branches(device) is None  # (not capturing)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_solves_batches_on_parallel_branches_like_the_eager_call(monkeypatch):
    # three batches (n = 40, 200, 300) captured side by side on the side streams, replayed warm after drift: the
    # same values, flags and vectors as eager calls, which run the batches one after another on one stream
    from fastcnc import spectral

    branched = []
    pick = spectral._capture_branches

    def spy(device):
        out = pick(device)
        branched.append(out is not None)
        return out

    monkeypatch.setattr(spectral, "_capture_branches", spy)
    gen = torch.Generator().manual_seed(6)
    shapes = (((96, 40), 0.3), ((400, 200), 0.2), ((200, 600), 0.1), ((300, 900), 0.05), ((24, 70), 0.5))
    mats = [_pruned(s, d, gen).cuda() for s, d in shapes]
    ref, st = SpectralState(), SpectralState()
    extreme_singular_values(mats, state=ref, sync=False, refresh=True, **OPTIONS)
    extreme_singular_values(mats, state=st, sync=False, refresh=True, **OPTIONS)
    graphed = GraphedEngine(OPTIONS)
    for rounds in (2, 1, 1):
        mats = [m.cuda() for m in _drift([m.cpu() for m in mats], gen)]
        want = extreme_singular_values(mats, state=ref, sync=False, **(OPTIONS | {"max_rounds": rounds}))
        got = graphed(mats, st, max_rounds=rounds)
        assert got is not None, graphed.disabled
        for x, y in zip(_tensors(got), _tensors(want), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    # eager calls never branch; the captures (one per round count) did
    assert True in branched and graphed.captures == 2


@pytest.mark.skipif(not _backend.INTERPRET, reason="the CUDA code path on CPU tensors needs TRITON_INTERPRET=1")
def test_tscnc_with_replayed_graphs_trains_exactly_like_eager_through_pruning_and_a_reload():
    # the whole TSCNC protocol on the CUDA code path (sync-free calls, flags read one call late, one or two rounds,
    # exact refreshes after pruning, a checkpoint reload), once replaying graphs and once eagerly: the same losses
    # and gradients at every step
    from torch import nn

    from fastcnc.layers import MaskedConv2d, MaskedLinear
    from fastcnc.pruning import prune_magnitude
    from fastcnc.regularizer import TSCNC

    def model():
        torch.manual_seed(0)
        return nn.Sequential(MaskedConv2d(3, 16, 3), nn.ReLU(), MaskedConv2d(16, 16, 3), nn.ReLU(), nn.Flatten(),
                             MaskedLinear(16 * 4 * 4, 10))

    nets = [model(), model()]
    regs = [TSCNC(n, lambda_tsc=1e-4, lambda_cnc=1e-2) for n in nets]
    regs[0]._graphed = GraphedEngine(regs[0]._graphed.options, graph_factory=ReplayOnCPU)
    regs[0]._use_graph = lambda mats: True
    regs[1]._graphed = None
    opts = [torch.optim.SGD(n.parameters(), lr=0.05) for n in nets]
    gen = torch.Generator().manual_seed(1)
    rounds = []
    with _backend.cuda_code_path():
        for step in range(12):
            x = torch.randn(8, 3, 8, 8, generator=gen)
            if step in (4, 8):  # pruning: the masks change, the next call refreshes exactly
                for n in nets:
                    prune_magnitude(n, 0.5 if step == 4 else 0.8)
            if step == 6:  # kill and resume: the graphed run reloads its own checkpoint
                state = {"model": nets[0].state_dict(), "reg": regs[0].state_dict()}
                nets[0].load_state_dict(state["model"])
                regs[0].load_state_dict(state["reg"])
            losses = []
            for n, reg, opt in zip(nets, regs, opts, strict=True):
                opt.zero_grad()
                loss = n(x).square().mean() + reg()
                loss.backward()
                losses.append(loss)
            torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
            for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
                torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
            rounds.append(regs[0].last_estimate.work["rounds"])
            for opt in opts:
                opt.step()
    graphed = regs[0]._graphed
    assert graphed.replays > 0 and graphed.disabled is None
    assert 1 in rounds and 2 in rounds  # both graphs were used
    assert regs[0].work == regs[1].work
