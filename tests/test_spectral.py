import pytest
import torch

from fastcnc.reference import matrix_with_spectrum, sigma_extremes_ref
from fastcnc.spectral import SpectralState, as_matrices, extreme_singular_values


def _rel(a, b):
    return abs(float(a) - b) / b


def _check_bracket_and_bounds(est, mats, tol):
    """Ritz bracketing (smax <= true, smin >= true) and the residual bound: a singular value within err."""
    for i, m in enumerate(mats):
        s = torch.linalg.svdvals(m.double())
        smax, smin = float(est.sigma_max[i]), float(est.sigma_min[i])
        assert smax <= s[0].item() * (1 + tol) + tol
        assert smin >= s[-1].item() * (1 - tol) - tol * s[0].item()
        assert (s - smax).abs().min().item() <= float(est.err_max[i]) * (1 + 1e-6) + tol * s[0].item()
        assert (s - smin).abs().min().item() <= float(est.err_min[i]) * (1 + 1e-6) + tol * s[0].item()


@pytest.mark.parametrize(
    "shape", [(64, 27), (27, 64), (200, 50), (50, 200), (256, 64), (33, 577)],
    ids=lambda s: f"{s[0]}x{s[1]}",
)
def test_random_matrices_cold_start_converge(shape):
    mats = [torch.randn(shape, dtype=torch.float64) for _ in range(2)]
    est = extreme_singular_values(mats, iters=60, depth=3, block=4)
    for i, m in enumerate(mats):
        smax, smin = sigma_extremes_ref(m)
        assert _rel(est.sigma_max[i], smax) < 1e-8
        assert _rel(est.sigma_min[i], smin) < 1e-3
        assert _rel(est.kappa[i], smax / smin) < 1e-3
    _check_bracket_and_bounds(est, mats, 1e-10)


def test_ill_conditioned_kappa_1e6_float64_cold_start_falls_back_to_exact():
    n = 60
    s = torch.logspace(0, -6, n, dtype=torch.float64)
    A = matrix_with_spectrum(150, n, s)
    est = extreme_singular_values(A, iters=5, depth=3, block=4)
    # Krylov alone cannot resolve sigma_min^2 = 1e-12 next to 1: the estimate stays an upper bound, and says so
    assert float(est.sigma_min[0]) >= 1e-6 * (1 - 1e-9)
    assert float(est.err_min[0]) > 1e-2 * float(est.sigma_min[0])
    est = extreme_singular_values(A, iters=5, depth=3, block=4, tol=1e-2)
    assert bool(est.refreshed[0])
    assert _rel(est.sigma_max[0], 1.0) < 1e-10
    assert _rel(est.sigma_min[0], 1e-6) < 1e-6
    assert _rel(est.kappa[0], 1e6) < 1e-6


def test_ill_conditioned_kappa_1e6_warm_tracking_float64():
    n = 60
    A = matrix_with_spectrum(150, n, torch.logspace(0, -6, n, dtype=torch.float64))
    state = SpectralState()
    extreme_singular_values(A, state=state, refresh=True)
    for _ in range(3):
        A = A + 1e-9 * torch.randn_like(A) / 150**0.5
        est = extreme_singular_values(A, state=state, iters=1, depth=1, block=4)
        smax, smin = sigma_extremes_ref(A)
        # tracked by the warm start alone; the first-order residual bound stays conservative here (documented)
        assert not bool(est.refreshed[0])
        assert _rel(est.kappa[0], smax / smin) < 1e-3


def test_clustered_bottom_spectrum():
    # the 6 smallest singular values lie within 0.1% of each other
    n = 80
    s = torch.cat([torch.linspace(10, 1.0, n - 6, dtype=torch.float64), 0.01 * (1 + 1e-3 * torch.rand(6))])
    s, _ = torch.sort(s, descending=True)
    A = matrix_with_spectrum(120, n, s)
    est = extreme_singular_values(A, iters=40, depth=3, block=4)
    assert _rel(est.sigma_min[0], s[-1].item()) < 2e-3  # any value of the cluster is within 0.1%
    assert _rel(est.sigma_max[0], 10.0) < 1e-10


def test_rank_deficient_pruned_matrix_has_zero_sigma_min():
    A = torch.randn(64, 200, dtype=torch.float64)
    A[5] = 0  # an empty row (99%-pruned layers have many): sigma_min = 0
    A[17] = 0
    est = extreme_singular_values(A, iters=20, depth=3, block=4)
    smax, _ = sigma_extremes_ref(A)
    assert abs(float(est.sigma_min[0])) < 1e-10 * smax
    assert _rel(est.sigma_max[0], smax) < 1e-10
    assert torch.isinf(est.kappa[0]) or float(est.kappa[0]) > 1e9


def test_zero_matrix_is_finite():
    est = extreme_singular_values([torch.zeros(40, 30), torch.zeros(3, 2)], iters=2)
    assert torch.all(est.sigma_max == 0) and torch.all(est.sigma_min == 0)
    assert torch.all(est.kappa == 1)


def test_float32_kappa_1e3_with_warm_start_within_bound():
    s = torch.logspace(0, -3, 50, dtype=torch.float64)
    A64 = matrix_with_spectrum(300, 50, s)
    state = SpectralState()
    extreme_singular_values(A64.float(), state=state, refresh=True)
    A = (A64 + 1e-6 * torch.randn_like(A64)).float()
    est = extreme_singular_values(A, state=state, iters=2, depth=2, block=4)
    smax, smin = sigma_extremes_ref(A)
    # documented fp32 bound: |sigma_min error| <~ 1e-6 * sigma_max (a few ulps of the products)
    assert abs(float(est.sigma_min[0]) - smin) < 1e-5 * smax
    assert _rel(est.kappa[0], smax / smin) < 1e-2


def test_bf16_weights_accumulate_in_fp32():
    A = torch.randn(128, 64).bfloat16()
    est = extreme_singular_values(A, iters=40, depth=3, block=4)
    smax, smin = sigma_extremes_ref(A.float())
    assert est.u_max[0].dtype == torch.float32
    assert _rel(est.sigma_max[0], smax) < 1e-5
    assert _rel(est.sigma_min[0], smin) < 1e-3


def test_singular_vectors_satisfy_definition():
    A = torch.randn(70, 130, dtype=torch.float64)  # wide: vectors must come back in W's own orientation
    est = extreme_singular_values(A, iters=60, depth=3, block=4)
    for s, u, v in ((est.sigma_max, est.u_max, est.v_max), (est.sigma_min, est.u_min, est.v_min)):
        assert u[0].shape == (70,) and v[0].shape == (130,)
        assert torch.allclose(A @ v[0], s[0] * u[0], atol=1e-6)
        assert torch.allclose(A.T @ u[0], s[0] * v[0], atol=1e-3)


def test_warm_start_one_iteration_tracks_small_updates():
    mats = [torch.randn(256, 1152) / 34, torch.randn(128, 576) / 24, torch.randn(512, 256) / 16]
    state = SpectralState()
    extreme_singular_values(mats, state=state, refresh=True)
    for _ in range(5):  # SGD-sized drift
        mats = [m + 1e-3 * m.abs().mean() * torch.randn_like(m) for m in mats]
        est = extreme_singular_values(mats, state=state, iters=1, depth=1, block=4)
        for i, m in enumerate(mats):
            smax, smin = sigma_extremes_ref(m)
            assert _rel(est.kappa[i], smax / smin) < 1e-2


def test_refresh_is_exact_and_resets_state():
    A = torch.randn(90, 40, dtype=torch.float64)
    state = SpectralState()
    est = extreme_singular_values(A, state=state, refresh=True)
    smax, smin = sigma_extremes_ref(A)
    assert _rel(est.sigma_max[0], smax) < 1e-12 and _rel(est.sigma_min[0], smin) < 1e-12
    assert float(est.err_max[0]) == 0 and state.matches([(90, 40)])


def test_non_contiguous_input_matches_contiguous():
    A = torch.randn(100, 60, dtype=torch.float64)
    e1 = extreme_singular_values(A.T, iters=10)
    e2 = extreme_singular_values(A.T.contiguous(), iters=10)
    assert torch.allclose(e1.sigma_max, e2.sigma_max) and torch.allclose(e1.sigma_min, e2.sigma_min)


def test_as_matrices_conv_and_groups():
    w = torch.randn(64, 3, 3, 3)
    (m,) = as_matrices(w)
    assert m.shape == (64, 27)
    g = torch.randn(32, 4, 3, 3)
    mats = as_matrices(g, groups=8)
    assert len(mats) == 8 and mats[0].shape == (4, 36)
    assert torch.equal(mats[1], g[4:8].reshape(4, -1))
    with pytest.raises(ValueError, match="groups"):
        as_matrices(g, groups=5)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(0, 3), "non-empty"),
    (torch.ones(3, 3, dtype=torch.int64), "floating"),
    (torch.ones(3), "dimensions"),
])
def test_bad_input_raises(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        extreme_singular_values(bad)


def test_non_finite_weight_named_in_error():
    good, bad = torch.randn(40, 30), torch.randn(50, 40)
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"weights\[1\].*NaN"):
        extreme_singular_values([good, bad])


def test_bad_options_raise():
    A = torch.randn(40, 30)
    with pytest.raises(ValueError, match="block"):
        extreme_singular_values(A, block=8, depth=3)
    with pytest.raises(ValueError, match="compute_dtype"):
        extreme_singular_values(A, compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="iters"):
        extreme_singular_values(A, iters=-1)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_kernel_path_matches_torch_path(dtype, kernel_device):
    from fastcnc import _backend

    mats = [torch.randn(40, 21, dtype=dtype), torch.randn(37, 13, dtype=dtype).T, torch.randn(64, 18, dtype=dtype)]
    _backend.force_backend("torch")
    ref = extreme_singular_values(mats, iters=3, depth=1, block=3)
    _backend.force_backend("triton")
    got = extreme_singular_values([m.to(kernel_device) for m in mats], iters=3, depth=1, block=3)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for a, b in ((got.sigma_max, ref.sigma_max), (got.sigma_min, ref.sigma_min)):
        assert torch.allclose(a.cpu(), b, rtol=tol, atol=tol)


@pytest.mark.interpret
def test_ragged_bmm_kernel_against_float64_reference(kernel_device):
    torch.set_default_device(kernel_device)
    try:
        _ragged_bmm_case()
    finally:
        torch.set_default_device("cpu")


def _ragged_bmm_case():
    from fastcnc.kernels.spectral import ragged_bmm

    shapes = [(37, 5), (8, 70), (33, 33), (1, 3)]  # tall, wide, square, wide with one row
    mats = [torch.randn(s) for s in shapes]
    tall = [m if m.shape[0] >= m.shape[1] else m.T for m in mats]
    R, L = 3, len(shapes)
    x = torch.zeros(L, 70, R)
    y = torch.zeros(L, 70, R)
    for i, A in enumerate(tall):
        x[i, : A.shape[1]] = torch.randn(A.shape[1], R)
        y[i, : A.shape[0]] = torch.randn(A.shape[0], R)
    fwd = ragged_bmm(mats, x, torch.full((L, 70, R), float("nan")), trans=False)
    bwd = ragged_bmm(mats, y, torch.full((L, 70, R), float("nan")), trans=True)
    for i, A in enumerate(tall):
        m, n = A.shape
        A = A.double().cpu()
        torch.testing.assert_close(fwd[i, :m].double().cpu(), A @ x[i, :n].double().cpu(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bwd[i, :n].double().cpu(), A.T @ y[i, :m].double().cpu(), rtol=1e-5, atol=1e-5)
        assert torch.isnan(fwd[i, m:]).all() and torch.isnan(bwd[i, n:]).all()  # rows beyond the layer untouched


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_resnet_layer_set_warm_start_matches_exact(dtype):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the benchmark's own layer set
    from penalty import drift, layer_matrices

    prev = layer_matrices("resnet50", "cuda", dtype=dtype)
    cur = drift(prev)
    state = SpectralState()
    extreme_singular_values(prev, state=state, refresh=True)
    est = extreme_singular_values(cur, state=state, iters=1, depth=1, block=4)
    for i, m in enumerate(cur):
        smax, smin = sigma_extremes_ref(m.float())
        assert _rel(est.kappa[i], smax / smin) < 1e-2
