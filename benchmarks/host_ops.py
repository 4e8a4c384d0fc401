"""Count the host's work in one warm TSCNC step on the CUDA code path, without a GPU: torch ops dispatched by the
penalties' forward and backward around the engine, which a CUDA step replays as a graph.

    TRITON_INTERPRET=1 python benchmarks/host_ops.py [--model resnet50] [--sparsity 0.95] [--width 0] [--top 15]

CPU tensors take the CUDA branches (``fastcnc._backend.cuda_code_path()``, the Triton kernels under the interpreter)
and the engine's graph is a stand-in whose replay dispatches nothing (a real replay is one host call). Ops are counted
by ``tests/sync_count.py``, which pauses inside Triton launches (the interpreter's own copies are not what a compiled
launch does). Each op is host time on a GPU (a few microseconds each; a kernel launch for those that compute), so
this count is the CPU-side proxy for the step's host time; the GPU session measures the time itself
(``tscnc_step.py``: host ms and host ops per step).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1 (the CUDA code path runs the Triton kernels under the interpreter on CPU)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sync_count import count_host_syncs, replay_engine_on_cpu  # noqa: E402

import fastcnc  # noqa: E402
from fastcnc import _backend  # noqa: E402


def count(model_name: str, sparsity: float, width: int = 0) -> tuple[collections.Counter, collections.Counter]:
    torch.manual_seed(0)
    model = fastcnc.build_model(model_name, num_classes=1000 if model_name == "resnet50" else 10,
                                stem="imagenet" if model_name == "resnet50" else "cifar", width=width)
    if sparsity > 0:
        fastcnc.prune_magnitude(model, sparsity, scope="layer")
    reg = fastcnc.TSCNC(model, lambda_tsc=1e-4, lambda_cnc=1e-3)
    replay_engine_on_cpu(reg)
    with _backend.cuda_code_path():
        for _ in range(4):  # the exact refresh, the two-round graph, then the one-round graph (steady state)
            model.zero_grad(set_to_none=True)
            reg().backward()
        model.zero_grad(set_to_none=True)
        with count_host_syncs() as fwd:
            total = reg()
        with count_host_syncs() as bwd:
            total.backward()
    if reg._graphed.replays < 1 or reg.last_estimate.work["rounds"] != 1:
        raise RuntimeError("the counted step is not the replayed one-round step")
    return fwd.ops, bwd.ops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", choices=["resnet18", "resnet50"])
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--width", type=int, default=0, help="base channels (0: the standard width); the count per layer "
                   "does not depend on it, the interpreter's time does")
    p.add_argument("--top", type=int, default=15, help="ops listed per phase")
    a = p.parse_args(argv)
    fwd, bwd = count(a.model, a.sparsity, a.width)
    print(f"TSCNC step on {a.model} pruned to {a.sparsity:.0%}, CUDA code path on CPU, engine replayed: "
          f"{sum(fwd.values()) + sum(bwd.values())} host ops (forward {sum(fwd.values())}, "
          f"backward {sum(bwd.values())})")
    for name, ops in (("forward", fwd), ("backward", bwd)):
        print(f"{name}: " + ", ".join(f"{op} {n}" for op, n in ops.most_common(a.top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
