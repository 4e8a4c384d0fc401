"""DistributedDataParallel on CPU: 2 processes on the gloo backend run the whole loop (PGD or TRADES, gradual pruning,
TSCNC) and must end with identical weights, masks and regulariser state on both ranks."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

from fastcnc.checkpoint import load_checkpoint
from fastcnc.config import load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str, adv: str) -> None:
    import os

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from fastcnc.train import fit

    cfg = load_config("quick", overrides={
        "dataset": "digits", "stem": "cifar", "autoattack": "",
        "width": 4, "epochs": 2, "batch_size": 128, "attack_steps": 2, "adv": adv, "prune_start_epoch": 0.5,
        "prune_end_epoch": 1.5, "prune_frequency": 2, "eval_pgd_steps": 2, "eval_cw_steps": 2,
        "eval_max_examples": 32, "checkpoint_every": 5, "progress": False, "out": out})
    result, model, reg = fit(cfg)
    torch.save({"model": model.state_dict(), "regularizer": reg.state_dict(), "result": result},
               f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("adv", ["pgd", "trades"])
def test_two_gloo_ranks_end_with_identical_state(tmp_path, adv):
    out = str(tmp_path / "ddp")
    mp.spawn(_worker, args=(2, _free_port(), out, adv), nprocs=2, join=True)
    r0 = torch.load(f"{out}/rank0.pt", weights_only=True)
    r1 = torch.load(f"{out}/rank1.pt", weights_only=True)
    assert r0["model"].keys() == r1["model"].keys()
    for name, value in r0["model"].items():
        assert torch.equal(value, r1["model"][name]), f"{name} differs across ranks"
    blocks0 = r0["regularizer"]["_extra_state"]["spectral"]["blocks"]
    blocks1 = r1["regularizer"]["_extra_state"]["spectral"]["blocks"]
    assert all(torch.equal(a, b) for a, b in zip(blocks0, blocks1, strict=True))
    # the run really trained, pruned and reported (rank 0 only)
    assert r0["result"]["sparsity"] == pytest.approx(0.95, abs=1e-3) and r1["result"] == {}
    ckpt = load_checkpoint(f"{out}/checkpoint.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == 2 * (1437 // 128)
    for name, value in r0["model"].items():
        assert torch.equal(value, ckpt["model"][name])
    # the two ranks drew different PGD random starts (per-rank RNG streams), so their saved RNG states differ
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
