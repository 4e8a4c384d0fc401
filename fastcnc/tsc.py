"""Transformed-L1 sparsity penalty (TSC) of arXiv 2503.20454, summed per layer:

    rho_a(w) = (a + 1) |w| / (a + |w|),        d rho_a / dw = sign(w) a (a + 1) / (a + |w|)^2,

with the subgradient 0 chosen at w = 0 (as ``torch.abs`` does). rho_a is 0 at 0, tends to a + 1 as |w| grows and to
(1 + 1/a)|w| (a scaled L1) as a grows; a = 100 is the value the paper's public code uses. That code, as surveyed for
this project, writes the denominator as (a - |w|), which has a pole at |w| = a and turns negative beyond it (larger
weights would be rewarded); we use the paper's (a + |w|).

CUDA tensors go to one batched Triton launch per dtype and pass (``fastcnc.kernels.tsc``, plus a tiny per-layer
reduction launch in the forward); CPU tensors use the pure-torch path below. The forward computes only the values;
the backward re-reads the weights and writes the scaled gradient (see ``TSCPenaltyFunction`` for why recomputing
beats storing the gradient in the forward).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.autograd.function import once_differentiable

from fastcnc import _backend
from fastcnc._checks import check_choice, check_positive, check_tensor

# Tile size of the kernel path: None takes the launcher's DEFAULT_BLOCK (kernels/tsc.py, the one source of the
# value); a module attribute so tests can shrink it and make tiny layers span several tiles.
_KERNEL_BLOCK: int | None = None


def _kernel_block() -> int:
    return _KERNEL_BLOCK or _backend.kernels("tsc").DEFAULT_BLOCK


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16/fp32 accumulate in fp32; fp64 stays fp64 (used by the float64 reference checks)
    return torch.float64 if dtype == torch.float64 else torch.float32


def _values_torch(weights: list[torch.Tensor], a: float) -> torch.Tensor:
    acc = _acc_dtype(weights[0].dtype)
    values = []
    for w in weights:
        abs_w = w.to(acc).abs()
        values.append((abs_w * ((a + 1.0) / (a + abs_w))).sum())
    return torch.stack(values)


def _grads_torch(weights: list[torch.Tensor], a: float, scale: torch.Tensor) -> list[torch.Tensor]:
    grads = []
    for w, s in zip(weights, scale.unbind(0), strict=True):
        w_acc = w.to(scale.dtype)
        inv = 1.0 / (a + w_acc.abs())
        # torch.sign(0) == 0: the subgradient at w == 0 is 0, as in the kernel
        grads.append((torch.sign(w_acc) * (s * a) * inv * ((a + 1.0) * inv)).to(w.dtype))
    return grads


def _kernel_ready(w: torch.Tensor) -> torch.Tensor:
    """Contiguous, and aligned so the kernel's 16-byte alignment hint holds (a storage offset can break it)."""
    # (a detach is a dispatched op per layer and call: only for tensors that need one)
    w = (w.detach() if w.requires_grad else w).contiguous()
    if w.data_ptr() % _backend.kernels("tsc").POINTER_ALIGN:
        w = w.clone()  # a fresh allocation is aligned
    return w


# (device, dtype, shapes, block) -> aligned views of one persistent buffer, see _kernel_inputs
_STAGING: dict[tuple, list[torch.Tensor]] = {}
MAX_STAGING = 8


def _kernel_inputs(group: list[torch.Tensor], block: int) -> list[torch.Tensor]:
    """The tensors the kernel reads for ``group``, without a host->device upload of a pointer table per call.

    The kernel finds its layers through a device table of data pointers, cached per pointer set. Weights at the same
    addresses as before (parameters, or products that the caching allocator placed where the last ones were) reuse
    their table. New addresses (``W * M`` products recomputed each step) would need a fresh upload, one host-to-device
    copy per call; they are copied instead into a persistent buffer of the same layer shapes, whose table is built
    once (one batched device copy of the weights, no host involvement).
    """
    kt = _backend.kernels("tsc")
    weights = [_kernel_ready(w) for w in group]
    if kt.has_layer_table(weights, block):
        return weights
    key = (weights[0].device, weights[0].dtype, tuple(w.shape for w in weights), block)
    views = _STAGING.get(key)
    if views is None:
        align = max(1, kt.POINTER_ALIGN // weights[0].element_size())
        sizes = [-(-w.numel() // align) * align for w in weights]
        with torch.inference_mode(False):  # a buffer made under inference_mode could never be written outside it
            flat = torch.empty(sum(sizes), dtype=weights[0].dtype, device=weights[0].device)
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)
        views = [flat[o : o + w.numel()].view(w.shape) for o, w in zip(offsets, weights, strict=True)]
        if len(_STAGING) >= MAX_STAGING:
            _STAGING.pop(next(iter(_STAGING)))
        _STAGING[key] = views
    torch._foreach_copy_(views, weights)
    return views


def kernel_inputs(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """What the Triton path reads for these same-dtype weights (``_kernel_inputs``): the weights themselves where
    their pointer table is cached, else their copy in the persistent staging buffer. A caller that keeps the result
    for a later call on the same values (TSCNC's fused backward) saves that call's staging copy; the staging buffer
    is shared, so it must check the views' version counter first (any later staging bumps it)."""
    return _kernel_inputs(weights, _kernel_block())


def _dtype_groups(weights: list[torch.Tensor]) -> list[list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault(w.dtype, []).append(i)
    return list(groups.values())


class TSCPenaltyFunction(torch.autograd.Function):
    """``forward(a, *weights) -> [L]`` per-layer TSC values; ``backward`` gives each weight its exact gradient.

    Recompute, not store: the forward reads the weights once (value only); the backward reads them once more and
    writes ``grad_output[l] * d rho/dw`` straight into the returned gradient (the kernel computes value and gradient
    from one read, so the backward's value comes for free but is not needed). Storing ``d rho/dw`` in the forward
    instead would cost a write in the forward, a read plus a write in the backward (the scale is only known there)
    and a weight-sized buffer kept alive between the two: 4 weight-sized memory passes against 3, and more memory.
    """

    @staticmethod
    def forward(ctx, a: float, *weights: torch.Tensor) -> torch.Tensor:
        ctx.a = a
        ctx.save_for_backward(*weights)
        return tsc_values(list(weights), a)

    @staticmethod
    @once_differentiable  # the penalty's Hessian is not needed by any trainer: fail loudly on double backward
    def backward(ctx, grad_values: torch.Tensor):
        weights = ctx.saved_tensors
        grads: list[torch.Tensor | None] = [None] * len(weights)
        needed = [i for i in range(len(weights)) if ctx.needs_input_grad[1 + i]]
        if needed:
            scale = grad_values
            if len(needed) < len(weights):  # the common all-needed case needs no host->device index copy
                scale = grad_values[torch.tensor(needed, device=grad_values.device)]
            for i, g in zip(needed, tsc_grads([weights[i] for i in needed], ctx.a, scale), strict=True):
                grads[i] = g
        return (None, *grads)


def tsc_values(weights: list[torch.Tensor], a: float) -> torch.Tensor:
    """[L] TSC values (no autograd): one batched launch per dtype on CUDA, the torch path on CPU."""
    out_dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
    groups = _dtype_groups(weights)
    parts = []
    for idx in groups:
        group = [weights[i] for i in idx]
        if _backend.use_triton(group[0]):
            block = _kernel_block()
            values, _ = _backend.kernels("tsc").tsc_value_grad(_kernel_inputs(group, block), a, None, block=block)
        else:
            values = _values_torch(group, a)
        parts.append(values.to(out_dtype))
    if len(groups) == 1:
        return parts[0]
    order = torch.tensor([i for idx in groups for i in idx])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return torch.cat(parts)[inverse.to(parts[0].device)]


def tsc_grads(weights: list[torch.Tensor], a: float, scale: torch.Tensor) -> list[torch.Tensor]:
    """``scale[l] * d rho_a(W_l) / dW_l`` for every layer (no autograd), in each weight's dtype. On CUDA each dtype's
    gradients are views into one flat buffer of that dtype, every layer starting at a tile boundary."""
    grads: list = [None] * len(weights)
    for idx in _dtype_groups(weights):
        group = [weights[i] for i in idx]
        part = scale if len(idx) == len(weights) else scale[torch.tensor(idx, device=scale.device)]
        part = part.to(_acc_dtype(group[0].dtype))
        if _backend.use_triton(group[0]):
            block = _kernel_block()
            _, group_grads = _backend.kernels("tsc").tsc_value_grad(
                _kernel_inputs(group, block), a, part, compute_value=False, block=block
            )
        else:
            group_grads = _grads_torch(group, a, part)
        for i, g in zip(idx, group_grads, strict=True):
            grads[i] = g
    return grads


TSC_A_RANGE = (1e-6, 1e6)  # float32 arithmetic: the slope at 0, (a + 1) / a, and a (a + 1) stay far inside its range


def check_tsc_a(a, name: str = "a") -> float:
    """The shape parameter ``a`` of rho_a, in ``TSC_A_RANGE`` (a -> 0 tends to L0, a -> inf to L1; beyond the range
    float32 under- or overflows: a NaN penalty, blamed on the weights)."""
    a = check_positive(name, a)
    low, high = TSC_A_RANGE
    if not low <= a <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}] (float32 under- or overflows beyond), got {a}")
    return a


def tsc_penalty(
    weights: torch.Tensor | Iterable[torch.Tensor],
    a: float = 100.0,
    reduction: str = "sum",
    *,
    check_finite: bool = True,
) -> torch.Tensor:
    """Transformed-L1 penalty ``sum_i (a+1)|w_i| / (a+|w_i|)`` of each layer, differentiable in every weight.

    Args:
        weights: one tensor or an iterable of tensors (any shapes, floating dtypes, one device), e.g.
            ``[m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]``.
        a: the TSC parameter, in [1e-6, 1e6] (``TSC_A_RANGE``; default 100.0). Small a approaches the L0 count
            (times a+1), large a the L1 norm.
        reduction: ``"sum"`` returns the 0-dim total; ``"none"`` returns the ``[L]`` per-layer values (L = 1 for a
            single tensor).
        check_finite: raise if a weight is NaN/Inf. The check reads the L computed values, not the weights, but it
            waits for the device once per call: pass False in a training hot path that checks its loss anyway.

    Returns:
        fp32 values (fp64 if any weight is fp64), accumulated in fp32 for fp16/bf16/fp32 weights; gradients come back
        in each weight's own dtype.
    """
    if isinstance(weights, torch.Tensor):
        weights = [weights]
    elif isinstance(weights, Iterable):
        weights = list(weights)
    else:
        raise TypeError(f"weights must be a tensor or an iterable of tensors, got {type(weights).__name__}")
    if not weights:
        raise ValueError("weights must contain at least one tensor, got an empty list")
    for i, w in enumerate(weights):
        check_tensor(f"weights[{i}]", w, floating=True, nonempty=True)
        if w.device != weights[0].device:
            raise ValueError(f"weights must share one device: weights[0] is on {weights[0].device}, "
                             f"weights[{i}] on {w.device}")
    a = check_tsc_a(a)
    check_choice("reduction", reduction, {"sum", "none"})

    values = TSCPenaltyFunction.apply(a, *weights)
    if check_finite:
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            raise ValueError(f"weights[{bad}] contains NaN or Inf; expected finite values")
    return values.sum() if reduction == "sum" else values
