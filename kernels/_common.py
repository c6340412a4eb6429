"""Building blocks shared by the Triton kernels of the pair-sum ops (MMD, HSIC).

Jitted helpers work on one [BLOCK, BLOCK] tile of pairs (rows of a sample a against columns of a
sample b) so that no n x m matrix is ever formed:

* ``row_sq_norms`` and ``dot_tile``: ||a_i||^2 and a_i . b_j by ``tl.dot`` over chunks of the
  feature dimension (any d).
* ``kernel_tile``: kernel values and gradient slopes of a tile, with the pair set (padding, the
  diagonal of a sample with itself) applied by masking.
* ``accumulate_gradient_tile`` and ``store_gradient``: the float64 gradient accumulators
  ``a_i * sum_j G_ij - sum_j G_ij z_j``.

Kernels, with r = ||a - b||^2: ``rbf`` k = sum_s exp(-params[s] r), ``imq``
k = sum_s params[s] / (params[s] + r), ``linear`` k = a.b and ``delta`` k = [a_0 == b_0] (label
ids, no gradient).

Numerics.
* ``tl.dot`` on float32 defaults to TF32 on tensor cores (10-bit mantissa), whose ~1e-3
  relative error, amplified by the cancellation in ||a||^2 + ||b||^2 - 2 a.b, is far above the
  ~1e-6 the sums need. Every dot therefore uses ``input_precision="ieee"`` (full float32 FMA).
  float64 inputs compute in float64 throughout (``input_precision`` does not apply to them).
* The diagonal of a sample with itself is handled by masking, never by subtracting: dropped when
  excluded, r := 0 exactly when included.
* Gradient tiles G @ z are computed in the input dtype and accumulated across tiles in float64,
  together with the row sums of G; the final a_i * rowsum(G) - G @ z is formed in float64.

Host helpers pick tile configs, count column splits, cache bandwidth tensors and validate
arguments.
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
DELTA: tl.constexpr = tl.constexpr(3)
KERNEL_IDS = {"rbf": RBF.value, "imq": IMQ.value, "linear": LINEAR.value, "delta": DELTA.value}
# Precision of every float32 tl.dot: full float32 FMA, not the TF32 default (module docstring).
DOT_PRECISION: tl.constexpr = tl.constexpr("ieee")
# Kernels defined by bandwidths (at least one); the others take none.
_BANDWIDTH_KERNELS = ("rbf", "imq")


@triton.jit
def row_sq_norms(
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
def dot_tile(
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
        dots = tl.dot(a, tl.trans(b), dots, input_precision=DOT_PRECISION)
        b_norms += tl.sum(b * b, axis=1)
    return dots, b_norms


@triton.jit
def sq_dists(a_norms, b_norms, dots):
    """r = ||a||^2 + ||b||^2 - 2 a.b, clamped at 0 against rounding below zero."""
    return tl.maximum(a_norms[:, None] + b_norms[None, :] - 2.0 * dots, 0.0)


@triton.jit
def kernel_profile(r, params_ptr, KERNEL: tl.constexpr, NUM_PARAMS: tl.constexpr):
    """(f(r), 2 f'(r)) summed over all bandwidths (rbf or imq), one exp per bandwidth.

    A caller that uses only one of the two pays only for it: the other is dead code to the
    compiler.
    """
    values = tl.zeros(r.shape, dtype=r.dtype)
    slopes = tl.zeros(r.shape, dtype=r.dtype)
    for s in tl.static_range(NUM_PARAMS):
        p = tl.load(params_ptr + s)
        if KERNEL == RBF:
            e = tl.exp(-p * r)
            values += e
            slopes -= 2.0 * p * e
        elif KERNEL == IMQ:
            q = p + r
            values += p / q
            slopes -= 2.0 * p / (q * q)
    return values, slopes


@triton.jit
def kernel_tile(
    a_ptr,  # [n_a, d] fp32/fp64, row sample
    b_ptr,  # [n_b, d] same dtype, column sample (the same tensor as a_ptr when SAME)
    params_ptr,  # [max(NUM_PARAMS, 1)] same dtype, gamma_s (rbf) or c_s (imq)
    rows,  # [BLOCK] int32 rows of a
    cols,  # [BLOCK] int32 rows of b
    a_norms,  # [BLOCK] ||a_rows||^2 (unused by linear and delta)
    n_a,
    n_b,
    d,
    KERNEL: tl.constexpr,
    NUM_PARAMS: tl.constexpr,
    SAME: tl.constexpr,
    EXCLUDE_DIAGONAL: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Kernel values and gradient slopes of a tile, both [BLOCK, BLOCK] in the input dtype.

    The pairs taken are those inside both samples, less the diagonal i == j when SAME (b is a)
    and EXCLUDE_DIAGONAL; both tiles are 0 elsewhere.

    values: k(a_i, b_j); on a kept diagonal r := 0 exactly (rbf/imq), linear gives ||a_i||^2.
    slopes G, such that the gradient of sum_j w_ij k(a_i, b_j) with respect to a_i is
    a_i * sum_j w_ij G_ij - sum_j w_ij G_ij b_j:
      rbf/imq: G = 2 f'(r), with the diagonal of SAME dropped (its term (a_i - a_i) vanishes);
      linear:  G = -1 (d(a.b)/da = b), the diagonal kept unless excluded, and the row sums of G
               are not to be used (see ``accumulate_gradient_tile``);
      delta:   G = 0 (labels have no gradient).
    """
    keep = (rows[:, None] < n_a) & (cols[None, :] < n_b)
    if SAME:
        on_diagonal = rows[:, None] == cols[None, :]
        if EXCLUDE_DIAGONAL:
            keep = keep & ~on_diagonal
    if KERNEL == DELTA:
        a_labels = tl.load(a_ptr + rows.to(tl.int64) * d, mask=rows < n_a, other=0.0)
        b_labels = tl.load(b_ptr + cols.to(tl.int64) * d, mask=cols < n_b, other=0.0)
        values = tl.where(keep & (a_labels[:, None] == b_labels[None, :]), 1.0, 0.0).to(a_ptr.dtype.element_ty)
        slopes = tl.zeros_like(values)
    else:
        dots, b_norms = dot_tile(a_ptr, b_ptr, rows, cols, n_a, n_b, d, BLOCK, BLOCK_K)
        if KERNEL == LINEAR:
            values = tl.where(keep, dots, 0.0)
            slopes = tl.where(keep, -1.0, 0.0).to(dots.dtype)
        else:
            r = sq_dists(a_norms, b_norms, dots)
            slope_keep = keep
            if SAME:
                if not EXCLUDE_DIAGONAL:
                    r = tl.where(on_diagonal, 0.0, r)
                slope_keep = keep & ~on_diagonal
            values, slopes = kernel_profile(r, params_ptr, KERNEL, NUM_PARAMS)
            values = tl.where(keep, values, 0.0)
            slopes = tl.where(slope_keep, slopes, 0.0)
    return values, slopes


@triton.jit
def accumulate_gradient_tile(
    acc,  # [BLOCK, BLOCK_DO] fp64 running sum of coeff * G @ z
    g_row_sums,  # [BLOCK] fp64 running sum of coeff * rowsum(G) (rbf/imq only)
    g,  # [BLOCK, BLOCK] slopes times pair weights, input dtype, 0 outside the pairs
    z_ptr,  # [n_z, d] same dtype, the column sample
    cols,  # [BLOCK] int32 rows of z
    offs_do,  # [BLOCK_DO] output feature columns
    n_z,
    d,
    coeff,  # fp64 scalar weight
    KERNEL: tl.constexpr,
):
    """Adds coeff * G @ z[cols, offs_do] to acc and, unless linear, coeff * rowsum(G) to g_row_sums."""
    if KERNEL != LINEAR:
        g_row_sums += tl.sum(g, axis=1).to(tl.float64) * coeff
    z_mask = (cols[:, None] < n_z) & (offs_do[None, :] < d)
    z = tl.load(z_ptr + cols.to(tl.int64)[:, None] * d + offs_do[None, :], mask=z_mask, other=0.0)
    acc += tl.dot(g, z, input_precision=DOT_PRECISION).to(tl.float64) * coeff
    return acc, g_row_sums


@triton.jit
def store_gradient(
    out_ptr,  # [n_a, d] fp64
    a_ptr,  # [n_a, d] fp32/fp64, the sample the gradient is taken for
    rows,  # [BLOCK] int32
    offs_do,  # [BLOCK_DO] output feature columns
    n_a,
    d,
    acc,  # [BLOCK, BLOCK_DO] fp64 sum of G @ z
    g_row_sums,  # [BLOCK] fp64 row sums of G (zeros for linear)
):
    """Writes a_i * rowsum(G) - G @ z, formed in float64, for the rows and feature chunk given."""
    out_mask = (rows[:, None] < n_a) & (offs_do[None, :] < d)
    out_offsets = rows.to(tl.int64)[:, None] * d + offs_do[None, :]
    a_out = tl.load(a_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float64)
    tl.store(out_ptr + out_offsets, a_out * g_row_sums[:, None] - acc, mask=out_mask)


def tile_config(device, dtype, gpu_configs, interpreter_config):
    """The tile config for the GPU by dtype, or the interpreter's one on the CPU."""
    return interpreter_config if device.type == "cpu" else gpu_configs[dtype]


def _target_programs(device):
    """Programs worth launching: 4 per SM on the GPU; a few under the interpreter."""
    if device.type == "cpu":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(num_programs, num_col_blocks, device):
    """Column splits so that num_programs * splits reaches the target, at most one per block."""
    return max(1, min(num_col_blocks, triton.cdiv(_target_programs(device), num_programs)))


def split_ranges(num_programs, num_col_blocks, device):
    """(splits, blocks per split) as ``num_splits`` chooses, less the splits that would be empty."""
    per_split = triton.cdiv(num_col_blocks, num_splits(num_programs, num_col_blocks, device))
    return triton.cdiv(num_col_blocks, per_split), per_split


@functools.lru_cache(maxsize=64)
def params_tensor(params, device, dtype):
    """Bandwidths as a device tensor (cached: one host-to-device copy per distinct tuple)."""
    return torch.tensor(params if params else (0.0,), dtype=dtype, device=device)


def on_device(device):
    """Makes ``device`` current for the launches: Triton launches on the current CUDA device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_kernel(kernel, params, allowed, argument="kernel"):
    """Validates a kernel name among ``allowed`` and its params; returns the params as floats."""
    if kernel not in allowed:
        raise ValueError(f"unknown {argument} {kernel!r}; expected one of {sorted(allowed)}")
    if kernel not in _BANDWIDTH_KERNELS and len(params) != 0:
        raise ValueError(f"the {kernel} kernel takes no params")
    if kernel in _BANDWIDTH_KERNELS and len(params) == 0:
        raise ValueError(f"the {kernel} kernel needs at least one param")
    return tuple(float(p) for p in params)


def check_dtype_and_device(x, y):
    """Both samples float32 or both float64, on one device."""
    if x.dtype not in (torch.float32, torch.float64) or y.dtype != x.dtype:
        raise ValueError(f"x and y must both be float32 or both float64, got {x.dtype} and {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"x and y are on different devices ({x.device}, {y.device})")
