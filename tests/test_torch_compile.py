"""torch.compile of a training step with masked layers and TSCNC: the same values and gradients as eager."""

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import fastcnc
from fastcnc.layers import MaskedConv2d, MaskedLinear


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(MaskedConv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), MaskedLinear(8 * 6 * 6, 5))
    fastcnc.prune_magnitude(model, 0.5)
    return model, fastcnc.TSCNC(model, lambda_tsc=1e-3, lambda_cnc=1e-2)


def test_compiled_steps_match_eager_and_the_regulariser_runs_eagerly():
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    runs = []
    torch._dynamo.reset()
    counters.clear()
    for compiled in (False, True):
        model, reg = _setup()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def loss_fn(model=model, reg=reg):
            return F.cross_entropy(model(x), y) + reg()

        step = torch.compile(loss_fn) if compiled else loss_fn
        losses = []
        for _ in range(3):
            loss = step()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
        runs.append((losses, [p.detach().clone() for p in model.parameters()], model, reg))
    (eager_l, eager_p, *_), (comp_l, comp_p, model, reg) = runs
    torch.testing.assert_close(comp_l, eager_l, rtol=1e-5, atol=0)
    for a, b in zip(comp_p, eager_p, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for m in model.modules():  # pruned weights stayed pruned through the compiled steps
        if isinstance(m, (MaskedConv2d, MaskedLinear)):
            assert bool((m.weight[m.mask == 0] == 0).all())
    assert reg.calls == 3 and all(row["certified"] for row in reg.report())
    # the model's graph and the loss around it; traced, the engine alone made 24 graphs and 26 breaks
    assert counters["stats"]["unique_graphs"] <= 3
