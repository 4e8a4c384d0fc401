"""Pure-torch ground truth (float64 SVD) for the spectral estimates and the penalties."""

from __future__ import annotations

import torch


def sigma_extremes_ref(mat: torch.Tensor) -> tuple[float, float]:
    """Exact (sigma_max, sigma_min) of one matrix via float64 svdvals; sigma_min is the min(m, n)-th value."""
    s = torch.linalg.svdvals(mat.detach().to(torch.float64).cpu())
    return s[0].item(), s[-1].item()


def matrix_with_spectrum(m: int, n: int, singular_values: torch.Tensor, *, generator=None) -> torch.Tensor:
    """A float64 [m, n] matrix U diag(s) V^T with Haar-random U, V and the given min(m, n) singular values."""
    k = min(m, n)
    if singular_values.numel() != k:
        raise ValueError(f"singular_values must have min(m, n) = {k} entries, got {singular_values.numel()}")
    U = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=generator)).Q
    V = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=generator)).Q
    return U @ torch.diag(singular_values.to(torch.float64)) @ V.T
