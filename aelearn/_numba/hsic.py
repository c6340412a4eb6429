"""Numba CPU backend of the fused HSIC op.

Two entry points, with the meaning fixed by the backend contract (csrc/hsic.cpp):

* ``hsic_sums(x, y, kernel_x, params_x, kernel_y, params_y, exclude_diagonal)`` -> ``(pair_sum, row_k,
  row_l)``: float64 ``[]``, ``[n]``, ``[n]`` with ``pair_sum = sum_P K_ij L_ij``, ``row_k[i] = sum_j K_ij``,
  ``row_l[i] = sum_j L_ij`` over the pairs P (all ordered pairs, or those with i != j).
* ``hsic_grads(..., exclude_diagonal, row_k, row_l, c1, c2, c3)`` -> ``(gx, gy)``: the gradients of
  ``F = c1 sum_P K_ij L_ij + c2 sum_i row_k[i] row_l[i] + c3 (sum_i row_k[i]) (sum_i row_l[i])``.

``x`` is ``[n, p]`` and ``y`` is ``[n, q]``, contiguous CPU tensors of one dtype (float32 or float64).

How the pairs are visited:

* The pair space is cut into ``BLOCK x BLOCK`` tiles (`aelearn._numba._tiles`). Each tile computes
  the distance tiles of x and of y over the same pair block (or the dot tile for "linear", the label
  comparison for "delta"), evaluates every bandwidth from them, and reduces what the sums need, so no
  ``n x n`` matrix ever exists.
* K and L are symmetric, so only tiles with column block >= row block are visited; an off-diagonal
  tile updates the row sums (and gradient rows) of its row block from its rows and those of its column
  block from its columns. Two tiles of a parallel loop would then race on a block they share, so the
  tiles run in rounds of a round-robin tournament between the row blocks: within a round every block
  belongs to exactly one tile (its diagonal tile, or one pairing with another block), so the tiles of a
  round run in parallel and write their blocks' float64 accumulators directly. No per-thread copy of
  any row-sized buffer exists: the extra memory is O(n (p + q)) whatever the thread count, and the
  order of every float64 accumulation is fixed by the schedule, so results do not depend on it either.
* The diagonal of a diagonal tile is masked: r_ii := 0 exactly when diagonal pairs are included, the
  terms dropped when they are excluded; never subtracted afterwards.
* Arithmetic inside a tile runs in the input dtype (so float32 uses twice the SIMD lanes); per-row and
  per-column partials of at most ``BLOCK`` terms are reduced to float64 before they meet other tiles.
* The backward pass recomputes the tiles. With ``dF/dK_ij + dF/dK_ji = W_ij = 2 c1 L_ij + o_i + o_j``,
  ``o_i = c2 row_l[i] + c3 sum(row_l)``, the gradient of row a is ``sum_j W_aj dK_aj/dx_a``: for a
  radial kernel ``-2 sum_j W_aj w_aj (x_a - x_j)`` with ``w = -f'(r) >= 0``, for "linear"
  ``sum_j W_aj x_j``; a weighted tile times the partner block, per side of the tile. The same holds
  for y with K and L swapped; labels ("delta") get a zero gradient.
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

__all__ = ["hsic_sums", "hsic_grads"]

# Integer kernel codes inside the jitted code; the radial ones are those of `_tiles`.
_LINEAR = 2
_DELTA = 3
_X_KERNELS = {"rbf": _RBF, "imq": _IMQ, "linear": _LINEAR}
_Y_KERNELS = {**_X_KERNELS, "delta": _DELTA}


@_jit()
def _round_tile(round_index, task, n_blocks):
    """Tile ``(row_block, col_block)``, row_block <= col_block, of one task of one round; (-1, -1): idle.

    Round-robin tournament between ``players = n_blocks | 1`` (odd) blocks, block ``n_blocks`` being a
    dummy when n_blocks is even: in round r the blocks a, b with a + b = r (mod players) meet, and the
    block with 2a = r sits out. Over the ``players`` rounds every pair of blocks meets once (an
    off-diagonal tile) and every real block either sits out once (n_blocks odd) or meets the dummy once
    (n_blocks even): that round it takes its diagonal tile. Task t of a round is the pair
    (h - t, h + t) around the sitting-out block h; tasks 0 .. (players - 1) / 2 cover the round, and
    no block appears in two tasks of one round.
    """
    players = n_blocks | 1
    # (players + 1) / 2 is the inverse of 2 modulo the odd players.
    sitting_out = round_index * ((players + 1) // 2) % players
    a = (sitting_out - task + players) % players
    b = (sitting_out + task) % players
    low = min(a, b)
    high = max(a, b)
    if high == n_blocks:
        return low, low
    if low == high:
        return (low, low) if players == n_blocks else (-1, -1)
    return low, high


@_jit(fastmath=_REDUCE_FLAGS)
def _kernel_tile(kernel, params, a, a_sq, z_panel, z_sq, diagonal, dist, values, slopes, want_values, want_slopes):
    """Kernel values and/or radial slopes of one tile, in ``values[:rows, :cols]`` / ``slopes[:rows, :cols]``.

    a: ``[rows, d]``, the row block; a_sq: ``[rows]`` its squared norms; z_panel: ``[d, BLOCK]``, the
    column block packed by `column_panels`; z_sq: ``[cols]``; dist, values, slopes: ``[BLOCK, BLOCK]``
    scratch of the tile dtype. Radial kernels write f(r) into values when ``want_values`` and -f'(r)
    into slopes when ``want_slopes``. "linear" writes the dot products a_i.z_j into values (with the
    diagonal included, a_i.a_i = ||a_i||^2 is the kernel value itself); "delta" writes [a_i0 == z_j0],
    reading the labels of the column block from the panel's first row.
    """
    rows = a.shape[0]
    cols = z_sq.shape[0]
    if kernel == _LINEAR:
        _tile_matmul(a, rows, a.shape[1], z_panel, cols, values)
    elif kernel == _DELTA:
        one = values.dtype.type(1)
        zero = values.dtype.type(0)
        labels = z_panel[0]
        for i in range(rows):
            label = a[i, 0]
            row = values[i]
            for j in range(cols):
                row[j] = one if labels[j] == label else zero
    else:
        _distance_tile(a, a_sq, z_panel, z_sq, diagonal, dist)
        if want_values and want_slopes:
            _radial_profile(dist, rows, cols, kernel, params, False, values, slopes)
        elif want_slopes:
            _radial_profile(dist, rows, cols, kernel, params, True, slopes)
        else:
            _radial_profile(dist, rows, cols, kernel, params, False, values)


@_jit(fastmath=_REDUCE_FLAGS)
def _reduce_tile(k_tile, l_tile, rows, cols, row_k, row_l, col_k, col_l, col_k_acc, col_l_acc):
    """Add one tile's row and column sums of K and L to float64 accumulators; return its sum of K L.

    k_tile, l_tile: ``[>= rows, >= cols]``; row_k, row_l: float64 ``[rows]`` accumulators of the row
    block; col_k, col_l: float64 ``[cols]`` accumulators of the column block, updated only when they
    are not the row block's own (an empty array: a diagonal tile, whose columns are its rows);
    col_k_acc, col_l_acc: ``[BLOCK]`` scratch of the tile dtype. Partials of at most BLOCK terms are
    summed in the tile dtype, everything beyond in float64.
    """
    zero = k_tile.dtype.type(0)
    for j in range(cols):
        col_k_acc[j] = zero
        col_l_acc[j] = zero
    tile_sum = 0.0
    for i in range(rows):
        k_row = k_tile[i]
        l_row = l_tile[i]
        product_sum = zero
        k_sum = zero
        l_sum = zero
        for j in range(cols):
            k = k_row[j]
            l = l_row[j]
            product_sum += k * l
            k_sum += k
            l_sum += l
            col_k_acc[j] += k
            col_l_acc[j] += l
        tile_sum += np.float64(product_sum)
        row_k[i] += np.float64(k_sum)
        row_l[i] += np.float64(l_sum)
    if col_k.shape[0] > 0:
        for j in range(cols):
            col_k[j] += np.float64(col_k_acc[j])
            col_l[j] += np.float64(col_l_acc[j])
    return tile_sum


@_jit(parallel=True, fastmath=_REDUCE_FLAGS)
def _sums(x, y, kernel_x, params_x, kernel_y, params_y, exclude_diagonal):
    """``(pair_sum, row_k [n], row_l [n])`` in float64; x: ``[n, p]``, y: ``[n, q]``, params float64."""
    n = x.shape[0]
    dtype = x.dtype
    n_blocks = -(-n // _BLOCK)
    players = n_blocks | 1
    tile_params_x = params_x.astype(dtype)
    tile_params_y = params_y.astype(dtype)
    x_sq = _squared_norms(x)
    y_sq = _squared_norms(y)
    x_panels = _column_panels(x)
    y_panels = _column_panels(y)
    row_k = np.zeros(n)
    row_l = np.zeros(n)
    no_columns = np.zeros(0)
    # One float64 partial per row block (owned by the tile's row block within a round), summed in a
    # fixed order at the end.
    block_pair_sums = np.zeros(n_blocks)
    for round_index in range(players):
        for task in prange((players + 1) // 2):
            row_block, col_block = _round_tile(round_index, np.int64(task), n_blocks)
            if row_block >= 0:
                dist = np.empty((_BLOCK, _BLOCK), dtype)
                k_tile = np.empty((_BLOCK, _BLOCK), dtype)
                l_tile = np.empty((_BLOCK, _BLOCK), dtype)
                col_k_acc = np.empty(_BLOCK, dtype)
                col_l_acc = np.empty(_BLOCK, dtype)
                i0 = row_block * _BLOCK
                i1 = min(i0 + _BLOCK, n)
                j0 = col_block * _BLOCK
                j1 = min(j0 + _BLOCK, n)
                diagonal = row_block == col_block
                _kernel_tile(kernel_x, tile_params_x, x[i0:i1], x_sq[i0:i1], x_panels[col_block], x_sq[j0:j1],
                             diagonal, dist, k_tile, k_tile, True, False)
                _kernel_tile(kernel_y, tile_params_y, y[i0:i1], y_sq[i0:i1], y_panels[col_block], y_sq[j0:j1],
                             diagonal, dist, l_tile, l_tile, True, False)
                if diagonal and exclude_diagonal:
                    for i in range(i1 - i0):
                        k_tile[i, i] = dtype.type(0)
                        l_tile[i, i] = dtype.type(0)
                if diagonal:
                    block_pair_sums[row_block] += _reduce_tile(
                        k_tile, l_tile, i1 - i0, j1 - j0, row_k[i0:i1], row_l[i0:i1], no_columns, no_columns,
                        col_k_acc, col_l_acc)
                else:
                    # The tile also stands for its mirror image (j, i) in the pair sum.
                    block_pair_sums[row_block] += 2.0 * _reduce_tile(
                        k_tile, l_tile, i1 - i0, j1 - j0, row_k[i0:i1], row_l[i0:i1], row_k[j0:j1], row_l[j0:j1],
                        col_k_acc, col_l_acc)
    pair_sum = 0.0
    for block in range(n_blocks):
        pair_sum += block_pair_sums[block]
    return pair_sum, row_k, row_l


@_jit(fastmath=_REDUCE_FLAGS)
def _radial_weights(partner_values, coeff, offsets_rows, offsets_cols, rows, cols, weights):
    """Pair weights of one tile for a radial side, in place: ``weights[i, j] *= W_ij``.

    ``W_ij = coeff * partner_values[i, j] + offsets_rows[i] + offsets_cols[j]`` = dF/dK_ij + dF/dK_ji, with
    partner_values the other kernel's tile and coeff = 2 c1; weights holds the slopes -f'(r_ij) on entry.
    All arrays in the tile dtype, ``[:rows, :cols]`` of the tiles used.
    """
    for i in range(rows):
        offset = offsets_rows[i]
        p_row = partner_values[i]
        w_row = weights[i]
        for j in range(cols):
            w_row[j] *= coeff * p_row[j] + offset + offsets_cols[j]


@_jit(fastmath=_REDUCE_FLAGS)
def _weight_col_sums(weights, rows, cols, col_sums):
    """``col_sums[j] = sum_i weights[i, j]`` over ``weights[:rows, :cols]``, in the tile dtype."""
    zero = weights.dtype.type(0)
    for j in range(cols):
        col_sums[j] = zero
    for i in range(rows):
        w_row = weights[i]
        for j in range(cols):
            col_sums[j] += w_row[j]


@_jit(fastmath=_REDUCE_FLAGS)
def _add_partners(partners, scale, grad):
    """``grad += scale * partners[:rows]`` in float64; grad: float64 ``[rows, d]``, partners ``[>= rows, d]``."""
    for i in range(grad.shape[0]):
        for k in range(grad.shape[1]):
            grad[i, k] += scale * np.float64(partners[i, k])


@_jit(fastmath=_REDUCE_FLAGS)
def _side_gradient(weights, rows, cols, radial, scale, own_rows, own_cols, grad_rows, grad_cols, mirrored,
                   partners, weight_sums):
    """Add one tile's contribution to the gradient of one sample (x or y), rows and, if mirrored, columns.

    weights: ``[BLOCK, BLOCK]`` pair weights V in ``[:rows, :cols]``, symmetric in meaning (V_ab = V_ba);
    own_rows: ``[rows, d]`` and own_cols: ``[cols, d]``, the tile's two blocks of the sample; grad_rows,
    grad_cols: their float64 gradient rows; partners: ``[BLOCK, d]`` and weight_sums: ``[BLOCK]``
    scratch. Radial: row a gets ``scale (x_a sum_j V_aj - sum_j V_aj x_j)``; linear:
    ``scale sum_j V_aj x_j``. A mirrored (off-diagonal) tile also gives every row b of the column block
    its sum over the tile's rows, through the transposed weights.
    """
    _tile_matmul(weights, rows, cols, own_cols, own_cols.shape[1], partners)
    if radial:
        _weight_row_sums(weights, rows, cols, weight_sums)
        _accumulate_gradient(own_rows, weight_sums, partners, scale, grad_rows)
    else:
        _add_partners(partners, scale, grad_rows)
    if mirrored:
        _tile_matmul(weights.T, cols, rows, own_rows, own_rows.shape[1], partners)
        if radial:
            _weight_col_sums(weights, rows, cols, weight_sums)
            _accumulate_gradient(own_cols, weight_sums, partners, scale, grad_cols)
        else:
            _add_partners(partners, scale, grad_cols)


@_jit(fastmath=_REDUCE_FLAGS)
def _linear_offset_gradient(a, offsets, exclude_diagonal, grad):
    """Add the offset part of a linear side's gradient: ``grad[i] += sum_{j:(i,j) in P} (o_i + o_j) a_j``.

    a: ``[n, d]``; offsets: float64 ``[n]``; grad: float64 ``[n, d]``. With the offsets factored out of
    the pair weights, ``sum_j (o_i + o_j) a_j = o_i sum_j a_j + sum_j o_j a_j`` (less ``2 o_i a_i`` for
    an excluded diagonal) in O(n d) float64 work: the tiles carry only 2 c1 L_ij. The constant part of
    o cancels against sum_j a_j = 0 for centred data, which float32 pair weights could not resolve.
    """
    n, d = a.shape
    column_sum = np.zeros(d)
    weighted_sum = np.zeros(d)
    for j in range(n):
        for k in range(d):
            v = np.float64(a[j, k])
            column_sum[k] += v
            weighted_sum[k] += offsets[j] * v
    for i in range(n):
        own = 2.0 * offsets[i] if exclude_diagonal else 0.0
        for k in range(d):
            grad[i, k] += offsets[i] * column_sum[k] + weighted_sum[k] - own * np.float64(a[i, k])


@_jit(parallel=True, fastmath=_REDUCE_FLAGS)
def _grads(x, y, kernel_x, params_x, kernel_y, params_y, exclude_diagonal, row_k, row_l, c1, c2, c3):
    """Float64 gradients ``(gx [n, p], gy [n, q])`` of F (module docstring); gy stays 0 for "delta"."""
    n, p = x.shape
    q = y.shape[1]
    dtype = x.dtype
    n_blocks = -(-n // _BLOCK)
    players = n_blocks | 1
    tile_params_x = params_x.astype(dtype)
    tile_params_y = params_y.astype(dtype)
    x_sq = _squared_norms(x)
    y_sq = _squared_norms(y)
    x_panels = _column_panels(x)
    y_panels = _column_panels(y)
    radial_x = kernel_x == _RBF or kernel_x == _IMQ
    radial_y = kernel_y == _RBF or kernel_y == _IMQ
    with_gy = kernel_y != _DELTA
    # W_ij = 2 c1 L_ij + c2 (row_l[i] + row_l[j]) + 2 c3 sum(row_l) = 2 c1 L_ij + o_i + o_j: the constant
    # split evenly between the row and the column offset, formed in float64.
    offsets_x = c2 * row_l + c3 * row_l.sum()
    offsets_y = c2 * row_k + c3 * row_k.sum()
    tile_offsets_x = offsets_x.astype(dtype)
    tile_offsets_y = offsets_y.astype(dtype)
    pair_coeff = 2.0 * c1
    tile_pair_coeff = dtype.type(pair_coeff)
    gx = np.zeros((n, p))
    gy = np.zeros((n, q))
    for round_index in range(players):
        for task in prange((players + 1) // 2):
            row_block, col_block = _round_tile(round_index, np.int64(task), n_blocks)
            if row_block >= 0:
                dist = np.empty((_BLOCK, _BLOCK), dtype)
                k_values = np.empty((_BLOCK, _BLOCK), dtype)
                k_slopes = np.empty((_BLOCK, _BLOCK), dtype)
                l_values = np.empty((_BLOCK, _BLOCK), dtype)
                l_slopes = np.empty((_BLOCK, _BLOCK), dtype)
                partners_x = np.empty((_BLOCK, p), dtype)
                partners_y = np.empty((_BLOCK, q), dtype)
                weight_sums = np.empty(_BLOCK, dtype)
                i0 = row_block * _BLOCK
                i1 = min(i0 + _BLOCK, n)
                j0 = col_block * _BLOCK
                j1 = min(j0 + _BLOCK, n)
                rows = i1 - i0
                cols = j1 - j0
                diagonal = row_block == col_block
                # The values of one kernel weight the gradient of the other side, its slopes (radial) its
                # own side: labels need no K values, a linear x with labels y no K tile at all.
                if radial_x or with_gy:
                    _kernel_tile(kernel_x, tile_params_x, x[i0:i1], x_sq[i0:i1], x_panels[col_block], x_sq[j0:j1],
                                 diagonal, dist, k_values, k_slopes, with_gy, radial_x)
                _kernel_tile(kernel_y, tile_params_y, y[i0:i1], y_sq[i0:i1], y_panels[col_block], y_sq[j0:j1],
                             diagonal, dist, l_values, l_slopes, True, radial_y and with_gy)
                if diagonal and exclude_diagonal:
                    for i in range(rows):
                        k_values[i, i] = dtype.type(0)
                        l_values[i, i] = dtype.type(0)
                if radial_x:
                    _radial_weights(l_values, tile_pair_coeff, tile_offsets_x[i0:i1], tile_offsets_x[j0:j1], rows,
                                    cols, k_slopes)
                    if diagonal:
                        # The i == j term is (x_i - x_i) times a weight: exactly 0, so masked, not cancelled.
                        for i in range(rows):
                            k_slopes[i, i] = dtype.type(0)
                    _side_gradient(k_slopes, rows, cols, True, -2.0, x[i0:i1], x[j0:j1], gx[i0:i1], gx[j0:j1],
                                   not diagonal, partners_x, weight_sums)
                else:
                    # Linear: the tile carries 2 c1 L_ij only (`_linear_offset_gradient` adds the offsets).
                    _side_gradient(l_values, rows, cols, False, pair_coeff, x[i0:i1], x[j0:j1], gx[i0:i1],
                                   gx[j0:j1], not diagonal, partners_x, weight_sums)
                if with_gy and radial_y:
                    _radial_weights(k_values, tile_pair_coeff, tile_offsets_y[i0:i1], tile_offsets_y[j0:j1], rows,
                                    cols, l_slopes)
                    if diagonal:
                        for i in range(rows):
                            l_slopes[i, i] = dtype.type(0)
                    _side_gradient(l_slopes, rows, cols, True, -2.0, y[i0:i1], y[j0:j1], gy[i0:i1], gy[j0:j1],
                                   not diagonal, partners_y, weight_sums)
                elif with_gy:
                    _side_gradient(k_values, rows, cols, False, pair_coeff, y[i0:i1], y[j0:j1], gy[i0:i1],
                                   gy[j0:j1], not diagonal, partners_y, weight_sums)
    if not radial_x:
        _linear_offset_gradient(x, offsets_x, exclude_diagonal, gx)
    if with_gy and not radial_y:
        _linear_offset_gradient(y, offsets_y, exclude_diagonal, gy)
    return gx, gy


def _kernel_code(kernel, codes, name):
    """Integer code of a kernel name; ValueError naming the argument for any other name."""
    if kernel not in codes:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, codes))}; got {kernel!r}")
    return codes[kernel]


def _params_array(kernel, params, name):
    """params as float64 ``[n_params]``: at least one for rbf/imq, none for linear/delta."""
    values = np.asarray(tuple(params), dtype=np.float64)
    radial = kernel in ("rbf", "imq")
    if values.ndim != 1 or (radial and values.size == 0) or (not radial and values.size != 0):
        need = "at least one float" if radial else "empty"
        raise ValueError(f"{name} must be {need} for kernel {kernel!r}; got {tuple(params)}")
    return values


def _check_sample(name, a, n=None):
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(a).__name__}")
    if a.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU for the numba backend, got {a.device}")
    if a.dim() != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} must be [n, dim] with n, dim >= 1, got shape {tuple(a.shape)}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} must have {n} rows like x, got shape {tuple(a.shape)}")
    if a.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    if not a.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _prepare(x, y, kernel_x, params_x, kernel_y, params_y):
    """Checked numpy views and kernel arguments of the jitted functions."""
    _check_sample("x", x)
    _check_sample("y", y, x.shape[0])
    if y.dtype != x.dtype:
        raise TypeError(f"y must have the dtype of x ({x.dtype}), got {y.dtype}")
    code_x = _kernel_code(kernel_x, _X_KERNELS, "kernel_x")
    code_y = _kernel_code(kernel_y, _Y_KERNELS, "kernel_y")
    return (
        x.detach().numpy(),
        y.detach().numpy(),
        code_x,
        _params_array(kernel_x, params_x, "params_x"),
        code_y,
        _params_array(kernel_y, params_y, "params_y"),
    )


def _check_row_sums(name, row_sums, n):
    if not isinstance(row_sums, torch.Tensor) or row_sums.device.type != "cpu":
        raise TypeError(f"{name} must be a CPU torch.Tensor")
    if row_sums.dtype != torch.float64 or row_sums.shape != (n,) or not row_sums.is_contiguous():
        raise ValueError(f"{name} must be contiguous float64 [{n}], got {row_sums.dtype} {tuple(row_sums.shape)}")


def hsic_sums(x, y, kernel_x, params_x, kernel_y, params_y, exclude_diagonal):
    """``(pair_sum: float64 [], row_k: float64 [n], row_l: float64 [n])`` as CPU tensors.

    x: ``[n, p]``, y: ``[n, q]`` (``[n, 1]`` label ids for "delta"), contiguous CPU tensors of one dtype
    (float32 or float64); kernel_x: "rbf", "imq" or "linear", kernel_y also "delta"; params_x,
    params_y: bandwidths (floats; empty for linear and delta); exclude_diagonal: drop the pairs i == j.
    """
    arrays = _prepare(x, y, kernel_x, params_x, kernel_y, params_y)
    pair_sum, row_k, row_l = _sums(*arrays, bool(exclude_diagonal))
    return torch.tensor(pair_sum, dtype=torch.float64), torch.from_numpy(row_k), torch.from_numpy(row_l)


def hsic_grads(x, y, kernel_x, params_x, kernel_y, params_y, exclude_diagonal, row_k, row_l, c1, c2, c3):
    """Gradients ``(gx, gy)`` of F (module docstring), CPU tensors of the shapes and dtype of x and y.

    Arguments as for `hsic_sums`, plus row_k, row_l: float64 ``[n]`` from `hsic_sums`, and the Python
    float coefficients c1, c2, c3. gy is zeros for kernel_y "delta".
    """
    arrays = _prepare(x, y, kernel_x, params_x, kernel_y, params_y)
    n = x.shape[0]
    _check_row_sums("row_k", row_k, n)
    _check_row_sums("row_l", row_l, n)
    gx, gy = _grads(*arrays, bool(exclude_diagonal), row_k.detach().numpy(), row_l.detach().numpy(),
                    float(c1), float(c2), float(c3))
    return torch.from_numpy(gx.astype(arrays[0].dtype)), torch.from_numpy(gy.astype(arrays[1].dtype))
