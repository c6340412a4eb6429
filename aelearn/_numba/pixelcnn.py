"""Numba CPU backend of the incremental step of cached PixelCNN decoding.

One entry point, with the meaning fixed by the backend contract (csrc/pixelcnn.cpp, formula and
shapes in the docstring of aelearn/ops/pixelcnn.py):

* ``pixelcnn_step(x_row, h_row, v_row, col, w_in, w_hidden, w_res, b_res, w_skip, b_skip, w_out1,
  b_out1, w_out2, b_out2)`` -> ``(logits [N, O], h_col [L, N, C])``, contiguous CPU tensors of one
  dtype (float32 or float64).

How it is evaluated:

* The images are cut into blocks; each block (one parallel task, or the whole batch serially) runs
  the full chain of L layers for its rows, so no barrier separates the layers. Per-block buffers
  hold ``rows x (kw max(F, C) + 4C + L C + S + M + O)`` values; nothing grows with N x N.
* Every product is one `aelearn._numba._tiles.tile_matmul` of the block's rows against a weight
  matrix read in place, in the contract's ``[in, out]`` layout (out contiguous): the taps of a
  layer are contiguous in ``w_in [kw, F, 2C]`` and ``w_hidden[l - 1] [kw, C, 2C]``, so packing the
  block's window of inputs (the cached columns followed by the current one) into one row of
  ``kw F`` or ``kw C`` values turns the layer's convolution into a single product of depth
  ``kw F`` or ``kw C``. Taps left of column 0 are padding: they are left out of the window and of
  the weights' rows, never multiplied by zeros.
* The skip sum over layers is one product too: the gates of all layers are kept side by side
  (``[rows, L C]``) and multiplied once by ``w_skip`` viewed as ``[L C, S]``.
* Every output is summed in a fixed order that depends neither on the block nor on the thread
  count, so the step is bitwise reproducible. Arithmetic runs in the input dtype.
* tanh and sigmoid use the branch-free exp / expm1 of `aelearn._numba._common`, so their loops
  vectorise: ``tanh|x| = -expm1(-2|x|) / (2 + expm1(-2|x|))`` has no cancellation near 0, and
  ``sigmoid(y) = (1 or exp(-|y|)) / (1 + exp(-|y|))`` never overflows.
"""

import numba
import numpy as np
import torch
from numba import prange

from aelearn._numba._common import FMA_FLAGS as _FMA_FLAGS
from aelearn._numba._common import checked_numpy as _checked_numpy
from aelearn._numba._common import exp_nonpositive as _exp_nonpositive
from aelearn._numba._common import expm1_nonpositive as _expm1_nonpositive
from aelearn._numba._common import jit as _jit
from aelearn._numba._tiles import ROW_GROUP as _ROW_GROUP
from aelearn._numba._tiles import tile_matmul as _tile_matmul

__all__ = ["pixelcnn_step"]

# Multiply-adds per parallel task at least (~25 µs of one core's work): a parallel region costs a few
# µs to start and to join, so below two such tasks the batch runs serially on the calling thread. At
# size A (C = 64, L = 12) one image is ~0.3 M multiply-adds: N = 8 and more run in parallel.
_MIN_TASK_MACS = 1_000_000


@_jit(fastmath=_FMA_FLAGS)
def _gated_activation(pre, rows, channels, gates, offset):
    """``gates[r, offset + c] = tanh(pre[r, c]) * sigmoid(pre[r, C + c])`` for r < rows, c < C = channels.

    pre: ``[>= rows, 2C]``; gates: C-contiguous ``[>= rows, >= offset + C]``. Passing the whole buffer
    and an offset rather than a column slice keeps the store unit-stride for numba: the loop over a
    sliced (layout "A") array does not vectorise, which made it seven times slower.
    """
    one = pre.dtype.type(1)
    two = pre.dtype.type(2)
    for r in range(rows):
        for c in range(channels):
            x = pre[r, c]
            em = _expm1_nonpositive(-(abs(x) + abs(x)))
            magnitude = -em / (two + em)
            tanh_x = -magnitude if x < 0 else magnitude
            y = pre[r, channels + c]
            e = _exp_nonpositive(-abs(y))
            sigmoid_y = (one if y >= 0 else e) / (one + e)
            gates[r, offset + c] = tanh_x * sigmoid_y


@_jit(fastmath=_FMA_FLAGS)
def _run_block(x_row, h_row, v_row, col, w_in, w_hidden, w_res, b_res, w_skip, b_skip, w_out1, b_out1, w_out2,
               b_out2, row0, rows, logits, h_col):
    """The step for images ``row0 .. row0 + rows - 1``: writes their rows of logits and of h_col.

    Shapes as in `pixelcnn_step`. Buffers have ``ceil(rows / ROW_GROUP) * ROW_GROUP`` rows, the
    padding that `tile_matmul` writes to.
    """
    dtype = x_row.dtype
    num_layers, channels = w_res.shape[0], w_res.shape[1]
    taps, features, width2 = w_in.shape
    skips, hidden, outputs = w_skip.shape[2], w_out1.shape[1], w_out2.shape[1]
    # The taps that fall on columns >= 0: first_tap .. taps - 1, starting at column first_col.
    first_tap = max(taps - 1 - col, 0)
    first_col = col - (taps - 1) + first_tap
    used_taps = taps - first_tap
    padded = -(-rows // _ROW_GROUP) * _ROW_GROUP
    window = np.empty((rows, used_taps * max(features, channels)), dtype)
    pre = np.empty((padded, width2), dtype)
    gates = np.empty((padded, num_layers * channels), dtype)
    residual = np.empty((padded, channels), dtype)
    current = np.empty((rows, channels), dtype)
    skip = np.empty((padded, skips), dtype)
    hid = np.empty((padded, hidden), dtype)
    out = np.empty((padded, outputs), dtype)

    for r in range(rows):
        source = x_row[row0 + r]
        for t in range(used_taps):
            for f in range(features):
                window[r, t * features + f] = source[first_col + t, f]
    _tile_matmul(window, rows, used_taps * features, w_in[first_tap:].reshape(used_taps * features, width2), width2,
                 pre)
    for layer in range(num_layers):
        if layer > 0:
            cached = h_row[layer - 1]
            for r in range(rows):
                for t in range(used_taps - 1):
                    for c in range(channels):
                        window[r, t * channels + c] = cached[row0 + r, first_col + t, c]
                for c in range(channels):
                    window[r, (used_taps - 1) * channels + c] = current[r, c]
            weights = w_hidden[layer - 1, first_tap:].reshape(used_taps * channels, width2)
            _tile_matmul(window, rows, used_taps * channels, weights, width2, pre)
        for r in range(rows):
            vertical = v_row[layer, row0 + r, col]
            for o in range(width2):
                pre[r, o] += vertical[o]
        _gated_activation(pre, rows, channels, gates, layer * channels)
        _tile_matmul(gates[:, layer * channels:], rows, channels, w_res[layer], channels, residual)
        bias = b_res[layer]
        for r in range(rows):
            for c in range(channels):
                h = residual[r, c] + bias[c]
                current[r, c] = h + current[r, c] if layer > 0 else h
                h_col[layer, row0 + r, c] = current[r, c]

    _tile_matmul(gates, rows, num_layers * channels, w_skip.reshape(num_layers * channels, skips), skips, skip)
    zero = dtype.type(0)
    for r in range(rows):
        for s in range(skips):
            skip[r, s] = max(skip[r, s] + b_skip[s], zero)
    _tile_matmul(skip, rows, skips, w_out1, hidden, hid)
    for r in range(rows):
        for m in range(hidden):
            hid[r, m] = max(hid[r, m] + b_out1[m], zero)
    _tile_matmul(hid, rows, hidden, w_out2, outputs, out)
    for r in range(rows):
        for o in range(outputs):
            logits[row0 + r, o] = out[r, o] + b_out2[o]


@_jit()
def _step_serial(x_row, h_row, v_row, col, w_in, w_hidden, w_res, b_res, w_skip, b_skip, w_out1, b_out1, w_out2,
                 b_out2, logits, h_col):
    """The whole batch as one block, on the calling thread."""
    if x_row.shape[0] > 0:
        _run_block(x_row, h_row, v_row, col, w_in, w_hidden, w_res, b_res, w_skip, b_skip, w_out1, b_out1, w_out2,
                   b_out2, 0, x_row.shape[0], logits, h_col)


@_jit(parallel=True)
def _step_parallel(x_row, h_row, v_row, col, w_in, w_hidden, w_res, b_res, w_skip, b_skip, w_out1, b_out1,
                   w_out2, b_out2, tasks, logits, h_col):
    """The batch in ``tasks`` blocks of consecutive images, one per parallel iteration.

    Blocks start at multiples of ROW_GROUP, the rows `tile_matmul` handles together, so that only the
    last block has a partial group of padding rows.
    """
    n = x_row.shape[0]
    groups = -(-n // _ROW_GROUP)
    for task in prange(tasks):
        # prange indices may be unsigned; mixing them with signed ints would promote to float64.
        row0 = min(np.int64(task) * groups // tasks * _ROW_GROUP, n)
        row1 = min((np.int64(task) + 1) * groups // tasks * _ROW_GROUP, n)
        _run_block(x_row, h_row, v_row, col, w_in, w_hidden, w_res, b_res, w_skip, b_skip, w_out1, b_out1, w_out2,
                   b_out2, row0, row1 - row0, logits, h_col)


def pixelcnn_step(x_row, h_row, v_row, col, w_in, w_hidden, w_res, b_res, w_skip, b_skip, w_out1, b_out1, w_out2,
                  b_out2):
    """``(logits [N, O], h_col [L, N, C])``: all L layers of column ``col`` for N images.

    Shapes (module docstring of aelearn/ops/pixelcnn.py): x_row ``[N, W, F]``, h_row ``[L, N, W, C]``,
    v_row ``[L, N, W, 2C]``, w_in ``[kw, F, 2C]``, w_hidden ``[L - 1, kw, C, 2C]``, w_res ``[L, C, C]``,
    b_res ``[L, C]``, w_skip ``[L, C, S]``, b_skip ``[S]``, w_out1 ``[S, M]``, b_out1 ``[M]``, w_out2
    ``[M, O]``, b_out2 ``[O]``; contiguous CPU tensors of one dtype (float32 or float64), finite
    (checked by the wrapper); 0 <= col < W. Returns new tensors.
    """
    if not isinstance(x_row, torch.Tensor) or x_row.dtype not in (torch.float32, torch.float64):
        got = getattr(x_row, "dtype", type(x_row).__name__)
        raise ValueError(f"x_row must be a float32 or float64 tensor, got {got}")
    dtype = x_row.dtype
    x = _checked_numpy(x_row, "x_row", (None, None, None), dtype)
    n, width, features = x.shape
    res = _checked_numpy(w_res, "w_res", (None, None, None), dtype)
    layers, channels = res.shape[:2]
    if layers < 1 or res.shape[2] != channels:
        raise ValueError(f"w_res must have shape [L, C, C] with L >= 1, got {list(w_res.shape)}")
    first = _checked_numpy(w_in, "w_in", (None, features, 2 * channels), dtype)
    taps = first.shape[0]
    if taps < 1:
        raise ValueError(f"w_in must have at least one tap, got shape {list(w_in.shape)}")
    skip_weights = _checked_numpy(w_skip, "w_skip", (layers, channels, None), dtype)
    out1 = _checked_numpy(w_out1, "w_out1", (skip_weights.shape[2], None), dtype)
    out2 = _checked_numpy(w_out2, "w_out2", (out1.shape[1], None), dtype)
    skips, hidden, outputs = skip_weights.shape[2], out1.shape[1], out2.shape[1]
    if isinstance(col, bool) or not isinstance(col, int) or not 0 <= col < width:
        raise ValueError(f"col must be an int in [0, {width}), got {col!r}")
    arrays = (
        x,
        _checked_numpy(h_row, "h_row", (layers, n, width, channels), dtype),
        _checked_numpy(v_row, "v_row", (layers, n, width, 2 * channels), dtype),
        col,
        first,
        _checked_numpy(w_hidden, "w_hidden", (layers - 1, taps, channels, 2 * channels), dtype),
        res,
        _checked_numpy(b_res, "b_res", (layers, channels), dtype),
        skip_weights,
        _checked_numpy(b_skip, "b_skip", (skips,), dtype),
        out1,
        _checked_numpy(b_out1, "b_out1", (hidden,), dtype),
        out2,
        _checked_numpy(b_out2, "b_out2", (outputs,), dtype),
    )
    logits = np.empty((n, outputs), x.dtype)
    h_col = np.empty((layers, n, channels), x.dtype)
    image_macs = layers * (taps * max(features, channels) * 2 * channels + channels * (channels + skips))
    tasks = min(numba.get_num_threads(), -(-n // _ROW_GROUP), n * image_macs // _MIN_TASK_MACS)
    if tasks > 1:
        _step_parallel(*arrays, tasks, logits, h_col)
    else:
        _step_serial(*arrays, logits, h_col)
    return torch.from_numpy(logits), torch.from_numpy(h_col)
