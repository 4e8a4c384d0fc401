"""fastcnc: train heavily pruned and robust networks with cheap condition-number (CNC) and transformed-L1 (TSC)
penalties, batched Triton kernels for extreme singular values and masked sparse matmuls."""

__version__ = "0.1.0"

from fastcnc._backend import force_backend
from fastcnc.cnc import cnc_penalty
from fastcnc.layers import MaskedConv2d, MaskedLinear, densify, sparsify
from fastcnc.masked import masked_conv2d, masked_linear, masked_matmul
from fastcnc.models import build_model
from fastcnc.pruning import GradualPruner, apply_masks, prune_magnitude, sparsity_report
from fastcnc.regularizer import TSCNC
from fastcnc.spectral import SpectralEstimate, SpectralState, as_matrices, extreme_singular_values
from fastcnc.tsc import tsc_penalty

__all__ = [
    "GradualPruner", "MaskedConv2d", "MaskedLinear", "SpectralEstimate", "SpectralState", "TSCNC", "apply_masks",
    "as_matrices",
    "build_model", "cnc_penalty", "densify", "extreme_singular_values", "force_backend", "masked_conv2d",
    "masked_linear", "masked_matmul", "prune_magnitude", "sparsify", "sparsity_report", "tsc_penalty",
]
