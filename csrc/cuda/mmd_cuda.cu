// CUDA backend of the MMD op family (schemas in ../mmd.cpp): tiled kernel sums and gradients.
//
// Algorithm (the same as the Triton backend in kernels/mmd.py, so both check the same way):
// a thread block owns one tile of kTile rows of a and walks a range of column tiles of b.
// For every tile pair the dot products a_i . b_j are accumulated over kChunk-wide slices of the
// feature dimension staged in shared memory, so any d works; squared distances are
// r = ||a_i||^2 + ||b_j||^2 - 2 a_i . b_j clamped at 0, with the row norms precomputed once
// (O(n + m) extra memory). No n x m matrix is ever formed. When there are few row tiles the
// column tiles are split into contiguous ranges over another grid axis; every block writes
// its own float64 partial and ATen adds them up, so there are no atomics and the result does
// not depend on scheduling.
//
// Numerics: everything is computed in the input dtype (float or double, plain FMA; no TF32),
// summed in the input dtype only within one tile (at most kMicro^2 values per thread in the
// forward pass, one tile row in the backward pass) and in double across tiles and blocks.
// Diagonal pairs of the within-sample sums are masked, never subtracted: excluded when
// unbiased, r := 0 exactly when biased.
//
// Symmetry: S_xx and S_yy visit only column tiles >= the row tile and count off-diagonal tiles
// twice. The backward pass visits every column tile (using symmetry there would need scattered
// atomic updates of other rows).
//
// Thread layout and the shared building blocks (dot tiles, G @ z tiles, kernel profiles): common.cuh.
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>

#include "common.cuh"

namespace {

using namespace aelearn::cuda;

// Partial sum of k(a_i, b_j) for row tile blockIdx.x over the column tiles of split blockIdx.y.
// With same (a is b) only column tiles >= the row tile are visited; off-diagonal tiles count
// twice, the diagonal tile (holding both orders of its pairs) once.
template <typename scalar_t, KernelKind kKind>
__global__ void __launch_bounds__(kThreads) mmd_fwd_kernel(
    const scalar_t* __restrict__ a,        // [n_a, d] row sample
    const scalar_t* __restrict__ b,        // [n_b, d] column sample (a itself when same)
    const scalar_t* __restrict__ a_norms,  // [n_a] ||a_i||^2
    const scalar_t* __restrict__ b_norms,  // [n_b] ||b_j||^2
    int64_t n_a,
    int64_t n_b,
    int64_t d,
    const __grid_constant__ Bandwidths<scalar_t> params,
    bool same,
    bool unbiased,
    int64_t tiles_per_split,
    double* __restrict__ partials) {  // [gridDim.x * gridDim.y] one partial per block
  constexpr int kMicro = TileShape<scalar_t>::kMicro;
  constexpr int kTile = TileShape<scalar_t>::kTile;
  __shared__ OperandSlices<scalar_t> slices;
  const int tx = threadIdx.x % kSide;
  const int ty = threadIdx.x / kSide;
  const int64_t row_tile = blockIdx.x;
  const int64_t row0 = row_tile * kTile;

  scalar_t my_a_norms[kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t row = row0 + ty + kSide * i;
    my_a_norms[i] = row < n_a ? a_norms[row] : scalar_t(0);
  }

  const int64_t col_tiles = (n_b + kTile - 1) / kTile;
  int64_t first = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  const int64_t last = std::min(first + tiles_per_split, col_tiles);
  if (same) {
    first = std::max(first, row_tile);
  }

  double total = 0.0;
  for (int64_t col_tile = first; col_tile < last; ++col_tile) {
    const int64_t col0 = col_tile * kTile;
    scalar_t dots[kMicro][kMicro];
    dot_tile(a, b, row0, col0, n_a, n_b, d, slices, dots);
    // Within the tile in the input dtype, across tiles in double.
    scalar_t tile_sum = 0;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t col = col0 + tx + kSide * j;
      const scalar_t b_norm = col < n_b ? b_norms[col] : scalar_t(0);
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
        const int64_t row = row0 + ty + kSide * i;
        const bool diagonal = same && row == col;
        if (row >= n_a || col >= n_b || (diagonal && unbiased)) {
          continue;
        }
        if constexpr (kKind == KernelKind::Linear) {
          tile_sum += dots[i][j];
        } else {
          const scalar_t r =
              diagonal ? scalar_t(0)
                       : max(my_a_norms[i] + b_norm - scalar_t(2) * dots[i][j], scalar_t(0));
          tile_sum += kernel_profile<scalar_t, kKind, true, false>(r, params).value;
        }
      }
    }
    total += (same && col_tile != row_tile ? 2.0 : 1.0) * static_cast<double>(tile_sum);
  }

  total = block_sum(total);
  if (threadIdx.x == 0) {
    partials[static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y] = total;
  }
}

// Gradient partials for row tile blockIdx.x, output feature tile blockIdx.y, split blockIdx.z:
//   sum over the split's column tiles of coeff * (a_i * rowsum(G) - G @ z)
// where the partner tiles are the tiles of a (coeff_same) followed by those of b (coeff_cross).
// rbf/imq: G_ij = 2 f'(r_ij), which makes a_i * rowsum(G) - G @ z = sum_j d k(a_i, z_j) / d a_i.
// linear:  d k(a_i, z_j) / d a_i = z_j, so G_ij = -1 and the row-sum term is left out.
// Within-sample diagonal pairs are dropped for rbf/imq (their contribution is exactly 0) and for
// an unbiased linear kernel; a biased linear kernel keeps them (d ||a_i||^2 / d a_i = 2 a_i).
template <typename scalar_t, KernelKind kKind>
__global__ void __launch_bounds__(kThreads) mmd_bwd_kernel(
    const scalar_t* __restrict__ a,        // [n_a, d] sample whose gradient rows are computed
    const scalar_t* __restrict__ b,        // [n_b, d] the other sample
    const scalar_t* __restrict__ a_norms,  // [n_a]
    const scalar_t* __restrict__ b_norms,  // [n_b]
    int64_t n_a,
    int64_t n_b,
    int64_t d,
    const __grid_constant__ Bandwidths<scalar_t> params,
    bool unbiased,
    double coeff_same,     // weight of d(sum_ij k(a_i, a_j)) / da, symmetry factor 2 included
    double coeff_cross,    // weight of d(sum_ij k(a_i, b_j)) / da
    int64_t same_tiles,    // column tiles of a to visit (0 when coeff_same == 0)
    int64_t cross_tiles,   // column tiles of b to visit (0 when coeff_cross == 0)
    int64_t tiles_per_split,
    double* __restrict__ partials) {  // [gridDim.z, n_a, d]
  constexpr int kMicro = TileShape<scalar_t>::kMicro;
  constexpr int kTile = TileShape<scalar_t>::kTile;
  __shared__ OperandSlices<scalar_t> slices;
  __shared__ GradientTiles<scalar_t, kMicro> grad_tiles;  // masked G and z of the current tile
  const int tx = threadIdx.x % kSide;
  const int ty = threadIdx.x / kSide;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t feature0 = static_cast<int64_t>(blockIdx.y) * kTile;

  scalar_t my_a_norms[kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t row = row0 + ty + kSide * i;
    my_a_norms[i] = row < n_a ? a_norms[row] : scalar_t(0);
  }

  double acc[kMicro][kMicro] = {};    // sum of coeff * G @ z over tiles
  double g_row_sums[kMicro] = {};     // sum of coeff * rowsum(G) over tiles
  const int64_t first = static_cast<int64_t>(blockIdx.z) * tiles_per_split;
  const int64_t last = std::min(first + tiles_per_split, same_tiles + cross_tiles);
  for (int64_t t = first; t < last; ++t) {
    // Block-uniform choice of partner sample.
    const bool same = t < same_tiles;
    const scalar_t* __restrict__ z = same ? a : b;
    const scalar_t* __restrict__ z_norms = same ? a_norms : b_norms;
    const int64_t n_z = same ? n_a : n_b;
    const double coeff = same ? coeff_same : coeff_cross;
    const int64_t col0 = (same ? t : t - same_tiles) * kTile;

    scalar_t dots[kMicro][kMicro];
    dot_tile(a, z, row0, col0, n_a, n_z, d, slices, dots);

    scalar_t my_row_sums[kMicro] = {};
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t col = col0 + tx + kSide * j;
      const scalar_t z_norm = col < n_z ? z_norms[col] : scalar_t(0);
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
        const int64_t row = row0 + ty + kSide * i;
        const bool dropped_diagonal =
            same && row == col && (kKind != KernelKind::Linear || unbiased);
        scalar_t g = 0;
        if (row < n_a && col < n_z && !dropped_diagonal) {
          if constexpr (kKind == KernelKind::Linear) {
            g = -1;
          } else {
            const scalar_t r = max(my_a_norms[i] + z_norm - scalar_t(2) * dots[i][j], scalar_t(0));
            g = kernel_profile<scalar_t, kKind, false, true>(r, params).slope;
          }
        }
        grad_tiles.g[ty + kSide * i][tx + kSide * j] = g;
        my_row_sums[i] += g;
      }
    }
    if constexpr (kKind != KernelKind::Linear) {
      // The 16 threads sharing ty are lanes 0-15 or 16-31 of one warp: a width-16 butterfly
      // gives each of them the tile's row sums.
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
        g_row_sums[i] += coeff * static_cast<double>(warp_sum(my_row_sums[i], kSide));
      }
    }
    stage_partner_features(z, col0, n_z, feature0, d, grad_tiles);
    __syncthreads();
    accumulate_gradient_product(grad_tiles, coeff, acc);
    __syncthreads();  // the next tile overwrites grad_tiles
  }

  write_gradient_rows(a, row0, feature0, n_a, d, g_row_sums, acc,
                      partials + static_cast<int64_t>(blockIdx.z) * n_a * d);
}

void check_inputs(const at::Tensor& x, const at::Tensor& y) {
  check_cuda_pair("mmd", x, y);
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(1) == y.size(1),
              "mmd (CUDA): expected x [n, d] and y [m, d], got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.size(0) >= 1 && y.size(0) >= 1 && x.size(1) >= 1,
              "mmd (CUDA): n, m and d must be at least 1");
  check_float_contiguous_pair("mmd", x, y);
}

at::Tensor mmd_sums_cuda(const at::Tensor& x, const at::Tensor& y, c10::string_view kernel,
                         c10::ArrayRef<double> params, bool unbiased) {
  check_inputs(x, y);
  const KernelKind kind = parse_kernel("mmd", "kernel", kernel, params, /*allow_delta=*/false);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = x.get_device();
  at::Tensor partials;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmd_sums_cuda", [&] {
    constexpr int64_t kTile = TileShape<scalar_t>::kTile;
    const int64_t d = x.size(1);
    const at::Tensor x_norms = row_sq_norms<scalar_t>(x, stream);
    const at::Tensor y_norms = row_sq_norms<scalar_t>(y, stream);
    const Bandwidths<scalar_t> bandwidths = make_bandwidths<scalar_t>(params);

    struct Task {
      const at::Tensor* a;
      const at::Tensor* b;
      const at::Tensor* a_norms;
      const at::Tensor* b_norms;
      bool same;
      int64_t row_tiles;
      int64_t splits;
      int64_t tiles_per_split;
    };
    std::array<Task, 3> tasks{{{&x, &x, &x_norms, &x_norms, true},
                               {&y, &y, &y_norms, &y_norms, true},
                               {&x, &y, &x_norms, &y_norms, false}}};
    int64_t max_blocks = 1;
    for (Task& task : tasks) {
      const int64_t col_tiles = ceil_div(task.b->size(0), kTile);
      task.row_tiles = ceil_div(task.a->size(0), kTile);
      task.splits = num_splits(task.row_tiles, col_tiles, device);
      task.tiles_per_split = ceil_div(col_tiles, task.splits);
      max_blocks = std::max(max_blocks, task.row_tiles * task.splits);
    }
    // One row of double partials per sum; entries past a task's block count stay 0.
    partials = at::zeros({3, max_blocks}, x.options().dtype(at::kDouble));

    with_kernel_kind<KernelKind::Rbf, KernelKind::Imq, KernelKind::Linear>(kind, [&](auto kind_tag) {
      constexpr KernelKind kKind = decltype(kind_tag)::value;
      for (int64_t t = 0; t < 3; ++t) {
        const Task& task = tasks[t];
        const dim3 grid(static_cast<unsigned>(task.row_tiles), static_cast<unsigned>(task.splits));
        mmd_fwd_kernel<scalar_t, kKind><<<grid, kThreads, 0, stream>>>(
            task.a->data_ptr<scalar_t>(), task.b->data_ptr<scalar_t>(),
            task.a_norms->data_ptr<scalar_t>(), task.b_norms->data_ptr<scalar_t>(),
            task.a->size(0), task.b->size(0), d, bandwidths, task.same, unbiased,
            task.tiles_per_split, partials.data_ptr<double>() + t * max_blocks);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return partials.sum(1);
}

// coeff_same * d(sum_ij k(a_i, a_j)) / da + coeff_cross * d(sum_ij k(a_i, b_j)) / da, [n_a, d].
template <typename scalar_t>
at::Tensor grad_rows(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_norms,
                     const at::Tensor& b_norms, KernelKind kind,
                     const Bandwidths<scalar_t>& bandwidths, bool unbiased, double coeff_same,
                     double coeff_cross, cudaStream_t stream, int device) {
  constexpr int64_t kTile = TileShape<scalar_t>::kTile;
  const int64_t n_a = a.size(0);
  const int64_t d = a.size(1);
  const int64_t same_tiles = coeff_same != 0.0 ? ceil_div(n_a, kTile) : 0;
  const int64_t cross_tiles = coeff_cross != 0.0 ? ceil_div(b.size(0), kTile) : 0;
  const int64_t row_tiles = ceil_div(n_a, kTile);
  const int64_t feature_tiles = ceil_div(d, kTile);
  TORCH_CHECK(feature_tiles <= 65535, "mmd (CUDA): d = ", d, " is too large for the grid");
  const int64_t splits =
      num_splits(row_tiles * feature_tiles, std::max<int64_t>(same_tiles + cross_tiles, 1), device);
  const int64_t tiles_per_split = ceil_div(same_tiles + cross_tiles, splits);
  at::Tensor partials = at::empty({splits, n_a, d}, a.options().dtype(at::kDouble));

  with_kernel_kind<KernelKind::Rbf, KernelKind::Imq, KernelKind::Linear>(kind, [&](auto kind_tag) {
    constexpr KernelKind kKind = decltype(kind_tag)::value;
    const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(feature_tiles),
                    static_cast<unsigned>(splits));
    mmd_bwd_kernel<scalar_t, kKind><<<grid, kThreads, 0, stream>>>(
        a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), a_norms.data_ptr<scalar_t>(),
        b_norms.data_ptr<scalar_t>(), n_a, b.size(0), d, bandwidths, unbiased, 2.0 * coeff_same,
        coeff_cross, same_tiles, cross_tiles, tiles_per_split, partials.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partials.sum(0).to(a.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> mmd_grads_cuda(const at::Tensor& x, const at::Tensor& y,
                                                  c10::string_view kernel,
                                                  c10::ArrayRef<double> params, bool unbiased,
                                                  double coeff_xx, double coeff_yy,
                                                  double coeff_xy) {
  check_inputs(x, y);
  const KernelKind kind = parse_kernel("mmd", "kernel", kernel, params, /*allow_delta=*/false);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = x.get_device();
  at::Tensor gx;
  at::Tensor gy;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmd_grads_cuda", [&] {
    const at::Tensor x_norms = row_sq_norms<scalar_t>(x, stream);
    const at::Tensor y_norms = row_sq_norms<scalar_t>(y, stream);
    const Bandwidths<scalar_t> bandwidths = make_bandwidths<scalar_t>(params);
    gx = grad_rows<scalar_t>(x, y, x_norms, y_norms, kind, bandwidths, unbiased, coeff_xx,
                             coeff_xy, stream, device);
    gy = grad_rows<scalar_t>(y, x, y_norms, x_norms, kind, bandwidths, unbiased, coeff_yy,
                             coeff_xy, stream, device);
  });
  return {gx, gy};
}

}  // namespace

TORCH_LIBRARY_IMPL(aelearn, CUDA, m) {
  m.impl("mmd_sums", &mmd_sums_cuda);
  m.impl("mmd_grads", &mmd_grads_cuda);
}
