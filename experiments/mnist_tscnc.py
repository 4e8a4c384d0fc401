"""TSC / CNC / TSCNC vs no regulariser on the embedded MNIST at 95% and 99% sparsity, with error bars.

Grid (each cell for every seed):
- PGD adversarial training with {no regulariser, TSC only, CNC only, TSCNC} at 95% and at 99% sparsity;
- TRADES with {no regulariser, TSCNC} at 99% sparsity.
Model: ResNet-18 at width 16 with the ImageNet stem (7x7/2 conv + max-pool: the 28x28 input is at 7x7 after the
stem, which makes a PGD-AT step 5.4x cheaper on CPU than the CIFAR stem; measured 29 vs 157 ms per forward+backward
of 64 images, 1 thread). Training: gradual global magnitude pruning (cubic schedule) during training, then
fine-tuning at the final mask; every setting is in SETTINGS and is written into the results files. The budget: a
2-core machine shared with other jobs, on which a run gets a fraction of one core; 5 epochs of PGD-3 training (step
2.5 eps / 3) keep a run at about 1-2 CPU-minutes.

Evaluation at the training eps: clean accuracy and PGD-50 (random start, step 2.5 eps / 50) on the 1,000 test images;
APGD-CE + APGD-T through pyautoattack (100 iterations each, 9 target classes, the standard AutoAttack settings of
these two attacks) on the first 100 of them (APGD-T's 900 iterations per robust image dominate the CPU budget), the
per-image worst case over PGD-50 and the APGD pair on those 100, and the exact per-layer condition
numbers of ``W * M`` (float64 SVD; ``inf`` when numerically singular). Training time is wall time of the training
loop (CUDA-synchronised on GPU).

CNC engine: ``--engine exact`` (default) runs TSCNC with ``refresh_every=1``, i.e. every step recomputes sigma_max
and sigma_min of every layer by float64 SVD: the penalty is the exact CNC, independent of the estimator's accuracy.
``--engine default`` uses TSCNC's default engine of the checked-out code. The results name the engine.

    python experiments/mnist_tscnc.py --jobs 2                  # the whole grid, 3 seeds
    python experiments/mnist_tscnc.py --report-only             # tables and plots from finished runs

Numbers are whatever the runs produce; nothing is tuned on the test set and every seed is reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SETTINGS = {
    "dataset": "mnist", "model": "resnet18", "stem": "imagenet", "width": 16,
    "epochs": 5, "batch_size": 128, "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
    "schedule": "cosine",
    "eps": 0.1, "attack_steps": 3, "step_size": 0.25 / 3,  # 2.5 * eps / steps
    "trades_beta": 6.0,
    "prune": "gradual (global magnitude, cubic)", "prune_start_epoch": 1.0, "prune_end_epoch": 3.5,
    "prune_frequency": 5,
    "lambda_tsc": 1e-5, "tsc_a": 100.0, "lambda_cnc": 1e-2, "cnc_form": "log",
    "eval_pgd_steps": 50, "eval_pgd_step_size": 0.005,  # 2.5 * eps / 50
    "autoattack": "apgd (APGD-CE + APGD-T, pyautoattack 0.2.0)",
    "n_eval": 1000,  # test images for clean and PGD-50 accuracy (the first n of the fixed, class-shuffled split)
    "n_eval_autoattack": 100,  # the first n of those for APGD-CE + APGD-T and the worst case (CPU budget)
}

# arm -> (adversarial training, lambda_tsc on?, lambda_cnc on?)
ARMS = {
    "pgd-none": ("pgd", False, False), "pgd-tsc": ("pgd", True, False), "pgd-cnc": ("pgd", False, True),
    "pgd-tscnc": ("pgd", True, True), "trades-none": ("trades", False, False), "trades-tscnc": ("trades", True, True),
}
GRID = [(arm, s) for s in (0.95, 0.99) for arm in ("pgd-none", "pgd-tsc", "pgd-cnc", "pgd-tscnc")] + [
    ("trades-none", 0.99), ("trades-tscnc", 0.99)]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_one(arm: str, sparsity: float, seed: int, device: torch.device, engine: str) -> dict:
    """Train and evaluate one cell of the grid; returns its numbers (JSON-safe)."""
    from fastcnc.attacks import pgd, trades_adversary, trades_loss
    from fastcnc.autoattack import autoattack_accuracy
    from fastcnc.data import TensorLoader, load_dataset
    from fastcnc.evaluate import clean_accuracy, layer_spectra
    from fastcnc.models import build_model
    from fastcnc.pruning import GradualPruner, sparsity_report
    from fastcnc.regularizer import TSCNC
    from fastcnc.train import apply_masks, lr_factor

    s = SETTINGS
    adv, use_tsc, use_cnc = ARMS[arm]
    _seed_all(seed)
    data = load_dataset(s["dataset"])
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test[:s["n_eval"]].to(device), data.y_test[:s["n_eval"]].to(device)
    model = build_model(s["model"], 10, 1, s["stem"], s["width"]).to(device)
    loader = TensorLoader(x_train, y_train, s["batch_size"], shuffle=True, seed=seed)
    spe = len(loader)
    total = s["epochs"] * spe
    opt = torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=s["momentum"], nesterov=s["nesterov"],
                          weight_decay=s["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(
        i, total_steps=total, warmup_steps=0, schedule=s["schedule"], milestones=[], gamma=0.1))
    pruner = GradualPruner(model, sparsity, round(s["prune_start_epoch"] * spe), round(s["prune_end_epoch"] * spe),
                           s["prune_frequency"])
    reg = None
    if use_tsc or use_cnc:
        reg = TSCNC(model, lambda_tsc=s["lambda_tsc"] if use_tsc else 0.0,
                    lambda_cnc=s["lambda_cnc"] if use_cnc else 0.0, cnc=s["cnc_form"], a=s["tsc_a"],
                    refresh_every=1 if engine == "exact" else 0).to(device)
    _seed_all(seed + 1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    step = 0
    for _ in range(s["epochs"]):
        loader.begin_epoch()
        for xb, yb in loader.batches():
            pruner.step(step)
            model.eval()  # attacks see batch-norm in eval mode and do not update its statistics
            if adv == "pgd":
                x_adv = pgd(model, xb, yb, eps=s["eps"], step_size=s["step_size"], steps=s["attack_steps"])
            else:
                x_adv = trades_adversary(model, xb, eps=s["eps"], step_size=s["step_size"], steps=s["attack_steps"])
            model.train()
            if adv == "pgd":
                loss = F.cross_entropy(model(x_adv), yb)
            else:
                loss = trades_loss(model(xb), model(x_adv), yb, s["trades_beta"])
            if reg is not None:
                loss = loss + reg()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            apply_masks(model)
            step += 1
    sync()
    train_s = time.perf_counter() - t0

    model.eval()
    t0 = time.perf_counter()
    clean = clean_accuracy(model, x_test, y_test)
    generator = torch.Generator().manual_seed(seed)
    pgd_ok = []
    for i in range(0, len(x_test), 250):
        xb, yb = x_test[i:i + 250], y_test[i:i + 250]
        xa = pgd(model, xb, yb, eps=s["eps"], step_size=s["eval_pgd_step_size"], steps=s["eval_pgd_steps"],
                 generator=generator)
        with torch.no_grad():
            pgd_ok.append((model(xa).argmax(1) == yb).cpu())
    pgd_ok = torch.cat(pgd_ok)
    n_aa = min(s["n_eval_autoattack"], len(y_test))
    aa = autoattack_accuracy(model, x_test[:n_aa], y_test[:n_aa], eps=s["eps"], version="apgd", seed=seed)
    eval_s = time.perf_counter() - t0
    layers = layer_spectra(model)
    kappas = [r["kappa"] for r in layers]
    finite = [k for k in kappas if math.isfinite(k)]
    return {
        "arm": arm, "sparsity_target": sparsity, "seed": seed, "engine": engine if reg is not None and use_cnc
        else "none", "device": str(device), "n_eval": len(y_test),
        "lambda_tsc": s["lambda_tsc"] if use_tsc else 0.0, "lambda_cnc": s["lambda_cnc"] if use_cnc else 0.0,
        "clean_acc": clean, "pgd50_acc": float(pgd_ok.double().mean()), "apgd_acc": aa["robust_acc"],
        "n_eval_autoattack": n_aa, "pgd50_acc_on_autoattack_images": float(pgd_ok[:n_aa].double().mean()),
        "apgd_after_attack": aa["after_attack"], "worst_acc": float((pgd_ok[:n_aa] & aa["robust"]).double().mean()),
        "sparsity": sparsity_report(model)[-1]["sparsity"],
        "kappa_max": max(kappas), "kappa_median": float(statistics.median(kappas)),
        "kappa_max_finite": max(finite) if finite else math.inf, "n_layers_kappa_inf": len(kappas) - len(finite),
        "train_s": train_s, "eval_s": eval_s, "steps": step,
        "layers": [{k: r[k] for k in ("name", "shape", "kappa", "sigma_max", "sigma_min", "sparsity", "dead_rows",
                                      "dead_cols")} for r in layers],
    }


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


def _num(v) -> float:
    return float(v) if isinstance(v, str) else v


def _cell_name(arm: str, sparsity: float, seed: int) -> str:
    return f"{arm}-s{round(sparsity * 100)}-seed{seed}"


def _stats(values: list[float], fmt: str = "{:.4f}") -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return f"inf ({len(values) - len(finite)}/{len(values)})"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def write_report(runs: Path, results: Path, name: str, seeds: list[int], engine: str, command: str) -> None:
    rows = []
    for arm, sp in GRID:
        for seed in seeds:
            path = runs / f"{_cell_name(arm, sp, seed)}.json"
            if path.exists():
                rows.append(json.loads(path.read_text()))
    if not rows:
        raise SystemExit(f"no finished runs in {runs}")
    meta = rows[0].get("meta", {})
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps({"settings": SETTINGS, "engine": engine, "command": command,
                                                       "meta": meta, "runs": rows}, indent=1))
    engine_text = ("exact CNC (TSCNC with refresh_every=1: float64 SVD of every layer at every step)"
                   if engine == "exact" else "TSCNC's default engine of the checked-out code")
    lines = [f"# TSCNC vs baselines on the embedded MNIST ({len(seeds)} seeds), {engine_text}", "",
             f"Command: `{command}`", "",
             f"Device: {meta.get('device_name', '?')}; torch {meta.get('torch', '?')}; fastcnc commit "
             f"{meta.get('commit', '?')}; date {meta.get('date', '?')}.", "",
             "Settings (every run): " + ", ".join(f"{k}={v}" for k, v in SETTINGS.items()) + ".", "",
             "Regulariser weights: TSC only = lambda_tsc {0}, lambda_cnc 0; CNC only = lambda_tsc 0, lambda_cnc {1}; "
             "TSCNC = lambda_tsc {0}, lambda_cnc {1} (CNC form `{2}`, TSC a = {3}).".format(
                 SETTINGS["lambda_tsc"], SETTINGS["lambda_cnc"], SETTINGS["cnc_form"], SETTINGS["tsc_a"]), "",
             f"Evaluation at eps {SETTINGS['eps']}: clean and PGD-50 (random start) on the {rows[0]['n_eval']} test "
             f"images; APGD-CE + APGD-T (pyautoattack) and worst (correct under PGD-50 and both APGD attacks) on the "
             f"first {rows[0]['n_eval_autoattack']} of them (PGD-50 on those: column PGD-50@AA). kappa: exact, float64 "
             "SVD of W * M per "
             "layer; inf = numerically singular (counted in the max; the median is over all layers).", "",
             "## Mean ± standard deviation over seeds", "",
             "| arm | sparsity | clean | PGD-50 | PGD-50@AA | APGD-CE+T | worst | kappa max | kappa max (finite) | "
             "kappa median | layers kappa=inf | train s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, sp in GRID:
        cell = [r for r in rows if r["arm"] == arm and r["sparsity_target"] == sp]
        if not cell:
            continue
        lines.append(f"| {arm} | {sp:.0%} | " + " | ".join([
            _stats([r["clean_acc"] for r in cell]), _stats([r["pgd50_acc"] for r in cell]),
            _stats([r["pgd50_acc_on_autoattack_images"] for r in cell]), _stats([r["apgd_acc"] for r in cell]),
            _stats([r["worst_acc"] for r in cell]),
            _stats([_num(r["kappa_max"]) for r in cell], "{:.3g}"),
            _stats([_num(r["kappa_max_finite"]) for r in cell], "{:.3g}"),
            _stats([_num(r["kappa_median"]) for r in cell], "{:.3g}"),
            _stats([float(r["n_layers_kappa_inf"]) for r in cell], "{:.1f}"),
            _stats([r["train_s"] for r in cell], "{:.0f}")]) + f" (n={len(cell)}) |")
    lines += ["", "## Every run", "", "| arm | sparsity | seed | clean | PGD-50 | APGD-CE+T | worst | kappa max | "
              "kappa median | inf layers | train s | eval s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['sparsity']:.4f} | {r['seed']} | {r['clean_acc']:.4f} | {r['pgd50_acc']:.4f} "
                     f"| {r['apgd_acc']:.4f} | {r['worst_acc']:.4f} | {_num(r['kappa_max']):.4g} | "
                     f"{_num(r['kappa_median']):.4g} | {r['n_layers_kappa_inf']} | {r['train_s']:.0f} | "
                     f"{r['eval_s']:.0f} |")
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")
    _plots(rows, results / f"{name}_plots")
    print("\n".join(lines))


def _plots(rows: list[dict], folder: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plots", file=sys.stderr)
        return
    folder.mkdir(parents=True, exist_ok=True)
    arms = ["pgd-none", "pgd-tsc", "pgd-cnc", "pgd-tscnc"]
    for metric, label, fname in (("apgd_acc", "APGD-CE+T accuracy", "robust_vs_sparsity.png"),
                                 ("pgd50_acc", "PGD-50 accuracy", "pgd50_vs_sparsity.png"),
                                 ("kappa_max_finite", "max finite kappa (log)", "kappa_max_vs_sparsity.png"),
                                 ("kappa_median", "median kappa (log)", "kappa_median_vs_sparsity.png")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for k, arm in enumerate(arms + ["trades-none", "trades-tscnc"]):
            pts = {}
            for r in rows:
                if r["arm"] == arm and math.isfinite(_num(r[metric])):  # an infinite kappa has no place on the axis
                    pts.setdefault(r["sparsity_target"], []).append(_num(r[metric]))
            if not pts:
                continue
            xs = sorted(pts)
            mean = [statistics.mean(pts[x]) for x in xs]
            std = [statistics.stdev(pts[x]) if len(pts[x]) > 1 else 0.0 for x in xs]
            offset = (k - 2.5) * 0.0008  # keep the error bars of overlapping arms apart
            ax.errorbar([x + offset for x in xs], mean, yerr=std, marker="o" if arm.startswith("pgd") else "s",
                        capsize=3, label=arm)
        if "kappa" in metric:
            ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_ylabel(label)
        ax.set_xticks([0.95, 0.99])
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / fname, dpi=120)
        plt.close(fig)


def _meta(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip() or "?"
    except OSError:
        commit = "?"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or '?'}, " \
        f"{os.cpu_count()} cores visible, 1 intra-op thread per run)"
    return {"device_name": name, "torch": torch.__version__, "python": platform.python_version(), "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cells", nargs="*", default=None, help="subset of ARM:SPARSITY, e.g. pgd-none:0.99")
    parser.add_argument("--engine", choices=["exact", "default"], default="exact")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each, 1 thread each)")
    parser.add_argument("--runs", default="runs/mnist_tscnc", help="folder for the per-run JSON files")
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--name", default="mnist_tscnc")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a SETTINGS entry for every run (recorded in the results), e.g. n_eval=500")
    parser.add_argument("--single", nargs=3, metavar=("ARM", "SPARSITY", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for item in args.set:
        key, value = item.split("=", 1)
        if key not in SETTINGS:
            raise SystemExit(f"--set: unknown setting {key!r} (known: {', '.join(SETTINGS)})")
        SETTINGS[key] = type(SETTINGS[key])(json.loads(value.lower() if value.lower() in ("true", "false")
                                                       else value)) if not isinstance(SETTINGS[key], str) else value
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.single:
        arm, sp, seed = args.single[0], float(args.single[1]), int(args.single[2])
        result = run_one(arm, sp, seed, device, args.engine)
        result["meta"] = _meta(device)
        (runs / f"{_cell_name(arm, sp, seed)}.json").write_text(json.dumps(_json_safe(result), indent=1))
        print(f"{arm} {sp} seed {seed}: clean {result['clean_acc']:.4f} PGD-50 {result['pgd50_acc']:.4f} APGD "
              f"{result['apgd_acc']:.4f} kappa max {result['kappa_max']:.4g} train {result['train_s']:.0f} s "
              f"eval {result['eval_s']:.0f} s", flush=True)
        return 0
    grid = GRID
    if args.cells:
        wanted = {(c.split(":")[0], float(c.split(":")[1])) for c in args.cells}
        grid = [g for g in GRID if g in wanted]
    # --report-only renders the tables of the grid that the other arguments describe: record that grid's command
    command = "python experiments/mnist_tscnc.py " + " ".join(
        a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only")
    if not args.report_only:
        todo = [(arm, sp, seed) for seed in args.seeds for arm, sp in grid
                if not (runs / f"{_cell_name(arm, sp, seed)}.json").exists()]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        running: list[subprocess.Popen] = []
        failed = 0
        while todo or running:
            while todo and len(running) < args.jobs:
                arm, sp, seed = todo.pop(0)
                running.append(subprocess.Popen([sys.executable, __file__, "--single", arm, str(sp), str(seed),
                                                 "--engine", args.engine, "--device", args.device, "--runs",
                                                 str(runs), *[a for item in args.set for a in ("--set", item)]],
                                                env=env))
            time.sleep(0.5)
            for p in [p for p in running if p.poll() is not None]:
                failed += p.returncode != 0
                running.remove(p)
        if failed:
            print(f"{failed} runs failed", file=sys.stderr)
    write_report(runs, Path(args.results), args.name, args.seeds, args.engine, command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
