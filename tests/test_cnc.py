import copy
import math

import pytest
import torch
from torch import nn

import fastcnc
from fastcnc.cnc import BilinearFormsFunction, cnc_from_sigmas
from fastcnc.reference import matrix_with_spectrum, sigma_extremes_ref
from fastcnc.spectral import VectorGroup, extreme_singular_values

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _exact_cnc(W, kind="log", kappa_target=10.0, eps=1e-6):
    s = torch.linalg.svdvals(W)
    return cnc_from_sigmas(torch.stack([s[0], s[-1]])[None], kind=kind, kappa_target=kappa_target, eps=eps)[0]


def test_bilinear_forms_function_gradcheck_float64():
    mats = [torch.randn(9, 6, dtype=torch.float64, requires_grad=True),
            torch.randn(6, 9, dtype=torch.float64, requires_grad=True)]  # one tall shape, both orientations
    est = extreme_singular_values([m.detach() for m in mats])
    assert [g.wide for g in est.groups] == [[False], [True]]  # the engine keeps one orientation per group
    assert torch.autograd.gradcheck(lambda a, b: BilinearFormsFunction.apply(None, est.groups, a, b), tuple(mats))
    # a caller-built group may mix orientations: the backward forms each one's gradient in its own layout
    mixed = [VectorGroup([0, 1], [False, True], torch.cat([g.U for g in est.groups]),
                         torch.cat([g.V for g in est.groups]))]
    assert torch.autograd.gradcheck(lambda a, b: BilinearFormsFunction.apply(None, mixed, a, b), tuple(mats))
    # one [B, m, n] input (wide matrices: stored as given, used through a transposed view)
    batch = torch.randn(3, 6, 9, dtype=torch.float64, requires_grad=True)
    est = extreme_singular_values(batch.detach())
    assert torch.autograd.gradcheck(lambda w: BilinearFormsFunction.apply(None, est.groups, w), (batch,))


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.interpret),
                                    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
                                        not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_backward_kernel_equals_torch_path(dtype, device):
    # the CUDA backward (kernels/bilinear.py: every matrix's rank-2 gradient in one launch) vs the torch loop, on
    # tall and wide matrices, groups of one and of mixed orientation, tiles cut at odd sizes, a 1x1 conv's matrix
    from fastcnc import _backend

    gen = torch.Generator().manual_seed(3)
    shapes = [(40, 17), (17, 40), (40, 17), (150, 33), (5, 290), (64, 64), (1, 7)]
    mats = [torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
            for s in shapes]
    est = extreme_singular_values([m.detach() for m in mats])
    one = {}  # matrix -> (wide, U [1, m, 2], V [1, n, 2]) taken out of the engine's groups
    for g in est.groups:
        for j, i in enumerate(g.index):
            one[i] = (g.wide[j], g.U[j:j + 1], g.V[j:j + 1])
    assert not one[0][0] and one[1][0]  # 40x17 tall, 17x40 wide: the same tall shape in both orientations
    mixed = [VectorGroup([0, 1], [False, True], torch.cat([one[0][1], one[1][1]]), torch.cat([one[0][2], one[1][2]]))]
    mixed += [VectorGroup([i], [one[i][0]], one[i][1], one[i][2]) for i in range(2, len(mats))]
    coef = torch.randn(len(mats), 2, generator=gen, dtype=torch.float64).to(device)
    for grp in (est.groups, mixed):
        out = {}
        for backend in ("torch", "triton"):
            _backend.force_backend(backend)
            try:
                vals = BilinearFormsFunction.apply(None, grp, *mats)
                out[backend] = torch.autograd.grad((vals * coef.to(vals.dtype)).sum(), mats)
            finally:
                _backend.force_backend(None)
        for gk, gt, m in zip(out["triton"], out["torch"], mats, strict=True):
            assert gk.shape == m.shape and gk.dtype == m.dtype and gk.is_contiguous()
            tol = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
            torch.testing.assert_close(gk.double(), gt.double(), rtol=tol, atol=tol * float(gt.abs().max()))


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.interpret),
                                    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
                                        not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_tscnc_fused_terms_equal_the_separate_terms(dtype, device, monkeypatch):
    # TSCNC on the Triton backend takes both penalties through one autograd node (fastcnc/tscnc_terms.py: TSC's
    # gradient, CNC's rank-2 terms added in place, the masks applied once); the separate terms are the reference:
    # the same values and gradients (bit for bit in float32 / float64; bfloat16 rounds the sum once, not each term),
    # on masked convs (one grouped), a plain 1x1 conv and a masked linear, along three SGD steps
    from fastcnc import _backend
    from fastcnc.layers import MaskedConv2d, MaskedLinear
    from fastcnc.regularizer import TSCNC
    from fastcnc.tscnc_terms import TSCNCTermsFunction

    def model():
        torch.manual_seed(0)
        net = nn.Sequential(MaskedConv2d(3, 8, 3), MaskedConv2d(8, 8, 3, groups=2), nn.Conv2d(8, 6, 1),
                            nn.Flatten(), MaskedLinear(24, 10)).to(device=device, dtype=dtype)
        gen = torch.Generator().manual_seed(1)
        for layer in (net[0], net[1], net[4]):
            layer.set_mask((torch.rand(layer.weight.shape, generator=gen) > 0.4).to(device))
        return net

    nets = [model(), model()]
    regs = [TSCNC(n, lambda_tsc=1e-2, lambda_cnc=1e-1) for n in nets]
    monkeypatch.setattr(regs[1], "_fused_terms", lambda layers: False)
    fused_calls = []
    apply = TSCNCTermsFunction.apply
    monkeypatch.setattr(TSCNCTermsFunction, "apply", lambda *a: fused_calls.append(1) or apply(*a))
    _backend.force_backend("triton")
    try:
        steps = 1 if dtype == torch.bfloat16 else 3  # (bfloat16 weights part after one step, by the last bits)
        for step in range(steps):
            out = []
            for net, reg in zip(nets, regs, strict=True):
                net.zero_grad()
                value = reg()
                value.backward()
                out.append((value, [p.grad for p in net.parameters() if p.grad is not None]))
                with torch.no_grad():
                    for p in net.parameters():
                        if p.grad is not None:
                            p.sub_(0.5 * p.grad)
            assert torch.equal(out[0][0], out[1][0]), (step, out[0][0], out[1][0])
            assert len(out[0][1]) == len(out[1][1]) == 4
            for a, b in zip(out[0][1], out[1][1], strict=True):
                assert a.dtype == b.dtype == dtype and a.shape == b.shape
                if dtype == torch.bfloat16:  # rounded once (fused) vs each term, then the sum (one rounding apart)
                    torch.testing.assert_close(a, b, rtol=2**-7, atol=2**-7 * float(b.abs().max()))
                else:
                    assert torch.equal(a, b), (step, float((a.double() - b.double()).abs().max()))
    finally:
        _backend.force_backend(None)
    assert len(fused_calls) == steps


@pytest.mark.interpret
def test_tscnc_fused_backward_after_another_call_staged_over_its_weights():
    # the fused backward reuses what its forward staged for the TSC kernel (one shared buffer per layer set) unless
    # the staging's version says a later call wrote over it: two calls, then the first one's backward, must give the
    # gradient at the first call's weights (the same as a lone call on a copy of the model)
    import copy

    from fastcnc import _backend
    from fastcnc.layers import MaskedConv2d, MaskedLinear
    from fastcnc.regularizer import TSCNC

    torch.manual_seed(0)
    net = nn.Sequential(MaskedConv2d(3, 8, 3), nn.Conv2d(8, 6, 1), nn.Flatten(), MaskedLinear(24, 10))
    for layer in (net[0], net[3]):
        layer.set_mask((torch.rand(layer.weight.shape) > 0.4).float())
    ref_net = copy.deepcopy(net)
    regs = [TSCNC(net, lambda_tsc=1e-2, lambda_cnc=1e-1), TSCNC(ref_net, lambda_tsc=1e-2, lambda_cnc=1e-1)]
    _backend.force_backend("triton")
    try:
        for reg in regs:  # the exact refresh, then warm calls
            reg().backward()
        net.zero_grad()
        ref_net.zero_grad()
        first = regs[0]()
        with torch.no_grad():  # the second call sees other weights, and stages them over the first call's
            saved = [p.clone() for p in net.parameters()]
            for p in net.parameters():
                p.mul_(1.5)
        regs[0]()
        with torch.no_grad():
            for p, s in zip(net.parameters(), saved, strict=True):
                p.copy_(s)
        net.zero_grad()
        first.backward()
        want = regs[1]()
        want.backward()
    finally:
        _backend.force_backend(None)
    assert torch.equal(first, want)
    for p, q in zip(net.parameters(), ref_net.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("smooth_min", [0.0, 0.05], ids=["ritz", "softmin"])
@pytest.mark.parametrize("kind", ["log", "kappa", "hinge"])
def test_cnc_penalty_gradcheck_with_frozen_vectors(kind, smooth_min):
    W = torch.randn(7, 11, dtype=torch.float64) * 3
    W.requires_grad_(True)
    est = extreme_singular_values(W.detach(), ritz_block=True)
    f = lambda w: fastcnc.cnc_penalty(w, kind=kind, kappa_target=1.5, estimate=est,  # noqa: E731
                                      smooth_min=smooth_min)
    assert torch.autograd.gradcheck(f, (W,))


def test_second_derivatives_are_refused():
    # the gradient is exact for the frozen vectors; a Hessian would miss their rotation, so double backward raises
    W = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fastcnc.cnc_penalty(W), W, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        torch.autograd.grad(g.sum(), W)


def test_softmin_is_smooth_over_a_clustered_bottom_and_close_to_sigma_min():
    gen = torch.Generator().manual_seed(0)
    s = torch.cat([torch.linspace(5, 1, 36, dtype=torch.float64), torch.tensor([0.1, 0.1001, 0.1002, 0.1003])])
    W = matrix_with_spectrum(60, 40, s, generator=gen).requires_grad_()
    ritz = fastcnc.cnc_penalty(W, reduction="none")
    soft = fastcnc.cnc_penalty(W, reduction="none", smooth_min=0.01)
    # soft-min <= the Ritz value, by at most T log r (log kappa moves by at most log(1 + 0.01 log 4))
    assert float(ritz.detach()) <= float(soft.detach()) <= float(ritz.detach()) + math.log(1 + 0.01 * math.log(4))
    (g,) = torch.autograd.grad(soft.sum(), W)
    # the soft-min gradient spreads over the cluster: rank > 2 (the Ritz gradient is rank 2)
    assert torch.linalg.matrix_rank(g, atol=1e-8 * float(g.norm())) > 2


@pytest.mark.parametrize("kind", ["log", "kappa", "hinge"])
def test_cnc_value_and_gradient_match_exact_svd_penalty(kind):
    # at convergence the estimate's gradient is the gradient of the true (SVD-based) penalty
    W = torch.randn(40, 25, dtype=torch.float64, requires_grad=True)
    p = fastcnc.cnc_penalty(W, kind=kind, kappa_target=2.0, refresh=True)
    (g,) = torch.autograd.grad(p, W)
    W2 = W.detach().clone().requires_grad_(True)
    p_ref = _exact_cnc(W2, kind, 2.0)
    (g_ref,) = torch.autograd.grad(p_ref, W2)
    torch.testing.assert_close(p, p_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-9)


def test_gradient_is_rank_two():
    W = torch.randn(30, 50, requires_grad=True, dtype=torch.float64)
    fastcnc.cnc_penalty(W).backward()
    s = torch.linalg.svdvals(W.grad)
    assert s[2] < 1e-10 * s[0]


def test_rank_deficient_layer_has_finite_penalty_and_gradient():
    W = torch.randn(20, 30, dtype=torch.float64)
    W[3] = 0
    W.requires_grad_(True)
    p = fastcnc.cnc_penalty(W, eps=1e-6, refresh=True)
    p.backward()
    assert math.isfinite(p.item()) and abs(p.item() - math.log(1e6)) < 1e-3
    assert torch.isfinite(W.grad).all()


def test_all_zero_layer_contributes_zero():
    W = torch.zeros(8, 5, requires_grad=True)
    p = fastcnc.cnc_penalty(W)
    p.backward()
    assert p.item() == 0 and torch.all(W.grad == 0)


def test_reductions_and_batch():
    mats = [torch.randn(12, 7, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)]
    per = fastcnc.cnc_penalty(mats, reduction="none", refresh=True)
    ref = torch.stack([_exact_cnc(m) for m in mats])
    torch.testing.assert_close(per, ref)
    torch.testing.assert_close(fastcnc.cnc_penalty(mats, reduction="mean", refresh=True), ref.mean())


@pytest.mark.parametrize("shape", [(40, 9, 6), (30, 5, 12), (6, 140, 130)], ids=["tall", "wide", "iterated"])
@pytest.mark.parametrize("smooth_min", [0.0, 0.05], ids=["ritz", "softmin"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_batch_of_same_shape_matrices_is_the_list_of_them(shape, smooth_min, dtype):
    # a [B, m, n] tensor is one input with one gradient tensor; value and gradient equal the list's, whether the
    # estimate is computed here (its values reused) or given (the forms recomputed from the weights)
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    W[1, :, 0] = 0  # a structurally deficient matrix in the batch
    W[2] = 0  # an all-zero one
    W[3] = matrix_with_spectrum(*shape[1:], torch.logspace(0, -3, min(shape[1:]), dtype=torch.float64),
                                generator=gen).to(dtype)
    batch = W.clone().requires_grad_()
    mats = [w.clone().requires_grad_() for w in W]
    p_batch = fastcnc.cnc_penalty(batch, smooth_min=smooth_min, reduction="none")
    p_list = fastcnc.cnc_penalty(mats, smooth_min=smooth_min, reduction="none")
    (g_batch,) = torch.autograd.grad(p_batch.sum(), batch)
    g_list = torch.stack(torch.autograd.grad(p_list.sum(), mats))
    assert g_batch.shape == W.shape and g_batch.dtype == dtype
    torch.testing.assert_close(p_batch, p_list, rtol=0, atol=0)
    torch.testing.assert_close(g_batch, g_list, rtol=0, atol=0)
    est = extreme_singular_values(W, floor=1e-6, ritz_block=smooth_min > 0)  # (the call cnc_penalty makes)
    p_given = fastcnc.cnc_penalty(batch, estimate=est, smooth_min=smooth_min, reduction="none")
    (g_given,) = torch.autograd.grad(p_given.sum(), batch)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(p_given, p_batch, rtol=tol, atol=tol)
    torch.testing.assert_close(g_given, g_batch, rtol=tol, atol=tol)


def test_a_batch_rejects_an_estimate_of_other_matrices():
    W = torch.randn(4, 6, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="covers 3 matrices, weights has 4"):
        fastcnc.cnc_penalty(W, estimate=extreme_singular_values(W[:3]))
    with pytest.raises(ValueError, match=r"fit a 5x6 matrix, weights\[0\] has shape \(6, 5\)"):
        fastcnc.cnc_penalty(W, estimate=extreme_singular_values(W.mT))
    with pytest.raises(ValueError, match="weights must be non-empty"):
        fastcnc.cnc_penalty(W[:0])


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "l2"}, "kind"), ({"eps": 0.0}, "eps"), ({"kappa_target": -1.0}, "kappa_target"),
    ({"reduction": "max"}, "reduction"), ({"kind": "hinge", "kappa_target": 0.5}, "kappa_target must be >= 1"),
    ({"smooth_min": 5.0}, "smooth_min must be <= 0.361"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastcnc.cnc_penalty(torch.randn(4, 3), **kwargs)


def _small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.Flatten(), nn.LazyLinear(10) if False else nn.Linear(16 * 6 * 6, 10),
    ).double()


def test_tscnc_regulariser_value_gradient_and_report():
    model = _small_cnn()
    reg = fastcnc.TSCNC(model, lambda_tsc=1e-3, lambda_cnc=1e-2)
    loss = reg()
    loss.backward()
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    # value: TSC + CNC computed independently with exact SVDs (grouped conv: one matrix per group)
    tsc = sum(((101 * w.abs()) / (100 + w.abs())).sum() for w in (m.weight.detach() for m in layers))
    cnc = 0.0
    for m in layers:
        for mat in fastcnc.as_matrices(m.weight.detach(), getattr(m, "groups", 1)):
            cnc += _exact_cnc(mat).item()
    assert abs(loss.item() - (1e-3 * tsc.item() + 1e-2 * cnc)) < 1e-5 * abs(loss.item())
    assert all(m.weight.grad is not None and torch.isfinite(m.weight.grad).all() for m in layers)
    rep = reg.report()
    assert [r["name"] for r in rep] == ["0", "2", "4", "6"]
    for r, m in zip(rep, layers, strict=True):
        s = torch.linalg.svdvals(m.weight.detach().reshape(m.weight.shape[0], -1)) if r["name"] != "2" else None
        if s is not None:
            assert abs(r["kappa"] - (s[0] / s[-1]).item()) < 1e-6 * r["kappa"]


def test_tscnc_sees_masked_effective_weight_and_state_roundtrip():
    model = nn.Sequential(fastcnc.MaskedLinear(30, 20), nn.ReLU(), fastcnc.MaskedLinear(20, 10)).double()
    mask = (torch.rand(20, 30) > 0.7).double()
    model[0].set_mask(mask)
    reg = fastcnc.TSCNC(model, lambda_tsc=0.0, lambda_cnc=1.0)
    reg().backward()
    assert torch.all(model[0].weight.grad[mask == 0] == 0)  # pruned entries get no gradient
    smax, smin = sigma_extremes_ref(model[0].weight * mask)
    assert abs(reg.report()[0]["kappa"] - smax / smin) < 1e-6 * smax / smin
    sd = reg.state_dict()
    reg2 = fastcnc.TSCNC(model, lambda_tsc=0.0, lambda_cnc=1.0)
    reg2.load_state_dict(sd)
    assert reg2.calls == 1 and reg2.state.matches(reg.state.shapes)
    torch.testing.assert_close(reg2(), reg())  # same warm state -> same value


def test_tscnc_warm_calls_track_kappa_during_training():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 32))
    reg = fastcnc.TSCNC(model, lambda_tsc=0.0, lambda_cnc=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(128, 64)
    for _ in range(20):
        opt.zero_grad()
        loss = model(x).pow(2).mean() + reg()
        loss.backward()
        opt.step()
    reg()
    for r, m in zip(reg.report(), [model[0], model[2]], strict=True):
        smax, smin = sigma_extremes_ref(m.weight)
        assert abs(r["kappa"] / (smax / smin) - 1) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_tscnc_penalty_has_the_loss_precision(dtype):
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).to(dtype)
    p = fastcnc.TSCNC(model, lambda_tsc=1e-3, lambda_cnc=1e-2)()
    assert p.dtype == torch.promote_types(torch.float32, dtype)
    mixed = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3).to(dtype))  # the widest layer decides
    assert fastcnc.TSCNC(mixed, lambda_tsc=1e-3, lambda_cnc=1e-2)().dtype == torch.promote_types(torch.float32, dtype)


def test_tscnc_on_the_meta_device_and_refresh_after_pruning():
    with pytest.raises(ValueError, match="meta device"):
        fastcnc.TSCNC(nn.Linear(4, 3, device="meta"), lambda_tsc=0.0, lambda_cnc=1e-2)()
    model = nn.Sequential(fastcnc.MaskedLinear(40, 30))
    reg = fastcnc.TSCNC(model, lambda_tsc=0.0, lambda_cnc=1e-2)
    reg()
    fastcnc.prune_magnitude(model, 0.5)
    reg.refresh()  # exact for the new masks: the next call need not pay another SVD for them
    fallbacks = reg.work["fallbacks"]
    reg()
    assert reg.work["fallbacks"] == fallbacks


def test_tscnc_rejects_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        fastcnc.TSCNC("resnet")
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        fastcnc.TSCNC(nn.ReLU())
    with pytest.raises(ValueError, match="lambda_cnc"):
        fastcnc.TSCNC(nn.Linear(3, 3), lambda_cnc=-1.0)
    with pytest.raises(ValueError, match="layers"):
        fastcnc.TSCNC(nn.Linear(3, 3), layers=["nope"])
    with pytest.raises(ValueError, match="smooth_min must be <= 0.24"):  # (a bottom block of 8: 0.5 / log 8)
        fastcnc.TSCNC(nn.Linear(3, 3), smooth_min=0.3, block=8)
    with pytest.raises(ValueError, match="kappa_target must be >= 1"):
        fastcnc.TSCNC(nn.Linear(3, 3), cnc="hinge", kappa_target=0.9)
    with pytest.raises(ValueError, match="layers must name at least one"):
        fastcnc.TSCNC(nn.Linear(3, 3), layers=[])
    with pytest.warns(UserWarning, match=r"not: \['0'\]"):
        fastcnc.TSCNC(nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3, 2)))
    with pytest.raises(TypeError, match="weights\\[0\\] must be a dense"):
        fastcnc.cnc_penalty(torch.randn(4, 3).to_sparse())


def test_tscnc_built_before_sparsify_follows_the_masked_layers():
    # TSCNC made on the dense model, then sparsify + pruning (sparsify keeps the Parameters, so the optimizer stays
    # valid): the penalty is the masked model's, and its gradient does not revive pruned weights
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    reg = fastcnc.TSCNC(model, lambda_tsc=1e-3, lambda_cnc=1.0)
    fastcnc.sparsify(model)
    fastcnc.prune_magnitude(model, 0.7)
    fresh = fastcnc.TSCNC(model, lambda_tsc=1e-3, lambda_cnc=1.0)
    torch.testing.assert_close(reg(), fresh(), rtol=1e-12, atol=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruned = [(m.mask == 0) for m in (model[0], model[2])]
    for _ in range(3):
        loss = model(torch.randn(8, 16)).square().mean() + reg()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for m, p in zip((model[0], model[2]), pruned, strict=True):
        assert not m.weight[p].any()
    rows = reg.report()
    assert [r["sparsity"] for r in rows] == [r["sparsity"] for r in fresh.report()]
    assert rows[0]["sparsity"] >= 0.6
    fastcnc.densify(model)  # (and back: the plain layers densify puts in)
    reg()
    assert [layer for _, layer in reg._layers] == [model[0], model[2]]


def test_tscnc_refreshes_exactly_after_a_mask_change():
    torch.manual_seed(3)
    model = nn.Sequential(fastcnc.MaskedLinear(40, 30), nn.ReLU(), fastcnc.MaskedLinear(30, 10)).double()
    reg = fastcnc.TSCNC(model, lambda_tsc=0.0, lambda_cnc=1.0)
    reg()
    reg()
    assert not bool(reg.last_estimate.fallback[0])  # warm call, certified without SVD
    assert bool(reg.last_estimate.certified.all())
    mask = torch.ones(30, 40, dtype=torch.float64)
    mask[7] = 0  # pruning empties a row: sigma_min jumps to 0, far from the tracked vector
    model[0].set_mask(mask)
    reg()
    assert bool(reg.last_estimate.fallback[0])
    assert reg.report()[0]["sigma_min"] < 1e-12


def test_tscnc_report_matches_exact_kappa_along_pruned_training():
    # the training loop's report (reg.report()): estimated kappa_eps == exact within rtol on every layer, certified,
    # through gradual pruning to 95% (structural zeros appear) and fine-tuning
    from fastcnc.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", 10, in_channels=1, width=4)
    pruner = fastcnc.GradualPruner(model, 0.95, start_step=2, end_step=12, frequency=2)
    reg = fastcnc.TSCNC(model, lambda_tsc=1e-5, lambda_cnc=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for step in range(16):
        pruner.step(step)
        loss = torch.nn.functional.cross_entropy(model(x), y) + reg()
        opt.zero_grad()
        loss.backward()
        opt.step()
    reg()
    rows = reg.report()
    assert all(r["certified"] or r["fallback"] for r in rows)
    assert max(r["kappa_rel_err"] for r in rows) <= 1e-2
    assert any(r["kappa_exact"] == math.inf for r in rows) or max(r["sparsity"] for r in rows) >= 0.9
    assert reg.work["fallbacks"] >= len(rows)  # the exact refreshes: first call and every mask change


def test_tscnc_report_describes_the_weights_after_the_optimizer_step():
    # report() straight after opt.step() (the README's loop) estimates the current weights, not the last reg() call's
    # (which came before the step: a 3-step run at lr 0.1 moves kappa_eps by ~5%), and leaves training as it was
    from fastcnc.models import build_model

    torch.manual_seed(1)
    model = build_model("resnet18", 10, in_channels=1, width=8)
    fastcnc.prune_magnitude(model, 0.95)
    reg = fastcnc.TSCNC(model, lambda_tsc=1e-5, lambda_cnc=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y) + reg()
        opt.zero_grad()
        loss.backward()
        opt.step()
    before = copy.deepcopy(reg.state_dict())
    work = dict(reg.work)
    rows = reg.report()
    assert all(r["certified"] for r in rows)
    assert max(r["kappa_rel_err"] for r in rows) <= reg.options.rtol
    assert reg.work == work
    torch.testing.assert_close(reg.state_dict(), before, rtol=0, atol=0)
