"""The one place that decides whether a tensor goes to the Triton kernels or to the pure-torch reference path.

Rule: CUDA tensors -> compiled Triton kernels; CPU tensors -> pure torch. ``force_backend("triton")`` (or the
environment variable ``FASTCNC_BACKEND=triton``) sends CPU tensors to the kernels too, which only works under
``TRITON_INTERPRET=1`` (set before triton is imported); that is how the test-suite checks the kernels without a GPU.
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional for CPU users
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton installed
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_forced: str | None = None


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


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` should be processed by a Triton kernel (see the module docstring for the rule)."""
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
