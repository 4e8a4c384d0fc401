"""No host syncs on the CUDA code path of a training step: the masked layers (forward + backward) and the TSC penalty.

The code runs on CPU tensors inside ``fastcnc._backend.cuda_code_path()`` (the kernels under TRITON_INTERPRET=1) and
``tests/sync_count.py`` flags every op that would make the host wait on CUDA. Each step is run once first, so cached
device tables are built outside the count (a real training loop pays for them once, not per step).
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from sync_count import count_host_syncs, format_syncs, replay_engine_on_cpu

from fastcnc import _backend, masked
from fastcnc.layers import MaskedConv2d, MaskedLinear
from fastcnc.tsc import tsc_penalty

# Without a GPU the CUDA code path runs on CPU tensors (TRITON_INTERPRET=1, set by conftest.py); with one, on the GPU.
SIMULATE = _backend.INTERPRET
DEVICE = "cuda" if not SIMULATE and torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not SIMULATE and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (CPU) or a CUDA device")


def _count(fn, *, warmup: int = 1, warm_fn=None):
    with _backend.cuda_code_path() if SIMULATE else contextlib.nullcontext():
        for _ in range(warmup):
            (warm_fn or fn)()
        with count_host_syncs(simulate=SIMULATE) as counter:
            fn()
    return counter


def _syncs(fn, *, warmup: int = 1):
    return _count(fn, warmup=warmup).syncs


# -- the harness itself: it must catch each kind of sync, and stay quiet on sync-free code ----------------------------

_x = torch.randn(6, 5, device=DEVICE)
_s = _x.T @ _x + torch.eye(5, device=DEVICE)
_g = torch.randn(5, device=DEVICE)

PLANTED = {
    "item": lambda: _x.sum().item(),
    "bool": lambda: bool((_x > 0).any()),
    "if-tensor": lambda: 1 if _x.sum() > 0 else 0,
    "int": lambda: int(_x.argmax()),
    "scalar-argument": lambda: _s.clone().addr_(_g, _g, alpha=_g[1]),
    "nonzero": lambda: _x.nonzero(),
    "where-1-arg": lambda: torch.where(_x > 0),
    "bool-mask-index": lambda: _x[_x > 0],
    "bool-mask-assign": lambda: _x.clone().__setitem__(_x > 0, 0.0),
    "masked_select": lambda: _x.masked_select(_x > 0),
    "unique": lambda: _x.round().unique(),
    "repeat_interleave": lambda: torch.repeat_interleave(_x.abs().long().flatten()),
    "equal": lambda: torch.equal(_x, _x),
    "tolist": lambda: _x.tolist(),
    "cpu": lambda: _x.cpu(),
    "to-cpu-string": lambda: _x.to("cpu"),
    "numpy": lambda: _x.numpy(force=True),
    "upload-python-list": lambda: torch.tensor([1, 2, 3], device=_x.device),
    "upload-host-tensor": lambda: torch.tensor([1, 2, 3]).to(_x.device),
    "host-index-on-device-tensor": lambda: _x[torch.tensor([0, 2])],
    "cholesky": lambda: torch.linalg.cholesky(_s),
    "cholesky_ex-check_errors": lambda: torch.linalg.cholesky_ex(_s, check_errors=True),
    "inv": lambda: torch.linalg.inv(_s),
    "solve": lambda: torch.linalg.solve(_s, _g),
    "svdvals": lambda: torch.linalg.svdvals(_s),
    "eigvalsh": lambda: torch.linalg.eigvalsh(_s),
    "matrix_norm-2": lambda: torch.linalg.matrix_norm(_s, 2),
}


@pytest.mark.parametrize("name", list(PLANTED))
def test_harness_catches_a_planted_sync(name):
    syncs = _syncs(PLANTED[name], warmup=0)
    assert syncs, f"{name}: the counter missed a host sync"
    assert all("test_host_syncs.py" in s.where for s in syncs), format_syncs(syncs)


SYNC_FREE = {
    "matmul-and-reductions": lambda: (_x @ _s).sum(dim=0).amax(),
    "cholesky_ex": lambda: torch.linalg.cholesky_ex(_s),
    "inv_ex": lambda: torch.linalg.inv_ex(_s),
    "qr": lambda: torch.linalg.qr(_s),
    "factories": lambda: torch.zeros(3, device=_x.device) + torch.full((3,), 2.0, device=_x.device),
    "host-0dim-scalar": lambda: _x * torch.tensor(2.0),
    "host-only-arithmetic": lambda: torch.tensor([1.0, 2.0]).sum().item(),
    "where-3-args": lambda: torch.where(_x > 0, _x, 0.0),
    "nonzero_static": lambda: torch.nonzero_static(_x, size=4),
    "index-with-device-index": lambda: _x[torch.arange(2, device=_x.device)],
}


@pytest.mark.parametrize("name", list(SYNC_FREE))
def test_harness_is_quiet_on_sync_free_code(name):
    syncs = _syncs(SYNC_FREE[name], warmup=0)
    assert not syncs, f"{name}: false alarm\n{format_syncs(syncs)}"


def test_harness_catches_a_sync_planted_in_a_layer(monkeypatch):
    layer = MaskedLinear(32, 48, device=DEVICE)
    layer.set_mask(_block_mask(48, 32, 16, keep=0.25))
    x = torch.randn(7, 32, device=DEVICE)
    real_forward = MaskedLinear.forward

    def forward_with_item(self, inp):
        out = real_forward(self, inp)
        return out * float(out.detach().abs().max())  # a typical stray sync: a data-dependent Python scalar

    monkeypatch.setattr(MaskedLinear, "forward", forward_with_item)
    syncs = _syncs(lambda: layer(x).sum().backward())
    assert [s.op for s in syncs] == ["aten._local_scalar_dense.default"], format_syncs(syncs)
    assert "forward_with_item" in syncs[0].where


# -- the CUDA code path of the library ---------------------------------------------------------------------------------


def _block_mask(rows: int, cols: int, block: int, keep: float) -> torch.Tensor:
    tiles = (torch.rand(-(-rows // block), -(-cols // block)) < keep).float()
    tiles[0, 0] = 1.0
    return tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols].to(DEVICE)


@pytest.mark.parametrize("kernels", [True, False], ids=["cuda-kernels", "default"])
@pytest.mark.parametrize("keep", [0.25, 1.0], ids=["block-sparse", "dense-mask"])
def test_masked_linear_step_has_no_host_syncs(keep, kernels, one_intra_op_thread, monkeypatch):
    monkeypatch.setattr(masked, "CUDA_KERNELS", kernels)
    layer = MaskedLinear(48, 40, device=DEVICE)
    layer.set_mask(_block_mask(40, 48, 16, keep))
    x = torch.randn(2, 9, 48, device=DEVICE, requires_grad=True)

    def step():
        layer.zero_grad(set_to_none=True)
        layer(x).square().sum().backward()

    counter = _count(step)
    assert not counter.syncs, f"MaskedLinear forward+backward on the CUDA path syncs:\n{format_syncs(counter.syncs)}"
    if SIMULATE:  # the CUDA dispatch rule: with the kernels on, kernels for a block-sparse mask, else W*M + cuBLAS
        assert counter.launches == (3 if keep < 1.0 and kernels else 0), counter.launches


@pytest.mark.parametrize("kernels", [True, False], ids=["cuda-kernels", "default"])
@pytest.mark.parametrize("groups", [1, 2])
def test_masked_conv2d_step_has_no_host_syncs(groups, kernels, one_intra_op_thread, monkeypatch):
    monkeypatch.setattr(masked, "CUDA_KERNELS", kernels)
    layer = MaskedConv2d(8, 32, 3, padding=1, stride=2, groups=groups, device=DEVICE)
    layer.set_mask(_block_mask(32, 8 // groups * 9, 16, 0.2).reshape(layer.weight.shape))
    x = torch.randn(2, 8, 7, 7, device=DEVICE, requires_grad=True)

    def step():
        layer.zero_grad(set_to_none=True)
        layer(x).square().sum().backward()

    counter = _count(step)
    assert not counter.syncs, f"MaskedConv2d forward+backward on the CUDA path syncs:\n{format_syncs(counter.syncs)}"
    if SIMULATE:  # with the kernels on, the block-sparse layer runs the fwd, dX and dW kernels; by default cuDNN
        assert counter.launches == (3 if kernels else 0), counter.launches


def _tsc_weights():
    return [torch.randn(16, 3, 3, 3, device=DEVICE, requires_grad=True),
            torch.randn(10, 16, device=DEVICE, requires_grad=True)]


def test_tsc_penalty_step_has_no_host_syncs(one_intra_op_thread):
    weights = _tsc_weights()

    def step():
        for w in weights:
            w.grad = None
        tsc_penalty(weights, check_finite=False).backward()

    counter = _count(step)
    assert not counter.syncs, f"tsc_penalty forward+backward on the CUDA path syncs:\n{format_syncs(counter.syncs)}"
    assert counter.launches == 3 or not SIMULATE, "value + per-layer sum in the forward, gradient in the backward"


def test_tsc_penalty_finite_check_is_counted(one_intra_op_thread):
    # the default check_finite=True waits for the device by design (documented): the counter must see it
    weights = _tsc_weights()
    syncs = _syncs(lambda: tsc_penalty(weights).backward())
    assert syncs and all("tsc.py" in s.where for s in syncs), format_syncs(syncs)


@pytest.mark.parametrize("attack", ["pgd", "trades"])
def test_training_attacks_have_no_host_syncs(attack, one_intra_op_thread):
    # the training step calls the attack every step: its input checks must not read x's values on the CUDA path
    from torch import nn

    from fastcnc.attacks import pgd, trades_adversary

    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).to(DEVICE)
    x = torch.rand(3, 1, 6, 6, device=DEVICE)
    y = torch.randint(0, 5, (3,), device=DEVICE)
    if attack == "pgd":
        syncs = _syncs(lambda: pgd(model, x, y, eps=0.1, step_size=0.05, steps=2))
    else:
        syncs = _syncs(lambda: trades_adversary(model, x, eps=0.1, step_size=0.05, steps=2))
    assert not syncs, f"{attack} on the CUDA path syncs:\n{format_syncs(syncs)}"


# -- the TSCNC step (owned by the spectral engine; see docs/spectral.md) -----------------------------------------------


def _tscnc_model(kind: str = "conv"):
    from torch import nn

    from fastcnc.layers import MaskedConv2d, MaskedLinear

    torch.manual_seed(0)
    if kind == "shared":
        # one tall shape in both orientations ([16, 8] and [8, 16]) and another tall shape with the same n ([24, 8]):
        # the CUDA path batches them together (A padded to the largest m) and splits the backward per orientation
        return nn.Sequential(MaskedLinear(8, 16), MaskedLinear(16, 8), MaskedLinear(8, 24), MaskedLinear(24, 10),
                             MaskedLinear(10, 16)).to(DEVICE)
    model = nn.Sequential(MaskedConv2d(3, 8, 3), nn.ReLU(), MaskedConv2d(8, 8, 3, groups=2), nn.Flatten(),
                          MaskedLinear(8 * 2 * 2, 10)).to(DEVICE)
    mask = (torch.rand(8, 3, 3, 3, device=DEVICE) > 0.5).float()
    model[0].set_mask(mask)
    return model


def _count_steady_step(model, reg, warmup: int):
    """The counter of one ``reg().backward()`` step after ``warmup`` of them."""

    def step():
        for p in model.parameters():
            p.grad = None
        reg().backward()

    def warm_step():
        step()
        if not SIMULATE:
            # warm-up only: let the flags land, so the switch to one round (and that graph's one-off capture, which
            # synchronises by design) happens here and the counted step is the steady state
            torch.cuda.synchronize()

    return _count(step, warmup=warmup, warm_fn=warm_step)


def _tscnc_step_syncs(lambda_tsc: float, kind: str = "conv"):
    from fastcnc.regularizer import TSCNC

    model = _tscnc_model(kind)
    reg = TSCNC(model, lambda_tsc=lambda_tsc, lambda_cnc=1e-2)
    # warm-up: the exact refresh (an SVD: first call and mask changes), two rounds, then one round
    counter = _count_steady_step(model, reg, warmup=3)
    syncs = counter.syncs
    if SIMULATE:  # on CPU the previous step's flags are not in pinned memory: reading them is the one simulated copy
        syncs = [s for s in syncs if "_read_pending" not in s.where]
        assert len(syncs) < len(counter.syncs), "the deferred certificate read must run (and be the only exemption)"
    # fixed rounds, sync-free: one once the previous call's first round certified every layer
    assert reg.last_estimate.work["rounds"] == 1
    assert reg.last_estimate.work["fallbacks"] == 0
    return syncs


@pytest.mark.parametrize("route", ["batched", "halves"])
def test_tscnc_cnc_step_has_no_host_syncs(route, one_intra_op_thread, monkeypatch):
    if route == "halves":  # the factorizations by halves (spectral._CHOL_HALVES)
        from fastcnc import spectral

        monkeypatch.setitem(spectral._CHOL_HALVES, "cuda", (4, 2))  # (the model's n are 4-10: one batch of n 10)
        monkeypatch.setattr(spectral, "_INVERSE_BY_PRODUCTS_ON", {"cuda", "cpu"})
        calls = []
        halves = spectral._chol_halves
        monkeypatch.setattr(spectral, "_chol_halves", lambda H, leaf: calls.append(H.shape) or halves(H, leaf))
    syncs = _tscnc_step_syncs(lambda_tsc=0.0)
    assert route == "batched" or calls
    assert not syncs, f"TSCNC (CNC term) forward+backward on the CUDA path syncs:\n{format_syncs(syncs)}"


@pytest.mark.parametrize("kind", ["conv", "shared"])
def test_tscnc_full_step_has_no_host_syncs(kind, one_intra_op_thread):
    syncs = _tscnc_step_syncs(lambda_tsc=1e-3, kind=kind)
    assert not syncs, f"TSCNC forward+backward on the CUDA path syncs:\n{format_syncs(syncs)}"


def test_tscnc_uncertified_layer_is_warned_and_refreshed_next_call(one_intra_op_thread):
    from torch import nn

    from fastcnc.layers import MaskedLinear
    from fastcnc.reference import matrix_with_spectrum
    from fastcnc.regularizer import TSCNC

    model = nn.Sequential(MaskedLinear(300, 200), nn.ReLU(), MaskedLinear(200, 10)).to(DEVICE)
    with torch.no_grad():  # kappa 1e6: beyond what the float64 Gram of a 200x300 matrix can certify
        s = torch.logspace(0, -6, 200, dtype=torch.float64)
        w = matrix_with_spectrum(200, 300, s, generator=torch.Generator().manual_seed(0))
        model[0].weight.copy_(w.to(device=DEVICE, dtype=torch.float32))
    reg = TSCNC(model, lambda_tsc=0.0, lambda_cnc=1e-2)
    with _backend.cuda_code_path() if SIMULATE else contextlib.nullcontext():
        reg()  # exact refresh (first call)
        reg()  # sync-free rounds: that layer's certificate fails, the flags wait on the device
        assert reg.last_estimate.certified.tolist() == [False, True]
        assert not any(reg.last_estimate.fallback.tolist())
        with pytest.warns(RuntimeWarning, match=r"certificate of matrices \[0\] failed"):
            reg()  # reads them: warns, and recomputes that layer exactly in this call
        assert reg.last_estimate.fallback.tolist() == [True, False] and reg.work["uncertified_late"] == 1


def test_tscnc_runs_one_round_while_the_first_round_certifies_and_two_after_a_failure(one_intra_op_thread):
    from torch import nn

    from fastcnc.layers import MaskedLinear
    from fastcnc.reference import matrix_with_spectrum
    from fastcnc.regularizer import TSCNC

    model = nn.Sequential(MaskedLinear(300, 200), nn.ReLU(), MaskedLinear(200, 10)).to(DEVICE)
    reg = TSCNC(model, lambda_tsc=0.0, lambda_cnc=1e-2)
    rounds = []
    with _backend.cuda_code_path() if SIMULATE else contextlib.nullcontext():
        for _ in range(4):  # refresh, two rounds (flags show the first was enough), then one round
            reg()
            rounds.append(reg.last_estimate.work["rounds"])
            if not SIMULATE:
                torch.cuda.synchronize()  # let the flags land, so the switch happens at a known call
        assert rounds[1:] == [2, 1, 1] and reg.work["one_round_calls"] == 2
        with torch.no_grad():  # kappa 1e6: a certificate that one round (or two) cannot give
            w = matrix_with_spectrum(200, 300, torch.logspace(0, -6, 200, dtype=torch.float64),
                                     generator=torch.Generator().manual_seed(0))
            model[0].weight.copy_(w.to(device=DEVICE, dtype=torch.float32))
        reg()  # one round: fails, flagged on the device
        assert reg.last_estimate.work["rounds"] == 1 and not bool(reg.last_estimate.certified[0])
        if not SIMULATE:
            torch.cuda.synchronize()
        with pytest.warns(RuntimeWarning, match=r"certificate of matrices \[0\] failed"):
            reg()  # reads the failure: that layer exactly, the others with two rounds again
        assert reg.last_estimate.fallback.tolist() == [True, False]
        assert reg.last_estimate.work["rounds"] == 2 and reg.work["one_round_calls"] == 3


# -- host work of the TSCNC step: what grows with the depth of the model ----------------------------------------------


def _tscnc_step_ops(depth: int) -> collections.Counter:
    from torch import nn

    from fastcnc.regularizer import TSCNC

    torch.manual_seed(0)
    # a masked linear of a new shape per layer (so each layer is its own vector group) and a plain one at the end
    widths = [6 + 3 * i for i in range(depth + 1)]
    layers = [MaskedLinear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], 4)).to(DEVICE)
    for layer in layers:
        layer.set_mask((torch.rand(layer.weight.shape, device=DEVICE) > 0.3).float())
    reg = TSCNC(model, lambda_tsc=1e-3, lambda_cnc=1e-2)
    if SIMULATE:  # the captured engine of a CUDA step, replayed by a stand-in
        replay_engine_on_cpu(reg)
    counter = _count_steady_step(model, reg, warmup=4)
    assert reg._graphed.replays >= 1 and reg.last_estimate.work["rounds"] == 1
    return counter.ops


def test_tscnc_step_host_ops_per_layer(one_intra_op_thread):
    # the host's share of a CUDA TSCNC step (the engine replayed as a graph; the penalties' forward and backward
    # around it) may grow per layer only by what autograd needs per weight: a matrix view of each layer for the
    # engine's copy-in, each layer's own gradient tensor (a view of the fused backward's buffer) and its
    # accumulation into .grad. Per-layer (or per-shape-group) copies, detaches and slices showed up here before
    small, large = _tscnc_step_ops(4), _tscnc_step_ops(12)
    per_layer = (sum(large.values()) - sum(small.values())) / 8
    assert per_layer <= 3, f"{per_layer:.2f} host ops per extra layer: {large - small}"


_VIEW_OPS = {"select", "slice", "view", "expand", "unsqueeze", "_unsafe_view", "transpose", "permute", "detach",
             "as_strided", "t", "alias", "squeeze", "unbind", "split", "split_with_sizes", "diagonal", "narrow"}


def test_engine_call_kernels_per_matrix(one_intra_op_thread):
    # inside the captured graph every op that is not a view is a kernel on the device, and a batch is a chain of them:
    # per extra matrix (each of its own shape) a warm sync-free call may add only its copy into the float64 batch and
    # its Gram (a product and its copy into the batch's Gram); gathering the warm blocks or writing results per
    # matrix showed up here before
    from fastcnc.spectral import SpectralState, extreme_singular_values

    def kernels(count: int) -> int:
        gen = torch.Generator().manual_seed(0)
        mats = [torch.randn(40 + 3 * i, 20 + 2 * i, generator=gen).to(DEVICE) for i in range(count)]
        st = SpectralState()
        with _backend.cuda_code_path() if SIMULATE else contextlib.nullcontext():
            extreme_singular_values(mats, state=st, sync=False, refresh=True, floor=1e-6)
            extreme_singular_values(mats, state=st, sync=False, floor=1e-6, max_rounds=1)
            with count_host_syncs(simulate=SIMULATE) as counter:
                extreme_singular_values(mats, state=st, sync=False, floor=1e-6, max_rounds=1)
        return sum(n for name, n in counter.ops.items() if name not in _VIEW_OPS)

    per_matrix = (kernels(12) - kernels(4)) / 8
    assert per_matrix <= 3, f"{per_matrix:.2f} kernels per extra matrix"
