"""HYDRA score-based pruning: exact kept fraction, gradients reach the scores, the fine-tune mask stays fixed."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcnc.hydra import HydraPruner, topk_mask
from fastcnc.layers import MaskedConv2d, MaskedLinear


def _net():
    torch.manual_seed(0)
    return nn.Sequential(MaskedConv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), MaskedLinear(6 * 5 * 5, 7),
                         nn.ReLU(), MaskedLinear(7, 3))


def test_topk_mask_is_binary_exact_and_straight_through():
    scores = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    mask = topk_mask(scores, 12)
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and int(mask.sum()) == 12
    assert float(scores.detach()[mask.bool()].min()) >= float(scores.detach()[~mask.bool()].max())
    upstream = torch.randn(5, 7, dtype=torch.float64)
    (mask * upstream).sum().backward()
    assert torch.equal(scores.grad, upstream)  # identity backward
    with pytest.raises(ValueError, match="n_keep"):
        topk_mask(scores, 36)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_masks_keep_exactly_the_requested_fraction(scope, sparsity):
    model = _net()
    pruner = HydraPruner(model, sparsity, scope=scope)
    pruner.begin_scoring()
    pruner.end_scoring()
    layers = [m for m in model.modules() if isinstance(m, (MaskedConv2d, MaskedLinear))]
    if scope == "layer":
        for m in layers:
            assert int(m.mask.sum()) == m.mask.numel() - round(sparsity * m.mask.numel())
    else:
        total = sum(m.mask.numel() for m in layers)
        assert sum(int(m.mask.sum()) for m in layers) == total - round(sparsity * total)


def test_initial_mask_is_the_magnitude_mask():
    model = _net()
    pruner = HydraPruner(model, 0.8)
    for (_, layer), mask in zip(pruner._layers, pruner.masks(), strict=True):
        w = layer.weight.detach().abs().flatten()
        n_keep = w.numel() - round(0.8 * w.numel())
        expected = torch.zeros_like(w)
        expected[torch.topk(w, n_keep).indices] = 1
        assert torch.equal(mask.flatten(), expected)


def test_scores_get_gradients_and_weights_are_frozen_while_scoring():
    model = _net()
    pruner = HydraPruner(model, 0.7)
    x, y = torch.rand(8, 1, 5, 5), torch.randint(0, 3, (8,))
    params = pruner.begin_scoring()
    assert all(not p.requires_grad for p in model.parameters())
    F.cross_entropy(model(x), y).backward()
    for s, (_, layer) in zip(params, pruner._layers, strict=True):
        assert s.grad is not None and s.grad.abs().sum() > 0
        assert layer.weight.grad is None
    # the straight-through gradient through |s|: d loss / d s = d loss / d W_eff * W * sign(s) (float64, by hand)
    model64 = _net().double()
    pruner64 = HydraPruner(model64, 0.7)
    pruner64.begin_scoring()
    F.cross_entropy(model64(x.double()), y).backward()
    conv = pruner64._layers[0][1]
    mask = pruner64.masks()[0].detach()
    w_eff = (conv.weight.detach() * mask).requires_grad_(True)
    rest = nn.Sequential(*list(model64)[1:])
    F.cross_entropy(rest(F.conv2d(x.double(), w_eff, conv.bias.detach(), padding=1)), y).backward()
    expected = w_eff.grad * conv.weight.detach() * pruner64.scores[0].detach().sign()
    torch.testing.assert_close(pruner64.scores[0].grad, expected)


def test_forward_while_scoring_uses_the_topk_mask_and_end_restores_the_layers():
    model = _net()
    x = torch.rand(4, 1, 5, 5)
    pruner = HydraPruner(model, 0.6)
    pruner.begin_scoring()
    with torch.no_grad():
        for s in pruner.scores:
            s.add_(torch.randn_like(s))  # move the scores away from the magnitude order
        scored = model(x)
    masks = [m.detach().clone() for m in pruner.masks()]
    pruner.end_scoring()
    for (_, layer), mask in zip(pruner._layers, masks, strict=True):
        assert torch.equal(layer.mask, mask) and "forward" not in vars(layer)
    with torch.no_grad():
        torch.testing.assert_close(model(x), scored)
    assert all(p.requires_grad for p in model.parameters())


def test_fine_tuning_keeps_the_mask_fixed():
    model = _net()
    pruner = HydraPruner(model, 0.9)
    opt = torch.optim.SGD(pruner.begin_scoring(), lr=0.5)
    x, y = torch.rand(16, 1, 5, 5), torch.randint(0, 3, (16,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    pruner.end_scoring()
    masks = [layer.mask.clone() for _, layer in pruner._layers]
    weights = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    for _ in range(5):
        weights.zero_grad()
        F.cross_entropy(model(x), y).backward()
        weights.step()
        for _, layer in pruner._layers:
            layer.weight.data.mul_(layer.mask)
    for (_, layer), mask in zip(pruner._layers, masks, strict=True):
        assert torch.equal(layer.mask, mask)
        assert torch.all(layer.weight[mask == 0] == 0)


def test_state_dict_round_trip_mid_scoring():
    model = _net()
    pruner = HydraPruner(model, 0.5)
    pruner.begin_scoring()
    with torch.no_grad():
        pruner.scores[0].mul_(-3)
    state = pruner.state_dict()
    other = HydraPruner(model, 0.5)
    pruner.end_scoring()
    other.load_state_dict(state)
    assert other.scoring and torch.equal(other.scores[0], state["scores.0"])
    other.end_scoring()


def test_bad_arguments():
    with pytest.raises(ValueError, match="sparsity"):
        HydraPruner(_net(), 1.0)
    with pytest.raises(ValueError, match="scope"):
        HydraPruner(_net(), 0.5, scope="block")
    with pytest.raises(ValueError, match="sparsify"):
        HydraPruner(nn.Sequential(nn.Linear(3, 3)), 0.5)
    pruner = HydraPruner(_net(), 0.5)
    with pytest.raises(RuntimeError, match="without begin_scoring"):
        pruner.end_scoring()


def test_schedule_runs_the_three_stages_and_learns_scores():
    from fastcnc.hydra import HydraSchedule

    model = _net()
    pruner = HydraPruner(model, 0.8)
    schedule = HydraSchedule(pruner, 2, 5, lr=0.1)
    weights = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(16, 1, 5, 5), torch.randint(0, 3, (16,))
    stages, score_history = [], []
    for step in range(8):
        schedule.step(step)
        stages.append(schedule.stage(step))
        weights.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        weights.step()
        schedule.optimizer_step()
        score_history.append(pruner.scores[0].detach().clone())
        if step == 3:
            mid_state = copy.deepcopy(schedule.state_dict())
            assert all(not p.requires_grad for p in model.parameters())
    assert stages == ["pretrain"] * 2 + ["score"] * 3 + ["finetune"] * 3
    assert torch.equal(score_history[0], score_history[1])  # not trained while pre-training
    assert not torch.equal(score_history[2], score_history[4])  # trained while scoring
    assert torch.equal(score_history[5], score_history[7])  # frozen while fine-tuning
    for _, layer in pruner._layers:
        assert int(layer.mask.sum()) == layer.mask.numel() - round(0.8 * layer.mask.numel())
    assert all(p.requires_grad for p in model.parameters()) and schedule.done
    # a resumed schedule in the middle of the score stage continues scoring from the saved scores
    other_model = _net()
    other = HydraSchedule(HydraPruner(other_model, 0.8), 2, 5)
    other.load_state_dict(mid_state)
    assert other.scoring and torch.equal(other.pruner.scores[0], mid_state["pruner"]["scores.0"])
    other.step(4)
    assert other.scoring
    other.step(5)
    assert not other.scoring and other.done


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_model_copied_or_pickled_while_scoring_computes_with_its_own_weights_and_scores(scope):
    import io

    model = _net()
    pruner = HydraPruner(model, 0.7, scope=scope)
    pruner.begin_scoring()
    x = torch.randn(4, 1, 5, 5)
    before = model(x).detach()
    clone = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():  # the original changes; its copies must not follow
        for p in model.parameters():
            p.mul_(-3.0)
        for s in pruner.scores:
            s.copy_(torch.randn_like(s))
    assert not torch.allclose(model(x), before)
    for other in (clone, loaded):
        assert torch.equal(other(x), before)
        # the copy's scores are its own parameters: they get the gradient, the original's do not
        copied = next(m for m in other.modules() if isinstance(m, MaskedLinear)).forward.pruner
        other(x).sum().backward()
        assert all(s.grad is not None for s in copied.scores)
        assert all(s.grad is None for s in pruner.scores)
        copied.end_scoring()  # the copy leaves the stage on its own
        assert "forward" not in vars(next(m for m in other.modules() if isinstance(m, MaskedLinear)))
    assert pruner.scoring
