"""Benchmark CLI: ``python benchmarks/run.py <command> ...``.

  penalty        CNC penalty value+grad over a ResNet layer set on synthetic drift (the easy case)
  trajectory     CNC penalty value+grad on weights recorded along real training runs (dense, pruning, fine-tuning):
                 fastcnc vs eigvalsh of the float64 / float32 Gram vs svdvals, kappa errors, certificates, work
  blocks         the same on thousands of small same-shape matrices: the per-frequency blocks of trained 3x3 convs
  masked-report  render a ``pytest benchmarks/bench_masked_matmul.py --benchmark-json FILE`` result as markdown

Results carry device, date, commit and versions (``common.environment``); ratios are against baselines timed in the
same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from common import write_result


def _penalty(args) -> int:
    from penalty import bench_penalty, to_markdown

    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    res = bench_penalty(args.models, args.device, args.repeats, args.rtol, args.iters, args.block, args.drift)
    md = to_markdown(res)
    print(md)
    if args.out is not None:
        tag = "gpu" if args.device.startswith("cuda") else "cpu"
        stem = f"penalty-{tag}-{res['date']}-{'-'.join(args.models)}-drift{args.drift:g}"
        paths = write_result(args.out, stem, res, md)
        print(f"wrote {paths[0]} and {paths[1]}")
    return 0


def _trajectory(args) -> int:
    from trajectory import main as trajectory_main

    trajectory_main(args.rest)
    return 0


def _blocks(args) -> int:
    from blocks import main as blocks_main

    blocks_main(args.rest)
    return 0


def _masked_report(args) -> int:
    from bench_masked_matmul import render

    print(render(args.json), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pen = sub.add_parser("penalty", help="CNC penalty value+grad vs exact svdvals / eigvalsh baselines")
    pen.add_argument("--models", nargs="+", default=["resnet18", "resnet50"], choices=["resnet18", "resnet50"])
    pen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    pen.add_argument("--repeats", type=int, default=5)
    pen.add_argument("--rtol", type=float, default=1e-2)
    pen.add_argument("--iters", type=int, default=3)
    pen.add_argument("--block", type=int, default=4)
    pen.add_argument("--drift", type=float, default=1e-3, help="weight change since the warm state, x mean|w|")
    pen.add_argument("--threads", type=int, default=None,
                     help="CPU intra-op threads (default: 1 on CPU, as the trajectory benchmark; untouched on CUDA)")
    pen.add_argument("--out", type=Path, default=None, help="directory for penalty-<device>-<date>-....json/.md")
    pen.set_defaults(handler=_penalty)
    sub.add_parser("trajectory", help="recorded training trajectories (options: run.py trajectory --help)")
    sub.add_parser("blocks", help="per-frequency blocks of recorded convolutions (options: run.py blocks --help)")
    rep = sub.add_parser("masked-report", help="markdown ratio table of a bench_masked_matmul --benchmark-json file")
    rep.add_argument("json", help="the --benchmark-json output")
    rep.set_defaults(handler=_masked_report)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["trajectory"]:  # its own parser (benchmarks/trajectory.py) takes every option after the name
        return _trajectory(argparse.Namespace(rest=argv[1:]))
    if argv[:1] == ["blocks"]:  # likewise (benchmarks/blocks.py)
        return _blocks(argparse.Namespace(rest=argv[1:]))
    args = p.parse_args(argv)
    if getattr(args, "repeats", 1) < 1:
        p.error("--repeats must be >= 1")
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
