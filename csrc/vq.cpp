// Schema of the nearest-codebook search of vector quantisation (VQ-VAE). The kernels behind it live
// in cpu/vq_cpu.cpp and cuda/vq_cuda.cu; the wrapper, the gradient and the reference are in
// aelearn/ops/vq.py.
//
// z: [N, D], codebook: [K, D] (same dtype and device, contiguous, finite; K >= 1, D >= 1, N >= 0).
// vq_nearest returns
//   indices [N] int64:  indices_n = argmin_k d_nk,  d_nk = sum_d (z_nd - codebook_kd)^2 evaluated in
//                       float64 from the inputs (direct differences), ties to the lowest k;
//   sqdist  [N]:        d_n,indices_n rounded to the input dtype (never negative).
// Kernels search with matrix-product tiles of ||e_k||^2 - 2 z_n . e_k in the input dtype on data
// centred on the codebook mean, keep the best and second-best score of each row, and certify the
// winner with a rounding-error bound; rows the bound cannot separate are searched again in float64
// by direct differences. Nothing of size N x K is ever held.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(aelearn, m) {
  m.def("vq_nearest(Tensor z, Tensor codebook) -> (Tensor, Tensor)");
}
