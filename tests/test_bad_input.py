"""A systematic sweep of bad input over the public API (issue 5).

Every case either raises an error that names the offending argument and says what was expected, or returns the
documented finite value. Nothing here may return a silent wrong answer or a NaN.
"""

import math

import pytest
import torch
from torch import nn

import fastcnc
from fastcnc import _backend
from fastcnc.reference import sigma_extremes_ref

NAN, INF = float("nan"), float("inf")

# ------------------------------------------------------------------------------------------------ argument table
# (id, call, exception type(s), regex the message must match: it names the argument and what was expected)


def _w(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _net():
    return fastcnc.sparsify(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)))


def _pruner(**kw):
    args = dict(final_sparsity=0.5, start_step=0, end_step=10, frequency=2) | kw
    return fastcnc.GradualPruner(_net(), **args)


_W, _M, _X = _w(6, 5), torch.ones(6, 5), _w(3, 5)
_W4, _M4, _X4 = _w(4, 3, 3, 3), torch.ones(4, 3, 3, 3), _w(2, 3, 7, 7)
esv = fastcnc.extreme_singular_values

BAD_ARGS = [
    # ---- extreme_singular_values
    ("esv-none", lambda: esv(None), TypeError, r"weights must be a tensor or a list"),
    ("esv-str", lambda: esv("abc"), TypeError, r"weights must be a tensor or a list"),
    ("esv-empty-list", lambda: esv([]), ValueError, r"non-empty list"),
    ("esv-numpy", lambda: esv(_W.numpy()), TypeError, r"weights\[0\] must be a torch.Tensor"),
    ("esv-list-int", lambda: esv([_W, 3]), TypeError, r"weights\[1\] must be a torch.Tensor"),
    ("esv-1d", lambda: esv(_w(5)), ValueError, r"weights\[0\] must have 2 dimensions"),
    ("esv-4d", lambda: esv(_w(2, 2, 5, 5)), ValueError, r"weights\[0\] must have 2 dimensions"),
    ("esv-3d-no-matrix", lambda: esv(torch.zeros(0, 5, 5)), ValueError, r"weights is a batch of 0 matrices"),
    ("esv-3d-empty-matrix", lambda: esv(torch.zeros(2, 0, 5)), ValueError, r"weights\[0\] must be non-empty"),
    ("esv-empty-0xn", lambda: esv(torch.zeros(0, 5)), ValueError, r"weights\[0\] must be non-empty"),
    ("esv-empty-nx0", lambda: esv([_W, torch.zeros(5, 0)]), ValueError, r"weights\[1\] must be non-empty"),
    ("esv-int", lambda: esv(torch.ones(3, 3, dtype=torch.int64)), TypeError, r"weights\[0\] must be a floating"),
    ("esv-bool", lambda: esv(torch.ones(3, 3, dtype=torch.bool)), TypeError, r"weights\[0\] must be a floating"),
    ("esv-complex", lambda: esv(torch.ones(3, 3, dtype=torch.complex64)), TypeError, r"weights\[0\] must be a float"),
    ("esv-device-mix", lambda: esv([_W, torch.empty(4, 4, device="meta")]), ValueError,
     r"weights\[1\] is on meta, expected all on cpu"),
    ("esv-iters-neg", lambda: esv(_W, iters=-1), ValueError, r"iters must be >= 1"),
    ("esv-iters-float", lambda: esv(_W, iters=1.5), TypeError, r"iters must be an int"),
    ("esv-iters-bool", lambda: esv(_W, iters=True), TypeError, r"iters must be an int"),
    ("esv-max-rounds-0", lambda: esv(_W, max_rounds=0), ValueError, r"max_rounds must be >= 1"),
    ("esv-block-0", lambda: esv(_W, block=0), ValueError, r"block must be >= 1"),
    ("esv-rtol-neg", lambda: esv(_W, rtol=-1.0), ValueError, r"rtol must be in \(0, 1\)"),
    ("esv-rtol-nan", lambda: esv(_W, rtol=NAN), ValueError, r"rtol must be finite"),
    ("esv-rtol-bool", lambda: esv(_W, rtol=True), TypeError, r"rtol must be a finite number"),
    ("esv-floor-1", lambda: esv(_W, floor=1.0), ValueError, r"floor must be in \[0, 1\)"),
    ("esv-sync-int", lambda: esv(_W, sync=1), TypeError, r"sync must be a bool"),
    ("esv-state-dict", lambda: esv(_W, state={}), TypeError, r"state must be None or a fastcnc.SpectralState"),
    ("esv-refresh-str", lambda: esv(_W, refresh="yes"), TypeError, r"refresh must be a bool"),
    ("esv-seed-str", lambda: esv(_W, seed="a"), TypeError, r"seed must be an int"),
    ("state-from-empty-dict", lambda: fastcnc.SpectralState.from_dict({}), ValueError,
     r"d must be a dict with 'shapes' and 'blocks'.* with keys \[\]"),
    ("state-from-none", lambda: fastcnc.SpectralState.from_dict(None), ValueError, r"got NoneType"),
    # ---- as_matrices
    ("as_matrices-1d", lambda: fastcnc.as_matrices(_w(5)), ValueError, r"weight must have 2 or 3 or 4 or 5 dim"),
    ("as_matrices-empty", lambda: fastcnc.as_matrices(torch.zeros(0, 3, 3, 3)), ValueError, r"weight must be non-emp"),
    ("as_matrices-groups-0", lambda: fastcnc.as_matrices(_W4, 0), ValueError, r"groups must be >= 1"),
    ("as_matrices-groups-3", lambda: fastcnc.as_matrices(_W4, 3), ValueError, r"groups=3 must divide"),
    # ---- cnc_penalty
    ("cnc-none", lambda: fastcnc.cnc_penalty(None), TypeError, r"weights must be a tensor or a list"),
    ("cnc-empty-list", lambda: fastcnc.cnc_penalty([]), ValueError, r"non-empty list"),
    ("cnc-int", lambda: fastcnc.cnc_penalty(torch.ones(3, 3, dtype=torch.int32)), TypeError, r"weights\[0\] must be a"),
    ("cnc-4d", lambda: fastcnc.cnc_penalty(_W4), ValueError, r"weights\[0\] must have 2 dimensions"),
    ("cnc-empty", lambda: fastcnc.cnc_penalty(torch.zeros(3, 0)), ValueError, r"weights\[0\] must be non-empty"),
    ("cnc-kind", lambda: fastcnc.cnc_penalty(_W, kind="l2"), ValueError, r"kind must be one of"),
    ("cnc-reduction", lambda: fastcnc.cnc_penalty(_W, reduction="max"), ValueError, r"reduction must be one of"),
    ("cnc-eps-0", lambda: fastcnc.cnc_penalty(_W, eps=0.0), ValueError, r"eps must be > 0"),
    ("cnc-eps-nan", lambda: fastcnc.cnc_penalty(_W, eps=NAN), ValueError, r"eps must be > 0"),
    ("cnc-eps-1", lambda: fastcnc.cnc_penalty(_W, eps=1.0), ValueError, r"eps must be < 1"),
    ("cnc-eps-str", lambda: fastcnc.cnc_penalty(_W, eps="1e-6"), TypeError, r"eps must be a number"),
    ("cnc-kappa-target-inf", lambda: fastcnc.cnc_penalty(_W, kappa_target=INF), ValueError, r"kappa_target must be"),
    ("cnc-estimate-type", lambda: fastcnc.cnc_penalty(_W, estimate=3), TypeError, r"estimate must be None or a"),
    ("cnc-estimate-count", lambda: fastcnc.cnc_penalty(_W, estimate=esv([_W, _W])), ValueError,
     r"estimate covers 2 matrices, weights has 1"),
    ("cnc-estimate-shape", lambda: fastcnc.cnc_penalty(_W.T, estimate=esv(_W)), ValueError,
     r"estimate's vectors for matrix 0 fit a 6x5 matrix, weights\[0\] has shape \(5, 6\)"),
    ("cnc-engine-kwarg", lambda: fastcnc.cnc_penalty(_W, rtol=-2.0), ValueError, r"rtol must be in \(0, 1\)"),
    ("cnc-smooth-min-neg", lambda: fastcnc.cnc_penalty(_W, smooth_min=-1.0), ValueError, r"smooth_min must be >= 0"),
    ("cnc-estimate-and-state", lambda: fastcnc.cnc_penalty(_W, estimate=esv(_W), state=fastcnc.SpectralState()),
     ValueError, r"cannot be combined with estimate"),
    ("cnc-unknown-kwarg", lambda: fastcnc.cnc_penalty(_W, itres=2), TypeError, r"unexpected keyword argument 'itres'"),
    # ---- tsc_penalty
    ("tsc-none", lambda: fastcnc.tsc_penalty(None), TypeError, r"weights must be a tensor or an iterable"),
    ("tsc-empty-list", lambda: fastcnc.tsc_penalty([]), ValueError, r"at least one tensor"),
    ("tsc-str", lambda: fastcnc.tsc_penalty("abc"), TypeError, r"weights\[0\] must be a torch.Tensor"),
    ("tsc-int", lambda: fastcnc.tsc_penalty(torch.ones(3, dtype=torch.int32)), TypeError, r"weights\[0\] must be a f"),
    ("tsc-empty", lambda: fastcnc.tsc_penalty([_W, torch.zeros(0)]), ValueError, r"weights\[1\] must be non-empty"),
    ("tsc-device-mix", lambda: fastcnc.tsc_penalty([_W, torch.empty(3, device="meta")]), ValueError,
     r"one device.*weights\[1\] on meta"),
    ("tsc-a-0", lambda: fastcnc.tsc_penalty(_W, a=0), ValueError, r"a must be > 0"),
    ("tsc-a-inf", lambda: fastcnc.tsc_penalty(_W, a=INF), ValueError, r"a must be > 0 and finite"),
    ("tsc-a-tensor", lambda: fastcnc.tsc_penalty(_W, a=torch.tensor(1.0)), TypeError, r"a must be a number"),
    ("tsc-reduction", lambda: fastcnc.tsc_penalty(_W, reduction="mean"), ValueError, r"reduction must be one of"),
    # ---- TSCNC
    ("TSCNC-model-none", lambda: fastcnc.TSCNC(None), TypeError, r"model must be an nn.Module"),
    ("TSCNC-no-layers", lambda: fastcnc.TSCNC(nn.ReLU()), ValueError, r"no nn.Conv2d or nn.Linear"),
    ("TSCNC-lambda-neg", lambda: fastcnc.TSCNC(_net(), lambda_tsc=-1.0), ValueError, r"lambda_tsc must be >= 0"),
    ("TSCNC-lambda-nan", lambda: fastcnc.TSCNC(_net(), lambda_cnc=NAN), ValueError, r"lambda_cnc must be >= 0"),
    ("TSCNC-cnc", lambda: fastcnc.TSCNC(_net(), cnc="l1"), ValueError, r"cnc must be one of"),
    ("TSCNC-eps-1", lambda: fastcnc.TSCNC(_net(), eps=2.0), ValueError, r"eps must be < 1"),
    ("TSCNC-a-0", lambda: fastcnc.TSCNC(_net(), a=0.0), ValueError, r"a must be > 0"),
    ("TSCNC-iters-0", lambda: fastcnc.TSCNC(_net(), iters=0), ValueError, r"iters must be >= 1"),
    ("TSCNC-max-rounds-0", lambda: fastcnc.TSCNC(_net(), max_rounds=0), ValueError, r"max_rounds must be >= 1"),
    ("TSCNC-rtol-neg", lambda: fastcnc.TSCNC(_net(), rtol=-1.0), ValueError, r"rtol must be > 0"),
    ("TSCNC-rtol-str", lambda: fastcnc.TSCNC(_net(), rtol="1e-2"), TypeError, r"rtol must be a number"),
    ("TSCNC-refresh-neg", lambda: fastcnc.TSCNC(_net(), refresh_every=-1), ValueError, r"refresh_every must be >= 0"),
    ("TSCNC-layers-str", lambda: fastcnc.TSCNC(_net(), layers="0"), TypeError, r"layers must be a list of module"),
    ("TSCNC-layers-unknown", lambda: fastcnc.TSCNC(_net(), layers=["fc9"]), ValueError, r"unknown.*\['fc9'\]"),
    ("TSCNC-ddp", lambda: fastcnc.TSCNC(nn.parallel.DistributedDataParallel.__new__(
        nn.parallel.DistributedDataParallel)), TypeError, r"unwrapped module"),
    # ---- masked functionals
    ("matmul-a-1d", lambda: fastcnc.masked_matmul(_w(5), _W, _M), ValueError, r"a must have 2 dimensions"),
    ("matmul-a-list", lambda: fastcnc.masked_matmul([[1.0] * 5], _W, _M), TypeError, r"a must be a torch.Tensor"),
    ("matmul-K", lambda: fastcnc.masked_matmul(_w(3, 4), _W, _M), ValueError, r"x must have shape \[\.\.\., 5\]"),
    ("linear-x-int", lambda: fastcnc.masked_linear(_X.long(), _W, _M), TypeError, r"x must be a floating"),
    ("linear-w-int", lambda: fastcnc.masked_linear(_X, _W.long(), _M), TypeError, r"weight must be a floating"),
    ("linear-w-3d", lambda: fastcnc.masked_linear(_X, _w(2, 6, 5), _M), ValueError, r"weight must have 2 dim"),
    ("linear-x-0d", lambda: fastcnc.masked_linear(torch.tensor(1.0), _W, _M), ValueError, r"x must have shape"),
    ("linear-mask-shape", lambda: fastcnc.masked_linear(_X, _W, _M[:5]), ValueError, r"mask must have the weight's"),
    ("linear-mask-half", lambda: fastcnc.masked_linear(_X, _W, _M * 0.5), ValueError, r"mask must be binary"),
    ("linear-mask-nan", lambda: fastcnc.masked_linear(_X, _W, _M * NAN), ValueError, r"mask must be binary"),
    ("linear-mask-complex", lambda: fastcnc.masked_linear(_X, _W, _M.to(torch.complex64)), TypeError,
     r"mask must be bool, integer or floating"),
    ("linear-mask-list", lambda: fastcnc.masked_linear(_X, _W, _M.tolist()), TypeError, r"mask must be a torch.T"),
    ("linear-mask-device", lambda: fastcnc.masked_linear(_X, _W, torch.ones(6, 5, device="meta")), ValueError,
     r"mask must be on the weight's device"),
    ("linear-bias-shape", lambda: fastcnc.masked_linear(_X, _W, _M, _w(5)), ValueError, r"bias must have shape"),
    ("linear-tiles", lambda: fastcnc.masked_linear(_X, _W, _M, tiles=3), TypeError, r"tiles must be a fastcnc"),
    ("linear-tiles-shape", lambda: fastcnc.masked_linear(_X, _W, _M, tiles=fastcnc.masked.build_tile_table(
        torch.ones(5, 5))), ValueError, r"tiles was built for a mask of shape"),
    ("conv-x-2d", lambda: fastcnc.masked_conv2d(_w(3, 7), _W4, _M4), ValueError, r"x must have 3 or 4 dimensions"),
    ("conv-w-3d", lambda: fastcnc.masked_conv2d(_X4, _w(4, 3, 3), _M4[..., 0]), ValueError, r"weight must have 4"),
    ("conv-channels", lambda: fastcnc.masked_conv2d(_w(2, 4, 7, 7), _W4, _M4), ValueError, r"x must have C_in = 3"),
    ("conv-groups", lambda: fastcnc.masked_conv2d(_X4, _W4, _M4, groups=3), ValueError, r"groups must be a positive"),
    ("conv-groups-0", lambda: fastcnc.masked_conv2d(_X4, _W4, _M4, groups=0), ValueError, r"groups must be a posi"),
    ("conv-stride-str", lambda: fastcnc.masked_conv2d(_X4, _W4, _M4, stride="1"), ValueError, r"stride must be an"),
    ("conv-padding-3", lambda: fastcnc.masked_conv2d(_X4, _W4, _M4, padding=(1, 1, 1)), ValueError,
     r"padding must be an int or a pair"),
    ("conv-padding-str", lambda: fastcnc.masked_conv2d(_X4, _W4, _M4, padding="full"), (ValueError, RuntimeError),
     r"[Ii]nvalid padding string"),
    ("conv-dilation-3", lambda: fastcnc.masked_conv2d(_X4, _W4, _M4, dilation=(1, 1, 1)), ValueError,
     r"dilation must be an int or a pair"),
    # checked before either path (the kernel path divided by a zero stride)
    ("conv-stride-0", lambda: fastcnc.masked_conv2d(_X4, _W4, _M4, stride=0), ValueError, r"stride must be >= 1"),
    ("conv-padding-neg", lambda: fastcnc.masked_conv2d(_X4, _W4, _M4, padding=-1), ValueError,
     r"padding must be >= 0"),
    ("conv-dilation-0", lambda: fastcnc.masked_conv2d(_X4, _W4, _M4, dilation=(1, 0)), ValueError,
     r"dilation must be >= 1"),
    ("conv-input-smaller-than-kernel", lambda: fastcnc.masked_conv2d(_w(1, 3, 2, 2), _W4, _M4),
     (ValueError, RuntimeError), r"[Kk]ernel size can't be greater than actual input size"),
    ("MaskedLinear-forward-features", lambda: fastcnc.MaskedLinear(5, 6)(_w(3, 4)), (ValueError, RuntimeError),
     r"3x4 and 5x6|shape"),
    ("conv-mask-shape", lambda: fastcnc.masked_conv2d(_X4, _W4, _M4[:3]), ValueError, r"mask must have the weight"),
    # ---- layers, sparsify, densify
    ("MaskedLinear-set_mask-shape", lambda: fastcnc.MaskedLinear(5, 6).set_mask(torch.ones(5, 6)), ValueError,
     r"mask must have the weight's shape \(6, 5\)"),
    ("MaskedLinear-set_mask-nonbinary", lambda: fastcnc.MaskedLinear(5, 6).set_mask(torch.full((6, 5), 0.5)),
     ValueError, r"mask must be binary"),
    ("MaskedLinear-set_mask-nan", lambda: fastcnc.MaskedLinear(5, 6).set_mask(torch.full((6, 5), NAN)), ValueError,
     r"mask must be binary"),
    ("MaskedLinear-set_mask-list", lambda: fastcnc.MaskedLinear(5, 6).set_mask([[1] * 5] * 6), TypeError,
     r"mask must be a torch.Tensor"),
    ("MaskedLinear-set_mask-complex", lambda: fastcnc.MaskedLinear(5, 6).set_mask(torch.ones(6, 5).cfloat()),
     TypeError, r"mask must be bool, integer or floating"),
    ("MaskedLinear-from_dense-mask", lambda: fastcnc.MaskedLinear.from_dense(nn.Linear(5, 6), torch.ones(3)),
     ValueError, r"mask must have the weight's shape"),
    ("MaskedLinear-from_dense-conv", lambda: fastcnc.MaskedLinear.from_dense(nn.Conv2d(3, 4, 3)), TypeError,
     r"linear must be an? .*nn.Linear"),
    ("MaskedConv2d-from_dense-linear", lambda: fastcnc.MaskedConv2d.from_dense(nn.Linear(3, 4)), TypeError,
     r"conv must be an? .*nn.Conv2d"),
    ("MaskedConv2d-set_mask-shape", lambda: fastcnc.MaskedConv2d(3, 4, 3).set_mask(torch.ones(4, 3, 3)), ValueError,
     r"mask must have the weight's shape \(4, 3, 3, 3\)"),
    ("sparsify-none", lambda: fastcnc.sparsify(None), TypeError, r"model must be a torch.nn.Module"),
    ("sparsify-tensor", lambda: fastcnc.sparsify(_W), TypeError, r"model must be a torch.nn.Module"),
    ("densify-none", lambda: fastcnc.densify(None), TypeError, r"model must be a torch.nn.Module"),
    # ---- pruning
    ("prune-model-none", lambda: fastcnc.prune_magnitude(None, 0.5), TypeError, r"model must be a torch.nn.Module"),
    ("prune-dense-model", lambda: fastcnc.prune_magnitude(nn.Linear(3, 3), 0.5), ValueError,
     r"no MaskedLinear/MaskedConv2d.*sparsify"),
    ("prune-sparsity-1", lambda: fastcnc.prune_magnitude(_net(), 1.0), ValueError, r"sparsity must be in \[0, 1\)"),
    ("prune-sparsity-neg", lambda: fastcnc.prune_magnitude(_net(), -0.1), ValueError, r"sparsity must be in"),
    ("prune-sparsity-nan", lambda: fastcnc.prune_magnitude(_net(), NAN), ValueError, r"sparsity must be in"),
    ("prune-sparsity-str", lambda: fastcnc.prune_magnitude(_net(), "0.5"), TypeError, r"sparsity must be a number"),
    ("prune-sparsity-tensor", lambda: fastcnc.prune_magnitude(_net(), torch.tensor(0.5)), TypeError,
     r"sparsity must be a number"),
    ("prune-scope", lambda: fastcnc.prune_magnitude(_net(), 0.5, scope="net"), ValueError, r"scope must be one of"),
    ("prune-block-int", lambda: fastcnc.prune_magnitude(_net(), 0.5, block=4), ValueError, r"block must be None or"),
    ("prune-block-0", lambda: fastcnc.prune_magnitude(_net(), 0.5, block=(0, 4)), ValueError, r"block must be None"),
    ("prune-block-score", lambda: fastcnc.prune_magnitude(_net(), 0.5, block=(2, 2), block_score="max"), ValueError,
     r"block_score must be one of"),
    ("pruner-final-1", lambda: _pruner(final_sparsity=1.0), ValueError, r"final_sparsity must be in \[0, 1\)"),
    ("pruner-initial-gt-final", lambda: _pruner(initial_sparsity=0.9), ValueError, r"initial_sparsity \(0.9\) must"),
    ("pruner-end-le-start", lambda: _pruner(start_step=10), ValueError, r"end_step must be >= 11"),
    ("pruner-frequency-0", lambda: _pruner(frequency=0), ValueError, r"frequency must be >= 1"),
    ("pruner-dense-model", lambda: fastcnc.GradualPruner(nn.Linear(3, 3), 0.5, 0, 10), ValueError, r"sparsify"),
    ("pruner-step-neg", lambda: _pruner().step(-1), ValueError, r"step must be >= 0"),
    ("pruner-step-float", lambda: _pruner().step(1.0), TypeError, r"step must be an int"),
    ("pruner-load-missing", lambda: _pruner().load_state_dict({}), KeyError, r"GradualPruner state is missing"),
    ("pruner-load-not-dict", lambda: _pruner().load_state_dict(3), TypeError, r"state must be a dict"),
    ("pruner-load-bad-value", lambda: _pruner().load_state_dict(_pruner().state_dict() | {"final_sparsity": 2.0}),
     ValueError, r"final_sparsity must be in \[0, 1\)"),
    ("pruner-load-unknown-key", lambda: _pruner().load_state_dict(_pruner().state_dict() | {"model": None}),
     KeyError, r"unknown.*model"),
    ("prune-keep_first_last-nothing-left", lambda: fastcnc.prune_magnitude(
        fastcnc.sparsify(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))), 0.5, keep_first_last=True), ValueError,
     r"keep_first_last.*no layer"),
    ("sparsity_report-none", lambda: fastcnc.sparsity_report(None), TypeError, r"model must be a torch.nn.Module"),
    # ---- backend switch
    ("force_backend-name", lambda: fastcnc.force_backend("cuda"), ValueError, r"backend must be None, 'torch'"),
]


@pytest.mark.parametrize("call, exc, match", [pytest.param(*c[1:], id=c[0]) for c in BAD_ARGS])
def test_bad_argument_raises_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------------------------- non-finite values


def _with_bad(t, value, where=(1, 2)):
    t = t.clone()
    t[where] = value
    return t


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("shape", [(6, 5), (40, 30)], ids=["exact-path", "krylov-path"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_spectral_and_cnc_reject_non_finite_weights(value, shape, dtype):
    good, bad = _w(*shape).to(dtype), _with_bad(_w(*shape), value).to(dtype)
    with pytest.raises(ValueError, match=r"weights\[1\] contains NaN or Inf"):
        esv([good, bad])
    with pytest.raises(ValueError, match=r"weights\[1\] contains NaN or Inf"):
        fastcnc.cnc_penalty([good, bad.requires_grad_()])
    with pytest.raises(ValueError, match=r"weights\[1\] contains NaN or Inf"):
        fastcnc.tsc_penalty([good, bad])
    # a frozen estimate (from good weights) applied to weights that turned NaN: refused, not a NaN penalty
    est = esv([good, good])
    with pytest.raises(ValueError, match=r"weights\[1\] contains NaN or Inf"):
        fastcnc.cnc_penalty([good, bad], estimate=est)


def test_finite_weights_near_the_float32_limit_are_handled():
    big = torch.full((40, 30), 3e38)  # finite; its Gram would overflow fp32 (the engine scales by 2^k, in float64)
    big[0, 0] = 1e38  # rank 2: sigma_min = 0 is only resolvable with a floor
    with pytest.raises(ValueError, match=r"weights\[0\].*needs more than float64"):
        esv(big)
    est = esv(big, floor=1e-6)
    assert math.isclose(float(est.sigma_max[0]), float(torch.linalg.svdvals(big.double())[0]), rel_tol=1e-6)


@pytest.mark.parametrize("scale", [1e-37, 1e-30, 1e-20, 1e20, 1e30, 1e36])
def test_float32_engine_is_scale_invariant_at_extreme_magnitudes(scale):
    # A^T A under/overflows fp32 beyond ~1e+-19: the engine must neither break the bracketing nor refuse
    A = torch.randn(40, 30)
    smax, smin = sigma_extremes_ref(A)
    est = esv(A * scale)  # default rtol: kappa certified within 1e-2
    s = torch.linalg.svdvals((A * scale).double())  # the brackets are about the matrix as stored (fp32 rounding)
    assert float(est.sigma_max_lo[0]) <= float(s[0]) <= float(est.sigma_max_hi[0])
    assert float(est.sigma_min_lo[0]) <= float(s[-1]) <= float(est.sigma_min_hi[0])
    assert math.isclose(float(est.kappa[0]), smax / smin, rel_tol=1e-2) and bool(est.certified[0])
    assert 0 < float(est.err_min[0]) / scale < 0.1 * smin  # a finite, meaningful bracket
    p = fastcnc.cnc_penalty((A * scale).requires_grad_())
    assert abs(float(p.detach()) - math.log(smax / (smin + 1e-6 * smax))) <= 1e-2


def test_corrupt_or_mismatched_spectral_state():
    A = _w(40, 30)
    state = fastcnc.SpectralState()
    esv(A, state=state)
    state.blocks[0][0, 0] = NAN
    with pytest.raises(ValueError, match=r"state holds NaN/Inf.*fresh"):
        esv(A, state=state)
    # a state saved with another block size or for other shapes is ignored (cold start), not misused
    smax, smin = sigma_extremes_ref(A)
    for make_state in (lambda s: esv(A, state=s, block=3), lambda s: esv(_w(41, 30), state=s)):
        s = fastcnc.SpectralState()
        make_state(s)
        est = esv(A, state=s, block=4)
        assert math.isclose(float(est.kappa[0]), smax / smin, rel_tol=1e-2) and bool(est.certified[0])


@pytest.mark.parametrize("lambdas", [(1e-3, 1e-3), (1e-3, 0.0), (0.0, 1e-3)], ids=["both", "tsc-only", "cnc-only"])
def test_tscnc_never_returns_a_nan_regulariser(lambdas):
    net = _net()
    reg = fastcnc.TSCNC(net, lambda_tsc=lambdas[0], lambda_cnc=lambdas[1])
    assert torch.isfinite(reg())
    with torch.no_grad():
        net[2].weight[1, 1] = NAN
    with pytest.raises(ValueError, match=r"weights\[1\] contains NaN or Inf"):
        reg()


def test_tscnc_refuses_a_foreign_extra_state():
    reg = fastcnc.TSCNC(_net())
    reg()
    sd = reg.state_dict()
    key = next(k for k in sd if k.endswith("_extra_state"))
    sd[key] = {"something": "else"}
    with pytest.raises(ValueError, match=r"TSCNC state must be a dict"):
        reg.load_state_dict(sd)


def test_tscnc_state_of_another_model_is_ignored_not_misused():
    reg = fastcnc.TSCNC(nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4)))
    reg()
    other = nn.Sequential(nn.Linear(8, 7), nn.Linear(7, 4))
    reg2 = fastcnc.TSCNC(other, lambda_tsc=0.0, lambda_cnc=1.0)
    reg2.load_state_dict(reg.state_dict())  # the shapes do not match: the next call recomputes exactly
    value = float(reg2().detach())
    exact = sum(math.log(s[0] / (s[1] + 1e-6 * s[0])) for s in (sigma_extremes_ref(m.weight) for m in other))
    assert math.isclose(value, exact, rel_tol=1e-5)


def test_magnitude_pruning_refuses_non_finite_weights():
    net = _net()
    with torch.no_grad():
        net[0].weight[:] = NAN  # NaN scores would otherwise rank above every finite weight
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        fastcnc.prune_magnitude(net, 0.5)
    assert fastcnc.sparsity_report(net)[-1]["nonzero"] == 6 * 8 + 6 * 5 + 5 * 4  # nothing pruned


# ---------------------------------------------------------------------------------- documented finite values


@pytest.mark.parametrize("shape", [(3, 2), (40, 30), (30, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_matrix_gives_sigma_zero_kappa_one_and_zero_penalty(shape, dtype):
    W = torch.zeros(shape, dtype=dtype, requires_grad=True)
    est = esv(W)
    assert float(est.sigma_max[0]) == 0 and float(est.sigma_min[0]) == 0 and float(est.kappa[0]) == 1
    for kind in ("log", "kappa", "hinge"):
        p = fastcnc.cnc_penalty(W, kind=kind)
        p.backward()
        assert float(p.detach()) == 0 and torch.equal(W.grad, torch.zeros_like(W))
        W.grad = None
    p = fastcnc.tsc_penalty(W)
    p.backward()
    assert float(p.detach()) == 0 and torch.equal(W.grad, torch.zeros_like(W))


@pytest.mark.parametrize("shape", [(40, 30), (30, 40), (6, 5)])
def test_rank_deficient_gives_sigma_min_zero_and_capped_penalty(shape):
    U, V = torch.randn(shape[0], 2, dtype=torch.float64), torch.randn(2, shape[1], dtype=torch.float64)
    W = (U @ V).requires_grad_()  # rank 2
    smax, _ = sigma_extremes_ref(W)
    est = esv(W, floor=1e-6)  # not structurally deficient: certified through the floor
    assert float(est.sigma_min[0]) <= 1e-10 * smax
    eps = 1e-6
    p = fastcnc.cnc_penalty(W, eps=eps)
    assert math.isclose(float(p.detach()), math.log(1 / eps), rel_tol=1e-6)  # log kappa_eps ~ log(1/eps), finite
    p.backward()
    assert torch.isfinite(W.grad).all()


def test_all_pruned_layer_is_finite_everywhere():
    net = _net()
    net[2].set_mask(torch.zeros(5, 6))
    assert torch.equal(net[2](torch.randn(3, 6)), net[2].bias.expand(3, 5))
    reg = fastcnc.TSCNC(net)
    loss = net(torch.randn(4, 8)).square().sum() + reg()
    loss.backward()
    assert torch.isfinite(loss.detach())
    assert torch.equal(net[2].weight.grad, torch.zeros_like(net[2].weight))  # pruned weights get exactly 0
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    row = {r["name"]: r for r in reg.report()}["2"]
    assert row["sigma_max"] == 0 and row["kappa"] == 1.0 and row["sparsity"] == 1.0
    assert fastcnc.sparsity_report(net)[1]["sparsity"] == 1.0
    # pruning a model whose layers are all fully pruned keeps them so and reports 100%
    for m in (net[0], net[4]):
        m.set_mask(torch.zeros_like(m.mask))
    assert fastcnc.prune_magnitude(net, 0.5) == 1.0
    assert fastcnc.prune_magnitude(net, 0.5, block=(2, 2)) == 1.0


def test_sparsity_report_of_a_model_without_masked_layers_is_an_empty_total():
    assert fastcnc.sparsity_report(nn.Linear(3, 3)) == [
        {"name": "total", "shape": None, "numel": 0, "nonzero": 0, "sparsity": 0.0}]


@pytest.mark.parametrize("m, k, n", [(0, 5, 6), (3, 0, 6), (3, 5, 0)], ids=["M0", "K0", "N0"])
def test_masked_matmul_empty_dimensions(backend, m, k, n):
    a, w = torch.randn(m, k), torch.randn(n, k)
    out = fastcnc.masked_matmul(a, w, torch.ones(n, k))
    assert out.shape == (m, n) and torch.equal(out, torch.zeros(m, n))


def test_masked_conv2d_empty_batch(backend):
    out = fastcnc.masked_conv2d(torch.randn(0, 3, 7, 7), _W4, _M4)
    assert out.shape == (0, 4, 5, 5)


def test_masked_all_pruned_gives_bias_and_zero_weight_grad(backend):
    x, w = torch.randn(3, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    b = torch.randn(6)
    out = fastcnc.masked_linear(x, w, torch.zeros(6, 5), b)
    out.sum().backward()
    assert torch.equal(out, b.expand(3, 6))
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(x.grad, torch.zeros_like(x))


def test_masked_dtype_mismatch_names_the_argument(backend):
    with pytest.raises((TypeError, ValueError), match=r"weight.*dtype|dtype.*weight"):
        fastcnc.masked_linear(_X.double(), _W, _M)
    with pytest.raises((TypeError, ValueError), match=r"bias.*dtype|dtype.*bias"):
        fastcnc.masked_linear(_X, _W, _M, torch.randn(6, dtype=torch.float64))
    with pytest.raises((TypeError, ValueError), match=r"weight.*dtype|dtype.*weight"):
        fastcnc.masked_conv2d(_X4.double(), _W4, _M4)


def test_masked_nan_in_pruned_positions_is_ignored_on_every_backend(backend):
    # a pruned weight is zero whatever is stored there: kernels and torch path must agree (no NaN leak)
    mask = (torch.rand(6, 5) > 0.5).float()
    w = torch.where(mask == 0, torch.full_like(_W, NAN), _W)
    out = fastcnc.masked_linear(_X, w, mask)
    torch.testing.assert_close(out, _X @ (_W * mask).T)


def test_nan_activations_propagate_row_wise_like_f_linear(backend):
    # activations are not validated (that would synchronise every forward): a NaN input row gives a NaN output row,
    # exactly as F.linear does, and never leaks into other rows; the training loop's loss check stops the run
    x = torch.randn(4, 5)
    x[1, 2] = NAN
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 2] = 1
    out = fastcnc.masked_linear(x, _W, mask)
    assert torch.isnan(out[1]).all()
    keep = [0, 2, 3]
    torch.testing.assert_close(out[keep], x[keep] @ (_W * mask).T)


# ------------------------------------------------------------------------ layouts: non-contiguous, channels_last


def test_channels_last_and_non_contiguous_layouts_match(backend):
    x = torch.randn(2, 3, 7, 7)
    w = torch.randn(4, 3, 3, 3)
    mask = (torch.rand_like(w) > 0.4).float()
    ref = torch.nn.functional.conv2d(x.double(), (w * mask).double(), padding=1)
    cl = fastcnc.masked_conv2d(x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last),
                               mask.to(memory_format=torch.channels_last), padding=1)
    torch.testing.assert_close(cl.double(), ref, rtol=1e-4, atol=1e-4)
    xt = torch.randn(2, 7, 7, 3).permute(0, 3, 1, 2)  # a non-contiguous view
    torch.testing.assert_close(fastcnc.masked_conv2d(xt, w, mask, padding=1),
                               fastcnc.masked_conv2d(xt.contiguous(), w, mask, padding=1), rtol=1e-5, atol=1e-5)
    layer = fastcnc.MaskedConv2d(3, 4, 3, padding=1)
    layer.set_mask(mask)
    torch.testing.assert_close(layer.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last)),
                               torch.nn.functional.conv2d(x, layer.weight * mask, layer.bias, padding=1),
                               rtol=1e-4, atol=1e-4)


def test_penalties_agree_on_channels_last_and_transposed_weights():
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    wc = w.to(memory_format=torch.channels_last)
    torch.testing.assert_close(fastcnc.tsc_penalty(wc), fastcnc.tsc_penalty(w))
    (m,), (mc,) = fastcnc.as_matrices(w), fastcnc.as_matrices(wc)
    torch.testing.assert_close(fastcnc.cnc_penalty(mc, refresh=True), fastcnc.cnc_penalty(m, refresh=True))
    A = torch.randn(50, 40, dtype=torch.float64)
    torch.testing.assert_close(fastcnc.cnc_penalty(A.T), fastcnc.cnc_penalty(A.T.contiguous()))
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2)).double()
    ref = float(fastcnc.TSCNC(net)().detach())
    got = float(fastcnc.TSCNC(net.to(memory_format=torch.channels_last))().detach())
    assert math.isclose(got, ref, rel_tol=1e-6)


def test_triton_backend_without_interpreter_or_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_backend, "INTERPRET", False)
    _backend.force_backend("triton")
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1"):
        fastcnc.masked_linear(_X, _W, _M)


def test_numpy_scalars_and_bool_tensors_are_accepted_where_their_python_kind_is():
    import numpy as np

    w = torch.randn(6, 4, dtype=torch.float64)
    assert fastcnc.tsc_penalty(w, a=np.float32(2.0)) == fastcnc.tsc_penalty(w, a=2.0)
    model = fastcnc.sparsify(nn.Sequential(nn.Linear(8, 8)))
    pruner = fastcnc.GradualPruner(model, 0.5, start_step=np.int64(0), end_step=np.int64(4), frequency=np.int32(2))
    pruner.step(np.int64(4))
    assert model[0].sparsity == 0.5
    flags = torch.tensor([True, False])
    est = esv([w, w.T], refresh=flags)
    assert est.fallback.tolist() == [True, False]
    with pytest.raises(TypeError, match="score_start must be an int"):
        from fastcnc.hydra import HydraPruner, HydraSchedule
        HydraSchedule(HydraPruner(model, 0.5), "0", 5)
    with pytest.raises(TypeError, match="lr must be a number"):
        HydraSchedule(HydraPruner(model, 0.5), 0, 5, lr="a")


def test_report_of_a_file_that_is_no_report_names_it(tmp_path):
    from fastcnc.report import load_result

    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"event": "step"}\n{"event": "step"}\n')
    with pytest.raises(ValueError, match="metrics.jsonl is not a report.json written by fastcnc train"):
        load_result(bad)
