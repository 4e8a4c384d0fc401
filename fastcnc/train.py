"""The training loop: adversarial training (PGD or TRADES), magnitude pruning then fine-tuning, optional TSCNC.

One function, ``train(cfg) -> dict``, runs a whole job: dense adversarial training, a pruning stage (one-shot or
gradual, from ``fastcnc.pruning``), fine-tuning at the final sparsity, then the robustness evaluation and the report.
It writes ``metrics.jsonl``, ``checkpoint.pt`` (atomically, every ``checkpoint_every`` steps and at epoch ends) and
``report.{md,json}`` plus plots to ``cfg.out``. ``train(cfg, resume=True)`` continues from the checkpoint and on CPU
ends bit-identical to an uninterrupted run. Under ``torchrun`` it trains with DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastcnc.attacks import pgd, trades_adversary, trades_loss
from fastcnc.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from fastcnc.config import (
    RUN_CONTROL_FIELDS,
    Config,
    config_from_dict,
    config_to_dict,
    parse_block,
    parse_milestones,
    train_step_size,
    validate,
)
from fastcnc.data import TensorLoader, augment_crop_flip, load_dataset
from fastcnc.models import build_model
from fastcnc.pruning import GradualPruner, apply_masks, prune_magnitude, sparsity_report

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class OutputDirError(RuntimeError):
    """The output folder cannot be created or written."""


# ---------------------------------------------------------------- setup helpers


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device named by the config field ``device``; ValueError (a configuration mistake, reported by the CLI like
    any other) when it names a GPU this machine does not have."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config field 'device' is {name!r} but CUDA is not available on this machine; "
                         "use 'cpu' or 'auto'")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ValueError(f"config field 'device' is {name!r} but this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def check_output_dir(out: str | Path) -> Path:
    """Create ``out`` and prove it is writable before any training starts."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output folder {str(path)!r} is not writable: it exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        try:
            probe.write_bytes(b"ok")
        finally:  # a full disk creates the file, then fails the write: leave no debris
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise OutputDirError(f"output folder {str(path)!r} is not writable: {exc.strerror or exc}") from exc
    return path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_sparsity(model: nn.Module) -> float:
    """Fraction of pruned entries over all masked layers."""
    return sparsity_report(model)[-1]["sparsity"]


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str, milestones: list[float],
              gamma: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return gamma ** sum(step >= round(m * total_steps) for m in milestones)


def build_regularizer(cfg: Config, model: nn.Module):
    """``fastcnc.TSCNC`` on the unwrapped model, or None when ``cfg.tscnc`` is off."""
    if not cfg.tscnc:
        return None
    from fastcnc.regularizer import TSCNC

    return TSCNC(model, lambda_tsc=cfg.lambda_tsc, lambda_cnc=cfg.lambda_cnc, cnc=cfg.cnc,
                 kappa_target=cfg.kappa_target, eps=cfg.cnc_eps, a=cfg.tsc_a, rtol=cfg.cnc_rtol, iters=cfg.cnc_iters,
                 block=cfg.cnc_block, max_rounds=cfg.cnc_max_rounds, smooth_min=cfg.cnc_smooth_min,
                 refresh_every=cfg.cnc_refresh_every)


class _Pruning:
    """The pruning stage, in optimizer steps: one-shot ``prune_magnitude``, a ``GradualPruner``, or HYDRA's score
    optimisation (``fastcnc.hydra``: dense pre-training before ``prune_start_epoch``, scores only until
    ``prune_end_epoch``, then fine-tuning under the fixed top-k mask)."""

    def __init__(self, cfg: Config, model: nn.Module, steps_per_epoch: int):
        self.cfg, self.model = cfg, model
        # optimizer steps run 0 .. total-1: clamp so that the final sparsity is always reached inside the run
        last = cfg.epochs * steps_per_epoch - 1
        self.start = min(round(cfg.prune_start_epoch * steps_per_epoch), last)
        self.end = min(round(cfg.prune_end_epoch * steps_per_epoch), last)
        self.kwargs = {"scope": cfg.prune_scope, "block": parse_block(cfg.prune_block),
                       "keep_first_last": cfg.keep_first_last}
        self.gradual = self.hydra = None
        if cfg.prune == "gradual" and self.end > self.start:
            self.gradual = GradualPruner(model, cfg.sparsity, self.start, self.end, cfg.prune_frequency,
                                         **self.kwargs)
        if cfg.prune == "hydra":
            from fastcnc.hydra import HydraPruner, HydraSchedule

            if self.end <= self.start:
                raise ValueError("prune='hydra': the score stage (prune_start_epoch -> prune_end_epoch) is shorter "
                                 "than one optimizer step")
            pruner = HydraPruner(model, cfg.sparsity, scope=cfg.prune_scope, keep_first_last=cfg.keep_first_last)
            self.hydra = HydraSchedule(pruner, self.start, self.end, lr=cfg.hydra_score_lr, momentum=cfg.momentum,
                                       weight_decay=cfg.hydra_score_weight_decay)
            pruner.to(next(model.parameters()).device)

    @property
    def scoring(self) -> bool:
        """True during HYDRA's score stage (the network's parameters are frozen)."""
        return self.hydra is not None and self.hydra.scoring

    def after_backward(self) -> None:
        """Called after the backward of every optimizer step: HYDRA's score update (a no-op otherwise)."""
        if self.hydra is not None:
            self.hydra.optimizer_step()

    def step(self, step: int) -> None:
        """Called before the forward of optimizer step ``step``."""
        if self.cfg.prune == "none":
            return
        if self.hydra is not None:
            self.hydra.step(step)
        elif self.gradual is not None:
            self.gradual.step(step)
        elif step == self.start:
            prune_magnitude(self.model, self.cfg.sparsity, **self.kwargs)

    def state_dict(self) -> dict | None:
        if self.hydra is not None:
            return {"hydra": self.hydra.state_dict()}
        return self.gradual.state_dict() if self.gradual is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.hydra is not None and state is not None:
            self.hydra.load_state_dict(state["hydra"])
        elif self.gradual is not None and state is not None:
            self.gradual.load_state_dict(state)


def _metrics_writer(path: Path, keep_until_step: int | None):
    """Open ``metrics.jsonl``: truncated for a fresh run; on resume, lines written after the checkpoint are dropped,
    so the file ends up exactly as an uninterrupted run would have written it."""
    lines = []
    if keep_until_step is not None and path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if record.get("step", 0) <= keep_until_step and record.get("event") != "final":
                lines.append(line)
    # the kept lines go to a temporary file that replaces the old one atomically: truncating the file in place and
    # rewriting it would lose the whole history to a kill in between
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.writelines(line + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return open(path, "a")


def _compatible(saved: dict, cfg: Config) -> list[str]:
    saved = config_to_dict(config_from_dict(saved))  # a checkpoint of an older version: current names and defaults
    current = config_to_dict(cfg)
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in current.items()
            if k not in RUN_CONTROL_FIELDS and saved.get(k) != v]


# ---------------------------------------------------------------- main loop


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run the job described by ``cfg``; return the final evaluation (the content of ``report.json``; empty on
    ranks other than 0).

    Args:
        resume: continue from ``cfg.out/checkpoint.pt`` when it exists (start fresh when it does not).
        overwrite: start fresh even if ``cfg.out`` already holds a checkpoint (a fresh start deletes the reports left
            there by an earlier run).
    """
    return fit(cfg, resume=resume, overwrite=overwrite)[0]


def fit(cfg: Config, *, resume: bool = False, overwrite: bool = False):
    """``train`` that also returns the trained (unwrapped) model and the regulariser: ``(result, model, reg)``."""
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run in cfg.out, or start it again")
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    distributed = world_size > 1
    if distributed and cfg.prune == "hydra":
        raise ValueError("prune='hydra' runs in one process (its scores live outside DistributedDataParallel); "
                         "use prune='gradual' under torchrun")
    device = resolve_device(cfg.device, local_rank)
    owns_group = False
    if distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns_group = True
    is_main = rank == 0
    try:
        return _train(cfg, resume, overwrite, device, rank, world_size, is_main)
    finally:
        if owns_group:
            dist.destroy_process_group()


def autocast_context(device: torch.device, amp: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the forward's autocast context: bf16 autocast on CUDA when ``amp`` is on, else a no-op (CPU
    autocast would change the numerics the CPU tests and the bit-exact resume rely on)."""
    if device.type == "cuda" and amp:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def memory_format_for(device: torch.device, channels_last: bool) -> torch.memory_format:
    return torch.channels_last if (device.type == "cuda" and channels_last) else torch.contiguous_format


@dataclasses.dataclass
class _Run:
    """Everything a job holds between setup (``_setup``), the epoch loop (``_run_epochs``) and the end (``_finish``)."""

    cfg: Config
    device: torch.device
    rank: int
    world_size: int
    is_main: bool
    out: Path
    amp_ctx: Callable[[], contextlib.AbstractContextManager]
    memory_format: torch.memory_format
    x_test: torch.Tensor
    y_test: torch.Tensor
    loader: TensorLoader
    raw_model: nn.Module  # the model itself; `model` is its DDP wrapper under torchrun, else the same object
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    pruning: _Pruning
    reg: nn.Module | None
    total_steps: int
    step: int = 0
    start_epoch: int = 0
    start_batch: int = 0
    metrics: IO[str] | None = None
    t_start: float = 0.0
    elapsed_before: float = 0.0  # seconds of training in earlier segments of a resumed run (from the checkpoint)

    def elapsed(self) -> float:
        """Seconds of this run's training (and evaluation), summed over every segment of a resumed run."""
        return self.elapsed_before + time.perf_counter() - self.t_start

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def ckpt_path(self) -> Path:
        return self.out / CHECKPOINT_NAME

    def last_good(self) -> str:
        return f"The last good checkpoint is kept at {self.ckpt_path}" + (
            "" if self.ckpt_path.exists() else " (none written yet)")

    def log(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def checkpoint(self, epoch: int, batch: int, loader_state: dict) -> None:
        # a finite loss can still have an inf/NaN gradient: never let the weights it produced replace a good checkpoint
        names, params = zip(*self.raw_model.named_parameters(), strict=True)
        finite = torch.stack([torch.isfinite(p).all() for p in params]).cpu()  # one device sync
        if not bool(finite.all()):
            bad = names[int((~finite).nonzero()[0, 0])]
            raise NonFiniteLossError(
                f"weights became NaN/Inf at step {self.step} (first: {bad}) although the loss was finite (a non-finite "
                f"gradient); stopping without saving them. {self.last_good()}. Lower lr and restart.")
        rngs = [rng_state()]
        if self.distributed:
            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, rng_state())
        if not self.is_main:
            return
        save_checkpoint(self.ckpt_path, {
            "config": config_to_dict(self.cfg), "world_size": self.world_size, "step": self.step, "epoch": epoch,
            "batch": batch, "model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "pruner": self.pruning.state_dict(),
            "regularizer": self.reg.state_dict() if self.reg is not None else None, "loader": loader_state,
            "rng": rngs, "elapsed_s": self.elapsed(), "intra_op_threads": torch.get_num_threads(),
        })


def _train(cfg: Config, resume: bool, overwrite: bool, device: torch.device, rank: int, world_size: int,
           is_main: bool) -> tuple[dict, nn.Module, nn.Module | None]:
    run = _setup(cfg, resume, overwrite, device, rank, world_size, is_main)
    _run_epochs(run)
    return _finish(run), run.raw_model, run.reg


def _resume_state(cfg: Config, out: Path, resume: bool, overwrite: bool, world_size: int) -> dict | None:
    """The checkpoint to continue from (None for a fresh run); refuses to overwrite a run unless asked."""
    ckpt_path = out / CHECKPOINT_NAME
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        mismatch = _compatible(state["config"], cfg)
        if mismatch:
            raise CheckpointError(f"{ckpt_path} was written by a different configuration; refusing to resume:\n  "
                                  + "\n  ".join(mismatch))
        if state["world_size"] != world_size:
            raise CheckpointError(f"{ckpt_path} was written with {state['world_size']} processes, now {world_size}")
        threads = state.get("intra_op_threads")  # (absent in checkpoints of older versions)
        if threads is not None and threads != torch.get_num_threads():
            # CPU kernels split their sums by thread count: the run goes on correctly, but not bit-identically
            warnings.warn(f"resuming with {torch.get_num_threads()} intra-op threads where {ckpt_path} was written "
                          f"with {threads}: on CPU the result will differ in the last bits from an uninterrupted run "
                          f"(set --threads {threads} to resume bit-identically)", RuntimeWarning, stacklevel=2)
        return state
    if ckpt_path.exists() and not overwrite and not resume:
        raise OutputDirError(f"{str(out)!r} already holds a run ({CHECKPOINT_NAME}); pass --resume to continue it, "
                             "--overwrite to start again, or choose another --out")
    return None


def _remove_reports(out: Path) -> None:
    """Delete the reports of an earlier run in ``out`` before a fresh run starts there: a run that then crashes must
    not leave them beside its own checkpoint, describing weights they were not computed from."""
    from fastcnc.report import REPORT_STEMS, report_paths

    for stem in REPORT_STEMS:
        for path in report_paths(out, stem):
            path.unlink(missing_ok=True)


def _check_disk_space(out: Path, model: nn.Module) -> None:
    """A checkpoint (weights, masks, optimizer state) must fit next to the previous one: checked before training, on
    every rank (like check_output_dir) so that all fail together."""
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    need, free = 3 * weight_bytes + (1 << 20), shutil.disk_usage(out).free
    if free < need:
        raise OutputDirError(f"output folder {str(out)!r} has {free / 2**20:.1f} MiB free; a checkpoint of this run "
                             f"needs about {need / 2**20:.1f} MiB")


def _setup(cfg: Config, resume: bool, overwrite: bool, device: torch.device, rank: int, world_size: int,
           is_main: bool) -> _Run:
    """Data, model, optimizer, pruning and regulariser, restored from the checkpoint when resuming. The order of the
    random draws here is part of the bit-exact resume contract: do not reorder."""
    out = check_output_dir(cfg.out)  # every rank checks, so a bad path fails everywhere before any work
    state = _resume_state(cfg, out, resume, overwrite, world_size)
    if state is None and is_main:
        _remove_reports(out)
    memory_format = memory_format_for(device, cfg.channels_last)

    # the model is initialised identically on every rank; DDP also broadcasts rank 0's
    seed_everything(cfg.seed)
    data = load_dataset(cfg.dataset, cfg.data_dir)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    loader = TensorLoader(x_train, y_train, cfg.batch_size, shuffle=True, seed=cfg.seed, rank=rank,
                          world_size=world_size)
    raw_model = build_model(cfg.model, data.num_classes, data.in_channels, cfg.stem, cfg.width)
    raw_model = raw_model.to(device=device, memory_format=memory_format)
    model: nn.Module = raw_model
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(raw_model,
                                                    device_ids=[device.index] if device.type == "cuda" else None)
    seed_everything(cfg.seed + 1 + rank)  # per-rank streams for PGD random starts and augmentation

    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = torch.optim.SGD(raw_model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    milestones = parse_milestones(cfg.milestones)
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, total_steps=total_steps, warmup_steps=warmup_steps, schedule=cfg.schedule, milestones=milestones,
        gamma=cfg.gamma))
    run = _Run(cfg=cfg, device=device, rank=rank, world_size=world_size, is_main=is_main, out=out,
               amp_ctx=autocast_context(device, cfg.amp), memory_format=memory_format,
               x_test=data.x_test.to(device), y_test=data.y_test.to(device), loader=loader, raw_model=raw_model,
               model=model, optimizer=optimizer, scheduler=scheduler,
               pruning=_Pruning(cfg, raw_model, steps_per_epoch), reg=build_regularizer(cfg, raw_model),
               total_steps=total_steps)
    if run.reg is not None:
        run.reg.to(device)
    _check_disk_space(out, raw_model)
    if state is not None:
        _restore(run, state)
    if is_main:
        run.metrics = _metrics_writer(out / METRICS_NAME, run.step if state is not None else None)
        what = f"resumed at step {run.step}/{total_steps}" if state is not None else f"{total_steps} steps"
        print(f"fastcnc: {cfg.model} on {cfg.dataset} ({len(x_train)} train / {len(run.x_test)} test), {cfg.epochs} "
              f"epochs x {steps_per_epoch} steps = {what}; adv={cfg.adv} prune={cfg.prune}->{cfg.sparsity:.0%} "
              f"tscnc={'on' if run.reg is not None else 'off'}; device={device} world={world_size}; out={out}",
              file=sys.stderr, flush=True)
    return run


def _restore(run: _Run, state: dict) -> None:
    # checkpoints may also hold a "scaler" entry (a disabled GradScaler, written by older versions): bf16 autocast
    # needs no loss scaling, so it is ignored
    run.raw_model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.pruning.load_state_dict(state["pruner"])
    if run.reg is not None:
        run.reg.load_state_dict(state["regularizer"])
    run.loader.load_state_dict(state["loader"])
    set_rng_state(state["rng"][run.rank])
    run.step, run.start_epoch, run.start_batch = state["step"], state["epoch"], state["batch"]
    run.elapsed_before = float(state.get("elapsed_s", 0.0))  # (absent from checkpoints before it existed)


def _run_epochs(run: _Run) -> None:
    """Train from ``run.step`` to the end: per epoch the batches, a clean test accuracy and a checkpoint."""
    from fastcnc.evaluate import clean_accuracy

    cfg, loader = run.cfg, run.loader
    steps_per_epoch = len(loader)
    progress = None
    if cfg.progress and run.is_main:
        from tqdm import tqdm

        progress = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr)
    run.t_start = time.perf_counter()
    try:
        for epoch in range(run.start_epoch, cfg.epochs):
            loader.begin_epoch()
            run.raw_model.train()
            first = run.start_batch if epoch == run.start_epoch else 0
            for batch, (xb, yb) in enumerate(loader.batches(start=first), start=first):
                loss, penalty, correct = _train_batch(run, epoch, xb, yb)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{float(loss.detach()):.3f}",
                                         lr=f"{run.scheduler.get_last_lr()[0]:.3g}")
                if run.step % cfg.log_every == 0:
                    run.log({"event": "step", "step": run.step, "epoch": epoch, "loss": float(loss.detach()),
                             "penalty": None if penalty is None else float(penalty.detach()),
                             "train_adv_acc": correct / len(yb), "lr": run.scheduler.get_last_lr()[0],
                             "sparsity": model_sparsity(run.raw_model), "time_s": run.elapsed()})
                if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and batch + 1 < steps_per_epoch:
                    run.checkpoint(epoch, batch + 1, loader.state_dict())
            # epoch end: the next epoch draws its permutation from the generator's current state
            if run.is_main:
                acc = clean_accuracy(run.raw_model, run.x_test, run.y_test, cfg.eval_batch_size, run.amp_ctx,
                                     run.memory_format)
                run.log({"event": "epoch", "step": run.step, "epoch": epoch, "test_clean_acc": acc,
                         "sparsity": model_sparsity(run.raw_model), "time_s": run.elapsed()})
            run.checkpoint(epoch + 1, 0, {"generator": loader.generator.get_state()})
            if run.distributed:
                dist.barrier()
    except BaseException:
        if run.metrics is not None:
            run.metrics.close()
        raise
    finally:
        if progress is not None:
            progress.close()


def _train_batch(run: _Run, epoch: int, xb: torch.Tensor, yb: torch.Tensor):
    """One optimizer step; returns ``(task loss, penalty or None, correct predictions)``."""
    cfg = run.cfg
    run.pruning.step(run.step)
    if cfg.augment:
        xb = augment_crop_flip(xb)
    xb = xb.contiguous(memory_format=run.memory_format)
    loss, correct = _train_step(cfg, run.model, run.raw_model, xb, yb, run.amp_ctx)
    penalty = _penalty(run)
    total = loss if penalty is None else loss + penalty
    finite = torch.isfinite(total.detach()).float()
    if run.distributed:  # every rank must stop at the same step
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() < 1:
        raise NonFiniteLossError(
            f"training loss is {float(total.detach()):.4g} at step {run.step} (epoch {epoch}); stopping. "
            f"{run.last_good()}. Lower lr or the regulariser weights and restart.")
    run.optimizer.zero_grad(set_to_none=True)
    total.backward()
    run.optimizer.step()
    run.pruning.after_backward()
    run.scheduler.step()
    apply_masks(run.raw_model)
    run.step += 1
    return loss, penalty, correct


def _penalty(run: _Run) -> torch.Tensor | None:
    """TSCNC and the reproduction-only code-form CNC; none while HYDRA optimises scores (the weights they penalise
    are frozen then)."""
    if run.pruning.scoring:
        return None
    penalty = run.reg() if run.reg is not None else None
    if run.cfg.lambda_paper_cnc > 0:
        from fastcnc.paper import paper_cnc_penalty

        paper = run.cfg.lambda_paper_cnc * paper_cnc_penalty(run.raw_model, ridge=run.cfg.paper_cnc_ridge)
        penalty = paper if penalty is None else penalty + paper
    return penalty


def _finish(run: _Run) -> dict:
    """Share rank 0's buffers, evaluate, write the report (rank 0; the others wait); return the result."""
    from fastcnc.evaluate import evaluate_run
    from fastcnc.report import write_report

    cfg = run.cfg
    if run.distributed:
        # DDP syncs buffers (batch-norm statistics, masks) from rank 0 at every forward, so after the last one the
        # other ranks hold their own shard's statistics: give every rank rank 0's, the ones the checkpoint holds
        with torch.no_grad():
            for buffer in run.raw_model.buffers():
                dist.broadcast(buffer, 0)
    result: dict = {}
    if run.is_main:
        result = evaluate_run(cfg, run.raw_model, run.x_test, run.y_test, reg=run.reg, amp_ctx=run.amp_ctx,
                              memory_format=run.memory_format)
        result["train_time_s"] = run.elapsed()
        result["steps"] = run.step
        run.log({"event": "final", "step": run.step,
                 **{k: v for k, v in result.items() if not isinstance(v, (list, dict))}})
        run.metrics.close()
        write_report(run.out, result)
        aa = f"  AutoAttack-{cfg.autoattack} {result['autoattack_acc']:.4f}" if "autoattack_acc" in result else ""
        print(f"fastcnc: eps {result['eval_eps']:.4g}: clean {result['clean_acc']:.4f}  FGSM {result['fgsm_acc']:.4f}"
              f"  PGD-{cfg.eval_pgd_steps} {result['pgd_acc']:.4f}  CW {result['cw_acc']:.4f}{aa}  worst "
              f"{result['worst_acc']:.4f}  sparsity {result['sparsity']:.4f}; report: {run.out / 'report.md'}",
              file=sys.stderr, flush=True)
    if run.distributed:
        dist.barrier()
    return result


def _train_step(cfg: Config, model: nn.Module, raw_model: nn.Module, xb, yb, amp_ctx) -> tuple[torch.Tensor, int]:
    """Craft the adversarial batch (on the unwrapped model in eval mode, so DDP sees one forward per step and
    batch-norm statistics only see training forwards) and return the task loss and the number of correct
    predictions on the batch the loss was computed on."""
    if cfg.adv == "none":
        with amp_ctx():
            logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
        return loss, int((logits.argmax(1) == yb).sum())
    raw_model.eval()
    with amp_ctx():
        if cfg.adv == "pgd":
            x_adv = pgd(raw_model, xb, yb, eps=cfg.attack_eps, step_size=train_step_size(cfg), steps=cfg.attack_steps)
        else:
            x_adv = trades_adversary(raw_model, xb, eps=cfg.attack_eps, step_size=train_step_size(cfg),
                                     steps=cfg.attack_steps)
    raw_model.train()
    with amp_ctx():
        if cfg.adv == "pgd":
            logits = model(x_adv)
            loss = F.cross_entropy(logits.float(), yb)
        else:
            # two forwards, as in the TRADES reference (separate batch-norm statistics); DDP allows several
            # forwards before one backward when every parameter is used
            logits_clean, logits = model(xb), model(x_adv)
            loss = trades_loss(logits_clean, logits, yb, cfg.trades_beta)
    return loss, int((logits.argmax(1) == yb).sum())
