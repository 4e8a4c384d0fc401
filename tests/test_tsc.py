"""TSC (transformed-L1) penalty: values and gradients against a float64 autograd reference, on the torch path and on
the Triton kernel (interpreter on CPU, tiny shapes; the kernel tile is shrunk so layers span several tiles)."""

from __future__ import annotations

import math

import pytest
import torch

import fastcnc
from fastcnc import _backend
from fastcnc import tsc as tsc_module
from fastcnc.tsc import TSCPenaltyFunction, tsc_penalty

# odd sizes: tails shorter than the tile, a layer of exactly two tiles (with the 16-wide test tile), a single weight
SHAPES = [(5, 7), (33,), (3, 3, 3, 2), (32,), (1,), (4, 1, 3, 3)]
TOL = {  # (rtol, atol) of values / gradients against float64
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2**-7, 1e-6),  # the gradient is stored in bf16: one rounding
    torch.float16: (2**-10, 1e-6),
}


@pytest.fixture(autouse=True)
def small_kernel_tile(monkeypatch):
    """16-element tiles: every multi-tile, tail and padding path of the kernel runs on tiny interpreter inputs."""
    monkeypatch.setattr(tsc_module, "_KERNEL_BLOCK", 16)


def tsc_ref(weights: list[torch.Tensor], a: float) -> torch.Tensor:
    """Per-layer (a+1)|w|/(a+|w|) sums in float64, written naively so autograd gives the reference gradient."""
    return torch.stack([((a + 1) * w.double().abs() / (a + w.double().abs())).sum() for w in weights])


def ref_values_and_grads(weights, a, grad_values):
    leaves = [w.detach().double().requires_grad_() for w in weights]
    values = tsc_ref(leaves, a)
    grads = torch.autograd.grad(values, leaves, grad_values.double())
    return values.detach(), grads


def make_weights(dtype=torch.float32, shapes=SHAPES, scale=3.0):
    return [(scale * torch.randn(s, dtype=torch.float64)).to(dtype).requires_grad_() for s in shapes]


def values_and_grads(weights, a, grad_values):
    values = tsc_penalty(weights, a=a, reduction="none")
    grads = torch.autograd.grad(values, weights, grad_values.to(values.dtype))
    return values, grads


@pytest.mark.parametrize("a", [0.5, 100.0, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_grads_match_float64_reference(backend, dtype, a):
    weights = make_weights(dtype)
    grad_values = torch.randn(len(weights), dtype=torch.float64)  # a different upstream gradient per layer
    values, grads = values_and_grads(weights, a, grad_values)
    ref_values, ref_grads = ref_values_and_grads(weights, a, grad_values)
    rtol, atol = TOL[dtype]
    assert values.dtype == dtype and values.shape == (len(weights),)
    torch.testing.assert_close(values.double(), ref_values, rtol=rtol, atol=atol)
    for w, g, rg in zip(weights, grads, ref_grads, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g.double(), rg, rtol=rtol, atol=atol)


def test_sum_reduction_and_single_tensor(backend):
    weights = make_weights()
    total = tsc_penalty(weights)
    assert total.shape == ()
    torch.testing.assert_close(total.double(), tsc_ref(weights, 100.0).sum(), rtol=1e-5, atol=1e-6)
    single = tsc_penalty(weights[0], reduction="none")
    assert single.shape == (1,)
    torch.testing.assert_close(single.double(), tsc_ref(weights[:1], 100.0), rtol=1e-5, atol=1e-6)
    # any iterable of tensors, e.g. model.parameters()
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    torch.testing.assert_close(tsc_penalty(model.parameters()).double(),
                               tsc_ref(list(model.parameters()), 100.0).sum(), rtol=1e-5, atol=1e-6)


def test_hand_computed_value_uses_a_plus_abs_w(backend):
    # a = 0.5, w = [3, -1, 0]: 1.5*3/3.5 + 1.5*1/1.5 + 0. The (a - |w|) denominator of the public code would give
    # 4.5/(-2.5) + 1.5/(-0.5) < 0 here: weights larger than a would be rewarded.
    w = torch.tensor([3.0, -1.0, 0.0], dtype=torch.float64, requires_grad=True)
    value = tsc_penalty(w, a=0.5)
    assert math.isclose(value.item(), 4.5 / 3.5 + 1.0, rel_tol=1e-12)
    (grad,) = torch.autograd.grad(value, w)
    # sign(w) a(a+1)/(a+|w|)^2, and the subgradient 0 at w = 0
    torch.testing.assert_close(grad, torch.tensor([0.75 / 3.5**2, -0.75 / 1.5**2, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("a", [0.5, 100.0])
def test_gradcheck_float64_torch_path(a):
    # finite differences are wrong across the kink at 0: keep every weight at least 0.1 away from it
    weights = [w.detach().sign() * (w.detach().abs() + 0.1) for w in make_weights(torch.float64, [(3, 4), (5,)])]
    weights = [w.requires_grad_() for w in weights]
    assert torch.autograd.gradcheck(lambda *ws: tsc_penalty(list(ws), a=a, reduction="none"), weights)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_path_equals_torch_path(dtype):
    weights = make_weights(dtype)
    grad_values = torch.randn(len(weights), dtype=torch.float64)
    _backend.force_backend("torch")
    values_t, grads_t = values_and_grads(weights, 7.0, grad_values)
    _backend.force_backend("triton")
    values_k, grads_k = values_and_grads(weights, 7.0, grad_values)
    # same formula, different summation order: equal up to rounding
    rtol = 1e-13 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(values_k, values_t, rtol=rtol, atol=0)
    for gk, gt in zip(grads_k, grads_t, strict=True):
        torch.testing.assert_close(gk, gt, rtol=rtol, atol=1e-30)


def test_non_contiguous_inputs(backend):
    base = (3 * torch.randn(9, 12)).requires_grad_()
    flat = (3 * torch.randn(41)).requires_grad_()
    # transposed, strided, and a view 4 bytes past an aligned allocation (the kernel path must realign it)
    weights = [base.T, base[::2, 1::3], flat[1:]]
    assert not weights[0].is_contiguous() and not weights[1].is_contiguous() and weights[2].data_ptr() % 16
    grad_values = torch.randn(3, dtype=torch.float64)
    values, grads = values_and_grads(weights, 3.0, grad_values)
    ref_values, ref_grads = ref_values_and_grads(weights, 3.0, grad_values)
    torch.testing.assert_close(values.double(), ref_values, rtol=1e-5, atol=1e-6)
    for w, g, rg in zip(weights, grads, ref_grads, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g.double(), rg, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_fp32(backend, dtype):
    # 2000 weights: a half-precision sum would lose ~3 digits; the fp32 accumulation keeps the reference's value
    weights = make_weights(dtype, [(40, 50), (7,)])
    grad_values = torch.randn(2, dtype=torch.float64)
    values, grads = values_and_grads(weights, 100.0, grad_values)
    ref_values, ref_grads = ref_values_and_grads(weights, 100.0, grad_values)  # from the rounded half weights
    assert values.dtype == torch.float32
    torch.testing.assert_close(values.double(), ref_values, rtol=1e-5, atol=1e-6)
    rtol, atol = TOL[dtype]
    for g, rg in zip(grads, ref_grads, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), rg, rtol=rtol, atol=atol)


def test_mixed_dtypes_keep_layer_order(backend):
    weights = [make_weights(dt, [(6, 5)])[0] for dt in (torch.float32, torch.bfloat16, torch.float64, torch.float32)]
    grad_values = torch.randn(4, dtype=torch.float64)
    values, grads = values_and_grads(weights, 10.0, grad_values)
    ref_values, ref_grads = ref_values_and_grads(weights, 10.0, grad_values)
    assert values.dtype == torch.float64  # one fp64 layer promotes the values
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-6)
    for w, g, rg in zip(weights, grads, ref_grads, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.double(), rg, rtol=TOL[w.dtype][0], atol=1e-6)


def test_zero_weights_give_zero_value_and_gradient(backend):
    weights = [torch.zeros(5, 3, requires_grad=True), torch.tensor([0.0, -0.0], requires_grad=True)]
    values, grads = values_and_grads(weights, 100.0, torch.ones(2, dtype=torch.float64))
    assert torch.equal(values, torch.zeros(2))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_only_weights_that_require_grad_get_one(backend):
    frozen = torch.randn(4, 4)
    trained = torch.randn(10, requires_grad=True)
    total = tsc_penalty([frozen, trained], a=2.0)
    total.backward()
    ref = ref_values_and_grads([trained], 2.0, torch.ones(1, dtype=torch.float64))[1][0]
    torch.testing.assert_close(trained.grad.double(), ref, rtol=1e-5, atol=1e-6)
    assert frozen.grad is None


def test_deterministic(backend):
    weights = make_weights()
    first = values_and_grads(weights, 100.0, torch.ones(len(weights), dtype=torch.float64))
    second = values_and_grads(weights, 100.0, torch.ones(len(weights), dtype=torch.float64))
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(g1, g2) for g1, g2 in zip(first[1], second[1], strict=True))


def test_double_backward_is_refused():
    # the backward is not itself differentiable: a second derivative must fail loudly, never come out as zero
    w = torch.randn(5, requires_grad=True)
    (g,) = torch.autograd.grad(tsc_penalty(w), w, create_graph=True)
    assert not g.requires_grad
    upstream = torch.ones((), requires_grad=True)
    (g,) = torch.autograd.grad(tsc_penalty(w), w, upstream, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: tsc_penalty([]), ValueError, "at least one tensor"),
        (lambda: tsc_penalty(torch.empty(0, 3)), ValueError, r"weights\[0\] must be non-empty"),
        (lambda: tsc_penalty([torch.ones(2), torch.empty(0)]), ValueError, r"weights\[1\] must be non-empty"),
        (lambda: tsc_penalty([torch.ones(2), torch.tensor([1.0, math.nan])]), ValueError, r"weights\[1\].*NaN or Inf"),
        (lambda: tsc_penalty(torch.tensor([math.inf])), ValueError, r"weights\[0\].*NaN or Inf"),
        (lambda: tsc_penalty(torch.ones(3), a=0.0), ValueError, "a must be > 0"),
        (lambda: tsc_penalty(torch.ones(3), a=-1.0), ValueError, "a must be > 0"),
        (lambda: tsc_penalty(torch.ones(3), a=math.nan), ValueError, "a must be > 0"),
        (lambda: tsc_penalty(torch.ones(3), a=math.inf), ValueError, "a must be > 0"),
        (lambda: tsc_penalty(torch.ones(3), a="100"), TypeError, "a must be a number"),
        # valid for the formula but beyond float32: used to come out NaN, blamed on the weights
        (lambda: tsc_penalty(torch.zeros(3), a=1e-50), ValueError, r"a must be in \[1e-06, 1e\+06\]"),
        (lambda: tsc_penalty(torch.ones(3), a=1e39), ValueError, r"a must be in \[1e-06, 1e\+06\]"),
        (lambda: tsc_penalty(torch.ones(3), reduction="mean"), ValueError, "reduction must be one of"),
        (lambda: tsc_penalty(torch.ones(3, dtype=torch.int64)), TypeError, "floating-point"),
        (lambda: tsc_penalty([torch.ones(3), "w"]), TypeError, r"weights\[1\] must be a torch.Tensor"),
        (lambda: tsc_penalty(3.0), TypeError, "tensor or an iterable"),
        (lambda: tsc_penalty([torch.ones(3), torch.ones(3, device="meta")]), ValueError, "share one device"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_non_finite_check_can_be_disabled():
    value = tsc_penalty(torch.tensor([1.0, math.nan]), check_finite=False)
    assert math.isnan(value.item())


@pytest.mark.interpret
def test_launcher_fused_value_and_grad_in_one_pass():
    # the mode with both outputs (one read of the weights) agrees with the two single-output modes and the reference
    from fastcnc.kernels.tsc import tsc_value_grad

    weights = [w.detach() for w in make_weights(torch.float32, [(5, 7), (16,), (40,), (1,)])]
    scale = torch.randn(len(weights))
    values, grads = tsc_value_grad(weights, 3.0, scale, block=16)
    values_only, none_grads = tsc_value_grad(weights, 3.0, block=16)
    none_values, grads_only = tsc_value_grad(weights, 3.0, scale, compute_value=False, block=16)
    assert none_grads is None and none_values is None
    ref_values, ref_grads = ref_values_and_grads(weights, 3.0, scale.double())
    assert torch.equal(values, values_only)
    torch.testing.assert_close(values.double(), ref_values, rtol=1e-5, atol=1e-6)
    for g, g_only, rg in zip(grads, grads_only, ref_grads, strict=True):
        assert torch.equal(g, g_only)
        torch.testing.assert_close(g.double(), rg, rtol=1e-5, atol=1e-6)
    # each gradient is a view at a tile boundary of one flat buffer, with zeros in the padding between layers
    flat = grads[0]._base
    assert flat is not None and all(g._base is flat for g in grads)
    assert all(g.data_ptr() % 64 == 0 for g in grads)
    written = torch.zeros(flat.numel(), dtype=torch.bool)
    for g in grads:
        start = (g.data_ptr() - flat.data_ptr()) // flat.element_size()
        written[start : start + g.numel()] = True
    assert torch.equal(flat[~written], torch.zeros(int((~written).sum())))


@pytest.mark.interpret
def test_layer_table_follows_the_weights_storage():
    # the pointer table is cached per (device, data pointers, sizes): a new storage gets its own table, and the
    # values follow the new storage, never a stale table
    from fastcnc.kernels import tsc as kt

    weights = [w.detach() for w in make_weights(torch.float32, [(5, 7), (40,)])]
    kt.tsc_value_grad(weights, 3.0, block=16)
    assert kt.has_layer_table(weights, 16)
    moved = [w.clone() * 2 for w in weights]  # new storages, other values
    assert not kt.has_layer_table(moved, 16)
    values, _ = kt.tsc_value_grad(moved, 3.0, block=16)
    assert kt.has_layer_table(moved, 16) and kt.has_layer_table(weights, 16)
    torch.testing.assert_close(values.double(), tsc_ref(moved, 3.0), rtol=1e-5, atol=1e-6)


@pytest.mark.interpret
def test_fresh_tensors_each_call_are_staged_not_uploaded(monkeypatch):
    # W*M products are new tensors every step: the penalty copies them into one persistent buffer whose table is
    # already on the device, so no pointer table is uploaded after the first call, and results stay exact
    from fastcnc.kernels import tsc as kt

    uploads = []
    real_upload = kt.upload
    monkeypatch.setattr(kt, "upload", lambda *args: uploads.append(1) or real_upload(*args))
    _backend.force_backend("triton")
    base = make_weights(torch.float32, [(6, 5), (33,)])
    grad_values = torch.randn(2, dtype=torch.float64)
    kept = []  # keep every step's tensors alive, so no address is reused and every call sees new pointers
    for step in range(3):
        weights = [(w * (step + 1)).detach().requires_grad_() for w in base]
        kept.append(weights)
        values, grads = values_and_grads(weights, 5.0, grad_values)
        ref_values, ref_grads = ref_values_and_grads(weights, 5.0, grad_values)
        torch.testing.assert_close(values.double(), ref_values, rtol=1e-5, atol=1e-6)
        for g, rg in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g.double(), rg, rtol=1e-5, atol=1e-6)
        if step == 0:
            first = len(uploads)
    assert first >= 1 and len(uploads) == first  # the staging buffer's table, built once


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernel_matches_reference_and_is_deterministic(dtype, monkeypatch):
    monkeypatch.setattr(tsc_module, "_KERNEL_BLOCK", 4096)  # the production tile (the autouse fixture shrinks it)
    # ResNet-like layers: several tiles, ragged tails, a tile-sized layer plus one, a single weight
    shapes = [(64, 3, 3, 3), (512, 256, 3, 3), (10, 512), (4097,), (1,)]
    weights = [(0.05 * torch.randn(shape, device="cuda")).to(dtype).requires_grad_() for shape in shapes]
    grad_values = torch.randn(len(weights), dtype=torch.float64, device="cuda")
    values, grads = values_and_grads(weights, 100.0, grad_values)
    ref_values, ref_grads = ref_values_and_grads(weights, 100.0, grad_values)
    torch.testing.assert_close(values.double(), ref_values, rtol=1e-5, atol=1e-6)
    rtol, atol = TOL[dtype]
    for w, g, rg in zip(weights, grads, ref_grads, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g.double(), rg, rtol=rtol, atol=atol)
    again = values_and_grads(weights, 100.0, grad_values)
    assert torch.equal(values, again[0]) and all(torch.equal(g, h) for g, h in zip(grads, again[1], strict=True))


def test_public_export():
    assert fastcnc.tsc_penalty is tsc_penalty
    assert issubclass(TSCPenaltyFunction, torch.autograd.Function)
