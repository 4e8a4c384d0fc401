"""MaskedLinear / MaskedConv2d: forward/backward vs float64 F.linear/F.conv2d on W*M, masks, state_dict,
sparsify/densify (including models pruned with torch.nn.utils.prune)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import fastcnc
from fastcnc import MaskedConv2d, MaskedLinear, densify, prune_magnitude, sparsify

ATOL, RTOL = 2e-5, 1e-5


def _random_mask(shape, p_keep=0.4):
    return torch.rand(shape) < p_keep


LAYERS = [
    pytest.param(lambda: MaskedLinear(19, 11), (7, 19), id="linear"),
    pytest.param(lambda: MaskedLinear(16, 33, bias=False), (2, 3, 16), id="linear-nobias-3d"),
    pytest.param(lambda: MaskedConv2d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 7, 9), id="conv-groups"),
    pytest.param(lambda: MaskedConv2d(3, 5, (3, 2), dilation=(2, 1), padding=(2, 0), bias=False), (1, 3, 8, 6),
                 id="conv-dilation-nobias"),
    pytest.param(lambda: MaskedConv2d(3, 4, 3, padding="same"), (2, 3, 5, 5), id="conv-same"),
    pytest.param(lambda: MaskedConv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 5, 5), id="conv-reflect"),
]


@pytest.mark.parametrize("make, x_shape", LAYERS)
def test_layer_matches_reference(backend, make, x_shape):
    layer = make()
    mask = _random_mask(layer.weight.shape)
    layer.set_mask(mask)
    x = torch.randn(x_shape, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)

    ref = make().double()
    ref.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    x64 = x.detach().double().requires_grad_(True)
    w_eff = ref.weight * ref.mask
    if isinstance(ref, nn.Linear):
        y_ref = F.linear(x64, w_eff, ref.bias)
    else:
        y_ref = ref._conv_forward(x64, w_eff, ref.bias)
    y_ref.backward(grad.double())
    torch.testing.assert_close(y.double(), y_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(layer.weight.grad.double(), ref.weight.grad, atol=ATOL, rtol=RTOL)
    if layer.bias is not None:
        torch.testing.assert_close(layer.bias.grad.double(), ref.bias.grad, atol=ATOL, rtol=RTOL)
    assert torch.count_nonzero(layer.weight.grad[~mask]) == 0


def test_set_mask_zeroes_weights_and_sparsity():
    layer = MaskedLinear(10, 8)
    mask = _random_mask(layer.weight.shape)
    layer.set_mask(mask)
    assert torch.count_nonzero(layer.weight[~mask]) == 0
    assert layer.mask.dtype == layer.weight.dtype and torch.equal(layer.mask, mask.float())
    assert layer.sparsity == pytest.approx(1 - mask.float().mean().item())
    torch.testing.assert_close(layer.effective_weight(), layer.weight * mask)
    layer.set_mask(torch.ones(8, 10, dtype=torch.int64))  # integer masks are fine
    assert layer.sparsity == 0


def test_set_mask_bad_input():
    layer = MaskedConv2d(2, 3, 3)
    with pytest.raises(ValueError, match=r"mask must have the weight's shape \(3, 2, 3, 3\)"):
        layer.set_mask(torch.ones(3, 2, 3))
    with pytest.raises(ValueError, match="device"):
        layer.set_mask(torch.ones(3, 2, 3, 3, device="meta"))
    with pytest.raises(TypeError, match="dtype"):
        layer.set_mask(torch.ones(3, 2, 3, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="binary"):
        layer.set_mask(torch.full((3, 2, 3, 3), 2.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer.set_mask(None)
    assert layer.sparsity == 0  # failed calls left the mask alone


def test_masked_training_keeps_pruned_weights_zero():
    torch.manual_seed(1)
    model = nn.Sequential(MaskedConv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), MaskedLinear(4 * 25, 5))
    for m in (model[0], model[3]):
        m.set_mask(_random_mask(m.weight.shape, 0.3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 3, 5, 5)), torch.randint(0, 5, (8,))).backward()
        opt.step()
    for m in (model[0], model[3]):
        assert torch.count_nonzero(m.weight[m.mask == 0]) == 0


def test_state_dict_round_trip():
    a = MaskedConv2d(4, 6, 3, padding=1, groups=2)
    a.set_mask(_random_mask(a.weight.shape))
    sd = a.state_dict()
    assert set(sd) == {"weight", "bias", "mask"}
    b = MaskedConv2d(4, 6, 3, padding=1, groups=2)
    b.load_state_dict(sd)
    assert torch.equal(b.mask, a.mask) and torch.equal(b.weight, a.weight)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(b(x), a(x))


def test_sparsify_replaces_every_slot_of_a_shared_module():
    shared = nn.Linear(8, 8)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    sparsify(net)
    assert isinstance(net[0], MaskedLinear) and net[0] is net[2]
    prune_magnitude(net, 0.5)
    net(torch.randn(4, 8)).sum().backward()
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert float((net[0].weight == 0).float().mean()) == 0.5  # the pruned weights stay pruned
    densify(net)
    assert type(net[0]) is nn.Linear and net[0] is net[2]


@pytest.mark.parametrize("wrap", ["forward-hook", "old-weight-norm", "parametrized-weight-norm"])
def test_sparsify_refuses_modules_whose_hooks_or_parametrizations_it_would_drop(wrap):
    m = nn.Linear(3, 3)
    if wrap == "forward-hook":
        m.register_forward_hook(lambda *args: None)
    elif wrap == "old-weight-norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            m = torch.nn.utils.weight_norm(m)
    else:
        m = torch.nn.utils.parametrizations.weight_norm(m)
    net = nn.Sequential(nn.Linear(3, 3), m)
    with pytest.raises(ValueError, match="sparsify: module '1' has (hooks|parametrizations)"):
        sparsify(net)
    assert type(net[0]) is nn.Linear  # nothing was changed


def test_load_state_dict_checks_the_mask_and_zeroes_pruned_weights():
    a = MaskedLinear(6, 4)
    sd = {k: v.clone() for k, v in a.state_dict().items()}
    sd["mask"] = torch.full_like(sd["mask"], 0.5)
    with pytest.raises(RuntimeError, match="mask must be binary"):
        a.load_state_dict(sd)
    sd["mask"] = (torch.arange(24).reshape(4, 6) % 3 != 0).float()  # weights saved without the mask applied
    a.load_state_dict(sd)
    assert not a.weight[sd["mask"] == 0].any() and torch.equal(a.weight[sd["mask"] == 1], sd["weight"][sd["mask"] == 1])


def test_non_finite_pruned_weights_become_zero_and_loads_never_write_the_callers_tensor():
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    layer = MaskedLinear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight[0, 1] = float("inf")
    layer.set_mask(mask)  # weight * mask would leave inf * 0 = NaN there
    assert torch.equal(layer.weight[mask == 0], torch.zeros(2))
    loaded = MaskedLinear(3, 2, bias=False)
    sd = {"weight": torch.tensor([[1.0, float("nan"), 1.0], [1.0, 1.0, float("inf")]]), "mask": mask}
    loaded.load_state_dict(sd)
    assert torch.equal(loaded(torch.ones(1, 3)), torch.tensor([[2.0, 2.0]]))
    assigned = MaskedLinear(3, 2, bias=False)
    sd = {"weight": torch.ones(2, 3), "mask": mask}
    assigned.load_state_dict(sd, assign=True)
    assert torch.equal(sd["weight"], torch.ones(2, 3)) and torch.equal(assigned.weight.detach(), mask)
    # a plain layer's state dict (no mask) under strict=False keeps the layer's mask and zeroes what it prunes
    pruned = MaskedLinear(5, 3)
    pruned.set_mask(torch.arange(15).reshape(3, 5) % 2 == 0)
    missing = pruned.load_state_dict(nn.Linear(5, 3).state_dict(), strict=False).missing_keys
    assert missing == ["mask"] and not pruned.weight[pruned.mask == 0].any()


def test_tile_table_cache_follows_mask():
    layer = MaskedLinear(64, 64)
    t1 = layer.tile_table()
    assert layer.tile_table() is t1  # cached
    other = MaskedLinear(64, 64)
    m = torch.zeros(64, 64)
    m[:16, :16] = 1
    other.set_mask(m)
    layer.load_state_dict(other.state_dict())  # copy_ into the buffer bumps its version: cache invalidated
    t2 = layer.tile_table()
    assert t2 is not t1 and int(t2.nonzero.sum()) == 1 and t2.block == 16


def test_sparsify_densify_round_trip():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 3, groups=2, bias=False), nn.ReLU()),
        nn.Flatten(), nn.Linear(4 * 9, 6), nn.Linear(6, 2),
    ).eval()
    x = torch.randn(2, 3, 5, 5)
    y0 = model(x)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    sparsify(model)
    kinds = [type(m) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert kinds == [MaskedConv2d, MaskedConv2d, MaskedLinear, MaskedLinear]
    masked = [m for m in model.modules() if isinstance(m, (MaskedLinear, MaskedConv2d))]
    assert all(m.weight is w for m, w in zip(masked, weights, strict=True))  # same Parameters: optimizers stay valid
    assert not model.training and all(not m.training for m in masked)
    torch.testing.assert_close(model(x), y0)

    fastcnc.prune_magnitude(model, 0.7)
    y1 = model(x)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    densify(model)
    plain = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert [type(m) for m in plain] == [nn.Conv2d, nn.Conv2d, nn.Linear, nn.Linear]
    torch.testing.assert_close(model(x), y1)
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            torch.testing.assert_close(m.weight, sd[f"{name}.weight"] * sd[f"{name}.mask"])
    assert not any(k.endswith("mask") for k in model.state_dict())


def test_sparsify_takes_over_torch_prune():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4, 4))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    prune.random_unstructured(model[2], "weight", amount=0.3)
    prune.l1_unstructured(model[2], "bias", amount=0.5)
    masks = [model[0].weight_mask.clone(), model[2].weight_mask.clone()]
    x = torch.randn(2, 2, 4, 4)
    y0 = model(x)
    sparsify(model)
    for m, mask in zip((model[0], model[2]), masks, strict=True):
        assert isinstance(m, (MaskedLinear, MaskedConv2d))
        assert torch.equal(m.mask, mask)
        assert not hasattr(m, "weight_orig") and not hasattr(m, "weight_mask") and not m._forward_pre_hooks
    assert not hasattr(model[2], "bias_orig")
    torch.testing.assert_close(model(x), y0)
    densify(model)
    torch.testing.assert_close(model(x), y0)


def test_sparsify_root_layer_and_skips_attention():
    lin = nn.Linear(3, 2)
    out = sparsify(lin)
    assert isinstance(out, MaskedLinear) and out.weight is lin.weight
    assert isinstance(densify(out), nn.Linear)
    attn = nn.MultiheadAttention(8, 2)
    sparsify(attn)
    # out_proj is used through its raw weight by the attention op: a mask there would be ignored, so it is left alone
    assert type(attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        sparsify("not a model")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        densify(None)


@pytest.mark.interpret
@pytest.mark.parametrize("make, x_shape", LAYERS[:4])
def test_triton_path_equals_torch_path(make, x_shape):
    """The same layer and input through both backends: outputs and gradients agree to fp32 rounding."""
    from fastcnc import _backend

    layer = make()
    layer.set_mask(_random_mask(layer.weight.shape))
    x = torch.randn(x_shape)
    results = []
    for name in ("torch", "triton"):
        _backend.force_backend(name)
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), xi.grad, layer.weight.grad.clone()))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.interpret
@pytest.mark.parametrize("make, x_shape", [(lambda: MaskedLinear(48, 40), (3, 48)),
                                           (lambda: MaskedConv2d(4, 6, 3, padding=1, groups=2), (2, 4, 7, 7))])
def test_full_mask_computes_like_the_dense_layer_without_the_mask_product(make, x_shape):
    """On the CUDA dispatch rule a layer whose own tile table says every weight is kept computes with its weight as
    is: the same outputs and gradients as the dense layer, bit for bit, and no product with the mask either way; one
    pruned weight brings the product back (the table follows the mask's version)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastcnc import _backend

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    layer = make()
    dense = layer.to_dense()
    x = torch.randn(x_shape)
    runs = []
    with _backend.cuda_code_path():
        assert layer.tile_table().full
        for net in (layer, dense):
            net.zero_grad()
            xi = x.clone().requires_grad_(True)
            with Ops() as ops:
                y = net(xi)
                y.backward(torch.ones_like(y))
            runs.append((y, xi.grad, net.weight.grad, ops.names))
        assert "mul" not in runs[0][3]
        for a, b in zip(runs[0][:3], runs[1][:3], strict=True):
            assert torch.equal(a, b)
        with torch.no_grad():
            layer.mask.view(-1)[0] = 0  # in place: a new version, a new table
        assert not layer.tile_table().full
        with Ops() as ops:
            layer(x)
        assert "mul" in ops.names


@pytest.mark.interpret
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
@pytest.mark.parametrize("make, x_shape", [(lambda: MaskedLinear(48, 40), (3, 48)),
                                           (lambda: MaskedConv2d(4, 6, 3, padding=1, groups=2), (2, 4, 7, 7)),
                                           (lambda: MaskedConv2d(4, 6, 3, padding="same"), (2, 4, 7, 7)),
                                           (lambda: MaskedConv2d(4, 6, 3, padding=1, padding_mode="reflect"),
                                            (2, 4, 7, 7))])
def test_dense_route_is_the_functional_s_dense_fallback(make, x_shape, autocast, monkeypatch):
    """Under the CUDA dispatch rule a mask with most tiles nonzero computes densely on W * M; the layer takes that
    route itself (no pass through the functional's argument checks): outputs and gradients bit for bit those of the
    functional's dense fallback, under autocast too. With a block-sparse mask the layer goes to the kernels only once
    ``CUDA_KERNELS`` is set."""
    from fastcnc import _backend, masked

    torch.manual_seed(0)
    layer = make()
    layer.set_mask(_random_mask(layer.weight.shape))
    x = torch.randn(x_shape)

    def run(forward):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = forward(xi)
        y.float().sum().backward()
        return y, xi.grad, layer.weight.grad.clone()

    def functional(xi):
        if isinstance(layer, MaskedLinear):
            return masked.masked_linear(xi, layer.weight, layer.mask, layer.bias)
        if layer.padding_mode != "zeros":  # (not the functional's: nn.Conv2d pads first)
            return layer._conv_forward(xi, layer.weight * layer.mask, layer.bias)
        return masked.masked_conv2d(xi, layer.weight, layer.mask, layer.bias, layer.stride, layer.padding,
                                    layer.dilation, layer.groups)

    with _backend.cuda_code_path():
        assert layer.tile_table().density > masked.DENSE_FALLBACK_TILE_DENSITY
        want = run(functional)
        entered = []
        for name in ("masked_linear", "masked_conv2d"):
            monkeypatch.setattr(masked, name, lambda *a, **k: entered.append(1))
        got = run(layer)
        assert not entered
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
        if getattr(layer, "padding_mode", "zeros") == "zeros" and not isinstance(getattr(layer, "padding", 0), str):
            block = torch.zeros_like(layer.mask)
            block.view(block.shape[0], -1)[:2, :2] = 1  # one nonzero tile: the kernels' route, once they are on
            layer.set_mask(block)
            layer(x)
            assert not entered  # CUDA_KERNELS is off by default: dense whatever the mask
            monkeypatch.setattr(masked, "CUDA_KERNELS", True)
            layer(x)
            assert entered
