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
no n x m matrix is ever formed. Tiles of kernel values and slopes come from the shared helpers
of ``_common.py`` (r = ||a||^2 + ||b||^2 - 2 a.b by ``tl.dot``, any d).
To give the GPU enough programs when there are few row blocks, the column blocks are split
into ``num_splits`` contiguous ranges, one per program along grid axis 1 (axis 2 in the
backward); each program writes its own float64 partial and the host adds them up, so no
atomics are needed and the result does not depend on scheduling.

Numerics (see also ``_common.py``: full-precision float32 dots, diagonal by masking, float64
gradient accumulators).
* Kernel values are summed in the input dtype within one tile (at most BLOCK x BLOCK terms) and
  in float64 across tiles; the per-program partials are summed in float64 on the host.
* Diagonal pairs of the within-sample terms are excluded when unbiased, taken with r := 0
  exactly when biased. In the backward pass they are always dropped for rbf/imq (the analytic
  contribution x_i - x_i is 0).

Symmetry. S_xx and S_yy visit only column blocks >= the row block and weight the off-diagonal
blocks by 2 (half the work). The backward pass cannot use symmetry without scattering into
other rows (atomics), so it visits all column blocks.

Supported: float32 and float64 (``tl.dot`` in float64 lowers to DMMA on sm_80/sm_90 and to FMA
elsewhere), any n, m >= 1 and any d >= 1.
"""

import torch
import triton
import triton.language as tl

from ._common import (
    KERNEL_IDS,
    accumulate_gradient_tile,
    check_dtype_and_device,
    check_kernel,
    kernel_tile,
    num_splits,
    on_device,
    params_tensor,
    row_sq_norms,
    store_gradient,
    tile_config,
)

_KERNELS = ("rbf", "imq", "linear")


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
    a_norms = row_sq_norms(a_ptr, rows, n_a, d, BLOCK, BLOCK_K)

    first = pid_s * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(n_b, BLOCK))
    if SAME:
        first = tl.maximum(first, pid_m)

    row_sums = tl.zeros((BLOCK,), dtype=tl.float64)
    for col_block in range(first, last):
        cols = col_block * BLOCK + tl.arange(0, BLOCK)
        k, _ = kernel_tile(
            a_ptr, b_ptr, params_ptr, rows, cols, a_norms, n_a, n_b, d,
            KERNEL, NUM_PARAMS, SAME, UNBIASED, BLOCK, BLOCK_K,
        )
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
    """Adds column blocks [first, last) of z to (acc, g_row_sums), with the slopes G of
    ``kernel_tile`` so that x_i * rowsum(G) - G @ z = sum_j d k(x_i, z_j)/d x_i (linear: -G @ z).

    Within-sample diagonal pairs are dropped for rbf/imq (zero contribution) and for an
    unbiased linear kernel; a biased linear kernel keeps them (d ||x_i||^2 / dx_i = 2 x_i).
    """
    for col_block in range(first, last):
        cols = col_block * BLOCK + tl.arange(0, BLOCK)
        _, g = kernel_tile(
            a_ptr, z_ptr, params_ptr, rows, cols, a_norms, n_a, n_z, d,
            KERNEL, NUM_PARAMS, SAME, UNBIASED, BLOCK, BLOCK_K,
        )
        acc, g_row_sums = accumulate_gradient_tile(acc, g_row_sums, g, z_ptr, cols, offs_do, n_z, d, coeff, KERNEL)
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
    a_norms = row_sq_norms(a_ptr, rows, n_a, d, BLOCK, BLOCK_K)

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

    store_gradient(partial_ptr + pid_s.to(tl.int64) * n_a * d, a_ptr, rows, offs_do, n_a, d, acc, g_row_sums)


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


def _check(x, y, kernel, params):
    """Validates the arguments; returns contiguous x, y and params as a tuple of floats."""
    params = check_kernel(kernel, params, _KERNELS)
    check_dtype_and_device(x, y)
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x [n, d] and y [m, d] expected, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.numel() == 0 or y.numel() == 0:
        raise ValueError(f"n, m and d must be at least 1, got {tuple(x.shape)} and {tuple(y.shape)}")
    return x.contiguous(), y.contiguous(), params


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
    block, block_k, num_warps = tile_config(x.device, x.dtype, _FWD_CONFIGS, _INTERPRETER_FWD_CONFIG)
    params_t = params_tensor(params, x.device, x.dtype)

    tasks = ((x, x, True), (y, y, True), (x, y, False))
    grids = []
    for a, b, _ in tasks:
        row_blocks, col_blocks = triton.cdiv(a.shape[0], block), triton.cdiv(b.shape[0], block)
        splits = num_splits(row_blocks, col_blocks, x.device)
        grids.append((row_blocks, splits, triton.cdiv(col_blocks, splits)))
    # One row of float64 partials per sum; unused tail entries stay 0.
    partials = torch.zeros((3, max(g[0] * g[1] for g in grids)), dtype=torch.float64, device=x.device)
    with on_device(x.device):
        for task, ((a, b, same), (row_blocks, splits, blocks_per_split)) in enumerate(zip(tasks, grids)):
            _mmd_fwd_kernel[(row_blocks, splits)](
                a, b, params_t, partials[task], a.shape[0], b.shape[0], d, blocks_per_split,
                KERNEL=KERNEL_IDS[kernel], NUM_PARAMS=len(params), SAME=same, UNBIASED=bool(unbiased),
                BLOCK=block, BLOCK_K=block_k, num_warps=num_warps,
            )
    return partials.sum(dim=1)


def _grad_rows(a, b, kernel, params, params_t, unbiased, coeff_same, coeff_cross):
    """coeff_same * d(sum_ij k(a_i, a_j))/da + coeff_cross * d(sum_ij k(a_i, b_j))/da, [n_a, d]."""
    n_a, d = a.shape
    block, block_k, block_do, num_warps = tile_config(a.device, a.dtype, _BWD_CONFIGS, _INTERPRETER_BWD_CONFIG)
    same_blocks = triton.cdiv(n_a, block) if coeff_same != 0.0 else 0
    cross_blocks = triton.cdiv(b.shape[0], block) if coeff_cross != 0.0 else 0
    row_blocks, d_chunks = triton.cdiv(n_a, block), triton.cdiv(d, block_do)
    splits = num_splits(row_blocks * d_chunks, max(same_blocks + cross_blocks, 1), a.device)
    partials = torch.empty((splits, n_a, d), dtype=torch.float64, device=a.device)
    _mmd_bwd_kernel[(row_blocks, d_chunks, splits)](
        a, b, params_t, partials, n_a, b.shape[0], d,
        2.0 * coeff_same, coeff_cross, same_blocks, cross_blocks,
        triton.cdiv(same_blocks + cross_blocks, splits),
        KERNEL=KERNEL_IDS[kernel], NUM_PARAMS=len(params), UNBIASED=bool(unbiased),
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
    params_t = params_tensor(params, x.device, x.dtype)
    with on_device(x.device):
        gx = _grad_rows(x, y, kernel, params, params_t, unbiased, float(coeff_xx), float(coeff_xy))
        gy = _grad_rows(y, x, kernel, params, params_t, unbiased, float(coeff_yy), float(coeff_xy))
    return gx, gy
