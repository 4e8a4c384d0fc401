"""Argument validation shared by every public entry point: errors name the argument and what was expected."""

from __future__ import annotations

import numbers

import numpy
import torch

from fastcnc import _backend


def check_tensor(name: str, t, *, ndim: int | tuple[int, ...] | None = None, floating: bool = False,
                 finite: bool = False, nonempty: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout} (use .to_dense())")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, "
                             f"got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    if finite and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf; expected finite values")
    return t


def check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    # numbers.Real: numpy's scalars too (np.float32 is no float subclass)
    if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (value >= 0 if allow_zero else value > 0) or value != value or value == float("inf"):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value}")
    return float(value)


def check_int(name: str, value, *, minimum: int = 0) -> int:
    if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, numbers.Integral):  # (numpy ints too)
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_mask(mask, weight: torch.Tensor) -> torch.Tensor:
    """A binary pruning mask for ``weight``: same shape and device, dtype bool/integer/floating, entries 0 or 1.

    Checking "binary" reads every entry (a device sync on CUDA): layers check once in ``set_mask``, not per forward.
    """
    check_tensor("mask", mask)
    if mask.shape != weight.shape:
        raise ValueError(f"mask must have the weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"mask must be on the weight's device {weight.device}, got {mask.device}")
    if mask.is_complex():
        raise TypeError(f"mask must be bool, integer or floating, got dtype {mask.dtype}")
    if mask.dtype != torch.bool and mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must be binary (only 0 and 1 entries)")
    return mask


def check_eps_floor(name: str, value) -> float:
    """A relative sigma_min floor in (0, 1), such as cnc_penalty's ``eps``: kappa is capped at ``1 / eps``."""
    value = check_positive(name, value)
    if value >= 1:
        raise ValueError(f"{name} must be < 1 (kappa is capped at 1/{name}), got {value}")
    return value


def check_images(name: str, x, *, nonempty: bool = False) -> torch.Tensor:
    """A batch of images in [0, 1]: a floating-point tensor ``[N, ...]`` (at least 2 dimensions).

    The value range is checked on CPU tensors only. Reading a CUDA tensor's values on the host stalls the stream, and
    adversarial training calls the attacks every step, so on CUDA (and inside ``_backend.cuda_code_path()``) an input
    outside [0, 1] is not detected: the attacks' projection onto the box then moves it into [0, 1].
    """
    check_tensor(name, x, floating=True, nonempty=nonempty)
    if x.dim() < 2:
        raise ValueError(f"{name} must be a batch [N, ...] with at least 2 dimensions, got shape {tuple(x.shape)}")
    if x.numel() and x.device.type == "cpu" and not _backend.on_cuda(x):
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))  # NaN anywhere makes both NaN
        if lo != lo:
            raise ValueError(f"{name} contains NaN; expected images with values in [0, 1]")
        if not (lo >= 0 and hi <= 1):
            raise ValueError(f"{name} must hold images with values in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return x


def check_labels(name: str, y, n: int, *, images: str = "x", dtype: torch.dtype | None = torch.int64) -> torch.Tensor:
    """Class labels ``[n]``, one per image of the batch ``images``; int64 unless ``dtype`` is None (the attacks need
    int64: cross-entropy and ``gather`` take nothing else)."""
    check_tensor(name, y, ndim=1)
    if dtype is not None and y.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} class labels, got dtype {y.dtype}")
    if len(y) != n:
        raise ValueError(f"{name} must have the same length as {images} ({n}), got {len(y)}")
    return y
