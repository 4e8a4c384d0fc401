"""Atomic, self-describing training checkpoints.

A checkpoint is written to a temporary file in the destination folder, flushed and fsync'ed, then renamed over the
old one with ``os.replace`` (atomic on POSIX), so a run killed at any moment leaves either the previous or the new
checkpoint, never a torn one. Files are loaded with ``torch.load(weights_only=True)`` (no arbitrary pickles) and must
carry the fastcnc format tag; anything else is refused with ``CheckpointError``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

FORMAT = "fastcnc-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """The file is not a usable fastcnc checkpoint (corrupt, foreign, or from an incompatible run)."""


def _save_with_crc(payload: dict, f) -> None:
    # load_checkpoint verifies the per-record CRC-32 of the zip: make sure torch computed them
    get, put = (getattr(torch.serialization, n, None) for n in ("get_crc32_options", "set_crc32_options"))
    old = get() if get is not None else True
    if not old:
        put(True)
    try:
        torch.save(payload, f)
    finally:
        if not old:
            put(False)


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` (plus the format tag) to ``path`` atomically."""
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _save_with_crc(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        # a full disk surfaces from torch's zip writer as a RuntimeError whose context holds the OSError: report that
        os_error = _os_error_in(exc)
        if os_error is not None:
            raise OSError(os_error.errno, f"could not write checkpoint {path}: {os_error.strerror or os_error}; the "
                                          "previous checkpoint is kept") from exc
        raise
    # make the rename itself durable
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    # a writer killed between mkstemp and os.replace left its temporary file behind: one writer per checkpoint path
    # (rank 0), so any other temporary file of this path is stale once this write has landed
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def _os_error_in(exc: BaseException) -> OSError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load and validate a checkpoint written by ``save_checkpoint``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:  # torch.save writes a zip with a CRC-32 per record, which torch.load does not check: bit rot would load
        with zipfile.ZipFile(path) as archive:
            bad_record = archive.testzip()
    except Exception:  # not a zip at all: let torch.load below give its reason
        bad_record = None
    if bad_record is not None:
        raise CheckpointError(f"{path} is corrupt: record {bad_record!r} fails its CRC-32 check (bit rot or a damaged "
                              "copy); restore it from a backup or start again")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/foreign files
        raise CheckpointError(f"{path} is not a readable fastcnc checkpoint (corrupt or foreign file): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastcnc checkpoint (no '{FORMAT}' format tag)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {state.get('version')}, expected {VERSION}")
    return state


def rng_state() -> dict:
    """Every RNG the training loop draws from (the data-order generator is saved by the loader itself)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        # numpy/python states converted to tensors and lists so that weights_only loading accepts them
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
