"""Triton backend of the MMD op: tiled kernel sums and their gradients.

Two launchers implement the backend contract of the MMD op family:

* ``mmd_sums(x, y, kernel, params, unbiased)`` returns float64 ``[3]`` = (S_xx, S_yy, S_xy),
  the sums of k over ordered pairs of x with x, y with y and x with y (diagonal pairs left
  out of S_xx / S_yy when ``unbiased``, included with r = 0 exactly otherwise).
* ``mmd_grads(x, y, kernel, params, unbiased, coeff_xx, coeff_yy, coeff_xy)`` returns
  ``gx = coeff_xx dS_xx/dx + coeff_xy dS_xy/dx`` and ``gy = coeff_yy dS_yy/dy + coeff_xy dS_xy/dy``
  in the input dtype.

Kernels are ``rbf`` (k = sum_s exp(-params[s] r)), ``imq`` (k = sum_s params[s] / (params[s] + r))
and ``linear`` (k = a.b), with r = ||a - b||^2.

Algorithm. A program owns one block of rows of a and walks a range of column blocks of b;
no n x m matrix is ever formed. Per tile, r = ||a||^2 + ||b||^2 - 2 a.b (clamped at 0), the a.b
part by ``tl.dot`` looping over chunks of the feature dimension, so any d is supported.
To give the GPU enough programs when there are few row blocks, the column blocks are split
into ``num_splits`` contiguous ranges, one per program along grid axis 1 (axis 2 in the
backward); each program writes its own float64 partial and the host adds them up, so no
atomics are needed and the result does not depend on scheduling.

Numerics.
* ``tl.dot`` on float32 defaults to TF32 on tensor cores (10-bit mantissa), whose ~1e-3
  relative error, amplified by the cancellation in ||a||^2 + ||b||^2 - 2 a.b, is far above the
  ~1e-6 the sums need. Every dot therefore uses ``input_precision="ieee"`` (full float32 FMA).
  float64 inputs compute in float64 throughout (``input_precision`` does not apply to them).
* Kernel values are summed in the input dtype within one tile (at most BLOCK x BLOCK terms) and
  in float64 across tiles; the per-program partials are summed in float64 on the host.
* Diagonal pairs of the within-sample terms are handled by masking, never by subtracting:
  excluded when unbiased, r := 0 exactly when biased. In the backward pass they are always
  dropped for rbf/imq (the analytic contribution x_i - x_i is 0).
* Gradient tiles G @ z are computed in the input dtype and accumulated across tiles in
  float64, together with the row sums of G; the final x_i * rowsum(G) - G @ z is formed in
  float64 before rounding to the input dtype.

Symmetry. S_xx and S_yy visit only column blocks >= the row block and weight the off-diagonal
blocks by 2 (half the work). The backward pass cannot use symmetry without scattering into
other rows (atomics), so it visits all column blocks.

Supported: float32 and float64 (``tl.dot`` in float64 lowers to DMMA on sm_80/sm_90 and to FMA
elsewhere), any n, m >= 1 and any d >= 1.
"""

import contextlib
import functools

import torch
import triton
import triton.language as tl

# Kernel ids; constexpr so that the jitted code branches on them at compile time.
RBF: tl.constexpr = tl.constexpr(0)
IMQ: tl.constexpr = tl.constexpr(1)
LINEAR: tl.constexpr = tl.constexpr(2)
_KERNEL_IDS = {"rbf": RBF.value, "imq": IMQ.value, "linear": LINEAR.value}


@triton.jit
def _row_sq_norms(
    ptr,  # [n_rows, d] fp32/fp64
    rows,  # [BLOCK] int32 row indices
    n_rows,
    d,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Squared norms ||ptr[rows]||^2 as a [BLOCK] vector (0 for rows >= n_rows)."""
    offs_k = tl.arange(0, BLOCK_K)
    row_offsets = rows.to(tl.int64)[:, None] * d
    norms = tl.zeros((BLOCK,), dtype=ptr.dtype.element_ty)
    for k0 in range(0, d, BLOCK_K):
        mask = (rows[:, None] < n_rows) & (k0 + offs_k[None, :] < d)
        v = tl.load(ptr + row_offsets + k0 + offs_k[None, :], mask=mask, other=0.0)
        norms += tl.sum(v * v, axis=1)
    return norms


@triton.jit
def _dot_tile(
    a_ptr,  # [n_a, d] fp32/fp64
    b_ptr,  # [n_b, d] same dtype
    rows,  # [BLOCK] int32 rows of a
    cols,  # [BLOCK] int32 rows of b
    n_a,
    n_b,
    d,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Returns (a_rows . b_cols as [BLOCK, BLOCK], ||b_cols||^2 as [BLOCK]); padding reads 0."""
    offs_k = tl.arange(0, BLOCK_K)
    a_offsets = rows.to(tl.int64)[:, None] * d
    b_offsets = cols.to(tl.int64)[:, None] * d
    dots = tl.zeros((BLOCK, BLOCK), dtype=a_ptr.dtype.element_ty)
    b_norms = tl.zeros((BLOCK,), dtype=a_ptr.dtype.element_ty)
    for k0 in range(0, d, BLOCK_K):
        k_in = k0 + offs_k[None, :] < d
        a = tl.load(a_ptr + a_offsets + k0 + offs_k[None, :], mask=(rows[:, None] < n_a) & k_in, other=0.0)
        b = tl.load(b_ptr + b_offsets + k0 + offs_k[None, :], mask=(cols[:, None] < n_b) & k_in, other=0.0)
        # Full-precision float32 FMA instead of the TF32 default: see the module docstring.
        dots = tl.dot(a, tl.trans(b), dots, input_precision="ieee")
        b_norms += tl.sum(b * b, axis=1)
    return dots, b_norms


@triton.jit
def _sq_dists(a_norms, b_norms, dots):
    """r = ||a||^2 + ||b||^2 - 2 a.b, clamped at 0 against rounding below zero."""
    return tl.maximum(a_norms[:, None] + b_norms[None, :] - 2.0 * dots, 0.0)


@triton.jit
def _kernel_values(r, params_ptr, KERNEL: tl.constexpr, NUM_PARAMS: tl.constexpr):
    """f(r) summed over all bandwidths (rbf or imq), from one distance tile."""
    k = tl.zeros(r.shape, dtype=r.dtype)
    for s in tl.static_range(NUM_PARAMS):
        p = tl.load(params_ptr + s)
        if KERNEL == RBF:
            k += tl.exp(-p * r)
        elif KERNEL == IMQ:
            k += p / (p + r)
    return k


@triton.jit
def _kernel_slopes(r, params_ptr, KERNEL: tl.constexpr, NUM_PARAMS: tl.constexpr):
    """g = 2 f'(r) summed over all bandwidths (rbf or imq)."""
    g = tl.zeros(r.shape, dtype=r.dtype)
    for s in tl.static_range(NUM_PARAMS):
        p = tl.load(params_ptr + s)
        if KERNEL == RBF:
            g -= 2.0 * p * tl.exp(-p * r)
        elif KERNEL == IMQ:
            q = p + r
            g -= 2.0 * p / (q * q)
    return g


@triton.jit
def _mmd_fwd_kernel(
    a_ptr,  # [n_a, d] fp32/fp64, row sample
    b_ptr,  # [n_b, d] same dtype, column sample (the same tensor as a_ptr when SAME)
    params_ptr,  # [max(NUM_PARAMS, 1)] same dtype, gamma_s (rbf) or c_s (imq)
    partial_ptr,  # [num_row_blocks * num_splits] fp64, one partial sum per program
    n_a,
    n_b,
    d,
    blocks_per_split,
    KERNEL: tl.constexpr,
    NUM_PARAMS: tl.constexpr,
    SAME: tl.constexpr,
    UNBIASED: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Partial sum of k(a_i, b_j) over row block program_id(0) and column split program_id(1).

    With SAME (a is b) only column blocks >= the row block are visited; off-diagonal blocks
    count twice, the diagonal block (which holds both orders of its pairs) once.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    a_norms = _row_sq_norms(a_ptr, rows, n_a, d, BLOCK, BLOCK_K)

    first = pid_s * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(n_b, BLOCK))
    if SAME:
        first = tl.maximum(first, pid_m)

    row_sums = tl.zeros((BLOCK,), dtype=tl.float64)
    for col_block in range(first, last):
        cols = col_block * BLOCK + tl.arange(0, BLOCK)
        dots, b_norms = _dot_tile(a_ptr, b_ptr, rows, cols, n_a, n_b, d, BLOCK, BLOCK_K)
        keep = (rows[:, None] < n_a) & (cols[None, :] < n_b)
        if SAME:
            on_diagonal = rows[:, None] == cols[None, :]
            if UNBIASED:
                keep = keep & ~on_diagonal
        if KERNEL == LINEAR:
            k = dots
        else:
            r = _sq_dists(a_norms, b_norms, dots)
            if SAME:
                if not UNBIASED:
                    r = tl.where(on_diagonal, 0.0, r)
            k = _kernel_values(r, params_ptr, KERNEL, NUM_PARAMS)
        k = tl.where(keep, k, 0.0)
        # Within the tile in the input dtype, across tiles in float64.
        tile_row_sums = tl.sum(k, axis=1).to(tl.float64)
        if SAME:
            tile_row_sums *= tl.where(col_block == pid_m, 1.0, 2.0).to(tl.float64)
        row_sums += tile_row_sums
    tl.store(partial_ptr + pid_m * tl.num_programs(1) + pid_s, tl.sum(row_sums, axis=0))


@triton.jit
def _grad_accumulate(
    acc,  # [BLOCK, BLOCK_DO] fp64 running sum of coeff * G @ z
    g_row_sums,  # [BLOCK] fp64 running sum of coeff * rowsum(G)
    a_ptr,  # [n_a, d] fp32/fp64, rows the gradient is taken for
    z_ptr,  # [n_z, d] same dtype, partner sample
    params_ptr,  # [max(NUM_PARAMS, 1)] same dtype
    rows,
    a_norms,
    offs_do,  # [BLOCK_DO] output feature columns of this program
    n_a,
    n_z,
    d,
    first,
    last,
    coeff,  # fp64 scalar weight of this partner sample
    KERNEL: tl.constexpr,
    NUM_PARAMS: tl.constexpr,
    SAME: tl.constexpr,
    UNBIASED: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Adds column blocks [first, last) of z to (acc, g_row_sums).

    rbf/imq: G_ij = 2 f'(r_ij), so that x_i * rowsum(G) - G @ z = sum_j d k(x_i, z_j)/d x_i.
    linear:  d k(x_i, z_j)/d x_i = z_j; G_ij = -1 and the row sums stay unused.
    Within-sample diagonal pairs are dropped for rbf/imq (zero contribution) and for an
    unbiased linear kernel; a biased linear kernel keeps them (d ||x_i||^2 / dx_i = 2 x_i).
    """
    for col_block in range(first, last):
        cols = col_block * BLOCK + tl.arange(0, BLOCK)
        dots, z_norms = _dot_tile(a_ptr, z_ptr, rows, cols, n_a, n_z, d, BLOCK, BLOCK_K)
        keep = (rows[:, None] < n_a) & (cols[None, :] < n_z)
        if SAME:
            if KERNEL != LINEAR or UNBIASED:
                keep = keep & (rows[:, None] != cols[None, :])
        if KERNEL == LINEAR:
            g = tl.where(keep, -1.0, 0.0).to(dots.dtype)
        else:
            r = _sq_dists(a_norms, z_norms, dots)
            g = tl.where(keep, _kernel_slopes(r, params_ptr, KERNEL, NUM_PARAMS), 0.0)
            g_row_sums += tl.sum(g, axis=1).to(tl.float64) * coeff
        z_mask = (cols[:, None] < n_z) & (offs_do[None, :] < d)
        z = tl.load(z_ptr + cols.to(tl.int64)[:, None] * d + offs_do[None, :], mask=z_mask, other=0.0)
        acc += tl.dot(g, z, input_precision="ieee").to(tl.float64) * coeff
    return acc, g_row_sums


@triton.jit
def _mmd_bwd_kernel(
    a_ptr,  # [n_a, d] fp32/fp64, sample whose gradient rows are computed
    b_ptr,  # [n_b, d] same dtype, the other sample
    params_ptr,  # [max(NUM_PARAMS, 1)] same dtype
    partial_ptr,  # [num_splits, n_a, d] fp64, per-split gradient partials
    n_a,
    n_b,
    d,
    coeff_same: tl.float64,  # weight of d(sum_ij k(a_i, a_j))/da (already times 2 for symmetry)
    coeff_cross: tl.float64,  # weight of d(sum_ij k(a_i, b_j))/da
    same_blocks,  # column blocks of a to visit (0 when coeff_same == 0)
    cross_blocks,  # column blocks of b to visit (0 when coeff_cross == 0)
    blocks_per_split,
    KERNEL: tl.constexpr,
    NUM_PARAMS: tl.constexpr,
    UNBIASED: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """Gradient rows for row block program_id(0), feature chunk program_id(1), split program_id(2).

    The partner column blocks are the a blocks followed by the b blocks; split s takes blocks
    [s * blocks_per_split, (s + 1) * blocks_per_split) of that sequence.
    """
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    a_norms = _row_sq_norms(a_ptr, rows, n_a, d, BLOCK, BLOCK_K)

    first = pid_s * blocks_per_split
    last = first + blocks_per_split
    acc = tl.zeros((BLOCK, BLOCK_DO), dtype=tl.float64)
    g_row_sums = tl.zeros((BLOCK,), dtype=tl.float64)
    acc, g_row_sums = _grad_accumulate(
        acc, g_row_sums, a_ptr, a_ptr, params_ptr, rows, a_norms, offs_do, n_a, n_a, d,
        first, tl.minimum(last, same_blocks), coeff_same,
        KERNEL, NUM_PARAMS, True, UNBIASED, BLOCK, BLOCK_K,
    )
    acc, g_row_sums = _grad_accumulate(
        acc, g_row_sums, a_ptr, b_ptr, params_ptr, rows, a_norms, offs_do, n_a, n_b, d,
        tl.maximum(first - same_blocks, 0), tl.minimum(last - same_blocks, cross_blocks), coeff_cross,
        KERNEL, NUM_PARAMS, False, UNBIASED, BLOCK, BLOCK_K,
    )

    out_mask = (rows[:, None] < n_a) & (offs_do[None, :] < d)
    out_offsets = rows.to(tl.int64)[:, None] * d + offs_do[None, :]
    a_out = tl.load(a_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float64)
    grad = a_out * g_row_sums[:, None] - acc
    tl.store(partial_ptr + pid_s.to(tl.int64) * n_a * d + out_offsets, grad, mask=out_mask)


# Tile configs (BLOCK, BLOCK_K[, BLOCK_DO], num_warps) for the GPU, chosen from sm_90 register
# reports so that no config spills: the float32 "ieee" dot runs on FMA units and holds its
# operand slices in registers, hence the narrow 16-wide feature chunks; float64 tiles are half
# as wide because each element takes two registers. tl.dot needs every tile side >= 16.
_FWD_CONFIGS = {torch.float32: (64, 16, 8), torch.float64: (32, 16, 8)}
_BWD_CONFIGS = {torch.float32: (64, 16, 32, 8), torch.float64: (32, 16, 32, 4)}
# Under the CPU interpreter (device "cpu") 16-wide tiles keep tests fast and make tiny shapes
# span several row, column and feature blocks.
_INTERPRETER_FWD_CONFIG = (16, 16, 1)
_INTERPRETER_BWD_CONFIG = (16, 16, 16, 1)


def _fwd_config(device, dtype):
    """(BLOCK, BLOCK_K, num_warps) of the forward kernel."""
    return _INTERPRETER_FWD_CONFIG if device.type == "cpu" else _FWD_CONFIGS[dtype]


def _bwd_config(device, dtype):
    """(BLOCK, BLOCK_K, BLOCK_DO, num_warps) of the backward kernel."""
    return _INTERPRETER_BWD_CONFIG if device.type == "cpu" else _BWD_CONFIGS[dtype]


def _target_programs(device):
    """Programs worth launching: 4 per SM on the GPU; a few under the interpreter."""
    if device.type == "cpu":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(num_programs, num_col_blocks, device):
    """Column splits so that num_programs * splits reaches the target, at most one per block."""
    return max(1, min(num_col_blocks, triton.cdiv(_target_programs(device), num_programs)))


@functools.lru_cache(maxsize=64)
def _params_tensor(params, device, dtype):
    """Bandwidths as a device tensor (cached: one host-to-device copy per distinct tuple)."""
    return torch.tensor(params if params else (0.0,), dtype=dtype, device=device)


def _on_device(device):
    """Makes ``device`` current for the launches: Triton launches on the current CUDA device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check(x, y, kernel, params):
    """Validates the arguments; returns contiguous x, y and params as a tuple of floats."""
    if kernel not in _KERNEL_IDS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {sorted(_KERNEL_IDS)}")
    if kernel == "linear" and len(params) != 0:
        raise ValueError("the linear kernel takes no params")
    if kernel != "linear" and len(params) == 0:
        raise ValueError(f"the {kernel} kernel needs at least one param")
    if x.dtype not in (torch.float32, torch.float64) or y.dtype != x.dtype:
        raise ValueError(f"x and y must both be float32 or both float64, got {x.dtype} and {y.dtype}")
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x [n, d] and y [m, d] expected, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.numel() == 0 or y.numel() == 0:
        raise ValueError(f"n, m and d must be at least 1, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"x and y are on different devices ({x.device}, {y.device})")
    return x.contiguous(), y.contiguous(), tuple(float(p) for p in params)


def mmd_sums(x, y, kernel, params, unbiased):
    """Kernel sums (S_xx, S_yy, S_xy).

    Args:
        x: [n, d] float32/float64 tensor on the device.
        y: [m, d] same dtype and device.
        kernel: "rbf", "imq" or "linear".
        params: sequence of floats (gamma_s for rbf, c_s for imq, empty for linear).
        unbiased: leave the diagonal pairs out of S_xx and S_yy.

    Returns:
        [3] float64 tensor on x.device.
    """
    x, y, params = _check(x, y, kernel, params)
    d = x.shape[1]
    block, block_k, num_warps = _fwd_config(x.device, x.dtype)
    params_t = _params_tensor(params, x.device, x.dtype)

    tasks = ((x, x, True), (y, y, True), (x, y, False))
    grids = []
    for a, b, _ in tasks:
        row_blocks, col_blocks = triton.cdiv(a.shape[0], block), triton.cdiv(b.shape[0], block)
        splits = _num_splits(row_blocks, col_blocks, x.device)
        grids.append((row_blocks, splits, triton.cdiv(col_blocks, splits)))
    # One row of float64 partials per sum; unused tail entries stay 0.
    partials = torch.zeros((3, max(g[0] * g[1] for g in grids)), dtype=torch.float64, device=x.device)
    with _on_device(x.device):
        for task, ((a, b, same), (row_blocks, splits, blocks_per_split)) in enumerate(zip(tasks, grids)):
            _mmd_fwd_kernel[(row_blocks, splits)](
                a, b, params_t, partials[task], a.shape[0], b.shape[0], d, blocks_per_split,
                KERNEL=_KERNEL_IDS[kernel], NUM_PARAMS=len(params), SAME=same, UNBIASED=bool(unbiased),
                BLOCK=block, BLOCK_K=block_k, num_warps=num_warps,
            )
    return partials.sum(dim=1)


def _grad_rows(a, b, kernel, params, params_t, unbiased, coeff_same, coeff_cross):
    """coeff_same * d(sum_ij k(a_i, a_j))/da + coeff_cross * d(sum_ij k(a_i, b_j))/da, [n_a, d]."""
    n_a, d = a.shape
    block, block_k, block_do, num_warps = _bwd_config(a.device, a.dtype)
    same_blocks = triton.cdiv(n_a, block) if coeff_same != 0.0 else 0
    cross_blocks = triton.cdiv(b.shape[0], block) if coeff_cross != 0.0 else 0
    row_blocks, d_chunks = triton.cdiv(n_a, block), triton.cdiv(d, block_do)
    splits = _num_splits(row_blocks * d_chunks, max(same_blocks + cross_blocks, 1), a.device)
    partials = torch.empty((splits, n_a, d), dtype=torch.float64, device=a.device)
    _mmd_bwd_kernel[(row_blocks, d_chunks, splits)](
        a, b, params_t, partials, n_a, b.shape[0], d,
        2.0 * coeff_same, coeff_cross, same_blocks, cross_blocks,
        triton.cdiv(same_blocks + cross_blocks, splits),
        KERNEL=_KERNEL_IDS[kernel], NUM_PARAMS=len(params), UNBIASED=bool(unbiased),
        BLOCK=block, BLOCK_K=block_k, BLOCK_DO=block_do, num_warps=num_warps,
    )
    return partials.sum(dim=0).to(a.dtype)


def mmd_grads(x, y, kernel, params, unbiased, coeff_xx, coeff_yy, coeff_xy):
    """Weighted gradients of the kernel sums.

    Args:
        x, y, kernel, params, unbiased: as for ``mmd_sums``.
        coeff_xx, coeff_yy, coeff_xy: float weights of S_xx, S_yy, S_xy.

    Returns:
        (gx [n, d], gy [m, d]) in the input dtype, with
        gx = coeff_xx dS_xx/dx + coeff_xy dS_xy/dx and gy = coeff_yy dS_yy/dy + coeff_xy dS_xy/dy.
    """
    x, y, params = _check(x, y, kernel, params)
    params_t = _params_tensor(params, x.device, x.dtype)
    with _on_device(x.device):
        gx = _grad_rows(x, y, kernel, params, params_t, unbiased, float(coeff_xx), float(coeff_xy))
        gy = _grad_rows(y, x, kernel, params, params_t, unbiased, float(coeff_yy), float(coeff_xy))
    return gx, gy
