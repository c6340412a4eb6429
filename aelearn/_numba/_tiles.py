"""Tile building blocks shared by the numba pair-sum kernels (MMD, HSIC): packed column panels, a
register-blocked tile product, squared-distance tiles, the radial kernel profiles evaluated on them,
and the float64 gradient accumulation of a tile.

A tile is ``BLOCK x BLOCK`` pairs: rows from a block of one sample, columns from a block of another
(or the same) sample. Arithmetic inside a tile runs in the input dtype; callers reduce each tile's
results to float64 before combining tiles.
"""

import numpy as np

from aelearn._numba._common import FMA_FLAGS, REDUCE_FLAGS, exp_nonpositive, jit

__all__ = [
    "BLOCK",
    "ROW_GROUP",
    "RBF",
    "IMQ",
    "tile_matmul",
    "distance_tile",
    "radial_profile",
    "squared_norms",
    "column_panels",
    "weight_row_sums",
    "accumulate_gradient",
]

# Integer codes of the radial kernels inside jitted code.
RBF = 0
IMQ = 1

# Rows and columns per tile. 64 x 64 keeps the transposed column block (d x 64) and the tile itself in
# L1/L2 for the usual feature sizes and still gives every thread many tasks for n in the thousands.
BLOCK = 64
# Rows of the left operand that `tile_matmul` streams together; buffers it writes are padded to it.
ROW_GROUP = 4


@jit(fastmath=FMA_FLAGS)
def tile_matmul(a, rows, depth, b, width, out):
    """``out[:rows, :width] = a[:rows, :depth] @ b[:depth, :width]`` for one tile.

    a: ``[>= rows, >= depth]``, any layout (read as scalars only); b: C-contiguous
    ``[>= depth, >= width]``; out: C-contiguous ``[>= ceil(rows / 4) * 4, >= width]``.

    Register blocking without intrinsics: four rows of ``a`` against four rows of ``b`` per step, so each
    vector of ``out`` is loaded and stored once per four FMAs (instead of once per FMA, which would make
    the loop store-bound) and each loaded vector of ``b`` feeds four rows. The innermost loop runs over
    ``width``, contiguous in ``b`` and ``out``, and vectorises; each output is still summed in depth
    order. A final partial group of rows re-reads the last row of ``a`` and writes its surplus results
    into padding rows of ``out``, which keeps one branch-free code path.
    """
    last = rows - 1
    zero = out.dtype.type(0)
    for i0 in range(0, rows, ROW_GROUP):
        i1 = min(i0 + 1, last)
        i2 = min(i0 + 2, last)
        i3 = min(i0 + 3, last)
        for w in range(width):
            out[i0, w] = zero
            out[i0 + 1, w] = zero
            out[i0 + 2, w] = zero
            out[i0 + 3, w] = zero
        k = 0
        while k + 4 <= depth:
            a00, a01, a02, a03 = a[i0, k], a[i0, k + 1], a[i0, k + 2], a[i0, k + 3]
            a10, a11, a12, a13 = a[i1, k], a[i1, k + 1], a[i1, k + 2], a[i1, k + 3]
            a20, a21, a22, a23 = a[i2, k], a[i2, k + 1], a[i2, k + 2], a[i2, k + 3]
            a30, a31, a32, a33 = a[i3, k], a[i3, k + 1], a[i3, k + 2], a[i3, k + 3]
            for w in range(width):
                v0 = b[k, w]
                v1 = b[k + 1, w]
                v2 = b[k + 2, w]
                v3 = b[k + 3, w]
                out[i0, w] = out[i0, w] + a00 * v0 + a01 * v1 + a02 * v2 + a03 * v3
                out[i0 + 1, w] = out[i0 + 1, w] + a10 * v0 + a11 * v1 + a12 * v2 + a13 * v3
                out[i0 + 2, w] = out[i0 + 2, w] + a20 * v0 + a21 * v1 + a22 * v2 + a23 * v3
                out[i0 + 3, w] = out[i0 + 3, w] + a30 * v0 + a31 * v1 + a32 * v2 + a33 * v3
            k += 4
        while k < depth:
            a0, a1, a2, a3 = a[i0, k], a[i1, k], a[i2, k], a[i3, k]
            for w in range(width):
                v = b[k, w]
                out[i0, w] += a0 * v
                out[i0 + 1, w] += a1 * v
                out[i0 + 2, w] += a2 * v
                out[i0 + 3, w] += a3 * v
            k += 1


@jit(fastmath=REDUCE_FLAGS)
def distance_tile(a, a_sq, z_panel, z_sq, diagonal, dist):
    """Squared distances of one tile: ``dist[i, j] = max(||a_i||^2 + ||z_j||^2 - 2 a_i.z_j, 0)``.

    a: ``[rows, d]``, a block of one sample; a_sq: ``[rows]``; z_panel: ``[d, BLOCK]``, the column block
    transposed (see `column_panels`); z_sq: ``[cols]``; dist:
    ``[>= ceil(rows / 4) * 4, >= cols]``, result in ``dist[:rows, :cols]``. ``diagonal`` marks a
    diagonal tile of a within-sample sum (a is the z block); there ``dist[i, i]`` is set to exactly 0
    instead of the expansion's rounding noise of order eps ||a_i||^2. The clamp at 0 removes the
    negative values that the same cancellation produces for near-duplicate points.
    """
    rows, d = a.shape
    cols = z_sq.shape[0]
    zero = dist.dtype.type(0)
    tile_matmul(a, rows, d, z_panel, cols, dist)
    for i in range(rows):
        ai = a_sq[i]
        for j in range(cols):
            r = ai + z_sq[j] - (dist[i, j] + dist[i, j])
            # Written so that NaN (from non-finite inputs) propagates instead of becoming 0.
            dist[i, j] = zero if r < zero else r
        if diagonal:
            dist[i, i] = zero


@jit(fastmath=REDUCE_FLAGS)
def radial_profile(dist, rows, cols, kernel, params, derivative, out, slopes=None):
    """Sum over bandwidths of the radial profile f(r), or of -f'(r), over one tile of squared distances.

    dist: ``[>= rows, >= cols]``; params: ``[n_params]`` in the tile dtype; out: ``[>= rows, >= cols]``.
      rbf: f(r) = sum_s exp(-g_s r),     -f'(r) = sum_s g_s exp(-g_s r)
      imq: f(r) = sum_s c_s / (c_s + r), -f'(r) = sum_s c_s / (c_s + r)^2
    ``out`` gets -f' when ``derivative``, else f. With ``slopes`` (``[>= rows, >= cols]``) given,
    ``out`` gets f and ``slopes`` gets -f' from the same exp / division per term (``derivative`` is then
    ignored). Leave slopes out rather than passing None: numba prunes the ``slopes is None`` branches
    only for the omitted default, and an explicit None fails to type.
    All bandwidths reuse the one distance tile. The bandwidth loop sits outside the column loop so that
    the innermost loop is a plain vectorisable stream over one row.
    """
    zero = out.dtype.type(0)
    one = out.dtype.type(1)
    for i in range(rows):
        r_row = dist[i]
        o_row = out[i]
        for j in range(cols):
            o_row[j] = zero
        if slopes is not None:
            s_row = slopes[i]
            for j in range(cols):
                s_row[j] = zero
        for s in range(params.shape[0]):
            p = params[s]
            if kernel == RBF:
                if slopes is not None:
                    for j in range(cols):
                        e = exp_nonpositive(-(p * r_row[j]))
                        o_row[j] += e
                        s_row[j] += p * e
                elif derivative:
                    for j in range(cols):
                        o_row[j] += p * exp_nonpositive(-(p * r_row[j]))
                else:
                    for j in range(cols):
                        o_row[j] += exp_nonpositive(-(p * r_row[j]))
            elif slopes is not None:
                for j in range(cols):
                    # f = c t and -f' = c t^2 = f t with t = 1 / (c + r): one division for both.
                    t = one / (p + r_row[j])
                    f = p * t
                    o_row[j] += f
                    s_row[j] += f * t
            elif derivative:
                for j in range(cols):
                    q = p + r_row[j]
                    o_row[j] += p / (q * q)
            else:
                for j in range(cols):
                    o_row[j] += p / (p + r_row[j])


@jit(fastmath=REDUCE_FLAGS)
def squared_norms(a):
    """``||a_i||^2`` for a: ``[rows, d]``, accumulated in float64, returned ``[rows]`` in the dtype of a."""
    out = np.empty(a.shape[0], a.dtype)
    for i in range(a.shape[0]):
        acc = 0.0
        for k in range(a.shape[1]):
            v = np.float64(a[i, k])
            acc += v * v
        out[i] = acc
    return out


@jit(fastmath=REDUCE_FLAGS)
def column_panels(a):
    """Pack a: ``[rows, d]`` into panels ``[n_blocks, d, BLOCK]``, ``out[b, k, j] = a[b * BLOCK + j, k]``.

    The distance product of a tile needs its column block transposed. Packing every block once into a
    contiguous ``d x BLOCK`` panel keeps the tile's operand in a few pages and spread over all cache
    sets; slicing one big transposed copy instead would put its rows a power-of-two stride apart (for
    n = 4096: 16 KiB), all in the same L1 set, and triple the tile time. n_blocks = ceil(rows / BLOCK);
    padding columns are 0.
    """
    rows, d = a.shape
    n_panels = -(-rows // BLOCK)
    out = np.zeros((n_panels, d, BLOCK), a.dtype)
    for i in range(rows):
        panel = out[i // BLOCK]
        col = i % BLOCK
        for k in range(d):
            panel[k, col] = a[i, k]
    return out


@jit(fastmath=REDUCE_FLAGS)
def weight_row_sums(weights, rows, cols, row_sums):
    """``row_sums[i] = sum_j weights[i, j]`` over ``weights[:rows, :cols]``, in the tile dtype."""
    for i in range(rows):
        acc = weights.dtype.type(0)
        for j in range(cols):
            acc += weights[i, j]
        row_sums[i] = acc


@jit(fastmath=REDUCE_FLAGS)
def accumulate_gradient(points, weight_sums, weighted_partners, scale, grad):
    """``grad[i] += scale * (weight_sums[i] * points[i] - weighted_partners[i])``, in float64.

    points: ``[rows, d]``; weight_sums: ``[>= rows]``; weighted_partners: ``[>= rows, d]``; grad: float64
    ``[rows, d]``. Combining the two terms per tile in float64 keeps their partial cancellation out of
    the tile dtype.
    """
    for i in range(points.shape[0]):
        wsum = np.float64(weight_sums[i])
        for k in range(points.shape[1]):
            grad[i, k] += scale * (wsum * np.float64(points[i, k]) - np.float64(weighted_partners[i, k]))
