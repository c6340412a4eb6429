// Schema of the incremental step of cached PixelCNN decoding. The kernels behind it live in
// cpu/pixelcnn_cpu.cpp and cuda/pixelcnn_cuda.cu; the wrapper, the reference and the model are in
// aelearn/ops/pixelcnn.py and aelearn/models/pixelcnn.py.
//
// One column j of one row of a gated PixelCNN, all L layers, for N images (C channels, F input
// features, kw horizontal taps, S skip, M output-hidden and O output channels):
//   x_row  [N, W, F]      input features of the row (columns j - kw + 1 .. j are read)
//   h_row  [L, N, W, C]   horizontal features of the row (columns j - kw + 1 .. j - 1 are read)
//   v_row  [L, N, W, 2C]  vertical-stack contribution (with biases and conditioning) per layer
//   col    int            j, 0 <= j < W; columns left of 0 are zero padding
//   w_in [kw, F, 2C], w_hidden [L-1, kw, C, 2C], w_res [L, C, C], b_res [L, C], w_skip [L, C, S],
//   b_skip [S], w_out1 [S, M], b_out1 [M], w_out2 [M, O], b_out2 [O]
// returns logits [N, O] and h_col [L, N, C]:
//   a_0 = sum_t x_row[:, j-kw+1+t] w_in[t] + v_row[0, :, j]
//   a_l = sum_{t<kw-1} h_row[l-1, :, j-kw+1+t] w_hidden[l-1, t] + h_{l-1} w_hidden[l-1, kw-1] + v_row[l, :, j]
//   g_l = tanh(a_l[:, :C]) * sigmoid(a_l[:, C:]),  h_l = [l > 0] h_{l-1} + g_l w_res[l] + b_res[l]
//   s = b_skip + sum_l g_l w_skip[l],  logits = relu(relu(s) w_out1 + b_out1) w_out2 + b_out2
// All tensors share one floating dtype (float32 or float64) and device and are contiguous.
// Forward only.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(aelearn, m) {
  m.def(
      "pixelcnn_step(Tensor x_row, Tensor h_row, Tensor v_row, int col, Tensor w_in, Tensor w_hidden, "
      "Tensor w_res, Tensor b_res, Tensor w_skip, Tensor b_skip, Tensor w_out1, Tensor b_out1, "
      "Tensor w_out2, Tensor b_out2) -> (Tensor, Tensor)");
}
