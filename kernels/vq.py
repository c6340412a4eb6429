"""Triton backend of the vector-quantisation op: the nearest codebook entry of every row, certified.

One launcher implements the backend contract of ``csrc/vq.cpp``:

* ``vq_nearest(z, codebook)`` with z [N, D] and codebook [K, D] returns ``indices`` int64 [N],
  indices_n = argmin_k d_nk with d_nk = sum_d (z_nd - codebook_kd)^2 evaluated in float64 by
  direct differences (ties to the lowest k), and ``sqdist`` [N] = d_n,indices_n rounded to the
  input dtype.

Algorithm (nothing of size N x K is ever held; O(K D) + O(N) extra memory).
* ``_prepare_codebook_kernel``: the shift s_T (the float64 codebook mean rounded to the input
  dtype), the centred codebook e'_k = fl(e_k - s_T) stored transposed [D_pad, K_pad] and zero
  padded, the half squared norms h_k = ||e'_k||^2 / 2 (summed in float64, rounded; +inf on padded
  codes) and their maximum.
* ``_vq_search_kernel`` (the hot path: a GEMM with an argmin epilogue): a program owns BLOCK_M
  rows of z and walks a contiguous range of code tiles of BLOCK_N codes in increasing order (one
  range per program along grid axis 1: with few row blocks the codes are split so that the GPU
  stays busy). Per tile the dot products z'_n . e'_k come from ``tl.dot`` over chunks of BLOCK_D
  features; the z chunk is centred in registers (z' = fl(z - s_T): no N x D copy of z). The half
  scores h_k - z'_n . e'_k (the row's ||z'_n||^2 / 2 is left out) are folded into a running
  state per row and column slot: the best score, its code and the best score of the slot's other
  codes. A slot is the SLOT adjacent columns that one thread holds in the accumulator layout, so
  the fold is register-local (no cross-thread reduction per tile); the slots are merged once at
  the end. Each program writes its rows' (best, code, second best) for its code range.
* ``_vq_finish_kernel``: merges the code ranges of each row, computes ||z'_n||^2 and the float64
  distance to the winner, certifies it, stores indices and sqdist, and appends the rows it cannot
  certify to a list (one atomic per program reserves their slots).
* ``_vq_exact_kernel`` searches the listed rows again in float64 by direct differences of the
  original inputs. It runs on a fixed grid that strides through the list and reads its length on
  the device: no device-to-host synchronisation (unlike torch.nonzero on a flag), no launch sized
  by N, and the launches can be captured in a CUDA graph. The list order depends on scheduling;
  the results do not.

Numerics (u = 2^-24 for float32, 2^-53 for float64). The shift may be any vector shared by z and
the codes (d_nk is translation invariant); rounding the mean to the input dtype keeps each
centring a single rounding fl(x - s_T) in the input dtype.
* Centring keeps the norms close to the distances, so the cancellation in
  ||z'||^2 + ||e'||^2 - 2 z'.e' stays small for data far from the origin.
* float32 dots use ``input_precision="ieee"`` (full float32 FMA). TF32, the tensor-core default,
  rounds the operands to 11 significant bits: its ~2^-11 relative error would widen the
  certification bound about 8000-fold, sending most rows to the exact fallback, and the bound
  would not even hold, since tensor-core float32 accumulation is not specified to round to nearest.
  float64 dots run in float64 (DMMA on sm_80 / sm_90: IEEE fused multiply-adds).
* Scores are halved (h_k - z'.e' = (||e'||^2 - 2 z'.e') / 2, an exact scaling), which saves one
  operation per (row, code). With A_n = ||z'_n||^2 + 2 max_k h_k and eta the smallest subnormal,
  every half score is within delta_n / 2, delta_n = (2 D + 16) (u A_n + eta), of
  (d_nk - ||z'_n||^2) / 2: the centring roundings cost 2 u A_n, the D-term dot product, the norm
  and the subtraction (D / 2 + 2) u A_n, and products that underflow (D + 2) eta / 2. So
  b2 - b1 > delta_n proves every other code farther than i1 and the row is certified, provided
  A_n <= max / 2 of the input dtype (then no dot, norm or score can overflow). Otherwise (near-ties,
  duplicate codes: b2 = b1, overflow) it goes to the exact fallback.
* Ties: within a slot codes come in increasing order and the best changes only on a strictly
  smaller score; slots are merged by the lowest code among the equal bests and code ranges in
  increasing order with strict comparisons, so equal scores go to the lowest index. The fallback
  does the same on the float64 distances.

GPU tuning (H100 / H200, sm_90; chosen from AOT-compiled register and SASS reports, not timed).
* float32: 128 x 128 tiles, 8 warps, 16-wide feature chunks, 3 pipeline stages (41 KB of shared
  memory). The ieee dot runs on the FMA units with a [4, 4]-per-thread accumulator layout (16 rows
  x 4 adjacent columns, 64 accumulators per thread): 232 registers, no spills (32-wide chunks:
  same speed, 82 KB; a whole-D dot spills). The codebook copy is transposed so that the B operand
  is read from shared memory in conflict-free 16-byte vectors along the codes (a [K, D] layout
  gives 8-way bank conflicts); the A operand reads are warp broadcasts. The (code tile, chunk)
  loop is flattened (``tl.range(flatten=True)``) so that the cp.async pipeline does not drain
  at every code tile. At D = 64 a thread issues about 5,200 instructions per code tile, 4,096 of
  them FFMA (79%); the fold costs 5 per score (compare, min, 3 selects) plus the subtraction.
* float64: 64 x 64 tiles, 4 warps, DMMA with column-pair slots, 212 registers.
* No autotuning: the row-block size fixes the grid and the code splits (and so the partial
  buffers), and the first call would time every candidate; these configs are the ones that
  compile without spills and with the densest FFMA stream.

Supported: float32 and float64, N >= 0, K >= 1, D >= 1, contiguous inputs on one device.
"""

import torch
import triton
import triton.language as tl

from ._common import DOT_PRECISION, num_splits, on_device, tile_config

INF: tl.constexpr = tl.constexpr(float("inf"))
INT32_MAX: tl.constexpr = tl.constexpr(2**31 - 1)


@triton.jit
def _load_rows(ptr, rows, n_rows, offs_d, d):
    """ptr[rows, offs_d] of a contiguous [n_rows, d] tensor as [len(rows), len(offs_d)]; padding reads 0."""
    mask = (rows[:, None] < n_rows) & (offs_d[None, :] < d)
    return tl.load(ptr + rows.to(tl.int64)[:, None] * d + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _prepare_codebook_kernel(
    codebook_ptr,  # [k, d] fp32/fp64
    column_sums_ptr,  # [d] fp64, sum_k codebook_kd
    shift_ptr,  # [d_pad] same dtype as codebook: s_T, zero padded
    centred_t_ptr,  # [d_pad, k_pad] same dtype: fl(codebook - s_T) transposed, zero padded
    half_norms_ptr,  # [k_pad] same dtype: ||centred_k||^2 / 2, +inf on padded codes
    max_half_norm_ptr,  # [1] fp64, 0 on entry: max_k half_norms_k
    k,
    d,
    d_pad,
    k_pad,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Centres codes [program_id(0) * BLOCK_N, + BLOCK_N) of the padded range (BLOCK_N divides k_pad);
    program 0 stores s_T."""
    codes = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    norms = tl.zeros((BLOCK_N,), dtype=tl.float64)
    for d0 in range(0, d_pad, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        codes_chunk = _load_rows(codebook_ptr, codes, k, offs_d, d)
        mean = tl.load(column_sums_ptr + offs_d, mask=offs_d < d, other=0.0) / k
        shift = mean.to(codes_chunk.dtype)
        if tl.program_id(0) == 0:
            tl.store(shift_ptr + offs_d, shift, mask=offs_d < d_pad)
        # Padding (codes >= k or features >= d) stores 0: 0 - 0 there.
        valid = (codes[:, None] < k) & (offs_d[None, :] < d)
        centred = tl.where(valid, codes_chunk - shift[None, :], 0.0)
        t_offsets = offs_d.to(tl.int64)[None, :] * k_pad + codes[:, None]
        tl.store(centred_t_ptr + t_offsets, centred, mask=offs_d[None, :] < d_pad)
        centred64 = centred.to(tl.float64)
        norms += tl.sum(centred64 * centred64, axis=1)
    tl.store(half_norms_ptr + codes, tl.where(codes < k, 0.5 * norms, INF))
    tl.atomic_max(max_half_norm_ptr, tl.max(tl.where(codes < k, 0.5 * norms, 0.0), axis=0))


@triton.jit
def _fold_column(best, second, best_code, scores, codes):
    """Folds one column of half scores per slot ([BLOCK_M, slots], codes increasing) into the state.

    A strictly smaller score takes over (the old best becomes the second); otherwise the score can
    only lower the second. Selects on one comparison: float64 has no min/max instruction.
    """
    improved = scores < best
    second = tl.where(improved, best, tl.minimum(second, scores))
    best_code = tl.where(improved, codes, best_code)
    return tl.where(improved, scores, best), second, best_code


@triton.jit
def _fold_tile(best, second, best_code, scores, col0, SLOT: tl.constexpr):
    """Folds a [BLOCK_M, BLOCK_N] tile of half scores of codes col0 + j into the per-slot state.

    Slot a holds the columns a * SLOT + j, 0 <= j < SLOT (SLOT = 2 or 4), the columns one thread
    holds in the accumulator layouts used, so that the reshape and splits move no data.
    """
    block_m: tl.constexpr = scores.shape[0]
    num_slots: tl.constexpr = scores.shape[1] // SLOT
    slot_codes = col0 + tl.arange(0, num_slots)[None, :] * SLOT
    if SLOT == 4:
        # Columns 4a + 2b + c: split on c, then on b.
        even, odd = tl.split(tl.reshape(scores, (block_m, num_slots, 2, 2)))
        s0, s2 = tl.split(even)
        s1, s3 = tl.split(odd)
        best, second, best_code = _fold_column(best, second, best_code, s0, slot_codes)
        best, second, best_code = _fold_column(best, second, best_code, s1, slot_codes + 1)
        best, second, best_code = _fold_column(best, second, best_code, s2, slot_codes + 2)
        best, second, best_code = _fold_column(best, second, best_code, s3, slot_codes + 3)
    else:
        s0, s1 = tl.split(tl.reshape(scores, (block_m, num_slots, 2)))
        best, second, best_code = _fold_column(best, second, best_code, s0, slot_codes)
        best, second, best_code = _fold_column(best, second, best_code, s1, slot_codes + 1)
    return best, second, best_code


@triton.jit
def _vq_search_kernel(
    z_ptr,  # [n, d] fp32/fp64
    shift_ptr,  # [d_pad] same dtype: s_T, zero padded
    centred_t_ptr,  # [d_pad, k_pad] same dtype: centred codebook, transposed, zero padded
    half_norms_ptr,  # [k_pad] same dtype: ||centred_k||^2 / 2, +inf on padded codes
    best_ptr,  # [splits, n] same dtype: best half score of the row within the split's codes
    second_ptr,  # [splits, n] same dtype: best half score of the split's other codes (+inf if none)
    best_code_ptr,  # [splits, n] int32: the code of best (lowest on ties)
    n,
    k,
    d,
    k_pad,
    tiles_per_split,
    EVEN_D: tl.constexpr,  # d is a multiple of BLOCK_D (no feature mask on z)
    SLOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Best and second-best code of rows [program_id(0) * BLOCK_M, + BLOCK_M) among the code tiles
    [program_id(1) * tiles_per_split, + tiles_per_split)."""
    dtype = z_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Rows past n read row n - 1 (in bounds, results not stored): no row mask in the hot loop.
    z_rows = z_ptr + tl.minimum(rows, n - 1).to(tl.int64)[:, None] * d
    offs_d = tl.arange(0, BLOCK_D)
    tile_cols = tl.arange(0, BLOCK_N)

    num_slots: tl.constexpr = BLOCK_N // SLOT
    best = tl.full((BLOCK_M, num_slots), INF, dtype)
    second = tl.full((BLOCK_M, num_slots), INF, dtype)
    best_code = tl.zeros((BLOCK_M, num_slots), dtype=tl.int32)
    first = pid_s * tiles_per_split * BLOCK_N
    last = tl.minimum(first + tiles_per_split * BLOCK_N, k)
    # One flattened, software-pipelined loop over (code tile, feature chunk).
    for col0 in tl.range(first, last, BLOCK_N, flatten=True):
        codes = col0 + tile_cols
        dots = tl.zeros((BLOCK_M, BLOCK_N), dtype=dtype)
        for d0 in range(0, d, BLOCK_D):
            if EVEN_D:
                z = tl.load(z_rows + d0 + offs_d[None, :])
            else:
                z = tl.load(z_rows + d0 + offs_d[None, :], mask=d0 + offs_d[None, :] < d, other=0.0)
            z_centred = z - tl.load(shift_ptr + d0 + offs_d)[None, :]
            e_t = tl.load(centred_t_ptr + tl.cast(d0, tl.int64) * k_pad + offs_d[:, None] * k_pad + codes[None, :])
            dots = tl.dot(z_centred, e_t, dots, input_precision=DOT_PRECISION)
        scores = tl.load(half_norms_ptr + codes)[None, :] - dots
        best, second, best_code = _fold_tile(best, second, best_code, scores, col0, SLOT)

    # Merge the slots: the lowest code among the equal bests; the second best over every other code.
    row_best = tl.min(best, axis=1)
    row_code = tl.min(tl.where(best == row_best[:, None], best_code, INT32_MAX), axis=1)
    others = tl.where(best_code == row_code[:, None], INF, best)
    row_second = tl.minimum(tl.min(second, axis=1), tl.min(others, axis=1))
    out = pid_s.to(tl.int64) * n + rows
    row_ok = rows < n
    tl.store(best_ptr + out, row_best, mask=row_ok)
    tl.store(second_ptr + out, row_second, mask=row_ok)
    tl.store(best_code_ptr + out, row_code, mask=row_ok)


@triton.jit
def _exact_sq_dists(z_ptr, codebook_ptr, rows, codes, n, k, d, BLOCK_D: tl.constexpr):
    """sum_d (z[rows_i, d] - codebook[codes_i, d])^2 in float64 by direct differences, [len(rows)].

    rows and codes have one shape; entries outside z or the codebook read 0.
    """
    offs_d = tl.arange(0, BLOCK_D)
    sq_dists = tl.zeros(rows.shape, dtype=tl.float64)
    for d0 in range(0, d, BLOCK_D):
        z = _load_rows(z_ptr, rows, n, d0 + offs_d, d).to(tl.float64)
        e = _load_rows(codebook_ptr, codes, k, d0 + offs_d, d).to(tl.float64)
        diff = z - e
        sq_dists += tl.sum(diff * diff, axis=1)
    return sq_dists


@triton.jit
def _vq_finish_kernel(
    z_ptr,  # [n, d] fp32/fp64
    codebook_ptr,  # [k, d] same dtype, the original codes
    shift_ptr,  # [d_pad] same dtype: s_T
    max_half_norm_ptr,  # [1] fp64: max_k ||centred_k||^2 / 2
    best_ptr,  # [splits, n] same dtype (from the search kernel)
    second_ptr,  # [splits, n] same dtype
    best_code_ptr,  # [splits, n] int32
    indices_ptr,  # [n] int64
    sqdist_ptr,  # [n] same dtype as z
    fallback_rows_ptr,  # [n] int32: rows to search again (the first fallback_count entries)
    fallback_count_ptr,  # [1] int32, 0 on entry
    n,
    k,
    d,
    num_splits,
    UNIT_ROUNDOFF: tl.constexpr,  # u: 2^-24 (float32) or 2^-53 (float64)
    SMALLEST_SUBNORMAL: tl.constexpr,  # 2^-149 (float32) or 2^-1074 (float64)
    OVERFLOW_SAFE: tl.constexpr,  # half the largest finite value of the input dtype
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Winner, certification and exact distance of rows [program_id(0) * BLOCK, + BLOCK)."""
    dtype = z_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n
    # Code ranges in increasing order, strict comparisons: ties stay with the lower code.
    best = tl.load(best_ptr + rows, mask=row_ok, other=0.0)
    second = tl.load(second_ptr + rows, mask=row_ok, other=0.0)
    best_code = tl.load(best_code_ptr + rows, mask=row_ok, other=0)
    for split in range(1, num_splits):
        offsets = tl.cast(split, tl.int64) * n + rows
        split_best = tl.load(best_ptr + offsets, mask=row_ok, other=0.0)
        split_second = tl.load(second_ptr + offsets, mask=row_ok, other=0.0)
        split_code = tl.load(best_code_ptr + offsets, mask=row_ok, other=0)
        improved = split_best < best
        second = tl.where(improved, tl.minimum(best, split_second), tl.minimum(second, split_best))
        best_code = tl.where(improved, split_code, best_code)
        best = tl.minimum(best, split_best)

    # ||z'_n||^2 in float64 from the same centred values the dots used.
    offs_d = tl.arange(0, BLOCK_D)
    z_norms = tl.zeros((BLOCK,), dtype=tl.float64)
    for d0 in range(0, d, BLOCK_D):
        z = _load_rows(z_ptr, rows, n, d0 + offs_d, d)
        z_centred = (z - tl.load(shift_ptr + d0 + offs_d, mask=d0 + offs_d < d, other=0.0)[None, :]).to(tl.float64)
        z_norms += tl.sum(z_centred * z_centred, axis=1)
    # Every half score is within bound / 2 of its exact value (module docstring); the subnormal term
    # covers products that underflow. Below OVERFLOW_SAFE no dot, norm or score can overflow.
    a_n = z_norms + 2.0 * tl.load(max_half_norm_ptr)
    bound = (2 * d + 16) * (UNIT_ROUNDOFF * a_n + SMALLEST_SUBNORMAL)
    certified = (second.to(tl.float64) - best.to(tl.float64) > bound) & (a_n <= OVERFLOW_SAFE)

    sq_dists = _exact_sq_dists(z_ptr, codebook_ptr, rows, best_code, n, k, d, BLOCK_D)
    tl.store(indices_ptr + rows, best_code.to(tl.int64), mask=row_ok)
    tl.store(sqdist_ptr + rows, sq_dists.to(dtype), mask=row_ok)

    # Reserve one slot per failing row with a single atomic, then fill the slots in row order.
    failing = (row_ok & ~certified).to(tl.int32)
    num_failing = tl.sum(failing, axis=0)
    if num_failing > 0:
        first_slot = tl.atomic_add(fallback_count_ptr, num_failing)
        slots = first_slot + tl.cumsum(failing, axis=0) - 1
        tl.store(fallback_rows_ptr + slots, rows, mask=failing != 0)


@triton.jit
def _vq_exact_kernel(
    z_ptr,  # [n, d] fp32/fp64
    codebook_ptr,  # [k, d] same dtype, the original codes
    indices_ptr,  # [n] int64
    sqdist_ptr,  # [n] same dtype as z
    fallback_rows_ptr,  # [n] int32: rows to search (the first fallback_count entries)
    fallback_count_ptr,  # [1] int32
    n,
    k,
    d,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Exact search of the listed rows program_id(0), + num_programs(0), ...: float64 distances of
    the original inputs by direct differences, ties to the lowest index."""
    tile_cols = tl.arange(0, BLOCK_N)
    for slot in range(tl.program_id(0), tl.load(fallback_count_ptr), tl.num_programs(0)):
        row = tl.load(fallback_rows_ptr + slot)
        rows = row + tl.zeros((BLOCK_N,), dtype=tl.int32)
        best = tl.full((), INF, tl.float64)
        best_code = tl.zeros((), dtype=tl.int32)
        for col0 in range(0, k, BLOCK_N):
            codes = col0 + tile_cols
            sq_dists = _exact_sq_dists(z_ptr, codebook_ptr, rows, codes, n, k, d, BLOCK_D)
            sq_dists = tl.where(codes < k, sq_dists, INF)
            tile_best, tile_col = tl.min(sq_dists, axis=0, return_indices=True, return_indices_tie_break_left=True)
            if tile_best < best:
                best = tile_best
                best_code = col0 + tile_col
        tl.store(indices_ptr + row, best_code.to(tl.int64))
        tl.store(sqdist_ptr + row, best.to(sqdist_ptr.dtype.element_ty))


# Columns per slot of the search fold: the adjacent accumulator columns one thread holds, 4 in the
# FMA layout of the float32 ieee dot, 2 in the DMMA layout of float64 (see ``_fold_tile``).
_SLOTS = {torch.float32: 4, torch.float64: 2}
# GPU configs of the search kernel, (BLOCK_M, BLOCK_N, num_warps, num_stages) by dtype (tuning notes in
# the module docstring); BLOCK_D is 8 for D <= 8, else 16.
_SEARCH_CONFIGS = {torch.float32: (128, 128, 8, 3), torch.float64: (64, 64, 4, 3)}
_GPU_BLOCK_D = 16
# The other kernels on the GPU, (BLOCK codes or rows, BLOCK_D, num_warps) by dtype: no spills on sm_90.
_PREPARE_CONFIGS = {torch.float32: (64, 32, 4), torch.float64: (64, 32, 4)}
_FINISH_CONFIGS = {torch.float32: (64, 16, 4), torch.float64: (64, 16, 4)}
_EXACT_CONFIGS = {torch.float32: (128, 16, 4), torch.float64: (128, 16, 4)}
# Under the CPU interpreter (device "cpu"): 16-wide tiles and 8-wide feature chunks, so that small
# shapes span several row, code and feature blocks (and code ranges).
_INTERPRETER_SEARCH_CONFIG = (16, 16, 1, 1)
_INTERPRETER_BLOCK_D = 8
_INTERPRETER_CONFIG = (16, 8, 1)
# K is padded to a multiple of this (every BLOCK_N and prepare BLOCK divides it).
_CODE_PADDING = 128


def _check(z, codebook):
    """Validates the arguments (dtypes, shapes, contiguity, device), naming the one at fault."""
    if z.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"z must be float32 or float64, got {z.dtype}")
    if codebook.dtype != z.dtype:
        raise ValueError(f"codebook must have the dtype of z ({z.dtype}), got {codebook.dtype}")
    if z.dim() != 2 or z.shape[1] < 1:
        raise ValueError(f"z must be [N, D] with D >= 1, got shape {tuple(z.shape)}")
    if codebook.dim() != 2 or codebook.shape[0] < 1 or codebook.shape[1] != z.shape[1]:
        raise ValueError(f"codebook must be [K, D] with K >= 1 and D = {z.shape[1]}, got shape {tuple(codebook.shape)}")
    for name, t in (("z", z), ("codebook", codebook)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if codebook.device != z.device:
        raise ValueError(f"codebook is on {codebook.device}, z on {z.device}")


def _prepare_codebook(codebook, block_d):
    """(shift [D_pad], centred_t [D_pad, K_pad], half_norms [K_pad], max_half_norm [1] float64), D_pad a
    multiple of block_d and K_pad of _CODE_PADDING, by ``_prepare_codebook_kernel``."""
    k, d = codebook.shape
    device, dtype = codebook.device, codebook.dtype
    d_pad = triton.cdiv(d, block_d) * block_d
    k_pad = triton.cdiv(k, _CODE_PADDING) * _CODE_PADDING
    shift = torch.empty(d_pad, dtype=dtype, device=device)
    centred_t = torch.empty((d_pad, k_pad), dtype=dtype, device=device)
    half_norms = torch.empty(k_pad, dtype=dtype, device=device)
    max_half_norm = torch.zeros(1, dtype=torch.float64, device=device)
    block_n, prep_block_d, num_warps = tile_config(device, dtype, _PREPARE_CONFIGS, _INTERPRETER_CONFIG)
    _prepare_codebook_kernel[(k_pad // block_n,)](
        codebook, codebook.sum(dim=0, dtype=torch.float64), shift, centred_t, half_norms, max_half_norm,
        k, d, d_pad, k_pad, BLOCK_N=block_n, BLOCK_D=prep_block_d, num_warps=num_warps,
    )
    return shift, centred_t, half_norms, max_half_norm


def vq_nearest(z, codebook):
    """Nearest codebook entry of every row of z.

    Args:
        z: [N, D] float32/float64 contiguous tensor (N >= 0), finite.
        codebook: [K, D] same dtype and device, contiguous, K >= 1, finite.

    Returns:
        (indices int64 [N], sqdist [N] in the input dtype): argmin_k of the float64 squared distances
        (ties to the lowest k) and the float64 distance to that code, rounded to the input dtype.
    """
    _check(z, codebook)
    n, d = z.shape
    k = codebook.shape[0]
    device, dtype = z.device, z.dtype
    indices = torch.empty(n, dtype=torch.int64, device=device)
    sqdist = torch.empty(n, dtype=dtype, device=device)
    if n == 0:
        return indices, sqdist

    block_m, block_n, num_warps, num_stages = tile_config(device, dtype, _SEARCH_CONFIGS, _INTERPRETER_SEARCH_CONFIG)
    block_d = _INTERPRETER_BLOCK_D if device.type == "cpu" else (8 if d <= 8 else _GPU_BLOCK_D)
    row_blocks, code_tiles = triton.cdiv(n, block_m), triton.cdiv(k, block_n)
    splits = num_splits(row_blocks, code_tiles, device)
    tiles_per_split = triton.cdiv(code_tiles, splits)
    splits = triton.cdiv(code_tiles, tiles_per_split)
    with on_device(device):
        shift, centred_t, half_norms, max_half_norm = _prepare_codebook(codebook, block_d)
        best = torch.empty((splits, n), dtype=dtype, device=device)
        second = torch.empty((splits, n), dtype=dtype, device=device)
        best_code = torch.empty((splits, n), dtype=torch.int32, device=device)
        _vq_search_kernel[(row_blocks, splits)](
            z, shift, centred_t, half_norms, best, second, best_code, n, k, d, centred_t.shape[1],
            tiles_per_split, EVEN_D=d % block_d == 0, SLOT=_SLOTS[dtype], BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages,
        )
        fallback_rows = torch.empty(n, dtype=torch.int32, device=device)
        fallback_count = torch.zeros(1, dtype=torch.int32, device=device)
        finfo = torch.finfo(dtype)
        block, chunk, num_warps = tile_config(device, dtype, _FINISH_CONFIGS, _INTERPRETER_CONFIG)
        _vq_finish_kernel[(triton.cdiv(n, block),)](
            z, codebook, shift, max_half_norm, best, second, best_code, indices, sqdist,
            fallback_rows, fallback_count, n, k, d, splits,
            UNIT_ROUNDOFF=finfo.eps / 2, SMALLEST_SUBNORMAL=finfo.smallest_normal * finfo.eps,
            OVERFLOW_SAFE=finfo.max / 2, BLOCK=block, BLOCK_D=chunk, num_warps=num_warps,
        )
        block, chunk, num_warps = tile_config(device, dtype, _EXACT_CONFIGS, _INTERPRETER_CONFIG)
        _vq_exact_kernel[(num_splits(1, n, device),)](
            z, codebook, indices, sqdist, fallback_rows, fallback_count, n, k, d,
            BLOCK_N=block, BLOCK_D=chunk, num_warps=num_warps,
        )
    return indices, sqdist
