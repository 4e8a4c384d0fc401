"""Masked (pruned) layers: the mask is a buffer and is applied inside the forward, so pruned weights stay zero."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastcnc._checks import check_tensor


def _validate_mask(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    check_tensor("mask", mask)
    if mask.shape != weight.shape:
        raise ValueError(f"mask must have the weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"mask must be on the weight's device {weight.device}, got {mask.device}")
    if mask.dtype == torch.bool:
        return mask.to(weight.dtype)
    if not mask.is_floating_point() and mask.dtype not in (torch.uint8, torch.int8, torch.int32, torch.int64):
        raise TypeError(f"mask must be bool, integer or floating, got dtype {mask.dtype}")
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must be binary (only 0 and 1 entries)")
    return mask.to(weight.dtype)


class _MaskedMixin:
    """Shared mask handling for MaskedLinear and MaskedConv2d."""

    mask: torch.Tensor
    weight: nn.Parameter

    def _init_mask(self) -> None:
        self.register_buffer("mask", torch.ones_like(self.weight))

    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (same shape as the weight, binary) and zero the pruned weights."""
        m = _validate_mask(mask, self.weight)
        with torch.no_grad():
            self.mask.copy_(m)
            self.weight.mul_(self.mask)

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer computes with, ``weight * mask`` (differentiable in ``weight``)."""
        return self.weight * self.mask

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.mask.sum()) / max(self.mask.numel(), 1)


class MaskedLinear(_MaskedMixin, nn.Linear):
    """``nn.Linear`` with a binary ``mask`` buffer: ``y = x (W * M)^T + b``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


class MaskedConv2d(_MaskedMixin, nn.Conv2d):
    """``nn.Conv2d`` with a binary ``mask`` buffer on its weight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)
