"""Property tests (hypothesis): kernels and engines against float64 references on random shapes, masks, dtypes and
spectra; penalties finite with gradients consistent with the exact penalty.

Interpreter-vs-torch tests switch the backend inside the test body (hypothesis runs many examples per test function,
so the function-scoped ``backend`` fixture cannot be used). Examples are derandomized, so a failure reproduces.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fastcnc
from fastcnc import _backend
from fastcnc import tsc as tsc_module
from fastcnc.cnc import cnc_from_sigmas
from fastcnc.reference import matrix_with_spectrum

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpret)]
HALF = [torch.float16, torch.bfloat16]
EPS = {torch.float64: 2.2e-16, torch.float32: 1.2e-7, torch.float16: 9.8e-4, torch.bfloat16: 7.8e-3}
# the Triton kernels run on the GPU when there is one, else on CPU tensors under TRITON_INTERPRET=1 (conftest.py)
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _Backend:
    """``with _Backend(name) as device:`` forces the dispatch for one example (always restored) and gives the device
    the inputs belong on: the kernel device for "triton", the CPU for "torch"."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        _backend.force_backend(self.name)
        return KERNEL_DEVICE if self.name == "triton" else "cpu"

    def __exit__(self, *exc):
        _backend.force_backend(None)


def _leaf(t, device):
    return None if t is None else t.detach().to(device).requires_grad_()


# ------------------------------------------------------------------------------------------------ strategies


@st.composite
def spectra(draw, min_dim=1, max_dim=40):
    """(m, n, singular values float64 descending) with kappa up to 1e4, scales 1e-30..1e30, optional exact zeros."""
    m = draw(st.integers(min_dim, max_dim))
    n = draw(st.integers(min_dim, max_dim))
    k = min(m, n)
    seed = draw(st.integers(0, 2**31 - 1))
    log_kappa = draw(st.floats(0.0, 4.0))
    scale = 10.0 ** draw(st.one_of(st.floats(-3.0, 3.0), st.floats(-30.0, 30.0)))
    zeros = draw(st.integers(0, max(k - 1, 0))) if draw(st.booleans()) else 0
    gen = torch.Generator().manual_seed(seed)
    s = scale * 10.0 ** (-log_kappa * torch.rand(k, generator=gen, dtype=torch.float64))
    s[0], s[-1] = scale, scale * 10.0**-log_kappa
    s = torch.sort(s, descending=True).values
    if zeros:
        s[k - zeros:] = 0.0
    return m, n, s, seed


def _matrix(m, n, s, seed, dtype):
    if dtype == torch.float16 and s[0] > 0:  # keep fp16 matrices inside its range (6e-5 .. 6.5e4)
        s = s / s[0] * min(max(float(s[0]), 1e-2), 1e2)
    gen = torch.Generator().manual_seed(seed + 1)
    return matrix_with_spectrum(m, n, s, generator=gen).to(dtype)


FLOOR = 1e-6  # the spectra below include exact zeros: kappa is certified with the CNC floor


def _check_bracket_and_residual(est, mats, dtype, floor=FLOOR):
    """Certified brackets contain the float64 truth; kappa_floor within the engine's rtol wherever certified."""
    for i, A in enumerate(mats):
        s = torch.linalg.svdvals(A.double())
        slack = 1e-13 * float(s[0])  # the reference SVD's own error
        smax, smin = float(est.sigma_max[i]), float(est.sigma_min[i])  # float() also brings GPU values back
        assert math.isfinite(smax) and math.isfinite(smin)
        assert float(est.sigma_max_lo[i]) - slack <= float(s[0]) <= float(est.sigma_max_hi[i]) + slack
        assert float(est.sigma_min_lo[i]) - slack <= float(s[-1]) <= float(est.sigma_min_hi[i]) + slack
        assert smax <= float(s[0]) + slack, "sigma_max above the truth"
        assert smin >= float(s[-1]) - slack, "sigma_min below the truth"
        assert not math.isnan(float(est.kappa[i]))
        assert bool(est.certified[i]) or bool(est.fallback[i])
        if float(s[0]) > 0:
            got, want = smax / (smin + floor * smax), float(s[0]) / (float(s[-1]) + floor * float(s[0]))
            assert abs(got / want - 1) <= est.rtol * (1 + 1e-9)


# ----------------------------------------------------------------------------------------------- spectral engine


@settings(max_examples=30, **SETTINGS)
@given(specs=st.lists(spectra(), min_size=1, max_size=3),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.float16]),
       iters=st.integers(1, 4), block=st.integers(1, 4), max_rounds=st.integers(1, 4))
def test_engine_brackets_truth_and_certifies_kappa(specs, dtype, iters, block, max_rounds):
    mats = [_matrix(m, n, s, seed, dtype) for m, n, s, seed in specs]
    est = fastcnc.extreme_singular_values(mats, iters=iters, block=block, max_rounds=max_rounds, floor=FLOOR)
    _check_bracket_and_residual(est, mats, dtype)
    for i, A in enumerate(mats):
        assert est.u_max[i].shape == (A.shape[0],) and est.v_max[i].shape == (A.shape[1],)


@settings(max_examples=12, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(260, 400), n=st.integers(129, 160), count=st.integers(1, 3),
       empty=st.lists(st.floats(0.1, 0.55), min_size=3, max_size=3), log_kappa=st.floats(0.0, 3.0),
       wide=st.booleans(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_groups_of_matrices_with_empty_rows_are_bracketed_cold_and_warm(seed, m, n, count, empty, log_kappa, wide,
                                                                       dtype):
    # pruned inputs: zero rows of the tall orientation (n > 128: a Gram group, formed from its nonzero rows)
    gen = torch.Generator().manual_seed(seed)
    mats = []
    for k in range(count):
        s = 10.0 ** (-log_kappa * torch.rand(n, generator=gen, dtype=torch.float64))
        A = matrix_with_spectrum(m, n, s, generator=gen)
        A[torch.randperm(m, generator=gen)[:int(empty[k] * m)]] = 0
        mats.append((A.T if wide else A).contiguous().to(dtype))
    state = fastcnc.SpectralState()
    for step in range(2):
        if step:
            mats = [W + 1e-3 * W.abs().max() * torch.randn(W.shape, generator=gen, dtype=W.dtype) * (W != 0)
                    for W in mats]
        est = fastcnc.extreme_singular_values(mats, state=state, floor=FLOOR)
        _check_bracket_and_residual(est, mats, dtype)
        for i, W in enumerate(mats):
            u, v = (est.v_min[i], est.u_min[i]) if wide else (est.u_min[i], est.v_min[i])  # long side, short side
            A = (W.T if wide else W).double()
            if not bool(est.structural[i]):  # the long side's vector: A x / |A x|, zero on the empty rows
                torch.testing.assert_close(u, A @ v / est.sigma_min[i], rtol=0, atol=1e-12)


@settings(max_examples=25, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), specs=st.lists(spectra(min_dim=13), min_size=1, max_size=3),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_refresh_is_exact_and_warm_restarts_stay_bracketed(seed, specs, dtype):
    torch.manual_seed(seed)  # every tensor below derives from the example's seed: reproducible
    mats = [_matrix(m, n, s, seed, dtype) for m, n, s, seed in specs]
    state = fastcnc.SpectralState()
    est = fastcnc.extreme_singular_values(mats, state=state, refresh=True, floor=FLOOR)
    assert bool(est.refreshed.all()) and state.matches([tuple(A.shape) for A in mats])
    _check_bracket_and_residual(est, mats, dtype)
    drift = [A + 1e-3 * A.abs().max() * torch.randn_like(A) for A in mats]
    est = fastcnc.extreme_singular_values(drift, state=state, floor=FLOOR)
    _check_bracket_and_residual(est, drift, dtype)


@settings(max_examples=15, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1),
       shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=4),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_zero_matrices_in_a_batch_give_sigma_zero_kappa_one(seed, shapes, dtype):
    torch.manual_seed(seed)  # every tensor below derives from the example's seed: reproducible
    mats = [torch.zeros(m, n, dtype=dtype) for m, n in shapes] + [torch.randn(30, 20, dtype=dtype)]
    est = fastcnc.extreme_singular_values(mats)
    L = len(shapes)
    assert torch.all(est.sigma_max[:L] == 0) and torch.all(est.sigma_min[:L] == 0) and torch.all(est.kappa[:L] == 1)
    _check_bracket_and_residual(est, mats, dtype)  # the zero layers do not disturb their neighbour


# --------------------------------------------------------------------------------------------- masked kernels


@st.composite
def masks(draw, shape):
    kind = draw(st.sampled_from(["zeros", "ones", "random", "blocks"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "ones":
        return torch.ones(shape)
    density = draw(st.floats(0.0, 1.0))
    if kind == "random":
        return (torch.rand(shape, generator=gen) < density).float()
    rows, cols = shape[0], math.prod(shape[1:])
    b = draw(st.sampled_from([2, 4, 16]))
    tiles = torch.rand(-(-rows // b), -(-cols // b), generator=gen) < density
    return tiles.repeat_interleave(b, 0).repeat_interleave(b, 1)[:rows, :cols].float().reshape(shape)


def _tols(dtype, k):
    eps = EPS[dtype]
    return dict(rtol=8 * eps, atol=8 * eps * math.sqrt(max(k, 1)) * (4 if dtype in HALF else 1) + 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), data=st.data(), m=st.integers(1, 24), n=st.integers(1, 24),
       k=st.integers(1, 40),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), bias=st.booleans(),
       transposed_x=st.booleans())
def test_masked_linear_matches_float64(seed, backend, data, m, n, k, dtype, bias, transposed_x):
    torch.manual_seed(seed)  # every tensor below derives from the example's seed: reproducible
    mask = data.draw(masks((n, k)), label="mask")
    x = (torch.randn(k, m).T if transposed_x else torch.randn(m, k)).to(dtype)  # transposed: non-contiguous
    w = torch.randn(n, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    g = torch.randn(m, n).to(dtype)
    with _Backend(backend) as dev:
        xd, wd, bd = _leaf(x, dev), _leaf(w, dev), _leaf(b, dev)
        y = fastcnc.masked_linear(xd, wd, mask.to(dev), bd)
        y.backward(g.to(dev))
    x64, w64, b64 = _leaf(x.double(), "cpu"), _leaf(w.double(), "cpu"), _leaf(None if b is None else b.double(), "cpu")
    y64 = F.linear(x64, w64 * mask.double(), b64)
    y64.backward(g.double())
    assert y.dtype == dtype and y.shape == (m, n)
    torch.testing.assert_close(y.double().cpu(), y64, **_tols(dtype, k))
    torch.testing.assert_close(xd.grad.double().cpu(), x64.grad, **_tols(dtype, n))
    torch.testing.assert_close(wd.grad.double().cpu(), w64.grad, **_tols(dtype, m))
    if bias:
        torch.testing.assert_close(bd.grad.double().cpu(), b64.grad, **_tols(dtype, m))
    assert torch.count_nonzero(wd.grad.cpu()[mask == 0]) == 0  # pruned weights: exactly zero gradient


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), data=st.data(), batch=st.integers(0, 2), groups=st.integers(1, 3),
       cin_g=st.integers(1, 3),
       cout_g=st.integers(1, 3), kh=st.integers(1, 3), kw=st.integers(1, 3), stride=st.integers(1, 2),
       padding=st.integers(0, 2), dilation=st.integers(1, 2), channels_last=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_masked_conv2d_matches_float64(seed, backend, data, batch, groups, cin_g, cout_g, kh, kw, stride, padding,
                                       dilation, channels_last, dtype):
    torch.manual_seed(seed)  # every tensor below derives from the example's seed: reproducible
    h = data.draw(st.integers(max(1, dilation * (kh - 1) + 1 - 2 * padding), 7), label="h")
    width = data.draw(st.integers(max(1, dilation * (kw - 1) + 1 - 2 * padding), 7), label="w")
    weight = torch.randn(cout_g * groups, cin_g, kh, kw).to(dtype)
    mask = data.draw(masks(tuple(weight.shape)), label="mask")
    x = torch.randn(max(batch, 1), cin_g * groups, h, width).to(dtype)[:batch]
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    kw_args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    with _Backend(backend) as dev:
        xd, wd = _leaf(x, dev), _leaf(weight, dev)  # .to() keeps the channels_last strides
        y = fastcnc.masked_conv2d(xd, wd, mask.to(dev), **kw_args)
        y.backward(torch.ones_like(y))
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    y64 = F.conv2d(x64, w64 * mask.double(), None, **kw_args)
    y64.backward(torch.ones_like(y64))
    fan_in = cin_g * kh * kw
    torch.testing.assert_close(y.double().cpu(), y64, **_tols(dtype, fan_in))
    torch.testing.assert_close(xd.grad.double().cpu(), x64.grad, **_tols(dtype, cout_g * kh * kw))
    torch.testing.assert_close(wd.grad.double().cpu(), w64.grad, **_tols(dtype, max(batch, 1) * h * width))
    assert torch.count_nonzero(wd.grad.cpu()[mask == 0]) == 0


# ---------------------------------------------------------------------------------------------------- penalties


def _tsc_ref(w64, a):
    return ((a + 1) * w64.abs() / (a + w64.abs())).sum()


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1),
       shapes=st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=4), min_size=1, max_size=3),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
       log_a=st.floats(-2.0, 3.0), log_scale=st.one_of(st.floats(-3.0, 3.0), st.floats(-30.0, 30.0)),
       zero_frac=st.floats(0.0, 1.0),
       tile=st.sampled_from([16, 64, 4096]))
def test_tsc_penalty_value_and_gradient_match_float64(seed, backend, shapes, dtype, log_a, log_scale, zero_frac, tile):
    torch.manual_seed(seed)  # every tensor below derives from the example's seed: reproducible
    a, scale = 10.0**log_a, 10.0**log_scale
    if dtype == torch.float16:
        scale = min(max(scale, 1e-3), 100.0)  # fp16 overflows at 65504
    ws = []
    for s in shapes:
        w = torch.randn(s, dtype=torch.float64) * scale
        w[torch.rand(s) < zero_frac] = 0.0  # exact zeros: subgradient 0
        ws.append(w.to(dtype))
    grads_out = torch.randn(len(ws), dtype=torch.float64)
    old = tsc_module._KERNEL_BLOCK
    tsc_module._KERNEL_BLOCK = tile  # small tiles make tiny layers span several programs
    try:
        with _Backend(backend) as dev:
            wds = [_leaf(w, dev) for w in ws]
            values = fastcnc.tsc_penalty(wds, a=a, reduction="none")
            values.backward(grads_out.to(dev, values.dtype))
    finally:
        tsc_module._KERNEL_BLOCK = old
    values = values.detach().cpu()
    assert torch.isfinite(values).all()
    for i, (w, wd) in enumerate(zip(ws, wds, strict=True)):
        w.grad = wd.grad.cpu()
        w64 = w.detach().double()
        ref = _tsc_ref(w64, a)
        # closed form (autograd of the value formula cancels catastrophically for |w| >> a)
        grad_ref = torch.sign(w64) * a * (a + 1) / (a + w64.abs()) ** 2 * grads_out[i]
        n = w.numel()
        acc_eps = EPS[torch.float64 if dtype == torch.float64 else torch.float32]
        tol = 8 * acc_eps * n * (a + 1)
        assert abs(float(values[i]) - float(ref)) <= tol + 8 * acc_eps * abs(float(ref))
        assert w.grad.dtype == dtype
        gref = grad_ref.to(dtype).double()  # the gradient is returned in the weight's dtype
        rtol = 1e-13 if dtype == torch.float64 else 4 * EPS[dtype]  # elementwise: a few ulps
        torch.testing.assert_close(w.grad.double(), gref, rtol=rtol, atol=rtol * float(gref.abs().max()) + 1e-300)
        assert torch.equal(w.grad[w.detach() == 0], torch.zeros_like(w.grad[w.detach() == 0]))


def _exact_penalty(W, kind, kappa_target, eps):
    s = torch.linalg.svdvals(W)
    return cnc_from_sigmas(torch.stack([s[0], s[-1]])[None], kind=kind, kappa_target=kappa_target, eps=eps)[0]


@settings(max_examples=40, **SETTINGS)
@given(spec=spectra(), kind=st.sampled_from(["log", "kappa", "hinge"]), log_eps=st.floats(-9.0, -1.0),
       kappa_target=st.floats(1.0, 100.0), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_cnc_penalty_finite_with_finite_gradient(spec, kind, log_eps, kappa_target, dtype):
    m, n, s, seed = spec
    W = _matrix(m, n, s, seed, dtype).requires_grad_()
    eps = 10.0**log_eps
    p = fastcnc.cnc_penalty(W, kind=kind, kappa_target=kappa_target, eps=eps)
    p.backward()
    p = p.detach()
    assert torch.isfinite(p)
    # the gradient is (dp/dsigma_max) u_max v_max^T + (dp/dsigma_min) u_min v_min^T with |dp/dsigma| at most
    # ~1/(eps smax) (log), 1/(eps^2 smax) (kappa), 2/(eps^3 smax) (hinge): finite wherever that fits the dtype
    # (documented limit: kind="kappa"/"hinge" with tiny eps on tiny weights can exceed fp32)
    smax = float(s[0])
    bound = 0.0 if smax == 0 else {"log": 2 / eps, "kappa": 2 / eps**2, "hinge": 4 / eps**3}[kind] / smax
    if bound < torch.finfo(dtype).max:
        assert torch.isfinite(W.grad).all()
    # 1 / (1 + eps) <= kappa_eps <= 1 / eps whatever the spectrum (zero matrices give 0): the penalty is capped
    cap = {"log": math.log(1 / eps), "kappa": 1 / eps, "hinge": max(1 / eps - kappa_target, 0) ** 2}[kind]
    floor = {"log": -math.log1p(eps), "kappa": 0.0, "hinge": 0.0}[kind]
    assert floor - 1e-12 <= float(p) <= cap * (1 + 1e-9)
    exact = fastcnc.cnc_penalty(W.detach(), kind=kind, kappa_target=kappa_target, eps=eps, refresh=True)
    # an exactly-zero sigma_min comes out of any SVD as ~1e-15 * sigma_max: that moves the penalty by ~1e-15 / eps
    assert math.isclose(float(exact), float(_exact_penalty(W.detach().double(), kind, kappa_target, eps)),
                        rel_tol=1e-9 + 1e-13 / eps, abs_tol=1e-9)


@st.composite
def gapped_spectra(draw):
    """Spectra whose extreme singular values are simple (relative gap >= 5%), so the penalty is differentiable."""
    m, n = draw(st.integers(2, 30)), draw(st.integers(2, 30))
    k = min(m, n)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    log_kappa = draw(st.floats(0.1, 3.0))
    s = 10.0 ** (-log_kappa * torch.rand(k, generator=gen, dtype=torch.float64))
    s = torch.sort(s.clamp(10**-log_kappa * 1.06, 1 / 1.06), descending=True).values
    s[0], s[-1] = 1.0, 10**-log_kappa
    return m, n, s * 10.0 ** draw(st.floats(-2.0, 2.0)), seed


@settings(max_examples=30, **SETTINGS)
@given(spec=gapped_spectra(), kind=st.sampled_from(["log", "kappa", "hinge"]), direction_seed=st.integers(0, 999))
def test_cnc_gradient_matches_finite_differences_of_exact_penalty(spec, kind, direction_seed):
    m, n, s, seed = spec
    W = _matrix(m, n, s, seed, torch.float64).requires_grad_()
    kappa_target = 1.0 + 0.5 * float(s[0] / s[-1])  # the hinge is active (kappa > target) when kappa > 2
    p = fastcnc.cnc_penalty(W, kind=kind, kappa_target=kappa_target, refresh=True)
    (g,) = torch.autograd.grad(p, W)
    D = torch.randn(W.shape, generator=torch.Generator().manual_seed(direction_seed), dtype=torch.float64)
    D = D / D.norm() * float(s[0])
    h = 1e-6
    fd = (_exact_penalty(W.detach() + h * D, kind, kappa_target, 1e-6)
          - _exact_penalty(W.detach() - h * D, kind, kappa_target, 1e-6)) / (2 * h)
    directional = float((g * D).sum())
    assert math.isclose(directional, float(fd), rel_tol=1e-4, abs_tol=1e-6 * (1 + abs(float(fd))))


@settings(max_examples=12, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), widths=st.lists(st.integers(1, 12), min_size=2, max_size=4), conv=st.booleans(),
       sparsity=st.floats(0.0, 0.99), kill_layer=st.booleans(), lambdas=st.sampled_from([(1e-3, 1e-2), (0.0, 1.0),
                                                                                         (1.0, 0.0)]))
def test_tscnc_value_matches_exact_terms_and_gradients_are_finite(seed, widths, conv, sparsity, kill_layer, lambdas):
    torch.manual_seed(seed)  # every tensor below derives from the example's seed: reproducible
    if conv:
        layers = [nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths[:-1], widths[1:], strict=True)]
    else:
        layers = [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)]
    net = fastcnc.sparsify(nn.Sequential(*layers)).double()
    if sparsity > 0:
        fastcnc.prune_magnitude(net, sparsity)
    if kill_layer:
        net[0].set_mask(torch.zeros_like(net[0].mask))  # an all-pruned layer
    reg = fastcnc.TSCNC(net, lambda_tsc=lambdas[0], lambda_cnc=lambdas[1])
    value = reg()  # the first call is exact (float64 SVD)
    value.backward()
    assert torch.isfinite(value)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    weights = [m.effective_weight().detach() for m in net]
    expected = lambdas[0] * sum(float(_tsc_ref(w, 100.0)) for w in weights)
    for w in weights:
        expected += lambdas[1] * float(_exact_penalty(w.reshape(w.shape[0], -1), "log", 10.0, 1e-6))
    assert math.isclose(float(value.detach()), expected, rel_tol=1e-5, abs_tol=1e-6)
    for m in net:  # pruned weights stay pruned and get no gradient
        assert torch.count_nonzero(m.weight.grad[m.mask == 0]) == 0
