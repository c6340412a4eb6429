"""The incremental step of cached PixelCNN decoding (Ramachandran et al. 2017, "Fast Generation for
Convolutional Autoregressive Models").

A gated PixelCNN (van den Oord et al. 2016, :class:`aelearn.models.PixelCNN`) has a vertical stack,
whose row i depends only on rows above i, and a horizontal stack along the row. Decoding pixel
(i, j) needs, per layer, the horizontal features of the previous ``kw − 1`` columns of row i (a
cache), the vertical stack's contribution at (i, j) (computed once per row for the whole row), and
the new pixel's own already-generated channels. ``pixelcnn_step`` computes the horizontal chain of
all L layers at one column, for a batch of N images, and the output logits there:

    layer 0:  a_0 = Σ_t x_row[:, j − kw + 1 + t] · w_in[t]            + v_row[0, :, j]
    layer l:  a_l = Σ_{t < kw−1} h_row[l − 1, :, j − kw + 1 + t] · w_hidden[l − 1, t]
                    + h_l−1 · w_hidden[l − 1, kw − 1]                   + v_row[l, :, j]
              g_l = tanh(a_l[:, :C]) ⊙ σ(a_l[:, C:])                    (gated activation)
              h_l = [l > 0] h_l−1 + g_l · w_res[l] + b_res[l]           (residual, h_l = h_col[l])
    skips:    s = b_skip + Σ_l g_l · w_skip[l]
    output:   logits = relu(relu(s) · w_out1 + b_out1) · w_out2 + b_out2

Columns left of 0 are zero padding. Tap ``kw − 1`` is the current column: its weights carry the
model's channel masks (mask A at layer 0, B above), so the step never looks at channels not yet
generated. The horizontal conv biases and every conditioning term are already in ``v_row``.

Shapes (N images, W columns, F input features, C channels, L layers, S skip and M output-hidden
channels, O logits, kw horizontal taps):

    x_row    [N, W, F]      input features of row i (embedded values; ungenerated ones are 0)
    h_row    [L, N, W, C]   horizontal features of row i; columns < j are read, the rest ignored
    v_row    [L, N, W, 2C]  vertical-stack contribution to each layer's gate pre-activation
    col      int            the column j, 0 ≤ j < W
    w_in     [kw, F, 2C]    w_hidden [L − 1, kw, C, 2C]
    w_res    [L, C, C]      b_res    [L, C]
    w_skip   [L, C, S]      b_skip   [S]
    w_out1   [S, M]         b_out1   [M]
    w_out2   [M, O]         b_out2   [O]
    returns  logits [N, O], h_col [L, N, C] (the h_l of column j, to store in the cache)

Every tensor has the same floating dtype and device and is contiguous. The step is forward-only
(decoding needs no gradient). The contract of the compiled kernels is in ``csrc/pixelcnn.cpp``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from aelearn import _ext
from aelearn.ops import _registry
from aelearn.ops._backends import register_standard_backends
from aelearn.ops._kernels import check_finite

# Logits of a 12-layer chain: float32 accumulation over ~(kw + 2)·C terms per layer, compounding
# through the residual stream.
TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-12, 1e-10)}


class StepWeights(NamedTuple):
    """The weights of :func:`pixelcnn_step`, in its argument order (shapes in the module docstring)."""

    w_in: torch.Tensor
    w_hidden: torch.Tensor
    w_res: torch.Tensor
    b_res: torch.Tensor
    w_skip: torch.Tensor
    b_skip: torch.Tensor
    w_out1: torch.Tensor
    b_out1: torch.Tensor
    w_out2: torch.Tensor
    b_out2: torch.Tensor


def _window(row: torch.Tensor, col: int, taps: int) -> torch.Tensor:
    """``row[..., col − taps + 1 : col + 1, :]`` with zero columns left of 0: ``[..., taps, features]``."""
    start = col - taps + 1
    window = row[..., max(start, 0) : col + 1, :]
    if start < 0:
        zeros = row.new_zeros(*row.shape[:-2], -start, row.shape[-1])
        window = torch.cat([zeros, window], dim=-2)
    return window


def reference_pixelcnn_step(x_row, h_row, v_row, col, w_in, w_hidden, w_res, b_res, w_skip, b_skip, w_out1, b_out1, w_out2, b_out2):
    """``(logits [N, O], h_col [L, N, C])`` of one column — the specification (module docstring)."""
    taps, channels = w_in.shape[0], w_res.shape[1]
    num_layers = w_res.shape[0]
    a = torch.einsum("ntf,tfo->no", _window(x_row, col, taps), w_in) + v_row[0, :, col]
    skip = b_skip.expand(x_row.shape[0], -1)
    h_prev = None
    h_col = []
    for layer in range(num_layers):
        if layer > 0:
            cached = _window(h_row[layer - 1], col, taps)[:, :-1]
            weights = w_hidden[layer - 1]
            a = torch.einsum("ntc,tco->no", cached, weights[:-1]) + h_prev @ weights[-1] + v_row[layer, :, col]
        gate = torch.tanh(a[:, :channels]) * torch.sigmoid(a[:, channels:])
        h = gate @ w_res[layer] + b_res[layer]
        h_prev = h if layer == 0 else h_prev + h
        h_col.append(h_prev)
        skip = skip + gate @ w_skip[layer]
    hidden = torch.relu(torch.relu(skip) @ w_out1 + b_out1)
    return hidden @ w_out2 + b_out2, torch.stack(h_col)


def _shape_error(name: str, tensor: torch.Tensor, expected: tuple, meaning: str) -> ValueError:
    return ValueError(f"{name} must have shape [{meaning}] = {list(expected)}, got {list(tensor.shape)}")


def check_step_inputs(x_row, h_row, v_row, col, weights: StepWeights) -> None:
    """A ValueError/TypeError naming the argument unless the inputs follow the contract."""
    tensors = {"x_row": x_row, "h_row": h_row, "v_row": v_row, **weights._asdict()}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
        if tensor.dtype != x_row.dtype:
            raise TypeError(f"{name} must have the dtype of x_row ({x_row.dtype}), got {tensor.dtype}")
        if tensor.device != x_row.device:
            raise ValueError(f"{name} must be on x_row's device ({x_row.device}), got {tensor.device}")
    if x_row.dim() != 3:
        raise ValueError(f"x_row must have shape [N, W, F], got {list(x_row.shape)}")
    n, width, features = x_row.shape
    if weights.w_res.dim() != 3 or weights.w_res.shape[1] != weights.w_res.shape[2] or weights.w_res.shape[0] < 1:
        raise ValueError(f"w_res must have shape [L, C, C] with L ≥ 1, got {list(weights.w_res.shape)}")
    layers, channels = weights.w_res.shape[:2]
    if weights.w_in.dim() != 3 or weights.w_in.shape[0] < 1:
        raise ValueError(f"w_in must have shape [kw, F, 2C] with kw ≥ 1, got {list(weights.w_in.shape)}")
    taps = weights.w_in.shape[0]
    skips = weights.b_skip.shape[0] if weights.b_skip.dim() == 1 else -1
    hidden = weights.b_out1.shape[0] if weights.b_out1.dim() == 1 else -1
    outputs = weights.b_out2.shape[0] if weights.b_out2.dim() == 1 else -1
    expected = {
        "h_row": ((layers, n, width, channels), "L, N, W, C"),
        "v_row": ((layers, n, width, 2 * channels), "L, N, W, 2C"),
        "w_in": ((taps, features, 2 * channels), "kw, F, 2C"),
        "w_hidden": ((layers - 1, taps, channels, 2 * channels), "L − 1, kw, C, 2C"),
        "b_res": ((layers, channels), "L, C"),
        "w_skip": ((layers, channels, skips), "L, C, S"),
        "b_skip": ((skips,), "S"),
        "w_out1": ((skips, hidden), "S, M"),
        "b_out1": ((hidden,), "M"),
        "w_out2": ((hidden, outputs), "M, O"),
        "b_out2": ((outputs,), "O"),
    }
    for name, (shape, meaning) in expected.items():
        if tuple(tensors[name].shape) != shape or min(shape, default=1) < 0:
            raise _shape_error(name, tensors[name], shape, meaning)
    if isinstance(col, bool) or not isinstance(col, int) or not 0 <= col < width:
        raise ValueError(f"col must be an int in [0, {width}), got {col!r}")
    # Only what the step reads must be finite (the rest of a row is ignored by the contract, and
    # checking whole rows would cost more than the step itself).
    first = max(col - taps + 1, 0)
    read = {**tensors, "x_row": x_row[:, first : col + 1], "h_row": h_row[:, :, first:col], "v_row": v_row[:, :, col]}
    for name, tensor in read.items():
        check_finite(name, tensor)


def pixelcnn_step(x_row, h_row, v_row, col: int, weights: StepWeights, *, backend: str | None = None):
    """``(logits [N, O], h_col [L, N, C])`` of column ``col`` on a backend (module docstring)."""
    check_step_inputs(x_row, h_row, v_row, col, weights)
    args = (x_row.contiguous(), h_row.contiguous(), v_row.contiguous(), col, *(w.contiguous() for w in weights))
    impl = _registry.select("pixelcnn_step", x_row.device, x_row.dtype, *args, backend=backend)
    with torch.no_grad():
        return impl.forward(*args)


register_standard_backends(
    "pixelcnn_step",
    reference=reference_pixelcnn_step,
    forward="pixelcnn_step",
    backward=None,
    module="pixelcnn",
    tolerances=TOLERANCES,
)


def _register_fake_kernels() -> None:
    """Shapes of the extension's outputs for torch.compile and FakeTensor tracing."""

    @torch.library.register_fake("aelearn::pixelcnn_step")
    def _(x_row, h_row, v_row, col, w_in, w_hidden, w_res, b_res, w_skip, b_skip, w_out1, b_out1, w_out2, b_out2):
        return x_row.new_empty(x_row.shape[0], w_out2.shape[1]), h_row.new_empty(h_row.shape[0], h_row.shape[1], h_row.shape[3])


if _ext.extension() is not None:
    _register_fake_kernels()
