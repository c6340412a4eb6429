"""Triton backend of the log q(z) op: streaming log-sum-exps of the aggregate posterior and their gradients.

Two launchers implement the backend contract of ``csrc/log_qz.cpp``. With

    l_ijd = -0.5 * (log(2 pi) + logvar_jd + (z_id - mu_jd)^2 * exp(-logvar_jd))
    w_ij  = log_w_self if j == i, log_w_next if j == (i + 1) mod B, else log_w_other,

* ``log_qz_forward`` returns ``log_qz [B]`` = logsumexp_j (sum_d l_ijd + w_ij) and
  ``log_qz_groups [B, G]`` = logsumexp_j (sum_{d in g} l_ijd + w_ij), in the input dtype;
* ``log_qz_backward`` returns ``(grad_z, grad_mu, grad_logvar)``, each ``[B, D]``: the gradients of
  sum_i grad_log_qz_i log_qz_i + sum_ig grad_log_qz_groups_ig log_qz_groups_ig.

Algorithm (FlashAttention style; nothing of size B x B is ever stored).
* Forward: a program owns a block of rows i and walks blocks of components j. Per block it forms the
  tile l[i, j, d] ([BLOCK_I, BLOCK_J, BLOCK_D], all of D at once, padded to a power of two and
  masked), then folds it into online log-sum-exps: one running (max, sum) per row for the joint and
  one per (row, group). A block contributes its maximum first and rescales the running sum once.
* Singleton groups (num_groups == D; every group non-empty means group_of_dim is then a permutation of
  0..D-1) keep the per-group state as a [BLOCK_I, BLOCK_D] tile and store column d to group
  group_of_dim[d]: no group sums at all. Other partitions loop over the groups, summing the dims of
  each by a mask (O(G * D) adds per pair, against O(G) exps: cheap for the few groups of HFVAE-style
  partitions) and keep a [BLOCK_I, BLOCK_G] state updated column by column.
* Backward: p_ij and p^g_ij are recomputed from the saved log-sum-exps (exp(value - log_qz), no
  second log-sum-exp). grad_z is row-owned: one pass over row blocks walking component blocks.
  grad_mu and grad_logvar are column-owned: a second pass over component blocks walking row blocks.
  Each pass writes only rows it owns, so no atomics are needed.
* Few owned blocks (small B) would leave the GPU idle, so the walked blocks are cut into
  ``splits`` contiguous ranges, one program each (grid axis 1), as in FlashDecoding. The forward
  then writes per-split (max, sum) pairs that a small combine kernel merges into the log-sum-exps;
  the backward writes per-split float64 partial gradients that the host adds up. With one split the
  kernels write the final results directly.

Numerics.
* The tile is computed in the input dtype: (z - mu)^2 * exp(-logvar) is formed from the difference
  directly, never expanded as z^2 - 2 z mu + mu^2 (which cancels badly when z is near mu).
* Running maxima are kept in the input dtype, running sums of exponentials in float64: a block sum
  of BLOCK_J terms, each <= 1, is exact enough in float32, but across up to B / BLOCK_J blocks the
  float64 sum keeps the result within ~1e-7 relative for any B.
* The per-component quantities exp(-logvar_jd) and -0.5 (log 2 pi + logvar_jd) are computed once per
  loaded tile, amortised over the BLOCK_I rows that use it (no extra [B, D] buffers).
* Padded components get the log-weight -inf, so every sum over them is -inf and exp of it 0; padded
  dims get exp(-logvar) = 0 and log-normaliser 0, so l = 0 there and the sums over d are unchanged.
  Exponents are masked to -inf *before* exp, so padded rows never overflow.
* Gradients: per tile in the input dtype, across tiles and splits in float64.
* float32 ``tl.exp`` on NVIDIA is ex2.approx of x * log2(e): relative error ~|x| * 6e-8, negligible
  for exp(value - max) since only terms with small |x| carry weight. float64 uses libdevice.

Supported: float32 and float64, any B >= 1, D >= 1 and 1 <= num_groups <= D. group_of_dim is read
as given: the caller guarantees values in [0, num_groups) with every group non-empty.
"""

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

LOG_2PI: tl.constexpr = tl.constexpr(math.log(2.0 * math.pi))
NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))


# ---------------------------------------------------------------------------------------------
# Tile building blocks
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptr, rows, n, offs_d, d):
    """ptr[rows, offs_d] of a contiguous [n, d] tensor as [len(rows), len(offs_d)]; padding reads 0."""
    mask = (rows[:, None] < n) & (offs_d[None, :] < d)
    return tl.load(ptr + rows.to(tl.int64)[:, None] * d + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _component_terms(mu_ptr, logvar_ptr, cols, n, offs_d, d):
    """mu, exp(-logvar) and -0.5 (log 2 pi + logvar) of components ``cols``, each [BLOCK_J, BLOCK_D].

    Padded entries get precision 0 and log-normaliser 0, so that l = 0 there.
    """
    mu = _load_rows(mu_ptr, cols, n, offs_d, d)
    logvar = _load_rows(logvar_ptr, cols, n, offs_d, d)
    valid = (cols[:, None] < n) & (offs_d[None, :] < d)
    precision = tl.where(valid, tl.exp(-logvar), 0.0)
    log_norm = tl.where(valid, -0.5 * (LOG_2PI + logvar), 0.0)
    return mu, precision, log_norm


@triton.jit
def _log_density_tile(z, mu, precision, log_norm):
    """(z_id - mu_jd, u_ijd = (z_id - mu_jd) exp(-logvar_jd), l_ijd), each [BLOCK_I, BLOCK_J, BLOCK_D]."""
    diff = z[:, None, :] - mu[None, :, :]
    u = diff * precision[None, :, :]
    return diff, u, log_norm[None, :, :] - 0.5 * diff * u


@triton.jit
def _log_weights(rows, cols, n, log_w_self, log_w_next, log_w_other):
    """w_ij as [BLOCK_I, BLOCK_J] (self before next, so that B = 1 gets log_w_self)."""
    next_cols = tl.where(rows + 1 == n, 0, rows + 1)
    is_self = cols[None, :] == rows[:, None]
    is_next = cols[None, :] == next_cols[:, None]
    return tl.where(is_self, log_w_self, tl.where(is_next, log_w_next, log_w_other))


@triton.jit
def _online_logsumexp(run_max, run_sum, values):
    """Folds a block of ``values`` (reduced over axis 1) into a running (max, float64 sum of exp(v - max)).

    ``values`` is [BLOCK_I, BLOCK_J] or [BLOCK_I, BLOCK_J, K]; the state has that shape without axis 1.
    Every reduced slice holds a finite value, so the new maximum is finite and a state still at
    (-inf, 0) is rescaled by exp(-inf) = 0.
    """
    new_max = tl.maximum(run_max, tl.max(values, axis=1))
    block_sum = tl.sum(tl.exp(values - tl.expand_dims(new_max, 1)), axis=1)
    rescale = tl.exp(run_max - new_max)
    return new_max, run_sum * rescale.to(tl.float64) + block_sum.to(tl.float64)


@triton.jit
def _group_sum(l, dim_groups, g):
    """sum_{d in group g} l_ijd as [BLOCK_I, BLOCK_J]."""
    return tl.sum(tl.where(dim_groups[None, None, :] == g, l, 0.0), axis=2)


@triton.jit
def _column(tile, offs_g, g):
    """Column g of a [BLOCK_I, BLOCK_G] tile as [BLOCK_I]."""
    return tl.sum(tl.where(offs_g[None, :] == g, tile, 0.0), axis=1)


@triton.jit
def _row_group_terms(ptr, rows, n, group_cols, col_ok, num_groups):
    """ptr[rows, group_cols] of a contiguous [n, num_groups] tensor; padding reads 0."""
    mask = (rows[:, None] < n) & col_ok[None, :]
    return tl.load(ptr + rows.to(tl.int64)[:, None] * num_groups + group_cols[None, :], mask=mask, other=0.0)


@triton.jit
def _group_columns(group_ptr, offs_d, d, num_groups, SINGLETON: tl.constexpr, BLOCK_G: tl.constexpr):
    """(group of each dim [BLOCK_D] (-1 on padding), output group columns, their validity mask).

    Singleton groups: the state column of dim d is group group_of_dim[d]; otherwise column g is group g.
    """
    dim_groups = tl.load(group_ptr + offs_d, mask=offs_d < d, other=-1).to(tl.int32)
    if SINGLETON:
        return dim_groups, dim_groups, offs_d < d
    else:
        offs_g = tl.arange(0, BLOCK_G)
        return dim_groups, offs_g, offs_g < num_groups


@triton.jit
def _pair_coefficients(
    l,  # [BLOCK_I, BLOCK_J, BLOCK_D] l_ijd
    w,  # [BLOCK_I, BLOCK_J] w_ij
    valid,  # [BLOCK_I, BLOCK_J] real (i, j) pairs
    log_qz_rows,  # [BLOCK_I]
    grad_rows,  # [BLOCK_I] grad_log_qz
    log_qz_group_rows,  # [BLOCK_I, BLOCK_D] (singleton, by dim) or [BLOCK_I, BLOCK_G] (by group)
    grad_group_rows,  # same shape, grad_log_qz_groups
    dim_groups,  # [BLOCK_D] int32 group of each dim
    num_groups,
    SINGLETON: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """c_ijd = grad_log_qz_i p_ij + grad_log_qz_groups_{i,g(d)} p^{g(d)}_ij, 0 outside ``valid``."""
    joint = tl.sum(l, axis=2) + w
    p = tl.exp(tl.where(valid, joint - log_qz_rows[:, None], NEG_INF))
    joint_term = (grad_rows[:, None] * p)[:, :, None]
    if SINGLETON:
        exponent = l + w[:, :, None] - log_qz_group_rows[:, None, :]
        p_group = tl.exp(tl.where(valid[:, :, None], exponent, NEG_INF))
        return joint_term + grad_group_rows[:, None, :] * p_group
    else:
        offs_g = tl.arange(0, BLOCK_G)
        group_terms = tl.zeros(l.shape, dtype=l.dtype)
        for g in range(num_groups):
            values = _group_sum(l, dim_groups, g) + w
            exponent = values - _column(log_qz_group_rows, offs_g, g)[:, None]
            p_group = tl.exp(tl.where(valid, exponent, NEG_INF))
            coefficient = _column(grad_group_rows, offs_g, g)[:, None] * p_group
            group_terms += tl.where(dim_groups[None, None, :] == g, coefficient[:, :, None], 0.0)
        return joint_term + group_terms


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _log_qz_fwd_kernel(
    z_ptr,  # [n, d] fp32/fp64
    mu_ptr,  # [n, d] same dtype
    logvar_ptr,  # [n, d] same dtype
    group_ptr,  # [d] int64 group_of_dim
    partial_max_ptr,  # [splits, n, 1 + num_groups] input dtype (unused when FINAL)
    partial_sum_ptr,  # [splits, n, 1 + num_groups] fp64 (unused when FINAL)
    log_qz_ptr,  # [n] input dtype (written when FINAL)
    log_qz_groups_ptr,  # [n, num_groups] input dtype (written when FINAL)
    n,
    d,
    num_groups,
    log_w_ptr,  # [3] input dtype: log_w_self, log_w_next, log_w_other
    blocks_per_split,
    SINGLETON: tl.constexpr,
    FINAL: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Log-sum-exps of row block program_id(0) over the component blocks of split program_id(1).

    FINAL (one split): stores log_qz and log_qz_groups. Otherwise stores the (max, sum) state, joint
    in column 0 and group g in column 1 + g of the split's [n, 1 + num_groups] slice.
    """
    pid_i = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d = tl.arange(0, BLOCK_D)
    z = _load_rows(z_ptr, rows, n, offs_d, d)
    dtype = z.dtype
    w_self, w_next, w_other = tl.load(log_w_ptr), tl.load(log_w_ptr + 1), tl.load(log_w_ptr + 2)
    dim_groups, group_cols, col_ok = _group_columns(group_ptr, offs_d, d, num_groups, SINGLETON, BLOCK_G)

    joint_max = tl.full((BLOCK_I,), NEG_INF, dtype)
    joint_sum = tl.zeros((BLOCK_I,), dtype=tl.float64)
    if SINGLETON:
        group_max = tl.full((BLOCK_I, BLOCK_D), NEG_INF, dtype)
        group_sum = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float64)
    else:
        offs_g = tl.arange(0, BLOCK_G)
        group_max = tl.full((BLOCK_I, BLOCK_G), NEG_INF, dtype)
        group_sum = tl.zeros((BLOCK_I, BLOCK_G), dtype=tl.float64)

    first = pid_s * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(n, BLOCK_J))
    for col_block in range(first, last):
        cols = col_block * BLOCK_J + tl.arange(0, BLOCK_J)
        mu, precision, log_norm = _component_terms(mu_ptr, logvar_ptr, cols, n, offs_d, d)
        _, _, l = _log_density_tile(z, mu, precision, log_norm)
        # -inf on padded components: every value built from w below is -inf there.
        w = tl.where(cols[None, :] < n, _log_weights(rows, cols, n, w_self, w_next, w_other), NEG_INF)
        joint_max, joint_sum = _online_logsumexp(joint_max, joint_sum, tl.sum(l, axis=2) + w)
        if SINGLETON:
            group_max, group_sum = _online_logsumexp(group_max, group_sum, l + w[:, :, None])
        else:
            for g in range(num_groups):
                in_g = offs_g[None, :] == g
                g_max = tl.max(tl.where(in_g, group_max, NEG_INF), axis=1)
                values = _group_sum(l, dim_groups, g) + w
                g_max, g_sum = _online_logsumexp(g_max, _column(group_sum, offs_g, g), values)
                group_max = tl.where(in_g, g_max[:, None], group_max)
                group_sum = tl.where(in_g, g_sum[:, None], group_sum)

    row_ok = rows < n
    group_ok = row_ok[:, None] & col_ok[None, :]
    if FINAL:
        # Padded group columns never saw a value (sum 0): log(1) keeps them finite; they are not stored.
        joint_lse = joint_max.to(tl.float64) + tl.log(joint_sum)
        group_lse = group_max.to(tl.float64) + tl.log(tl.where(group_ok, group_sum, 1.0))
        tl.store(log_qz_ptr + rows, joint_lse, mask=row_ok)
        group_offsets = rows.to(tl.int64)[:, None] * num_groups + group_cols[None, :]
        tl.store(log_qz_groups_ptr + group_offsets, group_lse, mask=group_ok)
    else:
        row_offsets = (pid_s.to(tl.int64) * n + rows) * (1 + num_groups)
        tl.store(partial_max_ptr + row_offsets, joint_max, mask=row_ok)
        tl.store(partial_sum_ptr + row_offsets, joint_sum, mask=row_ok)
        group_offsets = row_offsets[:, None] + 1 + group_cols[None, :]
        tl.store(partial_max_ptr + group_offsets, group_max, mask=group_ok)
        tl.store(partial_sum_ptr + group_offsets, group_sum, mask=group_ok)


@triton.jit
def _log_qz_combine_kernel(
    partial_max_ptr,  # [splits, n * (1 + num_groups)] input dtype
    partial_sum_ptr,  # [splits, n * (1 + num_groups)] fp64
    log_qz_ptr,  # [n] input dtype
    log_qz_groups_ptr,  # [n, num_groups] input dtype
    num_entries,  # n * (1 + num_groups)
    num_groups,
    num_splits,
    BLOCK: tl.constexpr,
):
    """Merges the per-split states (max_s, sum_s) of a block of entries into
    M + log(sum over splits of sum_s exp(max_s - M)), with M the largest max_s."""
    entries = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = entries < num_entries
    # Padding reads max 0, sum 0: finite, and not stored. Pointers step by one split (64-bit arithmetic).
    max_ptrs = partial_max_ptr + entries
    top = tl.load(max_ptrs, mask=ok, other=0.0)
    for _ in range(1, num_splits):
        max_ptrs += num_entries
        top = tl.maximum(top, tl.load(max_ptrs, mask=ok, other=0.0))
    max_ptrs = partial_max_ptr + entries
    sum_ptrs = partial_sum_ptr + entries
    total = tl.zeros((BLOCK,), dtype=tl.float64)
    for _ in range(num_splits):
        split_max = tl.load(max_ptrs, mask=ok, other=0.0)
        split_sum = tl.load(sum_ptrs, mask=ok, other=0.0)
        total += split_sum * tl.exp((split_max - top).to(tl.float64))
        max_ptrs += num_entries
        sum_ptrs += num_entries
    lse = top.to(tl.float64) + tl.log(tl.where(ok, total, 1.0))
    rows = entries // (1 + num_groups)
    cols = entries % (1 + num_groups)
    tl.store(log_qz_ptr + rows, lse, mask=ok & (cols == 0))
    tl.store(log_qz_groups_ptr + rows * num_groups + cols - 1, lse, mask=ok & (cols > 0))


@triton.jit
def _log_qz_bwd_rows_kernel(
    z_ptr,  # [n, d] fp32/fp64
    mu_ptr,  # [n, d]
    logvar_ptr,  # [n, d]
    group_ptr,  # [d] int64
    log_qz_ptr,  # [n]
    log_qz_groups_ptr,  # [n, num_groups]
    grad_log_qz_ptr,  # [n]
    grad_log_qz_groups_ptr,  # [n, num_groups]
    grad_z_ptr,  # [splits, n, d] fp64 partials, or [n, d] input dtype with one split
    n,
    d,
    num_groups,
    log_w_ptr,  # [3] input dtype: log_w_self, log_w_next, log_w_other
    blocks_per_split,
    SINGLETON: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """grad_z[i, d] = -sum_j c_ijd u_ijd for row block program_id(0), components of split program_id(1)."""
    pid_i = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d = tl.arange(0, BLOCK_D)
    z = _load_rows(z_ptr, rows, n, offs_d, d)
    w_self, w_next, w_other = tl.load(log_w_ptr), tl.load(log_w_ptr + 1), tl.load(log_w_ptr + 2)
    dim_groups, group_cols, col_ok = _group_columns(group_ptr, offs_d, d, num_groups, SINGLETON, BLOCK_G)
    row_ok = rows < n
    log_qz_rows = tl.load(log_qz_ptr + rows, mask=row_ok, other=0.0)
    grad_rows = tl.load(grad_log_qz_ptr + rows, mask=row_ok, other=0.0)
    log_qz_group_rows = _row_group_terms(log_qz_groups_ptr, rows, n, group_cols, col_ok, num_groups)
    grad_group_rows = _row_group_terms(grad_log_qz_groups_ptr, rows, n, group_cols, col_ok, num_groups)

    acc = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float64)
    first = pid_s * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(n, BLOCK_J))
    for col_block in range(first, last):
        cols = col_block * BLOCK_J + tl.arange(0, BLOCK_J)
        mu, precision, log_norm = _component_terms(mu_ptr, logvar_ptr, cols, n, offs_d, d)
        _, u, l = _log_density_tile(z, mu, precision, log_norm)
        w = _log_weights(rows, cols, n, w_self, w_next, w_other)
        valid = row_ok[:, None] & (cols[None, :] < n)
        c = _pair_coefficients(
            l, w, valid, log_qz_rows, grad_rows, log_qz_group_rows, grad_group_rows, dim_groups, num_groups,
            SINGLETON, BLOCK_G,
        )
        acc -= tl.sum(c * u, axis=1).to(tl.float64)

    out_offsets = pid_s.to(tl.int64) * n * d + rows.to(tl.int64)[:, None] * d + offs_d[None, :]
    tl.store(grad_z_ptr + out_offsets, acc, mask=row_ok[:, None] & (offs_d[None, :] < d))


@triton.jit
def _log_qz_bwd_cols_kernel(
    z_ptr,  # [n, d] fp32/fp64
    mu_ptr,  # [n, d]
    logvar_ptr,  # [n, d]
    group_ptr,  # [d] int64
    log_qz_ptr,  # [n]
    log_qz_groups_ptr,  # [n, num_groups]
    grad_log_qz_ptr,  # [n]
    grad_log_qz_groups_ptr,  # [n, num_groups]
    grad_mu_ptr,  # [splits, n, d] fp64 partials, or [n, d] input dtype with one split
    grad_logvar_ptr,  # same
    n,
    d,
    num_groups,
    log_w_ptr,  # [3] input dtype: log_w_self, log_w_next, log_w_other
    blocks_per_split,
    SINGLETON: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """grad_mu[j, d] = sum_i c_ijd u_ijd and grad_logvar[j, d] = sum_i c_ijd (diff u - 1) / 2
    for component block program_id(0), row blocks of split program_id(1)."""
    pid_j = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, BLOCK_D)
    mu, precision, log_norm = _component_terms(mu_ptr, logvar_ptr, cols, n, offs_d, d)
    w_self, w_next, w_other = tl.load(log_w_ptr), tl.load(log_w_ptr + 1), tl.load(log_w_ptr + 2)
    dim_groups, group_cols, col_ok = _group_columns(group_ptr, offs_d, d, num_groups, SINGLETON, BLOCK_G)
    col_in = cols < n

    acc_mu = tl.zeros((BLOCK_J, BLOCK_D), dtype=tl.float64)
    acc_logvar = tl.zeros((BLOCK_J, BLOCK_D), dtype=tl.float64)
    first = pid_s * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(n, BLOCK_I))
    for row_block in range(first, last):
        rows = row_block * BLOCK_I + tl.arange(0, BLOCK_I)
        row_ok = rows < n
        z = _load_rows(z_ptr, rows, n, offs_d, d)
        log_qz_rows = tl.load(log_qz_ptr + rows, mask=row_ok, other=0.0)
        grad_rows = tl.load(grad_log_qz_ptr + rows, mask=row_ok, other=0.0)
        log_qz_group_rows = _row_group_terms(log_qz_groups_ptr, rows, n, group_cols, col_ok, num_groups)
        grad_group_rows = _row_group_terms(grad_log_qz_groups_ptr, rows, n, group_cols, col_ok, num_groups)
        diff, u, l = _log_density_tile(z, mu, precision, log_norm)
        w = _log_weights(rows, cols, n, w_self, w_next, w_other)
        valid = row_ok[:, None] & col_in[None, :]
        c = _pair_coefficients(
            l, w, valid, log_qz_rows, grad_rows, log_qz_group_rows, grad_group_rows, dim_groups, num_groups,
            SINGLETON, BLOCK_G,
        )
        cu = c * u
        acc_mu += tl.sum(cu, axis=0).to(tl.float64)
        # c (diff u - 1) / 2 = (cu diff - c) / 2; padded dims give -c / 2 but are not stored.
        acc_logvar += tl.sum(0.5 * (cu * diff - c), axis=0).to(tl.float64)

    out_offsets = pid_s.to(tl.int64) * n * d + cols.to(tl.int64)[:, None] * d + offs_d[None, :]
    out_mask = col_in[:, None] & (offs_d[None, :] < d)
    tl.store(grad_mu_ptr + out_offsets, acc_mu, mask=out_mask)
    tl.store(grad_logvar_ptr + out_offsets, acc_logvar, mask=out_mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

# GPU tiles: about this many [BLOCK_I, BLOCK_J, BLOCK_D] values per program (8 warps: 16 float32 or
# 8 float64 values per thread and live temporary), 16 owned rows (fewer when D > 128, so that the
# [owned, BLOCK_D] state tiles stay in registers). Chosen from sm_90 register reports (AOT
# compilation, D = 32): no spills in any kernel; twice these tiles spill in the backward. Starting
# points to tune on the device.
_GPU_TILE_VALUES = {torch.float32: 4096, torch.float64: 2048}
_GPU_NUM_WARPS = 8
# Under the CPU interpreter (device "cpu"): small blocks, so that the test shapes span several
# owned and walked blocks (and the owned and walked sizes differ, to catch swapped roles).
_INTERPRETER_BLOCKS = (16, 8)
# Combine kernel: entries per program.
_COMBINE_BLOCK = 256


def _blocks(device, dtype, block_d):
    """(owned block, walked block, num_warps): rows i per program and components j per step (forward and
    grad_z pass), or components j per program and rows i per step (grad_mu / grad_logvar pass)."""
    if device.type == "cpu":
        return (*_INTERPRETER_BLOCKS, 1)
    owned = 16 if block_d <= 128 else max(2, 2048 // block_d)
    walked = min(64, max(1, _GPU_TILE_VALUES[dtype] // (owned * block_d)))
    return owned, walked, _GPU_NUM_WARPS


@functools.lru_cache(maxsize=16)
def _programs_wanted(device):
    """Programs that keep the device busy: 4 per SM; a few under the interpreter (to exercise splits)."""
    if device.type == "cpu":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _splits(owned_blocks, walked_blocks, device):
    """(splits, walked blocks per split): contiguous, non-empty ranges of the walked blocks, enough for
    owned_blocks * splits to reach the programs wanted."""
    splits = max(1, min(walked_blocks, triton.cdiv(_programs_wanted(device), owned_blocks)))
    per_split = triton.cdiv(walked_blocks, splits)
    return triton.cdiv(walked_blocks, per_split), per_split


@functools.lru_cache(maxsize=64)
def _log_weights_tensor(log_w_self, log_w_next, log_w_other, device, dtype):
    """[3] device tensor of the log-weights (cached: one host-to-device copy per distinct triple).

    A tensor rather than float64 scalar arguments: the interpreter rounds Python float arguments to
    float32, which would cost float64 inputs ~1e-8.
    """
    return torch.tensor((log_w_self, log_w_next, log_w_other), dtype=dtype, device=device)


def _on_device(device):
    """Makes ``device`` current for the launches: Triton launches on the current CUDA device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _check_inputs(z, mu, logvar, group_of_dim, num_groups):
    """Validates the common arguments; returns contiguous z, mu, logvar, group_of_dim."""
    if z.dtype not in (torch.float32, torch.float64) or mu.dtype != z.dtype or logvar.dtype != z.dtype:
        dtypes = f"{z.dtype}, {mu.dtype}, {logvar.dtype}"
        raise ValueError(f"z, mu, logvar must share dtype float32 or float64, got {dtypes}")
    if z.dim() != 2 or mu.shape != z.shape or logvar.shape != z.shape:
        shapes = f"{tuple(z.shape)}, {tuple(mu.shape)}, {tuple(logvar.shape)}"
        raise ValueError(f"z, mu, logvar must be [B, D] of one shape, got {shapes}")
    if z.numel() == 0:
        raise ValueError(f"B and D must be at least 1, got z of shape {tuple(z.shape)}")
    if group_of_dim.dtype != torch.int64 or group_of_dim.shape != (z.shape[1],):
        got = f"{group_of_dim.dtype} {tuple(group_of_dim.shape)}"
        raise ValueError(f"group_of_dim must be int64 [D] = [{z.shape[1]}], got {got}")
    if not 1 <= num_groups <= z.shape[1]:
        raise ValueError(f"num_groups must be in [1, D] = [1, {z.shape[1]}], got {num_groups}")
    for name, t in (("mu", mu), ("logvar", logvar), ("group_of_dim", group_of_dim)):
        if t.device != z.device:
            raise ValueError(f"{name} is on {t.device}, z on {z.device}")
    return z.contiguous(), mu.contiguous(), logvar.contiguous(), group_of_dim.contiguous()


def _check_row_tensor(name, t, shape, z):
    """Validates a forward output or upstream gradient; returns it contiguous."""
    if t.shape != shape or t.dtype != z.dtype or t.device != z.device:
        raise ValueError(
            f"{name} must be {z.dtype} {tuple(shape)} on {z.device}, "
            f"got {t.dtype} {tuple(t.shape)} on {t.device}"
        )
    return t.contiguous()


def _group_blocks(d, num_groups):
    """(SINGLETON, BLOCK_D, BLOCK_G). num_groups == D with non-empty groups means one dim per group."""
    singleton = num_groups == d
    return singleton, triton.next_power_of_2(d), 1 if singleton else triton.next_power_of_2(num_groups)


def log_qz_forward(z, mu, logvar, group_of_dim, num_groups, log_w_self, log_w_next, log_w_other):
    """log q(z_i) and its per-group marginals by streaming log-sum-exps.

    Args:
        z, mu, logvar: [B, D] float32/float64 tensors on one device.
        group_of_dim: int64 [D], values in [0, num_groups), every group non-empty.
        num_groups: G, 1 <= G <= D.
        log_w_self, log_w_next, log_w_other: floats, the log-weights w_ij.

    Returns:
        (log_qz [B], log_qz_groups [B, G]) in the input dtype.
    """
    z, mu, logvar, group_of_dim = _check_inputs(z, mu, logvar, group_of_dim, num_groups)
    n, d = z.shape
    singleton, block_d, block_g = _group_blocks(d, num_groups)
    block_i, block_j, num_warps = _blocks(z.device, z.dtype, block_d)
    row_blocks = triton.cdiv(n, block_i)
    splits, blocks_per_split = _splits(row_blocks, triton.cdiv(n, block_j), z.device)
    log_qz = torch.empty(n, dtype=z.dtype, device=z.device)
    log_qz_groups = torch.empty((n, num_groups), dtype=z.dtype, device=z.device)
    final = splits == 1
    if final:
        partial_max = partial_sum = log_qz  # not read: the kernel writes the results directly
    else:
        partial_max = torch.empty((splits, n * (1 + num_groups)), dtype=z.dtype, device=z.device)
        partial_sum = torch.empty((splits, n * (1 + num_groups)), dtype=torch.float64, device=z.device)
    log_w = _log_weights_tensor(float(log_w_self), float(log_w_next), float(log_w_other), z.device, z.dtype)
    with _on_device(z.device):
        _log_qz_fwd_kernel[(row_blocks, splits)](
            z, mu, logvar, group_of_dim, partial_max, partial_sum, log_qz, log_qz_groups,
            n, d, num_groups, log_w, blocks_per_split,
            SINGLETON=singleton, FINAL=final, BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_D=block_d,
            BLOCK_G=block_g, num_warps=num_warps,
        )
        if not final:
            num_entries = n * (1 + num_groups)
            _log_qz_combine_kernel[(triton.cdiv(num_entries, _COMBINE_BLOCK),)](
                partial_max, partial_sum, log_qz, log_qz_groups, num_entries, num_groups, splits,
                BLOCK=_COMBINE_BLOCK,
            )
    return log_qz, log_qz_groups


def log_qz_backward(
    z, mu, logvar, group_of_dim, num_groups, log_w_self, log_w_next, log_w_other,
    log_qz, log_qz_groups, grad_log_qz, grad_log_qz_groups,
):
    """Gradients of sum_i grad_log_qz_i log_qz_i + sum_ig grad_log_qz_groups_ig log_qz_groups_ig.

    Args:
        z, mu, logvar, group_of_dim, num_groups, log_w_*: as for ``log_qz_forward``.
        log_qz [B], log_qz_groups [B, G]: the forward's outputs (normalise the softmax weights).
        grad_log_qz [B], grad_log_qz_groups [B, G]: upstream gradients, input dtype.

    Returns:
        (grad_z, grad_mu, grad_logvar), each [B, D] in the input dtype.
    """
    z, mu, logvar, group_of_dim = _check_inputs(z, mu, logvar, group_of_dim, num_groups)
    n, d = z.shape
    saved = (
        _check_row_tensor("log_qz", log_qz, (n,), z),
        _check_row_tensor("log_qz_groups", log_qz_groups, (n, num_groups), z),
        _check_row_tensor("grad_log_qz", grad_log_qz, (n,), z),
        _check_row_tensor("grad_log_qz_groups", grad_log_qz_groups, (n, num_groups), z),
    )
    singleton, block_d, block_g = _group_blocks(d, num_groups)
    owned, walked, num_warps = _blocks(z.device, z.dtype, block_d)
    owned_blocks, walked_blocks = triton.cdiv(n, owned), triton.cdiv(n, walked)
    # Both passes own blocks of the same size and walk blocks of the same size: one split plan.
    splits, blocks_per_split = _splits(owned_blocks, walked_blocks, z.device)

    # With one split the kernels write the results; otherwise float64 per-split partials. One buffer
    # for the three gradients, so that the partials are added up in one reduction.
    shape, out_dtype = ((3, n, d), z.dtype) if splits == 1 else ((3, splits, n, d), torch.float64)
    grads = torch.empty(shape, dtype=out_dtype, device=z.device)
    grad_z, grad_mu, grad_logvar = grads.unbind(0)
    common = (z, mu, logvar, group_of_dim, *saved)
    log_w = _log_weights_tensor(float(log_w_self), float(log_w_next), float(log_w_other), z.device, z.dtype)
    meta = dict(SINGLETON=singleton, BLOCK_D=block_d, BLOCK_G=block_g, num_warps=num_warps)
    with _on_device(z.device):
        _log_qz_bwd_rows_kernel[(owned_blocks, splits)](
            *common, grad_z, n, d, num_groups, log_w, blocks_per_split,
            BLOCK_I=owned, BLOCK_J=walked, **meta,
        )
        _log_qz_bwd_cols_kernel[(owned_blocks, splits)](
            *common, grad_mu, grad_logvar, n, d, num_groups, log_w, blocks_per_split,
            BLOCK_I=walked, BLOCK_J=owned, **meta,
        )
    if splits > 1:
        grads = grads.sum(dim=1).to(z.dtype)
    return tuple(grads.unbind(0))
