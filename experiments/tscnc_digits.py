"""Magnitude pruning to 95% + PGD adversarial training, with and without TSCNC, on the embedded digits data.

Each arm is the old ``quick`` preset, pinned below as ``DIGITS_QUICK`` (ResNet-18 at width 16, PGD-5 training at
eps 8/255, gradual magnitude pruning to 95% global sparsity, fine-tuning) with a different regulariser setting, run
for several seeds. The results table (markdown + JSON) goes to ``experiments/results/``; the run folders
(checkpoints, per-run reports) to ``runs/``.

    python experiments/tscnc_digits.py --seeds 0 1 2

Numbers are whatever the runs produce; nothing is tuned after looking at the test set.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from fastcnc.config import load_config
from fastcnc.report import compare_runs
from fastcnc.train import train

HERE = Path(__file__).resolve().parent

# the quick preset as it was when these results were recorded (it has since moved to MNIST at eps 0.1): pinned here so
# that the recorded tables stay reproducible
DIGITS_QUICK = {"dataset": "digits", "model": "resnet18", "stem": "cifar", "width": 16, "epochs": 20, "batch_size": 64,
                "lr": 0.05, "weight_decay": 5e-4, "schedule": "cosine", "adv": "pgd", "attack_eps": 8 / 255,
                "step_size": 2 / 255, "attack_steps": 5, "prune": "gradual", "sparsity": 0.95,
                "prune_start_epoch": 2.0, "prune_end_epoch": 12.0, "prune_frequency": 5, "tscnc": True,
                "lambda_tsc": 1e-5, "lambda_cnc": 1e-3, "cnc": "log", "eval_pgd_steps": 20, "eval_cw_steps": 20,
                "autoattack": "", "threads": 1, "checkpoint_every": 50, "log_every": 10}

# arm name -> config overrides on top of DIGITS_QUICK
ARMS = {
    "no-tscnc": {"tscnc": False},
    "tscnc-1e-3": {"tscnc": True, "lambda_cnc": 1e-3, "lambda_tsc": 1e-5},
    "tscnc-1e-2": {"tscnc": True, "lambda_cnc": 1e-2, "lambda_tsc": 1e-5},
}


def _mean_std(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return f"inf ({len(values) - len(finite)}/{len(values)} runs)"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--runs", default="runs/tscnc_digits", help="folder for the run folders")
    parser.add_argument("--results", default=str(HERE / "results"), help="folder for the results table")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="extra config override for every run (e.g. attack_eps=16/255)")
    parser.add_argument("--name", default="tscnc_digits", help="stem of the results files")
    args = parser.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.set)

    rows, dirs = [], []
    for seed in args.seeds:  # seeds outer: an interrupted sweep still has every arm for the seeds it finished
        for arm in args.arms:
            out = Path(args.runs) / f"{arm}-seed{seed}"
            cfg = load_config(overrides={**DIGITS_QUICK, **ARMS[arm], **extra, "seed": seed, "out": str(out),
                                                  "progress": False})
            t0 = time.perf_counter()
            result = train(cfg, resume=True)  # re-running the script continues / reuses finished runs
            print(f"{arm} seed {seed}: clean {result['clean_acc']:.4f} PGD {result['pgd_acc']:.4f} "
                  f"kappa max {result['kappa_max']} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            rows.append({"arm": arm, "seed": seed, **{k: result[k] for k in (
                "clean_acc", "fgsm_acc", "pgd_acc", "cw_acc", "sparsity", "kappa_max", "kappa_median",
                "n_layers_kappa_inf")}, "layers": result["layers"]})
            dirs.append(out)

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    command = "python experiments/tscnc_digits.py " + " ".join(sys.argv[1:] if argv is None else argv)
    cfg0 = load_config(overrides={**DIGITS_QUICK, **extra})
    lines = [
        f"# TSCNC vs no TSCNC at 95% sparsity on the embedded digits ({len(args.seeds)} seeds)", "",
        f"Command: `{command.strip()}` (fastcnc `quick` preset: {cfg0.model} width {cfg0.width}, {cfg0.epochs} "
        f"epochs, PGD-{cfg0.attack_steps} training at eps {cfg0.attack_eps:.4f}, gradual global magnitude pruning to "
        f"{cfg0.sparsity:.0%} between epochs {cfg0.prune_start_epoch:g} and {cfg0.prune_end_epoch:g}; evaluation on "
        f"the 360 held-out images: PGD-{cfg0.eval_pgd_steps} and CW-Linf-{cfg0.eval_cw_steps} with random start). "
        "kappa is exact (float64 SVD of W*M as [C_out, fan_in]); inf = numerically singular layer.", "",
        "| arm | clean | FGSM | PGD | CW | sparsity | median kappa | max kappa | layers with kappa=inf |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in args.arms:
        sel = [r for r in rows if r["arm"] == arm]
        vals = {k: [float(r[k]) for r in sel] for k in ("clean_acc", "fgsm_acc", "pgd_acc", "cw_acc", "sparsity",
                                                          "kappa_median", "kappa_max", "n_layers_kappa_inf")}
        lines.append(f"| {arm} | " + " | ".join(_mean_std(vals[k]) for k in vals) + " |")
    lines += ["", "## Per seed", "", "| arm | seed | clean | PGD | CW | median kappa | max kappa | inf layers |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['seed']} | {r['clean_acc']:.4f} | {r['pgd_acc']:.4f} | {r['cw_acc']:.4f} | "
                     f"{float(r['kappa_median']):.3f} | {float(r['kappa_max']):.4g} | {r['n_layers_kappa_inf']} |")
    names = [layer["name"] for layer in rows[0]["layers"]]
    lines += ["", "## Per-layer kappa (median over seeds) and sparsity (seed 0)", "",
              "| layer | " + " | ".join(f"kappa {a}" for a in args.arms) + " | " +
              " | ".join(f"sparsity {a}" for a in args.arms) + " |", "|---|" + "---|" * (2 * len(args.arms))]
    for i, name in enumerate(names):
        kappas, sparsities = [], []
        for arm in args.arms:
            sel = [r for r in rows if r["arm"] == arm]
            kappas.append(statistics.median(float(r["layers"][i]["kappa"]) for r in sel))
            sparsities.append(float(sel[0]["layers"][i]["sparsity"]))
        lines.append(f"| {name} | " + " | ".join(f"{k:.4g}" for k in kappas) + " | " +
                     " | ".join(f"{s:.3f}" for s in sparsities) + " |")
    (results / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (results / f"{args.name}.json").write_text(json.dumps({"command": command.strip(), "runs": rows}, indent=1))
    compare_runs(dirs, results / f"{args.name}_plots")
    print((results / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
