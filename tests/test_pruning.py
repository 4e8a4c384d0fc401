"""prune_magnitude (unstructured / block, global / layer, keep_first_last), GradualPruner, sparsity_report."""

import numpy as np
import pytest
import torch
from torch import nn

from fastcnc import GradualPruner, MaskedConv2d, MaskedLinear, apply_masks, prune_magnitude, sparsify, sparsity_report


def _model():
    return nn.Sequential(MaskedConv2d(3, 8, 3), nn.ReLU(), MaskedConv2d(8, 16, 3, groups=2), nn.Flatten(),
                         MaskedLinear(16 * 4, 40), nn.ReLU(), MaskedLinear(40, 10))


def _layers(model):
    return [m for m in model.modules() if isinstance(m, (MaskedLinear, MaskedConv2d))]


def _zeros(model, layers=None):
    return sum(int((m.mask == 0).sum()) for m in (layers or _layers(model)))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.995])
def test_global_unstructured_exact_count_and_threshold(sparsity):
    model = _model()
    total = sum(m.weight.numel() for m in _layers(model))
    achieved = prune_magnitude(model, sparsity)
    assert _zeros(model) == round(sparsity * total)
    assert achieved == pytest.approx(round(sparsity * total) / total)
    assert all(torch.count_nonzero(m.weight[m.mask == 0]) == 0 for m in _layers(model))  # set_mask zeroed them


def test_global_keeps_largest_magnitudes():
    model = _model()
    before = torch.cat([m.weight.detach().abs().flatten() for m in _layers(model)])
    prune_magnitude(model, 0.6)
    keep = torch.cat([m.mask.flatten() != 0 for m in _layers(model)])
    assert before[keep].min() >= before[~keep].max()


def test_layer_scope_prunes_each_layer():
    model = _model()
    prune_magnitude(model, 0.75, scope="layer")
    for m in _layers(model):
        assert int((m.mask == 0).sum()) == round(0.75 * m.mask.numel())


def test_keep_first_last():
    model = _model()
    prune_magnitude(model, 0.8, keep_first_last=True)
    layers = _layers(model)
    assert layers[0].sparsity == 0 and layers[-1].sparsity == 0
    middle = layers[1:-1]
    assert _zeros(model, middle) == round(0.8 * sum(m.mask.numel() for m in middle))


def test_block_pruning_of_a_pruned_model_counts_its_zeros():
    # zeros inside the tiles it keeps count toward the target: 0.5 unstructured then 0.6 in 4x4 tiles is 0.6 (to
    # within a tile), not 0.76
    torch.manual_seed(0)
    m = sparsify(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)))
    assert prune_magnitude(m, 0.5) == 0.5
    got = prune_magnitude(m, 0.6, block=(4, 4))
    assert 0.6 <= got < 0.6 + 16 / (2 * 64 * 64)
    assert prune_magnitude(m, 0.55, block=(4, 4)) == got  # already past it: nothing more


@pytest.mark.parametrize("block_score", ["l2", "l1"])
def test_block_pruning(block_score):
    model = nn.Sequential(MaskedLinear(70, 45), MaskedConv2d(8, 32, 3))
    layers = _layers(model)
    before = [m.weight.detach().clone().reshape(m.weight.shape[0], -1) for m in layers]
    achieved = prune_magnitude(model, 0.7, block=(16, 8), block_score=block_score)
    total = sum(m.mask.numel() for m in layers)
    assert 0.7 <= achieved < 0.7 + 16 * 8 / total  # whole tiles: overshoot below one tile
    kept_scores, pruned_scores = [], []
    for m, w in zip(layers, before, strict=True):
        mask = m.mask.reshape(m.mask.shape[0], -1)
        for i in range(0, mask.shape[0], 16):
            for j in range(0, mask.shape[1], 8):
                tile, wt = mask[i:i + 16, j:j + 8], w[i:i + 16, j:j + 8]
                assert tile.min() == tile.max()  # a tile is kept or dropped as a whole
                score = wt.pow(2).mean().sqrt() if block_score == "l2" else wt.abs().mean()
                (kept_scores if tile[0, 0] else pruned_scores).append(float(score))
    assert min(kept_scores) >= max(pruned_scores)


def test_pruning_never_revives_and_is_monotone():
    model = _model()
    prune_magnitude(model, 0.5)
    masks = [m.mask.clone() for m in _layers(model)]
    assert prune_magnitude(model, 0.3) == pytest.approx(0.5, abs=1e-3)  # already sparser: nothing changes
    assert all(torch.equal(a, m.mask) for a, m in zip(masks, _layers(model), strict=True))
    prune_magnitude(model, 0.9, block=(4, 4))
    assert all(bool((m.mask <= a).all()) for a, m in zip(masks, _layers(model), strict=True))


def test_bad_arguments():
    model = _model()
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            prune_magnitude(model, bad)
    with pytest.raises(TypeError, match="sparsity must be a number"):
        prune_magnitude(model, "0.5")
    with pytest.raises(ValueError, match="scope must be one of"):
        prune_magnitude(model, 0.5, scope="net")
    with pytest.raises(ValueError, match="block must be None or a pair"):
        prune_magnitude(model, 0.5, block=(0, 4))
    with pytest.raises(ValueError, match="block_score must be one of"):
        prune_magnitude(model, 0.5, block=(4, 4), block_score="linf")
    with pytest.raises(ValueError, match="sparsify"):
        prune_magnitude(nn.Sequential(nn.Linear(2, 2)), 0.5)
    with pytest.raises(ValueError, match="end_step must be >= 11"):
        GradualPruner(model, 0.9, 10, 10, 1)
    with pytest.raises(ValueError, match="frequency must be >= 1"):
        GradualPruner(model, 0.9, 0, 10, 0)
    with pytest.raises(ValueError, match="final_sparsity must be in"):
        GradualPruner(model, 1.0, 0, 10, 1)
    with pytest.raises(ValueError, match="initial_sparsity .* must be <= final_sparsity"):
        GradualPruner(model, 0.5, 0, 10, 1, initial_sparsity=0.6)
    # numpy scalars are numbers like any other
    prune_magnitude(model, np.float32(0.5), block=(np.int64(2), np.int64(2)))
    GradualPruner(model, np.float64(0.9), np.int64(0), 10, 1)


def test_apply_masks_zeroes_what_optimizer_state_revives():
    # momentum from before a pruning event keeps moving the stored pruned weights (the forward masks them anyway)
    torch.manual_seed(0)
    model = nn.Sequential(MaskedLinear(16, 16), nn.ReLU(), MaskedLinear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = GradualPruner(model, final_sparsity=0.9, start_step=2, end_step=4, frequency=1)
    revived = []
    for step in range(6):
        loss = model(torch.randn(8, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        revived.append(int((model[0].weight[model[0].mask == 0] != 0).sum()))
        apply_masks(model)
        pruner.step(step)
        assert not model[0].weight[model[0].mask == 0].any()
    assert max(revived) > 0  # without apply_masks the stored weights would come back


def test_gradual_schedule_and_steps():
    model = _model()
    total = sum(m.mask.numel() for m in _layers(model))
    pruner = GradualPruner(model, 0.9, start_step=10, end_step=50, frequency=10, initial_sparsity=0.1)
    for t in (0, 10, 25, 50, 80):
        tc = min(max(t, 10), 50)
        assert pruner.sparsity_at(t) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - (tc - 10) / 40) ** 3)
    applied = {}
    prev = 0
    for step in range(0, 61):
        s = pruner.step(step)
        if s is not None:
            applied[step] = s
        assert _zeros(model) >= prev  # masks only shrink
        prev = _zeros(model)
    assert sorted(applied) == [10, 20, 30, 40, 50]
    assert applied[10] == pytest.approx(0.1) and applied[50] == pytest.approx(0.9)
    assert _zeros(model) == round(0.9 * total)


def test_gradual_final_step_when_end_is_off_grid():
    model = _model()
    pruner = GradualPruner(model, 0.8, start_step=0, end_step=25, frequency=10)
    steps = [s for s in range(0, 40, 7) if pruner.step(s) is not None]
    assert steps == [0, 14, 21, 28]  # first call in windows [0,10), [10,20), [20,25); 28 is the first past the end
    assert sparsity_report(model)[-1]["sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_gradual_state_dict_round_trip():
    model_a, model_b = _model(), _model()
    model_b.load_state_dict(model_a.state_dict())
    kw = dict(start_step=0, end_step=40, frequency=5, block=(4, 4), scope="layer")
    pa = GradualPruner(model_a, 0.9, **kw)
    for s in range(0, 21):
        pa.step(s)
    state = pa.state_dict()
    model_b.load_state_dict(model_a.state_dict())
    pb = GradualPruner(model_b, 0.5, start_step=0, end_step=10, frequency=1)
    pb.load_state_dict(state)
    assert pb.state_dict() == state
    for s in range(21, 45):
        assert pa.step(s) == pb.step(s)
    for a, b in zip(_layers(model_a), _layers(model_b), strict=True):
        assert torch.equal(a.mask, b.mask)
    with pytest.raises(KeyError, match="missing"):
        pb.load_state_dict({"final_sparsity": 0.5})


def test_sparsity_report():
    model = sparsify(nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 5)))
    model[0].set_mask(torch.arange(200).reshape(20, 10) % 4 == 0)
    rows = sparsity_report(model)
    assert [r["name"] for r in rows] == ["0", "1", "total"]
    assert rows[0] == {"name": "0", "shape": (20, 10), "numel": 200, "nonzero": 50, "sparsity": 0.75}
    assert rows[1]["sparsity"] == 0 and rows[1]["nonzero"] == 100
    assert rows[2] == {"name": "total", "shape": None, "numel": 300, "nonzero": 150, "sparsity": 0.5}
