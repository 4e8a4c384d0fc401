"""The evaluation route of the training CLI: eval eps apart from training eps, steps that follow eps, the worst-case
row, AutoAttack through pyautoattack equal to the library's own call, HYDRA and the code-form CNC in the loop."""

import json

import pytest
import torch

from fastcnc.cli import main as cli_main
from fastcnc.config import load_config
from fastcnc.evaluate import evaluate_run
from fastcnc.layers import MaskedConv2d, MaskedLinear
from fastcnc.train import fit

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def small(out, **overrides):
    values = {"dataset": "digits", "stem": "cifar", "autoattack": "", "attack_eps": 0.1, "width": 4, "epochs": 3,
              "batch_size": 128, "attack_steps": 2, "eval_pgd_steps": 3, "eval_cw_steps": 3, "eval_max_examples": 48,
              "prune_start_epoch": 1, "prune_end_epoch": 2, "prune_frequency": 2, "checkpoint_every": 0,
              "log_every": 2, "progress": False, "out": str(out)}
    values.update(overrides)
    return load_config("quick", overrides=values)


def test_autoattack_in_the_eval_report_equals_the_library_call(tmp_path):
    pyautoattack = pytest.importorskip("pyautoattack")
    cfg = small(tmp_path / "run", autoattack="apgd", autoattack_max_examples=32)
    result, model, reg = fit(cfg)
    from fastcnc.data import load_dataset

    data = load_dataset("digits")
    x, y = data.x_test[:32], data.y_test[:32]
    # the library, called directly on the same images, at the same eps, with the same settings and seed
    adversary = pyautoattack.AutoAttack(model.eval(), norm="Linf", eps=0.1, version="custom",
                                        attacks=["apgd-ce", "apgd-t"], seed=cfg.seed)
    adversary.apgd.n_restarts, adversary.apgd_targeted.n_restarts = 1, 1
    adversary.apgd_targeted.n_target_classes = 9
    _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=cfg.eval_batch_size)
    library = float((y_adv == y).double().mean())
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["autoattack_acc"] == library == result["autoattack_acc"]
    assert report["autoattack"]["n"] == 32 and report["eval_eps"] == 0.1
    assert report["worst_acc"] <= min(report["autoattack_acc"], report["autoattack"]["worst_builtin_acc"])
    assert "AutoAttack (apgd: apgd-ce + apgd-t; pyautoattack) on the first 32 images" in (
        tmp_path / "run" / "report.md").read_text()


def test_eval_at_another_eps_scales_the_steps_and_says_which_eps(tmp_path, capsys):
    out = tmp_path / "run"
    fit(small(out, checkpoint_every=0))
    capsys.readouterr()
    assert cli_main(["eval", str(out), "--eps", "0.25", "--eval_pgd_steps", "10", "--out", str(tmp_path / "e")]) == 0
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert report["eval_eps"] == 0.25 and report["train_eps"] == 0.1
    assert report["pgd_step_size"] == pytest.approx(2.5 * 0.25 / 10)  # the step follows eps
    assert report["cw_step_size"] == pytest.approx(2.5 * 0.25 / 3)
    text = capsys.readouterr().out
    assert "**Evaluation eps = 0.2500** (train eps = 0.1000)" in text and "train eps=0.1000" in text
    # the worst case counts an image only if every attack failed on it
    assert report["worst_acc"] <= min(report[k] for k in ("clean_acc", "fgsm_acc", "pgd_acc", "cw_acc"))
    # and stronger attacks at 0.25 than at 0.1 cannot leave more images robust
    base = json.loads((out / "report.json").read_text())
    assert report["pgd_acc"] <= base["pgd_acc"] and report["clean_acc"] == base["clean_acc"]
    with pytest.raises(SystemExit):
        cli_main(["eval", str(out), "--step_size", "0.1"])  # a training setting: not an eval option
    assert cli_main(["eval", str(out), "--set", "lr=0.1"]) == 1


def test_eval_with_worst_case_over_a_subset_without_autoattack_is_over_all_images(tmp_path):
    result = evaluate_run(small(tmp_path), _tiny_model(), torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,)))
    assert result["n_worst"] == 20 and "autoattack" not in result


@pytest.mark.parametrize(("x", "y", "error", "match"), [
    (torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64), ValueError, r"x_test must be non-empty"),
    (torch.rand(20, 1, 8, 8), torch.randint(0, 10, (19,)), ValueError, r"y_test must have the same length as x_test"),
    (torch.rand(20, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (20,)), ValueError, r"x_test must hold images .* \[0, 1\]"),
], ids=["empty", "mismatched", "out-of-range"])
def test_eval_rejects_bad_test_data_naming_it(tmp_path, x, y, error, match):
    with pytest.raises(error, match=match):
        evaluate_run(small(tmp_path), _tiny_model(), x, y)


def test_eval_of_a_model_without_masked_layers_reports_its_plain_layers(tmp_path):
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 64, 10))
    with torch.no_grad():
        plain[3].weight[:5] = 0  # rank 5 of 10: singular
    result = evaluate_run(small(tmp_path), plain, torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,)))
    assert [r["name"] for r in result["layers"]] == ["0", "3"]
    assert result["layers"][1]["sparsity"] == 0.5 and result["layers"][1]["kappa"] == "inf"
    # the median is over every layer, a singular one included, and averages the middle two of an even count
    assert result["kappa_median"] == "inf" and result["n_layers_kappa_inf"] == 1
    masked = evaluate_run(small(tmp_path), _tiny_model(), torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,)))
    assert [r["name"] for r in masked["layers"]] == ["0", "3"]
    assert masked["kappa_median"] == pytest.approx(sum(r["kappa"] for r in masked["layers"]) / 2, rel=1e-15)


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(MaskedConv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               MaskedLinear(4 * 64, 10))


def test_hydra_in_the_training_loop(tmp_path):
    cfg = small(tmp_path / "h", prune="hydra", prune_scope="layer", sparsity=0.9, tscnc=True, epochs=3,
                prune_start_epoch=1, prune_end_epoch=2)
    result, model, _ = fit(cfg)
    layers = [m for m in model.modules() if isinstance(m, (MaskedConv2d, MaskedLinear))]
    for m in layers:  # HYDRA keeps exactly the requested fraction in every layer
        assert int(m.mask.sum()) == m.mask.numel() - round(0.9 * m.mask.numel())
        assert torch.all(m.weight[m.mask == 0] == 0) and "forward" not in vars(m)
    assert all(p.requires_grad for p in model.parameters())
    assert result["sparsity"] == pytest.approx(0.9, abs=1e-3)
    records = [json.loads(line) for line in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    # no penalty while the scores are optimised (the weights are frozen), TSCNC again while fine-tuning
    assert any(r["penalty"] is None for r in steps) and steps[-1]["penalty"] is not None
    with pytest.raises(ValueError, match="prune_start_epoch < prune_end_epoch"):
        small(tmp_path, prune="hydra", prune_start_epoch=2, prune_end_epoch=2)


def test_code_form_cnc_is_added_to_the_loss(tmp_path):
    from fastcnc.paper import paper_cnc_penalty

    cfg = small(tmp_path / "p", tscnc=False, lambda_paper_cnc=1e-3, epochs=1, prune="none")
    result, model, reg = fit(cfg)
    assert reg is None
    steps = [json.loads(line) for line in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "step"]
    assert steps and all(r["penalty"] is not None and r["penalty"] > 0 for r in steps)
    assert float(paper_cnc_penalty(model).detach()) > 0
    assert "code-form CNC (reproduction only)" in (tmp_path / "p" / "report.md").read_text()


def test_training_step_follows_eps_and_a_short_step_warns(tmp_path):
    from fastcnc.attacks import StepSizeWarning
    from fastcnc.config import train_step_size

    assert train_step_size(small(tmp_path, attack_eps=0.2, attack_steps=4, step_size=0)) == pytest.approx(0.125)
    assert train_step_size(small(tmp_path, step_size=0.07)) == 0.07
    with pytest.warns(StepSizeWarning):
        fit(small(tmp_path / "w", attack_eps=0.2, attack_steps=2, step_size=0.01, epochs=1, prune="none",
                  tscnc=False, eval_max_examples=8))
