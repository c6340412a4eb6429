"""Numba CPU backend of the aggregate-posterior log-density op log q(z) (beta-TCVAE, MWS / MSS).

Two entry points, with the meaning fixed by the backend contract (csrc/log_qz.cpp):

* ``log_qz_forward(z, mu, logvar, group_of_dim, num_groups, log_w_self, log_w_next, log_w_other)``
  -> ``(log_qz [B], log_qz_groups [B, G])``, with
  ``l_ijd = -0.5 (log 2 pi + logvar_jd + (z_id - mu_jd)^2 exp(-logvar_jd))``,
  ``log_qz_i = logsumexp_j (sum_d l_ijd + w_ij)`` and
  ``log_qz_groups_ig = logsumexp_j (sum_{d in g} l_ijd + w_ij)``.
* ``log_qz_backward(..., log_qz, log_qz_groups, grad_log_qz, grad_log_qz_groups)``
  -> ``(grad_z, grad_mu, grad_logvar)``, each ``[B, D]``.

z, mu, logvar are ``[B, D]`` contiguous CPU tensors of one dtype (float32 or float64); group_of_dim
is int64 ``[D]``. Results come back in the input dtype.

How it is evaluated:

* The per-j quantities are precomputed once and packed, block by block, into transposed panels
  ``[n_blocks, D, _BLOCK]``: mu, ``h = -exp(-logvar) / 2`` and ``a = -(log 2 pi + logvar) / 2``, so
  that ``l_ijd = a_jd + h_jd (z_id - mu_jd)^2``. For one row i and one block of columns j, every dim d
  is a contiguous stream over j that vectorises whatever D is; a dim's values are stored into (or,
  for later dims of the same group, added onto) its group's row, so grouping costs no gather and the
  singleton groups (G = D, the default) run the same loop with only stores. Padding columns carry the
  log-weight -inf, which makes their terms vanish in every sum without a mask in the hot loops.
* Log-sum-exps are streamed over column blocks: per block one max, one rescale of the running
  float64 sum, and a vectorised pass of ``exp_nonpositive(value - max)`` summed in the input dtype.
  No ``[B, B]`` matrix exists; the forward's extra memory is O(B D) plus per-task buffers.
* The backward recomputes the values tile by tile from the saved log-sum-exps (FlashAttention style)
  and turns them into ``c_ijd = grad_log_qz_i p_ij + grad_log_qz_groups_ig(d) p^g(d)_ij``. grad_z is a
  sum over j (rows own it), grad_mu and grad_logvar are sums over i (columns own them). Tiles are
  scheduled in rounds along block diagonals: in round r, task k takes row block k and column block
  (k + r) mod n_blocks, so within a round no two tasks share a row block or a column block and each
  tile's probabilities serve all three gradients in one pass, with no per-thread copies of the
  gradients. Each tile's partial sums (input dtype, at most _BLOCK terms) are added into float64
  ``[B, D]`` accumulators.
"""

import math

import numpy as np
import torch
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from aelearn._numba._common import REDUCE_FLAGS as _REDUCE_FLAGS
from aelearn._numba._common import checked_numpy as _checked_numpy
from aelearn._numba._common import exp_nonpositive as _exp_nonpositive
from aelearn._numba._common import jit as _jit

__all__ = ["log_qz_forward", "log_qz_backward"]

# Columns per block, and rows and columns per backward tile. Each streamed log-sum-exp update has a
# fixed cost (a max, a horizontal sum, the state update), so wider blocks pay it over more terms:
# 128 is about 15% faster than 64 (256 helps the forward a little more but leaves fewer tiles to share
# among threads). A block's panels (3 x D x 128 values) and the tile buffers stay in L2. The loops
# over a block's columns always run the full, compile-time width (padding masked by the weights), so
# they vectorise without remainder loops.
_BLOCK = 128
# Rows per parallel task of the forward, which streams every column block past them: enough to reuse
# each block's panels from cache, few enough to give every thread several tasks.
_FORWARD_ROWS = 32
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@intrinsic
def _block_max(typingctx, values):
    """max(values[:_BLOCK]) for a C-contiguous 1-d float32 / float64 array of at least _BLOCK values.

    A loop ``m = max(m, v)`` does not vectorise in numba: LLVM only turns a floating-point max
    recurrence into vector code under a function-wide no-NaNs attribute, which numba never sets, so
    the loop becomes a chain of 63 dependent scalar maxima (about 3 cycles each). This emits one
    vector load and ``llvm.vector.reduce.fmax`` instead, a tree of a few vector maxima. The reduction
    is marked nnan so that it needs no NaN fix-ups; a NaN among the values (only from non-finite
    inputs) still reaches the result through the exp pass that follows.
    """
    if not (isinstance(values, types.Array) and values.ndim == 1 and values.layout == "C"
            and values.dtype in (types.float32, types.float64)):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        element = context.get_value_type(signature.return_type)
        vector = ir.VectorType(element, _BLOCK)
        width = 32 if signature.return_type == types.float32 else 64
        loaded = builder.load(builder.bitcast(array.data, vector.as_pointer()), align=width // 8)
        reduce = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(element, [vector]), f"llvm.vector.reduce.fmax.v{_BLOCK}f{width}")
        return builder.call(reduce, [loaded], fastmath=("nnan",))

    return values.dtype(values), codegen


@_jit(fastmath=_REDUCE_FLAGS)
def _column_panels(z, mu, logvar):
    """Pack the per-j quantities into panels ``[n_blocks, D, _BLOCK]`` of the dtype of z.

    Returns (mu, h, a) panels with ``panel[b, d, k]`` describing column j = b * _BLOCK + k:
    mu_jd, ``h_jd = -exp(-logvar_jd) / 2`` and ``a_jd = -(log 2 pi + logvar_jd) / 2``, computed in
    float64 and rounded once. Padding columns are 0 (finite; their weight -inf removes them).
    """
    rows, dims = mu.shape
    n_blocks = -(-rows // _BLOCK)
    shape = (n_blocks, dims, _BLOCK)
    mu_panels = np.zeros(shape, z.dtype)
    h_panels = np.zeros(shape, z.dtype)
    a_panels = np.zeros(shape, z.dtype)
    for j in range(rows):
        block = j // _BLOCK
        col = j % _BLOCK
        for d in range(dims):
            lv = np.float64(logvar[j, d])
            mu_panels[block, d, col] = mu[j, d]
            h_panels[block, d, col] = -0.5 * math.exp(-lv)
            a_panels[block, d, col] = -_HALF_LOG_2PI - 0.5 * lv
    return mu_panels, h_panels, a_panels


@_jit(fastmath=_REDUCE_FLAGS)
def _weight_row(i, j0, rows, log_w_self, log_w_next, log_w_other, w_row):
    """``w_row[k] = w_{i, j0 + k}`` for one column block; -inf for padding columns (j >= rows).

    w_ij is log_w_self for j == i, else log_w_next for j == (i + 1) mod rows, else log_w_other. The
    self weight is written last, so with rows == 1 (where i + 1 wraps to i) it wins.
    """
    other = w_row.dtype.type(log_w_other)
    padding = w_row.dtype.type(-np.inf)
    cols = min(_BLOCK, rows - j0)
    for k in range(_BLOCK):
        w_row[k] = other if k < cols else padding
    nxt = (i + 1) % rows - j0
    if 0 <= nxt < cols:
        w_row[nxt] = log_w_next
    own = i - j0
    if 0 <= own < cols:
        w_row[own] = log_w_self


@_jit(fastmath=_REDUCE_FLAGS)
def _row_values(z_row, mu_panel, h_panel, a_panel, group_of_dim, first_of_group, w_row, groups, joint):
    """Log-terms of one row i against one column block.

    z_row: ``[D]``; *_panel: ``[D, _BLOCK]`` (see `_column_panels`); first_of_group: ``[D]`` bool,
    true for the first dim of each group; w_row: ``[_BLOCK]``. Writes
    ``groups[g, k] = w_ij + sum_{d in g} l_ijd`` (``[G, _BLOCK]``) and
    ``joint[k] = w_ij + sum_d l_ijd`` (``[_BLOCK]``), for j = j0 + k.
    """
    for k in range(_BLOCK):
        joint[k] = w_row[k]
    for d in range(z_row.shape[0]):
        z_d = z_row[d]
        mu_d = mu_panel[d]
        h_d = h_panel[d]
        a_d = a_panel[d]
        group = groups[group_of_dim[d]]
        if first_of_group[d]:
            for k in range(_BLOCK):
                diff = z_d - mu_d[k]
                term = a_d[k] + h_d[k] * (diff * diff)
                group[k] = w_row[k] + term
                joint[k] += term
        else:
            for k in range(_BLOCK):
                diff = z_d - mu_d[k]
                term = a_d[k] + h_d[k] * (diff * diff)
                group[k] += term
                joint[k] += term


@_jit(fastmath=_REDUCE_FLAGS)
def _logsumexp_update(values, running_max, running_sum):
    """One column block of a streaming log-sum-exp: the new ``(running_max, running_sum)``.

    values: ``[_BLOCK]``; the log-sum-exp so far is ``running_max + log(running_sum)`` (running_max in
    the dtype of values, running_sum float64; -inf and 0 before the first block). The block's terms
    are summed in the dtype of values relative to the new max, so every exp argument is <= 0. A block
    of -inf only (all padding, or terms below the dtype's range) leaves the state unchanged.
    """
    block_max = _block_max(values)
    if block_max == -np.inf:
        return running_max, running_sum
    if block_max > running_max:
        # The running max changes in few blocks (about log(n_blocks) of them for shuffled data), so
        # the scalar exp of the rescale is paid rarely.
        running_sum *= math.exp(np.float64(running_max) - np.float64(block_max))
        running_max = block_max
    block_sum = values.dtype.type(0)
    for k in range(_BLOCK):
        block_sum += _exp_nonpositive(values[k] - running_max)
    return running_max, running_sum + np.float64(block_sum)


@_jit(parallel=True, fastmath=_REDUCE_FLAGS)
def _forward(z, mu, logvar, group_of_dim, first_of_group, num_groups, log_w_self, log_w_next, log_w_other):
    """``(log_qz [B], log_qz_groups [B, G])`` in the dtype of z.

    One parallel task per _FORWARD_ROWS rows; it walks every column block, and for each row keeps
    G + 1 streaming log-sum-exps (the groups, then the joint).
    """
    dtype = z.dtype
    rows = z.shape[0]
    mu_panels, h_panels, a_panels = _column_panels(z, mu, logvar)
    n_blocks = mu_panels.shape[0]
    log_qz = np.empty(rows, dtype)
    log_qz_groups = np.empty((rows, num_groups), dtype)
    for task in prange(-(-rows // _FORWARD_ROWS)):
        # prange indices may be unsigned; mixing them with signed ints would promote to float64.
        i0 = np.int64(task) * _FORWARD_ROWS
        block_rows = min(_FORWARD_ROWS, rows - i0)
        groups = np.empty((num_groups, _BLOCK), dtype)
        joint = np.empty(_BLOCK, dtype)
        w_row = np.empty(_BLOCK, dtype)
        running_max = np.full((block_rows, num_groups + 1), -np.inf, dtype)
        running_sum = np.zeros((block_rows, num_groups + 1))
        for col_block in range(n_blocks):
            j0 = col_block * _BLOCK
            for r in range(block_rows):
                i = i0 + r
                _weight_row(i, j0, rows, log_w_self, log_w_next, log_w_other, w_row)
                _row_values(z[i], mu_panels[col_block], h_panels[col_block], a_panels[col_block],
                            group_of_dim, first_of_group, w_row, groups, joint)
                for g in range(num_groups):
                    running_max[r, g], running_sum[r, g] = _logsumexp_update(
                        groups[g], running_max[r, g], running_sum[r, g])
                running_max[r, num_groups], running_sum[r, num_groups] = _logsumexp_update(
                    joint, running_max[r, num_groups], running_sum[r, num_groups])
        for r in range(block_rows):
            for g in range(num_groups):
                log_qz_groups[i0 + r, g] = np.float64(running_max[r, g]) + math.log(running_sum[r, g])
            log_qz[i0 + r] = np.float64(running_max[r, num_groups]) + math.log(running_sum[r, num_groups])
    return log_qz, log_qz_groups


@_jit(fastmath=_REDUCE_FLAGS)
def _tile_backward(z, i0, j0, mu_panel, h_panel, a_panel, group_of_dim, first_of_group, log_w_self, log_w_next,
                   log_w_other, log_qz, log_qz_groups, grad_log_qz, grad_log_qz_groups, grad_z, grad_mu,
                   grad_logvar):
    """Add one tile's contributions to the float64 gradient accumulators ``[B, D]``.

    The tile is rows ``i0 .. i0 + _BLOCK`` (clipped to B) against the column block starting at j0,
    whose panels are ``[D, _BLOCK]``. With ``e_ijd = h_jd (z_id - mu_jd) = -u_ijd / 2``:
      grad_z[i, d]      += 2 sum_j c_ijd e_ijd                      (summed here over the block's j)
      grad_mu[j, d]     -= 2 sum_i c_ijd e_ijd                      (summed here over the block's i)
      grad_logvar[j, d] -= sum_i c_ijd (e_ijd (z_id - mu_jd) + 1/2)
    The caller guarantees that no other thread touches these rows of grad_z or columns of grad_mu and
    grad_logvar meanwhile.
    """
    dtype = z.dtype
    rows, dims = z.shape
    num_groups = log_qz_groups.shape[1]
    zero = dtype.type(0)
    half = dtype.type(0.5)
    groups = np.empty((num_groups, _BLOCK), dtype)
    joint = np.empty(_BLOCK, dtype)
    w_row = np.empty(_BLOCK, dtype)
    mu_sums = np.zeros((dims, _BLOCK), dtype)
    logvar_sums = np.zeros((dims, _BLOCK), dtype)
    for i in range(i0, min(i0 + _BLOCK, rows)):
        _weight_row(i, j0, rows, log_w_self, log_w_next, log_w_other, w_row)
        _row_values(z[i], mu_panel, h_panel, a_panel, group_of_dim, first_of_group, w_row, groups, joint)
        # joint becomes grad_log_qz_i p_ij, then each group row the coefficient c_ij of its dims.
        # Rounding may put a value a few ulp above its log-sum-exp; the clamp keeps exp's domain.
        grad_joint = grad_log_qz[i]
        log_sum = log_qz[i]
        for k in range(_BLOCK):
            arg = joint[k] - log_sum
            joint[k] = grad_joint * _exp_nonpositive(arg if arg < zero else zero)
        for g in range(num_groups):
            grad_group = grad_log_qz_groups[i, g]
            coeff = groups[g]
            if grad_group == zero:
                for k in range(_BLOCK):
                    coeff[k] = joint[k]
            else:
                log_sum = log_qz_groups[i, g]
                for k in range(_BLOCK):
                    arg = coeff[k] - log_sum
                    coeff[k] = joint[k] + grad_group * _exp_nonpositive(arg if arg < zero else zero)
        z_row = z[i]
        for d in range(dims):
            z_d = z_row[d]
            mu_d = mu_panel[d]
            h_d = h_panel[d]
            coeff = groups[group_of_dim[d]]
            mu_sum = mu_sums[d]
            logvar_sum = logvar_sums[d]
            z_sum = zero
            for k in range(_BLOCK):
                diff = z_d - mu_d[k]
                weighted = coeff[k] * (h_d[k] * diff)
                z_sum += weighted
                mu_sum[k] += weighted
                logvar_sum[k] += weighted * diff + half * coeff[k]
            grad_z[i, d] += 2.0 * np.float64(z_sum)
    for k in range(min(_BLOCK, rows - j0)):
        for d in range(dims):
            grad_mu[j0 + k, d] -= 2.0 * np.float64(mu_sums[d, k])
            grad_logvar[j0 + k, d] -= np.float64(logvar_sums[d, k])


@_jit(parallel=True, fastmath=_REDUCE_FLAGS)
def _backward(z, mu, logvar, group_of_dim, first_of_group, log_w_self, log_w_next, log_w_other, log_qz,
              log_qz_groups, grad_log_qz, grad_log_qz_groups):
    """``(grad_z, grad_mu, grad_logvar)``, each ``[B, D]`` in the dtype of z.

    Rounds along block diagonals (see the module docstring): the tasks of one round own disjoint row
    blocks of grad_z and disjoint column blocks of grad_mu / grad_logvar, and the rounds run one
    after the other, so the float64 accumulators are written without races or per-thread copies.
    """
    rows, dims = z.shape
    mu_panels, h_panels, a_panels = _column_panels(z, mu, logvar)
    n_blocks = mu_panels.shape[0]
    grad_z = np.zeros((rows, dims))
    grad_mu = np.zeros((rows, dims))
    grad_logvar = np.zeros((rows, dims))
    for shift in range(n_blocks):
        for row_block in prange(n_blocks):
            col_block = (np.int64(row_block) + shift) % n_blocks
            _tile_backward(z, np.int64(row_block) * _BLOCK, col_block * _BLOCK, mu_panels[col_block],
                           h_panels[col_block], a_panels[col_block], group_of_dim, first_of_group, log_w_self,
                           log_w_next, log_w_other, log_qz, log_qz_groups, grad_log_qz, grad_log_qz_groups,
                           grad_z, grad_mu, grad_logvar)
    return grad_z.astype(z.dtype), grad_mu.astype(z.dtype), grad_logvar.astype(z.dtype)


def _common_inputs(z, mu, logvar, group_of_dim, num_groups):
    """Checked numpy views of the inputs both passes share, plus the first-dim-of-group flags [D]."""
    if not isinstance(z, torch.Tensor) or z.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"z must be a float32 or float64 tensor, got {getattr(z, 'dtype', type(z).__name__)}")
    za = _checked_numpy(z, "z", (None, None), z.dtype)
    rows, dims = za.shape
    if rows < 1 or dims < 1:
        raise ValueError(f"z must have at least one row and one column, got {list(z.shape)}")
    mua = _checked_numpy(mu, "mu", (rows, dims), z.dtype)
    logvara = _checked_numpy(logvar, "logvar", (rows, dims), z.dtype)
    groupa = _checked_numpy(group_of_dim, "group_of_dim", (dims,), torch.int64)
    num_groups = int(num_groups)
    if groupa.min() < 0 or groupa.max() >= num_groups:
        raise ValueError(f"group_of_dim values must lie in [0, num_groups = {num_groups})")
    first_of_group = np.zeros(dims, np.bool_)
    first_of_group[np.unique(groupa, return_index=True)[1]] = True
    if first_of_group.sum() != num_groups:
        raise ValueError(f"every one of the num_groups = {num_groups} groups needs at least one dim")
    return za, mua, logvara, groupa, first_of_group


def _log_weights(log_w_self, log_w_next, log_w_other):
    """The three log-weights as floats, after checking that they are finite."""
    weights = (float(log_w_self), float(log_w_next), float(log_w_other))
    for name, value in zip(("log_w_self", "log_w_next", "log_w_other"), weights):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    return weights


def log_qz_forward(z, mu, logvar, group_of_dim, num_groups, log_w_self, log_w_next, log_w_other):
    """``(log_qz [B], log_qz_groups [B, G])`` as CPU tensors in the dtype of z.

    z, mu, logvar: ``[B, D]`` contiguous CPU tensors of one dtype (float32 or float64);
    group_of_dim: int64 ``[D]`` with values in [0, num_groups), every group non-empty; the log-weights
    are Python floats (see the module docstring for the definitions).
    """
    za, mua, logvara, groupa, first_of_group = _common_inputs(z, mu, logvar, group_of_dim, num_groups)
    weights = _log_weights(log_w_self, log_w_next, log_w_other)
    log_qz, log_qz_groups = _forward(za, mua, logvara, groupa, first_of_group, int(num_groups), *weights)
    return torch.from_numpy(log_qz), torch.from_numpy(log_qz_groups)


def log_qz_backward(z, mu, logvar, group_of_dim, num_groups, log_w_self, log_w_next, log_w_other, log_qz,
                    log_qz_groups, grad_log_qz, grad_log_qz_groups):
    """``(grad_z, grad_mu, grad_logvar)``, each ``[B, D]`` in the dtype of z.

    The gradients of ``sum_i grad_log_qz_i log_qz_i + sum_ig grad_log_qz_groups_ig log_qz_groups_ig``.
    The first eight arguments are those of `log_qz_forward`; log_qz ``[B]`` and log_qz_groups
    ``[B, G]`` are its outputs, grad_log_qz ``[B]`` and grad_log_qz_groups ``[B, G]`` the upstream
    gradients, all contiguous CPU tensors in the dtype of z.
    """
    za, mua, logvara, groupa, first_of_group = _common_inputs(z, mu, logvar, group_of_dim, num_groups)
    weights = _log_weights(log_w_self, log_w_next, log_w_other)
    rows = za.shape[0]
    num_groups = int(num_groups)
    saved = [
        _checked_numpy(tensor, name, shape, z.dtype)
        for tensor, name, shape in (
            (log_qz, "log_qz", (rows,)),
            (log_qz_groups, "log_qz_groups", (rows, num_groups)),
            (grad_log_qz, "grad_log_qz", (rows,)),
            (grad_log_qz_groups, "grad_log_qz_groups", (rows, num_groups)),
        )
    ]
    grads = _backward(za, mua, logvara, groupa, first_of_group, *weights, *saved)
    return tuple(torch.from_numpy(grad) for grad in grads)
