"""The certified spectral engine against float64 SVD, with DEFAULT arguments, cold and warm."""

import contextlib
import math

import pytest
import torch
from torch import nn

from fastcnc import TSCNC, _backend, sparsify, spectral
from fastcnc.cnc import cnc_penalty, penalty_from_estimate
from fastcnc.reference import matrix_with_spectrum
from fastcnc.spectral import SpectralState, as_matrices, extreme_singular_values

RTOL = 1e-2  # the engine's default accuracy target

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _graded(m, n, kappa, seed=0):
    k = min(m, n)
    gen = torch.Generator().manual_seed(seed)
    return matrix_with_spectrum(m, n, torch.logspace(0, -math.log10(kappa), k, dtype=torch.float64), generator=gen)


def _kahan(n, theta=1.2):
    """Kahan's upper-triangular matrix: tiny sigma_min hidden behind unremarkable diagonal entries."""
    s, c = math.sin(theta), math.cos(theta)
    K = torch.eye(n, dtype=torch.float64) - c * torch.triu(torch.ones(n, n, dtype=torch.float64), 1)
    return torch.diag(s ** torch.arange(n, dtype=torch.float64)) @ K


def _pruned(m, n, density, seed=0, empty_rows=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=gen) * (torch.rand(m, n, generator=gen) < density)
    W[:empty_rows] = 0
    return W


def check_estimate(est, mats, floor=0.0, rtol=RTOL):
    """Every bracket contains the float64-SVD truth, and every kappa (floored) is within rtol of it."""
    for i, W in enumerate(mats):
        s = torch.linalg.svdvals(W.detach().double())
        smax, smin = float(s[0]), float(s[-1])
        slack = 1e-13 * smax  # the reference SVD's own error
        assert float(est.sigma_max_lo[i]) - slack <= smax <= float(est.sigma_max_hi[i]) + slack, i
        assert float(est.sigma_min_lo[i]) - slack <= smin <= float(est.sigma_min_hi[i]) + slack, i
        assert float(est.sigma_max[i]) <= smax * (1 + 1e-12) + slack
        assert float(est.sigma_min[i]) >= smin * (1 - 1e-12) - slack
        assert bool(est.certified[i]) or bool(est.fallback[i]), i
        if smax == 0:
            assert float(est.kappa[i]) == 1
            continue
        if floor == 0 and bool(est.structural[i]):
            assert float(est.sigma_min[i]) == 0 and smin < 1e-12 * smax
            continue
        got = float(est.sigma_max[i]) / (float(est.sigma_min[i]) + floor * float(est.sigma_max[i]))
        want = smax / (smin + floor * smax)
        assert abs(got / want - 1) <= rtol, (i, got, want)


SHAPES = {"tall": (2304, 256), "wide": (256, 2304), "square": (300, 300)}


@pytest.mark.parametrize("kappa", [1e2, 1e4, 1e6], ids=lambda k: f"kappa{k:.0e}")
@pytest.mark.parametrize("orient", list(SHAPES))
def test_graded_spectrum_cold_and_warm_default_arguments(kappa, orient):
    m, n = SHAPES[orient]
    A = _graded(m, n, kappa).float()
    state = SpectralState()
    est = extreme_singular_values(A, state=state)
    check_estimate(est, [A])
    # warm: an SGD-sized step (the bottom moves relative to itself by far more than the rtol)
    B = A + 1e-3 * A.abs().mean() * torch.randn(A.shape, generator=torch.Generator().manual_seed(1))
    est = extreme_singular_values(B, state=state)
    check_estimate(est, [B])
    if kappa <= 1e4:  # certified by the float64 Cholesky test, no SVD
        assert bool(est.certified[0]) and not bool(est.fallback[0])


def test_later_rounds_certify_every_row_of_a_group_without_fallback():
    # cold, kappa 1e4: the first round cannot certify either matrix, the later ones must (not the SVD fallback)
    mats = [_graded(2304, 256, 1e4, seed=s).float() for s in (0, 1)]
    est = extreme_singular_values(mats)
    check_estimate(est, mats)
    assert est.work["rounds"] >= 2 and est.work["fallbacks"] == 0
    assert bool(est.certified.all())


def test_structurally_singular_rows_only_certify_sigma_max():
    # empty columns: sigma_min = 0 from the zero pattern; no factor of G - s I exists, so none is attempted.
    # tight_max=True: the Gram route certifies sigma_max to rtol with one upper certificate per matrix
    mats = [_pruned(600, 256, 0.05, seed=s) for s in range(3)]
    for W in mats:
        W[:, :3] = 0
    state = SpectralState()
    for step in range(2):
        est = extreme_singular_values(mats, state=state, tight_max=True)
        check_estimate(est, mats)
        assert bool(est.structural.all()) and bool(est.certified.all())
        assert est.work["inverse_steps"] == 0
        # upper certificates only: one per matrix and round (warm: one round)
        assert est.work["factorizations"] <= est.work["rounds"] * len(mats)
        assert step == 0 or est.work["factorizations"] == len(mats)
        assert est.work["grams"] == len(mats)
        assert bool((est.sigma_max_hi <= est.sigma_max_lo * (1 + RTOL)).all())
        mats = [W + 1e-3 * (W != 0) for W in mats]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("orient", ["tall", "wide"])
def test_structural_rows_skip_the_gram_by_default(dtype, orient):
    # default: no Gram, no factorization; kappa_floor exact (sigma_min = 0), sigma_max a proven lower bound close to
    # the truth (cold and warm after a small step) and a proven, loose upper bound
    mats = []
    for s in range(3):
        W = _pruned(900, 200, 0.05, seed=s)
        if s < 2:
            W[:, 5] = 0  # an empty column
        else:
            W[150:] = 0  # fewer non-empty rows (150) than columns (200), no empty column
            W[:150] += 0.01
        mats.append((W if orient == "tall" else W.T.contiguous()).to(dtype))
    mats.append(torch.zeros_like(mats[0]))  # all-zero
    state = SpectralState()
    for step in range(2):
        est = extreme_singular_values(mats, state=state, floor=1e-6)
        check_estimate(est, [m.double() for m in mats], floor=1e-6)
        assert bool(est.structural.all()) and bool(est.certified.all()) and not bool(est.fallback.any())
        assert est.work["grams"] == 0 and est.work["factorizations"] == 0
        for i, W in enumerate(mats):
            smax = float(torch.linalg.svdvals(W.double())[0])
            tol = 1e-2 if step else 3e-2  # random pruned matrices: a clustered top (warm: 4 steps, cold: 12)
            assert float(est.sigma_max[i]) >= smax * (1 - tol), (step, i)
            assert float(est.sigma_max[i]) == float(est.sigma_max_lo[i]) and float(est.sigma_min[i]) == 0
            u, v = est.u_max[i].double(), est.v_max[i].double()
            if smax > 0:
                assert abs(float(u @ W.double() @ v) - smax) <= tol * smax
        mats = [W + (1e-3 * (W != 0)).to(dtype) for W in mats]


def test_source_bounds_hold_and_find_the_structure():
    from fastcnc.spectral import _gamma, _source_bounds

    gen = torch.Generator().manual_seed(4)
    dense = torch.randn(300, 70, generator=gen)
    tiny = dense * 1e-30  # products underflow in float32
    empty_row_poor = torch.zeros(80, 70)
    empty_row_poor[:60] = torch.randn(60, 70, generator=gen)  # 60 non-empty rows < 70 columns
    mats = [dense, dense.T, tiny, empty_row_poor, empty_row_poor.T, dense.double()]
    b = _source_bounds(mats)
    assert b.structural.tolist() == [False, False, False, True, True, False]
    for i, W in enumerate(mats):
        A = (W.T if W.shape[0] < W.shape[1] else W).double()
        m = A.shape[0]
        q = (A.abs().T @ (A.abs() @ torch.ones(A.shape[1], dtype=torch.float64))).max()
        assert float(b.gram_err[i]) >= _gamma(m) * float(q)
        assert float(b.norm[i]) >= float(torch.linalg.svdvals(A)[0])
    assert bool(b.finite.all())
    assert not bool(_source_bounds([torch.full((4, 3), float("nan"))]).finite.all())


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("n", [64, 127, 128, 200, 513])
def test_blocked_gram_is_the_product(n, wide):
    from fastcnc.spectral import _gram

    gen = torch.Generator().manual_seed(n)
    m = n + 37
    W = torch.randn(2, n, m, generator=gen, dtype=torch.float64) if wide else \
        torch.randn(2, m, n, generator=gen, dtype=torch.float64)
    A = W.mT if wide else W  # a wide group's tall view (strided columns), or a tall stack as stored
    G = _gram(A)
    ref = torch.einsum("bki,bkj->bij", A, A)
    # each entry one length-m dot product: within the Gram's rounding bound of the exact product
    bound = 2 * m * 2.0**-53 * torch.einsum("bki,bkj->bij", A.abs(), A.abs())
    assert bool(((G - ref).abs() <= bound).all())  # both triangles: the mirrored blocks too


def test_top_ritz_pick_of_a_two_column_block_is_the_dominant_eigenvector():
    # closed form 0.5 atan2(2b, a - c) against eigh, including ties, a zero off-diagonal and a negative one
    from fastcnc.spectral import _top_ritz

    gen = torch.Generator().manual_seed(10)
    n = 7
    Y = torch.linalg.qr(torch.randn(5, n, 2, generator=gen, dtype=torch.float64))[0]
    H = torch.tensor([[[3.0, 1.0], [1.0, 2.0]], [[1.0, 0.0], [0.0, 4.0]], [[2.0, -1.5], [-1.5, 2.0]],
                      [[5.0, 0.0], [0.0, 5.0]], [[1e-12, 3e-13], [3e-13, 2e-12]]], dtype=torch.float64)
    G = Y @ H @ Y.mT  # span(Y) holds exactly the 2 x 2 problem H
    y = _top_ritz(G, Y)
    lam_top = torch.linalg.eigvalsh(H)[:, -1]
    rayleigh = torch.einsum("bi,bij,bj->b", y, G, y)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(rayleigh, lam_top, rtol=1e-12, atol=0)


def test_kappa_beyond_float64_raises_naming_the_precision_and_floor_certifies():
    A = _graded(120, 60, 1e14).double()
    with pytest.raises(ValueError, match=r"weights\[0\].*needs more than float64.*floor"):
        extreme_singular_values(A)
    est = extreme_singular_values(A, floor=1e-6)
    check_estimate(est, [A], floor=1e-6)


@pytest.mark.parametrize("n", [30, 60])
def test_kahan_matrix(n):
    K = _kahan(n)
    s = torch.linalg.svdvals(K)
    try:
        est = extreme_singular_values(K)
    except ValueError as e:  # allowed only where float64 cannot resolve sigma_min
        assert float(s[0] / s[-1]) > 1e12 and "float64" in str(e)
        return
    check_estimate(est, [K])


def test_clustered_bottom():
    n = 80
    gen = torch.Generator().manual_seed(0)
    s = torch.cat([torch.linspace(10, 1.0, n - 6, dtype=torch.float64),
                   1e-3 * (1 + 1e-4 * torch.rand(6, generator=gen, dtype=torch.float64))])
    A = matrix_with_spectrum(200, n, torch.sort(s, descending=True).values, generator=gen)
    est = extreme_singular_values(A)
    check_estimate(est, [A])
    assert bool(est.certified[0])


@pytest.mark.parametrize("density, empty_rows", [(0.05, 0), (0.01, 0), (0.05, 3), (0.01, 5)])
@pytest.mark.parametrize("shape", [(128, 1152), (1152, 128)], ids=["wide", "tall"])
def test_pruned_matrices(density, empty_rows, shape):
    W = _pruned(*shape, density, empty_rows=empty_rows)
    if shape[0] > shape[1]:  # empty *columns* of a tall matrix are what forces rank deficiency
        W = _pruned(shape[1], shape[0], density, empty_rows=empty_rows).T.contiguous()
    state = SpectralState()
    est = extreme_singular_values(W, state=state)
    check_estimate(est, [W])
    if empty_rows:  # structurally rank-deficient: exactly 0, certified, no iteration needed for it
        assert bool(est.structural[0]) and float(est.sigma_min[0]) == 0 and bool(est.certified[0])
        # the gradient u_min v_min^T is 0, a subgradient of sigma_min at its minimum
        assert torch.all(torch.outer(est.u_min[0], est.v_min[0]) == 0)
    W2 = W + 1e-3 * (W != 0) * torch.randn(W.shape, generator=torch.Generator().manual_seed(2))
    check_estimate(extreme_singular_values(W2, state=state), [W2])


def test_more_empty_columns_than_rank_allows_is_structural():
    W = torch.zeros(40, 200)
    W[:, :30] = torch.randn(40, 30)  # a wide matrix with only 30 non-empty columns: rank <= 30 < 40
    est = extreme_singular_values(W)
    assert bool(est.structural[0]) and float(est.sigma_min[0]) == 0


@pytest.mark.parametrize("shape", [(64, 27), (64, 64), (256, 64), (64, 256), (2048, 512), (10, 512)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_resnet_layer_shapes_first_conv_and_1x1(shape):
    gen = torch.Generator().manual_seed(3)
    mats = [torch.randn(shape, generator=gen) / shape[1] ** 0.5 for _ in range(2)]
    state = SpectralState()
    check_estimate(extreme_singular_values(mats, state=state), mats)
    mats = [m + 1e-3 * torch.randn(shape, generator=gen) / shape[1] ** 0.5 for m in mats]
    check_estimate(extreme_singular_values(mats, state=state), mats)


def test_mixed_batch_groups_by_shape_and_keeps_order():
    gen = torch.Generator().manual_seed(4)
    mats = [torch.randn(30, 20, generator=gen), torch.randn(20, 30, generator=gen), torch.randn(7, 5, generator=gen),
            torch.zeros(6, 4), torch.randn(30, 20, generator=gen) * 1e-30, torch.randn(1, 9, generator=gen)]
    est = extreme_singular_values(mats)
    check_estimate(est, mats)
    for i, W in enumerate(mats):  # vectors in each matrix's own orientation
        assert est.u_max[i].shape == (W.shape[0],) and est.v_max[i].shape == (W.shape[1],)
        for s, u, v in ((est.sigma_max, est.u_max, est.v_max), (est.sigma_min, est.u_min, est.v_min)):
            # the values are the bilinear forms whose gradient the penalty uses
            torch.testing.assert_close(u[i] @ W.double() @ v[i], s[i], rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("cuda_path", [False, True], ids=["cpu-rule", "cuda-rule"])
@pytest.mark.parametrize("sync", [True, False])
def test_shapes_sharing_n_are_batched_like_separate_calls(sync, cuda_path):
    """On the CUDA code path, tall shapes with equal n run as one batch (A zero-padded to the largest m); on CPU one
    batch per tall shape. Either way each matrix's values, brackets, flags and vectors are those of a call on it
    alone, and the backward groups are split back per tall shape."""
    with _backend.cuda_code_path() if cuda_path else contextlib.nullcontext():
        _check_batched_like_separate_calls(sync, exact=not cuda_path)


def _check_batched_like_separate_calls(sync, exact):
    # exact: values equal to a lone call's up to rounding (CPU: the eigh path for small n, independent of the start);
    # else (the CUDA rule iterates from random starts drawn per shape) kappa_eps within the target
    gen = torch.Generator().manual_seed(6)
    mats = [torch.randn(40, 12, generator=gen), torch.randn(12, 25, generator=gen), torch.randn(40, 12, generator=gen),
            torch.randn(12, 12, generator=gen), torch.randn(30, 9, generator=gen)]
    mats[2][:, 3] = 0  # structurally rank-deficient inside a merged batch
    est = extreme_singular_values(mats, sync=sync, refresh=[False, True, False, False, False])
    check_estimate(est, mats)
    for i, W in enumerate(mats):
        assert est.u_max[i].shape == (W.shape[0],) and est.v_min[i].shape == (W.shape[1],)
        if not sync:  # the cold random start of a lone call is another draw: only the brackets compare (above)
            continue
        one = extreme_singular_values([W], sync=sync, refresh=i == 1)
        if not exact:
            kf = [e.sigma_max[j] / e.sigma_min[j] for e, j in ((est, i), (one, 0)) if not bool(est.structural[i])]
            if kf:
                torch.testing.assert_close(kf[0], kf[1], rtol=RTOL, atol=0)
            continue
        for key in ("sigma_max", "sigma_min", "sigma_max_lo", "sigma_max_hi", "sigma_min_lo", "sigma_min_hi"):
            torch.testing.assert_close(getattr(est, key)[i:i + 1], getattr(one, key), rtol=1e-12, atol=0)
        assert bool(est.certified[i] == one.certified[0]) and bool(est.fallback[i] == one.fallback[0])
        torch.testing.assert_close(est.u_min[i], one.u_min[0], rtol=1e-10, atol=1e-12)
    shapes = sorted((g.U.shape[1], g.V.shape[1], tuple(g.index)) for g in est.groups)
    assert shapes == sorted(
        [(40, 12, (0, 2)), (25, 12, (1,)), (12, 12, (3,)), (30, 9, (4,))])


def test_small_matrices_of_different_n_merge_into_one_padded_batch_like_separate_calls():
    """On CPU, matrices with n <= 128 of every n run as one zero-padded eigh batch: each matrix's values, brackets,
    flags and vectors must be those of a call on it alone, cold and warm, including an exact-SVD fallback (kappa 1e7
    is beyond the Cholesky test's reach), a structurally singular and an all-zero matrix."""
    gen = torch.Generator().manual_seed(8)
    mats = [torch.randn(90, 64, generator=gen), torch.randn(5, 27, generator=gen), _graded(100, 40, 1e7).float(),
            torch.randn(128, 300, generator=gen), torch.zeros(16, 9), torch.randn(50, 6, generator=gen)]
    mats[5][:, 2] = 0
    state = SpectralState()
    for _ in range(2):
        est = extreme_singular_values(mats, state=state, ritz_block=True)
        check_estimate(est, mats)
        assert bool(est.fallback[2]) and bool(est.structural[5]) and bool(est.structural[4])
        assert [tuple(b.shape) for b in state.blocks] == [(min(W.shape), 6) for W in mats]
        for i, W in enumerate(mats):
            one = extreme_singular_values([W], ritz_block=True)
            for key in ("sigma_max", "sigma_min", "sigma_max_lo", "sigma_max_hi", "sigma_min_lo", "sigma_min_hi"):
                torch.testing.assert_close(getattr(est, key)[i:i + 1], getattr(one, key), rtol=1e-9, atol=0)
            assert bool(est.certified[i] == one.certified[0]) and bool(est.fallback[i] == one.fallback[0])
            assert est.v_min[i].shape == (W.shape[1],) and est.u_min[i].shape == (W.shape[0],)
            torch.testing.assert_close(est.bottom[i][0], one.bottom[0][0], rtol=1e-9, atol=1e-300)
        mats = [W + 1e-3 * (W != 0) for W in mats]
    # the backward groups are split back per tall shape and orientation, vectors cut to each matrix's own n
    assert sorted((g.U.shape[1], g.V.shape[1]) for g in est.groups) == sorted(
        (max(W.shape), min(W.shape)) for W in mats)


CUDA_OR_SIM = [pytest.param("sim", id="cuda-rule-on-cpu"),
               pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
                   not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", CUDA_OR_SIM)
@pytest.mark.parametrize("sync", [True, False])
def test_cuda_batches_merged_across_n_compute_each_matrix_like_a_lone_call(sync, device, monkeypatch):
    """On the CUDA code path, n <= 128 share one batch and larger n share their power of two where it adds at most
    25% (_batch_n), zero-padded (_Group.merged): hard cases of several n, cold then warm, must certify, bracket the
    truth and (sync) give the values of a call on each matrix alone; the batches are fewer than the n's."""
    import fastcnc.spectral as spectral

    gen = torch.Generator().manual_seed(9)
    mats = [_graded(300, 100, 1e4), _pruned(64, 576, 0.05, empty_rows=0), _kahan(60),
            torch.randn(10, 512, generator=gen), torch.randn(64, 27, generator=gen),
            _graded(2304, 256, 1e2, seed=1).float(), _graded(250, 600, 1e3, seed=2),
            torch.randn(200, 400, generator=gen), _pruned(128, 1152, 0.05, seed=3, empty_rows=2)]
    batches = []
    solve = spectral._solve_group

    def counting(g, *args, **kwargs):
        batches.append(sorted(set(g.row_n)))
        return solve(g, *args, **kwargs)

    monkeypatch.setattr(spectral, "_solve_group", counting)
    state = SpectralState()
    if device == "cuda":  # the real thing: cuSOLVER factorizations and the compiled kernels/ritz.py
        mats = [W.cuda() for W in mats]
    with _backend.cuda_code_path() if device == "sim" else contextlib.nullcontext():
        for step in range(2):
            batches.clear()
            est = extreme_singular_values(mats, state=state, sync=sync, floor=1e-6)
            assert sorted(batches) == [[10, 27, 60, 64, 100, 128], [200], [250, 256]]
            assert [tuple(b.shape) for b in state.blocks] == [(min(W.shape), 6) for W in mats]
            # (sync-free: two fixed rounds, cold from random blocks, then warm: every matrix certifies either way)
            check_estimate(est, [W.cpu() for W in mats], floor=1e-6)
            for i, W in enumerate(mats):
                assert est.u_min[i].shape == (W.shape[0],) and est.v_min[i].shape == (W.shape[1],)
                torch.testing.assert_close(est.u_min[i] @ W.double() @ est.v_min[i], est.sigma_min[i], rtol=1e-10,
                                           atol=1e-300)
                if sync and step == 0:
                    with _backend.cuda_code_path() if device == "sim" else contextlib.nullcontext():
                        one = extreme_singular_values([W], floor=1e-6)
                    kf = (est.sigma_max[i] / (est.sigma_min[i] + 1e-6 * est.sigma_max[i]),
                          one.sigma_max[0] / (one.sigma_min[0] + 1e-6 * one.sigma_max[0]))
                    torch.testing.assert_close(kf[0], kf[1], rtol=RTOL, atol=0)
            mats = [W + 1e-4 * W.abs().mean() * (W != 0) * torch.randn(W.shape, generator=gen, dtype=W.dtype).to(
                W.device) for W in mats]


@pytest.mark.parametrize("sync", [True, False])
def test_cuda_many_small_blocks_keep_a_batch_of_their_own(sync, monkeypatch):
    """On the CUDA code path a shape group with more than _OWN_BATCH Gram entries is not padded into its bucket of n
    (thousands of 32 x 32 blocks would be padded with the bucket): its batch holds its own n, the rest still merge."""
    import fastcnc.spectral as spectral

    monkeypatch.setattr(spectral, "_OWN_BATCH", 1000)  # 8 blocks of n = 12: 1,152 entries
    blocks = _hard_batch(8, 16, 12)
    gen = torch.Generator().manual_seed(3)
    others = [torch.randn(30, 20, generator=gen), torch.randn(64, 27, generator=gen)]
    seen = []
    solve = spectral._solve_group

    def recording(g, *args, **kwargs):
        seen.append((sorted(set(g.row_n)), g.n))
        return solve(g, *args, **kwargs)

    monkeypatch.setattr(spectral, "_solve_group", recording)
    mats = list(blocks.unbind(0)) + others
    with _backend.cuda_code_path():
        est = extreme_singular_values(mats, sync=sync, floor=1e-6)
    assert sorted(seen) == [([12], 12), ([20, 27], 27)]
    check_estimate(est, mats, floor=1e-6)


def test_cuda_batch_built_in_one_pass_holds_each_shape_groups_values():
    """The CUDA batch (_Group with on_device=True: several tall shapes zero-padded to one [m, n], A, coefficients and
    bounds once for the batch, the Gram per run of one shape) holds, on each matrix's rows, what a group of that shape
    alone would: the same A, flags and rounding coefficients exactly, the Gram-derived quantities up to the summation
    order of the products (each entry still one length-m dot product: the same rounding bounds), zeros and a padding
    mask on the padding."""
    import fastcnc.spectral as spectral

    gen = torch.Generator().manual_seed(9)
    mats = [_graded(300, 100, 1e4), _pruned(64, 576, 0.05).T.contiguous(), _kahan(60),
            torch.randn(10, 512, generator=gen), torch.randn(64, 27, generator=gen), torch.randn(27, 64, generator=gen),
            torch.randn(64, 27, generator=gen),
            _pruned(128, 1152, 0.05, seed=3, empty_rows=2), torch.zeros(50, 20), _graded(100, 40, 1e3).float(),
            _graded(100, 40, 1e2, seed=5).float()]
    mats[5][3] = 0  # a zero row of a wide matrix: an empty column of its tall form, structurally rank-deficient
    runs: dict = {}
    for i in sorted(range(len(mats)), key=lambda i: (max(mats[i].shape), min(mats[i].shape))):
        runs.setdefault((max(mats[i].shape), min(mats[i].shape)), []).append(i)
    idx = [i for r in runs.values() for i in r]
    with _backend.cuda_code_path():
        size = (max(max(mats[i].shape) for i in idx), max(min(mats[i].shape) for i in idx))
        batch = spectral._Group(idx, [mats[i] for i in idx], size=size, on_device=True)
        alone = {shape: spectral._Group(r, [mats[i] for i in r]) for shape, r in runs.items()}
    assert batch.index == idx and (batch.m, batch.n) == size
    start = 0
    for (m, n), r in runs.items():
        g, rows = alone[(m, n)], slice(start, start + len(r))
        start += len(r)
        assert torch.equal(batch.A[rows, :m, :n], g.A)
        assert not batch.A[rows, m:].any() and not batch.A[rows, :, n:].any()
        assert not batch.G[rows, n:].any() and not batch.G[rows, :, n:].any()
        assert torch.equal(batch.pad[rows], torch.arange(batch.n)[None, :].expand(len(r), -1) >= n)
        for key in ("exp", "structural", "finite", "zero"):
            assert torch.equal(getattr(batch, key)[rows], getattr(g, key)), key
        for key in ("val_coef", "svd_coef"):
            assert bool((getattr(batch, key)[rows] == getattr(g, key)).all()), key
        torch.testing.assert_close(batch.G[rows, :n, :n], g.G, rtol=1e-14, atol=0)
        for key in ("gram_err", "trace", "fro", "lam_max_bound", "margin0"):
            torch.testing.assert_close(getattr(batch, key)[rows], getattr(g, key), rtol=1e-14, atol=0, msg=key)
        assert batch.margin1 >= g.margin1
    assert bool(batch.structural[idx.index(5)]) and bool(batch.zero[idx.index(8)])


def test_thousands_of_small_same_shape_blocks_are_one_group():
    gen = torch.Generator().manual_seed(5)
    mats = list(torch.randn(2000, 8, 6, generator=gen, dtype=torch.float64).unbind(0))
    est = extreme_singular_values(mats)
    s = torch.linalg.svdvals(torch.stack(mats))
    kappa = s[:, 0] / s[:, -1]
    assert torch.all((est.kappa / kappa - 1).abs() <= RTOL)
    assert est.work["grams"] == 2000 and bool(est.certified.all())


def _hard_batch(B, m, n, seed=0):
    """[B, m, n] float32 of one shape: graded spectra (kappa 1e1..1e4), clustered bottoms, pruned 95% blocks with an
    empty column of the tall orientation (structurally singular), a zero block, and plain Gaussian ones."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(B):
        kind = i % 5
        if kind == 0:
            W = _graded(m, n, 10.0 ** (1 + i % 4), seed=seed + i)
        elif kind == 1:  # four bottom singular values within 1e-3 of each other
            sv = torch.linspace(1.0, 0.1, min(m, n), dtype=torch.float64)
            sv[-4:] = 0.01 * (1 + 1e-3 * torch.arange(4, dtype=torch.float64))
            W = matrix_with_spectrum(m, n, sv, generator=gen)
        elif kind == 2:
            W = _pruned(m, n, 0.05, seed=seed + i)
            if m >= n:  # an empty column of the tall orientation
                W[:, 0] = 0
            else:
                W[0] = 0
        elif kind == 3:
            W = torch.zeros(m, n) if i % 25 == 3 else torch.randn(m, n, generator=gen)
        else:
            W = torch.randn(m, n, generator=gen, dtype=torch.float64)
        out.append(W.float())
    return torch.stack(out)


@pytest.mark.parametrize("shape", [(40, 72, 48), (40, 48, 72), (15, 200, 160)], ids=["tall-eigh", "wide-eigh",
                                                                                    "tall-iterated"])
def test_a_batch_tensor_is_its_matrices_cold_and_warm(shape):
    """A [B, m, n] tensor is B matrices of one shape: the same estimate as the list of them, every bracket holding
    the float64-SVD truth, cold and warm (after a drift), with default arguments."""
    W = _hard_batch(*shape)
    state = SpectralState()
    est = extreme_singular_values(W, state=state)
    ref = extreme_singular_values(list(W.unbind(0)))
    for key in ("sigma_max", "sigma_min", "sigma_min_lo", "sigma_min_hi", "sigma_max_lo", "sigma_max_hi"):
        assert torch.equal(getattr(est, key), getattr(ref, key)), key
    assert torch.equal(est.certified, ref.certified) and torch.equal(est.structural, ref.structural)
    check_estimate(est, list(W.unbind(0)))
    assert int(est.structural.sum()) >= shape[0] // 5
    gen = torch.Generator().manual_seed(1)
    W2 = W + 1e-3 * torch.randn(W.shape, generator=gen) * (W != 0)
    warm = extreme_singular_values(W2, state=state)
    check_estimate(warm, list(W2.unbind(0)))
    assert warm.work["fallbacks"] == 0 and bool(warm.certified.all())
    for j in range(0, shape[0], 7):  # each matrix's vectors in its own orientation
        assert warm.u_min[j].shape == (shape[1],) and warm.v_min[j].shape == (shape[2],)


def test_a_batch_tensor_names_its_bad_matrix():
    W = torch.randn(6, 5, 4)
    W[3, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"weights\[3\]"):
        extreme_singular_values(W)


def test_zero_matrix_is_finite():
    est = extreme_singular_values([torch.zeros(40, 30), torch.zeros(3, 2)])
    assert torch.all(est.sigma_max == 0) and torch.all(est.sigma_min == 0)
    assert torch.all(est.kappa == 1) and bool(est.certified.all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_weights_are_read_exactly(dtype):
    A = _graded(300, 80, 1e3).to(dtype)
    check_estimate(extreme_singular_values(A), [A])


@pytest.mark.parametrize("scale", [1e-37, 1e-20, 1e20, 1e36])
def test_scale_invariance_at_extreme_magnitudes(scale):
    A = torch.randn(40, 30, generator=torch.Generator().manual_seed(6))
    est, ref = extreme_singular_values(A * scale), extreme_singular_values(A)
    assert math.isclose(float(est.sigma_max[0]) / scale, float(ref.sigma_max[0]), rel_tol=1e-5)
    assert math.isclose(float(est.kappa[0]), float(ref.kappa[0]), rel_tol=1e-5)


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e-36), (torch.float32, 1e-25), (torch.float32, 1e30),
                                          (torch.float64, 1e-170), (torch.float64, 1e-300), (torch.float64, 1e300)])
def test_structurally_singular_matrices_at_extreme_magnitudes(dtype, scale):
    # the Gram-free path works in the weights' precision and must not see them underflow: its norm bound and its
    # power steps once made a certified [0, 0] bracket (kappa 1, penalty 0: "all-zero") of a non-zero matrix
    W = torch.randn(300, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    W[:, 5] = 0  # an empty column: sigma_min = 0 exactly, n = 200 takes the Gram-free path at ordinary magnitudes
    A = (W * scale).to(dtype)
    est = extreme_singular_values(A, floor=1e-3)
    check_estimate(est, [A], floor=1e-3)
    assert bool(est.structural[0]) and float(est.sigma_max[0]) > 0
    assert float(cnc_penalty(A, eps=1e-3)) == pytest.approx(math.log(1e3), rel=1e-12)


def test_refresh_is_exact_on_structurally_singular_matrices_too():
    W = torch.randn(300, 200, generator=torch.Generator().manual_seed(1))
    W[:, 5] = 0
    est = extreme_singular_values(W, refresh=True)
    assert bool(est.fallback[0]) and est.work["fallbacks"] == 1
    assert float(est.sigma_max[0]) == pytest.approx(float(torch.linalg.matrix_norm(W.double(), 2)), rel=1e-12)


def test_refresh_is_exact_and_resets_state():
    A = torch.randn(90, 40, dtype=torch.float64)
    state = SpectralState()
    est = extreme_singular_values(A, state=state, refresh=True)
    s = torch.linalg.svdvals(A)
    assert math.isclose(float(est.sigma_min[0]), float(s[-1]), rel_tol=1e-12)
    assert bool(est.fallback[0]) and state.matches([(90, 40)]) and est.work["fallbacks"] == 1


def test_sync_free_call_runs_fixed_rounds_and_leaves_flags_on_device():
    A, B = _graded(300, 60, 1e2), _graded(200, 50, 1e6, seed=1)
    est = extreme_singular_values([A, B], sync=False)
    assert est.work["rounds"] == 2 and est.work["fallbacks"] == 0
    assert not bool(est.certified[1])  # kappa 1e6 cannot be certified from the Gram: flagged, not hidden
    for i, W in enumerate((A, B)):  # brackets hold even when they are too wide to certify
        s = torch.linalg.svdvals(W)
        assert float(est.sigma_min_lo[i]) <= float(s[-1]) <= float(est.sigma_min_hi[i])
        assert float(est.sigma_max_lo[i]) <= float(s[0]) <= float(est.sigma_max_hi[i])


def test_warm_state_is_used_and_cheaper():
    A = _graded(1000, 120, 1e3).float()
    state = SpectralState()
    cold = extreme_singular_values(A, state=state)
    warm = extreme_singular_values(A + 1e-4 * torch.randn_like(A) / 30, state=state)
    assert warm.work["rounds"] <= cold.work["rounds"] and warm.work["rounds"] == 1


def test_corrupt_state_raises_and_foreign_state_is_ignored():
    A = torch.randn(40, 30)
    state = SpectralState()
    extreme_singular_values(A, state=state)
    state.blocks[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"state holds NaN/Inf.*fresh"):
        extreme_singular_values(A, state=state)
    # finite but degenerate: a zero column made a Ritz pick of the zero vector, |A 0| = 0 a "certified" sigma_min
    B = torch.randn(300, 200, dtype=torch.float64)  # n > 128: the iterative path reads the state
    degenerate = SpectralState()
    extreme_singular_values(B, state=degenerate)
    degenerate.blocks[0][:, 0] = 0
    with pytest.raises(ValueError, match=r"not orthonormal.*fresh"):
        SpectralState.from_dict(degenerate.to_dict())  # a checkpoint: checked on load, whatever the device
    with pytest.raises(ValueError, match=r"not orthonormal.*fresh"):
        extreme_singular_values(B, state=degenerate)  # every synchronous call checks its state
    # rank 1 (pruned layers get there): the power steps collapse the top block, which the next call accepts
    gen = torch.Generator().manual_seed(3)
    rank1 = torch.outer(torch.randn(1024, generator=gen), torch.randn(256, generator=gen))
    structural = rank1.clone()
    structural[:, 7] = 0
    state = SpectralState()
    for _ in range(3):
        est = extreme_singular_values([rank1, structural], floor=1e-3, state=state)
        check_estimate(est, [rank1, structural], floor=1e-3)
    other = SpectralState()
    extreme_singular_values(torch.randn(41, 30), state=other)
    check_estimate(extreme_singular_values(A, state=other), [A])
    wrong_block = SpectralState()
    extreme_singular_values(A, state=wrong_block, block=2)
    check_estimate(extreme_singular_values(A, state=wrong_block), [A])


def test_state_roundtrip():
    A = torch.randn(50, 20)
    state = SpectralState()
    extreme_singular_values(A, state=state)
    s2 = SpectralState.from_dict(state.to_dict())
    e1, e2 = extreme_singular_values(A, state=state), extreme_singular_values(A, state=s2)
    assert torch.equal(e1.sigma_min, e2.sigma_min)


def _zero_rows(W, rows, wide):
    W = W.clone()
    if wide:
        W[:, rows] = 0
    else:
        W[rows] = 0
    return W


@pytest.mark.parametrize("wide", [False, True], ids=["tall", "wide"])
def test_groups_formed_from_nonzero_rows_match_the_full_matrices(wide, monkeypatch):
    # pruning empties whole rows of the tall orientation (input features); a CPU group whose matrices all have at
    # most 90% nonzero rows is formed from those alone (padded to the group's largest count). Values, brackets,
    # vectors (zeros on the empty rows), the exact fallback, the Ritz blocks and the gradient must be those of the
    # full matrices
    gen = torch.Generator().manual_seed(3)
    m, n = 700, 150
    mats = []
    for k, (dtype, empty) in enumerate(((torch.float32, 300), (torch.float32, 120), (torch.float64, 250))):
        A = _graded(m, n, 10.0 ** (k + 1), seed=k)
        A = _zero_rows(A, torch.randperm(m, generator=gen)[:empty], False).to(dtype)
        mats.append(A.T.contiguous() if wide else A)
    formed = []  # per group solved: formed from its nonzero rows?
    solve = spectral._solve_group
    monkeypatch.setattr(spectral, "_solve_group", lambda g, *a, **k: formed.append(g.held is not None) or solve(g, *a,
                                                                                                              **k))
    state = SpectralState()
    cold = extreme_singular_values(mats, state=state)
    moved = [w + 1e-3 * torch.randn_like(w) * (w != 0) for w in mats]
    warm = extreme_singular_values(moved, state=state, ritz_block=True)
    assert formed == [True, True]  # one group (float32 and float64 alike), compacted in both calls
    monkeypatch.setattr(spectral, "_COMPACT_ROWS", -1.0)  # the same calls on the full matrices
    state_full = SpectralState()
    cold_full = extreme_singular_values(mats, state=state_full)
    warm_full = extreme_singular_values(moved, state=state_full, ritz_block=True)
    refreshed = extreme_singular_values(moved, refresh=True)
    monkeypatch.undo()
    refreshed_rows = extreme_singular_values(moved, refresh=True)
    for est, ref, ws in ((cold, cold_full, mats), (warm, warm_full, moved), (refreshed_rows, refreshed, moved)):
        check_estimate(est, ws)
        for key in ("sigma_min", "sigma_max", "sigma_min_lo", "sigma_max_hi"):
            torch.testing.assert_close(getattr(est, key), getattr(ref, key), rtol=1e-9, atol=0)
        for i, W in enumerate(ws):
            Wd = W.double()
            for u, v, s in ((est.u_min[i], est.v_min[i], est.sigma_min[i]), (est.u_max[i], est.v_max[i],
                                                                             est.sigma_max[i])):
                assert u.shape == (W.shape[0],) and v.shape == (W.shape[1],)
                # the long side's vector is A x / |A x| by construction: zero where the row of A is
                if wide:
                    torch.testing.assert_close(v, Wd.T @ u / s, rtol=0, atol=1e-12)
                else:
                    torch.testing.assert_close(u, Wd @ v / s, rtol=0, atol=1e-12)
    for (s, U, V), (s_f, U_f, V_f), W in zip(warm.bottom, warm_full.bottom, moved, strict=True):
        assert U.shape == U_f.shape and V.shape == V_f.shape
        torch.testing.assert_close(s, s_f, rtol=1e-9, atol=0)
        if wide:
            torch.testing.assert_close(V, W.double().T @ U / s, rtol=0, atol=1e-10)
        else:
            torch.testing.assert_close(U, W.double() @ V / s, rtol=0, atol=1e-10)
    grads = []
    for est in (warm, warm_full):
        leaves = [w.clone().requires_grad_() for w in moved]
        penalty_from_estimate(leaves, est, eps=1e-6, from_these_weights=True).backward()
        grads.append([w.grad for w in leaves])
    for g, g_full in zip(*grads, strict=True):
        torch.testing.assert_close(g, g_full, rtol=1e-5, atol=1e-12)


def test_tscnc_on_layers_with_pruned_inputs_matches_the_full_matrices(monkeypatch):
    # TSCNC end to end on layers whose masks empty whole inputs (n > 128: the engine's groups drop those rows): the
    # penalty and the weights' gradients of a warm step equal those computed on the full matrices
    def step(compact: bool):
        monkeypatch.setattr(spectral, "_COMPACT_ROWS", 0.9 if compact else -1.0)
        torch.manual_seed(0)
        net = sparsify(nn.Sequential(nn.Linear(400, 150), nn.Linear(150, 300)))
        gen = torch.Generator().manual_seed(1)
        # a wide layer with half its inputs pruned away (zero columns of W = zero rows of its tall W^T) and a tall
        # one with half its outputs pruned away (zero rows of W)
        for layer, dim in zip(net, (1, 0), strict=True):
            size = layer.mask.shape[dim]
            dead = torch.randperm(size, generator=gen)[:size // 2]
            mask = torch.ones_like(layer.mask)
            mask.index_fill_(dim, dead, 0.0)
            layer.set_mask(mask)
        formed.clear()
        reg = TSCNC(net, lambda_tsc=1e-3, lambda_cnc=1e-2)
        reg()  # the first call is exact
        with torch.no_grad():
            for layer in net:
                layer.weight.add_(1e-3 * torch.randn(layer.weight.shape, generator=gen))
        value = reg()
        value.backward()
        return value.detach(), [layer.weight.grad.clone() for layer in net]

    formed = []  # per group solved: formed from its nonzero rows?
    solve = spectral._solve_group
    monkeypatch.setattr(spectral, "_solve_group", lambda g, *a, **k: formed.append(g.held is not None) or solve(g, *a,
                                                                                                              **k))
    value, grads = step(True)
    assert formed == [True] * 4  # two groups per call (the first call's exact SVD runs on the same groups)
    value_full, grads_full = step(False)
    assert formed == [False] * 4
    torch.testing.assert_close(value, value_full, rtol=1e-6, atol=0)
    for g, g_full in zip(grads, grads_full, strict=True):
        torch.testing.assert_close(g, g_full, rtol=1e-4, atol=1e-9)


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


@pytest.mark.parametrize("kwargs, match", [
    ({"rtol": 0.0}, "rtol"), ({"rtol": 1.5}, "rtol"), ({"floor": -1e-3}, "floor"), ({"block": 0}, "block"),
    ({"iters": 0}, "iters"), ({"max_rounds": 0}, "max_rounds"), ({"refresh": "yes"}, "refresh"),
    ({"sync": 1}, "sync"), ({"seed": "a"}, "seed"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        extreme_singular_values(torch.randn(40, 30), **kwargs)


@pytest.mark.parametrize("route", [None, (96, 32)], ids=["cpu-route", "cuda-route-by-halves"])
@pytest.mark.parametrize("n", [65, 229, 512])
def test_recursive_cholesky_matches_lapack_and_flags_failures(n, route, monkeypatch):
    # n above the leaf size: factored on halves in place (CPU; the CUDA path where _CHOL_HALVES["cuda"] asks for it,
    # with its own split and leaf); same factor as LAPACK's, same ok flags
    from fastcnc.spectral import _chol

    gen = torch.Generator().manual_seed(12)
    A = torch.randn(3, 2, n + 20, n, generator=gen, dtype=torch.float64)
    H = A.mT @ A
    H[1, 0].diagonal().sub_(float(torch.linalg.eigvalsh(H[1, 0])[3]))  # indefinite
    H[2, 1, 0, 0] = float("nan")
    want, info = torch.linalg.cholesky_ex(H)
    if route is None:
        L, ok = _chol(H.clone())
    else:
        monkeypatch.setitem(spectral._CHOL_HALVES, "cuda", route)
        with _backend.cuda_code_path():
            L, ok = _chol(H.clone())
    assert ok.tolist() == [[True, True], [False, True], [True, False]]
    assert ok.tolist() == (info == 0).logical_and(torch.isfinite(want.diagonal(dim1=-2, dim2=-1)).all(-1)).tolist()
    for i, j in ((0, 0), (0, 1), (1, 1), (2, 0)):
        torch.testing.assert_close(L[i, j].tril(), want[i, j], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", CUDA_OR_SIM)
def test_cuda_factorizations_by_halves_certify_like_the_batched_call(device, monkeypatch):
    # the CUDA path with its Cholesky factorizations by halves (what _CHOL_HALVES["cuda"] switches on; off by
    # default: slower on an H200, benchmarks/cholesky_routes.py): cold then warm sync-free calls on the hard cases
    # must certify and bracket the truth as the library's batched calls do, with kappa within rtol of theirs
    import fastcnc.spectral as spectral

    gen = torch.Generator().manual_seed(21)
    mats = [_graded(300, 100, 1e4), _kahan(90), _graded(250, 200, 1e3, seed=2).float(),
            _pruned(160, 1152, 0.05, seed=3, empty_rows=2)]
    drift = [W + 1e-4 * W.abs().mean() * (W != 0) * torch.randn(W.shape, generator=gen, dtype=W.dtype)
             for W in mats]
    if device == "cuda":
        mats, drift = [W.cuda() for W in mats], [W.cuda() for W in drift]
    else:  # the CUDA rule of the inverse-iteration steps on CPU tensors
        monkeypatch.setattr(spectral, "_INVERSE_BY_PRODUCTS_ON", {"cuda", "cpu"})
    runs = {}
    for route in ("batched", "halves"):
        if route == "halves":
            monkeypatch.setitem(spectral._CHOL_HALVES, "cuda", (64, 32))
        state, out = SpectralState(), []
        with _backend.cuda_code_path() if device == "sim" else contextlib.nullcontext():
            for batch in (mats, drift):
                out.append(extreme_singular_values(batch, state=state, sync=False, floor=1e-6))
        runs[route] = out
    for k, batch in enumerate((mats, drift)):
        a, b = runs["batched"][k], runs["halves"][k]
        check_estimate(b, [W.cpu() for W in batch], floor=1e-6)
        assert torch.equal(a.certified, b.certified) and bool(a.certified.all())
        kf = [(e.sigma_max / (e.sigma_min + 1e-6 * e.sigma_max)).cpu() for e in (a, b)]  # what is certified
        torch.testing.assert_close(kf[1], kf[0], rtol=RTOL, atol=0)


@pytest.mark.parametrize("sync", [True, False])
def test_inverse_steps_by_products_with_the_inverse_factor_certify_like_solves(sync, monkeypatch):
    # the CUDA rule (L^-1 formed once, each inverse-iteration step two products) run on CPU on the hard cases:
    # it must certify what the triangular solves certify, with brackets that hold
    import fastcnc.spectral as spectral

    # (n > 128: on CPU smaller ones take the eigh path in sync calls)
    mats = [_graded(600, 160, 1e2), _graded(400, 150, 1e4, seed=1).T.contiguous(), _kahan(140),
            _pruned(160, 1152, 0.05), _pruned(160, 1152, 0.05, seed=1, empty_rows=3)]
    gen = torch.Generator().manual_seed(5)
    n = 170
    s = torch.cat([torch.linspace(10, 1.0, n - 6, dtype=torch.float64),
                   1e-3 * (1 + 1e-4 * torch.rand(6, generator=gen, dtype=torch.float64))])
    mats.append(matrix_with_spectrum(400, n, torch.sort(s, descending=True).values, generator=gen))
    drift = [m + 1e-3 * m.abs().mean() * (m != 0) * torch.randn(m.shape, generator=gen, dtype=m.dtype)
             for m in mats]
    runs = {}
    for rule in ("solves", "products"):
        monkeypatch.setattr(spectral, "_INVERSE_BY_PRODUCTS_ON", {"cuda", "cpu"} if rule == "products" else {"cuda"})
        state = SpectralState()
        cold = extreme_singular_values(mats, state=state, sync=sync, floor=1e-6)
        warm = extreme_singular_values(drift, state=state, sync=sync, floor=1e-6)
        runs[rule] = (cold, warm, [b.clone() for b in state.blocks])
    for k, batch in ((0, mats), (1, drift)):
        a, b = runs["solves"][k], runs["products"][k]
        assert torch.equal(a.certified, b.certified) and torch.equal(a.fallback, b.fallback)
        if sync:
            check_estimate(b, batch, floor=1e-6)
        kf_a, kf_b = (e.sigma_max / (e.sigma_min + 1e-6 * e.sigma_max) for e in (a, b))  # what the penalty uses
        torch.testing.assert_close(kf_b, kf_a, rtol=RTOL, atol=0)
        torch.testing.assert_close(b.sigma_max, a.sigma_max, rtol=RTOL, atol=0)
    # the rule did change the iteration (its rounding differs), so the test is not comparing a path with itself
    assert any(not torch.equal(x, y) for x, y in zip(runs["solves"][2], runs["products"][2], strict=True))


def test_packed_vectors_are_the_groups_vectors_in_one_buffer():
    # VectorGroup over one flat buffer (the CUDA estimate's layout): the same U and V as the groups it packs, views
    # made when asked for, one tensor for the backward's kernel (flat_vectors), and a repacking on a copy of the
    # buffer owns its vectors
    from fastcnc.spectral import flat_vectors, pack_vectors, packed_vectors

    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(s, generator=gen) for s in ((30, 12), (12, 30), (40, 7), (9, 9))]
    est = extreme_singular_values(mats)
    assert packed_vectors(est.groups) is None
    packed = pack_vectors(est.groups)
    buffer = packed_vectors(packed)
    assert buffer is not None and buffer.numel() == sum(g.U.numel() + g.V.numel() for g in est.groups)
    for p, g in zip(packed, est.groups, strict=True):
        assert (p.index, p.wide, p.u_shape, p.v_shape) == (g.index, g.wide, tuple(g.U.shape), tuple(g.V.shape))
        assert torch.equal(p.U, g.U) and torch.equal(p.V, g.V)
        assert p.U.data_ptr() >= buffer.data_ptr() and p.U._base is not None
    layout, vectors = flat_vectors(est.groups)
    assert vectors is not buffer and torch.equal(vectors, buffer)
    packed_layout, packed_flat = flat_vectors(packed)
    assert packed_layout == layout and packed_flat is buffer
    copy = pack_vectors(packed, buffer.clone())
    buffer.zero_()
    assert all(torch.equal(c.U, g.U) and torch.equal(c.V, g.V) for c, g in zip(copy, est.groups, strict=True))
    assert packed_vectors(packed[1:]) is None  # not the whole buffer from its start: no packed tensor
    with pytest.raises(AssertionError, match="layout"):
        pack_vectors(est.groups, torch.zeros(3, dtype=torch.float64))
