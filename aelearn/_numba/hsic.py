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
  block from its columns. Two tiles running at once would then race on a block they share, so the row
  blocks form groups and the work runs in steps: first every group's own tiles, then the rounds of a
  round-robin tournament between the groups, in which every group belongs to exactly one task (one
  pairing). The tasks of a step run in parallel and write their groups' float64 accumulators
  directly: no per-thread copy of any row-sized buffer exists, so the extra memory is O(n (p + q))
  whatever the thread count, and the order of every float64 accumulation is fixed by the schedule.
  The cost is one synchronisation per step, hence groups of many blocks (`_group_count`).
* The diagonal of a diagonal tile is masked: r_ii := 0 exactly when diagonal pairs are included, the
  terms dropped when they are excluded; never subtracted afterwards.
* Arithmetic inside a tile runs in the input dtype (so float32 uses twice the SIMD lanes); per-row and
  per-column partials of at most ``BLOCK`` terms are reduced to float64 before they meet other tiles.
* The backward pass recomputes the tiles. With ``dF/dK_ij + dF/dK_ji = W_ij = 2 c1 L_ij + o_i + o_j``,
  ``o_i = c2 row_l[i] + c3 sum(row_l)``, the gradient of row a is ``sum_j W_aj dK_aj/dx_a``: for a
  radial kernel ``-2 sum_j W_aj w_aj (x_a - x_j)`` with ``w = -f'(r) >= 0``, for "linear"
  ``sum_j W_aj x_j``; a weighted tile times the partner block, per side of the tile. The same holds
  for y with K and L swapped; labels ("delta") get a zero gradient. A linear side takes only the
  ``2 c1 L_ij`` part from the tiles and the offsets' part in closed form, O(n d) in float64; radial
  tiles form W recentred on the mean of L, so that no term in the tile dtype is much larger than W.
"""

import numba
import numpy as np
import torch
from numba import prange

from aelearn._numba._common import FMA_FLAGS as _FMA_FLAGS
from aelearn._numba._common import REDUCE_FLAGS as _REDUCE_FLAGS
from aelearn._numba._common import jit as _jit
from aelearn._numba._tiles import BLOCK as _BLOCK
from aelearn._numba._tiles import IMQ as _IMQ
from aelearn._numba._tiles import RBF as _RBF
from aelearn._numba._tiles import ROW_GROUP as _ROW_GROUP
from aelearn._numba._tiles import accumulate_gradient as _accumulate_gradient
from aelearn._numba._tiles import column_panels as _column_panels
from aelearn._numba._tiles import distance_tile as _distance_tile
from aelearn._numba._tiles import radial_profile as _radial_profile
from aelearn._numba._tiles import squared_norms as _squared_norms
from aelearn._numba._tiles import tile_matmul as _tile_matmul

__all__ = ["hsic_sums", "hsic_grads"]

# Integer kernel codes inside the jitted code; the radial ones are those of `_tiles`.
_LINEAR = 2
_DELTA = 3
_X_KERNELS = {"rbf": _RBF, "imq": _IMQ, "linear": _LINEAR}
_Y_KERNELS = {**_X_KERNELS, "delta": _DELTA}

# Tasks per thread in every step of the schedule (see `_group_count`).
_TASKS_PER_THREAD = 2


@_jit()
def _n_steps(n_groups):
    """Parallel steps of the schedule over ``n_groups`` groups.

    One for the groups on their own, then the rounds of `_step_groups`: n_groups - 1 of them for an even
    count, n_groups for an odd one.
    """
    return 1 + (n_groups - 1 if n_groups % 2 == 0 else n_groups)


@_jit()
def _step_tasks(step, n_groups):
    """Tasks of one step: every group on its own in step 0, then n_groups // 2 disjoint pairs per round."""
    return n_groups if step == 0 else n_groups // 2


@_jit()
def _step_groups(step, task, n_groups):
    """Groups ``(group_a, group_b)``, group_a <= group_b, of one task of one step.

    Step 0 pairs every group with itself (the tiles within it). Steps 1.. are the rounds of a
    round-robin tournament (the circle method) between the groups: with ``players`` = n_groups made
    odd by leaving the last group out when n_groups is even, in round r the groups a, b with
    a + b = r (mod players) meet and the group h with 2h = r sits out (or, for an even count, meets the
    group left out). Over the rounds every pair of groups meets exactly once, and no group is in two
    tasks of one round: the tasks of a step may run in parallel, each alone writing the rows of its
    two groups.
    """
    if step == 0:
        return task, task
    players = n_groups - 1 if n_groups % 2 == 0 else n_groups
    # (players + 1) / 2 is the inverse of 2 modulo the odd players.
    sitting_out = (step - 1) * ((players + 1) // 2) % players
    if task == players // 2:
        return sitting_out, n_groups - 1
    a = (sitting_out - task - 1 + players) % players
    b = (sitting_out + task + 1) % players
    return min(a, b), max(a, b)


@_jit()
def _task_tiles(step, task, n_groups, n_blocks):
    """Tiles ``[n_tiles, 2]`` (row_block, col_block), row_block <= col_block, of one task of one step.

    Group g holds the row blocks ``[g n_blocks / n_groups, (g + 1) n_blocks / n_groups)`` (sizes differ
    by at most one block). A task takes every tile between its two groups: the upper triangle of a
    diagonal group, all of a pair of distinct groups.
    """
    group_a, group_b = _step_groups(step, task, n_groups)
    first_row = group_a * n_blocks // n_groups
    stop_row = (group_a + 1) * n_blocks // n_groups
    first_col = group_b * n_blocks // n_groups
    stop_col = (group_b + 1) * n_blocks // n_groups
    tiles = np.empty(((stop_row - first_row) * (stop_col - first_col), 2), np.int64)
    count = 0
    for row_block in range(first_row, stop_row):
        for col_block in range(max(row_block, first_col), stop_col):
            tiles[count, 0] = row_block
            tiles[count, 1] = col_block
            count += 1
    return tiles[:count]


@_jit()
def _tile_bounds(row_block, col_block, n):
    """Sample ranges ``(i0, i1, j0, j1)`` of the rows and columns of tile (row_block, col_block), n samples."""
    i0 = row_block * _BLOCK
    j0 = col_block * _BLOCK
    return i0, min(i0 + _BLOCK, n), j0, min(j0 + _BLOCK, n)


@_jit(fastmath=_REDUCE_FLAGS)
def _kernel_tile(side, row_block, col_block, dist, values, slopes, want_values, want_slopes):
    """Kernel values and/or radial slopes of one tile, in ``values[:rows, :cols]`` / ``slopes[:rows, :cols]``.

    side: ``(kernel, params, a, a_sq, panels)`` of one sample: kernel code, bandwidths in the tile dtype,
    the sample ``[n, d]``, its squared norms ``[n]`` and its `column_panels` ``[n_blocks, d, BLOCK]``;
    dist, values, slopes: ``[BLOCK, BLOCK]`` scratch of the tile dtype. Radial kernels write f(r) into
    values when ``want_values`` and -f'(r) into slopes when ``want_slopes``. "linear" writes the dot
    products a_i.a_j into values (on the diagonal, a_i.a_i = ||a_i||^2 is the kernel value itself);
    "delta" writes [a_i0 == a_j0], reading the labels of the column block from its panel's first row.
    """
    kernel, params, a, a_sq, panels = side
    i0, i1, j0, j1 = _tile_bounds(row_block, col_block, a.shape[0])
    rows = i1 - i0
    cols = j1 - j0
    if kernel == _LINEAR:
        _tile_matmul(a[i0:i1], rows, a.shape[1], panels[col_block], cols, values)
    elif kernel == _DELTA:
        one = values.dtype.type(1)
        zero = values.dtype.type(0)
        labels = panels[col_block, 0]
        for i in range(rows):
            label = a[i0 + i, 0]
            row = values[i]
            for j in range(cols):
                row[j] = one if labels[j] == label else zero
    else:
        _distance_tile(a[i0:i1], a_sq[i0:i1], panels[col_block], a_sq[j0:j1], row_block == col_block, dist)
        if want_values and want_slopes:
            _radial_profile(dist, rows, cols, kernel, params, False, values, slopes)
        elif want_slopes:
            _radial_profile(dist, rows, cols, kernel, params, True, slopes)
        else:
            _radial_profile(dist, rows, cols, kernel, params, False, values)


@_jit(fastmath=_REDUCE_FLAGS)
def _mask_diagonal(tile, rows):
    """``tile[i, i] = 0`` for i < rows: the pairs (i, i) of a diagonal tile, masked rather than cancelled."""
    for i in range(rows):
        tile[i, i] = tile.dtype.type(0)


@_jit(fastmath=_REDUCE_FLAGS)
def _reduce_tile(k_tile, l_tile, rows, cols, row_k, row_l, col_k, col_l, mirrored, col_k_acc, col_l_acc):
    """Add one tile's row (and, if mirrored, column) sums of K and L to float64 accumulators; return sum K L.

    k_tile, l_tile: ``[>= rows, >= cols]``; row_k, row_l: float64 ``[rows]`` accumulators of the row
    block; col_k, col_l: float64 ``[cols]`` accumulators of the column block, updated only for a
    mirrored (off-diagonal) tile, whose columns stand for the pairs (j, i); col_k_acc, col_l_acc:
    ``[BLOCK]`` scratch of the tile dtype. Partials of at most BLOCK terms are summed in the tile dtype,
    everything beyond in float64.
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
    if mirrored:
        for j in range(cols):
            col_k[j] += np.float64(col_k_acc[j])
            col_l[j] += np.float64(col_l_acc[j])
    return tile_sum


@_jit(fastmath=_REDUCE_FLAGS)
def _forward_tile(x_side, y_side, row_block, col_block, exclude_diagonal, row_k, row_l, scratch):
    """Add one tile's row and column sums to row_k, row_l (float64 ``[n]``); return its share of the pair sum.

    An off-diagonal tile counts twice in the pair sum: it stands for its mirror image. x_side, y_side:
    the samples' tuples (see `_kernel_tile`); scratch: the tuple of `_sums`.
    """
    dist, k_tile, l_tile, col_k_acc, col_l_acc = scratch
    i0, i1, j0, j1 = _tile_bounds(row_block, col_block, row_k.shape[0])
    diagonal = row_block == col_block
    _kernel_tile(x_side, row_block, col_block, dist, k_tile, k_tile, True, False)
    _kernel_tile(y_side, row_block, col_block, dist, l_tile, l_tile, True, False)
    if diagonal and exclude_diagonal:
        _mask_diagonal(k_tile, i1 - i0)
        _mask_diagonal(l_tile, i1 - i0)
    tile_sum = _reduce_tile(k_tile, l_tile, i1 - i0, j1 - j0, row_k[i0:i1], row_l[i0:i1], row_k[j0:j1],
                            row_l[j0:j1], not diagonal, col_k_acc, col_l_acc)
    return tile_sum if diagonal else 2.0 * tile_sum


@_jit(parallel=True, fastmath=_REDUCE_FLAGS)
def _sums(x, y, kernel_x, params_x, kernel_y, params_y, exclude_diagonal, n_groups):
    """``(pair_sum, row_k [n], row_l [n])`` in float64; x: ``[n, p]``, y: ``[n, q]``, params float64.

    The row blocks form ``n_groups`` groups; each step of `_step_groups` runs its tasks in parallel, a
    task taking every tile between its two groups (`_task_tiles`), so it alone writes their row sums.
    """
    n = x.shape[0]
    dtype = x.dtype
    n_blocks = -(-n // _BLOCK)
    x_side = (kernel_x, params_x.astype(dtype), x, _squared_norms(x), _column_panels(x))
    y_side = (kernel_y, params_y.astype(dtype), y, _squared_norms(y), _column_panels(y))
    row_k = np.zeros(n)
    row_l = np.zeros(n)
    # One float64 partial per row block (written only by the task owning the block in a step), summed in
    # a fixed order at the end.
    block_pair_sums = np.zeros(n_blocks)
    for step in range(_n_steps(n_groups)):
        for task in prange(_step_tasks(step, n_groups)):
            tiles = _task_tiles(step, np.int64(task), n_groups, n_blocks)
            # Per-task scratch, reused by all its tiles: distances, K, L, column partials of K and L.
            scratch = (np.empty((_BLOCK, _BLOCK), dtype), np.empty((_BLOCK, _BLOCK), dtype),
                       np.empty((_BLOCK, _BLOCK), dtype), np.empty(_BLOCK, dtype), np.empty(_BLOCK, dtype))
            for tile in range(tiles.shape[0]):
                row_block = tiles[tile, 0]
                block_pair_sums[row_block] += _forward_tile(x_side, y_side, row_block, tiles[tile, 1],
                                                            exclude_diagonal, row_k, row_l, scratch)
    pair_sum = 0.0
    for block in range(n_blocks):
        pair_sum += block_pair_sums[block]
    return pair_sum, row_k, row_l


@_jit(fastmath=_REDUCE_FLAGS)
def _radial_weights(partner_values, coeff, centre, offsets_rows, offsets_cols, rows, cols, diagonal, weights,
                    row_sums, col_sums):
    """Pair weights of one tile for a radial side, in place, with their row and column sums.

    ``weights[i, j] *= W_ij``, ``W_ij = coeff * (partner_values[i, j] - centre) + offsets_rows[i] +
    offsets_cols[j]`` = dF/dK_ij + dF/dK_ji, with partner_values the other kernel's tile, coeff = 2 c1
    and the recentred offsets of `_grads`; weights holds the slopes -f'(r_ij) on entry. On a diagonal
    tile the i == j weight is set to 0: its term is (a_i - a_i) times the weight, exactly 0, so it is
    masked rather than cancelled. row_sums ``[rows]`` and col_sums ``[cols]`` receive the sums of the
    weights (in the same pass). All arrays in the tile dtype, ``[:rows, :cols]`` of the tiles used.
    """
    zero = weights.dtype.type(0)
    for j in range(cols):
        col_sums[j] = zero
    for i in range(rows):
        offset = offsets_rows[i]
        p_row = partner_values[i]
        w_row = weights[i]
        for j in range(cols):
            w_row[j] *= coeff * (p_row[j] - centre) + offset + offsets_cols[j]
        if diagonal:
            w_row[i] = zero
        row_sum = zero
        for j in range(cols):
            row_sum += w_row[j]
            col_sums[j] += w_row[j]
        row_sums[i] = row_sum


@_jit(fastmath=_REDUCE_FLAGS)
def _add_partners(partners, scale, grad):
    """``grad += scale * partners[:rows]`` in float64.

    grad: float64 ``[rows, d]``; partners: ``[>= rows, d]``, any layout (a transposed view included).
    """
    for i in range(grad.shape[0]):
        for k in range(grad.shape[1]):
            grad[i, k] += scale * np.float64(partners[i, k])


@_jit(fastmath=_FMA_FLAGS)
def _partner_sums(weights, rows, cols, a_rows, a_cols, mirrored, partners, partners_t):
    """``partners[:rows] = V @ a_cols`` and, if mirrored, ``partners_t[:, :cols] = a_rows^T V`` (V = weights).

    weights: ``[BLOCK, BLOCK]``, V in ``[:rows, :cols]``; a_rows: ``[rows, d]``, a_cols: ``[cols, d]``; partners:
    ``[BLOCK, d]``, partners_t: ``[ceil(d / 4) * 4, BLOCK]``. The products of the column side are formed
    transposed so that they run along the tile's BLOCK-wide rows instead of the d-wide rows of a. Full
    tiles pass BLOCK as a constant: the copy of `tile_matmul` inlined there has its loop bounds known at
    compile time, which halves the time of these narrow products (same operations, same order).
    """
    d = a_cols.shape[1]
    if rows == _BLOCK and cols == _BLOCK:
        _tile_matmul(weights, _BLOCK, _BLOCK, a_cols, d, partners)
        if mirrored:
            _tile_matmul(a_rows.T, d, _BLOCK, weights, _BLOCK, partners_t)
    else:
        _tile_matmul(weights, rows, cols, a_cols, d, partners)
        if mirrored:
            _tile_matmul(a_rows.T, d, rows, weights, cols, partners_t)


@_jit(fastmath=_REDUCE_FLAGS)
def _tile_gradient(side, partner_values, slopes, weighting, pair_coeff, row_block, col_block, grad, partners,
                   partners_t, row_sums, col_sums):
    """Add one tile's contribution to the float64 gradient ``grad [n, d]`` of one sample (x or y).

    side: the sample's tuple (see `_kernel_tile`); partner_values: the other kernel's tile (diagonal
    already masked when excluded); slopes: this kernel's -f'(r) tile (radial only), overwritten with the
    pair weights; weighting: ``(offsets [n], centre)`` of the radial pair weights in the tile dtype (see
    `_grads`); pair_coeff: 2 c1; scratch:
    partners ``[BLOCK, d]``, partners_t ``[ceil(d / 4) * 4, BLOCK]``, row_sums and col_sums ``[BLOCK]``.

    With V the pair weights, row a of the row block gets ``-2 (a_a sum_j V_aj - sum_j V_aj a_j)``,
    V = W * slope (radial), or ``2 c1 sum_j L_aj a_j`` (linear; `_linear_offset_gradient` adds the
    offsets' part). An off-diagonal tile also gives every row b of the column block its sum over the
    tile's rows (V_ab = V_ba), from the transposed partner sums of `_partner_sums`.
    """
    kernel, _, a, _, _ = side
    i0, i1, j0, j1 = _tile_bounds(row_block, col_block, a.shape[0])
    rows = i1 - i0
    cols = j1 - j0
    diagonal = row_block == col_block
    radial = kernel != _LINEAR
    if radial:
        offsets, centre = weighting
        _radial_weights(partner_values, slopes.dtype.type(pair_coeff), centre, offsets[i0:i1], offsets[j0:j1],
                        rows, cols, diagonal, slopes, row_sums, col_sums)
        weights = slopes
        scale = -2.0
    else:
        weights = partner_values
        scale = pair_coeff
    _partner_sums(weights, rows, cols, a[i0:i1], a[j0:j1], not diagonal, partners, partners_t)
    if radial:
        _accumulate_gradient(a[i0:i1], row_sums, partners, scale, grad[i0:i1])
    else:
        _add_partners(partners, scale, grad[i0:i1])
    if not diagonal:
        if radial:
            _accumulate_gradient(a[j0:j1], col_sums, partners_t.T, scale, grad[j0:j1])
        else:
            _add_partners(partners_t.T, scale, grad[j0:j1])


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


@_jit(fastmath=_REDUCE_FLAGS)
def _backward_tile(x_side, y_side, row_block, col_block, exclude_diagonal, x_weighting, y_weighting, pair_coeff,
                   gx, gy, scratch):
    """Add one tile's contributions to gx ``[n, p]`` and (unless labels) gy ``[n, q]``, float64.

    x_weighting, y_weighting: each side's radial pair weighting (see `_grads`); pair_coeff: 2 c1;
    scratch: the tuple of `_grads`.
    """
    (dist, k_values, k_slopes, l_values, l_slopes, partners_x, partners_x_t, partners_y, partners_y_t, row_sums,
     col_sums) = scratch
    radial_x = x_side[0] != _LINEAR
    radial_y = y_side[0] == _RBF or y_side[0] == _IMQ
    with_gy = y_side[0] != _DELTA
    # The values of one kernel weight the gradient of the other side, its slopes (radial) its own side:
    # labels need no K values, and a linear x with labels y no K tile at all.
    if radial_x or with_gy:
        _kernel_tile(x_side, row_block, col_block, dist, k_values, k_slopes, with_gy, radial_x)
    _kernel_tile(y_side, row_block, col_block, dist, l_values, l_slopes, True, radial_y)
    if row_block == col_block and exclude_diagonal:
        i0, i1, _, _ = _tile_bounds(row_block, col_block, x_side[2].shape[0])
        _mask_diagonal(k_values, i1 - i0)
        _mask_diagonal(l_values, i1 - i0)
    _tile_gradient(x_side, l_values, k_slopes, x_weighting, pair_coeff, row_block, col_block, gx, partners_x,
                   partners_x_t, row_sums, col_sums)
    if with_gy:
        _tile_gradient(y_side, k_values, l_slopes, y_weighting, pair_coeff, row_block, col_block, gy,
                       partners_y, partners_y_t, row_sums, col_sums)


@_jit(parallel=True, fastmath=_REDUCE_FLAGS)
def _grads(x, y, kernel_x, params_x, kernel_y, params_y, exclude_diagonal, row_k, row_l, c1, c2, c3, n_groups):
    """Float64 gradients ``(gx [n, p], gy [n, q])`` of F (module docstring); gy stays 0 for "delta".

    Scheduled like `_sums`: within a step, each task alone writes the gradient rows of its two groups.
    """
    n, p = x.shape
    q = y.shape[1]
    dtype = x.dtype
    n_blocks = -(-n // _BLOCK)
    x_side = (kernel_x, params_x.astype(dtype), x, _squared_norms(x), _column_panels(x))
    y_side = (kernel_y, params_y.astype(dtype), y, _squared_norms(y), _column_panels(y))
    # W_ij = 2 c1 L_ij + c2 (row_l[i] + row_l[j]) + 2 c3 sum(row_l) = 2 c1 L_ij + o_i + o_j: the constant
    # split evenly between the row and the column offset, formed in float64 (likewise for y, with K).
    offsets_x = c2 * row_l + c3 * row_l.sum()
    offsets_y = c2 * row_k + c3 * row_k.sum()
    # Radial tiles form W in the tile dtype as 2 c1 (L_ij - m) + (o_i + c1 m) + (o_j + c1 m), m the mean of
    # L. With the estimators' coefficients the offsets nearly cancel 2 c1 L_ij (that is HSIC's centring):
    # rounded as they are, they would cost eps |o| per pair, several times eps |W|, and the same error
    # for every pair of a row. Recentred, every term has the size of W.
    mean_l = row_l.sum() / (n * n)
    mean_k = row_k.sum() / (n * n)
    x_weighting = ((offsets_x + c1 * mean_l).astype(dtype), dtype.type(mean_l))
    y_weighting = ((offsets_y + c1 * mean_k).astype(dtype), dtype.type(mean_k))
    pair_coeff = 2.0 * c1
    gx = np.zeros((n, p))
    gy = np.zeros((n, q))
    for step in range(_n_steps(n_groups)):
        for task in prange(_step_tasks(step, n_groups)):
            tiles = _task_tiles(step, np.int64(task), n_groups, n_blocks)
            # Per-task scratch, reused by all its tiles: distances, K values and slopes, L values and
            # slopes, the partner sums of x and y (plain and transposed), row and column weight sums.
            scratch = (np.empty((_BLOCK, _BLOCK), dtype), np.empty((_BLOCK, _BLOCK), dtype),
                       np.empty((_BLOCK, _BLOCK), dtype), np.empty((_BLOCK, _BLOCK), dtype),
                       np.empty((_BLOCK, _BLOCK), dtype), np.empty((_BLOCK, p), dtype),
                       np.empty((-(-p // _ROW_GROUP) * _ROW_GROUP, _BLOCK), dtype), np.empty((_BLOCK, q), dtype),
                       np.empty((-(-q // _ROW_GROUP) * _ROW_GROUP, _BLOCK), dtype), np.empty(_BLOCK, dtype),
                       np.empty(_BLOCK, dtype))
            for tile in range(tiles.shape[0]):
                _backward_tile(x_side, y_side, tiles[tile, 0], tiles[tile, 1], exclude_diagonal, x_weighting,
                               y_weighting, pair_coeff, gx, gy, scratch)
    if kernel_x == _LINEAR:
        _linear_offset_gradient(x, offsets_x, exclude_diagonal, gx)
    if kernel_y == _LINEAR:
        _linear_offset_gradient(y, offsets_y, exclude_diagonal, gy)
    return gx, gy


def _group_count(n):
    """Scheduling groups for n samples (at most one per row block).

    Every round of the schedule has n_groups // 2 tasks of equal size (pairs of groups), so
    ``2 * _TASKS_PER_THREAD`` groups per thread give every thread the same number of tasks per round.
    Fewer, larger groups mean fewer synchronisation points (one per step), which matters when the
    cores are shared with other work: a thread descheduled at a step holds up all the others. The
    grouping fixes the order of the float64 accumulations: results are reproducible for a given thread
    count and differ in the last bits between thread counts.
    """
    n_blocks = -(-n // _BLOCK)
    return min(n_blocks, 2 * _TASKS_PER_THREAD * numba.get_num_threads())


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
    pair_sum, row_k, row_l = _sums(*arrays, bool(exclude_diagonal), _group_count(x.shape[0]))
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
                    float(c1), float(c2), float(c3), _group_count(n))
    return torch.from_numpy(gx.astype(arrays[0].dtype)), torch.from_numpy(gy.astype(arrays[1].dtype))
