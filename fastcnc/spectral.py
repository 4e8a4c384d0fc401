"""Certified, batched, warm-started extreme singular values (sigma_max, sigma_min) of many matrices.

Each matrix is taken in its tall orientation A ([m, n], m >= n, so sigma_min is the n-th singular value), scaled by a
power of two (exact) and its small-side Gram G = A^T A formed in float64. Matrices of one tall shape are stacked into
a [B, m, n] group for the Gram, and groups of equal n into one batch for everything after it (which depends on n
only), so fifty ragged layers and thousands of same-shape blocks go through the same batched ops.

Per round, for every matrix of a group at once:
  - sigma_min: shifted block inverse iteration with a Cholesky factor of G - s I (s a certified lower bound of
    lambda_min from the previous round or call, else a tiny negative shift), then a Rayleigh-Ritz pick x of the block;
    sigma_min ~ |A x| (an upper bound). Its convergence depends on (lambda_1 - s) / (lambda_2 - s), not on the
    relative gap at the bottom of the spectrum that stalls Krylov methods on A^T A.
  - sigma_max: block power steps on G, Rayleigh-Ritz pick y; sigma_max ~ |A y| (a lower bound).
  - certificate: a float64 Cholesky of G - (tau + mu) I that runs to completion proves lambda_min(A^T A) >= tau, and
    one of (t - mu) I - G proves lambda_max(A^T A) <= t, where mu bounds every rounding error involved: the Gram's own
    (|fl(A^T A) - A^T A| <= gamma_m |A|^T |A|, whose 2-norm is at most the row-sum norm of |A|^T |A|, two mat-vecs),
    Rump's criterion for the Cholesky (a run to completion of fl(H - c I) with c >= gamma_{n+1} trace(H) / (1 - ...)
    proves H positive definite; we take c = 2 gamma_{n+2} (trace(H) + n |shift|)) and the diagonal shift itself.
A matrix whose bracket does not yet meet the target gets another round (more steps, and the best certified shift,
whose factor is already at hand); after ``max_rounds`` it falls back to a float64 SVD (counted). Structural rank
deficiency (an empty column of A, or fewer non-empty rows than columns) gives sigma_min = 0 exactly, no iteration:
with host steering (``sync=True``) such a matrix only estimates sigma_max: on CPU (n > 128, the default
``tight_max=False``) by power steps on A in the weights' precision, with no Gram and a loose proven upper bound,
else by iterating on G and certifying sigma_max (one factorization). On CPU the Gram's rounding bound and the
structural test are read from |W| in the weights' own precision (``_source_bounds``), and Cholesky factorizations
of n > 384 go block by block.
On CPU, matrices with n <= 128 take Rayleigh-Ritz on the whole space (eigh of G) instead of iterating, stacked
across shapes into zero-padded batches (one per power-of-two bucket of n), since Python overhead per op dominates
there.

No host synchronisation is needed by the rounds themselves (``cholesky_ex``, triangular solves, matmuls, and a
repeated-squaring Rayleigh-Ritz pick instead of ``eigh``, which checks its status on the host): with ``sync=False``
min(max_rounds, 2) fixed rounds run for every matrix and the certification flags stay on the device for the caller
to read later.
See docs/spectral.md for the measurements behind each choice.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from fastcnc import _backend
from fastcnc._checks import check_int, check_tensor
from fastcnc.spectral_math import kappa

__all__ = ["SpectralEstimate", "SpectralOptions", "SpectralState", "VectorGroup", "as_matrices",
           "extreme_singular_values", "matrices_list"]

_U = 2.0**-53  # unit roundoff of float64
_F64 = torch.float64


_TOP_STEPS = 4
_SYNC_FREE_ROUNDS = 2  # rounds a sync-free call (TSCNC on CUDA) runs for every matrix: measured in docs/spectral.md
_EIGH_MAX = 128  # on CPU, groups with n <= this take Rayleigh-Ritz on the whole space (eigh) instead of iterating


def _gamma(k: int, u: float = _U) -> float:
    """gamma_k = k u / (1 - k u): the classic bound on the relative rounding error of a length-k dot product (u: the
    unit roundoff, float64's by default)."""
    return k * u / (1 - k * u)


@dataclass
class SpectralEstimate:
    """Estimates for L matrices, with certified brackets. All values are float64 [L] tensors on the weights' device.

    ``sigma_max`` / ``sigma_min`` are the computed values |A y| / |A x| with y, x unit Ritz vectors: sigma_max is never
    above the true sigma_max, sigma_min never below the true sigma_min (up to float64 rounding of one product). The
    penalty's gradient is the exact gradient of these values (``u v^T`` with the vectors frozen).

    Brackets: where ``certified[l]`` is True, the true values satisfy
        sigma_max_lo <= sigma_max(W_l) <= sigma_max_hi   and   sigma_min_lo <= sigma_min(W_l) <= sigma_min_hi,
    proved in floating point (Cholesky factorizations with rigorous rounding margins, see the module docstring), and
    the bracket is tight enough that the estimated kappa_floor = sigma_max / (sigma_min + floor * sigma_max) is within
    ``rtol`` (relative) of the true one (floor = 0: plain kappa). ``structural[l]``: sigma_min = 0 from the zero
    pattern (exact), so kappa_floor = 1 / floor whatever sigma_max is: by default (``tight_max=False``, CPU,
    n > 128) such a matrix's sigma_max bracket is proven but loose, [power-iteration value less its rounding bound,
    sqrt(||W||_1 ||W||_inf)], and ``sigma_max`` is that lower end. ``fallback[l]``: the values come from a float64
    SVD; where such a layer is not ``certified`` its bracket is the SVD's backward-error bound (LAPACK's guarantee,
    not machine-checked here). ``err_max`` / ``err_min`` are the bracket widths (the truth is within that distance of
    the estimate). In ``sync=False`` calls ``certified`` is a device tensor that nothing has read yet: check it before
    trusting the values.
    """

    sigma_max: torch.Tensor
    sigma_min: torch.Tensor
    sigma_max_lo: torch.Tensor
    sigma_max_hi: torch.Tensor
    sigma_min_lo: torch.Tensor
    sigma_min_hi: torch.Tensor
    certified: torch.Tensor  # [L] bool
    fallback: torch.Tensor  # [L] bool
    structural: torch.Tensor  # [L] bool
    finite: torch.Tensor  # [L] bool: the weights held no NaN/Inf (sync=True calls raise instead)
    u_max: Sequence[torch.Tensor]  # left vectors [m_l] in the matrix's own orientation, float64 (views into groups)
    v_max: Sequence[torch.Tensor]  # right vectors [n_l]
    u_min: Sequence[torch.Tensor]
    v_min: Sequence[torch.Tensor]
    work: dict = field(default_factory=dict)  # grams, rounds, factorizations, inverse/power steps, fallbacks
    rtol: float = 1e-2
    floor: float = 0.0
    bottom: list | None = None  # with ritz_block=True: per matrix (sigmas [r], U [m, r], V [n, r]) ascending
    # [L] bool, sync=False calls: the first round alone certified the matrix (exact rows count as True); TSCNC reads
    # it one call late to decide whether its next sync-free calls need a second round
    first_round_certified: torch.Tensor | None = None
    groups: list = field(default_factory=list, repr=False)  # VectorGroup: the vectors stacked per shape (backward)

    @property
    def kappa(self) -> torch.Tensor:
        """sigma_max / sigma_min (inf where sigma_min == 0 < sigma_max; 1 for an all-zero matrix)."""
        return kappa(self.sigma_max, self.sigma_min)

    @property
    def err_max(self) -> torch.Tensor:
        return self.sigma_max_hi - self.sigma_max_lo

    @property
    def err_min(self) -> torch.Tensor:
        return self.sigma_min_hi - self.sigma_min_lo

    @property
    def refreshed(self) -> torch.Tensor:
        """Computed by the exact float64 SVD (``refresh=True`` or the fallback)."""
        return self.fallback


class SpectralState:
    """Warm-start state per matrix: ``blocks[i]`` = [n_i, r + r_top] (bottom block, then top block, tall orientation,
    float64) and ``lower[i]`` = the last certified lower bound of sigma_min (0-dim tensor; the next call's shift).

    Kept between training steps like ``spectral_norm`` keeps u/v. ``to_dict``/``from_dict`` make it checkpointable.
    """

    def __init__(self) -> None:
        self.blocks: list[torch.Tensor] | None = None
        self.lower: list[torch.Tensor] | None = None
        self.shapes: list[tuple[int, int]] | None = None

    def matches(self, shapes: list[tuple[int, int]]) -> bool:
        return self.blocks is not None and self.shapes == shapes

    def to_dict(self) -> dict:
        return {"shapes": self.shapes, "blocks": self.blocks, "lower": self.lower}

    @classmethod
    def from_dict(cls, d: dict) -> SpectralState:
        if not isinstance(d, dict) or not {"shapes", "blocks"} <= set(d):
            raise ValueError("d must be a dict with 'shapes' and 'blocks' (and 'lower') as written by "
                             f"SpectralState.to_dict(), got {type(d).__name__}"
                             + (f" with keys {sorted(d)}" if isinstance(d, dict) else ""))
        s = cls()
        s.shapes = None if d["shapes"] is None else [tuple(x) for x in d["shapes"]]
        s.blocks = d["blocks"]
        s.lower = d.get("lower")
        if isinstance(s.blocks, list):  # (a state for other shapes or options is ignored at the call: cold start)
            _check_blocks([b for b in s.blocks if isinstance(b, torch.Tensor) and b.dim() == 2 and b.numel()])
        return s


def matrices_list(name: str, weights) -> list:
    """One tensor or a non-empty sequence of them, as a list (elements are checked by the caller)."""
    if isinstance(weights, torch.Tensor):
        return [weights]
    if not isinstance(weights, (Sequence, Iterable)) or isinstance(weights, (str, bytes, dict)):
        raise TypeError(f"{name} must be a tensor or a list of tensors, got {type(weights).__name__}")
    mats = list(weights)
    if not mats:
        raise ValueError(f"{name} must be a tensor or a non-empty list of tensors")
    return mats


def as_matrices(weight: torch.Tensor, groups: int = 1) -> list[torch.Tensor]:
    """The matrices whose spectra CNC constrains: Linear [out, in] as is; Conv [out, in/g, *k] -> g matrices of
    [out/g, in/g * prod(k)] (one per group; a grouped conv is block-diagonal, so its extremes are the groups')."""
    check_tensor("weight", weight, ndim=(2, 3, 4, 5), floating=True, nonempty=True)
    check_int("groups", groups, minimum=1)
    out = weight.shape[0]
    if out % groups:
        raise ValueError(f"groups={groups} must divide the weight's first dimension {out}")
    mat = weight.reshape(out, -1)
    if groups == 1:
        return [mat]
    return list(mat.reshape(groups, out // groups, -1).unbind(0))


# ----------------------------------------------------------------------------------------------------------------
# options and validation


@dataclass(frozen=True)
class SpectralOptions:
    """The engine's accuracy target and work schedule (see ``extreme_singular_values`` for each field)."""

    rtol: float = 1e-2
    floor: float = 0.0
    block: int = 4
    iters: int = 3
    max_rounds: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rtol", "floor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"{name} must be a finite number, got {v!r}") if not isinstance(
                    v, (int, float)) or isinstance(v, bool) else ValueError(f"{name} must be finite, got {v!r}")
        if not 0 < self.rtol < 1:
            raise ValueError(f"rtol must be in (0, 1), got {self.rtol}")
        if not 0 <= self.floor < 1:
            raise ValueError(f"floor must be in [0, 1), got {self.floor}")
        check_int("block", self.block, minimum=1)
        check_int("iters", self.iters, minimum=1)
        check_int("max_rounds", self.max_rounds, minimum=1)
        check_int("seed", self.seed, minimum=-(2**63))


def _validate(weights, state) -> list[torch.Tensor]:
    # a [B, m, n] tensor is B matrices of one shape (views: nothing is copied)
    batch = isinstance(weights, torch.Tensor) and weights.dim() == 3
    if batch and weights.shape[0] == 0:
        raise ValueError(f"weights is a batch of 0 matrices (shape {tuple(weights.shape)}): expected at least one")
    mats = list(weights.unbind(0)) if batch else matrices_list("weights", weights)
    for i, m in enumerate(mats):
        check_tensor(f"weights[{i}]", m, ndim=2, floating=True, nonempty=True)
        if m.device != mats[0].device:
            raise ValueError(f"weights[{i}] is on {m.device}, expected all on {mats[0].device}")
    if mats[0].device.type == "meta":
        raise ValueError("weights are on the meta device (shapes without values); expected CPU or CUDA tensors")
    if state is not None and not isinstance(state, SpectralState):
        raise TypeError(f"state must be None or a fastcnc.SpectralState, got {type(state).__name__}")
    return mats


# ----------------------------------------------------------------------------------------------------------------
# one group: same tall shape, stacked


def _gram(A: torch.Tensor) -> torch.Tensor:
    """A^T A for a [B, m, n] stack. On CPU from n = 128 on, by halving the columns recursively down to 64 (A1^T A1 and
    A2^T A2 recursed, A2^T A1 one product, its transpose copied): close to half the flops (5-20% of the time on
    one CPU core over one split into halves, measured on ResNet-18/50 layer shapes). On CUDA one product (more
    launches cost more than the flops saved). Each entry is one length-m dot product either way, so the rounding bound
    is the same (nothing relies on symmetry: the factorizations read one triangle, the Rayleigh-Ritz matrices are
    symmetrised)."""
    n = A.shape[-1]
    if n < 128 or _backend.on_cuda(A):
        return A.mT @ A
    G = A.new_empty(A.shape[0], n, n)
    # column blocks of a wide group's transposed view are contiguous rows of the weights, and narrow products of them
    # stay near the BLAS peak; the strided column blocks of a tall one do not, so it is split once
    _gram_into(A, G, _GRAM_LEAF if A.stride(-2) == 1 else n // 2)
    return G


_GRAM_LEAF = 64  # column count at or below which a block of the Gram is one product


def _gram_into(A: torch.Tensor, G: torch.Tensor, leaf: int) -> None:
    n = A.shape[-1]
    if n <= leaf:
        G.copy_(A.mT @ A)
        return
    h = n // 2
    A1, A2 = A[..., :h], A[..., h:]
    _gram_into(A1, G[:, :h, :h], leaf)
    G[:, h:, :h] = A2.mT @ A1
    G[:, :h, h:] = G[:, h:, :h].mT
    _gram_into(A2, G[:, h:, h:], leaf)


@dataclass
class _SourceBounds:
    """Per matrix, from its weights as stored (CPU): ``gram_err`` bounds |fl(A^T A) - A^T A|_2 for a float64 Gram of
    the unscaled A, ``norm`` bounds sigma_max, ``structural``: rank(A) < n from the zero pattern, ``finite``,
    ``rows``: the rows of the tall A that hold a nonzero, where at least n and at most ``_COMPACT_ROWS`` of them do
    (else None), ``zero``: A = 0 exactly."""

    gram_err: torch.Tensor  # [L] float64
    norm: torch.Tensor  # [L] float64
    structural: torch.Tensor  # [L] bool
    finite: torch.Tensor  # [L] bool
    rows: list[torch.Tensor | None]
    zero: torch.Tensor  # [L] bool

    def take(self, idx: list[int]) -> _SourceBounds:
        return _SourceBounds(*(getattr(self, k)[idx] for k in ("gram_err", "norm", "structural", "finite")),
                             [self.rows[i] for i in idx], self.zero[idx])


def _source_bounds(mats: list[torch.Tensor]) -> _SourceBounds:
    """Rounding and norm bounds and the structural test from |W| in the weights' own layout and precision (float32,
    float64 for float64 weights): three mat-vecs on an exact copy, half the bytes of the float64 stack's passes.

    With A the tall orientation (m >= n), r = |A| 1 and c = 1^T |A| (sums of non-negative exact terms, so zero exactly
    when every term is, and never below (1 - gamma_k) times the true sum), q = |A|^T r. Then
      - |fl(A^T A) - A^T A| <= gamma_m |A|^T |A| (float64 Gram), whose 2-norm is at most max_j q_j (Collatz-Wielandt
        with the all-ones vector); q's products may underflow, by at most the smallest normal number each (flush to
        zero included), hence the m * tiny term;
      - sigma_max(A) <= sqrt(||A||_1 ||A||_inf) = sqrt(max c * max r);
      - rank(A) < n when a column is empty or fewer than n rows hold a nonzero.

    Matrices of one shape and dtype are read as one stack (batched mat-vecs, one read-back), so thousands of small
    blocks cost a few ops, not a few ops each."""
    L = len(mats)
    ge, nb, st, fin, rows, zero = [0.0] * L, [0.0] * L, [False] * L, [True] * L, [None] * L, [False] * L  # (host)
    runs: dict[tuple, list[int]] = {}
    for i, w in enumerate(mats):
        runs.setdefault((tuple(w.shape), w.dtype), []).append(i)
    # |W| in one float32 scratch: a fresh weight-sized block per call is mapped page by page as it is written
    # (ResNet-50's weights: 35 ms fresh, 10 ms into one scratch, one thread)
    scratch = torch.empty(max(len(idx) * mats[idx[0]].numel() for idx in runs.values()), device=mats[0].device)
    for ((R, C), dtype), idx in runs.items():
        wide, m, n = R < C, max(R, C), min(R, C)
        todo = idx
        # bfloat16 / float16 widen exactly to float32; a matrix so small (or large) that q would lose itself in
        # float32 underflow (overflow) is redone in float64, where float32 entries' products cannot underflow
        for wd in ((_F64,) if dtype == _F64 else (torch.float32, _F64)):
            part = [mats[i].detach() for i in todo]
            if wd == torch.float32:
                a = scratch[:len(part) * R * C].view(len(part), R, C)
                if R * C >= 4096:  # one pass per matrix (a stack, then abs_, would be two over the scratch)
                    for j, w in enumerate(part):
                        torch.abs(w.to(wd), out=a[j])
                else:  # small blocks: two ops for the run instead of one per matrix
                    torch.stack(part, out=a).abs_()
            else:
                a = torch.stack(part).to(wd).abs_()
            ones_rows, ones_cols = a.new_ones(R), a.new_ones(C)
            if wide:  # a = |A|^T
                r, c = ones_rows @ a, a @ ones_cols
                q = (a @ r[..., None])[..., 0]
            else:
                r, c = a @ ones_cols, ones_rows @ a
                q = (r[:, None, :] @ a)[:, 0]
            u, tiny = torch.finfo(wd).eps / 2, torch.finfo(wd).tiny
            q_top, c_top, r_top = (t.amax(-1).tolist() for t in (q, c, r))
            empty_col = (c == 0).any(-1).tolist()
            held = r != 0  # (a NaN row is held: the Gram must see it)
            count = held.sum(-1).tolist()  # (fewer than n: structurally singular, and A keeps at least n rows)
            finite = (torch.isfinite(q).all(-1) & torch.isfinite(c).all(-1)).tolist()
            redo = []
            for j, i in enumerate(todo):
                if not (wd == _F64 or m * tiny * 2.0**30 < q_top[j] < torch.finfo(wd).max * 2.0**-30
                        or math.isnan(q_top[j])):
                    redo.append(i)
                    continue
                q_max = (q_top[j] + m * tiny) / ((1 - _gamma(n, u)) * (1 - _gamma(m + 1, u)))
                ge[i] = q_max * _gamma(m) * (1 + 4 * _U)
                nb[i] = math.sqrt(c_top[j] * r_top[j] / ((1 - _gamma(m, u)) * (1 - _gamma(n, u)))) * (1 + 4 * _U)
                st[i] = empty_col[j] or count[j] < n
                zero[i] = count[j] == 0
                fin[i] = finite[j]
                rows[i] = held[j].nonzero().flatten() if n <= count[j] <= _COMPACT_ROWS * m else None
            todo = redo
            if not todo:
                break
    return _SourceBounds(torch.tensor(ge, dtype=_F64), torch.tensor(nb, dtype=_F64), torch.tensor(st),
                         torch.tensor(fin), rows, torch.tensor(zero))


# A CPU group whose matrices all have at most this fraction of nonzero rows (tall orientation) is formed from those
# rows alone. Global magnitude pruning empties whole input features: at 88-95% sparsity 60-89% of the rows of
# ResNet-18's 512 x 2304 / 4608 layers (their inputs) are zero, and a zero row adds nothing to A^T A or to A x. The
# gather costs about what 5-10% of the Gram saves (a group of three 512 x 4608 layers, one thread: 97 vs 102 ms with
# 90% of the rows kept, 103 vs 100 ms with 95%, 49 vs 98 ms with 50%).
_COMPACT_ROWS = 0.9


# Rounding coefficients of a matrix's own (m, n), named so a batch's table of them can be keyed by name
def _gram_coef(m, n):  # the Gram's error bound, with the rounding of the product that computes it
    return _gamma(m) * (1 + 2 * _gamma(m + n))


def _sum_coef(m, n):  # a computed sum of n non-negative terms, made an upper bound
    return 1 + _gamma(n)


def _chol_coef(m, n):  # Rump's criterion for a Cholesky factorization of an n x n matrix (doubled)
    return 2 * _gamma(n + 2)


def _value_coef(m, n):  # |A x|: a length-m product and a length-n norm
    return 2 * _gamma(m + n + 2)


def _svd_coef(m, n):  # backward-stable SVD: |sigma_i - computed| <~ p(m, n) u |A|
    return 4 * (m + n) * _U


def _n_float(m, n):
    return float(n)


_COEFS = (_gram_coef, _sum_coef, _chol_coef, _value_coef, _svd_coef, _n_float)
_SHAPE_TABLES: dict = {}  # (device, n, runs) -> device tensors, see _shape_table
_MAX_SHAPE_TABLES = 64


def _shape_table(parts, n: int, device: torch.device) -> dict:
    """Per-matrix rounding coefficients ([B] float64, by function name) and padding mask ([B, n]) of a ragged batch,
    made once per set of shapes and kept. On CUDA that is one upload (a host sync) at the first call with new shapes,
    a cold call that syncs anyway; every warm call after it, the captured graph included, reads the same tensors."""
    runs = tuple((b - a, m, n_i) for _, _, a, b, m, n_i in parts)
    key = (device, n, runs)
    hit = _SHAPE_TABLES.get(key)
    if hit is None:
        rows = [(m, n_i) for count, m, n_i in runs for _ in range(count)]
        values = torch.tensor([[f(m, n_i) for f in _COEFS] for m, n_i in rows], dtype=_F64).to(device)
        hit = {f.__name__: values[:, k] for k, f in enumerate(_COEFS)}
        hit["pad"] = torch.arange(n, device=device)[None, :] >= values[:, -1:]
        if len(_SHAPE_TABLES) >= _MAX_SHAPE_TABLES:
            _SHAPE_TABLES.pop(next(iter(_SHAPE_TABLES)))
        _SHAPE_TABLES[key] = hit
    return hit


class _Group:
    """Matrices of one tall shape [m, n] (or, ``size`` given, of several shapes zero-padded to one): a stacked float64
    copy (float64 inputs scaled by powers of two to max |a| in [1/2, 1)), its Gram, the rounding bounds that every
    certificate needs, and the structural-rank test."""

    def __init__(self, index: list[int], mats: list[torch.Tensor], size: tuple[int, int] | None = None,
                 bounds: _SourceBounds | None = None, on_device: bool = False,
                 held: list[torch.Tensor | None] | None = None) -> None:
        """``size`` = (m, n): a ragged batch (small matrices of several shapes on CPU; on CUDA every batch of
        ``_batch_n``), each zero-padded to [m, n] in the tall orientation, matrices of one shape and orientation next
        to each other. Zero rows change no product; zero columns are marked in ``pad``, where ``_shifted``
        (certificates) and ``_round_eigh`` put a unit or a large diagonal, so each matrix's block is computed exactly
        as it would be alone: the padding coordinates come last, so the leading n_i x n_i block of a Cholesky factor
        (and its rounding) is the matrix's own, and the unit diagonal makes the trailing block exactly I (its
        off-diagonal factor entries are exact zeros); iterates started with zero padding stay zero there; every
        rounding coefficient is each matrix's own (``margin1``: the largest).

        The per-matrix rounding coefficients and the padding mask of a ragged batch come from a table kept per set
        of shapes (``_shape_table``). ``on_device`` (CUDA, ``size`` given): the Gram is formed per run of one shape
        (no products over the padding) and only float64 matrices are scaled; with every bound computed once for the
        batch, the values are those of one group per shape (up to the summation order of products), for a fraction
        of the launches. ``bounds``: the Gram's rounding bound and the structural test,
        already computed from the (unscaled, not float64) weights (CPU). ``held``: per matrix, its nonzero rows (tall
        orientation) when few enough (``_SourceBounds.rows``); a one-shape group of which every matrix has them is
        formed from those rows alone."""
        self.index = index
        self.wide = [w.shape[0] < w.shape[1] for w in mats]
        dev = mats[0].device
        scaled = any(w.dtype == _F64 for w in mats)
        if scaled:
            # scale by powers of two (exact) read from the stored dtype, so one float64 pass makes the stack (on CUDA,
            # float64 matrices only: a batch there spans shapes, and each shape keeps what its own group would do)
            amax = torch.stack([w.detach().abs().amax() if w.dtype == _F64 or not on_device
                                else torch.full((), 0.5, device=dev) for w in mats]).to(_F64)
            self.exp = torch.frexp(amax).exponent.to(_F64)  # A_true = 2^exp * A
        else:
            # float32 and narrower need no scaling: their squares lie in [2e-90, 1.2e77], so no product or sum of
            # the Gram can underflow or overflow in float64 (and the scan for the largest entry is a pass saved)
            self.exp = torch.zeros(len(mats), dtype=_F64, device=dev)
        self.row_m = [max(w.shape) for w in mats]
        self.row_n = [min(w.shape) for w in mats]
        m_, n_ = self.row_m, self.row_n
        # (index, wide, first row, end row, m, n) per run of one tall shape and orientation
        self.parts, a = [], 0
        for b in range(1, len(mats) + 1):
            if b == len(mats) or (m_[b], n_[b], self.wide[b]) != (m_[a], n_[a], self.wide[a]):
                self.parts.append((index[a:b], self.wide[a:b], a, b, m_[a], n_[a]))
                a = b
        # only the nonzero rows (CPU groups, from the source bounds): zero rows change neither A^T A nor |A x|, and
        # the rounding coefficients keep the full m (an upper bound); vectors get their m rows back in full_rows
        self.held = held if held is not None and size is None and all(h is not None for h in held) else None
        if size is not None:
            A = torch.zeros(len(mats), *size, dtype=_F64, device=dev)
            for _, wide, a, b, m, n in self.parts:  # a stack and a copy per run of one shape, not a copy each
                run = mats[a].detach()[None] if b - a == 1 else torch.stack([w.detach() for w in mats[a:b]])
                A[a:b, :m, :n].copy_(run.mT if wide[0] else run)
        elif self.held is not None:
            m = max(len(h) for h in self.held)
            A = torch.empty((len(mats), self.row_n[0], m) if self.wide[0] else (len(mats), m, self.row_n[0]),
                            dtype=_F64, device=dev)
            rows_dim = 1 if self.wide[0] else 0  # (one orientation per CPU group; wide ones stored as given, as below)
            for j, (w, h) in enumerate(zip(mats, self.held, strict=True)):
                A[j].narrow(rows_dim, 0, len(h)).copy_(w.detach().index_select(rows_dim, h))
                A[j].narrow(rows_dim, len(h), m - len(h)).zero_()
            A = A.mT if self.wide[0] else A
        elif all(self.wide) or not any(self.wide):
            # one orientation, stacked as stored (cast in the same pass); wide ones used through a transposed view:
            # BLAS takes transposed operands for free, while a transposing copy costs several times a contiguous one
            A = torch.stack([w.detach() for w in mats],
                            out=torch.empty(len(mats), *mats[0].shape, dtype=_F64, device=dev))
            A = A.mT if self.wide[0] else A
        else:
            A = torch.empty(len(mats), self.row_m[0], self.row_n[0], dtype=_F64, device=dev)
            for j, (w, wd) in enumerate(zip(mats, self.wide, strict=True)):
                A[j].copy_(w.detach().T if wd else w.detach())  # cast and (for wide matrices) transpose in one pass
        self.A = A.mul_(torch.pow(2.0, -self.exp)[:, None, None]) if scaled else A
        self.B, self.m, self.n = A.shape
        table = _shape_table(self.parts, self.n, dev) if size is not None else None
        # [B, n] True on the padding coordinates of a batch padded across n
        self.pad = table["pad"] if table is not None and any(n != self.n for n in self.row_n) else None

        def coef(f):  # a rounding coefficient of (m, n): a float for one shape, a [B] tensor for a ragged batch
            return f(m_[0], n_[0]) if table is None else table[f.__name__]

        if on_device:
            # the Gram per run of one shape, each on its own [m, n] block (padding would add flops, not launches)
            G = A.new_zeros(self.B, self.n, self.n) if self.pad is not None else A.new_empty(self.B, self.n, self.n)
            for _, _, a, b, m, n in self.parts:
                Ap = A[a:b, :m, :n]
                if n == self.n:
                    torch.bmm(Ap.mT, Ap, out=G[a:b])
                else:
                    G[a:b, :n, :n] = Ap.mT @ Ap
            self.G = G
        else:
            self.G = _gram(self.A)
        if bounds is not None:
            self.gram_err, self.structural = bounds.gram_err.to(dev), bounds.structural.to(dev)
        else:
            absA = self.A.abs()
            row_abs = absA.sum(2)  # [B, m]
            # (|A|^T |A|) 1 and the column sums of |A| in one product
            prods = absA.mT @ torch.stack([row_abs, torch.ones_like(row_abs)], 2)  # [B, n, 2]
            self.gram_err = coef(_gram_coef) * prods[..., 0].amax(1)
            # rank(A) < n when a column is empty or fewer than n rows hold a nonzero: sigma_min = 0 exactly
            # (sums of |a| are 0 exactly when every term is; padding columns are not the matrix's)
            empty_col = prods[..., 1] == 0
            if self.pad is not None:
                empty_col &= ~self.pad
            n_t = coef(_n_float)
            self.structural = empty_col.any(1) | ((row_abs > 0).sum(1) < n_t)
        diag = self.G.diagonal(dim1=1, dim2=2)
        self.finite = torch.isfinite(diag).all(1)  # any NaN/Inf entry reaches its column's squared norm
        self.trace = diag.sum(1) * coef(_sum_coef)
        self.fro = self.trace.sqrt()
        self.zero = self.trace == 0
        # rigorous upper bound on lambda_max(A^T A): row-sum norm of fl(G) plus the Gram's error
        self.lam_max_bound = self.G.abs().sum(2).amax(1) * coef(_sum_coef) + self.gram_err
        self.eye = torch.eye(self.n, dtype=_F64, device=dev)
        self.margin0 = self.gram_err + coef(_chol_coef) * self.trace + 4 * _U * self.lam_max_bound
        self.margin1 = max(2 * _gamma(n + 2) * n + 4 * _U for n in set(n_))
        # m-dependent rounding coefficients of |A x| and of the SVD (floats for one shape, else [B] tensors)
        self.val_coef = coef(_value_coef)
        self.svd_coef = coef(_svd_coef)
        # an all-zero matrix (values 0, set by the caller's flags) iterates on I instead of a singular G: its G is
        # exactly 0, so adding the flag to the diagonal makes it I (in place: no copy of every G)
        diag.add_((self.zero[:, None] if self.pad is None else self.zero[:, None] & ~self.pad).to(_F64))

    def full_rows(self, T: torch.Tensor, j: int | None = None) -> torch.Tensor:
        """Vectors over the rows of A ([B, m', ...], or matrix j's [m', ...]) with each matrix's zero rows put back,
        as zeros (exact: a zero row of A gives a zero entry of A x), where the group holds only the nonzero rows."""
        if self.held is None:
            return T
        if j is not None:
            out = T.new_zeros(self.row_m[j], *T.shape[1:])
            out[self.held[j]] = T[:len(self.held[j])]
            return out
        out = T.new_zeros(self.B, self.row_m[0], *T.shape[2:])
        for i, h in enumerate(self.held):
            out[i, h] = T[i, :len(h)]
        return out

    def margin(self, shift: torch.Tensor, rows=slice(None)) -> torch.Tensor:
        """mu(shift): bound on all rounding between fl(G) -/+ shift I and the exact A^T A -/+ shift I."""
        # = gram_err + 2 gamma_{n+2} (trace + n |shift|) + 4 u (lam_max_bound + |shift|), with the shift-free part
        # formed once per group (each op is a launch on CUDA, and every certificate asks for margins)
        return self.margin0[rows] + self.margin1 * shift.abs()


_RITZ_MAX_COLUMNS = 8  # blocks up to this width take kernels/ritz.py on CUDA (its register tiles grow as r^2)
# Cholesky route per code path (see _chol): (n above which a factorization recurses on halves, leaf size), or None
# for the library's batched call at every n
_CHOL_HALVES = {"cpu": (64, 64), "cuda": None}
_INVERSE_BY_PRODUCTS_ON = {"cuda"}  # devices whose inverse-iteration steps are products with L^-1 (see _round)


class _Structural:
    """Structurally rank-deficient matrices of one tall shape and orientation (CPU, host-steered, the default
    ``tight_max=False``): sigma_min = 0 exactly, so kappa_floor = 1 / floor whatever sigma_max is, and only sigma_max
    is estimated, by block power steps on A itself in the weights' precision (float32, or float64): no copy of the
    weights, no Gram, no factorization. The bracket of sigma_max is [|A y| less its rounding bound,
    sqrt(||A||_1 ||A||_inf)]: proven, not tight (the Gram route's certificate would cost more than everything else
    these rows need)."""

    def __init__(self, index: list[int], mats: list[torch.Tensor], bounds: _SourceBounds) -> None:
        self.index, self.bounds = index, bounds
        w0 = mats[0]
        self.wd = _F64 if any(w.dtype == _F64 for w in mats) else torch.float32
        self.wide = [w0.shape[0] < w0.shape[1]] * len(mats)
        self.m, self.n = max(w0.shape), min(w0.shape)
        self.B = len(mats)
        # the weights as stored, multiplied one at a time: stacking them would copy every weight (these are the
        # largest layers once pruned), for a handful of thin products
        self.W = [w.detach().to(self.wd) for w in mats]
        self.row_m, self.row_n = [self.m] * self.B, [self.n] * self.B
        self.parts = [(index, self.wide, 0, self.B, self.m, self.n)]
        self.exp = torch.zeros(self.B, dtype=_F64)
        self.structural = torch.ones(self.B, dtype=torch.bool)
        self.finite = torch.ones(self.B, dtype=torch.bool)

    def times(self, Y: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """A @ Y ([B, n, k] -> [B, m, k]), or A^T @ Y, in the weights' precision, float64 out (``_times``: over the
        rows of W as stored)."""
        Y = Y.to(self.wd)
        flip = self.wide[0] != transposed  # A = W^T for a wide W
        return torch.stack([_times(W.mT if flip else W, Y[j]) for j, W in enumerate(self.W)]).to(_F64)

    def solve(self, start: torch.Tensor, r: int, min_steps: int, max_steps: int, rtol: float) -> dict:
        """Power steps from ``start``'s top block until its top Ritz value moves by less than rtol / 100 (relative)
        from one step to the next (at least ``min_steps``, at most ``max_steps``), a Ritz pick in it, and
        sigma_max = |A y| with its bracket. The stopping test is a heuristic, not a proof: the bracket is the proof."""
        wd = self.wd
        X, Y0 = _initial_blocks(start, r, start.shape[-1] - r)
        Y, prev = Y0, None
        for step in range(max_steps + 1):
            AY = self.times(Y)  # [B, m, k]: also the Rayleigh-Ritz matrix of the current block
            H = AY.mT @ AY
            if Y.shape[-1] == 2:
                a, b, c = _sym2(H)
                top = 0.5 * (a + c) + torch.sqrt((0.5 * (a - c)) ** 2 + b * b)
            else:
                top = H[:, 0, 0]
            if step == max_steps or (step >= min_steps and bool(((top - prev).abs() <= 0.01 * rtol * top).all())):
                break
            prev = top
            # (an all-zero A keeps its start block: the warm state must stay a basis)
            new = _orth(self.times(AY, transposed=True), passes=1)
            ok = torch.isfinite(new).flatten(1).all(1) & (new.flatten(1).abs().amax(1) > 0)
            Y = torch.where(ok[:, None, None], new, Y)
        # (an all-zero A leaves y = 0); rounded to the working precision: the vector the product below really uses
        y = _unit_or(_top_pick(H, Y), Y0[..., 0]).to(wd).to(_F64)
        y_norm = y.norm(dim=1)
        y = y / y_norm[:, None]
        z = self.times((y * y_norm[:, None])[..., None]).squeeze(-1)  # exact inputs: y_w = y |y_w|
        s = z.norm(dim=1)
        # |fl(A y_w) - A y_w| <= gamma_n |A| |y_w| (+ n tiny per entry: underflow), and || |A| ||_2 <= norm bound
        u, tiny = torch.finfo(wd).eps / 2, torch.finfo(wd).tiny
        g_n = _gamma(self.n + 2, u)
        norm = self.bounds.norm
        computed = s / y_norm
        err = g_n * norm + math.sqrt(self.m) * self.n * tiny / y_norm + 8 * _U * computed
        # the value reported is the proven lower bound (~1e-4 below the float32 |A y|), so that sigma_max is never
        # above the true one, as everywhere else
        smax = (computed - err).clamp_min(0)
        zeros = torch.zeros_like(smax)
        return dict(x=X[..., 0], y=y, smin=zeros, smax=smax, u_min=torch.zeros_like(z),
                    u_max=z / s.clamp_min(torch.finfo(_F64).tiny)[:, None], smin_lo=zeros, smin_hi=zeros,
                    smax_lo=smax, smax_hi=torch.maximum(norm, computed),
                    certified=torch.ones(self.B, dtype=torch.bool), resolved=torch.ones(self.B, dtype=torch.bool),
                    fallback=torch.zeros(self.B, dtype=torch.bool), blocks=torch.cat([X, Y], 2))


def _chol(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched float64 Cholesky of a fresh ``H`` (it may be overwritten) without a host sync; ok = ran to completion
    with finite pivots.

    Where ``_CHOL_HALVES`` says so (CPU: n > 64), it recurses on halves in place (``_chol_halves``): on CPU torch's own
    call spends more time copying into and zeroing the upper triangle of its column-major result than factoring
    (n = 512: 1.7x slower), and halving down to 64 beat blocking by 192 on the batches the engine factors (one
    thread: 9-34% on batches of 2-10 matrices of n = 128-1024, 2-7% on a single matrix of n = 256-512).
    Only triangular solves read the factor, so its strict upper triangle is left as it is.
    Rounding is that of any blocked Cholesky, which the certificates' margins (Rump's criterion) already assume.
    """
    route = _CHOL_HALVES["cuda" if _backend.on_cuda(H) else "cpu"]
    if route is None or H.shape[-1] <= route[0]:
        L, info = torch.linalg.cholesky_ex(H, check_errors=False)
        return L, (info == 0) & torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all(-1)
    ok = _chol_halves(H, route[1])
    return H, ok & torch.isfinite(H.diagonal(dim1=-2, dim2=-1)).all(-1)


def _chol_halves(H: torch.Tensor, leaf: int) -> torch.Tensor:
    """Right-looking recursive Cholesky in place: factor the leading half, the panel by a triangular solve, the
    trailing half updated by a product and factored; True where every leaf factored."""
    n = H.shape[-1]
    if n <= leaf:
        L, info = torch.linalg.cholesky_ex(H, check_errors=False)
        H.copy_(L)
        return info == 0
    h = n // 2
    ok = _chol_halves(H[..., :h, :h], leaf)
    P = torch.linalg.solve_triangular(H[..., :h, :h], H[..., h:, :h].mT, upper=False).mT
    H[..., h:, :h] = P
    H[..., h:, h:].sub_(P @ P.mT)
    return ok & _chol_halves(H[..., h:, h:], leaf)


def _orth(X: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """Cholesky QR ([B, n, r] -> orthonormal columns spanning the same space; twice by default). A tiny diagonal term
    (relative to each column's own norm, so columns of very different norms keep theirs) keeps the factorization
    defined when columns are (nearly) dependent; every value computed later is a Rayleigh quotient evaluated
    directly, so orthonormality affects only the quality of the block, never a bound's validity."""
    if _backend.use_triton(X) and X.shape[-1] <= _RITZ_MAX_COLUMNS:
        # CUDA: one launch per pass (the steps below are ~10 kernels, a batched r x r Cholesky among them)
        return _backend.kernels("ritz").cholesky_qr(X, passes)
    for _ in range(passes):
        S = X.mT @ X
        d = S.diagonal(dim1=1, dim2=2)  # in place on the fresh product: no identity to build (each op is a launch)
        d.mul_(1 + 1e-14).add_(1e-300)
        L, _ = torch.linalg.cholesky_ex(S, check_errors=False)
        X = torch.linalg.solve_triangular(L, X.mT, upper=False).mT
    return X


def _keep_finite(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Rows (matrices) of ``new`` with a NaN/Inf entry replaced by ``old``'s: a failed factorization leaves a
    garbage factor (NaN-filled on CUDA) whose solves must not reach the values, the vectors or the warm state."""
    ok = torch.isfinite(new).flatten(1).all(1)
    return torch.where(ok.view(-1, *([1] * (new.dim() - 1))), new, old)


def _dominant(K: torch.Tensor, squarings: int = 12) -> torch.Tensor:
    """Dominant eigenvector of each symmetric PSD [B, r, r] K by repeated squaring (K^(2^12)), sync-free.

    Where the top of K is clustered the result is some vector of the cluster, which is all a Rayleigh quotient needs.
    """
    tiny = torch.finfo(K.dtype).tiny
    for k in range(squarings):
        # K / trace(K) has its top eigenvalue in [1/r, 1]: three squarings keep it above r^-8, so rescaling every third
        # is enough (each op is a launch on CUDA); rounding asymmetry only perturbs the pick, never a value
        if k % 3 == 0:
            K = K / K.diagonal(dim1=1, dim2=2).sum(1).clamp_min(tiny)[:, None, None]
        K = K @ K
    j = K.diagonal(dim1=1, dim2=2).argmax(1)
    z = K.gather(2, j[:, None, None].expand(-1, K.shape[1], 1)).squeeze(-1)
    return z / z.norm(dim=1, keepdim=True).clamp_min(tiny)


def _bottom_ritz(G: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Unit vector of span(X) with (close to) the smallest Rayleigh quotient of G."""
    H = X.mT @ G @ X
    if _backend.use_triton(H) and H.shape[-1] <= _RITZ_MAX_COLUMNS:  # CUDA: the steps below in one launch
        return (X @ _backend.kernels("ritz").bottom_eigvec(H)[..., None]).squeeze(-1)
    H = 0.5 * (H + H.mT)
    r = H.shape[-1]
    eye = torch.eye(r, dtype=H.dtype, device=H.device)
    H = H + (1e-15 * H.diagonal(dim1=1, dim2=2).sum(1) + 1e-300)[:, None, None] * eye
    L, _ = torch.linalg.cholesky_ex(H, check_errors=False)
    Linv = torch.linalg.solve_triangular(L, eye.expand_as(H), upper=False)
    return (X @ _dominant(Linv.mT @ Linv)[..., None]).squeeze(-1)


def _top_ritz(G: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Unit vector of span(Y) with (close to) the largest Rayleigh quotient of G."""
    return _top_pick(Y.mT @ G @ Y, Y)


def _sym2(H: torch.Tensor):
    """Entries a, b, c of the symmetric [[a, b], [b, c]] nearest each [B, 2, 2] H (b averaged over both sides)."""
    return H[:, 0, 0], 0.5 * (H[:, 0, 1] + H[:, 1, 0]), H[:, 1, 1]


def _top_pick(H: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """The top Ritz vector of span(Y) (orthonormal) from its Rayleigh-Ritz matrix H = Y^T M Y."""
    if H.shape[-1] != 2:
        return (Y @ _dominant(0.5 * (H + H.mT))[..., None]).squeeze(-1)
    # two columns (the default top block): the dominant eigenvector of [[a, b], [b, c]] in closed form, at angle
    # 0.5 atan2(2b, a - c) (a handful of elementwise ops instead of _dominant's squarings: launches on CUDA)
    a, b, c = _sym2(H)
    theta = 0.5 * torch.atan2(2 * b, a - c)
    return Y[..., 0] * theta.cos()[:, None] + Y[..., 1] * theta.sin()[:, None]


@dataclass
class _Round:
    """Per-row results of one round (tensors of the rows it ran on)."""

    X: torch.Tensor  # bottom block [b, n, r]
    Y: torch.Tensor  # top block [b, n, r_top]
    x: torch.Tensor  # bottom Ritz vector [b, n] (unit)
    y: torch.Tensor  # top Ritz vector [b, n]
    smin: torch.Tensor  # |A x| (scaled units)
    smax: torch.Tensor
    u_min: torch.Tensor  # A x / |A x| [b, m]
    u_max: torch.Tensor
    smin_lo: torch.Tensor
    smin_hi: torch.Tensor
    smax_lo: torch.Tensor
    smax_hi: torch.Tensor
    certified: torch.Tensor
    next_L: torch.Tensor | None  # factor of G - s I (s the best certified shift) for the next round's inverse
    # iteration (None for top-only rows)
    factorizations: int


def _times(A: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """A @ V for a few columns V. A wide group's A is the transposed view of its stored rows, and a thin product with
    a transposed operand is ~3x slower on CPU than (V^T A^T)^T over the rows as stored (ResNet-18's 512 x 4608
    layers, one thread); each entry is the same length-n dot product either way."""
    if A.stride(-2) == 1 and A.stride(-1) != 1:
        return (V.mT @ A.mT).mT
    return A @ V


def _values(g: _Group, rows, x: torch.Tensor, y: torch.Tensor):
    """|A x|, |A y| with their unit left vectors, and a bound on the rounding of each value (scaled units)."""
    V = torch.stack([x, y], 2)
    if isinstance(rows, slice):
        AV = _times(g.A[rows], V)  # [b, m, 2]
    else:  # a later round's few rows (host-steered): products on views, not a copy of those rows of A
        AV = torch.stack([_times(g.A[j], V[i]) for i, j in enumerate(rows.tolist())])
    s = AV.norm(dim=1)
    u = AV / s.clamp_min(torch.finfo(_F64).tiny)[:, None, :]
    err = _per_row(g.val_coef, rows) * (s + g.fro[rows][:, None])
    return s[:, 0], s[:, 1], u[..., 0], u[..., 1], err[:, 0], err[:, 1]


def _rows(pad, rows, sub=None):
    """The padding mask of the rows (and of the sub-selection ``sub`` of those), or None when nothing is padded."""
    if pad is None:
        return None
    pad = pad[rows]
    return pad if sub is None else pad[sub]


def _per_row(coef, rows):
    """An m-dependent coefficient for the rows: a float for one tall shape, a [b, 1] column in a merged batch."""
    return coef if isinstance(coef, float) else coef[rows][:, None]


def _shifted(G: torch.Tensor, xi: torch.Tensor, sign: torch.Tensor, pad=None) -> torch.Tensor:
    """[b, k, n, n] stack of sign_k * (G - xi_k I), written in one pass plus an in-place diagonal update; a unit
    diagonal on the padding coordinates ``pad`` ([b, n]) of a batch merged across n."""
    H = G[:, None] * sign[None, :, None, None]
    d = H.diagonal(dim1=-2, dim2=-1)
    d.sub_((sign[None, :] * xi)[..., None])
    if pad is not None:
        d.masked_fill_(pad[:, None, :], 1.0)
    return H


_SYNC_FREE_SHARES = (0.3,)  # ascending shares of the kappa budget given to the top by the sync-free certificate's pairs


def _certify(g: _Group, rows, smin, smax, smin_hi, smax_lo, opt: SpectralOptions, sync: bool, L_it=None,
             top_only: bool = False, last: bool = False):
    """Cholesky certificates: the target lower shift tau and the target upper shift t in one batched call (``top_only``:
    t alone, for rows whose sigma_min is known to be 0). With ``L_it`` (the round's iteration factor) also the factor
    for the next round's inverse iteration: tau's where it factored, else that of a looser shift (0.8 sigma_min; sync:
    factored only for the rows that need it; sync-free: for every row, in the same call, unless ``last``: no round
    follows), else ``L_it``. Returns the certified lower bound of lambda_min (squared, scaled units; 0 if none),
    whether t is proven, t, the next factor (None without ``L_it`` or when ``last``) and the count of
    factorizations."""
    G = g.G[rows]
    budget = 1 + opt.rtol

    if top_only:  # sigma_min = 0 exactly: the whole budget goes to the top
        t = (smax * budget**0.95) ** 2
        L, ok = _chol(_shifted(G, (t - g.margin(t, rows))[:, None], -torch.ones(1, dtype=_F64, device=G.device),
                               _rows(g.pad, rows)))
        return torch.zeros_like(t), ok[:, 0], t, None, G.shape[0]
    both = L_it is not None and not sync
    # pairs (tau, t): the upper shift t gives the top a share of the budget (0.3), tau is the lowest sigma_min
    # (squared) that still keeps kappa_floor within the budget given t and the other two bracket ends. The sync-free
    # path, where no later round can mend a failed pair, may test several shares at once (_SYNC_FREE_SHARES): one
    # costs a factorization per matrix per end, and a second pair giving the top 0.8 certified no more layers on the
    # recorded trajectories (benchmarks/sync_free_choices.py). All pairs go into one batched call (no extra launch),
    # their arithmetic done on [b, pairs] tensors (each op is a launch on CUDA)
    shares = _SYNC_FREE_SHARES if both else (0.3,)
    pairs = len(shares)
    t_all = torch.stack([smax * budget**share for share in shares], 1) ** 2
    ratio = (smin_hi / smax_lo.clamp_min(1e-300) + opt.floor) / budget**0.95 - opt.floor
    tau_all = (t_all.sqrt() * ratio[:, None]).clamp_min(0) ** 2
    tau_loose = (0.8 * smin) ** 2
    # columns [tau_0, t_0, tau_1, t_1, ...(, loose)]: the looser lower shift only drives a next round's inverse
    # iteration (and the sync path factors it for the rows that need it): the sync-free path adds it unless this is
    # the last round
    cols = [c for i in range(pairs) for c in (tau_all[:, i], t_all[:, i])] if both else [tau_all[:, 0], t_all[:, 0]]
    cols += [] if both and last else [tau_loose]
    raw = torch.stack(cols, 1)
    col = torch.arange(raw.shape[1], device=G.device)  # (built on the device: an upload would be a host sync)
    sign = 1 - 2 * ((col % 2 == 1) & (col < 2 * pairs)).to(_F64)  # upper tests at the odd columns of the pairs
    # shifted by the rounding margin mu(shift), outwards: lower tests factor G - (tau + mu) I, upper (t - mu) I - G
    xi_all = raw + sign * (g.margin0[rows][:, None] + g.margin1 * raw.abs())
    tau, t = tau_all[:, 0], t_all[:, 0]
    xi_loose = xi_all[:, -1]
    xi = xi_all if both else xi_all[:, :2]
    L, ok = _chol(_shifted(G, xi, sign[:xi.shape[1]], _rows(g.pad, rows)))  # lower: G - xi I; upper: xi I - G
    count = xi.shape[1] * G.shape[0]
    ok_tau, ok_t, L_tau = ok[:, 0], ok[:, 1], L[:, 0]
    next_L = None
    if both:
        # the best proven end on each side (_meets then judges the bracket they make): shares ascend, so a later
        # pair's tau is higher (a better lower bound) and an earlier pair's t is lower
        for i in range(1, pairs):
            ok_i = ok[:, 2 * i]
            tau = torch.where(ok_i, tau_all[:, i], tau)
            L_tau = torch.where(ok_i[:, None, None], L[:, 2 * i], L_tau)
            ok_tau = ok_tau | ok_i
        t = t_all[:, pairs - 1]
        ok_t = ok[:, 2 * pairs - 1]
        for i in range(pairs - 2, -1, -1):
            t = torch.where(ok[:, 2 * i + 1], t_all[:, i], t)
            ok_t = ok_t | ok[:, 2 * i + 1]
        ok_loose = torch.zeros_like(ok_tau) if last else ok[:, 2 * pairs]
        if not last:
            next_L = torch.where(ok_tau[:, None, None], L_tau,
                                 torch.where(ok_loose[:, None, None], L[:, 2 * pairs], L_it))
    elif L_it is not None:  # sync: the host sees which rows failed, so only those pay for the looser factor
        ok_loose = torch.zeros_like(ok_tau)
        next_L = L_tau  # a view of this call's factors: rows are replaced in place below
        bad = (~ok_tau).nonzero().flatten()
        if bad.numel():
            Lb, okb = _chol(_shifted(G[bad], xi_loose[bad, None], sign[:1], _rows(g.pad, rows, bad)))
            ok_loose[bad] = okb[:, 0]
            next_L[bad] = torch.where(okb[:, 0, None, None], Lb[:, 0], L_it[bad])
            count += bad.numel()
    else:
        ok_loose = torch.zeros_like(ok_tau)
    lower_sq = torch.where(ok_tau, tau, torch.where(ok_loose, tau_loose, torch.zeros_like(tau)))
    return lower_sq, ok_t, t, next_L, count


def _round(g: _Group, rows, X, Y, L_it, iters: int, opt: SpectralOptions, sync: bool, top_only: bool = False,
           last: bool = False) -> _Round:
    """One round: inverse iteration on the bottom block (skipped with ``top_only``: sigma_min is 0 from the zero
    pattern, so no factor of G - s I exists), power steps on the top block, Ritz picks, values and certificates."""
    G = g.G[rows]
    X0, Y0 = X, Y
    if not top_only and X.device.type in _INVERSE_BY_PRODUCTS_ON:
        # CUDA: a triangular solve with the few columns of X is latency-bound (25-140 us each for n = 512-1000 on an
        # H200, two per step), so L^-1 is formed once (one solve with n right-hand sides) and each step is two
        # batched products. Only the iterate's direction depends on it (the values and certificates are computed
        # from G afresh), and the shift sits ~1% below lambda_min, so the explicit inverse's extra rounding
        # (~u kappa(G - tau I)) stays far below what the Rayleigh quotient can see at rtol
        Li = torch.linalg.solve_triangular(L_it, g.eye.expand(L_it.shape[0], -1, -1), upper=False)
        for _ in range(iters):
            X = _orth(Li.mT @ (Li @ X), passes=1)
        X = _orth(X, passes=1)
    elif not top_only:
        for _ in range(iters):  # shifted inverse iteration for the bottom (one Cholesky-QR pass per step suffices)
            X = torch.linalg.solve_triangular(L_it, X, upper=False)
            X = _orth(torch.linalg.solve_triangular(L_it.mT, X, upper=True), passes=1)
        X = _orth(X, passes=1)
    # power steps for the top: n^2 r_top flops each (next to the Gram's m n^2), and the top of a random-like
    # spectrum is clustered (Marchenko-Pastur edge), so they are given TOP_STEPS times as many; the block is
    # re-orthogonalised every 4th step. In between, a power of two at or above lambda_max keeps it in range: one
    # multiply per step instead of a normalisation's three ops (launches on CUDA); it shrinks the block by at most
    # ~2 sqrt(n) per step, far from underflow over three steps
    inv = torch.ldexp(torch.ones_like(g.lam_max_bound[rows]), -torch.frexp(g.lam_max_bound[rows]).exponent)
    inv = inv[:, None, None]
    for k in range(1, _TOP_STEPS * iters + 1):
        Y = G @ Y
        Y = _orth(Y, passes=1) if k % 4 == 0 else Y.mul_(inv)
    Y = _orth(Y, passes=1)
    X, Y = _keep_finite(X, X0), _keep_finite(Y, Y0)
    x = X[..., 0] if top_only else _bottom_ritz(G, X)
    return _finish(g, rows, X, Y, x, _top_ritz(G, Y), L_it, opt, sync, top_only, last)


def _round_eigh(g: _Group, rows, r: int, r_top: int, opt: SpectralOptions) -> _Round:
    """Small matrices on CPU: Rayleigh-Ritz on the whole space (eigh of the float64 Gram) is cheaper than the
    iteration's many small ops; the values and the certificate are the same as a round's."""
    G = g.G[rows]
    if g.pad is None:
        _, V = torch.linalg.eigh(G)
        X, Y = V[..., :r], V[..., V.shape[-1] - r_top:].flip(-1)
        return _finish(g, rows, X, Y, V[..., 0], V[..., -1], None, opt, sync=True)
    # padding: a diagonal above every eigenvalue of the block (all-zero matrices iterate on I), so each matrix's own
    # eigenpairs come first, its top one at index n_i - 1; the padding coordinates of those vectors are zeroed
    pad = g.pad[rows]
    G = G.clone()
    G.diagonal(dim1=-2, dim2=-1).masked_scatter_(pad, (2 * g.lam_max_bound[rows] + 2)[:, None].expand_as(pad)[pad])
    _, V = torch.linalg.eigh(G)
    V = V.masked_fill(pad[:, :, None], 0.0)
    n_i = (~pad).sum(1)
    top = (n_i[:, None] - 1 - torch.arange(r_top, device=G.device)[None, :])  # [b, r_top], descending
    Y = V.gather(2, top[:, None, :].expand(-1, V.shape[1], -1))
    return _finish(g, rows, V[..., :r], Y, V[..., 0], Y[..., 0], None, opt, sync=True)


def _finish(g: _Group, rows, X, Y, x, y, L_it, opt: SpectralOptions, sync: bool, top_only: bool = False,
            last: bool = False) -> _Round:
    """Values |A x|, |A y| of the Ritz vectors, their certificates, and the structural / all-zero overrides."""
    x, y = _unit_or(x, X[..., 0]), _unit_or(y, Y[..., 0])
    smin, smax, u_min, u_max, e_min, e_max = _values(g, rows, x, y)
    smin_hi, smax_lo = smin + e_min, (smax - e_max).clamp_min(0)
    lower_sq, upper_ok, t, next_L, nf = _certify(g, rows, smin, smax, smin_hi, smax_lo, opt, sync, L_it, top_only,
                                                 last)
    structural, zero = g.structural[rows], g.zero[rows]
    # sigma_min = 0 exactly where structural (one masked fill for the three values: each op is a launch on CUDA)
    smin_lo, smin, smin_hi = torch.stack([lower_sq.sqrt(), smin, smin_hi], 1).masked_fill(
        structural[:, None], 0.0).unbind(1)
    u_min = u_min.masked_fill(structural[:, None], 0.0)  # 0 is a subgradient at the minimum
    smax_hi = torch.where(upper_ok, t.sqrt(), g.lam_max_bound[rows].sqrt()).masked_fill(zero, 0.0)
    certified = _meets(smin_lo, smin_hi, smax_lo, smax_hi, opt) & (upper_ok | zero) & g.finite[rows]
    return _Round(X, Y, x, y, smin, smax, u_min, u_max, smin_lo, smin_hi, smax_lo, smax_hi, certified, next_L, nf)


def _unit_or(z: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """z / |z|, or the fallback where z is zero or not finite: any unit vector gives valid one-sided values |A z|
    (sigma_min <= |A x|, |A y| <= sigma_max), so a failed Ritz pick costs accuracy, never soundness. The bottom
    block's fallback is a column of an orthonormal block, hence unit (a warm state whose bottom block is degenerate
    is refused: _check_blocks); a zero top fallback (a rank-1 matrix collapses the top block) gives sigma_max's lower
    end 0, which no certificate accepts."""
    nz = z.norm(dim=1, keepdim=True)
    ok = torch.isfinite(nz) & (nz > 0)
    return torch.where(ok, z / torch.where(ok, nz, torch.ones_like(nz)), fallback)


def _meets(smin_lo, smin_hi, smax_lo, smax_hi, opt: SpectralOptions) -> torch.Tensor:
    """True where every kappa_floor consistent with the bracket is within rtol of every other one."""
    tiny = 1e-300
    hi_ratio = smin_hi / smax_lo.clamp_min(tiny) + opt.floor
    lo_ratio = smin_lo / smax_hi.clamp_min(tiny) + opt.floor
    ok = hi_ratio <= (1 + opt.rtol) * lo_ratio
    return ok | (smax_hi == 0)


def _start_blocks(g: _Group, blocks_in, r: int, r_top: int, gen: torch.Generator) -> torch.Tensor:
    """Unorthogonalised start [B, n, r + r_top]: the state's warm blocks (already validated; ``blocks_in`` is None
    unless every matrix of the group has one), else random ones (drawn per run of one tall shape in input order, so
    merging shapes does not change the draws), zero-padded to the group's n."""
    if blocks_in is not None:
        # one multi-tensor copy into the zero-padded batch (a stack, a pad and a cat per shape were launches at the
        # head of every batch's chain on CUDA)
        if all(n == g.n for *_, n in g.parts):  # (one op whatever B: thousands of small blocks)
            return torch.stack([blocks_in[i] for i in g.index], out=torch.empty(g.B, g.n, r + r_top, dtype=_F64,
                                                                                 device=g.A.device))
        W = torch.zeros(g.B, g.n, r + r_top, dtype=_F64, device=g.A.device)
        torch._foreach_copy_([W[j, :g.row_n[j]] for j in range(g.B)], [blocks_in[i] for i in g.index])
        return W
    out = []
    for _, _, a, b, _m, n in g.parts:
        W = torch.randn(b - a, n, r + r_top, generator=gen, dtype=_F64).to(g.A.device)
        out.append(torch.nn.functional.pad(W, (0, 0, 0, g.n - n)))
    return out[0] if len(out) == 1 else torch.cat(out)


def _initial_blocks(W: torch.Tensor, r: int, r_top: int):
    """Orthonormal bottom and top blocks from a start."""
    return _orth(W[..., :r]), _orth(W[..., r:r + r_top])


_FIRST_SHIFTS = (0.99, 0.7, 0.3)  # fractions of the previous certified lower bound of sigma_min tried as shifts


def _minus_diag(G: torch.Tensor, s: torch.Tensor, rows=None, pad=None) -> torch.Tensor:
    """G[rows] - s I for a [b, n, n] stack and [b] shifts: one copy and an in-place diagonal update (a unit diagonal
    on the padding coordinates ``pad`` [b, n], as ``_shifted``)."""
    H = G.clone() if rows is None else G[rows]
    d = H.diagonal(dim1=-2, dim2=-1)
    d.sub_(s[:, None])
    if pad is not None:
        d.masked_fill_(pad, 1.0)
    return H


def _first_factor(g: _Group, rows, X: torch.Tensor, lower, sync: bool):
    """Factor for the first round: G - s I at the largest of the shifts (0.99, 0.7, 0.3) x the state's certified lower
    bound of sigma_min (squared) that still factors (pruning or a large step can move sigma_min below it), else at a
    small negative shift that always does. Sync mode tries them in turn on the rows that still need one; sync-free
    mode factors all of them in one batched call and picks per row."""
    G = g.G[rows]
    safe = -g.margin(torch.zeros(G.shape[0], dtype=_F64, device=G.device), rows)
    pad = _rows(g.pad, rows)
    if lower is None:
        L, ok = _chol(_minus_diag(G, safe, pad=pad))
        return (L if sync and bool(ok.all()) else _factor_or_identity(L, ok, g.eye)), G.shape[0]
    base = torch.ldexp(lower, -g.exp[rows]) ** 2
    shifts = [base * f**2 for f in _FIRST_SHIFTS] + [safe]
    if not sync:
        xi = torch.stack(shifts, 1)
        L, ok = _chol(_shifted(G, xi, torch.ones(xi.shape[1], dtype=_F64, device=G.device), pad))
        found = ok.any(1)
        pick = ok.to(torch.int8).argmax(1)  # first (largest) shift that factored (all False: index 0)
        L = L.gather(1, pick[:, None, None, None].expand(-1, 1, g.n, g.n)).squeeze(1)
        return _factor_or_identity(L, found, g.eye), xi.numel()
    # a shift at or above the warm bottom block's smallest Rayleigh quotient (an upper bound of lambda_min) cannot
    # factor: skip those instead of paying for a failed factorization (after pruning, sigma_min often drops tenfold)
    theta = _block_min_quotient(G, X)
    L, ok, count = None, None, 0
    for s in shifts:
        todo = torch.arange(G.shape[0], device=G.device) if ok is None else (~ok).nonzero().flatten()
        if s is not shifts[-1]:
            todo = todo[s[todo] < theta[todo]]
        if todo.numel() == 0:
            continue
        Lb, okb = _chol(_minus_diag(G, s[todo], todo, None if pad is None else pad[todo]))
        count += todo.numel()
        if L is None:
            L, ok = torch.empty_like(G), torch.zeros(G.shape[0], dtype=torch.bool, device=G.device)
        L[todo], ok[todo] = Lb, okb
        if bool(ok.all()):
            return L, count
    return _factor_or_identity(L, ok, g.eye), count


def _block_min_quotient(G: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """min over the columns of the (orthonormal) block X of x^T G x: no smaller than lambda_min(G) up to rounding,
    which the caller's strict comparison with a shift below it does not need to be exact about (a failed Cholesky
    only costs time)."""
    return (X * (G @ X)).sum(1).amin(1)


def _factor_or_identity(L: torch.Tensor, ok: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """The factor where it exists, else I: inverse iteration with I leaves the block as it is (the safe shift fails
    only when rounding defeats the margin, e.g. on a NaN/Inf matrix)."""
    return torch.where(ok[:, None, None], L, eye)


def _exact(g: _Group, rows, opt: SpectralOptions):
    """Float64 SVD of the rows; values certified where the Cholesky test agrees, else the SVD's error bound."""
    smax, smin, x, y, u_min, u_max, X, Y = _svd_rows(g, rows, min(opt.block, g.n), min(2, g.n))
    # backward-stable SVD: |sigma_i - computed| <~ p(m,n) u |A|
    delta = (g.svd_coef if isinstance(g.svd_coef, float) else g.svd_coef[rows]) * g.fro[rows]
    lower_sq, upper_ok, t, *_ = _certify(g, rows, smin, smax, smin + delta, (smax - delta).clamp_min(0), opt, True)
    structural, zero = g.structural[rows], g.zero[rows]
    proven_lo = lower_sq.sqrt()
    cert_lo = torch.where(proven_lo > 0, proven_lo, (smin - delta).clamp_min(0))
    smin_lo = torch.where(structural, torch.zeros_like(smin), cert_lo)
    smin_hi = torch.where(structural, torch.zeros_like(smin), smin + delta)
    smin = torch.where(structural, torch.zeros_like(smin), smin)
    u_min = torch.where(structural[:, None], torch.zeros_like(u_min), u_min)
    smax_hi = torch.where(upper_ok | zero, torch.where(zero, torch.zeros_like(t), t.sqrt()), smax + delta)
    smax_lo = (smax - delta).clamp_min(0)
    proven = ((proven_lo > 0) | structural) & (upper_ok | zero) & _meets(
        lower_sq.sqrt(), smin_hi, smax_lo, t.sqrt(), opt)
    resolved = _meets(smin_lo, smin_hi, smax_lo, smax_hi, opt)
    return dict(x=x, y=y, smin=smin, smax=smax, u_min=u_min, u_max=u_max, smin_lo=smin_lo, smin_hi=smin_hi,
                smax_lo=smax_lo, smax_hi=smax_hi, certified=proven | zero, resolved=resolved | zero,
                X=X, Y=Y)


def _svd_rows(g: _Group, rows: torch.Tensor, r: int, r_top: int):
    """SVD of the rows, each of its own unpadded m and n: sigma_max, sigma_min, their right (zero-padded to the
    batch's n) and left (to its m) vectors, and the bottom r / top r_top right singular vectors as warm blocks."""
    out = []
    for *_, a, b, m, n in g.parts:
        sub = rows[(rows >= a) & (rows < b)]
        if sub.numel() == 0:
            continue
        U, S, Vh = torch.linalg.svd(g.A[sub, :m, :n], full_matrices=False)
        V = torch.nn.functional.pad(Vh.mT, (0, 0, 0, g.n - n))  # [b, N, n]: columns descending
        U = torch.nn.functional.pad(U, (0, 0, 0, g.m - U.shape[-2]))  # (m' <= m rows: see _Group.full_rows)
        out.append((S[:, 0], S[:, -1], V[..., -1], V[..., 0], U[..., -1], U[..., 0], V.flip(-1)[..., :r],
                    V[..., :r_top]))
    return tuple(torch.cat(x) for x in zip(*out, strict=True))


_FIELDS = ("x", "y", "smin", "smax", "u_min", "u_max", "smin_lo", "smin_hi", "smax_lo", "smax_hi", "certified")


def _solve_group(g: _Group, opt: SpectralOptions, start: torch.Tensor, lower, refresh, sync: bool, work: dict) -> dict:
    """All rounds for one group; returns per-row tensors (scaled units) plus the new warm blocks."""
    r, r_top = min(opt.block, g.n), min(2, g.n)
    res: dict = {}
    fallback = torch.zeros(g.B, dtype=torch.bool, device=g.A.device)
    todo = list(range(g.B)) if refresh is True else [i for i in range(g.B) if refresh is not False and refresh[i]]
    if len(todo) == g.B:  # every row goes to the exact SVD, which replaces these blocks
        X, Y = start[..., :r], start[..., r:r + r_top]
    elif sync and g.n <= _EIGH_MAX and not _backend.on_cuda(g.A):  # (the whole space: no start blocks needed)
        out = _round_eigh(g, slice(None), r, r_top, opt)
        work["factorizations"] += out.factorizations
        work["rounds"] = max(work["rounds"], 1)
        res = {k: getattr(out, k) for k in _FIELDS}
        X, Y = out.X, out.Y
    else:
        X, Y = _initial_blocks(start, r, r_top)
        if sync:
            res, X, Y = _rounds_sync(g, opt, X, Y, lower, work)
        else:
            res, X, Y = _rounds_sync_free(g, opt, X, Y, lower, work)
    if res and sync:  # what the rounds could not certify goes to the exact SVD
        todo = sorted(set(todo) | set((~res["certified"]).nonzero().flatten().tolist()))
    if res:
        res["resolved"] = res["certified"].clone()
    if todo:
        rows = torch.tensor(todo, device=g.A.device)
        ex = _exact(g, rows, opt)
        work["fallbacks"] += len(todo)
        work["factorizations"] += 2 * len(todo)
        if not res:
            res = {k: v.new_zeros((g.B,) + tuple(v.shape[1:])) for k, v in ex.items() if k not in ("X", "Y")}
        for k in (*_FIELDS, "resolved"):
            res[k] = res[k].index_copy(0, rows, ex[k])
        if "first_certified" in res:
            res["first_certified"] = res["first_certified"].index_fill(0, rows, True)
        fallback[rows] = True
        # warm blocks: the SVD's own bottom r and top r_top right singular vectors. (With only the extreme pair and
        # random padding, the next call's few power steps could not resolve a clustered top (the Marchenko-Pastur
        # edge) after one SGD step: sigma_max came out 0.3% low, its upper certificate failed, and every pruning
        # step's exact refresh was followed by a late-refreshed layer; measured on the ResNet-18 trajectory.)
        X, Y = X.index_copy(0, rows, ex["X"]), Y.index_copy(0, rows, ex["Y"])
    res["fallback"] = fallback
    res["blocks"] = torch.cat([X, Y], 2)
    res["u_min"], res["u_max"] = g.full_rows(res["u_min"]), g.full_rows(res["u_max"])
    return res


def _rounds_sync(g: _Group, opt: SpectralOptions, X, Y, lower, work: dict):
    """Host-steered rounds (CPU, or CUDA with ``sync=True``): each round after the first runs only on the rows not
    yet certified, with twice the steps. Rows whose sigma_min is 0 from the zero pattern (common after heavy pruning)
    only iterate and certify sigma_max: no factor of G - s I can exist for them."""
    structural = g.structural.tolist()
    dev = g.A.device
    res: dict = {}
    L_next = None
    pending, iters = list(range(g.B)), opt.iters
    for round_no in range(1, opt.max_rounds + 1):
        for top_only in (False, True):
            part = [i for i in pending if structural[i] == top_only]
            if not part:
                continue
            rows = slice(None) if len(part) == g.B else torch.tensor(part, device=dev)
            L = None
            if not top_only and round_no == 1:
                L, nf = _first_factor(g, rows, X[rows], None if lower is None else lower[rows], sync=True)
                work["factorizations"] += nf
            elif not top_only:
                L = L_next[rows]
            sub = _round(g, rows, X[rows], Y[rows], L, iters, opt, True, top_only)
            work["factorizations"] += sub.factorizations
            work["inverse_steps"] += 0 if top_only else iters * len(part)
            for k in _FIELDS:
                v = getattr(sub, k)
                res[k] = _put(res[k] if k in res else v.new_zeros((g.B, *v.shape[1:])), rows, v)
            X, Y = _put(X, rows, sub.X), _put(Y, rows, sub.Y)
            if sub.next_L is not None:
                L_next = sub.next_L if isinstance(rows, slice) else _put(
                    torch.empty_like(g.G) if L_next is None else L_next, rows, sub.next_L)
        work["rounds"] = max(work["rounds"], round_no)
        pending = (~res["certified"]).nonzero().flatten().tolist()
        if not pending:
            break
        iters *= 2
    return res, X, Y


def _put(T: torch.Tensor, rows, v: torch.Tensor) -> torch.Tensor:
    """T with rows ``rows`` replaced by v (v itself when rows is every row)."""
    if isinstance(rows, slice):
        return v
    T = T.clone() if T._base is not None else T
    T[rows] = v
    return T


def _rounds_sync_free(g: _Group, opt: SpectralOptions, X, Y, lower, work: dict):
    """A fixed number of rounds for every row (no host branching); rows certified in a round keep its results."""
    rows, iters = slice(None), opt.iters
    rounds = min(opt.max_rounds, _SYNC_FREE_ROUNDS)
    L, nf = _first_factor(g, rows, X, lower, sync=False)
    work["factorizations"] += nf
    out = _round(g, rows, X, Y, L, iters, opt, False, last=rounds == 1)
    work["factorizations"] += out.factorizations
    work["inverse_steps"] += iters * g.B
    work["rounds"] = max(work["rounds"], 1)
    res = {k: getattr(out, k) for k in _FIELDS}
    first = res["certified"]
    X, Y = out.X, out.Y
    for round_no in range(2, rounds + 1):
        iters *= 2
        sub = _round(g, rows, X, Y, out.next_L, iters, opt, False, last=round_no == rounds)
        work["factorizations"] += sub.factorizations
        work["inverse_steps"] += iters * g.B
        work["rounds"] = max(work["rounds"], round_no)
        keep = res["certified"]
        for k in _FIELDS:
            v = getattr(sub, k)
            res[k] = torch.where(keep.view(-1, *([1] * (v.dim() - 1))), res[k], v)
        X, Y, out = sub.X, sub.Y, sub
    res["first_certified"] = first
    return res, X, Y


def extreme_singular_values(
    weights: torch.Tensor | Sequence[torch.Tensor],
    *,
    rtol: float = 1e-2,
    floor: float = 0.0,
    block: int = 4,
    iters: int = 3,
    max_rounds: int = 4,
    state: SpectralState | None = None,
    refresh: bool | Sequence[bool] = False,
    sync: bool = True,
    ritz_block: bool = False,
    tight_max: bool = False,
    seed: int = 0,
) -> SpectralEstimate:
    """sigma_max and sigma_min (the min(m, n)-th singular value) of one matrix or many, with singular vectors and
    certified brackets, batched over same-shape groups and warm-started from ``state``.

    Args:
        weights: a 2-D tensor, a list of 2-D tensors of any float dtype and shapes (``as_matrices`` for convs), or
            a [B, m, n] tensor: B matrices of one shape (e.g. thousands of small blocks), solved as one batch (a
            3-D tensor is always read as such a batch: pass a Conv1d weight through ``as_matrices``).
        rtol: accuracy target: the bracket must prove the estimated kappa_floor within ``rtol`` (relative) of the
            true one; more rounds, then an exact float64 SVD, are spent on matrices that do not reach it.
        floor: relative floor of sigma_min in kappa_floor = sigma_max / (sigma_min + floor * sigma_max) (the CNC
            ``eps``): below ``floor * rtol * sigma_max`` the exact value of sigma_min no longer matters. With the
            default 0, a matrix whose sigma_min cannot be resolved in float64 (kappa beyond ~1e11, not structurally
            rank-deficient) raises ValueError.
        block: retained bottom Ritz vectors per matrix (more helps clustered bottoms on cold starts).
        iters: inverse-iteration and power steps in the first round (doubled at each further round).
        max_rounds: rounds before the exact fallback (``sync=True``); with ``sync=False`` the number of fixed rounds
            is ``min(max_rounds, 2)``.
        state: warm-start state, updated in place (pass the same object every step). One for other shapes is
            ignored (cold start); one holding NaN/Inf raises ValueError.
        refresh: True (or one bool per matrix): compute those matrices by float64 SVD and reset their warm state.
        sync: True (default): read the certification flags on the host, run more rounds / the fallback where needed
            and raise on NaN/Inf weights or unresolvable matrices. False: min(max_rounds, 2) fixed rounds, no host
            sync; the flags in ``certified`` (and ``first_round_certified``) are left on the device for the caller to
            check (TSCNC does, one step later, on CUDA).
        ritz_block: also return the bottom Ritz block (``estimate.bottom``) for a soft-min over it (uses ``eigh``,
            which synchronises on CUDA).
        tight_max: also certify sigma_max itself to ``rtol`` on structurally rank-deficient matrices (a Lipschitz
            bound). By default (False) their kappa_floor = 1 / floor is exact whatever sigma_max is, so on CPU with
            ``sync=True`` they skip the Gram: sigma_max comes from power steps on the weights in their own precision
            and its bracket is proven but loose (``sigma_max_hi`` = sqrt(||W||_1 ||W||_inf)).
        seed: seed of the random start when there is no warm state.

    Returns:
        a ``SpectralEstimate`` (see its docstring for what the brackets guarantee). An all-zero matrix gives
        sigma_max = sigma_min = 0 (kappa 1).
    """
    mats = _validate(weights, state)
    opt = SpectralOptions(rtol=rtol, floor=floor, block=block, iters=iters, max_rounds=max_rounds, seed=seed)
    for name, v in (("sync", sync), ("tight_max", tight_max)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    flags = _refresh_flags(refresh, len(mats))
    shapes = [tuple(m.shape) for m in mats]
    blocks_in, lower_in = _warm_state(state, mats, shapes, opt, sync)
    work = {"grams": len(mats), "rounds": 0, "factorizations": 0, "inverse_steps": 0, "fallbacks": 0}
    gen = torch.Generator().manual_seed(opt.seed)
    batches, fast_groups = _batches(mats, shapes, blocks_in, opt, sync, gen, tight_max, ritz_block, flags)
    per: list = [None] * len(mats)  # (group, row) of each matrix
    results = []
    for g, start, warm in fast_groups:
        # warm from the previous step, one cycle of power steps resolves sigma_max to ~1e-5 on the recorded
        # trajectories (float32); a cold start gets at least as many as a first round on the Gram, and either goes
        # on while the Ritz value still moves (a clustered top, or a warm block from several steps back)
        res = g.solve(start, min(opt.block, g.n), _TOP_STEPS if warm else _TOP_STEPS * opt.iters,
                      _TOP_STEPS * opt.iters * opt.max_rounds, opt.rtol)
        work["grams"] -= g.B
        work["rounds"] = max(work["rounds"], 1)
        results.append((g, res))
        for j, i in enumerate(g.index):
            per[i] = (len(results) - 1, j)
    device = mats[0].device
    branches = None if sync or len(batches) < 2 else _capture_branches(device)
    main = torch.cuda.current_stream(device) if branches else None
    for k, (build, warm_ok) in enumerate(batches):
        if branches:  # fork: the batch's inputs were made on the capture stream
            branch = branches[k % len(branches)]
            branch.wait_stream(main)
        with torch.cuda.stream(branch) if branches else contextlib.nullcontext():
            g, start = build()
            idx = g.index
            grp_flags = flags if isinstance(flags, bool) else [flags[i] for i in idx]
            lower = torch.stack([lower_in[i] for i in idx]).to(g.A.device) if warm_ok and lower_in is not None \
                else None
            res = _solve_group(g, opt, start, lower, grp_flags, sync, work)
        results.append((g, res))
        for j, i in enumerate(idx):
            per[i] = (len(results) - 1, j)
    for branch in branches[:len(batches)] if branches else ():  # join
        main.wait_stream(branch)
    est = _pack(mats, results, per, opt, work, ritz_block)
    if sync:
        _raise_unresolved(est, results, per, mats, opt)
    if state is not None:
        state.shapes = shapes
        kept = [res["blocks"].unbind(0) if all(n == g.n for n in g.row_n) else  # (one op for a group, not B)
                [res["blocks"][j, :n] for j, n in enumerate(g.row_n)] for g, res in results]
        state.blocks = [kept[gi][j] for gi, j in per]
        state.lower = list(est.sigma_min_lo.unbind())  # (already in true units, one op per group)
    return est


_GRAPH_BRANCHES = 4  # side streams per device on which a captured sync-free call solves its batches (0: none)
_branch_streams: dict = {}  # device -> its side streams, made by prepare_capture_branches


def prepare_capture_branches(device: torch.device) -> None:
    """Make (once per device) the side streams on which a sync-free call captured into a CUDA graph solves its
    batches as parallel branches of the graph, each stream's cuBLAS / cuSOLVER state set up by a small call outside
    any capture. Why: a batch is a chain of small latency-bound kernels (cuSOLVER's batched Cholesky runs one block
    per matrix: ResNet-50's two n = 1024 matrices take ~1.8 ms per factorization call on 8 of an H200's 132 SMs), so
    batches side by side fill the device where one after another leave it idle. ``GraphedEngine`` calls this before
    it captures; eager calls run their batches in order on the current stream (a tensor shared across streams would
    need the caching allocator's per-tensor stream bookkeeping)."""
    device = torch.device(device)
    if device.type != "cuda" or _GRAPH_BRANCHES < 2 or device in _branch_streams:
        return
    streams = []
    for _ in range(_GRAPH_BRANCHES):
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            H = torch.eye(8, dtype=_F64, device=device)
            torch.linalg.solve_triangular(torch.linalg.cholesky_ex(H @ H)[0], H, upper=False)
        torch.cuda.current_stream(device).wait_stream(stream)
        streams.append(stream)
    _branch_streams[device] = streams


def _capture_branches(device: torch.device) -> list | None:
    """The side streams for the batches of a call being captured on ``device`` (None eagerly or when none were made)."""
    if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        return None
    streams = _branch_streams.get(device)
    return streams[:_GRAPH_BRANCHES] if streams and _GRAPH_BRANCHES >= 2 else None


def _refresh_flags(refresh, n_mats: int) -> bool | list[bool]:
    if isinstance(refresh, bool):
        return refresh
    if isinstance(refresh, torch.Tensor) and refresh.dtype == torch.bool and refresh.dim() == 1:
        refresh = refresh.tolist()  # (a host read: a bool tensor on CUDA costs a sync, as the list it becomes)
    if isinstance(refresh, (list, tuple)) and len(refresh) == n_mats and all(isinstance(f, bool) for f in refresh):
        return list(refresh)
    raise TypeError(f"refresh must be a bool, or a list or 1-D bool tensor of {n_mats} bools, got {refresh!r}")


# The norm bounds between which a structurally rank-deficient matrix may take the Gram-free power steps in its own
# precision: far from float32's underflow and overflow (squares of 2^-40..2^40 stay within 2^-80..2^80, and the
# underflow term of |A y|'s rounding bound stays negligible next to |A y|)
_STRUCTURAL_NORMS = (2.0**-40, 2.0**40)


def _batches(mats, shapes, blocks_in, opt: SpectralOptions, sync: bool, gen, tight_max: bool, ritz_block: bool,
             flags: bool | list[bool] = False):
    """Batches of matrices solved together, as (a call that returns the group and its start blocks, warm-started):
    on CPU one per tall shape and orientation (small ones merged, see below), on CUDA one per bucket of n; and the
    structurally rank-deficient groups that skip the Gram (CPU), as (group, start blocks, warm-started)."""
    merge_by_n = _backend.on_cuda(mats[0])
    by_shape: dict[tuple[int, int, bool], list[int]] = {}
    for i, (a, b) in enumerate(shapes):
        # on CPU one orientation per group, so wide ones are stored untransposed (_Group: a transposing copy costs
        # more than the ops of a second group); on CUDA one group per tall shape (fewer launches)
        by_shape.setdefault((max(a, b), min(a, b), a < b and not merge_by_n), []).append(i)
    # On CUDA one batch per (bucket of n, warm or cold) for everything (the Gram per shape inside it): fewer launches
    # (the GPU step is launch-bound) for A zero-padded to the batch's largest m and n. On CPU the padding's extra
    # flops cost more than the ops saved (ResNet-50 trajectory, 1 thread: 1739 vs 1577 ms), so a batch stays one tall
    # shape there.
    # Small matrices on CPU (the eigh path) are stacked across shapes from the start, zero-padded (a ragged _Group):
    # there the cost is mostly a few microseconds of Python per op and group (ResNet-18 at width 16 has 12 groups)
    merge_small = sync and not merge_by_n
    # CPU, host-steered: bounds and the structural test from the weights as stored; structurally rank-deficient
    # matrices skip the Gram (_Structural) unless sigma_max must be tight or the bottom Ritz block is wanted
    bounds = _source_bounds(mats) if merge_small else None
    structural: dict[tuple[int, int, bool, bool], list[int]] = {}
    if bounds is not None:
        finite = bounds.finite.tolist()
        plain = [f and m.dtype != _F64 for f, m in zip(finite, mats, strict=True)]
        # (n <= _EIGH_MAX: the eigh path is cheap and gives a tight sigma_max)
        # (refreshed matrices get their exact SVD; a norm bound outside _STRUCTURAL_NORMS, or one that underflowed,
        # takes the Gram route, which scales float64 and cannot under- or overflow on float32 entries)
        lo, hi = _STRUCTURAL_NORMS
        refreshed = [flags] * len(mats) if isinstance(flags, bool) else flags
        in_range = [lo <= nb <= hi or z for nb, z in zip(bounds.norm.tolist(), bounds.zero.tolist(), strict=True)]
        fast = [s and f and ok and not r and min(m.shape) > _EIGH_MAX and not (tight_max or ritz_block)
                for s, f, ok, r, m in zip(bounds.structural.tolist(), finite, in_range, refreshed, mats, strict=True)]
        for key, idx in list(by_shape.items()):
            rest = [i for i in idx if not fast[i]]
            for i in idx:
                if fast[i]:
                    warm = blocks_in is not None and blocks_in[i] is not None
                    structural.setdefault((*key, warm), []).append(i)
            if rest:
                by_shape[key] = rest
            else:
                del by_shape[key]

    def bounds_of(idx):  # source bounds in the units of a group (given only when no float64 matrix is scaled)
        return bounds.take(idx) if bounds is not None and all(plain[i] for i in idx) else None

    groups: list[tuple[tuple[int, ...], _Group]] = []
    ragged: dict[tuple[int, ...], list[int]] = {}  # (bucket of n, warm) -> matrices zero-padded into one batch
    for (m, n, wide), idx in by_shape.items():
        warm_ok = blocks_in is not None and all(blocks_in[i] is not None for i in idx)
        if merge_by_n and len(idx) * n * n > _OWN_BATCH:  # CUDA, many matrices of one shape: padding costs more
            ragged.setdefault((("own", m, n), warm_ok), []).extend(idx)  # than the launches it saves
        elif merge_by_n:  # CUDA: one batch per bucket of n (_batch_n)
            ragged.setdefault((_batch_n(n, opt.block), warm_ok), []).extend(idx)
        elif merge_small and max(opt.block, 2) <= n <= _EIGH_MAX:
            # one eigh batch per power-of-two bucket of n: padding at most doubles n (eigh's n^3 made a single
            # batch padded to 128 slower than the groups it replaced); r and r_top are the same for all of them
            ragged.setdefault((1 << (n - 1).bit_length(), warm_ok), []).extend(idx)
        else:  # CPU: one group per tall shape and orientation (its padding would be a copy of A)
            held = [bounds.rows[i] for i in idx] if bounds is not None else None
            groups.append(((m, n, wide, warm_ok), _Group(idx, [mats[i] for i in idx], bounds=bounds_of(idx),
                                                             held=held)))
    def ragged_group(idx):
        part = [mats[i] for i in idx]
        size = (max(max(w.shape) for w in part), max(min(w.shape) for w in part))
        return _Group(idx, part, size=size, bounds=bounds_of(idx), on_device=merge_by_n)

    # a sync-free CUDA batch is built where it is solved, so a captured call builds it on its own branch of the graph
    # (prepare_capture_branches); otherwise every batch is built first (sync: NaN/Inf weights raise before any solve)
    lazy = merge_by_n and not sync

    def batch(make, warm: bool):
        def with_start(g):
            return g, _start_blocks(g, blocks_in if warm else None, min(opt.block, g.n), min(2, g.n), gen)

        if lazy:
            return (lambda: with_start(make())), warm
        g = make()
        if sync and not bool(g.finite.all()):
            bad = g.index[int((~g.finite).nonzero()[0, 0])]
            check_tensor(f"weights[{bad}]", mats[bad], finite=True)
        built = with_start(g)
        return (lambda: built), warm

    batches = [batch(lambda g=g: g, key[-1]) for key, g in groups]
    batches += [batch(lambda idx=idx: ragged_group(idx), key[-1]) for key, idx in ragged.items()]
    fast_groups = []
    for key, idx in structural.items():
        g = _Structural(idx, [mats[i] for i in idx], bounds.take(idx))
        r = warm_block_width(g.n, opt.block)
        if key[-1]:
            start = torch.stack([blocks_in[i].to(_F64) for i in idx])
        else:  # one draw per matrix from the seed: the same start as in a call on that matrix alone
            start = torch.stack([torch.randn(g.n, r, generator=torch.Generator().manual_seed(opt.seed), dtype=_F64)
                                 for _ in idx])
        fast_groups.append((g, start, key[-1]))
    return batches, fast_groups


# On CUDA a shape group with more than this many Gram entries (B n^2) keeps a batch of its own instead of joining
# its bucket of n (_batch_n): thousands of 32 x 32 blocks padded to a bucket's 128 x 128 (ResNet-50's n = 128 layers
# are in it) would cost 16x the memory and 64x the factorization flops, to save the launches of one batch. ResNet-50's
# largest group of n <= 128 has 3 x 64^2 entries.
_OWN_BATCH = 1 << 20


def _batch_n(n: int, block: int) -> int:
    """The batch a matrix of small side n joins on CUDA (every batch is a few hundred launches whatever its size): n up
    to 128 share one (the Cholesky and product flops of 128 x 128 blocks are nothing next to a launch), larger n share
    their power of two where padding to it adds at most 25% to n (1000 -> 1024), else keep their own. Matrices narrower
    than the bottom block keep their own batch (their blocks are narrower)."""
    if n < max(block, 2):
        return n
    if n <= 128:
        return 128
    p = 1 << (n - 1).bit_length()
    return p if 4 * p <= 5 * n else n


def warm_block_width(n: int, block: int) -> int:
    """Columns of a matrix's warm-start block in ``SpectralState.blocks``: the bottom block, then the top one."""
    return min(block, n) + min(2, n)


def _check_blocks(blocks: list[torch.Tensor]) -> None:
    """Warm-start blocks ([n, w]: the bottom block, then the top block of min(2, n) columns) must be finite and their
    bottom part orthonormal, as the engine leaves it: a rank-deficient bottom block (a zero column) would make a
    Ritz pick of a zero vector, and |A 0| = 0 looks like a certified sigma_min. (A top block may be rank-deficient:
    power steps on a matrix of rank 1 collapse its two columns; a zero pick there gives sigma_max's lower end 0,
    which no certificate accepts.) One check per shape of block (thousands of small blocks)."""
    by_shape: dict = {}
    for b in blocks:
        by_shape.setdefault((tuple(b.shape), b.dtype, b.device), []).append(b)
    for ((n, w), _, _), same in by_shape.items():
        bs = torch.stack(same).to(_F64)
        if not bool(torch.isfinite(bs).all()):
            raise ValueError("state holds NaN/Inf warm-start blocks (a corrupt SpectralState); "
                             "pass a fresh fastcnc.SpectralState()")
        X = bs[..., :max(w - min(2, n), 1)]
        worst = float((X.mT @ X - torch.eye(X.shape[-1], dtype=_F64, device=X.device)).abs().amax())
        if not worst <= 1e-3:
            raise ValueError(f"state holds warm-start blocks of shape {(n, w)} whose bottom part is not orthonormal "
                             f"(|X^T X - I| = {worst:.3g}; a corrupt SpectralState); pass a fresh "
                             "fastcnc.SpectralState()")


def _warm_state(state, mats, shapes, opt: SpectralOptions, sync: bool):
    """The state's blocks and shifts where they fit these matrices and options (else None: cold start)."""
    if state is None or not state.matches(shapes) or len(state.blocks) != len(mats):
        return None, None
    blocks = []
    for m, b in zip(mats, state.blocks, strict=True):
        n = min(m.shape)
        want = (n, warm_block_width(n, opt.block))
        blocks.append(b if isinstance(b, torch.Tensor) and tuple(b.shape) == want else None)
    if sync:
        _check_blocks([b for b in blocks if b is not None])
    lower = state.lower if isinstance(state.lower, list) and len(state.lower) == len(mats) else None
    if lower is not None and any(not isinstance(v, torch.Tensor) or v.numel() != 1 for v in lower):
        lower = None
    if lower is not None:  # (what the engine stored is used as it is)
        lower = [v if v.dim() == 0 and v.dtype == _F64 else v.reshape(()).to(_F64) for v in lower]
    return blocks, lower


class VectorGroup:
    """The bilinear-form vectors of one shape group, stacked for batched forward/backward products: ``U`` [B, m, k]
    and ``V`` [B, n, k], float64, in the tall orientation (``wide[j]``: matrix ``index[j]`` is the transpose of it).

    The groups of a CUDA estimate share one flat buffer (``pack_vectors``): U_0, V_0, U_1, V_1, ... each flattened,
    and U / V are views into it made when first asked for. A TSCNC step then copies the vectors out of its graph and
    hands them to the backward's kernel as one tensor, not as two tensors per group (ResNet-50: 41 groups, 82 host
    ops and 82 small copies per step saved)."""

    __slots__ = ("index", "wide", "u_shape", "v_shape", "_U", "_V", "_buffer", "_at")

    def __init__(self, index: list[int], wide: list[bool], U: torch.Tensor | None = None,
                 V: torch.Tensor | None = None, *, buffer: torch.Tensor | None = None, at: int = 0,
                 u_shape: tuple[int, ...] | None = None, v_shape: tuple[int, ...] | None = None) -> None:
        self.index, self.wide = index, wide
        if buffer is None:
            self._U, self._V, self._buffer, self._at = U, V, None, 0
            self.u_shape, self.v_shape = tuple(U.shape), tuple(V.shape)
        else:
            self._U = self._V = None
            self._buffer, self._at, self.u_shape, self.v_shape = buffer, at, tuple(u_shape), tuple(v_shape)

    @property
    def U(self) -> torch.Tensor:
        if self._U is None:
            self._U = self._view(self._at, self.u_shape)
        return self._U

    @property
    def V(self) -> torch.Tensor:
        if self._V is None:
            self._V = self._view(self._at + math.prod(self.u_shape), self.v_shape)
        return self._V

    def _view(self, at: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self._buffer.as_strided(shape, _contiguous_strides(shape), self._buffer.storage_offset() + at)

    @property
    def size(self) -> int:
        """Elements of U and V together."""
        return math.prod(self.u_shape) + math.prod(self.v_shape)

    def __repr__(self) -> str:
        packed = "" if self._buffer is None else ", packed"
        return (f"VectorGroup(index={self.index}, wide={self.wide}, U {list(self.u_shape)}, V {list(self.v_shape)}"
                f"{packed})")


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return tuple(reversed(strides))


def pack_vectors(groups: list[VectorGroup], buffer: torch.Tensor | None = None) -> list[VectorGroup]:
    """The groups with their U and V in one flat float64 buffer (``VectorGroup``): ``buffer`` when given (a copy of
    another packing of the same layout), else a new one filled from the groups' vectors (one ``cat``)."""
    if buffer is None:
        buffer = _concat_vectors(groups)
    out, at = [], 0
    for g in groups:
        out.append(VectorGroup(g.index, g.wide, buffer=buffer, at=at, u_shape=g.u_shape, v_shape=g.v_shape))
        at += g.size
    assert at == buffer.numel(), "buffer does not hold the groups' layout"
    return out


def flat_vectors(groups: list[VectorGroup]) -> tuple[list[tuple], torch.Tensor]:
    """(layout, vectors) for ``kernels.bilinear.rank2_grads``: per group (index, wide, U's shape, V's shape), and
    every U and V flattened into one tensor in that order (the packed buffer itself where the groups have one)."""
    layout = [(g.index, g.wide, g.u_shape, g.v_shape) for g in groups]
    vectors = packed_vectors(groups)
    return layout, _concat_vectors(groups) if vectors is None else vectors


def _concat_vectors(groups: list[VectorGroup]) -> torch.Tensor:
    # every group's U then V, flattened, in order: the packed layout
    return torch.cat([t.reshape(-1) for g in groups for t in (g.U, g.V)])


def packed_vectors(groups: list[VectorGroup]) -> torch.Tensor | None:
    """The flat buffer that holds every group's U and V in order (``pack_vectors``), or None."""
    buffer = groups[0]._buffer if groups else None
    if buffer is None:
        return None
    at = 0
    for g in groups:
        if g._buffer is not buffer or g._at != at:
            return None
        at += g.size
    return buffer if at == buffer.numel() else None


class GroupVectors(Sequence):
    """``estimate.u_max`` (and ``v_max``, ``u_min``, ``v_min``): matrix i's vector in its own orientation, a view into
    its ``VectorGroup`` made when asked for. (A TSCNC step reads only the groups: four views per matrix every step
    were host time on CUDA.)"""

    def __init__(self, where: list, left: bool, col: int) -> None:
        self._where = where  # matrix i -> (its VectorGroup, its row there, wide), shared by the four sequences
        self._left, self._col = left, col

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        g, j, wide = self._where[i]
        # tall orientation: U holds the left vectors and V the right ones; a wide matrix (W = A^T) swaps them
        return (g.V if self._left == wide else g.U)[j, :, self._col]


def group_vectors(groups: list[VectorGroup], n_mats: int) -> tuple[GroupVectors, ...]:
    """(u_max, v_max, u_min, v_min) of the groups (column 0 of U / V: the sigma_max pair, column 1: sigma_min)."""
    where: list = [None] * n_mats
    for g in groups:
        for j, (i, wide) in enumerate(zip(g.index, g.wide, strict=True)):
            where[i] = (g, j, wide)
    return tuple(GroupVectors(where, left, col) for col in (0, 1) for left in (True, False))


def _pack(mats, results, per, opt: SpectralOptions, work: dict, ritz_block: bool) -> SpectralEstimate:
    """Per-matrix values in true units, in the input order; vectors in each matrix's own orientation."""
    # where the groups hold the matrices in input order (one shape: always), a value is the groups' concatenation, so
    # thousands of small blocks cost one op per group, not one per matrix
    in_order = per == [(gi, j) for gi, (g, _) in enumerate(results) for j in range(g.B)]

    def gather(parts):
        return torch.cat(parts) if in_order else torch.stack([parts[gi][j] for gi, j in per])

    def scalar(key):  # to true units once per group (one op per group, not per matrix: launches on CUDA)
        return gather([torch.ldexp(res[key], g.exp) for g, res in results])

    def flag(key):
        return gather([res[key] for _, res in results])

    groups = []
    for g, res in results:  # split back into tall shapes (a merged batch holds several m, zero-padded)
        U, V = torch.stack([res["u_max"], res["u_min"]], 2), torch.stack([res["y"], res["x"]], 2)
        for index, wide, a, b, m, n in g.parts:
            groups.append(VectorGroup(index, wide, U[a:b, :m], V[a:b, :n]))
    if _backend.on_cuda(mats[0]):  # one buffer for the graph's copy-out and the backward's kernel (VectorGroup)
        groups = pack_vectors(groups)
    u_max, v_max, u_min, v_min = group_vectors(groups, len(mats))
    structural = gather([g.structural for g, _ in results])
    finite = gather([g.finite for g, _ in results])
    first = None
    if all("first_certified" in res for _, res in results):
        first = flag("first_certified")
    bottom = _ritz_blocks(results, per) if ritz_block else None
    return SpectralEstimate(
        sigma_max=scalar("smax"), sigma_min=scalar("smin"), sigma_max_lo=scalar("smax_lo"),
        sigma_max_hi=scalar("smax_hi"), sigma_min_lo=scalar("smin_lo"), sigma_min_hi=scalar("smin_hi"),
        certified=flag("certified"), fallback=flag("fallback"), structural=structural, finite=finite,
        u_max=u_max, v_max=v_max, u_min=u_min, v_min=v_min, work=dict(work), rtol=opt.rtol, floor=opt.floor,
        bottom=bottom, groups=groups, first_round_certified=first)


def _ritz_blocks(results, per) -> list:
    """Rayleigh-Ritz on each matrix's retained bottom block: (sigmas ascending [r], U [m, r], V [n, r]), own
    orientation, true units. Uses eigh (a host sync on CUDA)."""
    out = []
    for gi, j in per:
        g, res = results[gi]
        r = res["blocks"].shape[-1] - min(2, g.n)
        m, n = g.row_m[j], g.row_n[j]
        X = _orth(res["blocks"][j][None, :n, :r])[0]  # the retained bottom block (it spans the Ritz vector x)
        _, W = torch.linalg.eigh(X.mT @ g.G[j, :n, :n] @ X)
        V = X @ W
        V = V / V.norm(dim=0, keepdim=True)
        AV = _times(g.A[j, :m, :n], V)
        s = AV.norm(dim=0)
        U = AV / s.clamp_min(torch.finfo(_F64).tiny)
        order = s.argsort()
        s, U, V = s[order], U[:, order], V[:, order]
        U = g.full_rows(U, j)
        if bool(g.structural[j]):
            s, U = torch.zeros_like(s), torch.zeros_like(U)
        s = torch.ldexp(s, g.exp[j])
        out.append((s, V, U) if g.wide[j] else (s, U, V))
    return out


def _raise_unresolved(est: SpectralEstimate, results, per, mats, opt: SpectralOptions) -> None:
    if all(bool(res["resolved"].all()) for _, res in results):
        return
    for i, (gi, j) in enumerate(per):
        if not bool(results[gi][1]["resolved"][j]):
            smax, smin = float(est.sigma_max[i]), float(est.sigma_min[i])
            raise ValueError(
                f"weights[{i}] ({tuple(mats[i].shape)}): sigma_min = {smin:.3g} is below what float64 resolves next "
                f"to sigma_max = {smax:.3g} (kappa ~ {smax / max(smin, 1e-300):.3g}); certifying kappa to "
                f"rtol={opt.rtol:g} needs more than float64 (double-double / quad precision), or pass floor > 0 "
                "(e.g. the CNC eps) to certify the floored kappa instead")
