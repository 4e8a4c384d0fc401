"""Reports: ``report.json`` / ``report.md`` / ``kappa.png`` for one run, and a comparison of several runs
(markdown table, ``accuracy_vs_sparsity.png``, per-layer kappa overlay). Plots use matplotlib's Agg backend."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _float(v) -> float:
    return float(v)  # also turns the "inf" / "nan" strings of report.json back into floats


def _fmt(v, digits: int = 4) -> str:
    v = _float(v)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"


def _plot_kappa(runs: list[tuple[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(runs[0][1]["layers"])), 4))
    for label, result in runs:
        kappas = [_float(r["kappa"]) for r in result["layers"]]
        # an infinite kappa (a dead row/column) is drawn at the top of the axis as an open marker
        finite = [k for k in kappas if math.isfinite(k)]
        top = max(finite) * 10 if finite else 10.0
        ax.semilogy(range(len(kappas)), [k if math.isfinite(k) else top for k in kappas], marker="o", label=label,
                    fillstyle="full")
    ax.set_xticks(range(len(runs[0][1]["layers"])))
    ax.set_xticklabels([r["name"] for r in runs[0][1]["layers"]], rotation=90, fontsize=6)
    ax.set_ylabel("kappa(W*M); inf drawn at 10x max finite")
    ax.set_title("per-layer condition number")
    if len(runs) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"# fastcnc run: {cfg['model']} on {cfg['dataset']}",
        "",
        f"adv={cfg['adv']} (eps={_fmt(cfg.get('attack_eps', cfg.get('eps')))}, {cfg['attack_steps']} steps), "
        f"prune={cfg['prune']} to "
        f"{cfg['sparsity']}, tscnc={'on' if cfg['tscnc'] else 'off'}"
        + (f" (lambda_tsc={cfg['lambda_tsc']}, lambda_cnc={cfg['lambda_cnc']}, cnc={cfg['cnc']})" if cfg["tscnc"]
           else "") + f", seed={cfg['seed']}, epochs={cfg['epochs']}",
        "",
        f"| metric ({result['n_eval']} test images, eps={_fmt(result['eps'])}) | value |",
        "|---|---|",
        f"| clean accuracy | {_fmt(result['clean_acc'])} |",
        f"| FGSM accuracy | {_fmt(result['fgsm_acc'])} |",
        f"| PGD-{cfg['eval_pgd_steps']} accuracy | {_fmt(result['pgd_acc'])} |",
        f"| CW-Linf ({cfg['eval_cw_steps']} steps) accuracy | {_fmt(result['cw_acc'])} |",
        f"| sparsity (masked layers) | {_fmt(result['sparsity'])} |",
        f"| max / median kappa | {_fmt(result['kappa_max'])} / {_fmt(result['kappa_median'])} |",
        f"| layers with kappa = inf | {result['n_layers_kappa_inf']} |",
    ]
    if "train_time_s" in result:
        lines.append(f"| training time (s) | {result['train_time_s']:.1f} |")
    lines += ["", "## Per-layer spectra (exact, float64 SVD of W*M as [C_out, fan_in])", "",
              "| layer | shape | sigma_max | sigma_min | kappa | sparsity | dead rows / cols |",
              "|---|---|---|---|---|---|---|"]
    for r in result["layers"]:
        lines.append(f"| {r['name']} | {'x'.join(map(str, r['shape']))} | {_fmt(r['sigma_max'])} | "
                     f"{_fmt(r['sigma_min'])} | {_fmt(r['kappa'])} | {_fmt(r['sparsity'])} | "
                     f"{r['dead_rows']} / {r['dead_cols']} |")
    if result.get("regularizer_report"):
        rows = result["regularizer_report"]
        keys = [k for k in rows[0] if k not in ("name", "shape")]
        lines += ["", "## Regulariser estimates (reg.report())", "", "| layer | " + " | ".join(keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for r in rows:
            lines.append(f"| {r['name']} | " + " | ".join(
                _fmt(r[k]) if isinstance(r[k], (int, float, str)) and not isinstance(r[k], bool) and
                _is_number(r[k]) else str(r[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def write_report(out: str | Path, result: dict, stem: str = "report") -> list[Path]:
    """Write ``{stem}.json``, ``{stem}.md`` and ``kappa.png`` (``{stem}_kappa.png`` for other stems) into ``out``."""
    out = Path(out)
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / ("kappa.png" if stem == "report" else f"{stem}_kappa.png")]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(render_markdown(result))
    _plot_kappa([(result["config"]["out"], result)], paths[2])
    return paths


def load_result(run: str | Path) -> dict:
    path = Path(run)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give run folders (or their report.json) written by fastcnc train")
    return json.loads(path.read_text())


def compare_runs(runs: list[str | Path], out: str | Path) -> list[Path]:
    """Table of several runs (one row each), accuracy-vs-sparsity plot and kappa overlay, written into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = [(str(r), load_result(r)) for r in runs]
    lines = ["| run | model | adv | tscnc | seed | sparsity | clean | FGSM | PGD | CW | max kappa | median kappa |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results:
        c = r["config"]
        lines.append(f"| {name} | {c['model']} | {c['adv']} | {'on' if c['tscnc'] else 'off'} | {c['seed']} | "
                     f"{_fmt(r['sparsity'])} | {_fmt(r['clean_acc'])} | {_fmt(r['fgsm_acc'])} | "
                     f"{_fmt(r['pgd_acc'])} | {_fmt(r['cw_acc'])} | {_fmt(r['kappa_max'])} | "
                     f"{_fmt(r['kappa_median'])} |")
    md = out / "comparison.md"
    md.write_text("\n".join(lines) + "\n")
    (out / "comparison.json").write_text(json.dumps(
        [{"run": n, **{k: r[k] for k in ("sparsity", "clean_acc", "fgsm_acc", "pgd_acc", "cw_acc", "kappa_max",
                                         "kappa_median")}, "config": r["config"]} for n, r in results], indent=1))
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, marker in (("clean_acc", "o"), ("pgd_acc", "s"), ("cw_acc", "^")):
        ax.scatter([_float(r["sparsity"]) for _, r in results], [_float(r[key]) for _, r in results], marker=marker,
                   label=key.replace("_acc", ""))
    ax.set_xlabel("sparsity")
    ax.set_ylabel("accuracy")
    ax.legend()
    ax.set_title("accuracy vs sparsity")
    fig.tight_layout()
    acc_plot = out / "accuracy_vs_sparsity.png"
    fig.savefig(acc_plot, dpi=120)
    plt.close(fig)
    kappa_plot = out / "kappa_per_layer.png"
    if len({len(r["layers"]) for _, r in results}) == 1:
        _plot_kappa(results, kappa_plot)
        return [md, acc_plot, kappa_plot]
    return [md, acc_plot]
