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
// Thread layout: 16 x 16 threads; thread (ty, tx) owns the kMicro x kMicro entries
// (ty + 16 i, tx + 16 j) of a kTile x kTile tile, i.e. strided rows and columns, which keeps
// the shared-memory reads of a warp on broadcast or consecutive addresses.
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string_view>
#include <tuple>
#include <type_traits>

namespace {

enum class KernelKind { Rbf, Imq, Linear };

// Kernel parameters travel by value in the launch (constant bank), so no host-to-device copy.
// Kernels take them as __grid_constant__ (sm_70+), so indexing them with a runtime bandwidth
// index reads the constant bank directly instead of copying the struct to local memory.
constexpr int kMaxParams = 64;

template <typename scalar_t>
struct Bandwidths {
  scalar_t value[kMaxParams];  // gamma_s (rbf) or c_s (imq)
  int count;
};

constexpr int kSide = 16;                   // threads per tile side
constexpr int kThreads = kSide * kSide;     // threads per block
constexpr int kChunk = 16;                  // feature slice staged in shared memory per step
constexpr int kNormWarpsPerBlock = 8;       // rows per block of the norm kernel

// Entries per thread along each tile side: 4 for float (64 x 64 tiles), 2 for double (32 x 32
// tiles), which keeps the backward pass's shared memory (two operand slices, the G tile and the
// z tile, ~42 KB for float, ~25 KB for double) under the 48 KB static limit.
template <typename scalar_t>
struct TileShape {
  static constexpr int kMicro = std::is_same_v<scalar_t, float> ? 4 : 2;
  static constexpr int kTile = kSide * kMicro;
};

__device__ __forceinline__ float exp_of(float v) { return expf(v); }
__device__ __forceinline__ double exp_of(double v) { return exp(v); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t warp_sum(scalar_t v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset, width);
  }
  return v;
}

// Sum of v over the block; the result is valid in thread 0. Every thread must call it.
__device__ double block_sum(double v) {
  __shared__ double warp_totals[kThreads / 32];
  v = warp_sum(v, 32);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_totals[warp] = v;
  }
  __syncthreads();
  v = 0.0;
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_totals[lane] : 0.0;
    v = warp_sum(v, 32);
  }
  return v;
}

// f(r) summed over the bandwidths (rbf or imq).
template <typename scalar_t, KernelKind kKind>
__device__ __forceinline__ scalar_t kernel_value(scalar_t r, const Bandwidths<scalar_t>& params) {
  scalar_t k = 0;
  for (int s = 0; s < params.count; ++s) {
    const scalar_t p = params.value[s];
    if constexpr (kKind == KernelKind::Rbf) {
      k += exp_of(-p * r);
    } else {
      k += p / (p + r);
    }
  }
  return k;
}

// g = 2 f'(r) summed over the bandwidths (rbf or imq).
template <typename scalar_t, KernelKind kKind>
__device__ __forceinline__ scalar_t kernel_slope(scalar_t r, const Bandwidths<scalar_t>& params) {
  scalar_t g = 0;
  for (int s = 0; s < params.count; ++s) {
    const scalar_t p = params.value[s];
    if constexpr (kKind == KernelKind::Rbf) {
      g -= scalar_t(2) * p * exp_of(-p * r);
    } else {
      const scalar_t q = p + r;
      g -= scalar_t(2) * p / (q * q);
    }
  }
  return g;
}

// ||a_row||^2 for every row of a [n, d] matrix; one warp per row.
template <typename scalar_t>
__global__ void __launch_bounds__(kNormWarpsPerBlock * 32)
    row_sq_norms_kernel(const scalar_t* __restrict__ a,  // [n, d]
                        int64_t n,
                        int64_t d,
                        scalar_t* __restrict__ norms) {  // [n]
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kNormWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n) {
    return;  // uniform per warp: the shuffles below never miss a lane
  }
  scalar_t sum = 0;
  for (int64_t k = lane; k < d; k += 32) {
    const scalar_t v = a[row * d + k];
    sum += v * v;
  }
  sum = warp_sum(sum, 32);
  if (lane == 0) {
    norms[row] = sum;
  }
}

// Operand slices of one feature chunk, stored feature-major ([k][row]) so that the inner
// product loop reads a row-broadcast value and kSide consecutive columns; +1 padding breaks
// the power-of-two stride of the transposed stores.
template <typename scalar_t>
struct OperandSlices {
  scalar_t a[kChunk][TileShape<scalar_t>::kTile + 1];
  scalar_t b[kChunk][TileShape<scalar_t>::kTile + 1];
};

// dots[i][j] = a[row0 + ty + 16 i] . b[col0 + tx + 16 j] (0 outside the matrices).
// Every thread of the block must call it; it leaves the slices free for reuse on return.
template <typename scalar_t>
__device__ __forceinline__ void dot_tile(
    const scalar_t* __restrict__ a,  // [n_a, d]
    const scalar_t* __restrict__ b,  // [n_b, d]
    int64_t row0,
    int64_t col0,
    int64_t n_a,
    int64_t n_b,
    int64_t d,
    OperandSlices<scalar_t>& slices,
    scalar_t (&dots)[TileShape<scalar_t>::kMicro][TileShape<scalar_t>::kMicro]) {
  constexpr int kMicro = TileShape<scalar_t>::kMicro;
  constexpr int kTile = TileShape<scalar_t>::kTile;
  const int tx = threadIdx.x % kSide;
  const int ty = threadIdx.x / kSide;
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      dots[i][j] = 0;
    }
  }
  for (int64_t k0 = 0; k0 < d; k0 += kChunk) {
    // Consecutive threads read consecutive features of a row (coalesced); zero padding past
    // the matrix edges makes the unrolled product loop below branch-free.
    for (int e = threadIdx.x; e < kTile * kChunk; e += kThreads) {
      const int r = e / kChunk;
      const int k = e % kChunk;
      const bool k_in = k0 + k < d;
      slices.a[k][r] = (row0 + r < n_a && k_in) ? a[(row0 + r) * d + k0 + k] : scalar_t(0);
      slices.b[k][r] = (col0 + r < n_b && k_in) ? b[(col0 + r) * d + k0 + k] : scalar_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      scalar_t a_frag[kMicro];
      scalar_t b_frag[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
        a_frag[i] = slices.a[k][ty + kSide * i];
        b_frag[i] = slices.b[k][tx + kSide * i];
      }
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
#pragma unroll
        for (int j = 0; j < kMicro; ++j) {
          dots[i][j] = fma(a_frag[i], b_frag[j], dots[i][j]);
        }
      }
    }
    __syncthreads();  // the next chunk overwrites the slices
  }
}

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
          tile_sum += kernel_value<scalar_t, kKind>(r, params);
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
  __shared__ scalar_t g_tile[kTile][kTile + 1];  // [row][col] masked G of the current tile
  __shared__ scalar_t z_tile[kTile][kTile + 1];  // [col][feature] partner rows, this feature tile
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
            g = kernel_slope<scalar_t, kKind>(r, params);
          }
        }
        g_tile[ty + kSide * i][tx + kSide * j] = g;
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
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int c = e / kTile;
      const int f = e % kTile;
      const bool inside = col0 + c < n_z && feature0 + f < d;
      z_tile[c][f] = inside ? z[(col0 + c) * d + feature0 + f] : scalar_t(0);
    }
    __syncthreads();

    // G @ z for this tile in the input dtype, then added in double.
    scalar_t tile_acc[kMicro][kMicro] = {};
#pragma unroll 8
    for (int c = 0; c < kTile; ++c) {
      scalar_t g_frag[kMicro];
      scalar_t z_frag[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
        g_frag[i] = g_tile[ty + kSide * i][c];
        z_frag[i] = z_tile[c][tx + kSide * i];
      }
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
#pragma unroll
        for (int j = 0; j < kMicro; ++j) {
          tile_acc[i][j] = fma(g_frag[i], z_frag[j], tile_acc[i][j]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        acc[i][j] += coeff * static_cast<double>(tile_acc[i][j]);
      }
    }
    __syncthreads();  // the next tile overwrites g_tile and z_tile
  }

  double* __restrict__ out = partials + static_cast<int64_t>(blockIdx.z) * n_a * d;
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t row = row0 + ty + kSide * i;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t feature = feature0 + tx + kSide * j;
      if (row < n_a && feature < d) {
        out[row * d + feature] =
            static_cast<double>(a[row * d + feature]) * g_row_sums[i] - acc[i][j];
      }
    }
  }
}

KernelKind parse_kernel(std::string_view kernel, c10::ArrayRef<double> params) {
  TORCH_CHECK(kernel == "rbf" || kernel == "imq" || kernel == "linear", "mmd (CUDA): unknown kernel '",
              kernel, "'; expected rbf, imq or linear");
  if (kernel == "linear") {
    TORCH_CHECK(params.empty(), "mmd (CUDA): the linear kernel takes no params");
    return KernelKind::Linear;
  }
  TORCH_CHECK(!params.empty(), "mmd (CUDA): the ", kernel, " kernel needs at least one param");
  TORCH_CHECK(static_cast<int64_t>(params.size()) <= kMaxParams, "mmd (CUDA): at most ", kMaxParams,
              " params are supported, got ", params.size());
  return kernel == "rbf" ? KernelKind::Rbf : KernelKind::Imq;
}

void check_inputs(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.is_cuda() && y.is_cuda(), "mmd (CUDA): x and y must be CUDA tensors");
  TORCH_CHECK(x.device() == y.device(), "mmd (CUDA): x and y must be on the same device");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(1) == y.size(1),
              "mmd (CUDA): expected x [n, d] and y [m, d], got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.size(0) >= 1 && y.size(0) >= 1 && x.size(1) >= 1,
              "mmd (CUDA): n, m and d must be at least 1");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "mmd (CUDA): x and y must both be float32 or both float64");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "mmd (CUDA): x and y must be contiguous");
}

template <typename scalar_t>
Bandwidths<scalar_t> make_bandwidths(c10::ArrayRef<double> params) {
  Bandwidths<scalar_t> bandwidths{};
  bandwidths.count = static_cast<int>(params.size());
  for (size_t s = 0; s < params.size(); ++s) {
    bandwidths.value[s] = static_cast<scalar_t>(params[s]);
  }
  return bandwidths;
}

// Calls f(std::integral_constant<KernelKind, kind>) so the kernel kind becomes a template argument.
template <typename F>
void with_kernel_kind(KernelKind kind, F&& f) {
  switch (kind) {
    case KernelKind::Rbf:
      f(std::integral_constant<KernelKind, KernelKind::Rbf>{});
      break;
    case KernelKind::Imq:
      f(std::integral_constant<KernelKind, KernelKind::Imq>{});
      break;
    case KernelKind::Linear:
      f(std::integral_constant<KernelKind, KernelKind::Linear>{});
      break;
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Column splits so that programs * splits reaches 4 blocks per SM, at most one per column tile.
int64_t num_splits(int64_t programs, int64_t col_tiles, int device) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const int64_t target = 4 * static_cast<int64_t>(sm_count);
  return std::max<int64_t>(1, std::min(col_tiles, ceil_div(target, programs)));
}

template <typename scalar_t>
at::Tensor row_sq_norms(const at::Tensor& a, cudaStream_t stream) {
  const int64_t n = a.size(0);
  at::Tensor norms = at::empty({n}, a.options());
  const unsigned blocks = static_cast<unsigned>(ceil_div(n, kNormWarpsPerBlock));
  row_sq_norms_kernel<scalar_t><<<blocks, kNormWarpsPerBlock * 32, 0, stream>>>(
      a.data_ptr<scalar_t>(), n, a.size(1), norms.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return norms;
}

at::Tensor mmd_sums_cuda(const at::Tensor& x, const at::Tensor& y, c10::string_view kernel,
                         c10::ArrayRef<double> params, bool unbiased) {
  check_inputs(x, y);
  const KernelKind kind = parse_kernel(kernel, params);
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

    with_kernel_kind(kind, [&](auto kind_tag) {
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

  with_kernel_kind(kind, [&](auto kind_tag) {
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
  const KernelKind kind = parse_kernel(kernel, params);
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
