"""The AutoAttack route: fastcnc's numbers are the pyautoattack library's numbers (same images, eps, settings)."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from fastcnc.autoattack import autoattack_accuracy, build_autoattack, import_autoattack

pyautoattack = pytest.importorskip("pyautoattack", reason="optional extra: pip install 'fastcnc[autoattack]'")


def _tiny_trained_model():
    from fastcnc.data import load_dataset

    torch.manual_seed(0)
    data = load_dataset("digits")
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(model(data.x_train), data.y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), data.x_test[:48], data.y_test[:48]


@pytest.mark.parametrize("version", ["apgd", "standard"])
def test_autoattack_route_equals_the_library_call(version, one_intra_op_thread):
    model, x, y = _tiny_trained_model()
    eps = 0.1
    ours = autoattack_accuracy(model, x, y, eps=eps, version=version, seed=0)
    # the library, called directly as its README shows, with the same settings
    if version == "standard":
        adversary = pyautoattack.AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=0)
    else:
        adversary = pyautoattack.AutoAttack(model, norm="Linf", eps=eps, version="custom",
                                            attacks=["apgd-ce", "apgd-t"], seed=0)
        adversary.apgd.n_restarts, adversary.apgd_targeted.n_restarts = 1, 1
        adversary.apgd_targeted.n_target_classes = 9
    x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=250)
    library_acc = float((y_adv == y).double().mean())
    with torch.no_grad():
        assert float((model(x_adv).argmax(1) == y).double().mean()) == library_acc
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert ours["robust_acc"] == library_acc
    assert torch.equal(ours["robust"], y_adv == y)
    clean = float((model(x).argmax(1) == y).double().mean())
    assert ours["robust_acc"] < clean  # eps 0.1 is large for this model: the attack must bite
    assert ours["attacks"] == (["apgd-ce", "apgd-t", "fab-t", "square"] if version == "standard"
                               else ["apgd-ce", "apgd-t"])
    assert ours["after_attack"][ours["attacks"][-1]] == pytest.approx(library_acc, abs=1e-4)


def test_autoattack_restores_training_mode_and_checks_arguments():
    model, x, y = _tiny_trained_model()
    model.train()
    with pytest.raises(ValueError, match="version"):
        autoattack_accuracy(model, x, y, eps=0.1, version="plus")
    with pytest.raises(ValueError, match="same length"):
        autoattack_accuracy(model, x, y[:3], eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        build_autoattack(model, eps=-0.1)
    # the same input checks as fastcnc.attacks; empty data used to report robust_acc 0.0
    with pytest.raises(ValueError, match=r"x must be non-empty"):
        autoattack_accuracy(model, x[:0], y[:0], eps=0.1)
    with pytest.raises(ValueError, match=r"x must hold images with values in \[0, 1\]"):
        autoattack_accuracy(model, x * 2 - 1, y, eps=0.1)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor"):
        autoattack_accuracy(model, (x * 255).to(torch.uint8), y, eps=0.1)
    with pytest.raises(TypeError, match=r"y must be torch.int64 class labels"):
        autoattack_accuracy(model, x, y.int(), eps=0.1)
    with pytest.raises(ValueError, match=r"batch_size must be >= 1"):
        autoattack_accuracy(model, x, y, eps=0.1, batch_size=0)
    autoattack_accuracy(model, x[:4], y[:4], eps=0.01, version="apgd")
    assert model.training


def test_missing_pyautoattack_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # makes `import pyautoattack` raise ImportError
    with pytest.raises(ImportError, match=r"fastcnc\[autoattack\]"):
        import_autoattack()


def test_pyautoattack_does_not_import_torchvision():
    code = ("import sys; from pyautoattack import AutoAttack; import fastcnc.autoattack; "
            "sys.exit(1 if 'torchvision' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
