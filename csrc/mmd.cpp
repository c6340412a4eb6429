// Schemas of the MMD op family. The kernels behind them live in cpu/mmd_cpu.cpp and
// cuda/mmd_cuda.cu; the autograd wrapper and the reference are in aelearn/ops/mmd.py.
//
// kernel is "rbf" (k = sum_s exp(-params[s] * r), params are gamma_s = 1 / (2 sigma_s^2)),
// "imq" (k = sum_s params[s] / (params[s] + r)) or "linear" (k = a.b, params empty), where
// r = ||a - b||^2.
//
// mmd_sums returns float64 [3] = (S_xx, S_yy, S_xy): the sums of k over ordered pairs of
// x with x, y with y and x with y. With unbiased=true the diagonal pairs (i, i) are left out
// of S_xx and S_yy; otherwise they are included with r_ii = 0 exactly.
//
// mmd_grads returns (gx, gy) in the input dtype:
//   gx = coeff_xx * dS_xx/dx + coeff_xy * dS_xy/dx,   gy = coeff_yy * dS_yy/dy + coeff_xy * dS_xy/dy.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(aelearn, m) {
  m.def("mmd_sums(Tensor x, Tensor y, str kernel, float[] params, bool unbiased) -> Tensor");
  m.def(
      "mmd_grads(Tensor x, Tensor y, str kernel, float[] params, bool unbiased, "
      "float coeff_xx, float coeff_yy, float coeff_xy) -> (Tensor, Tensor)");
}
