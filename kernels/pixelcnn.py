"""Triton backend of the PixelCNN decoding step: all L gated layers of one column in one launch.

One launcher implements the backend contract of ``csrc/pixelcnn.cpp``:

* ``pixelcnn_step(x_row, h_row, v_row, col, w_in, w_hidden, w_res, b_res, w_skip, b_skip, w_out1,
  b_out1, w_out2, b_out2)`` returns ``(logits [N, O], h_col [L, N, C])``, with (j = col)

      a_0 = sum_t x_row[:, j - kw + 1 + t] w_in[t] + v_row[0, :, j]
      a_l = sum_{t < kw - 1} h_row[l - 1, :, j - kw + 1 + t] w_hidden[l - 1, t]
            + h_{l-1} w_hidden[l - 1, kw - 1] + v_row[l, :, j]
      g_l = tanh(a_l[:, :C]) * sigmoid(a_l[:, C:]),  h_l = [l > 0] h_{l-1} + g_l w_res[l] + b_res[l]
      s = b_skip + sum_l g_l w_skip[l],  logits = relu(relu(s) w_out1 + b_out1) w_out2 + b_out2

  (columns left of 0 are zero padding; h_col[l] = h_l).

Algorithm. At sampling batch sizes the step is a chain of small matrix products whose cost is
latency, not arithmetic. One program per block of BLOCK_N images runs the whole chain, all layers:
one call is one launch, and rows never interact, so programs never synchronise with each other.
* Every product is a loop of ``tl.dot`` over chunks, the output in chunks of BLOCK_OUT columns and
  the reduction dimension in chunks of BLOCK_K, both operands read from memory: the weights in
  place in the contract's [in, out] layouts (no per-call packing), the activations from rows in
  global memory. Registers are thus bounded by the chunk sizes, whatever C, S and M (whole [K, out]
  tiles make the float32 FMA dot hold K operands per output: spills from K = 64 on).
* So the activations computed in the call go through memory: h_l through its output row
  h_col[l] (read back as the next layer's current tap), the gates, the running skip sum s and the
  head's hidden layer through scratch rows [N, max(C, M) + S]. A barrier (``tl.debug_barrier``,
  bar.sync) after each phase makes the rows written visible to the whole program before they are
  read, and frees the gate rows for the next layer. The traffic stays in L1 / L2.
* Layer l: (1) per chunk of channels, the two halves of the pre-activation (v_row, then each
  input's chunks against w[:, c0 + j] and w[:, C + c0 + j] in one pass), the gate into scratch;
  barrier; (2) per chunk, h_l = h_{l-1} + b_res + g w_res into h_col[l], s += g w_skip (s starts
  at b_skip); barrier. Head: relu(relu(s) w_out1 + b_out1) into the gate rows; barrier; the logits
  by chunks (O is 768 for 3 x 256 RGB logits).
* Chunk tails are masked: weights and activations past the sizes read 0 and contribute nothing;
  rows past N compute on zeros and are not stored. Taps left of column 0 are skipped.

Numerics.
* float32 dots use ``input_precision="ieee"`` (full float32 FMA): TF32 would miss the 1e-4
  logit tolerance between cached and naive sampling. float64 computes in float64 throughout.
* The evaluation order is fixed (taps and chunks in increasing order), so equal inputs give
  bitwise equal outputs; rows do not interact, so the result does not depend on the grid.
* tanh is accurate near 0, where tanh(x) = 2 sigmoid(2x) - 1 and 1 - 2 / (1 + exp(2x)) cancel:
  below |x| = 0.55 it is the odd Taylor series (9 terms in float32, 19 in float64: the first
  omitted term is under 0.2 ulp), above it (1 - e) / (1 + e) with e = exp(-2|x|) <= 1/3, which
  does not cancel (tanh >= 0.5 there). sigmoid(x) = 1 / (1 + e) or e / (1 + e) with
  e = exp(-|x|), so that no exp overflows. With an exp of ~1 ulp both are within a few ulp. (On
  NVIDIA, float32 ``tl.exp`` is ex2.approx of x log2(e), relative error ~|x| 6e-8: it matters only
  where sigmoid(x) ~ exp(x) is tiny, so the absolute error stays ~1e-8.)

GPU configuration (from AOT-compiled register reports for sm_90 and sm_80; not timed: no GPU
here). BLOCK_N = 16 rows per program, the smallest ``tl.dot`` side (N = 256 gives 16 programs).
BLOCK_OUT = 32, BLOCK_K = 16, 8 warps and 3 pipeline stages (cp.async prefetch of the chunks of
each product loop): 176 registers in float32, 236 in float64, no spills on sm_90 (4 warps spill in
float64, BLOCK_OUT = 64 in float32; 1 stage saves registers but waits a full load latency per chunk).

Supported: float32 and float64, N >= 0, W, F, C, S, M, O, L, kw >= 1, contiguous tensors on one
device.
"""

from fractions import Fraction

import torch
import triton
import triton.language as tl

from ._common import DOT_PRECISION, on_device


def _tanh_series(terms):
    """The first ``terms`` coefficients b_k of tanh x = sum_k b_k x^(2k+1), from tanh' = 1 - tanh^2:
    (2k + 1) b_k = -sum_{i+j=k-1} b_i b_j, b_0 = 1 (exact rationals, then rounded)."""
    coeffs = [Fraction(1)]
    for k in range(1, terms):
        coeffs.append(-sum(coeffs[i] * coeffs[k - 1 - i] for i in range(k)) / (2 * k + 1))
    return tuple(float(c) for c in coeffs)


# |x| below which tanh is the Taylor series; above it tanh(|x|) >= 0.5 and (1 - e) / (1 + e) does not cancel.
TANH_SERIES_LIMIT: tl.constexpr = tl.constexpr(0.55)
TANH_SERIES: tl.constexpr = tl.constexpr(_tanh_series(19))
# Series terms by dtype: at |x| = 0.55 the first omitted term is 1.0e-8 (float32, u = 6e-8) and 7.8e-18
# (float64, u = 1.1e-16) relative.
_TANH_TERMS = {torch.float32: 9, torch.float64: 19}


@triton.jit
def _tanh(x, TERMS: tl.constexpr):
    """tanh(x), elementwise, within a few ulp (module docstring)."""
    x_sq = x * x
    series = tl.full(x.shape, TANH_SERIES[TERMS - 1], x.dtype)
    for k in tl.static_range(TERMS - 2, -1, -1):
        series = series * x_sq + TANH_SERIES[k]
    e = tl.exp(-2.0 * tl.abs(x))
    tail = (1.0 - e) / (1.0 + e)
    return tl.where(tl.abs(x) < TANH_SERIES_LIMIT, x * series, tl.where(x < 0.0, -tail, tail))


@triton.jit
def _sigmoid(x):
    """1 / (1 + exp(-x)), elementwise, with no exp of a positive argument (no overflow)."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0.0, 1.0, e) / (1.0 + e)


@triton.jit
def _load_tile(ptr, rows, n_rows, cols, n_cols, row_stride):
    """ptr[rows * row_stride + cols] as [len(rows), len(cols)]; rows >= n_rows and cols >= n_cols read 0."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows.to(tl.int64)[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, rows, n_rows, row_stride, n_cols, values):
    """ptr[rows * row_stride + j] = values[:, j] for rows < n_rows and j < n_cols."""
    cols = tl.arange(0, values.shape[1])
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows.to(tl.int64)[:, None] * row_stride + cols[None, :], values, mask=mask)


@triton.jit
def _bias_rows(b_ptr, m, BLOCK_N: tl.constexpr, BLOCK_OUT: tl.constexpr):
    """b_ptr[:m] broadcast to [BLOCK_N, BLOCK_OUT] (padding 0): the initial accumulator of x @ w + b."""
    offs = tl.arange(0, BLOCK_OUT)
    bias = tl.load(b_ptr + offs, mask=offs < m, other=0.0)
    return tl.broadcast_to(bias[None, :], (BLOCK_N, BLOCK_OUT))


@triton.jit
def _matmul_add(acc, a_ptr, rows, n_rows, a_row_stride, k, w_ptr, w_row_stride, n_cols, BLOCK_K: tl.constexpr,
                RELU_INPUTS: tl.constexpr = False):
    """acc + f(a[rows, :k]) @ w[:k, :n_cols] ([BLOCK_N, BLOCK_OUT] like acc), f = relu if RELU_INPUTS else
    the identity; a and w are read in chunks of BLOCK_K along k."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_out = tl.arange(0, acc.shape[1])
    for k0 in range(0, k, BLOCK_K):
        a = _load_tile(a_ptr + k0, rows, n_rows, offs_k, k - k0, a_row_stride)
        if RELU_INPUTS:
            a = tl.maximum(a, 0.0)
        w = _load_tile(w_ptr + k0 * w_row_stride, offs_k, k - k0, offs_out, n_cols, w_row_stride)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _add_gate_inputs(acc_tanh, acc_sigmoid, a_ptr, rows, n_rows, a_row_stride, k, w_ptr, channels, c0,
                     BLOCK_K: tl.constexpr):
    """Adds a[rows, :k] @ w[:, c0 + j] to acc_tanh and a[rows, :k] @ w[:, C + c0 + j] to acc_sigmoid for the
    BLOCK_OUT channels j of the chunk (w_ptr: a [k, 2C] matrix); one pass over a for both halves."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, acc_tanh.shape[1])
    for k0 in range(0, k, BLOCK_K):
        a = _load_tile(a_ptr + k0, rows, n_rows, offs_k, k - k0, a_row_stride)
        w_tanh_ptr = w_ptr + k0 * 2 * channels + c0
        w_tanh = _load_tile(w_tanh_ptr, offs_k, k - k0, offs_c, channels - c0, 2 * channels)
        w_sigmoid = _load_tile(w_tanh_ptr + channels, offs_k, k - k0, offs_c, channels - c0, 2 * channels)
        acc_tanh = tl.dot(a, w_tanh, acc_tanh, input_precision=DOT_PRECISION)
        acc_sigmoid = tl.dot(a, w_sigmoid, acc_sigmoid, input_precision=DOT_PRECISION)
    return acc_tanh, acc_sigmoid


@triton.jit
def _gate_pre_activations(v_ptr, rows, n_rows, v_row_stride, channels, c0, BLOCK_N: tl.constexpr,
                          BLOCK_OUT: tl.constexpr):
    """v_row[layer, rows, col] at channels c0 + j (tanh half) and C + c0 + j (sigmoid half), each
    [BLOCK_N, BLOCK_OUT]."""
    offs = tl.arange(0, BLOCK_OUT)
    acc_tanh = _load_tile(v_ptr + c0, rows, n_rows, offs, channels - c0, v_row_stride)
    acc_sigmoid = _load_tile(v_ptr + channels + c0, rows, n_rows, offs, channels - c0, v_row_stride)
    return acc_tanh, acc_sigmoid


@triton.jit
def _residual_and_skip(
    gate_ptr, skip_ptr, scratch_stride, h_prev_ptr, h_ptr, rows, n, w_res_ptr, b_res_ptr, w_skip_ptr, b_skip_ptr,
    channels, skips, FIRST_LAYER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_OUT: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """h_l = [not FIRST_LAYER] h_{l-1} + g_l w_res[l] + b_res[l], stored to h_ptr, and the running skip sum
    s += g_l w_skip[l] (s = b_skip before the first layer), kept in the scratch rows; g_l is read from
    gate_ptr. Ends with a barrier: h_l and s are then visible to the whole program, and the gate rows free."""
    for c0 in range(0, channels, BLOCK_OUT):
        h = _matmul_add(_bias_rows(b_res_ptr + c0, channels - c0, BLOCK_N, BLOCK_OUT), gate_ptr, rows, n,
                        scratch_stride, channels, w_res_ptr + c0, channels, channels - c0, BLOCK_K)
        if not FIRST_LAYER:
            h += _load_tile(h_prev_ptr + c0, rows, n, tl.arange(0, BLOCK_OUT), channels - c0, channels)
        _store_tile(h_ptr + c0, rows, n, channels, channels - c0, h)
    for s0 in range(0, skips, BLOCK_OUT):
        if FIRST_LAYER:
            skip = _bias_rows(b_skip_ptr + s0, skips - s0, BLOCK_N, BLOCK_OUT)
        else:
            skip = _load_tile(skip_ptr + s0, rows, n, tl.arange(0, BLOCK_OUT), skips - s0, scratch_stride)
        skip = _matmul_add(skip, gate_ptr, rows, n, scratch_stride, channels, w_skip_ptr + s0, skips, skips - s0,
                           BLOCK_K)
        _store_tile(skip_ptr + s0, rows, n, scratch_stride, skips - s0, skip)
    tl.debug_barrier()


@triton.jit
def _store_gate(gate_ptr, rows, n, scratch_stride, channels, c0, acc_tanh, acc_sigmoid, TANH_TERMS: tl.constexpr):
    """g = tanh(a[:, :C]) * sigmoid(a[:, C:]) of channel chunk c0, stored to the gate scratch rows."""
    gate = _tanh(acc_tanh, TANH_TERMS) * _sigmoid(acc_sigmoid)
    _store_tile(gate_ptr + c0, rows, n, scratch_stride, channels - c0, gate)


@triton.jit(do_not_specialize=["col"])
def _pixelcnn_step_kernel(
    x_row_ptr,  # [N, W, F] fp32/fp64
    h_row_ptr,  # [L, N, W, C] same dtype
    v_row_ptr,  # [L, N, W, 2C]
    w_in_ptr,  # [kw, F, 2C]
    w_hidden_ptr,  # [L - 1, kw, C, 2C]
    w_res_ptr,  # [L, C, C]
    b_res_ptr,  # [L, C]
    w_skip_ptr,  # [L, C, S]
    b_skip_ptr,  # [S]
    w_out1_ptr,  # [S, M]
    b_out1_ptr,  # [M]
    w_out2_ptr,  # [M, O]
    b_out2_ptr,  # [O]
    logits_ptr,  # [N, O] output
    h_col_ptr,  # [L, N, C] output
    scratch_ptr,  # [N, scratch_stride] work rows: gates (then the output hidden layer) | skip sums
    scratch_stride,  # max(C, M) + S
    n,
    width,
    features,
    channels,
    num_layers,
    taps,
    skips,
    out_hidden,
    outputs,
    col,
    BLOCK_N: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TANH_TERMS: tl.constexpr,
):
    """Logits and h_col of images [program_id(0) * BLOCK_N, + BLOCK_N) at column col, all layers."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    skip_ptr = scratch_ptr + scratch_stride - skips
    # Tap t reads column col - taps + 1 + t; the taps left of column 0 read zero padding: skipped.
    first_tap = tl.maximum(taps - 1 - col, 0)
    gate_width = 2 * channels
    v_row_stride = width * gate_width
    h_row_stride = width * channels

    # Layer 0: the masked taps of the input features.
    v_ptr = v_row_ptr + col * gate_width
    for c0 in range(0, channels, BLOCK_OUT):
        acc_tanh, acc_sigmoid = _gate_pre_activations(v_ptr, rows, n, v_row_stride, channels, c0, BLOCK_N, BLOCK_OUT)
        for t in range(first_tap, taps):
            acc_tanh, acc_sigmoid = _add_gate_inputs(
                acc_tanh, acc_sigmoid, x_row_ptr + (col - taps + 1 + t) * features, rows, n, width * features,
                features, w_in_ptr + t * features * gate_width, channels, c0, BLOCK_K,
            )
        _store_gate(scratch_ptr, rows, n, scratch_stride, channels, c0, acc_tanh, acc_sigmoid, TANH_TERMS)
    tl.debug_barrier()
    _residual_and_skip(scratch_ptr, skip_ptr, scratch_stride, h_col_ptr, h_col_ptr, rows, n, w_res_ptr, b_res_ptr,
                       w_skip_ptr, b_skip_ptr, channels, skips, True, BLOCK_N, BLOCK_OUT, BLOCK_K)

    # Layers 1 .. L - 1: the cached taps of the previous layer's row, then its output at this column
    # (h_col[l - 1], stored by this program).
    for _ in range(1, num_layers):
        v_ptr += n * v_row_stride
        for c0 in range(0, channels, BLOCK_OUT):
            acc_tanh, acc_sigmoid = _gate_pre_activations(v_ptr, rows, n, v_row_stride, channels, c0, BLOCK_N,
                                                          BLOCK_OUT)
            for t in range(first_tap, taps - 1):
                acc_tanh, acc_sigmoid = _add_gate_inputs(
                    acc_tanh, acc_sigmoid, h_row_ptr + (col - taps + 1 + t) * channels, rows, n, h_row_stride,
                    channels, w_hidden_ptr + t * channels * gate_width, channels, c0, BLOCK_K,
                )
            acc_tanh, acc_sigmoid = _add_gate_inputs(
                acc_tanh, acc_sigmoid, h_col_ptr, rows, n, channels, channels,
                w_hidden_ptr + (taps - 1) * channels * gate_width, channels, c0, BLOCK_K,
            )
            _store_gate(scratch_ptr, rows, n, scratch_stride, channels, c0, acc_tanh, acc_sigmoid, TANH_TERMS)
        tl.debug_barrier()
        h_row_ptr += n * h_row_stride
        w_hidden_ptr += taps * channels * gate_width
        w_res_ptr += channels * channels
        b_res_ptr += channels
        w_skip_ptr += channels * skips
        _residual_and_skip(scratch_ptr, skip_ptr, scratch_stride, h_col_ptr, h_col_ptr + n * channels, rows, n,
                           w_res_ptr, b_res_ptr, w_skip_ptr, b_skip_ptr, channels, skips, False, BLOCK_N, BLOCK_OUT,
                           BLOCK_K)
        h_col_ptr += n * channels

    # Output head: the hidden layer relu(relu(s) w_out1 + b_out1) into the gate rows, then the logits.
    for m0 in range(0, out_hidden, BLOCK_OUT):
        hidden = _matmul_add(_bias_rows(b_out1_ptr + m0, out_hidden - m0, BLOCK_N, BLOCK_OUT), skip_ptr, rows, n,
                             scratch_stride, skips, w_out1_ptr + m0, out_hidden, out_hidden - m0, BLOCK_K, True)
        _store_tile(scratch_ptr + m0, rows, n, scratch_stride, out_hidden - m0, tl.maximum(hidden, 0.0))
    tl.debug_barrier()
    for o0 in range(0, outputs, BLOCK_OUT):
        logits = _matmul_add(_bias_rows(b_out2_ptr + o0, outputs - o0, BLOCK_N, BLOCK_OUT), scratch_ptr, rows, n,
                             scratch_stride, out_hidden, w_out2_ptr + o0, outputs, outputs - o0, BLOCK_K)
        _store_tile(logits_ptr + o0, rows, n, outputs, outputs - o0, logits)


# Rows of images per program: the smallest tl.dot side (module docstring).
_BLOCK_N = 16
# Chunks of the output and of the reduction dimension of every product (module docstring).
_BLOCK_OUT = 32
_BLOCK_K = 16
_NUM_WARPS = 8
_NUM_STAGES = 3
_ARGUMENTS = ("x_row", "h_row", "v_row", "w_in", "w_hidden", "w_res", "b_res", "w_skip", "b_skip", "w_out1",
              "b_out1", "w_out2", "b_out2")


def _launch_options(device):
    """Warps and pipeline stages: the GPU config (module docstring), or one warp under the interpreter."""
    if device.type == "cpu":
        return {"num_warps": 1}
    return {"num_warps": _NUM_WARPS, "num_stages": _NUM_STAGES}


def _check(tensors, col):
    """Validates the arguments (dtypes, device, contiguity, shapes, col), naming the one at fault."""
    x_row = tensors[0]
    if x_row.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x_row must be float32 or float64, got {x_row.dtype}")
    for name, tensor in zip(_ARGUMENTS, tensors):
        if tensor.dtype != x_row.dtype:
            raise ValueError(f"{name} must have the dtype of x_row ({x_row.dtype}), got {tensor.dtype}")
        if tensor.device != x_row.device:
            raise ValueError(f"{name} must be on x_row's device ({x_row.device}), got {tensor.device}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    w_in, w_res, b_skip, b_out1, b_out2 = tensors[3], tensors[5], tensors[8], tensors[10], tensors[12]
    if x_row.dim() != 3 or w_in.dim() != 3 or w_res.dim() != 3 or min(b.dim() for b in (b_skip, b_out1, b_out2)) != 1:
        raise ValueError("x_row [N, W, F], w_in [kw, F, 2C], w_res [L, C, C] and 1-d biases expected, got shapes "
                         + ", ".join(f"{name} {list(t.shape)}" for name, t in zip(_ARGUMENTS, tensors)))
    (n, width, features), (taps, layers, channels) = x_row.shape, (w_in.shape[0], *w_res.shape[:2])
    skips, out_hidden, outputs = b_skip.shape[0], b_out1.shape[0], b_out2.shape[0]
    expected = (
        (n, width, features), (layers, n, width, channels), (layers, n, width, 2 * channels),
        (taps, features, 2 * channels), (layers - 1, taps, channels, 2 * channels), (layers, channels, channels),
        (layers, channels), (layers, channels, skips), (skips,), (skips, out_hidden), (out_hidden,),
        (out_hidden, outputs), (outputs,),
    )
    for name, tensor, shape in zip(_ARGUMENTS, tensors, expected):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
    if min(width, features, taps, layers, channels, skips, out_hidden, outputs) < 1:
        raise ValueError(f"W, F, kw, L, C, S, M and O must be at least 1, got x_row {list(x_row.shape)}, "
                         f"w_in {list(w_in.shape)}, w_res {list(w_res.shape)}, b_skip {list(b_skip.shape)}, "
                         f"b_out1 {list(b_out1.shape)}, b_out2 {list(b_out2.shape)}")
    if not 0 <= col < width:
        raise ValueError(f"col must be in [0, {width}), got {col}")


def pixelcnn_step(x_row, h_row, v_row, col, w_in, w_hidden, w_res, b_res, w_skip, b_skip, w_out1, b_out1, w_out2,
                  b_out2):
    """One column of cached PixelCNN decoding, all layers (module docstring).

    Args:
        x_row: [N, W, F] float32/float64 contiguous tensor: input features of the row.
        h_row: [L, N, W, C]: horizontal features of the row (columns < col are read).
        v_row: [L, N, W, 2C]: vertical-stack contribution to each layer's gate pre-activation.
        col: int column, 0 <= col < W.
        w_in [kw, F, 2C], w_hidden [L - 1, kw, C, 2C], w_res [L, C, C], b_res [L, C], w_skip [L, C, S],
        b_skip [S], w_out1 [S, M], b_out1 [M], w_out2 [M, O], b_out2 [O]: the weights, same dtype and
        device, contiguous.

    Returns:
        (logits [N, O], h_col [L, N, C]), new tensors in the input dtype.
    """
    tensors = (x_row, h_row, v_row, w_in, w_hidden, w_res, b_res, w_skip, b_skip, w_out1, b_out1, w_out2, b_out2)
    col = int(col)
    _check(tensors, col)
    n, width, features = x_row.shape
    taps, (layers, channels) = w_in.shape[0], w_res.shape[:2]
    skips, out_hidden, outputs = b_skip.shape[0], b_out1.shape[0], b_out2.shape[0]
    logits = torch.empty((n, outputs), dtype=x_row.dtype, device=x_row.device)
    h_col = torch.empty((layers, n, channels), dtype=x_row.dtype, device=x_row.device)
    if n == 0:
        return logits, h_col
    scratch_stride = max(channels, out_hidden) + skips
    scratch = torch.empty((n, scratch_stride), dtype=x_row.dtype, device=x_row.device)
    with on_device(x_row.device):
        _pixelcnn_step_kernel[(triton.cdiv(n, _BLOCK_N),)](
            *tensors, logits, h_col, scratch, scratch_stride, n, width, features, channels, layers, taps, skips,
            out_hidden, outputs, col, BLOCK_N=_BLOCK_N, BLOCK_OUT=_BLOCK_OUT, BLOCK_K=_BLOCK_K,
            TANH_TERMS=_TANH_TERMS[x_row.dtype], **_launch_options(x_row.device),
        )
    return logits, h_col
