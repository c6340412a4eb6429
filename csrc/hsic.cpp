// Schemas of the HSIC op family. The kernels behind them live in cpu/hsic_cpu.cpp and
// cuda/hsic_cuda.cu; the autograd wrapper, the estimators and the reference are in
// aelearn/ops/hsic.py.
//
// x: [n, p] and y: [n, q] are paired samples (same dtype and device). K_ij = k(x_i, x_j) with
// kernel_x, L_ij = l(y_i, y_j) with kernel_y, each one of (r = ||a - b||^2):
//   "rbf"    sum_s exp(-params[s] * r)          (params are gamma_s = 1 / (2 sigma_s^2))
//   "imq"    sum_s params[s] / (params[s] + r)
//   "linear" a . b                              (params empty)
//   "delta"  1 if a_0 == b_0 else 0             (kernel_y only; y is [n, 1] of integer-valued
//                                                label ids; params empty; no gradient for y)
// The pairs P are all ordered (i, j), or those with i != j when exclude_diagonal is true (with the
// diagonal included, r_ii = 0 exactly).
//
// hsic_sums returns float64 (pair_sum [], row_k [n], row_l [n]):
//   pair_sum = sum_{(i,j) in P} K_ij L_ij,   row_k_i = sum_{j: (i,j) in P} K_ij,   row_l likewise.
//
// hsic_grads returns (gx, gy) in the input dtype: the gradients of
//   F = c1 * sum_{(i,j) in P} K_ij L_ij + c2 * sum_i row_k_i row_l_i + c3 * (sum_i row_k_i)(sum_i row_l_i)
// with respect to x and y, where row_k and row_l are the row sums above, handed in as computed by
// hsic_sums. gy is zeros for kernel_y "delta".
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(aelearn, m) {
  m.def(
      "hsic_sums(Tensor x, Tensor y, str kernel_x, float[] params_x, str kernel_y, float[] params_y, "
      "bool exclude_diagonal) -> (Tensor, Tensor, Tensor)");
  m.def(
      "hsic_grads(Tensor x, Tensor y, str kernel_x, float[] params_x, str kernel_y, float[] params_y, "
      "bool exclude_diagonal, Tensor row_k, Tensor row_l, float c1, float c2, float c3) -> (Tensor, Tensor)");
}
