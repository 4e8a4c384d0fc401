"""Where do attacks bite on the embedded MNIST? Per-image minimal L-inf radii of a plainly trained model.

Trains ResNet-18 (width 16, ImageNet stem) on the embedded MNIST split with no adversarial training, no pruning and
no regulariser, then finds, for every test image, the smallest L-inf radius at which PGD fools it
(``fastcnc.attacks.minimal_linf_radius``: per-image bisection, PGD-``steps`` with step 2.5 eps / steps, random
start, one cross-entropy and one CW-margin restart). The radii are upper bounds of the true minimal radii. The
training eps of the main job should sit where a plain model is broken but adversarial training can still help.

    python experiments/mnist_radius.py            # writes experiments/results/mnist_radius.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fastcnc.attacks import minimal_linf_radius
from fastcnc.config import load_config
from fastcnc.evaluate import clean_accuracy
from fastcnc.train import fit

HERE = Path(__file__).resolve().parent

PLAIN = {"dataset": "mnist", "model": "resnet18", "stem": "imagenet", "width": 16, "epochs": 5, "batch_size": 128,
         "lr": 0.05, "schedule": "cosine", "adv": "none", "prune": "none", "tscnc": False, "threads": 1,
         "progress": False, "eval_pgd_steps": 1, "eval_cw_steps": 1}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/mnist_radius")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--bisections", type=int, default=7)
    parser.add_argument("--max-eps", type=float, default=0.5)
    parser.add_argument("--results", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    cfg = load_config(overrides={**PLAIN, "seed": args.seed, "out": args.out})
    t0 = time.perf_counter()
    _, model, _ = fit(cfg, overwrite=True)
    train_s = time.perf_counter() - t0
    from fastcnc.data import load_dataset

    data = load_dataset("mnist")
    model.eval()
    t0 = time.perf_counter()
    radii = minimal_linf_radius(model, data.x_test, data.y_test, max_eps=args.max_eps, bisections=args.bisections,
                                steps=args.steps, restarts=args.restarts,
                                generator=torch.Generator().manual_seed(args.seed))
    search_s = time.perf_counter() - t0
    clean = clean_accuracy(model, data.x_test, data.y_test)
    finite = radii[torch.isfinite(radii)]
    quantiles = {f"q{int(q * 100)}": float(torch.quantile(radii.clamp(max=args.max_eps), q))
                 for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
    grid = [0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    acc_at = {f"{e:g}": float((radii > e).double().mean()) for e in grid}
    result = {"config": PLAIN | {"seed": args.seed}, "search": vars(args), "n": len(radii), "clean_acc": clean,
              "median_radius": quantiles["q50"], "quantiles": quantiles, "n_misclassified_clean":
              int((radii == 0).sum()), "n_not_fooled_at_max_eps": int(torch.isinf(radii).sum()),
              "mean_finite_radius": float(finite.mean()) if len(finite) else None,
              "robust_acc_upper_bound_at": acc_at, "train_s": train_s, "search_s": search_s,
              "radii": radii.tolist()}
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "mnist_radius.json").write_text(json.dumps(result, indent=1))
    lines = ["# Minimal L-inf radii of a plainly trained model on the embedded MNIST", "",
             f"Command: `python experiments/mnist_radius.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"Model: ResNet-18 width 16 (ImageNet stem), {PLAIN['epochs']} epochs of plain training (no adversarial "
             f"training, no pruning, no regulariser), seed {args.seed}; clean test accuracy {clean:.4f} on "
             f"{len(radii)} test images. Train time {train_s:.0f} s, radius search {search_s:.0f} s (1 thread).", "",
             f"Search: per-image bisection on [0, {args.max_eps}] ({args.bisections} halvings, resolution "
             f"{args.max_eps / 2 ** args.bisections:.4f}), PGD-{args.steps} (step 2.5 eps / steps, random start), "
             f"{args.restarts} restarts (CE, CW margin). Radii are upper bounds (an attack only shows a radius "
             "suffices).", "",
             f"**Median minimal radius: {quantiles['q50']:.4f}** (10/25/75/90%: {quantiles['q10']:.4f} / "
             f"{quantiles['q25']:.4f} / {quantiles['q75']:.4f} / {quantiles['q90']:.4f}); misclassified clean: "
             f"{result['n_misclassified_clean']}; not fooled at {args.max_eps}: "
             f"{result['n_not_fooled_at_max_eps']}.", "",
             "| eps | fraction of images with radius > eps (plain model's robust accuracy, upper bound) |",
             "|---|---|"]
    lines += [f"| {e} | {a:.4f} |" for e, a in acc_at.items()]
    (res / "mnist_radius.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
