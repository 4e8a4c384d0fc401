"""Block-sparse masked matmul ``C = A @ (W * M)^T (+ bias)`` and its backward products dA and dW = (dC^T A) * M.

One layout serves Linear, im2col'd Conv2d and groups. The row axis of length ``M = B * L`` is split as
``m = b * L + l``; group ``g`` owns columns ``[g*K, (g+1)*K)`` of A and rows ``[g*N, (g+1)*N)`` of W and C:
  A ``[B, G*K, L]`` (Linear: B=1, L=rows; Conv2d: ``F.unfold`` output), W/M ``[G*N, K]``, C ``[B, G*N, L]``.
The mask's tile table (``fastcnc.masked.build_tile_table``, tiles ``BLOCK x BLOCK``) lists the nonzero tiles: the
forward walks only the nonzero K-tiles of its N-tile, dA only the nonzero N-tiles of its K-tile, and dW writes zeros
for an all-zero tile without reading A or dC. Accumulation is fp32; fp32 inputs use TF32 only when
``torch.backends.cuda.matmul.allow_tf32`` is set, matching what cuBLAS would do.
"""

import functools

import torch
import triton
import triton.language as tl

from ._common import AUTOTUNE, INTERPRET, device_guard, launch_autotuned, m_bucket, shrink_configs


def _configs():
    # BLOCK_N/BLOCK_K are fixed by the tile table; only the row tile and the pipeline are tuned. Started from the
    # Triton matmul tutorial's configs; _prune_configs drops the ones that spill (not yet swept for speed on a GPU).
    # The first one is the interpreter's (tests) and must be valid for every BLOCK.
    return shrink_configs([
        triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=4),
    ])


# At most this many elements of the larger operand tile per thread. Measured with `ptxas -v` for sm_90 (triton 3.6
# and 3.9, tests/test_compile_sm90.py): every config above this spilled for some dtype (64x64 tiles at 4 warps:
# 100-650 B with bf16/fp16/TF32, 6-20 KB with IEEE fp32 before its dots were sliced), none at or below it did.
MAX_TILE_ELEMENTS_PER_THREAD = 16


def _prune_configs(configs, named_args, **kwargs):
    block = {**named_args, **kwargs}["BLOCK"]
    kept = [c for c in configs
            if max(c.kwargs["BLOCK_M"], block) * block <= MAX_TILE_ELEMENTS_PER_THREAD * 32 * c.num_warps]
    return kept if AUTOTUNE else kept[:1]


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "BLOCK", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _masked_mm_fwd_kernel(
    # pointers
    a_ptr, w_ptr, keep_ptr, bias_ptr, c_ptr, k_idx_ptr, k_cnt_ptr,
    # sizes (per group); M_BUCKET is only the autotune key
    M, N, K, L, N_TILES, K_TILES, M_BUCKET,
    # strides
    stride_ab, stride_ak, stride_al, stride_wn, stride_wk, stride_keep_n, stride_bias, stride_cb, stride_cn, stride_cl,
    # meta
    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, SUB_K: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # -- program -> (row tile, N tile, group); row tiles vary fastest so neighbours share the weight tile in L2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.max_contiguous(tl.multiple_of(pid_n * BLOCK + tl.arange(0, BLOCK), BLOCK), BLOCK)
    offs_t = tl.arange(0, SUB_K)
    # -- pointers: row m lives at (m // L, m % L). Every offset tensor is int64: index x stride products pass 2**31
    # for large B * L * channels (tests/test_compile_sm90.py checks that no pointer takes an int32 offset tensor)
    row_a = (offs_m // L).to(tl.int64) * stride_ab + (offs_m % L).to(tl.int64) * stride_al
    a_base = a_ptr + g.to(tl.int64) * K * stride_ak + row_a[:, None]
    w_rows = (g * N + offs_n).to(tl.int64)
    w_base = w_ptr + w_rows[:, None] * stride_wn
    keep_base = keep_ptr + w_rows[:, None] * stride_keep_n
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[:, None] < N
    # -- K-loop over the nonzero tiles of this N-tile only
    table_row = g * N_TILES + pid_n
    count = tl.load(k_cnt_ptr + table_row)
    acc = tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32)
    for i in range(0, count):
        kt = tl.load(k_idx_ptr + table_row * K_TILES + i)
        # a tile's K range in SUB_K slices: an IEEE fp32 dot runs on FMAs and holds its operands' whole reduction
        # range in registers, so 64-wide slices spill (SUB_K = BLOCK for tensor-core dots)
        for kk in tl.static_range(0, BLOCK, SUB_K):
            offs_k = tl.max_contiguous(tl.multiple_of(kt * BLOCK + kk + offs_t, SUB_K), SUB_K)
            k_ok = offs_k[None, :] < K
            offs_k64 = offs_k.to(tl.int64)[None, :]
            a = tl.load(a_base + offs_k64 * stride_ak, mask=m_ok & k_ok, other=0.0)
            w = tl.load(w_base + offs_k64 * stride_wk, mask=n_ok & k_ok, other=0.0)
            keep = tl.load(keep_base + offs_k64, mask=n_ok & k_ok, other=0)
            w = tl.where(keep != 0, w, tl.zeros_like(w))
            if UPCAST:  # the interpreter's bf16/fp16 dot is wrong: compute in fp32 there
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + w_rows * stride_bias, mask=offs_n < N, other=0.0)
        acc += bias[None, :].to(tl.float32)
    # -- store C[b, g*N + n, l]
    row_c = (offs_m // L).to(tl.int64) * stride_cb + (offs_m % L).to(tl.int64) * stride_cl
    c = c_ptr + row_c[:, None] + w_rows[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_ok & (offs_n[None, :] < N))


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "BLOCK", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _masked_mm_bwd_dx_kernel(
    # pointers
    dc_ptr, w_ptr, keep_ptr, da_ptr, n_idx_ptr, n_cnt_ptr,
    # sizes (per group); M_BUCKET is only the autotune key
    M, N, K, L, N_TILES, K_TILES, M_BUCKET,
    # strides
    stride_dcb, stride_dcn, stride_dcl, stride_wn, stride_wk, stride_keep_n, stride_dab, stride_dak, stride_dal,
    # meta
    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, SUB_K: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # -- program -> (row tile, K tile, group): dA[rows, g*K + k] = dC[rows, g*N + n] @ (W*M)[g*N + n, k]
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.max_contiguous(tl.multiple_of(pid_k * BLOCK + tl.arange(0, BLOCK), BLOCK), BLOCK)
    offs_t = tl.arange(0, SUB_K)
    # -- pointers (int64 offsets throughout, as in the forward)
    row_dc = (offs_m // L).to(tl.int64) * stride_dcb + (offs_m % L).to(tl.int64) * stride_dcl
    dc_base = dc_ptr + row_dc[:, None] + (g * N).to(tl.int64) * stride_dcn
    m_ok = offs_m[:, None] < M
    k_ok = offs_k[None, :] < K
    offs_k64 = offs_k.to(tl.int64)[None, :]
    # -- N-loop over the nonzero tiles of this K-tile only
    table_row = g * K_TILES + pid_k
    count = tl.load(n_cnt_ptr + table_row)
    acc = tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32)
    for i in range(0, count):
        nt = tl.load(n_idx_ptr + table_row * N_TILES + i)
        for nn in tl.static_range(0, BLOCK, SUB_K):  # SUB_K slices of the reduction, as in the forward
            offs_n = tl.max_contiguous(tl.multiple_of(nt * BLOCK + nn + offs_t, SUB_K), SUB_K)
            n_ok = offs_n[:, None] < N
            dc = tl.load(dc_base + offs_n.to(tl.int64)[None, :] * stride_dcn, mask=m_ok & (offs_n[None, :] < N),
                         other=0.0)
            w_rows = (g * N + offs_n).to(tl.int64)
            w = tl.load(w_ptr + w_rows[:, None] * stride_wn + offs_k64 * stride_wk, mask=n_ok & k_ok, other=0.0)
            keep = tl.load(keep_ptr + w_rows[:, None] * stride_keep_n + offs_k64, mask=n_ok & k_ok, other=0)
            w = tl.where(keep != 0, w, tl.zeros_like(w))
            if UPCAST:
                dc = dc.to(tl.float32)
                w = w.to(tl.float32)
            else:  # dC may arrive in another dtype than W (autocast); the dot needs one
                dc = dc.to(w.dtype)
            acc = tl.dot(dc, w, acc, input_precision=INPUT_PRECISION)
    # -- store dA[b, g*K + k, l]; tiles with no nonzero mask column get zeros
    row_da = (offs_m // L).to(tl.int64) * stride_dab + (offs_m % L).to(tl.int64) * stride_dal
    da = da_ptr + row_da[:, None] + (g * K + offs_k).to(tl.int64)[None, :] * stride_dak
    tl.store(da, acc.to(da_ptr.dtype.element_ty), mask=m_ok & k_ok)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "BLOCK", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _masked_mm_bwd_dw_kernel(
    # pointers
    dc_ptr, a_ptr, keep_ptr, nonzero_ptr, dw_ptr,
    # sizes (per group); M_BUCKET is only the autotune key
    M, N, K, L, N_TILES, K_TILES, ROWS_PER_SPLIT, M_BUCKET,
    # strides
    stride_dcb, stride_dcn, stride_dcl, stride_ab, stride_ak, stride_al, stride_keep_n, stride_dws, stride_dwn,
    stride_dwk,
    # meta
    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # -- program -> (tile, row split, group): dW[s, g*N + n, k] = M * sum_{rows of split s} dC[rows, n] A[rows, k]
    # a weight tile reduces over all B*L rows; splitting the rows keeps the GPU busy when there are few tiles
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    g = tl.program_id(2)
    pid_n = pid_t // K_TILES
    pid_k = pid_t % K_TILES
    offs_n = tl.max_contiguous(tl.multiple_of(pid_n * BLOCK + tl.arange(0, BLOCK), BLOCK), BLOCK)
    offs_k = tl.max_contiguous(tl.multiple_of(pid_k * BLOCK + tl.arange(0, BLOCK), BLOCK), BLOCK)
    offs_r = tl.arange(0, BLOCK_M)
    n_ok = offs_n[:, None] < N
    k_ok = offs_k[None, :] < K
    w_rows = (g * N + offs_n).to(tl.int64)
    offs_k64 = offs_k.to(tl.int64)[None, :]
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    # -- an all-zero mask tile needs no reduction: its gradient is exactly zero
    tile_nonzero = tl.load(nonzero_ptr + (g * N_TILES + pid_n) * K_TILES + pid_k)
    if tile_nonzero != 0:
        row_end = tl.minimum(M, (pid_s + 1) * ROWS_PER_SPLIT)
        for m0 in range(pid_s * ROWS_PER_SPLIT, row_end, BLOCK_M):
            offs_m = m0 + offs_r
            r_ok = offs_m < row_end
            row_dc = (offs_m // L).to(tl.int64) * stride_dcb + (offs_m % L).to(tl.int64) * stride_dcl
            dct = tl.load(dc_ptr + w_rows[:, None] * stride_dcn + row_dc[None, :], mask=n_ok & r_ok[None, :],
                          other=0.0)
            row_a = (offs_m // L).to(tl.int64) * stride_ab + (offs_m % L).to(tl.int64) * stride_al
            a = tl.load(a_ptr + row_a[:, None] + (g * K + offs_k).to(tl.int64)[None, :] * stride_ak,
                        mask=r_ok[:, None] & k_ok, other=0.0)
            if UPCAST:
                dct = dct.to(tl.float32)
                a = a.to(tl.float32)
            else:
                dct = dct.to(a.dtype)
            acc = tl.dot(dct, a, acc, input_precision=INPUT_PRECISION)
    # -- re-mask so pruned weights get exactly zero gradient
    keep = tl.load(keep_ptr + w_rows[:, None] * stride_keep_n + offs_k64, mask=n_ok & k_ok, other=0)
    acc = tl.where(keep != 0, acc, 0.0)
    dw = dw_ptr + pid_s.to(tl.int64) * stride_dws + w_rows[:, None] * stride_dwn + offs_k64 * stride_dwk
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=n_ok & k_ok)


# ---------------------------------------------------------------------------------------------------------- launchers


def _precision(t: torch.Tensor) -> str:
    if t.dtype == torch.float32 and t.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _sub_k(t: torch.Tensor, block: int) -> int:
    # reduction slice of the fwd/dX dots: 16 for IEEE fp32 (FMA dots; see the forward kernel), the tile otherwise
    return 16 if t.dtype == torch.float32 and _precision(t) == "ieee" else block


def _upcast(t: torch.Tensor) -> bool:
    return INTERPRET and t.dtype != torch.float32


def _check(a: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, groups: int, block: int):
    assert a.dim() == 3 and weight.dim() == 2, f"a must be [B, G*K, L], weight [G*N, K]; got {a.shape}, {weight.shape}"
    assert weight.shape[0] % groups == 0, f"weight rows {weight.shape[0]} not divisible by groups={groups}"
    assert a.shape[1] == groups * weight.shape[1], f"a has {a.shape[1]} columns, expected {groups}*{weight.shape[1]}"
    assert keep.shape == weight.shape and keep.dtype == torch.uint8 and keep.stride(1) == 1, "keep: uint8 like weight"
    assert block in (16, 32, 64), f"block must be 16, 32 or 64, got {block}"


def masked_mm_fwd(a, weight, keep, k_idx, k_cnt, bias, out, *, groups: int, block: int):
    """``out[b, g*N + n, l] = sum_k a[b, g*K + k, l] * (weight * keep)[g*N + n, k] + bias[g*N + n]``.

    Args:
        a: ``[B, G*K, L]``, any strides. weight: ``[G*N, K]``. keep: uint8 mask ``[G*N, K]``, rows contiguous.
        k_idx, k_cnt: ``[G, N_TILES, K_TILES]`` / ``[G, N_TILES]`` int32 nonzero K-tile lists. bias: ``[G*N]`` or None.
        out: ``[B, G*N, L]``, any strides, written in full.
    """
    _check(a, weight, keep, groups, block)
    b, _, rows_l = a.shape
    n, k = weight.shape[0] // groups, weight.shape[1]
    m = b * rows_l
    n_tiles, k_tiles = k_idx.shape[1], k_idx.shape[2]

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), n_tiles, groups)

    precision, bucket = _precision(a), m_bucket(m)
    with device_guard(a):
        launch_autotuned(
            _masked_mm_fwd_kernel, grid, (bucket, n, k, block, precision),
            a_ptr=a, w_ptr=weight, keep_ptr=keep, bias_ptr=bias, c_ptr=out, k_idx_ptr=k_idx, k_cnt_ptr=k_cnt,
            M=m, N=n, K=k, L=rows_l, N_TILES=n_tiles, K_TILES=k_tiles, M_BUCKET=bucket,
            stride_ab=a.stride(0), stride_ak=a.stride(1), stride_al=a.stride(2),
            stride_wn=weight.stride(0), stride_wk=weight.stride(1), stride_keep_n=keep.stride(0),
            stride_bias=bias.stride(0) if bias is not None else 0,
            stride_cb=out.stride(0), stride_cn=out.stride(1), stride_cl=out.stride(2),
            BLOCK=block, SUB_K=_sub_k(a, block), HAS_BIAS=bias is not None, UPCAST=_upcast(a),
            INPUT_PRECISION=precision,
        )
    return out


def masked_mm_bwd_dx(grad_out, weight, keep, n_idx, n_cnt, out, *, groups: int, block: int):
    """``out[b, g*K + k, l] = sum_n grad_out[b, g*N + n, l] * (weight * keep)[g*N + n, k]``.

    Args:
        grad_out: ``[B, G*N, L]``. weight/keep: ``[G*N, K]``. n_idx, n_cnt: ``[G, K_TILES, N_TILES]`` /
        ``[G, K_TILES]`` int32 nonzero N-tile lists. out: ``[B, G*K, L]``, written in full.
    """
    _check(out, weight, keep, groups, block)
    b, _, rows_l = out.shape
    n, k = weight.shape[0] // groups, weight.shape[1]
    m = b * rows_l
    k_tiles, n_tiles = n_idx.shape[1], n_idx.shape[2]

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), k_tiles, groups)

    precision, bucket = _precision(weight), m_bucket(m)
    with device_guard(weight):
        launch_autotuned(
            _masked_mm_bwd_dx_kernel, grid, (bucket, n, k, block, precision),
            dc_ptr=grad_out, w_ptr=weight, keep_ptr=keep, da_ptr=out, n_idx_ptr=n_idx, n_cnt_ptr=n_cnt,
            M=m, N=n, K=k, L=rows_l, N_TILES=n_tiles, K_TILES=k_tiles, M_BUCKET=bucket,
            stride_dcb=grad_out.stride(0), stride_dcn=grad_out.stride(1), stride_dcl=grad_out.stride(2),
            stride_wn=weight.stride(0), stride_wk=weight.stride(1), stride_keep_n=keep.stride(0),
            stride_dab=out.stride(0), stride_dak=out.stride(1), stride_dal=out.stride(2),
            BLOCK=block, SUB_K=_sub_k(weight, block), UPCAST=_upcast(weight), INPUT_PRECISION=precision,
        )
    return out


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _row_splits(rows: int, programs: int, device: torch.device) -> int:
    # aim at ~4 busy programs per SM, but keep >= 1024 rows per split so the fp32 partials stay small next to the work
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(triton.cdiv(4 * sms, max(programs, 1)), triton.cdiv(rows, 1024)))


def masked_mm_bwd_dw(grad_out, a, keep, nonzero, out, *, groups: int, block: int, splits: int | None = None,
                     busy_tiles: int | None = None):
    """``out[g*N + n, k] = keep * sum_{b,l} grad_out[b, g*N + n, l] * a[b, g*K + k, l]`` (pruned entries exactly 0).

    Args:
        grad_out: ``[B, G*N, L]``. a: ``[B, G*K, L]``. keep: uint8 ``[G*N, K]``. nonzero: int8
        ``[G, N_TILES, K_TILES]`` tile table. out: ``[G*N, K]``, written in full.
        splits: split the B*L reduction into this many fp32 partial sums (summed in torch, deterministic);
            None picks one from the SM count and ``busy_tiles`` (1 off CUDA).
        busy_tiles: how many tiles of ``nonzero`` are nonzero (a host int; None: all of them). Only those programs
            reduce, so at 90% block sparsity the split must feed the SMs from the few busy tiles.
    """
    _check(a, out, keep, groups, block)
    b, _, rows_l = a.shape
    n, k = out.shape[0] // groups, out.shape[1]
    n_tiles, k_tiles = nonzero.shape[1], nonzero.shape[2]
    rows = b * rows_l
    if splits is None:
        busy = n_tiles * k_tiles * groups if busy_tiles is None else busy_tiles
        splits = _row_splits(rows, busy, a.device)
    # split boundaries are multiples of 128 rows, hence of every BLOCK_M in _configs()
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), 128) * 128
    splits = triton.cdiv(rows, rows_per_split) if rows else 1
    target = out.unsqueeze(0) if splits == 1 else torch.empty(splits, *out.shape, device=out.device,
                                                              dtype=torch.float32)
    precision, bucket = _precision(a), m_bucket(rows_per_split)
    with device_guard(a):
        launch_autotuned(
            _masked_mm_bwd_dw_kernel, (n_tiles * k_tiles, splits, groups), (bucket, n, k, block, precision),
            dc_ptr=grad_out, a_ptr=a, keep_ptr=keep, nonzero_ptr=nonzero, dw_ptr=target,
            M=rows, N=n, K=k, L=rows_l, N_TILES=n_tiles, K_TILES=k_tiles, ROWS_PER_SPLIT=rows_per_split,
            M_BUCKET=bucket,
            stride_dcb=grad_out.stride(0), stride_dcn=grad_out.stride(1), stride_dcl=grad_out.stride(2),
            stride_ab=a.stride(0), stride_ak=a.stride(1), stride_al=a.stride(2), stride_keep_n=keep.stride(0),
            stride_dws=target.stride(0), stride_dwn=target.stride(1), stride_dwk=target.stride(2),
            BLOCK=block, UPCAST=_upcast(a), INPUT_PRECISION=precision,
        )
    if splits > 1:
        out.copy_(target.sum(0))
    return out
