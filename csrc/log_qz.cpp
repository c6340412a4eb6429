// Schemas of the aggregate-posterior log-density op (beta-TCVAE / HFVAE). The kernels behind them
// live in cpu/log_qz_cpu.cpp and cuda/log_qz_cuda.cu; the wrapper, the MWS / MSS weights and the
// reference are in aelearn/ops/log_qz.py.
//
// z, mu, logvar: [B, D] (same dtype and device); group_of_dim: int64 [D] with values in
// [0, num_groups), every group non-empty. With
//   l_ijd = -0.5 * (log(2 pi) + logvar_jd + (z_id - mu_jd)^2 * exp(-logvar_jd))
// and the log-weight w_ij = log_w_self if j == i, else log_w_next if j == (i + 1) mod B, else
// log_w_other, log_qz_forward returns, in the input dtype,
//   log_qz [B]:           log_qz_i = logsumexp_j (sum_d l_ijd + w_ij)
//   log_qz_groups [B, G]: log_qz_groups_ig = logsumexp_j (sum_{d: group_of_dim[d] == g} l_ijd + w_ij).
//
// log_qz_backward returns (grad_z, grad_mu, grad_logvar) in the input dtype: the gradients of
//   sum_i grad_log_qz_i * log_qz_i + sum_{i,g} grad_log_qz_groups_ig * log_qz_groups_ig
// given the forward's outputs log_qz and log_qz_groups (used to normalise the softmax weights, as in
// FlashAttention's backward), never materialising a [B, B] or [B, B, D] tensor.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(aelearn, m) {
  m.def(
      "log_qz_forward(Tensor z, Tensor mu, Tensor logvar, Tensor group_of_dim, int num_groups, "
      "float log_w_self, float log_w_next, float log_w_other) -> (Tensor, Tensor)");
  m.def(
      "log_qz_backward(Tensor z, Tensor mu, Tensor logvar, Tensor group_of_dim, int num_groups, "
      "float log_w_self, float log_w_next, float log_w_other, Tensor log_qz, Tensor log_qz_groups, "
      "Tensor grad_log_qz, Tensor grad_log_qz_groups) -> (Tensor, Tensor, Tensor)");
}
