"""``fastcnc train | eval | report`` (console script; also ``python -m fastcnc``)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import warnings
from pathlib import Path

from fastcnc.config import (
    DEPRECATED_FIELDS,
    Config,
    apply_overrides,
    config_from_dict,
    field_help,
    list_presets,
    load_config,
    parse_assignments,
    validate,
)

# fields that `fastcnc eval` may change on a trained run (the attacks' steps follow eval_eps: 2.5 * eps / steps)
EVAL_FIELDS = ("eval_eps", "eval_pgd_steps", "eval_cw_steps", "eval_batch_size", "eval_max_examples", "autoattack",
               "autoattack_max_examples", "device", "threads", "amp", "channels_last", "progress", "seed", "data_dir")
# in `fastcnc eval`, these names mean the evaluation radius
EVAL_EPS_NAMES = ("eps", "attack_eps")


def _add_field_options(parser: argparse.ArgumentParser, names=None, default_text: str | None = None) -> None:
    """One ``--field V`` option per config field (``names``: only these); ``default_text`` replaces the dataclass
    default in the help where the value comes from elsewhere (``fastcnc eval``: the evaluated run's config)."""
    group = parser.add_argument_group("config fields (each also settable as --set field=value)")
    docs = field_help()
    for f in dataclasses.fields(Config):
        if names is not None and f.name not in names:
            continue
        flags = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"})
        # bools may be given bare (--tscnc) or with a value (--tscnc false)
        extra = {"nargs": "?", "const": "true"} if f.type == "bool" else {}
        default = default_text or f"default {f.default!r}"
        group.add_argument(*flags, dest=f"field_{f.name}", default=None, metavar="V",
                           help=f"{docs.get(f.name, '')} ({f.type}, {default})", **extra)
    for old, new in DEPRECATED_FIELDS.items():
        if names is None or new in names:
            group.add_argument(*sorted({f"--{old}", f"--{old.replace('_', '-')}"}), dest=f"field_{old}", default=None,
                               metavar="V", help=f"deprecated name of --{new.replace('_', '-')}")


def _collect_overrides(args) -> dict:
    values = parse_assignments(args.set or [])
    for key, value in vars(args).items():
        if key.startswith("field_") and value is not None:
            values[key[len("field_"):]] = value
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastcnc", description="Train, evaluate and report pruned robust networks.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="adversarial training + pruning (+ TSCNC), then evaluation and report")
    p.add_argument("--preset", help=f"named preset: {', '.join(list_presets())}")
    p.add_argument("--config", help="TOML file with config fields (applied after the preset)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a config field (repeatable)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    start.add_argument("--overwrite", action="store_true", help="start again even if OUT already holds a run")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    _add_field_options(p)

    p = sub.add_parser("eval", help="evaluate a trained run (its checkpoint) again, e.g. with stronger attacks")
    p.add_argument("run", help="run folder (holding checkpoint.pt) or a checkpoint file")
    p.add_argument("--out", dest="eval_out", help="folder for eval.{json,md} (default: the run folder)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help=f"override one of {', '.join(EVAL_FIELDS)}")
    p.add_argument("--eps", dest="field_eval_eps", default=None, metavar="V",
                   help="evaluation L-inf radius (same as --eval_eps; the PGD/CW steps scale with it)")
    # an evaluation starts from the config stored in the run, not from the dataclass defaults
    _add_field_options(p, EVAL_FIELDS, default_text="default: the run's value")

    p = sub.add_parser("report", help="re-render one run's report, or compare several runs")
    p.add_argument("runs", nargs="+", help="run folders (or report.json files)")
    p.add_argument("--out", default=None, help="output folder (default: the run folder for one run, "
                   "./report for several)")
    return parser


def _to_toml(cfg: Config) -> str:
    lines = []
    for f in dataclasses.fields(Config):
        v = getattr(cfg, f.name)
        lines.append(f"{f.name} = {str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, str) else v}")
    return "\n".join(lines).replace("'", '"') + "\n"


def _cmd_train(args) -> int:
    from fastcnc.train import train

    cfg = load_config(args.preset, args.config, _collect_overrides(args))
    if args.print_config:
        print(_to_toml(cfg), end="")
        return 0
    train(cfg, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0" and Path(cfg.out, "report.md").is_file():  # one print under torchrun
        print(Path(cfg.out, "report.md").read_text())
    return 0


def _cmd_eval(args) -> int:
    import torch

    from fastcnc.checkpoint import load_checkpoint
    from fastcnc.data import load_dataset
    from fastcnc.evaluate import evaluate_run
    from fastcnc.models import build_model
    from fastcnc.report import write_report
    from fastcnc.train import (
        CHECKPOINT_NAME,
        autocast_context,
        build_regularizer,
        check_output_dir,
        memory_format_for,
        resolve_device,
    )

    path = Path(args.run)
    ckpt = path / CHECKPOINT_NAME if path.is_dir() else path
    state = load_checkpoint(ckpt)
    cfg = config_from_dict(state["config"])
    overrides = {("eval_eps" if k.replace("-", "_") in EVAL_EPS_NAMES else k): v
                 for k, v in _collect_overrides(args).items()}
    bad = sorted(set(DEPRECATED_FIELDS.get(k, k) for k in (k.replace("-", "_") for k in overrides)) - set(EVAL_FIELDS))
    if bad:
        raise ValueError(f"fastcnc eval can only change {', '.join(EVAL_FIELDS)}; got {', '.join(bad)}")
    cfg = apply_overrides(cfg, overrides, "command line")
    validate(cfg)
    device = resolve_device(cfg.device)
    out = Path(args.eval_out) if args.eval_out else ckpt.parent
    check_output_dir(out)  # before the evaluation, which can take long
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_dataset(cfg.dataset, cfg.data_dir)
    model = build_model(cfg.model, data.num_classes, data.in_channels, cfg.stem, cfg.width)
    model.load_state_dict(state["model"])
    model.to(device)
    reg = build_regularizer(cfg, model)
    if reg is not None and state.get("regularizer") is not None:
        reg.to(device)
        reg.load_state_dict(state["regularizer"])
    memory_format = memory_format_for(device, cfg.channels_last)
    model.to(memory_format=memory_format)
    result = evaluate_run(cfg, model, data.x_test.to(device), data.y_test.to(device), reg=reg,
                          amp_ctx=autocast_context(device, cfg.amp), memory_format=memory_format)
    paths = write_report(out, result, stem="eval")
    print(paths[1].read_text())
    return 0


def _cmd_report(args) -> int:
    from fastcnc.report import compare_runs, load_result, write_report
    from fastcnc.train import check_output_dir

    if len(args.runs) == 1:
        result = load_result(args.runs[0])
        run = Path(args.runs[0])
        out = check_output_dir(Path(args.out) if args.out else (run if run.is_dir() else run.parent))
        # a file keeps its own stem: eval.json re-rendered must not overwrite the run's training report
        paths = write_report(out, result, run.stem if run.is_file() else "report")
    else:
        paths = compare_runs(args.runs, check_output_dir(args.out or "report"))
    print(paths[1].read_text() if len(args.runs) == 1 else paths[0].read_text())
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


# imported by the training CLI but not by the library: the `train` extra (pyproject.toml)
TRAIN_EXTRA_MODULES = ("tqdm", "matplotlib", "sklearn", "mlxtend") + (("tomli",) if sys.version_info < (3, 11) else ())


def missing_train_extra() -> list[str]:
    import importlib.util

    return [m for m in TRAIN_EXTRA_MODULES if importlib.util.find_spec(m) is None]


def main(argv: list[str] | None = None) -> int:
    from fastcnc.checkpoint import CheckpointError
    from fastcnc.train import NonFiniteLossError, OutputDirError

    args = build_parser().parse_args(argv)
    missing = missing_train_extra()
    if missing:
        print(f"fastcnc {args.command}: error: the training CLI needs {', '.join(missing)}, which the library alone "
              "does not install; run: pip install 'fastcnc[train]'", file=sys.stderr)
        return 1
    handler = {"train": _cmd_train, "eval": _cmd_eval, "report": _cmd_report}[args.command]
    try:
        with _deprecations_shown(args.command):
            return handler(args)
    except (CheckpointError, NonFiniteLossError, OutputDirError, ValueError, FileNotFoundError, ImportError) as exc:
        print(f"fastcnc {args.command}: error: {exc}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def _deprecations_shown(command: str):
    """Print fastcnc's DeprecationWarnings (deprecated config names) and RuntimeWarnings (e.g. a resume with another
    thread count) as one ``fastcnc CMD: warning:`` line each.

    Python's default filters hide DeprecationWarning outside ``__main__``, so a CLI user would never learn that a
    name is going away; the library keeps raising plain warnings for its callers to filter as they like."""
    show_others = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (DeprecationWarning, RuntimeWarning)) and _from_fastcnc(filename):
            print(f"fastcnc {command}: warning: {message}", file=sys.stderr)
        else:
            show_others(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.filterwarnings("always", category=DeprecationWarning, module=r"fastcnc(\.|$)")
        warnings.showwarning = show
        yield


def _from_fastcnc(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent)


if __name__ == "__main__":
    sys.exit(main())
