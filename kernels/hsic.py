"""Triton backend of the HSIC op: tiled sums of K*L and row sums of K and L, and their gradients.

Two launchers implement the backend contract of the HSIC op family (``csrc/hsic.cpp``), with
K_ij = k_x(x_i, x_j), L_ij = k_y(y_i, y_j) and P the ordered pairs (i, j), less i == j when
``exclude_diagonal``:

* ``hsic_sums(x, y, kernel_x, params_x, kernel_y, params_y, exclude_diagonal)`` returns float64
  (pair_sum = sum_P K_ij L_ij, row_k_i = sum_{j: (i,j) in P} K_ij, row_l likewise).
* ``hsic_grads(..., exclude_diagonal, row_k, row_l, c1, c2, c3)`` returns (gx, gy) in the input
  dtype, the gradients of
  F = c1 sum_P K_ij L_ij + c2 sum_i row_k_i row_l_i + c3 (sum_i row_k_i)(sum_i row_l_i).

kernel_x is ``rbf``, ``imq`` or ``linear``; kernel_y also ``delta`` (y[:, 0] holds integer label
ids, compared exactly; no gradient: gy = 0).

Algorithm. A program owns one block of rows and walks a range of column blocks; on each
[BLOCK, BLOCK] tile of pairs it evaluates both kernels (``kernel_tile`` of ``_common.py``:
squared distances by ``tl.dot``, any p and q), so no n x n matrix is ever formed. Forward: the
tile's K*L, K and L are summed along its rows. Backward: with the weights of the pairs
  dF/dK_aj + dF/dK_ja = 2 c1 L_aj + u_a + u_j,   u = c2 row_l + c3 sum(row_l),
(and the same for L with K and v = c2 row_k + c3 sum(row_k)), the tile G = weights * slopes gives
gx_a = x_a * sum_j G_aj - sum_j G_aj x_j (rbf/imq; linear: -sum_j G_aj x_j), and gy alike. Both
gradients come from one pass, since each needs both kernels' tiles.
To give the GPU enough programs when there are few row blocks, the column blocks are split into
contiguous ranges, one per program along the last grid axis; every program writes its own float64
partial rows and the host adds them up, so no atomics are needed and the result does not depend
on scheduling. Symmetry (K and L are symmetric) is not used: visiting each unordered pair once
would scatter column sums and gradient rows into other programs' rows (atomics, and results that
depend on their order); every program owns its output rows instead.

Numerics (see also ``_common.py``: full-precision float32 dots, diagonal by masking with r := 0
exactly when included, float64 gradient accumulators).
* Tile sums are taken in the input dtype (BLOCK terms per row) and accumulated across tiles in
  float64; the split partials are added in float64 on the host.
* The per-sample weights u, v are formed in float64 on the host, the pair weights of a tile in
  the input dtype.
* A linear kernel's gradient takes only the 2 c1 part of the weights from the tiles: its
  per-sample part sum_j (u_a + u_j) x_j = u_a sum_j x_j + sum_j u_j x_j is formed on the host in
  float64. With centred x it cancels almost exactly, and u can be large against 2 c1 L (c3 sum(L)
  grows as n^2 c3), so float32 tiles would leave ~1e-4 relative errors in the gradient.

Supported: float32 and float64, any n >= 1, p >= 1, q >= 1; O(n (p + q)) extra memory.
"""

import torch
import triton
import triton.language as tl

from ._common import (
    DELTA,
    KERNEL_IDS,
    LINEAR,
    accumulate_gradient_tile,
    check_dtype_and_device,
    check_kernel,
    kernel_tile,
    on_device,
    params_tensor,
    row_sq_norms,
    split_ranges,
    store_gradient,
    tile_config,
)

_X_KERNELS = ("rbf", "imq", "linear")
_Y_KERNELS = ("rbf", "imq", "linear", "delta")


@triton.jit
def _program_rows(
    x_ptr,
    y_ptr,
    n,
    p,
    q,
    row_block,
    split,
    blocks_per_split,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The rows a program owns, their squared norms in x and y, and its column blocks [first, last)."""
    rows = row_block * BLOCK + tl.arange(0, BLOCK)
    x_norms = row_sq_norms(x_ptr, rows, n, p, BLOCK, BLOCK_K)
    y_norms = row_sq_norms(y_ptr, rows, n, q, BLOCK, BLOCK_K)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(n, BLOCK))
    return rows, x_norms, y_norms, first, last


@triton.jit
def _kernel_tiles(
    x_ptr,
    y_ptr,
    params_x_ptr,
    params_y_ptr,
    rows,
    cols,
    x_norms,  # [BLOCK] ||x_rows||^2
    y_norms,  # [BLOCK] ||y_rows||^2
    n,
    p,
    q,
    KERNEL_X: tl.constexpr,
    NUM_PARAMS_X: tl.constexpr,
    KERNEL_Y: tl.constexpr,
    NUM_PARAMS_Y: tl.constexpr,
    EXCLUDE_DIAGONAL: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(K, K slopes, L, L slopes) on the tile rows x cols, each [BLOCK, BLOCK], 0 outside P."""
    k, k_slopes = kernel_tile(
        x_ptr, x_ptr, params_x_ptr, rows, cols, x_norms, n, n, p,
        KERNEL_X, NUM_PARAMS_X, True, EXCLUDE_DIAGONAL, BLOCK, BLOCK_K,
    )
    l, l_slopes = kernel_tile(
        y_ptr, y_ptr, params_y_ptr, rows, cols, y_norms, n, n, q,
        KERNEL_Y, NUM_PARAMS_Y, True, EXCLUDE_DIAGONAL, BLOCK, BLOCK_K,
    )
    return k, k_slopes, l, l_slopes


@triton.jit
def _pair_weights(
    tile_pair_weight,  # [BLOCK, BLOCK] 2 c1
    other,  # [BLOCK, BLOCK] the other kernel's tile (L for the gradient of x, K for y)
    weights_rows,  # [BLOCK] per-sample weights of the rows, input dtype
    weights_ptr,  # [n] fp64 per-sample weights
    cols,
    n,
    KERNEL: tl.constexpr,
):
    """dF/dK_aj + dF/dK_ja = 2 c1 L_aj + u_a + u_j on a tile (K and L swapped for y).

    For a linear kernel the per-sample part u_a + u_j is left out: its gradient terms
    sum_j (u_a + u_j) x_j factor into O(n p) sums that the host forms in float64 (with centred x
    they cancel almost exactly, which float32 tile sums would not resolve).
    """
    if KERNEL == LINEAR:
        weights = tile_pair_weight * other
    else:
        weights_cols = tl.load(weights_ptr + cols, mask=cols < n, other=0.0).to(weights_rows.dtype)
        weights = tile_pair_weight * other + (weights_rows[:, None] + weights_cols[None, :])
    return weights


@triton.jit
def _hsic_fwd_kernel(
    x_ptr,  # [n, p] fp32/fp64
    y_ptr,  # [n, q] same dtype
    params_x_ptr,  # [max(NUM_PARAMS_X, 1)] same dtype
    params_y_ptr,  # [max(NUM_PARAMS_Y, 1)] same dtype
    partial_ptr,  # [3, num_splits, n] fp64: row sums of K*L, of K and of L per split
    n,
    p,
    q,
    blocks_per_split,
    KERNEL_X: tl.constexpr,
    NUM_PARAMS_X: tl.constexpr,
    KERNEL_Y: tl.constexpr,
    NUM_PARAMS_Y: tl.constexpr,
    EXCLUDE_DIAGONAL: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Row sums of K*L, K and L for row block program_id(0) over column split program_id(1)."""
    pid_s = tl.program_id(1)
    rows, x_norms, y_norms, first, last = _program_rows(
        x_ptr, y_ptr, n, p, q, tl.program_id(0), pid_s, blocks_per_split, BLOCK, BLOCK_K
    )
    pair_sums = tl.zeros((BLOCK,), dtype=tl.float64)
    k_sums = tl.zeros((BLOCK,), dtype=tl.float64)
    l_sums = tl.zeros((BLOCK,), dtype=tl.float64)
    for col_block in range(first, last):
        k, _, l, _ = _kernel_tiles(
            x_ptr, y_ptr, params_x_ptr, params_y_ptr, rows, col_block * BLOCK + tl.arange(0, BLOCK),
            x_norms, y_norms, n, p, q, KERNEL_X, NUM_PARAMS_X, KERNEL_Y, NUM_PARAMS_Y, EXCLUDE_DIAGONAL, BLOCK, BLOCK_K,
        )
        # Within the tile in the input dtype, across tiles in float64.
        pair_sums += tl.sum(k * l, axis=1).to(tl.float64)
        k_sums += tl.sum(k, axis=1).to(tl.float64)
        l_sums += tl.sum(l, axis=1).to(tl.float64)

    split_stride = tl.num_programs(1).to(tl.int64) * n
    offsets = pid_s.to(tl.int64) * n + rows
    in_range = rows < n
    tl.store(partial_ptr + offsets, pair_sums, mask=in_range)
    tl.store(partial_ptr + split_stride + offsets, k_sums, mask=in_range)
    tl.store(partial_ptr + 2 * split_stride + offsets, l_sums, mask=in_range)


@triton.jit
def _hsic_bwd_kernel(
    x_ptr,  # [n, p] fp32/fp64
    y_ptr,  # [n, q] same dtype
    params_x_ptr,  # [max(NUM_PARAMS_X, 1)] same dtype
    params_y_ptr,  # [max(NUM_PARAMS_Y, 1)] same dtype
    weights_x_ptr,  # [n] fp64: u = c2 row_l + c3 sum(row_l), per-sample weights of the K pairs
    weights_y_ptr,  # [n] fp64: v = c2 row_k + c3 sum(row_k), per-sample weights of the L pairs
    gx_partial_ptr,  # [num_splits, n, p] fp64
    gy_partial_ptr,  # [num_splits, n, q] fp64 (unused for delta)
    n,
    p,
    q,
    pair_weight: tl.float64,  # 2 c1, the weight of L_aj in dF/dK_aj + dF/dK_ja (and of K_aj for L)
    blocks_per_split,
    KERNEL_X: tl.constexpr,
    NUM_PARAMS_X: tl.constexpr,
    KERNEL_Y: tl.constexpr,
    NUM_PARAMS_Y: tl.constexpr,
    EXCLUDE_DIAGONAL: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """Gradient rows of x and y for row block program_id(0), feature chunk program_id(1) (of x
    where it is < p, of y where it is < q) and column split program_id(2)."""
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows, x_norms, y_norms, first, last = _program_rows(
        x_ptr, y_ptr, n, p, q, tl.program_id(0), pid_s, blocks_per_split, BLOCK, BLOCK_K
    )
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dtype = x_ptr.dtype.element_ty
    grad_x_here = pid_d * BLOCK_DO < p
    grad_y_here = pid_d * BLOCK_DO < q
    # tl.full, not a cast: the interpreter would first round a Python float to float32.
    tile_pair_weight = tl.full((BLOCK, BLOCK), pair_weight, dtype)
    u_rows = tl.load(weights_x_ptr + rows, mask=rows < n, other=0.0).to(dtype)
    v_rows = tl.load(weights_y_ptr + rows, mask=rows < n, other=0.0).to(dtype)

    acc_x = tl.zeros((BLOCK, BLOCK_DO), dtype=tl.float64)
    g_row_sums_x = tl.zeros((BLOCK,), dtype=tl.float64)
    acc_y = tl.zeros((BLOCK, BLOCK_DO), dtype=tl.float64)
    g_row_sums_y = tl.zeros((BLOCK,), dtype=tl.float64)
    for col_block in range(first, last):
        cols = col_block * BLOCK + tl.arange(0, BLOCK)
        k, k_slopes, l, l_slopes = _kernel_tiles(
            x_ptr, y_ptr, params_x_ptr, params_y_ptr, rows, cols,
            x_norms, y_norms, n, p, q, KERNEL_X, NUM_PARAMS_X, KERNEL_Y, NUM_PARAMS_Y, EXCLUDE_DIAGONAL, BLOCK, BLOCK_K,
        )
        # Slopes are 0 outside P (and on the diagonal for rbf/imq), so the weights need no mask.
        if grad_x_here:
            weights = _pair_weights(tile_pair_weight, l, u_rows, weights_x_ptr, cols, n, KERNEL_X)
            acc_x, g_row_sums_x = accumulate_gradient_tile(
                acc_x, g_row_sums_x, weights * k_slopes, x_ptr, cols, offs_do, n, p, 1.0, KERNEL_X
            )
        if KERNEL_Y != DELTA:
            if grad_y_here:
                weights = _pair_weights(tile_pair_weight, k, v_rows, weights_y_ptr, cols, n, KERNEL_Y)
                acc_y, g_row_sums_y = accumulate_gradient_tile(
                    acc_y, g_row_sums_y, weights * l_slopes, y_ptr, cols, offs_do, n, q, 1.0, KERNEL_Y
                )

    if grad_x_here:
        store_gradient(gx_partial_ptr + pid_s.to(tl.int64) * n * p, x_ptr, rows, offs_do, n, p, acc_x, g_row_sums_x)
    if KERNEL_Y != DELTA:
        if grad_y_here:
            store_gradient(
                gy_partial_ptr + pid_s.to(tl.int64) * n * q, y_ptr, rows, offs_do, n, q, acc_y, g_row_sums_y
            )


# Tile configs (BLOCK, BLOCK_K[, BLOCK_DO], num_warps) for the GPU, chosen from sm_90 register
# reports (ptxas, no GPU run) as the ones that spill least: two kernel tiles are live at once, the
# float32 "ieee" dots hold their operand slices in registers, and the backward carries two
# float64 gradient accumulators; 64-row float32 tiles spill. tl.dot needs every tile side >= 16.
_FWD_CONFIGS = {torch.float32: (32, 16, 4), torch.float64: (32, 16, 4)}
_BWD_CONFIGS = {torch.float32: (32, 16, 32, 4), torch.float64: (16, 16, 32, 2)}
# Under the CPU interpreter (device "cpu") 16-wide tiles keep tests fast and make tiny shapes
# span several row, column and feature blocks.
_INTERPRETER_FWD_CONFIG = (16, 16, 1)
_INTERPRETER_BWD_CONFIG = (16, 16, 16, 1)


def _check(x, y, kernel_x, params_x, kernel_y, params_y):
    """Validates the arguments; returns contiguous x, y and both params as tuples of floats."""
    params_x = check_kernel(kernel_x, params_x, _X_KERNELS, "kernel_x")
    params_y = check_kernel(kernel_y, params_y, _Y_KERNELS, "kernel_y")
    check_dtype_and_device(x, y)
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x [n, p] and y [n, q] expected, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.numel() == 0 or y.numel() == 0:
        raise ValueError(f"n, p and q must be at least 1, got {tuple(x.shape)} and {tuple(y.shape)}")
    return x.contiguous(), y.contiguous(), params_x, params_y


def _check_row_sums(row_sums, name, x):
    """row_k / row_l: float64 [n] on x's device; returns it contiguous."""
    if row_sums.dtype != torch.float64 or row_sums.shape != (x.shape[0],) or row_sums.device != x.device:
        raise ValueError(
            f"{name} must be a float64 [{x.shape[0]}] tensor on {x.device}, "
            f"got {row_sums.dtype} {tuple(row_sums.shape)} on {row_sums.device}"
        )
    return row_sums.contiguous()


def _launch_kwargs(kernel_x, params_x, kernel_y, params_y, exclude_diagonal):
    """The compile-time arguments shared by both kernels."""
    return dict(
        KERNEL_X=KERNEL_IDS[kernel_x], NUM_PARAMS_X=len(params_x),
        KERNEL_Y=KERNEL_IDS[kernel_y], NUM_PARAMS_Y=len(params_y),
        EXCLUDE_DIAGONAL=bool(exclude_diagonal),
    )


def hsic_sums(x, y, kernel_x, params_x, kernel_y, params_y, exclude_diagonal):
    """Sum of K*L over the pairs and the row sums of K and L.

    Args:
        x: [n, p] float32/float64 tensor on the device.
        y: [n, q] same dtype and device ([n, 1] label ids for "delta").
        kernel_x: "rbf", "imq" or "linear"; kernel_y: also "delta".
        params_x, params_y: sequences of floats (gamma_s for rbf, c_s for imq, empty otherwise).
        exclude_diagonal: leave the pairs (i, i) out.

    Returns:
        (pair_sum [], row_k [n], row_l [n]), float64 tensors on x.device.
    """
    x, y, params_x, params_y = _check(x, y, kernel_x, params_x, kernel_y, params_y)
    n, p = x.shape
    q = y.shape[1]
    block, block_k, num_warps = tile_config(x.device, x.dtype, _FWD_CONFIGS, _INTERPRETER_FWD_CONFIG)
    row_blocks = triton.cdiv(n, block)
    splits, blocks_per_split = split_ranges(row_blocks, row_blocks, x.device)
    partials = torch.empty((3, splits, n), dtype=torch.float64, device=x.device)
    with on_device(x.device):
        _hsic_fwd_kernel[(row_blocks, splits)](
            x, y, params_tensor(params_x, x.device, x.dtype), params_tensor(params_y, x.device, x.dtype),
            partials, n, p, q, blocks_per_split,
            **_launch_kwargs(kernel_x, params_x, kernel_y, params_y, exclude_diagonal),
            BLOCK=block, BLOCK_K=block_k, num_warps=num_warps,
        )
    return partials[0].sum(), partials[1].sum(dim=0), partials[2].sum(dim=0)


def _gradient(partials, a, kernel, weights, exclude_diagonal):
    """Sums the split partials in float64, adds the per-sample terms of a linear kernel, rounds.

    Linear: sum_{j: (i,j) in P} (w_i + w_j) a_j = w_i sum_j a_j + sum_j w_j a_j, less the j = i
    term 2 w_i a_i when the diagonal is excluded (the kernel leaves these terms out).
    """
    grad = partials.sum(dim=0)
    if kernel == "linear":
        a64 = a.double()
        grad += weights[:, None] * a64.sum(dim=0) + weights @ a64
        if exclude_diagonal:
            grad -= 2.0 * weights[:, None] * a64
    return grad.to(a.dtype)


def hsic_grads(x, y, kernel_x, params_x, kernel_y, params_y, exclude_diagonal, row_k, row_l, c1, c2, c3):
    """Gradients of F = c1 sum_P K_ij L_ij + c2 sum_i row_k_i row_l_i + c3 sum(row_k) sum(row_l).

    Args:
        x, y, kernel_x, params_x, kernel_y, params_y, exclude_diagonal: as for ``hsic_sums``.
        row_k, row_l: float64 [n] row sums of K and L, as ``hsic_sums`` returns them.
        c1, c2, c3: float weights.

    Returns:
        (gx [n, p], gy [n, q]) in the input dtype; gy is zeros for kernel_y "delta".
    """
    x, y, params_x, params_y = _check(x, y, kernel_x, params_x, kernel_y, params_y)
    row_k = _check_row_sums(row_k, "row_k", x)
    row_l = _check_row_sums(row_l, "row_l", x)
    n, p = x.shape
    q = y.shape[1]
    grad_y = kernel_y != "delta"
    c1, c2, c3 = float(c1), float(c2), float(c3)
    # Per-sample parts of the pair weights, in float64 and without a host sync.
    weights_x = c2 * row_l + c3 * row_l.sum()
    weights_y = c2 * row_k + c3 * row_k.sum()

    block, block_k, block_do, num_warps = tile_config(x.device, x.dtype, _BWD_CONFIGS, _INTERPRETER_BWD_CONFIG)
    out_dim = max(p, q) if grad_y else p
    # No wider feature chunk than the features need (p = q = 16 would waste half of a 32-wide
    # chunk's G @ x work on padding); tl.dot takes no side below 16.
    block_do = max(16, min(block_do, triton.next_power_of_2(out_dim)))
    row_blocks = triton.cdiv(n, block)
    d_chunks = triton.cdiv(out_dim, block_do)
    splits, blocks_per_split = split_ranges(row_blocks * d_chunks, row_blocks, x.device)
    gx_partials = torch.empty((splits, n, p), dtype=torch.float64, device=x.device)
    gy_partials = torch.empty((splits, n, q), dtype=torch.float64, device=x.device) if grad_y else gx_partials
    with on_device(x.device):
        _hsic_bwd_kernel[(row_blocks, d_chunks, splits)](
            x, y, params_tensor(params_x, x.device, x.dtype), params_tensor(params_y, x.device, x.dtype),
            weights_x, weights_y, gx_partials, gy_partials, n, p, q, 2.0 * c1, blocks_per_split,
            **_launch_kwargs(kernel_x, params_x, kernel_y, params_y, exclude_diagonal),
            BLOCK=block, BLOCK_K=block_k, BLOCK_DO=block_do, num_warps=num_warps,
        )
    gx = _gradient(gx_partials, x, kernel_x, weights_x, exclude_diagonal)
    gy = _gradient(gy_partials, y, kernel_y, weights_y, exclude_diagonal) if grad_y else torch.zeros_like(y)
    return gx, gy
