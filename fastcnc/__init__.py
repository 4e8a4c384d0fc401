"""fastcnc: train heavily pruned and robust networks with cheap condition-number (CNC) and transformed-L1 (TSC)
penalties, batched Triton kernels for extreme singular values and masked sparse matmuls."""

__version__ = "0.1.0"

from fastcnc._backend import force_backend  # noqa: F401
from fastcnc.layers import MaskedConv2d, MaskedLinear, densify, sparsify  # noqa: F401
from fastcnc.masked import masked_conv2d, masked_linear, masked_matmul  # noqa: F401
from fastcnc.pruning import GradualPruner, prune_magnitude, sparsity_report  # noqa: F401
from fastcnc.spectral import SpectralEstimate, SpectralState, as_matrices, extreme_singular_values  # noqa: F401
from fastcnc.cnc import cnc_penalty  # noqa: F401
from fastcnc.tsc import tsc_penalty  # noqa: F401
from fastcnc.regularizer import TSCNC  # noqa: F401
from fastcnc.models import build_model  # noqa: F401
