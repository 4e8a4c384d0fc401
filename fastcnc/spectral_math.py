"""Small spectral formulas shared by the engine, the penalties, the evaluation and the benchmarks (one source each)."""

from __future__ import annotations

import math

import torch


def kappa(sigma_max, sigma_min):
    """Condition number ``sigma_max / sigma_min`` of floats or tensors: 1 where both are 0 (an all-zero matrix, never
    NaN), inf where only sigma_min is 0."""
    if isinstance(sigma_max, torch.Tensor) or isinstance(sigma_min, torch.Tensor):
        ratio = sigma_max / sigma_min
        return torch.where((sigma_max == 0) & (sigma_min == 0), torch.ones_like(ratio), ratio)
    if sigma_min == 0:
        return 1.0 if sigma_max == 0 else math.inf
    return sigma_max / sigma_min
