"""TSCNC's sync-free mode (the CUDA path) stays finite and sync-free when a certificate or a factorization fails.

On CUDA a Cholesky that breaks down (info > 0) leaves a NaN-filled factor, and the flags that say so are read only at
the next call, after the step's gradient has been applied. These tests emulate that (failed factors are NaN-filled)
on the CUDA code path (``fastcnc._backend.cuda_code_path()`` on CPU tensors, see tests/test_host_syncs.py), plant
factorizations that must fail, and train a small pruned model with an ill-conditioned layer for a few steps.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
from sync_count import count_host_syncs, format_syncs
from torch import nn

from fastcnc import _backend
from fastcnc.layers import MaskedLinear
from fastcnc.reference import matrix_with_spectrum
from fastcnc.regularizer import TSCNC

SIMULATE = _backend.INTERPRET
DEVICE = "cuda" if not SIMULATE and torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not SIMULATE and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (CPU) or a CUDA device")

_real_cholesky_ex = torch.linalg.cholesky_ex


class _PlantedCholesky:
    """torch.linalg.cholesky_ex as cuSOLVER behaves on a breakdown (NaN factor, info > 0), plus planted breakdowns of
    every factorization of an ``fail_n`` x ``fail_n`` matrix while ``fail_n`` is set, except those of smaller
    matrices zero-padded to it in a batch merged across n (their last row is (0, ..., 0, 1): see _Group.merged)."""

    def __init__(self) -> None:
        self.fail_n: int | None = None
        self.planted = 0

    def __call__(self, A, *, upper=False, check_errors=False, out=None):
        L, info = _real_cholesky_ex(A, upper=upper, check_errors=check_errors)
        if self.fail_n is not None and A.shape[-1] == self.fail_n:
            own = A[..., -1, :-1].abs().sum(-1) > 0
            info = torch.where(own, torch.ones_like(info), info)
            self.planted = self.planted + own.sum()  # (a tensor: no host sync in the counted step)
        failed = (info > 0)[..., None, None]
        return torch.where(failed, torch.full_like(L, torch.nan), L), info


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(MaskedLinear(96, 64), nn.ReLU(), MaskedLinear(64, 10)).to(DEVICE)
    with torch.no_grad():  # kappa 1e3, graded, clustered at the bottom: an ill-conditioned layer
        s = torch.cat([torch.logspace(0, -2.5, 60, dtype=torch.float64), torch.full((4,), 1e-3, dtype=torch.float64)])
        w = matrix_with_spectrum(64, 96, s, generator=torch.Generator().manual_seed(1))
        model[0].weight.copy_(w.to(device=DEVICE, dtype=torch.float32))
    model[2].set_mask((torch.rand(10, 64, generator=torch.Generator().manual_seed(2)) > 0.9).float().to(DEVICE))
    return model


def _assert_finite(model, reg) -> None:
    est = reg.last_estimate
    for name in ("sigma_max", "sigma_min", "sigma_max_lo", "sigma_max_hi", "sigma_min_lo", "sigma_min_hi"):
        assert torch.isfinite(getattr(est, name)).all(), f"estimate.{name} is not finite: {getattr(est, name)}"
    for vec in (*est.u_max, *est.v_max, *est.u_min, *est.v_min):
        assert torch.isfinite(vec).all()
    for blk in reg.state.blocks:
        assert torch.isfinite(blk).all(), "a failed factorization reached the warm state"
    for p in model.parameters():
        assert torch.isfinite(p).all() and (p.grad is None or torch.isfinite(p.grad).all())


def test_failed_factorizations_never_reach_values_gradients_or_weights(monkeypatch, one_intra_op_thread):
    planted = _PlantedCholesky()
    monkeypatch.setattr(torch.linalg, "cholesky_ex", planted)
    model = _model()
    reg = TSCNC(model, lambda_tsc=0.0, lambda_cnc=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 96, generator=gen).to(DEVICE), torch.randint(0, 10, (32,), generator=gen).to(DEVICE)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y) + reg()
        loss.backward()
        return loss

    with _backend.cuda_code_path() if SIMULATE else contextlib.nullcontext():
        for _ in range(3):  # the exact refresh, then warm sync-free calls that certify every layer
            step()
            opt.step()
            _assert_finite(model, reg)
        assert reg.last_estimate.certified.all() and reg.last_estimate.work["fallbacks"] == 0

        planted.fail_n = 64  # every factorization of the ill-conditioned layer's Gram breaks down (NaN factor)
        with count_host_syncs(simulate=SIMULATE) as counter:
            loss = step()
        planted.fail_n = None
        syncs = [s for s in counter.syncs if not (SIMULATE and "_read_pending" in s.where)]
        assert not syncs, f"a sync-free step with failed factorizations syncs:\n{format_syncs(syncs)}"
        assert planted.planted > 0 and torch.isfinite(loss)
        assert reg.last_estimate.certified.tolist() == [False, True]  # never certified on a failed factorization
        _assert_finite(model, reg)
        est = reg.last_estimate
        exact = torch.linalg.svdvals(model[0].effective_weight().detach().double())
        # uncertified but sound: sigma_min = |A x| >= the true one, sigma_max = |A y| <= the true one
        assert est.sigma_min[0] >= exact[-1] * (1 - 1e-12) and est.sigma_max[0] <= exact[0] * (1 + 1e-12)
        opt.step()
        _assert_finite(model, reg)

        with pytest.warns(RuntimeWarning, match=r"certificate of matrices \[0\] failed"):
            step()  # the late flags name the layer; it is recomputed exactly in this call
        assert reg.last_estimate.fallback.tolist() == [True, False]
        opt.step()
        _assert_finite(model, reg)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            for _ in range(2):  # and the warm calls after the refresh certify again
                step()
                opt.step()
                _assert_finite(model, reg)
        assert reg.last_estimate.certified.all()


class _LateEvent:
    """A CUDA event whose copy lands ``lag`` calls after the call that recorded it: the GPU behind the host."""

    def __init__(self, reg, lag: int) -> None:
        self.reg, self.due, self.done = reg, reg.calls + lag, False

    def query(self) -> bool:
        return self.done or self.reg.calls >= self.due

    def synchronize(self) -> None:
        self.done = True


@pytest.mark.skipif(not SIMULATE, reason="plants a late CUDA event into the simulated CUDA path")
def test_flags_read_late_are_never_dropped_and_travel_with_a_checkpoint():
    # a failed certificate must be warned about and refreshed when its flags land, however late, and a checkpoint
    # taken before they land carries them; one pending slot used to be overwritten by the next call's flags
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(MaskedLinear(300, 200), nn.ReLU(), MaskedLinear(200, 10))
        return model, TSCNC(model, lambda_tsc=0.0, lambda_cnc=1e-2)

    def make_late(reg, lag):
        real = reg._engine

        def engine(mats, refresh):
            est = real(mats, refresh)
            host, _, call, rounds = reg._pending[-1]
            reg._pending[-1] = (host, _LateEvent(reg, lag), call, rounds)
            return est
        reg._engine = engine

    hard = matrix_with_spectrum(200, 300, torch.logspace(0, -6, 200, dtype=torch.float64),
                                generator=torch.Generator().manual_seed(0)).float()  # kappa 1e6: no sync-free proof
    with _backend.cuda_code_path():
        model, reg = build()
        make_late(reg, lag=3)  # (reg.calls counts a call once it returns: read at the third call after it)
        for _ in range(3):
            reg()
        with torch.no_grad():
            model[0].weight.copy_(hard)
        caught = []
        for _ in range(6):
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                reg()
            caught += [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
        assert caught and reg.work["uncertified_late"] >= 1 and reg.work["fallbacks"] >= 1
        # a checkpoint while a failure's flags are still in flight: the restored regulariser warns about it
        model2, reg2 = build()
        for _ in range(3):
            reg2()
        with torch.no_grad():
            model2[0].weight.copy_(hard)
        reg2()  # its flags (uncertified) are pending
        state = reg2.state_dict()
        model3, reg3 = build()
        model3.load_state_dict(model2.state_dict())
        reg3.load_state_dict(state)
        with pytest.warns(RuntimeWarning, match=r"certificate of matrices \[0\] failed"):
            reg3()


@pytest.mark.skipif(not SIMULATE, reason="the kernel path on CPU tensors needs the interpreter")
def test_a_call_under_inference_mode_leaves_the_kernel_path_usable():
    # the TSC kernel's staging buffer, first made under inference_mode, used to break every later call in the process
    import fastcnc.tsc

    fastcnc.tsc._STAGING.clear()
    torch.manual_seed(0)
    model = nn.Sequential(MaskedLinear(20, 30), nn.ReLU(), MaskedLinear(30, 10))
    reg = TSCNC(model, lambda_tsc=1e-3, lambda_cnc=1e-2)
    with _backend.cuda_code_path():
        with torch.inference_mode():
            inside = float(reg())
        value = reg()
        value.backward()
    assert math.isfinite(inside) and float(value) == pytest.approx(inside, rel=1e-5)
    assert model[0].weight.grad is not None
