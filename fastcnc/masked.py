"""Masked matmul as autograd Functions and functionals: ``masked_linear``, ``masked_conv2d``, ``masked_matmul``.

``y = x (W * M)^T + b``; the gradient of ``W`` is ``(dy^T x) * M``, so pruned weights get exactly zero gradient.

Dispatch rule (on top of ``fastcnc._backend.use_triton``):

* CPU tensors (default backend) and float64: pure torch, ``F.linear`` / ``F.conv2d`` on ``W * M``.
* CUDA tensors: ``W * M`` + cuBLAS / cuDNN by default. With ``CUDA_KERNELS = True``, the block-sparse Triton kernels
  when at most ``DENSE_FALLBACK_TILE_DENSITY`` (50%) of the mask's ``T x T`` tiles hold a nonzero. Why off by
  default (H200, torch 2.11, triton 3.6, ResNet-18 im2col shapes at batch 128, fwd+bwd): called eagerly the kernels
  took 1.08-1.70x the dense time in fp32 and 1.79-4.03x in bf16 at 90% block sparsity, because the host's launch
  path (0.7-1.3 ms per fwd+bwd against 0.2-0.6 ms for dense) exceeds the device time they save; replayed from a CUDA
  graph the same fwd+bwd took 0.27-0.57x the dense time in fp32 and 0.73-1.31x in bf16. So they pay off in a step
  captured whole (set the flag before the warm-up calls, so that compilation and autotuning happen outside the
  capture), or where a layer's dense time dwarfs the launch path (not measured). An unstructured mask at 90%
  sparsity has almost no all-zero 16x16 tile (0.9**256 ~ 2e-12), so it stays on cuBLAS either way: the kernels can
  only win by skipping whole tiles.
* A forced ``"triton"`` backend on CPU tensors (the interpreter, tests) always runs the kernels.

Conv2d on the kernel path is im2col: ``F.unfold`` (whose backward is ``F.fold``) + the masked matmul, with the
groups as a grid axis of the kernel and the output written straight into ``[B, C_out, L]``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fastcnc import _backend
from fastcnc._checks import check_mask, check_tensor

CUDA_KERNELS = False  # CUDA: the block-sparse kernels for sparse enough masks (module docstring: where they pay off)
DENSE_FALLBACK_TILE_DENSITY = 0.5  # CUDA kernels only: above this fraction of nonzero tiles, W*M + cuBLAS is used
TILE_SIZES = (64, 32, 16)  # candidate square tile sizes of the nonzero table, largest first
_TILE_WASTE = 1.25  # take the largest tile that covers at most 25% more weights than 16x16 tiles would
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class TileTable:
    """Which ``block x block`` tiles of a ``[G, N, K]`` mask hold a nonzero, in the layouts the kernels walk.

    ``nonzero[g, i, j]``: tile (i, j) of group g has a nonzero. ``k_idx[g, i, :k_cnt[g, i]]``: its nonzero tile
    columns (forward K-loop); ``n_idx[g, j, :n_cnt[g, j]]``: nonzero tile rows of column j (dX N-loop). ``keep`` is
    the mask as uint8 ``[G*N, K]`` (1 byte per weight for the kernels instead of the float buffer).
    """

    block: int
    groups: int
    nonzero: torch.Tensor  # [G, N_TILES, K_TILES] int8
    k_idx: torch.Tensor  # [G, N_TILES, K_TILES] int32
    k_cnt: torch.Tensor  # [G, N_TILES] int32
    n_idx: torch.Tensor  # [G, K_TILES, N_TILES] int32
    n_cnt: torch.Tensor  # [G, K_TILES] int32
    keep: torch.Tensor  # [G*N, K] uint8
    density: float  # fraction of tiles with a nonzero
    n_nonzero: int  # number of tiles with a nonzero (host int: sizes the dW row split without reading the table)
    full: bool = False  # every weight kept (an all-ones mask): a masked layer then computes with its weight as is


def _tile_nonzero(mask3: torch.Tensor, block: int) -> torch.Tensor:
    g, n, k = mask3.shape
    nt, kt = -(-n // block), -(-k // block)
    padded = F.pad(mask3 != 0, (0, kt * block - k, 0, nt * block - n))
    return padded.view(g, nt, block, kt, block).any(dim=4).any(dim=2)


def _choose_block(mask3: torch.Tensor) -> int:
    # bigger tiles run the tensor cores better, smaller ones skip more of a block-sparse mask: take the largest tile
    # that covers at most _TILE_WASTE times the weights that 16x16 tiles cover (a dense mask gets 64, a mask pruned in
    # 16x16 blocks gets 16 unless its blocks happen to cluster)
    covered = {b: int(_tile_nonzero(mask3, b).sum()) * b * b for b in TILE_SIZES}
    best = min(covered.values())
    for b in TILE_SIZES:
        if covered[b] <= _TILE_WASTE * best:
            return b
    return TILE_SIZES[-1]


@torch.no_grad()
def build_tile_table(mask: torch.Tensor, block: int | None = None) -> TileTable:
    """Build the per-tile nonzero table of a mask ``[N, K]`` or grouped ``[G, N, K]`` (``block`` in 16/32/64 or
    None to pick one, see ``_choose_block``)."""
    check_tensor("mask", mask, ndim=(2, 3))
    mask3 = mask if mask.dim() == 3 else mask.unsqueeze(0)
    if block is None:
        block = _choose_block(mask3)
    if block not in TILE_SIZES:
        raise ValueError(f"block must be one of {TILE_SIZES}, got {block}")
    nz = _tile_nonzero(mask3, block)
    # a stable descending sort puts the indices of nonzero tiles first, in increasing order
    k_idx = torch.sort(nz.to(torch.int8), dim=2, descending=True, stable=True).indices.to(torch.int32)
    nzt = nz.transpose(1, 2)
    n_idx = torch.sort(nzt.to(torch.int8), dim=2, descending=True, stable=True).indices.to(torch.int32)
    g, n, k = mask3.shape
    return TileTable(
        block=block, groups=g, nonzero=nz.to(torch.int8).contiguous(), k_idx=k_idx.contiguous(),
        k_cnt=nz.sum(2, dtype=torch.int32).contiguous(), n_idx=n_idx.contiguous(),
        n_cnt=nzt.sum(2, dtype=torch.int32).contiguous(), keep=(mask3 != 0).to(torch.uint8).reshape(g * n, k),
        density=float(nz.float().mean()) if nz.numel() else 0.0, n_nonzero=int(nz.sum()),
        full=bool((mask3 == 1).all()),
    )


def _check_table(tiles: TileTable, rows: int, cols: int, groups: int) -> None:
    if not isinstance(tiles, TileTable):
        raise TypeError(f"tiles must be a fastcnc.masked.TileTable (or a callable returning one), "
                        f"got {type(tiles).__name__}")
    if tiles.groups != groups or tiles.keep.shape != (rows, cols):
        raise ValueError(f"tiles was built for a mask of shape {tuple(tiles.keep.shape)} with {tiles.groups} groups, "
                         f"expected {(rows, cols)} with {groups} groups")


# ---------------------------------------------------------------------------------------------------------- Function


def _alloc_rows(b: int, c: int, rows: int, linear: bool, like: torch.Tensor) -> torch.Tensor:
    # [B, C, L] result; Linear wants [M, C] row-major memory (a transposed view), Conv2d wants [B, C, L] contiguous
    if linear:
        return torch.empty(b, rows, c, device=like.device, dtype=like.dtype).transpose(1, 2)
    return torch.empty(b, c, rows, device=like.device, dtype=like.dtype)


class MaskedMatmulFunction(torch.autograd.Function):
    """``C[b, g*N + n, l] = sum_k A[b, g*K + k, l] * (W*M)[g*N + n, k] (+ bias)`` on the Triton kernels.

    ``a``: ``[B, G*K, L]`` (any strides), ``weight``/``mask``: ``[G*N, K]``, ``bias``: ``[G*N]`` or None.
    """

    @staticmethod
    def forward(ctx, a, weight, bias, tiles: TileTable, groups: int, linear_layout: bool):
        k = _backend.kernels("masked_matmul")
        b, _, rows = a.shape
        out = _alloc_rows(b, weight.shape[0], rows, linear_layout, a)
        k.masked_mm_fwd(a, weight, tiles.keep, tiles.k_idx, tiles.k_cnt, bias, out, groups=groups, block=tiles.block)
        ctx.save_for_backward(a, weight)
        ctx.tiles, ctx.groups, ctx.linear_layout, ctx.has_bias = tiles, groups, linear_layout, bias is not None
        return out

    @staticmethod
    @once_differentiable  # the kernels' gradients are not themselves differentiable: refuse double backward loudly
    def backward(ctx, grad_out):
        a, weight = ctx.saved_tensors
        tiles, groups = ctx.tiles, ctx.groups
        k = _backend.kernels("masked_matmul")
        grad_a = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = _alloc_rows(a.shape[0], a.shape[1], a.shape[2], ctx.linear_layout, a)
            k.masked_mm_bwd_dx(grad_out, weight, tiles.keep, tiles.n_idx, tiles.n_cnt, grad_a, groups=groups,
                               block=tiles.block)
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)
            k.masked_mm_bwd_dw(grad_out, a, tiles.keep, tiles.nonzero, grad_w, groups=groups, block=tiles.block,
                               busy_tiles=tiles.n_nonzero)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, 2), dtype=torch.float32).to(grad_out.dtype)
        return grad_a, grad_w, grad_b, None, None, None


# -------------------------------------------------------------------------------------------------------- functionals


def _masked_weight(weight: torch.Tensor, mask: torch.Tensor, pruned_finite: bool) -> torch.Tensor:
    # where, not weight * mask: whatever is stored at a pruned position (even NaN/Inf) contributes exactly 0, as in the
    # kernels. The masked layers hold finite weights (set_mask zeroes pruned ones) and use the cheaper product.
    if pruned_finite:
        return weight * mask.to(weight.dtype)
    return torch.where(mask != 0, weight, 0.0)


def _kernel_path(x: torch.Tensor, weight: torch.Tensor, tiles: TileTable | None) -> bool:
    if not _backend.use_triton(x) or x.dtype not in KERNEL_DTYPES or weight.dtype != x.dtype or x.numel() == 0:
        return False
    if _backend.on_cuda(x):  # the CUDA rule (also inside _backend.cuda_code_path(), for the host-sync tests)
        return cuda_takes_kernels(tiles)
    return True  # forced "triton" backend on CPU (interpreter): always the kernels, that is what it is for


def cuda_takes_kernels(tiles: TileTable | None) -> bool:
    """The CUDA rule (module docstring), shared with the masked layers' own dense route: the kernels only when
    ``CUDA_KERNELS`` is set and at most ``DENSE_FALLBACK_TILE_DENSITY`` of the mask's tiles hold a nonzero."""
    return CUDA_KERNELS and tiles is not None and tiles.density <= DENSE_FALLBACK_TILE_DENSITY


def _kernels_may_run(x: torch.Tensor) -> bool:
    # whether a tile table is worth resolving (building one reads the mask)
    return _backend.use_triton(x) and (CUDA_KERNELS or not _backend.on_cuda(x))


def _autocast(x, weight, bias):
    # custom Functions are not autocast: cast like F.linear would under torch.autocast
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    return x, weight, bias


def _resolve_tiles(tiles, mask: torch.Tensor, rows: int, cols: int, groups: int) -> TileTable:
    if tiles is None:
        return build_tile_table(mask.reshape(groups, rows // groups, cols))
    if not isinstance(tiles, TileTable):  # a layer's cached table, fetched only when the kernels will run
        tiles = tiles()
        _check_table(tiles, rows, cols, groups)
    return tiles


def _linear(x, weight, mask, bias, tiles, pruned_finite):
    x, weight, bias = _autocast(x, weight, bias)
    tiles = _resolve_tiles(tiles, mask, *weight.shape, 1) if _kernels_may_run(x) else None
    if not _kernel_path(x, weight, tiles):
        return F.linear(x, _masked_weight(weight, mask, pruned_finite), bias)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    out = MaskedMatmulFunction.apply(x2.t().unsqueeze(0), weight, bias, tiles, 1, True)
    # squeeze, not [0]: select's backward would allocate a zero [1, N, M] gradient and copy dy into it
    return out.squeeze(0).t().reshape(*x.shape[:-1], n)


def _conv2d(x, weight, mask, bias, stride, padding, dilation, groups, tiles, pruned_finite):
    x, weight, bias = _autocast(x, weight, bias)
    tiles = _resolve_tiles(tiles, mask, weight.shape[0], weight[0].numel(), groups) if _kernels_may_run(x) else None
    if not _kernel_path(x, weight, tiles):
        return F.conv2d(x, _masked_weight(weight, mask, pruned_finite), bias, stride, padding, dilation, groups)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    b, _, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [B, C_in*kh*kw, L]
    out = MaskedMatmulFunction.apply(cols, weight.reshape(c_out, -1), bias, tiles, groups, False)
    out = out.view(b, c_out, h_out, w_out)
    return out.squeeze(0) if unbatched else out


def _pair(v, name: str, minimum: int) -> tuple[int, int]:
    t = (v, v) if isinstance(v, numbers.Integral) else tuple(v) if isinstance(v, (tuple, list)) else None
    if t is None or len(t) != 2 or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in t):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(t) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return int(t[0]), int(t[1])


def _check_dtypes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Devices (metadata only: no sync) and dtypes of the activations against the weight's."""
    if x.device != weight.device:
        raise ValueError(f"x must be on the weight's device {weight.device}, got {x.device}")
    if isinstance(bias, torch.Tensor) and bias.device != weight.device:
        raise ValueError(f"bias must be on the weight's device {weight.device}, got {bias.device}")
    if torch.is_autocast_enabled(x.device.type):
        return  # autocast casts all three to its dtype, as it does for F.linear
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal x dtype {x.dtype} (outside torch.autocast)")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must equal x dtype {x.dtype} (outside torch.autocast)")


Tiles = TileTable | Callable[[], TileTable] | None


def masked_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None, *,
                  tiles: Tiles = None, trusted_mask: bool = False) -> torch.Tensor:
    """``x (weight * mask)^T + bias``; ``x`` ``[..., K]``, ``weight``/``mask`` ``[N, K]``, ``bias`` ``[N]``.

    ``tiles``: a ``build_tile_table(mask)`` to reuse across calls, or a zero-argument callable returning one (called
    only when the kernels run); built on the fly when needed otherwise.
    ``trusted_mask``: the caller guarantees a binary mask of the weight's shape and device and finite weights at
    pruned positions (``MaskedLinear.set_mask`` does): skips the binary check, which synchronises a CUDA stream, and
    uses ``weight * mask`` instead of ``where`` (a NaN stored at a pruned position would otherwise leak).
    """
    check_tensor("x", x, floating=True)
    check_tensor("weight", weight, ndim=2, floating=True)
    if not trusted_mask:
        check_mask(mask, weight)
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have shape [..., {weight.shape[1]}] to match weight {tuple(weight.shape)}, "
                         f"got {tuple(x.shape)}")
    _check_dtypes(x, weight, bias)
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if tiles is not None and not callable(tiles):
        _check_table(tiles, *weight.shape, 1)
    return _linear(x, weight, mask, bias, tiles, trusted_mask)


def masked_matmul(a: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, *,
                  tiles: TileTable | None = None) -> torch.Tensor:
    """``a @ (weight * mask)^T``: ``a`` ``[M, K]``, ``weight``/``mask`` ``[N, K]`` -> ``[M, N]``."""
    check_tensor("a", a, ndim=2)
    return masked_linear(a, weight, mask, None, tiles=tiles)


def masked_conv2d(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None,
                  stride=1, padding=0, dilation=1, groups: int = 1, *, tiles: Tiles = None,
                  trusted_mask: bool = False) -> torch.Tensor:
    """``F.conv2d(x, weight * mask, bias, stride, padding, dilation, groups)`` (numeric zero padding).

    ``x`` ``[B, C_in, H, W]`` or ``[C_in, H, W]``; ``weight``/``mask`` ``[C_out, C_in/groups, kh, kw]``.
    ``tiles``: ``build_tile_table(mask.reshape(groups, C_out // groups, -1))`` (or a callable returning it) to reuse
    across calls. ``trusted_mask``: as in ``masked_linear``.
    """
    check_tensor("x", x, ndim=(3, 4), floating=True)
    check_tensor("weight", weight, ndim=4, floating=True)
    if not trusted_mask:
        check_mask(mask, weight)
    _check_dtypes(x, weight, bias)
    if isinstance(padding, str):  # "same" / "valid": F.conv2d computes the (possibly asymmetric) padding
        return F.conv2d(x, _masked_weight(weight, mask, trusted_mask), bias, stride, padding, dilation, groups)
    stride, padding, dilation = _pair(stride, "stride", 1), _pair(padding, "padding", 0), _pair(dilation, "dilation", 1)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups must be a positive int dividing C_out={weight.shape[0]}, got {groups!r}")
    if x.shape[-3] != weight.shape[1] * groups:
        raise ValueError(f"x must have C_in = {weight.shape[1] * groups} channels (weight {tuple(weight.shape)}, "
                         f"groups={groups}), got shape {tuple(x.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if tiles is not None and not callable(tiles):
        _check_table(tiles, weight.shape[0], weight[0].numel(), groups)
    return _conv2d(x, weight, mask, bias, stride, padding, dilation, groups, tiles, trusted_mask)
