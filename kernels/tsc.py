"""Transformed-L1 (TSC) sparsity penalty over many layers in one launch: per layer
``value_l = sum_i rho_a(w_i)`` with ``rho_a(w) = (a+1)|w| / (a+|w|)`` and, in the same pass over the weights,
``grad_i = scale_l * sign(w_i) * a(a+1) / (a+|w_i|)^2`` (0 at w = 0).

Layers are addressed through a device table of their data pointers, and every program owns one tile of one layer
(block -> layer table), so a whole network costs one launch per dtype. Per-tile partial sums are reduced per layer
by a second tiny kernel in a fixed order: no float atomics, bit-identical results run to run.
"""

from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl

from ._common import device_guard, upload

DEFAULT_BLOCK = 4096
REDUCE_BLOCK = 1024
# Layer data pointers are turned into typed pointers in the kernel; the launcher guarantees this alignment so the
# multiple_of hint is true and loads/stores stay 16-byte vectorised.
POINTER_ALIGN = 16


@triton.jit
def _tsc_value_grad_kernel(
    # pointers
    meta_ptr,  # *i64: [w_ptrs (L) | numel (L) | first_block (L+1) | block_layer (n_blocks)]
    w_type_ptr,  # any weight of the group: only its element type is used
    a_ptr,  # *ACC [1]: the TSC parameter a
    scale_ptr,  # *ACC [L]: upstream gradient of each layer's value (read only if COMPUTE_GRAD)
    grad_ptr,  # *W [n_blocks * BLOCK]: flat gradient, layer l's tile j at (first_block[l] + j) * BLOCK
    partial_ptr,  # *ACC [n_blocks]: per-tile partial sums of rho (written only if COMPUTE_VALUE)
    # sizes
    n_layers,
    # meta
    BLOCK: tl.constexpr,
    COMPUTE_VALUE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    # -- which layer and which tile of it this program owns
    pid = tl.program_id(0)
    layer = tl.load(meta_ptr + 3 * n_layers + 1 + pid)
    numel = tl.load(meta_ptr + n_layers + layer)
    first_block = tl.load(meta_ptr + 2 * n_layers + layer)
    # the launcher guarantees 16-byte aligned layer pointers; the hint lets full tiles use vector loads
    w_base = tl.multiple_of(tl.load(meta_ptr + layer).to(w_type_ptr.dtype, bitcast=True), 16)
    start = (pid - first_block) * BLOCK
    offs = tl.arange(0, BLOCK)

    # -- one read of the weights gives both rho and its derivative. Only a layer's last tile is masked (a mask
    # depending on a loaded length would block vectorisation); masked lanes read 0 and contribute rho(0) = 0.
    if start + BLOCK <= numel:
        w = tl.load(w_base + start + offs)
    else:
        w = tl.load(w_base + start + offs, mask=offs < numel - start, other=0.0)
    w = w.to(ACC_DTYPE)
    a = tl.load(a_ptr)
    abs_w = tl.abs(w)
    inv = 1.0 / (a + abs_w)
    ratio = (a + 1.0) * inv  # (a+1)/(a+|w|) <= (a+1)/a: forming (a+1)|w| first could overflow for huge a
    if COMPUTE_VALUE:
        tl.store(partial_ptr + pid, tl.sum(abs_w * ratio, axis=0))
    if COMPUTE_GRAD:
        grad_mag = tl.load(scale_ptr + layer) * a * inv * ratio
        # subgradient 0 at w == 0 (as torch.abs); the where keeps -0.0 and 0.0 alike
        grad = tl.where(w > 0, grad_mag, tl.where(w < 0, -grad_mag, 0.0))
        # every tile owns BLOCK slots of the padded flat buffer, so no mask: the padding receives zeros
        tl.store(grad_ptr + pid.to(tl.int64) * BLOCK + offs, grad.to(grad_ptr.dtype.element_ty))


@triton.jit
def _tsc_layer_sum_kernel(
    # pointers
    meta_ptr,  # *i64, same layout as above
    partial_ptr,  # *ACC [n_blocks]
    value_ptr,  # *ACC [L]
    # sizes
    n_layers,
    # meta
    BLOCK_R: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    # one program per layer sums its tiles' partials in a fixed order: deterministic, unlike atomics
    layer = tl.program_id(0)
    lo = tl.load(meta_ptr + 2 * n_layers + layer)
    hi = tl.load(meta_ptr + 2 * n_layers + layer + 1)
    acc = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
    for start in range(lo, hi, BLOCK_R):
        offs = start + tl.arange(0, BLOCK_R)
        acc += tl.load(partial_ptr + offs, mask=offs < hi, other=0.0)
    tl.store(value_ptr + layer, tl.sum(acc, axis=0))


# (device, data pointers, numels, block) -> (device table, first_block); least recently used entries are dropped
_TABLES: collections.OrderedDict[tuple, tuple[torch.Tensor, tuple[int, ...]]] = collections.OrderedDict()
MAX_TABLES = 32


def table_key(weights: list[torch.Tensor], block: int) -> tuple:
    """The key of ``weights``' layer table: it depends on their device, data pointers and sizes only."""
    return weights[0].device, tuple(w.data_ptr() for w in weights), tuple(w.numel() for w in weights), block


def has_layer_table(weights: list[torch.Tensor], block: int) -> bool:
    """Whether a launch on ``weights`` finds its pointer table on the device (else it uploads one)."""
    return table_key(weights, block) in _TABLES


def _layer_table(device: torch.device, data_ptrs: tuple[int, ...], numels: tuple[int, ...], block: int):
    """Device int64 table [w_ptrs | numel | first_block | block_layer], uploaded once per key and kept."""
    key = (device, data_ptrs, numels, block)
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    n_blocks = [triton.cdiv(n, block) for n in numels]
    first_block = [0]
    for nb in n_blocks:
        first_block.append(first_block[-1] + nb)
    block_layer = [layer for layer, nb in enumerate(n_blocks) for _ in range(nb)]
    hit = upload([*data_ptrs, *numels, *first_block, *block_layer], torch.int64, device), tuple(first_block)
    _TABLES[key] = hit
    if len(_TABLES) > MAX_TABLES:
        _TABLES.popitem(last=False)
    return hit


def tsc_value_grad(
    weights: list[torch.Tensor],
    a: float,
    scale: torch.Tensor | None = None,
    *,
    compute_value: bool = True,
    block: int = DEFAULT_BLOCK,
) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
    """TSC values and/or scaled gradients of a list of same-dtype, same-device layers, in one read of the weights.

    Args:
        weights: L contiguous, non-empty tensors of one floating dtype on one device, data pointers 16-byte aligned.
        a: the TSC parameter, > 0.
        scale: ``[L]`` upstream gradient per layer, in the accumulation dtype; ``None`` skips the gradient.
        compute_value: whether to compute the per-layer values.
        block: tile size (power of two); tests use tiny tiles so layers span several tiles.

    Returns:
        ``(values [L] or None, grads or None)``: values in fp64 for fp64 weights, fp32 otherwise; ``grads[l]`` has the
        shape and dtype of ``weights[l]`` (views into one flat buffer).
    """
    assert weights, "weights must be a non-empty list"
    dtype, device = weights[0].dtype, weights[0].device
    for w in weights:
        assert w.dtype == dtype and w.device == device, "all weights must share one dtype and one device"
        assert w.is_contiguous() and w.numel() > 0, "weights must be contiguous and non-empty"
        assert w.data_ptr() % POINTER_ALIGN == 0, f"weight data pointers must be {POINTER_ALIGN}-byte aligned"
    assert compute_value or scale is not None, "nothing to compute"
    assert block >= 16 and block & (block - 1) == 0, f"block must be a power of two >= 16, got {block}"
    acc_torch = torch.float64 if dtype == torch.float64 else torch.float32
    acc_tl = tl.float64 if dtype == torch.float64 else tl.float32
    n_layers = len(weights)
    if scale is not None:
        assert scale.shape == (n_layers,) and scale.dtype == acc_torch and scale.device == device
        scale = scale.contiguous()

    table, first_block = _layer_table(*table_key(weights, block))
    n_blocks = first_block[-1]
    a_buf = torch.full((1,), a, dtype=acc_torch, device=device)
    partials = torch.empty(n_blocks, dtype=acc_torch, device=device) if compute_value else a_buf
    grad_flat = torch.empty(n_blocks * block, dtype=dtype, device=device) if scale is not None else weights[0]
    num_warps = 8 if block >= 2048 else 4
    with device_guard(weights[0]):
        _tsc_value_grad_kernel[(n_blocks,)](
            meta_ptr=table, w_type_ptr=weights[0], a_ptr=a_buf,
            scale_ptr=scale if scale is not None else a_buf, grad_ptr=grad_flat, partial_ptr=partials,
            n_layers=n_layers,
            BLOCK=block, COMPUTE_VALUE=compute_value, COMPUTE_GRAD=scale is not None, ACC_DTYPE=acc_tl,
            num_warps=num_warps,
        )  # fmt: skip
        values = None
        if compute_value:
            values = torch.empty(n_layers, dtype=acc_torch, device=device)
            _tsc_layer_sum_kernel[(n_layers,)](
                meta_ptr=table, partial_ptr=partials, value_ptr=values, n_layers=n_layers,
                BLOCK_R=REDUCE_BLOCK, ACC_DTYPE=acc_tl, num_warps=4,
            )  # fmt: skip
    grads = None
    if scale is not None:
        # each layer's gradient starts at a tile boundary of the flat buffer, so every view is aligned (one
        # as_strided per layer: a slice and a view would be two dispatched ops)
        grads = [grad_flat.as_strided(w.shape, w.stride(), first_block[i] * block) for i, w in enumerate(weights)]
    return values, grads
