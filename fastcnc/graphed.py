"""CUDA-graph replay of the spectral engine's sync-free call (what ``TSCNC`` runs on CUDA every step).

Why: the sync-free call issues thousands of small kernels for ResNet-50 (shifted Cholesky factorizations, products
and Rayleigh-Ritz steps per batch). On an H200 its host side took 225 ms of a 229 ms step against ~48 ms of kernel
time (benchmarks/results/gpu-2026-11-27-h200-s10, two rounds): eagerly, the step is bound by Python and launches.
The call has no host sync and, warm, the same shapes and the same work every step, so it can be captured once and
replayed: one launch on the host. Inside the capture the engine builds and solves its batches on parallel branches of
the graph (side streams made by ``spectral.prepare_capture_branches`` before capture): each batch is a chain of
latency-bound kernels, so side by side they fill the device (ResNet-50 on an H200: 14.5-14.9 -> 9.9-10.3 ms per step).

Static buffers: a contiguous copy of every matrix and the warm state (bottom/top blocks and the previous lower bound
of sigma_min per matrix), which the graph reads at its start and overwrites with the new state at its end. Before
each replay the weights are copied in, and so is any state that was replaced outside the graph (an exact refresh
after pruning, a loaded checkpoint). After it the caller gets an estimate whose tensors are its own (values, flags
and vectors cloned out of the graph's pool): a second call before the first one's backward cannot overwrite them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from fastcnc.spectral import (
    SpectralEstimate,
    SpectralState,
    VectorGroup,
    extreme_singular_values,
    group_vectors,
    pack_vectors,
    packed_vectors,
    prepare_capture_branches,
    warm_block_width,
)

__all__ = ["GraphedEngine"]


class _TorchCudaGraph:
    """torch.cuda.CUDAGraph behind the two calls GraphedEngine needs (tests substitute a CPU stand-in)."""

    def capture(self, fn: Callable[[], SpectralEstimate], warmup: Callable[[], object]) -> SpectralEstimate:
        # the eager warm-up runs on a side stream, as torch.cuda.graphs asks: cuBLAS / cuSOLVER handles and
        # workspaces must exist before capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            warmup()
        torch.cuda.current_stream().wait_stream(side)
        prepare_capture_branches(torch.device("cuda", torch.cuda.current_device()))
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            out = fn()
        return out

    def replay(self) -> None:
        self.graph.replay()


class GraphedEngine:
    """``extreme_singular_values(mats, state=state, sync=False, **options)`` by replay of a captured CUDA graph.

    ``engine(mats, state, **overrides)`` returns the estimate, or None where the call must run eagerly (the caller runs
    it): a cold or mismatched state (a cold start draws its random blocks on the host), or capture failed once (a
    RuntimeWarning says why; the engine stays off from then on). ``overrides`` replace some of the options for this
    call (TSCNC switches ``max_rounds`` between 1 and 2): one graph is captured per set of options, all reading the same
    static buffers, so switching costs a capture once and nothing after. New shapes, dtypes or devices drop the graphs
    and their buffers; the first call of each graph pays an eager warm-up and the capture.
    """

    def __init__(self, options: dict, graph_factory: Callable[[], object] | None = None) -> None:
        self.options = dict(options)
        self._factory = graph_factory or _TorchCudaGraph
        self._shapes_key = None
        self._graphs: dict = {}  # options key -> (graph, estimate of its static outputs)
        self.disabled: str | None = None  # why capture was given up, if it was
        self.captures = 0
        self.replays = 0

    def _eligible(self, mats: list[torch.Tensor], state: SpectralState, block: int) -> bool:
        shapes = [tuple(m.shape) for m in mats]
        if self.disabled is not None or not state.matches(shapes) or len(state.blocks) != len(mats):
            return False
        if not isinstance(state.lower, list) or len(state.lower) != len(mats):
            return False
        for m, b, lo in zip(mats, state.blocks, state.lower, strict=True):
            n = min(m.shape)
            want = (n, warm_block_width(n, block))
            if not (isinstance(b, torch.Tensor) and tuple(b.shape) == want and b.device == m.device):
                return False
            if not (isinstance(lo, torch.Tensor) and lo.numel() == 1 and lo.device == m.device):
                return False
        return True

    def __call__(self, mats: list[torch.Tensor], state: SpectralState, **overrides) -> SpectralEstimate | None:
        options = {**self.options, **overrides}
        if not self._eligible(mats, state, options.get("block", 4)):
            return None
        shapes_key = tuple((tuple(m.shape), m.dtype, m.device) for m in mats)
        options_key = tuple(sorted(options.items()))
        with torch.no_grad():
            if shapes_key != self._shapes_key:
                self._graphs = {}
                self._buffers(mats, state)
                self._shapes_key = shapes_key
            if options_key not in self._graphs:
                try:
                    self._graphs[options_key] = self._capture(state, options)
                except Exception as err:  # noqa: BLE001 - any capture failure: run eagerly from now on, loudly
                    self.disabled = f"{type(err).__name__}: {err}"
                    self._graphs, self._shapes_key = {}, None
                    warnings.warn(f"fastcnc: CUDA-graph capture of the spectral engine failed ({self.disabled}); "
                                  "the engine runs eagerly (same results, more host time)", RuntimeWarning,
                                  stacklevel=3)
                    return None
                self.captures += 1
            graph, est = self._graphs[options_key]
            torch._foreach_copy_(self._mats, mats)  # (one multi-tensor launch instead of a copy per matrix)
            for buf, cur in ((self._blocks, state.blocks), (self._lower, state.lower)):
                for dst, src in zip(buf, cur, strict=True):
                    if src is not dst:  # replaced outside the graph since the last replay
                        dst.copy_(src.reshape(dst.shape))
            graph.replay()
            self.replays += 1
            state.blocks, state.lower = list(self._blocks), list(self._lower)
            return _detached_copy(est)

    def _buffers(self, mats: list[torch.Tensor], state: SpectralState) -> None:
        self._mats = [m.detach().clone(memory_format=torch.contiguous_format) for m in mats]
        self._blocks = [b.detach().clone() for b in state.blocks]
        self._lower = [v.detach().reshape(()).to(torch.float64).clone() for v in state.lower]

    def _capture(self, state: SpectralState, options: dict):
        shapes = list(state.shapes)

        def run(write_back: bool) -> SpectralEstimate:
            st = SpectralState()
            st.shapes = shapes
            st.blocks = list(self._blocks) if write_back else [b.clone() for b in self._blocks]
            st.lower = list(self._lower) if write_back else [v.clone() for v in self._lower]
            est = extreme_singular_values(self._mats, state=st, sync=False, **options)
            if write_back:  # the graph's last kernels: the new state into the buffers the next replay reads
                # (multi-tensor copies: two launches, not two per matrix at the end of the graph's critical path)
                torch._foreach_copy_(self._blocks, st.blocks)
                torch._foreach_copy_(self._lower, st.lower)
            return est

        # a CUDA capture runs no kernel, but a stand-in may: the state buffers are put back as they were
        saved = [b.clone() for b in self._blocks + self._lower]
        graph = self._factory()
        est = graph.capture(lambda: run(True), lambda: run(False))
        for dst, src in zip(self._blocks + self._lower, saved, strict=True):
            dst.copy_(src)
        return graph, est


def _detached_copy(est: SpectralEstimate) -> SpectralEstimate:
    """The estimate with its own tensors (few copies: values and flags stacked, vectors per shape group)."""
    values = torch.stack([est.sigma_max, est.sigma_min, est.sigma_max_lo, est.sigma_max_hi, est.sigma_min_lo,
                          est.sigma_min_hi])
    first = est.first_round_certified
    flags = torch.stack([est.certified, est.fallback, est.structural, est.finite]
                        + ([first] if first is not None else []))
    packed = packed_vectors(est.groups)
    if packed is not None:
        groups = pack_vectors(est.groups, packed.clone())
    else:
        groups = [VectorGroup(g.index, g.wide, g.U.clone(), g.V.clone()) for g in est.groups]
    u_max, v_max, u_min, v_min = group_vectors(groups, len(est.u_max))
    return SpectralEstimate(
        sigma_max=values[0], sigma_min=values[1], sigma_max_lo=values[2], sigma_max_hi=values[3],
        sigma_min_lo=values[4], sigma_min_hi=values[5], certified=flags[0], fallback=flags[1], structural=flags[2],
        finite=flags[3], u_max=u_max, v_max=v_max, u_min=u_min, v_min=v_min, work=dict(est.work), rtol=est.rtol,
        floor=est.floor, bottom=None, groups=groups, first_round_certified=flags[4] if first is not None else None)
