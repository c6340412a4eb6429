"""Numba CPU backend of the fused MMD op.

Two entry points, with the meaning fixed by the backend contract:

* ``mmd_sums(x, y, kernel, params, unbiased)`` -> float64 tensor ``[S_xx, S_yy, S_xy]``.
* ``mmd_grads(x, y, kernel, params, unbiased, coeff_xx, coeff_yy, coeff_xy)`` -> ``(gx, gy)`` with
  ``gx = coeff_xx dS_xx/dx + coeff_xy dS_xy/dx`` and ``gy = coeff_yy dS_yy/dy + coeff_xy dS_xy/dy``.

``x`` is ``[n, d]`` and ``y`` is ``[m, d]``, contiguous CPU tensors of one dtype (float32 or float64).

How the radial kernels (rbf, imq) are evaluated:

* The pair space is cut into ``_BLOCK x _BLOCK`` tiles. Each tile computes its dot products with a
  register-blocked loop nest, turns them into squared distances ``||a||^2 + ||b||^2 - 2 a.b`` (clamped at
  0) and evaluates every bandwidth from that one distance tile, so no ``n x m`` matrix ever exists.
* Within-sample sums are symmetric: only tiles with column block >= row block are visited and
  off-diagonal tiles count twice. The diagonal of a diagonal tile is masked (``r := 0`` when biased, the
  term dropped when unbiased), never subtracted afterwards.
* The tiles of all three sums form one task list, so a single parallel loop balances the (triangular)
  within-sample work and the (square) cross work across threads.
* Arithmetic inside a tile runs in the input dtype (so float32 uses twice the SIMD lanes); each tile's
  result is reduced to float64 before it is combined with other tiles.
* The backward pass recomputes the distance tiles. Each parallel iteration owns one block of gradient
  rows and walks every column block of both samples, accumulating in float64; no row is shared between
  threads, so the extra memory is O((n + m) d) whatever the thread count.

The linear kernel needs no tiles: its sums and gradients follow in O((n + m) d) from the column sums.
"""

import numpy as np
import torch
from numba import prange

from aelearn._numba._common import REDUCE_FLAGS as _REDUCE_FLAGS
from aelearn._numba._common import jit as _jit
from aelearn._numba._tiles import BLOCK as _BLOCK
from aelearn._numba._tiles import IMQ as _IMQ
from aelearn._numba._tiles import RBF as _RBF
from aelearn._numba._tiles import accumulate_gradient as _accumulate_gradient
from aelearn._numba._tiles import column_panels as _column_panels
from aelearn._numba._tiles import distance_tile as _distance_tile
from aelearn._numba._tiles import radial_profile as _radial_profile
from aelearn._numba._tiles import squared_norms as _squared_norms
from aelearn._numba._tiles import tile_matmul as _tile_matmul
from aelearn._numba._tiles import weight_row_sums as _weight_row_sums

__all__ = ["mmd_sums", "mmd_grads"]

# Integer kernel codes passed into the jitted code (the linear kernel never reaches it).
_KERNEL_CODES = {"rbf": _RBF, "imq": _IMQ}


@_jit(fastmath=_REDUCE_FLAGS)
def _task_operands(task, x, y, x_panels, y_panels, x_sq, y_sq):
    """Operands of one tile task ``(kind, row_block, col_block)``; kind 0: x-x, 1: y-y, 2: x-y.

    x_panels, y_panels: the samples packed by `_column_panels`; x_sq: ``[n]``, y_sq: ``[m]``: squared
    norms. Returns the row block ``[rows, d]`` of the left sample and its squared norms, the column
    block's panel ``[d, _BLOCK]`` and squared norms ``[cols]`` of the right sample, and whether the tile
    lies on the diagonal of a within-sample sum.
    """
    kind = task[0]
    left, left_sq = (y, y_sq) if kind == 1 else (x, x_sq)
    right, right_panels, right_sq = (x, x_panels, x_sq) if kind == 0 else (y, y_panels, y_sq)
    i0 = task[1] * _BLOCK
    i1 = min(i0 + _BLOCK, left.shape[0])
    j0 = task[2] * _BLOCK
    j1 = min(j0 + _BLOCK, right.shape[0])
    diagonal = kind != 2 and task[1] == task[2]
    return left[i0:i1], left_sq[i0:i1], right_panels[task[2]], right_sq[j0:j1], diagonal


@_jit(parallel=True, fastmath=_REDUCE_FLAGS)
def _radial_sums(x, y, kernel, params, unbiased, tasks):
    """``[S_xx, S_yy, S_xy]`` (float64 ``[3]``) of a radial kernel.

    x: ``[n, d]``, y: ``[m, d]``; params: float64 ``[n_params]``; tasks: int64 ``[n_tasks, 3]`` rows
    ``(kind, row_block, col_block)`` covering the upper block triangle of x-x and y-y and all of x-y.
    Each task's float64 partial sum is stored separately and the partials are combined serially, so
    the result does not depend on the number of threads.
    """
    dtype = x.dtype
    tile_params = params.astype(dtype)
    x_sq = _squared_norms(x)
    y_sq = _squared_norms(y)
    x_panels = _column_panels(x)
    y_panels = _column_panels(y)
    n_tasks = tasks.shape[0]
    partial = np.empty(n_tasks)
    for t in prange(n_tasks):
        a, a_sq, z_panel, z_sq, diagonal = _task_operands(tasks[t], x, y, x_panels, y_panels, x_sq, y_sq)
        rows = a.shape[0]
        cols = z_sq.shape[0]
        dist = np.empty((_BLOCK, _BLOCK), dtype)
        values = np.empty((_BLOCK, _BLOCK), dtype)
        _distance_tile(a, a_sq, z_panel, z_sq, diagonal, dist)
        _radial_profile(dist, rows, cols, kernel, tile_params, False, values)
        tile_sum = 0.0
        for i in range(rows):
            row = values[i]
            if diagonal and unbiased:
                row[i] = dtype.type(0)
            # Tile dtype within one row of at most _BLOCK terms, float64 across rows and tiles.
            row_sum = dtype.type(0)
            for j in range(cols):
                row_sum += row[j]
            tile_sum += np.float64(row_sum)
        # An off-diagonal within-sample tile also stands for its mirror image.
        partial[t] = tile_sum if (tasks[t, 0] == 2 or diagonal) else 2.0 * tile_sum
    sums = np.zeros(3)
    for t in range(n_tasks):
        sums[tasks[t, 0]] += partial[t]
    return sums


@_jit(parallel=True, fastmath=_REDUCE_FLAGS)
def _radial_grads(x, y, kernel, params, coeffs):
    """Gradients ``(gx, gy)``, in the dtype of x, of ``sum_kind coeffs[kind] * S_kind`` for a radial kernel.

    x: ``[n, d]``, y: ``[m, d]``; params: float64 ``[n_params]``; coeffs: float64 ``[3]`` (xx, yy, xy).

    With w_ij = -f'(r_ij) (>= 0 for rbf and imq) and d/da k(a, z) = 2 f'(r) (a - z), row a_i of a sample
    gets ``-2 c sum_j w_ij (a_i - z_j) = -2 c (a_i sum_j w_ij - sum_j w_ij z_j)`` from every column block
    z of both samples, where c is the sum's coefficient, doubled for the own sample (k(a, b) and k(b, a)
    both appear in S_xx). ``sum_j w_ij z_j`` is a small matrix product per tile. The diagonal pair
    contributes nothing and is masked to 0 rather than computed and cancelled, so the unbiased and biased
    estimators share the gradient. Each parallel iteration owns one block of output rows and walks all
    column blocks, accumulating in a float64 ``[_BLOCK, d]`` buffer: no two threads write the same row,
    so the extra memory is independent of the thread count (the price: the symmetric pairs of S_xx and
    S_yy are evaluated from both sides). Kinds with a zero coefficient are skipped.
    """
    dtype = x.dtype
    n, d = x.shape
    m = y.shape[0]
    tile_params = params.astype(dtype)
    x_sq = _squared_norms(x)
    y_sq = _squared_norms(y)
    x_panels = _column_panels(x)
    y_panels = _column_panels(y)
    x_blocks = -(-n // _BLOCK)
    gx = np.empty((n, d), dtype)
    gy = np.empty((m, d), dtype)
    for block in prange(x_blocks + -(-m // _BLOCK)):
        dist = np.empty((_BLOCK, _BLOCK), dtype)
        weights = np.empty((_BLOCK, _BLOCK), dtype)
        partners = np.empty((_BLOCK, d), dtype)
        row_sums = np.empty(_BLOCK, dtype)
        # prange indices may be unsigned; mixing them with signed ints would promote to float64.
        own_block = np.int64(block)
        if own_block < x_blocks:
            own, own_sq, own_panels, other, other_sq, other_panels = x, x_sq, x_panels, y, y_sq, y_panels
            own_coeff, out = coeffs[0], gx
        else:
            own, own_sq, own_panels, other, other_sq, other_panels = y, y_sq, y_panels, x, x_sq, x_panels
            own_block -= x_blocks
            own_coeff, out = coeffs[1], gy
        i0 = own_block * _BLOCK
        i1 = min(i0 + _BLOCK, own.shape[0])
        rows = i1 - i0
        a = own[i0:i1]
        a_sq = own_sq[i0:i1]
        grad = np.zeros((rows, d))
        for side in range(2):
            same = side == 0
            coeff = own_coeff if same else coeffs[2]
            if coeff == 0.0:
                continue
            z_all, z_sq_all, z_panels = (own, own_sq, own_panels) if same else (other, other_sq, other_panels)
            scale = -4.0 * coeff if same else -2.0 * coeff
            for col_block in range(z_panels.shape[0]):
                j0 = col_block * _BLOCK
                j1 = min(j0 + _BLOCK, z_all.shape[0])
                cols = j1 - j0
                diagonal = same and col_block == own_block
                _distance_tile(a, a_sq, z_panels[col_block], z_sq_all[j0:j1], diagonal, dist)
                _radial_profile(dist, rows, cols, kernel, tile_params, True, weights)
                if diagonal:
                    for i in range(rows):
                        weights[i, i] = dtype.type(0)
                _weight_row_sums(weights, rows, cols, row_sums)
                _tile_matmul(weights, rows, cols, z_all[j0:j1], d, partners)
                _accumulate_gradient(a, row_sums, partners, scale, grad)
        for i in range(rows):
            for k in range(d):
                out[i0 + i, k] = grad[i, k]
    return gx, gy


def _tile_tasks(n, m):
    """Tile tasks ``[n_tasks, 3]`` int64 rows ``(kind, row_block, col_block)`` of the three sums.

    Within-sample sums (kinds 0: x-x, 1: y-y) take the block upper triangle only; the cross sum (kind
    2: x-y) takes every block pair. Tasks are ordered by kind, then row block, so consecutive tasks of
    a worker reuse the same left block.
    """
    parts = []
    for kind, count in ((0, n), (1, m)):
        rows, cols = np.triu_indices(-(-count // _BLOCK))
        parts.append(np.stack([np.full_like(rows, kind), rows, cols], axis=1))
    rows, cols = np.divmod(np.arange(-(-n // _BLOCK) * -(-m // _BLOCK)), -(-m // _BLOCK))
    parts.append(np.stack([np.full_like(rows, 2), rows, cols], axis=1))
    return np.ascontiguousarray(np.concatenate(parts).astype(np.int64))


def _column_sums(a):
    """sum_i a_i in float64 for a: ``[rows, d]`` -> ``[d]``.

    Reduced along contiguous float64 rows so that numpy sums pairwise (error O(log rows) ulp instead of
    O(rows) for the row-by-row accumulation of ``a.sum(axis=0)``): centred samples make these sums small
    next to their terms.
    """
    return np.ascontiguousarray(a.T, dtype=np.float64).sum(axis=1)


def _linear_sums(xa, ya, unbiased):
    """``[S_xx, S_yy, S_xy]`` for k(a, b) = a.b; xa: ``[n, d]``, ya: ``[m, d]`` numpy arrays.

    sum_ij x_i.y_j = (sum_i x_i).(sum_j y_j), so no pair is ever formed: O((n + m) d) in float64. The
    unbiased within-sample sums subtract sum_i ||x_i||^2 from the closed form; there are no per-pair
    terms here whose diagonal could be masked instead.
    """
    x_sum = _column_sums(xa)
    y_sum = _column_sums(ya)
    s_xx = x_sum @ x_sum
    s_yy = y_sum @ y_sum
    if unbiased:
        s_xx -= np.einsum("ij,ij->", xa, xa, dtype=np.float64)
        s_yy -= np.einsum("ij,ij->", ya, ya, dtype=np.float64)
    return np.array([s_xx, s_yy, x_sum @ y_sum])


def _linear_grads(xa, ya, unbiased, coeff_xx, coeff_yy, coeff_xy):
    """Gradients ``(gx [n, d], gy [m, d])`` for the linear kernel, in the dtype of the inputs.

    d/dx_i S_xx = 2 sum_{j (!= i if unbiased)} x_j and d/dx_i S_xy = sum_j y_j, all in float64.
    """
    x_sum = _column_sums(xa)
    y_sum = _column_sums(ya)
    gx = np.broadcast_to(2.0 * coeff_xx * x_sum + coeff_xy * y_sum, xa.shape)
    gy = np.broadcast_to(2.0 * coeff_yy * y_sum + coeff_xy * x_sum, ya.shape)
    if unbiased:
        gx = gx - (2.0 * coeff_xx) * xa.astype(np.float64)
        gy = gy - (2.0 * coeff_yy) * ya.astype(np.float64)
    return gx.astype(xa.dtype), gy.astype(ya.dtype)


def _kernel_code(kernel):
    """Integer code of a radial kernel name (see `_KERNEL_CODES`); ValueError for any other name."""
    if kernel not in _KERNEL_CODES:
        raise ValueError(f"unknown kernel {kernel!r}; expected 'rbf', 'imq' or 'linear'")
    return _KERNEL_CODES[kernel]


def mmd_sums(x, y, kernel, params, unbiased):
    """Kernel sums ``[S_xx, S_yy, S_xy]`` as a float64 CPU tensor of shape ``[3]``.

    x: ``[n, d]``, y: ``[m, d]``, contiguous CPU tensors of one dtype (float32 or float64); kernel:
    "rbf", "imq" or "linear"; params: bandwidths (floats; empty for linear); unbiased: drop the i == j
    terms of S_xx and S_yy.
    """
    xa = x.detach().numpy()
    ya = y.detach().numpy()
    if kernel == "linear":
        return torch.from_numpy(_linear_sums(xa, ya, unbiased))
    code = _kernel_code(kernel)
    tasks = _tile_tasks(xa.shape[0], ya.shape[0])
    sums = _radial_sums(xa, ya, code, np.asarray(params, dtype=np.float64), bool(unbiased), tasks)
    return torch.from_numpy(sums)


def mmd_grads(x, y, kernel, params, unbiased, coeff_xx, coeff_yy, coeff_xy):
    """Gradients ``(gx, gy)`` of ``coeff_xx S_xx + coeff_yy S_yy + coeff_xy S_xy``.

    x: ``[n, d]``, y: ``[m, d]`` as in `mmd_sums`; the coefficients are Python floats. Returns CPU
    tensors of the shapes and dtype of x and y. Kinds whose coefficient is 0 are skipped.
    """
    xa = x.detach().numpy()
    ya = y.detach().numpy()
    if kernel == "linear":
        gx, gy = _linear_grads(xa, ya, unbiased, coeff_xx, coeff_yy, coeff_xy)
        return torch.from_numpy(gx), torch.from_numpy(gy)
    code = _kernel_code(kernel)
    coeffs = np.array([coeff_xx, coeff_yy, coeff_xy], dtype=np.float64)
    gx, gy = _radial_grads(xa, ya, code, np.asarray(params, dtype=np.float64), coeffs)
    return torch.from_numpy(gx), torch.from_numpy(gy)
