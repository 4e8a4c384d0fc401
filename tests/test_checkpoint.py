import pickle
import random

import numpy as np
import pytest
import torch

from fastcnc.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state


def test_roundtrip_and_no_temporary_files_left(tmp_path):
    state = {"model": {"w": torch.randn(3, 4)}, "step": 7, "config": {"lr": 0.1, "adv": "pgd", "tscnc": True},
             "block": (4, 4), "nothing": None}
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, state)
    save_checkpoint(path, {**state, "step": 8})  # replaces the old one
    loaded = load_checkpoint(path)
    assert loaded["step"] == 8 and loaded["config"] == state["config"] and loaded["block"] == (4, 4)
    torch.testing.assert_close(loaded["model"]["w"], state["model"]["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    path = tmp_path / "checkpoint.pt"
    stale = tmp_path / ".checkpoint.pt.abc123.tmp"  # what mkstemp names it; a kill -9 before os.replace leaves it
    stale.write_bytes(b"partial")
    other = tmp_path / ".other.pt.abc123.tmp"  # another path's writer: not ours to delete
    other.write_bytes(b"partial")
    save_checkpoint(path, {"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.abc123.tmp", "checkpoint.pt"]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint(path, {"step": 2, "bad": Unpicklable()})
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.randn(100, 100)}, "step": 3})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable fastcnc checkpoint"):
        load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["plain-torch-dict", "random-bytes", "python-pickle", "tensor"])
def test_foreign_files_are_refused(tmp_path, kind):
    path = tmp_path / "foreign.pt"
    if kind == "plain-torch-dict":
        torch.save({"state_dict": {"w": torch.ones(2)}}, path)
        match = "not a fastcnc checkpoint"
    elif kind == "tensor":
        torch.save(torch.ones(3), path)
        match = "not a fastcnc checkpoint"
    elif kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(1000))
        match = "not a readable fastcnc checkpoint"
    else:  # an arbitrary pickle must not be executed: weights_only loading refuses it
        path.write_bytes(pickle.dumps(random.Random()))
        match = "not a readable fastcnc checkpoint"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_missing_checkpoint_and_wrong_version(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"format": "fastcnc-checkpoint", "version": 99}, tmp_path / "v99.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path / "v99.pt")


def test_rng_state_survives_a_checkpoint(tmp_path):
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    np.random.normal()  # leave a cached gaussian in numpy's state
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state()})
    expected = (torch.rand(5), np.random.rand(5), np.random.normal(), [random.random() for _ in range(5)])
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (torch.rand(5), np.random.rand(5), np.random.normal(), [random.random() for _ in range(5)])
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]
