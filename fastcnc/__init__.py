"""fastcnc: train heavily pruned and robust networks with cheap condition-number (CNC) and transformed-L1 (TSC)
penalties, batched Triton kernels for extreme singular values and masked sparse matmuls."""

__version__ = "0.1.0"

from fastcnc._backend import force_backend  # noqa: F401
from fastcnc.layers import MaskedConv2d, MaskedLinear  # noqa: F401
