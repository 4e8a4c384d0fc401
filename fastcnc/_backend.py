"""The one place that decides whether a tensor goes to the Triton kernels or to the pure-torch reference path.

Rule: CUDA tensors -> compiled Triton kernels; CPU tensors -> pure torch. ``force_backend("triton")`` (or the
environment variable ``FASTCNC_BACKEND=triton``) sends CPU tensors to the kernels too, which only works under
``TRITON_INTERPRET=1`` (set before triton is imported); that is how the test-suite checks the kernels without a GPU.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:  # triton is optional for CPU users
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton installed
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

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


def current_backend() -> str | None:
    return _forced


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


def kernels():
    """Import the Triton launchers lazily, so CPU-only users never pay for (or need) triton."""
    from fastcnc import kernels as k

    return k
