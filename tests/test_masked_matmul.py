"""masked_linear / masked_conv2d (torch path and Triton kernels) against F.linear / F.conv2d on W*M in float64."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcnc import MaskedLinear, _backend, masked
from fastcnc.masked import build_tile_table, masked_conv2d, masked_linear, masked_matmul

# fp32 kernels (ieee dot) against a float64 reference: error grows like sqrt(K) * eps32
ATOL, RTOL = 2e-5, 1e-5


@pytest.fixture
def launches(monkeypatch):
    """Count launcher calls, so a "triton" test fails if it silently fell back to the torch path."""
    calls = []
    real = _backend.kernels

    class Counting:
        def __getattr__(self, name):
            fn = getattr(real("masked_matmul"), name)

            def wrapped(*args, **kwargs):
                calls.append(name)
                return fn(*args, **kwargs)

            return wrapped

    monkeypatch.setattr(_backend, "kernels", lambda name: Counting() if name == "masked_matmul" else real(name))
    return calls


def _mask(shape, kind: str, block: int = 16) -> torch.Tensor:
    if kind == "ones":
        return torch.ones(shape)
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "random":
        return (torch.rand(shape) > 0.6).float()
    # block-sparse: whole block x block tiles of the [rows, fan_in] matrix kept or dropped, plus random holes
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    tiles = torch.rand(-(-rows // block), -(-cols // block)) > 0.6
    m = tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    return (m & (torch.rand(rows, cols) > 0.2)).float().reshape(shape)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


def _ref64(fn, x, w, m, b, grad, **kw):
    x64, w64, b64 = _leaves(x.double(), w.double(), None if b is None else b.double())
    y = fn(x64, w64 * m.double(), b64, **kw)
    y.backward(grad.double())
    return y, x64.grad, w64.grad, None if b is None else b64.grad


def _check(y, ref, x, w, b, m):
    y_ref, gx, gw, gb = ref
    torch.testing.assert_close(y.double(), y_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(x.grad.double(), gx, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(w.grad.double(), gw, atol=ATOL, rtol=RTOL)
    if b is not None:
        torch.testing.assert_close(b.grad.double(), gb, atol=ATOL, rtol=RTOL)
    assert torch.count_nonzero(w.grad[m == 0]) == 0  # pruned weights get exactly zero gradient


LINEAR_CASES = [
    pytest.param((5, 7, 9), "random", True, None, id="M5-N7-K9-random"),
    pytest.param((37, 45, 70), "block", True, None, id="M37-N45-K70-block"),
    pytest.param((37, 45, 70), "random", True, 16, id="M37-N45-K70-random-tile16"),
    pytest.param((70, 33, 100), "random", False, 32, id="M70-N33-K100-random-nobias-tile32"),
    pytest.param((17, 64, 48), "zeros", True, None, id="M17-N64-K48-zeros"),
    pytest.param((3, 16, 16), "ones", True, 16, id="M3-N16-K16-ones"),
]


@pytest.mark.parametrize("shape, kind, bias, block", LINEAR_CASES)
def test_masked_linear_matches_reference(backend, launches, shape, kind, bias, block):
    m_rows, n, k = shape
    x, w = _leaves(torch.randn(m_rows, k), torch.randn(n, k))
    b = _leaves(torch.randn(n))[0] if bias else None
    mask = _mask((n, k), kind)
    tiles = build_tile_table(mask, block=block) if block else None
    y = masked_linear(x, w, mask, b, tiles=tiles)
    grad = torch.randn_like(y)
    y.backward(grad)
    _check(y, _ref64(F.linear, x, w, mask, b, grad), x, w, b, mask)
    assert bool(launches) == (backend == "triton")


def test_masked_linear_batched_noncontiguous(backend, launches):
    base = torch.randn(3, 40, 11)
    x = _leaves(base)[0]
    xt = x.transpose(1, 2)[:, :, ::2]  # [3, 11, 20], non-contiguous, K = 20 strided
    w = _leaves(torch.randn(9, 20))[0]
    b = _leaves(torch.randn(9))[0]
    mask = _mask((9, 20), "random")
    y = masked_linear(xt, w, mask, b)
    grad = torch.randn_like(y)
    y.backward(grad)
    x64, w64, b64 = _leaves(base.double(), w.double(), b.double())
    y_ref = F.linear(x64.transpose(1, 2)[:, :, ::2], w64 * mask.double(), b64)
    y_ref.backward(grad.double())
    assert y.shape == (3, 11, 9)
    torch.testing.assert_close(y.double(), y_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=ATOL, rtol=RTOL)
    assert torch.count_nonzero(w.grad[mask == 0]) == 0
    assert bool(launches) == (backend == "triton")


def test_strided_bias_and_weight(backend, launches):
    """Bias and weight views with non-unit strides: the kernels must follow the strides, not assume contiguity."""
    wb = _leaves(torch.randn(20, 9))[0]
    bb = _leaves(torch.randn(18))[0]
    w, b = wb.t(), bb[::2]  # weight [9, 20] with strides (1, 9); bias [9] with stride 2
    x = _leaves(torch.randn(13, 20))[0]
    mask = _mask((9, 20), "random")
    y = masked_linear(x, w, mask, b)
    grad = torch.randn_like(y)
    y.backward(grad)
    x64, wb64, bb64 = _leaves(x.double(), wb.double(), bb.double())
    y_ref = F.linear(x64, wb64.t() * mask.double(), bb64[::2])
    y_ref.backward(grad.double())
    torch.testing.assert_close(y.double(), y_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(wb.grad.double(), wb64.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(bb.grad.double(), bb64.grad, atol=ATOL, rtol=RTOL)
    assert bool(launches) == (backend == "triton")


@pytest.mark.interpret
def test_autotune_key_does_not_retune_per_batch_size():
    mm = _backend.kernels("masked_matmul")
    common = _backend.kernels("_common")
    for kernel in (mm._masked_mm_fwd_kernel, mm._masked_mm_bwd_dx_kernel, mm._masked_mm_bwd_dw_kernel):
        assert "M" not in kernel.keys and "M_BUCKET" in kernel.keys, kernel.keys
    # CIFAR batches of 100 and 128 at 32x32 (and any larger M) share one tuned config; small M get their own bucket
    assert common.m_bucket(100 * 32 * 32) == common.m_bucket(128 * 32 * 32) == common.m_bucket(10**9)
    assert [common.m_bucket(m) for m in (1, 5, 16, 17)] == [1, 8, 16, 32]


def test_masked_matmul_alias(backend):
    a, w = torch.randn(6, 13), torch.randn(5, 13)
    mask = _mask((5, 13), "random")
    torch.testing.assert_close(masked_matmul(a, w, mask).double(), a.double() @ (w.double() * mask.double()).T,
                               atol=ATOL, rtol=RTOL)


CONV_CASES = [
    # (batch, c_in, h, w), (c_out, kh, kw), stride, padding, dilation, groups, bias, mask kind
    pytest.param((2, 3, 7, 6), (4, 3, 3), 1, 1, 1, 1, True, "random", id="3x3-pad1"),
    pytest.param((2, 4, 9, 8), (6, 3, 2), (2, 1), (1, 2), (1, 2), 2, True, "random", id="stride-pad-dil-groups2"),
    pytest.param((1, 6, 5, 7), (6, 3, 3), 2, 0, 1, 6, False, "random", id="depthwise-stride2-nobias"),
    pytest.param((2, 5, 6, 6), (7, 1, 1), 1, 0, 1, 1, True, "block", id="1x1-block"),
    pytest.param((1, 8, 6, 5), (16, 3, 3), 1, 2, 2, 1, True, "block", id="dil2-pad2-block"),
    pytest.param((2, 2, 4, 4), (3, 2, 2), 3, 1, 1, 1, True, "zeros", id="stride3-zeros"),
]


@pytest.mark.parametrize("x_shape, w_shape, stride, padding, dilation, groups, bias, kind", CONV_CASES)
def test_masked_conv2d_matches_reference(backend, launches, x_shape, w_shape, stride, padding, dilation, groups,
                                         bias, kind):
    c_out, kh, kw = w_shape
    x = _leaves(torch.randn(x_shape))[0]
    w = _leaves(torch.randn(c_out, x_shape[1] // groups, kh, kw))[0]
    b = _leaves(torch.randn(c_out))[0] if bias else None
    mask = _mask(w.shape, kind)
    kw_args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    y = masked_conv2d(x, w, mask, b, **kw_args)
    grad = torch.randn_like(y)
    y.backward(grad)
    _check(y, _ref64(F.conv2d, x, w, mask, b, grad, **kw_args), x, w, b, mask)
    assert bool(launches) == (backend == "triton")


@pytest.mark.parametrize("draw", range(4))
def test_random_shapes(backend, draw):
    """Shapes and conv options drawn at random (seeded per test) against the float64 reference."""
    gen = torch.Generator().manual_seed(1000 + draw)

    def r(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    m_rows, n, k = r(1, 40), r(1, 40), r(1, 80)
    x, w, b = _leaves(torch.randn(m_rows, k), torch.randn(n, k), torch.randn(n))
    mask = _mask((n, k), ["random", "block"][draw % 2])
    y = masked_linear(x, w, mask, b)
    grad = torch.randn_like(y)
    y.backward(grad)
    _check(y, _ref64(F.linear, x, w, mask, b, grad), x, w, b, mask)

    groups = [1, 2, 3][r(0, 2)]
    c_in, c_out = groups * r(1, 3), groups * r(1, 3)
    kh, kw = r(1, 3), r(1, 3)
    opts = dict(stride=(r(1, 2), r(1, 2)), padding=(r(0, 2), r(0, 2)), dilation=(r(1, 2), r(1, 2)), groups=groups)
    h = (kh - 1) * opts["dilation"][0] + r(1, 6)
    wd = (kw - 1) * opts["dilation"][1] + r(1, 6)
    x, w = _leaves(torch.randn(r(1, 2), c_in, h, wd), torch.randn(c_out, c_in // groups, kh, kw))
    b = _leaves(torch.randn(c_out))[0] if draw % 2 else None
    mask = _mask(w.shape, "random")
    y = masked_conv2d(x, w, mask, b, **opts)
    grad = torch.randn_like(y)
    y.backward(grad)
    _check(y, _ref64(F.conv2d, x, w, mask, b, grad, **opts), x, w, b, mask)


def test_masked_conv2d_noncontiguous_and_unbatched(backend):
    w = torch.randn(5, 4, 3, 3)
    mask = _mask(w.shape, "random")
    x = torch.randn(2, 9, 8, 4).permute(0, 3, 1, 2)  # channels-last-like strides, [2, 4, 9, 8]
    y = masked_conv2d(x, w, mask, None, padding=1)
    torch.testing.assert_close(y.double(), F.conv2d(x.double(), w.double() * mask.double(), padding=1),
                               atol=ATOL, rtol=RTOL)
    y1 = masked_conv2d(x[1], w, mask, None, padding=1)  # unbatched [C, H, W]
    torch.testing.assert_close(y1.double(), F.conv2d(x[1].double(), w.double() * mask.double(), padding=1),
                               atol=ATOL, rtol=RTOL)


def test_string_padding_and_empty_batch(backend):
    w = torch.randn(4, 3, 3, 2)
    mask = _mask(w.shape, "random")
    x = torch.randn(2, 3, 5, 6)
    torch.testing.assert_close(masked_conv2d(x, w, mask, None, padding="same", dilation=2),
                               F.conv2d(x, w * mask, None, padding="same", dilation=2))
    assert masked_conv2d(x[:0], w, mask, None, padding=1).shape == (0, 4, 5, 7)
    assert masked_linear(torch.randn(0, 6), torch.randn(3, 6), torch.ones(3, 6)).shape == (0, 3)


@pytest.mark.interpret
def test_kernel_skips_zero_tiles():
    """Columns of x under all-zero K-tiles are never read: NaN there poisons W*M+matmul but not the kernel."""
    _backend.force_backend("triton")
    n, k = 20, 48
    mask = torch.ones(n, k)
    mask[:, 16:32] = 0  # K-tile 1 (of 16x16 tiles) is empty for every N-tile
    tiles = build_tile_table(mask, block=16)
    x = torch.randn(6, k)
    x[:, 16:32] = float("nan")
    w = torch.randn(n, k)
    y = masked_linear(x, w, mask, tiles=tiles)
    x_clean = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), x_clean.double() @ (w.double() * mask.double()).T, atol=ATOL, rtol=RTOL)
    assert torch.isnan(F.linear(x, w * mask)).any()  # the dense path does read them


@pytest.mark.interpret
def test_dw_row_splits():
    """dW with the B*L reduction split into fp32 partials (what large GPUs use) equals the unsplit reduction."""
    _backend.force_backend("triton")
    k_mod = _backend.kernels("masked_matmul")
    groups, n, k, b, rows_l = 2, 20, 24, 2, 200
    mask = (torch.rand(groups * n, k) < 0.5).float()
    tiles = build_tile_table(mask.view(groups, n, k), block=16)
    grad_out, a = torch.randn(b, groups * n, rows_l), torch.randn(b, groups * k, rows_l)
    a64 = a.double().view(b, groups, k, rows_l)
    g64 = grad_out.double().view(b, groups, n, rows_l)
    want = torch.einsum("bgnl,bgkl->gnk", g64, a64).reshape(groups * n, k) * mask.double()
    for splits in (1, 3):
        out = torch.full((groups * n, k), float("nan"))
        k_mod.masked_mm_bwd_dw(grad_out, a, tiles.keep, tiles.nonzero, out, groups=groups, block=16, splits=splits)
        torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-5)
        assert torch.count_nonzero(out[mask == 0]) == 0


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_kernels(dtype):
    _backend.force_backend("triton")
    x, w = _leaves(torch.randn(9, 40).to(dtype), torch.randn(12, 40).to(dtype))
    b = _leaves(torch.randn(12).to(dtype))[0]
    mask = _mask((12, 40), "random")
    y = masked_linear(x, w, mask, b)
    assert y.dtype == dtype
    grad = torch.randn_like(y)
    y.backward(grad)
    ref = _ref64(F.linear, x, w, mask, b, grad)
    tol = dict(atol=5e-2, rtol=2e-2)  # one rounding of the fp32 accumulator to 8 (bf16) / 11 (fp16) mantissa bits
    torch.testing.assert_close(y.double(), ref[0], **tol)
    torch.testing.assert_close(x.grad.double(), ref[1], **tol)
    torch.testing.assert_close(w.grad.double(), ref[2], **tol)
    assert torch.count_nonzero(w.grad[mask == 0]) == 0


def test_tile_table_matches_brute_force():
    mask = torch.stack([_mask((37, 70), "block"), _mask((37, 70), "block")])
    t = build_tile_table(mask, block=16)
    nt, kt = 3, 5
    for g in range(2):
        for i in range(nt):
            for j in range(kt):
                tile = mask[g, i * 16:(i + 1) * 16, j * 16:(j + 1) * 16]
                assert bool(t.nonzero[g, i, j]) == bool(tile.any())
            nz = [j for j in range(kt) if t.nonzero[g, i, j]]
            assert t.k_cnt[g, i] == len(nz) and t.k_idx[g, i, :len(nz)].tolist() == nz
        for j in range(kt):
            nz = [i for i in range(nt) if t.nonzero[g, i, j]]
            assert t.n_cnt[g, j] == len(nz) and t.n_idx[g, j, :len(nz)].tolist() == nz
    assert t.keep.dtype == torch.uint8 and t.keep.shape == (74, 70)
    assert t.density == pytest.approx(float(t.nonzero.float().mean()))


def test_tile_size_choice():
    assert build_tile_table(torch.ones(128, 128)).block == 64
    m = torch.zeros(128, 128)
    m[0:16, 16:32] = m[48:64, 96:112] = m[112:128, 0:16] = 1  # isolated 16x16 blocks
    assert build_tile_table(m).block == 16


def test_cpu_default_uses_torch_path(launches):
    y = masked_linear(torch.randn(3, 5), torch.randn(4, 5), torch.ones(4, 5))
    assert y.shape == (3, 4) and not launches


def test_gradcheck_float64():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    mask = _mask(w.shape, "random").double()
    assert torch.autograd.gradcheck(lambda x, w, b: masked_conv2d(x, w, mask, b, stride=2, padding=1), (x, w, b))
    x2 = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    mask2 = _mask((4, 6), "random").double()
    assert torch.autograd.gradcheck(lambda x, w: masked_linear(x, w, mask2), (x2, w2))


def test_double_backward_is_exact_or_refused(backend):
    # an input-gradient penalty: autograd's own second derivative on the torch path; the kernel path's backward is
    # not differentiable and must fail loudly (it used to return a gradient without grad_fn: wrong weight gradients)
    torch.manual_seed(0)
    layer = MaskedLinear(8, 4)
    layer.set_mask(torch.rand(4, 8) < 0.5)
    x = torch.randn(5, 8, requires_grad=True)
    out = layer(x).tanh().sum()
    (g,) = torch.autograd.grad(out, x, create_graph=True)
    if backend == "torch":
        (out + g.pow(2).sum()).backward()
        assert layer.weight.grad is not None and bool((layer.weight.grad[layer.mask == 0] == 0).all())
    else:
        with pytest.raises(RuntimeError, match="once_differentiable"):
            (out + g.pow(2).sum()).backward()


# ------------------------------------------------------------------------------------------------------- bad input


def test_bad_inputs():
    x, w = torch.randn(3, 5), torch.randn(4, 5)
    with pytest.raises(ValueError, match="mask must have the weight's shape"):
        masked_linear(x, w, torch.ones(5, 4))
    with pytest.raises(ValueError, match="binary"):
        masked_linear(x, w, torch.full((4, 5), 0.5))
    with pytest.raises(ValueError, match="device"):
        masked_linear(x, w, torch.ones(4, 5, device="meta"))
    with pytest.raises(TypeError, match="mask must be bool, integer or floating"):
        masked_linear(x, w, torch.ones(4, 5, dtype=torch.complex64))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        masked_linear(x, w, [[1] * 5] * 4)
    with pytest.raises(ValueError, match=r"x must have shape \[..., 5\]"):
        masked_linear(torch.randn(3, 6), w, torch.ones(4, 5))
    with pytest.raises(ValueError, match="bias must have shape"):
        masked_linear(x, w, torch.ones(4, 5), torch.ones(5))
    with pytest.raises(ValueError, match="tiles was built for"):
        masked_linear(x, w, torch.ones(4, 5), tiles=build_tile_table(torch.ones(4, 6)))
    with pytest.raises(TypeError, match="floating-point"):
        masked_linear(torch.ones(3, 5, dtype=torch.int64), w, torch.ones(4, 5))
    wc = torch.randn(6, 2, 3, 3)
    with pytest.raises(ValueError, match="groups must be a positive int"):
        masked_conv2d(torch.randn(1, 4, 5, 5), wc, torch.ones_like(wc), groups=4)
    with pytest.raises(ValueError, match="C_in = 4 channels"):
        masked_conv2d(torch.randn(1, 3, 5, 5), wc, torch.ones_like(wc), groups=2)
    with pytest.raises(ValueError, match="stride must be"):
        masked_conv2d(torch.randn(1, 4, 5, 5), wc, torch.ones_like(wc), stride=(1, 2, 3), groups=2)
    with pytest.raises(ValueError, match="block must be one of"):
        build_tile_table(torch.ones(4, 4), block=8)
    for bad in (1.0, "1"):  # named, not "'float' object is not iterable"
        with pytest.raises(ValueError, match="stride must be an int or a pair of ints"):
            masked_conv2d(torch.randn(1, 4, 5, 5), wc, torch.ones_like(wc), stride=bad, groups=2)
    y = masked_conv2d(torch.randn(1, 4, 5, 5), wc, torch.ones_like(wc), stride=np.int64(2), padding=(np.int32(1), 1),
                      groups=2)
    assert y.shape == (1, 6, 3, 3)
    with pytest.raises(ValueError, match="x must be on the weight's device"):
        masked_linear(x.to("meta"), w, torch.ones(4, 5))
    with pytest.raises(ValueError, match="bias must be on the weight's device"):
        masked_linear(x, w, torch.ones(4, 5), torch.ones(4, device="meta"))


# ------------------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["block", "random"])
def test_cuda_kernels_large(monkeypatch, launches, dtype, kind):
    monkeypatch.setattr(masked, "CUDA_KERNELS", True)
    monkeypatch.setattr(masked, "DENSE_FALLBACK_TILE_DENSITY", 1.0)  # run the kernels even on dense-ish masks
    x = torch.randn(4, 256, 16, 16, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(128, 256, 3, 3, device="cuda", dtype=dtype, requires_grad=True)
    mask = _mask(w.shape, kind).cuda()
    y = masked_conv2d(x, w, mask, None, padding=1)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref = _ref64(F.conv2d, x, w, mask, None, grad, padding=1)
    tol = dict(atol=5e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-3, rtol=1e-3)
    for got, want in zip((y, x.grad, w.grad), ref[:3], strict=True):
        scale = want.abs().max().clamp_min(1)
        torch.testing.assert_close(got.double() / scale, want / scale, **tol)
    assert torch.count_nonzero(w.grad[mask == 0]) == 0 and launches


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_dispatch_rule(launches, monkeypatch):
    """By default every mask goes to W*M + cuBLAS; with CUDA_KERNELS, unstructured masks (no empty tile) still do and
    block-sparse masks go to the kernels."""
    x = torch.randn(64, 256, device="cuda")
    w = torch.randn(128, 256, device="cuda")
    block = _mask((128, 256), "block", block=32).cuda()
    block[:, 128:] = 0
    tiles = build_tile_table(block)
    assert tiles.density <= masked.DENSE_FALLBACK_TILE_DENSITY
    masked_linear(x, w, block, tiles=tiles)
    assert not launches
    monkeypatch.setattr(masked, "CUDA_KERNELS", True)
    unstructured = (torch.rand(128, 256, device="cuda") > 0.9).float()
    masked_linear(x, w, unstructured)
    assert not launches
    y = masked_linear(x, w, block, tiles=tiles)
    assert launches == ["masked_mm_fwd"]
    torch.testing.assert_close(y, x @ (w * block).T, atol=1e-3, rtol=1e-3)
