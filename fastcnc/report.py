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
        ax.semilogy(range(len(kappas)), [k if math.isfinite(k) else top for k in kappas], marker="o",
                    label=label if len(runs) > 1 else "exact (float64 SVD)", fillstyle="full")
        estimates = {r["name"]: _float(r["kappa"]) for r in result.get("regularizer_report") or []}
        if len(runs) == 1 and estimates:
            names = [r["name"] for r in result["layers"]]
            est = [estimates.get(n, math.nan) for n in names]
            ax.semilogy(range(len(est)), [k if math.isfinite(k) or math.isnan(k) else top for k in est], marker="x",
                        linestyle="none", label="estimated (TSCNC engine, last step)")
    ax.set_xticks(range(len(runs[0][1]["layers"])))
    ax.set_xticklabels([r["name"] for r in runs[0][1]["layers"]], rotation=90, fontsize=6)
    ax.set_ylabel("kappa(W*M); inf drawn at 10x max finite")
    ax.set_title("per-layer condition number")
    if len(runs) > 1 or result.get("regularizer_report"):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_accuracy(result: dict, path: Path) -> None:
    """Bar chart of the accuracies at the evaluation eps (clean, each attack, AutoAttack, worst case)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    bars = [("clean", result["clean_acc"]), ("FGSM", result["fgsm_acc"]),
            (f"PGD-{cfg['eval_pgd_steps']}", result["pgd_acc"]), (f"CW-{cfg['eval_cw_steps']}", result["cw_acc"])]
    if result.get("autoattack"):
        bars.append((f"AA-{result['autoattack']['version']}", result["autoattack"]["robust_acc"]))
    if "worst_acc" in result:
        bars.append(("worst", result["worst_acc"]))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([b[0] for b in bars], [_float(b[1]) for b in bars])
    for i, (_, v) in enumerate(bars):
        ax.text(i, _float(v) + 0.01, f"{_float(v):.3f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy")
    ax.set_title(f"eval eps {_fmt(result.get('eval_eps', result.get('eps')))}, {result['n_eval']} test images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_markdown(result: dict) -> str:
    cfg = result["config"]
    train_eps = result.get("train_eps", cfg.get("attack_eps", cfg.get("eps")))
    eval_eps = result.get("eval_eps", result.get("eps"))  # reports written before eval_eps hold "eps"
    train_step = result.get("train_step_size", cfg.get("step_size"))
    lines = [
        f"# fastcnc run: {cfg['model']} on {cfg['dataset']}",
        "",
        f"Training: adv={cfg['adv']} at train eps={_fmt(train_eps)} ({cfg['attack_steps']} steps of "
        f"{_fmt(train_step)}), prune={cfg['prune']} to {cfg['sparsity']}, tscnc={'on' if cfg['tscnc'] else 'off'}"
        + (f" (lambda_tsc={cfg['lambda_tsc']}, lambda_cnc={cfg['lambda_cnc']}, cnc={cfg['cnc']})" if cfg["tscnc"]
           else "")
        + (f", code-form CNC (reproduction only) lambda={cfg['lambda_paper_cnc']}" if cfg.get("lambda_paper_cnc")
           else "") + f", seed={cfg['seed']}, epochs={cfg['epochs']}",
        "",
        f"**Evaluation eps = {_fmt(eval_eps)}** (train eps = {_fmt(train_eps)}) on {result['n_eval']} test images",
        "",
        f"| metric (eval eps={_fmt(eval_eps)}) | value |",
        "|---|---|",
        f"| clean accuracy | {_fmt(result['clean_acc'])} |",
        f"| FGSM accuracy | {_fmt(result['fgsm_acc'])} |",
        f"| PGD-{cfg['eval_pgd_steps']} accuracy (step {_fmt(result.get('pgd_step_size', cfg.get('step_size')))}) | "
        f"{_fmt(result['pgd_acc'])} |",
        f"| CW-Linf ({cfg['eval_cw_steps']} steps of {_fmt(result.get('cw_step_size', cfg.get('step_size')))}) "
        f"accuracy | {_fmt(result['cw_acc'])} |",
    ]
    aa = result.get("autoattack")
    if aa:
        after = ", ".join(f"{k} {_fmt(v)}" for k, v in aa.get("after_attack", {}).items())
        lines.append(f"| AutoAttack ({aa['version']}: {' + '.join(aa['attacks'])}; pyautoattack) on the first "
                     f"{aa['n']} images | {_fmt(aa['robust_acc'])} |")
        if after:
            lines.append(f"| AutoAttack cascade (accuracy after each attack) | {after} |")
    if "worst_acc" in result:
        lines.append(f"| worst case per image over all attacks run ({result.get('n_worst', result['n_eval'])} "
                     f"images) | {_fmt(result['worst_acc'])} |")
    lines += [
        f"| sparsity (masked layers) | {_fmt(result['sparsity'])} |",
        f"| max / median kappa | {_fmt(result['kappa_max'])} / {_fmt(result['kappa_median'])} |",
        f"| layers with kappa = inf | {result['n_layers_kappa_inf']} |",
    ]
    if "train_time_s" in result:
        lines.append(f"| wall time, training + evaluation (s) | {result['train_time_s']:.1f} |")
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


# the stems of the reports written into a run folder: `fastcnc train`'s and `fastcnc eval`'s
REPORT_STEMS = ("report", "eval")


def report_paths(out: str | Path, stem: str = "report") -> list[Path]:
    """The files ``write_report(out, result, stem)`` writes: ``{stem}.json``, ``{stem}.md``, ``kappa.png`` and
    ``accuracy.png`` (``{stem}_kappa.png``, ``{stem}_accuracy.png`` for other stems)."""
    out = Path(out)
    prefix = "" if stem == "report" else f"{stem}_"
    return [out / f"{stem}.json", out / f"{stem}.md", out / f"{prefix}kappa.png", out / f"{prefix}accuracy.png"]


def write_report(out: str | Path, result: dict, stem: str = "report") -> list[Path]:
    """Write ``{stem}.json``, ``{stem}.md``, ``kappa.png`` and ``accuracy.png`` (``{stem}_kappa.png``,
    ``{stem}_accuracy.png`` for other stems) into ``out``."""
    paths = report_paths(out, stem)
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(render_markdown(result))
    _plot_kappa([(result["config"]["out"], result)], paths[2])
    _plot_accuracy(result, paths[3])
    return paths


def load_result(run: str | Path) -> dict:
    path = Path(run)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give run folders (or their report.json) written by fastcnc train")
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a report.json written by fastcnc train (give the run folder): {e}") from None
    if not isinstance(result, dict) or "config" not in result:
        raise ValueError(f"{path} is not a report.json written by fastcnc train (give the run folder)")
    return result


def compare_runs(runs: list[str | Path], out: str | Path) -> list[Path]:
    """Table of several runs (one row each), accuracy-vs-sparsity plot and kappa overlay, written into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = [(str(r), load_result(r)) for r in runs]
    # the evaluation's radius and image counts beside the accuracies: rows evaluated differently are not comparable
    lines = ["| run | model | adv | tscnc | seed | sparsity | eval eps | images | clean | FGSM | PGD | CW | worst case "
             "(images) | max kappa | median kappa |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results:
        c = r["config"]
        worst = f"{_fmt(r['worst_acc'])} ({r.get('n_worst', '?')})" if "worst_acc" in r else "-"
        lines.append(f"| {name} | {c['model']} | {c['adv']} | {'on' if c['tscnc'] else 'off'} | {c['seed']} | "
                     f"{_fmt(r['sparsity'])} | {_fmt(r.get('eval_eps', math.nan))} | {r.get('n_eval', '?')} | "
                     f"{_fmt(r['clean_acc'])} | {_fmt(r['fgsm_acc'])} | {_fmt(r['pgd_acc'])} | {_fmt(r['cw_acc'])} | "
                     f"{worst} | {_fmt(r['kappa_max'])} | {_fmt(r['kappa_median'])} |")
    if len({(r.get("eval_eps"), r.get("n_eval")) for _, r in results}) > 1:
        lines += ["", "**The rows were evaluated at different radii or on different numbers of images.**"]
    md = out / "comparison.md"
    md.write_text("\n".join(lines) + "\n")
    keys = ("sparsity", "eval_eps", "n_eval", "clean_acc", "fgsm_acc", "pgd_acc", "cw_acc", "worst_acc", "n_worst",
            "kappa_max", "kappa_median")
    (out / "comparison.json").write_text(json.dumps(
        [{"run": n, **{k: r[k] for k in keys if k in r}, "config": r["config"]} for n, r in results], indent=1))
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
