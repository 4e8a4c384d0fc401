"""The one place that imports ``fastcnc.kernels`` and decides whether a tensor goes to the Triton kernels or to the
pure-torch path.

Rule: CUDA tensors -> compiled Triton kernels; CPU tensors -> pure torch. ``force_backend("triton")`` (or the
environment variable ``FASTCNC_BACKEND=triton``) sends CPU tensors to the kernels too, which only works under
``TRITON_INTERPRET=1`` (set before triton is imported); that is how the test-suite checks the kernels without a GPU.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType

import torch

try:  # triton is optional for CPU users
    # kernels/_common.py reads TRITON_INTERPRET itself (kernels must not import fastcnc); taking the flag from there
    # keeps a single definition that the launchers and this dispatch both see
    from fastcnc.kernels._common import INTERPRET

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton installed
    HAS_TRITON = False
    INTERPRET = False  # the interpreter is part of triton: without triton there is nothing to interpret

_forced: str | None = None
_cuda_code_path = False


def force_backend(name: str | None) -> None:
    """Force every dispatch to ``"torch"`` or ``"triton"``; ``None`` restores the default rule."""
    global _forced
    if name not in (None, "torch", "triton"):
        raise ValueError(f"backend must be None, 'torch' or 'triton', got {name!r}")
    if name == "triton" and not HAS_TRITON:
        raise RuntimeError("backend 'triton' requested but triton is not installed (pip install 'fastcnc[triton]')")
    _forced = name


force_backend(os.environ.get("FASTCNC_BACKEND") or None)


@contextlib.contextmanager
def cuda_code_path():
    """Inside, CPU tensors take every branch CUDA tensors take (``use_triton`` and ``on_cuda`` are True), so the
    host-sync tests (tests/sync_count.py) can run the CUDA code path on CPU; needs TRITON_INTERPRET=1."""
    global _cuda_code_path
    if not INTERPRET:
        raise RuntimeError("cuda_code_path() runs the kernels on CPU tensors: it needs TRITON_INTERPRET=1 set before "
                           "triton is imported")
    previous, _cuda_code_path = _cuda_code_path, True
    try:
        yield
    finally:
        _cuda_code_path = previous


def on_cuda(t: torch.Tensor) -> bool:
    """True for CUDA tensors, and for every tensor inside ``cuda_code_path()``: the test for CUDA-only branches."""
    return t.is_cuda or _cuda_code_path


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` should be processed by a Triton kernel (see the module docstring for the rule)."""
    if _cuda_code_path:
        return True
    if _forced is not None:
        if _forced == "triton" and not (t.is_cuda or INTERPRET):
            raise RuntimeError("backend 'triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton is "
                               "imported")
        return _forced == "triton"
    return HAS_TRITON and t.is_cuda


def kernels(name: str) -> ModuleType:
    """The launcher module ``fastcnc.kernels.<name>`` (``"masked_matmul"`` or ``"tsc"``).

    Op modules reach the kernels only through this call (tests patch it to count launches); it is only called
    once ``use_triton`` said yes, so CPU-only users never compile anything.
    """
    return importlib.import_module(f"fastcnc.kernels.{name}")
