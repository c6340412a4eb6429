// Building blocks shared by the CUDA kernels of the pairwise-kernel ops (mmd_cuda.cu,
// hsic_cuda.cu): kernel profiles, the tiled dot products of two samples staged in shared memory,
// the gradient tile product G @ z, block reductions, launch helpers and input checks. vq_cuda.cu
// uses the thread layout, warp sums and launch helpers.
//
// Thread layout: 16 x 16 threads; thread (ty, tx) owns the kMicro x kMicro entries
// (ty + 16 i, tx + 16 j) of a kTile x kTile pair tile, i.e. strided rows and columns, which keeps
// the shared-memory reads of a warp on broadcast or consecutive addresses.
//
// Numerics: kernels are evaluated in the input dtype (float or double, plain FMA; no TF32);
// squared distances are r = ||a_i||^2 + ||b_j||^2 - 2 a_i . b_j clamped at 0, with the row norms
// precomputed once (O(n) extra memory). Callers sum in the input dtype only within one tile and in
// double across tiles.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <string_view>
#include <type_traits>

namespace aelearn::cuda {

enum class KernelKind { Rbf, Imq, Linear, Delta };

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
// tiles), which keeps a gradient pass's shared memory (two operand slices, the G tile and the
// z tile, ~42 KB for float, ~25 KB for double) under the 48 KB static limit.
template <typename scalar_t>
struct TileShape {
  static constexpr int kMicro = std::is_same_v<scalar_t, float> ? 4 : 2;
  static constexpr int kTile = kSide * kMicro;
};

// The rows and columns of a tile that thread (ty, tx) owns: row0 + ty + 16 i, col0 + tx + 16 j.
__device__ __forceinline__ int64_t thread_row(int64_t row0, int i) {
  return row0 + static_cast<int64_t>(threadIdx.x / kSide) + kSide * i;
}
__device__ __forceinline__ int64_t thread_col(int64_t col0, int j) {
  return col0 + static_cast<int64_t>(threadIdx.x % kSide) + kSide * j;
}

__device__ __forceinline__ float exp_of(float v) { return expf(v); }
__device__ __forceinline__ double exp_of(double v) { return exp(v); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t warp_sum(scalar_t v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset, width);
  }
  return v;
}

// Sum of v over the block; the result is valid in thread 0. Every thread must call it, at most
// once per kernel (the scratch is not guarded against a second call).
__device__ inline double block_sum(double v) {
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

// The kernel as a function f of r (summed over the bandwidths, rbf or imq) and its slope
// 2 f'(r), from one exponential (rbf) or one quotient (imq) per bandwidth. kValue and kSlope
// choose what is computed (the other field stays 0). Written so that a slope-only profile is the
// exact instruction sequence of a plain slope loop: other shapes of the same arithmetic made
// ptxas allocate the double rbf gradient kernel of mmd_cuda.cu differently, with spills.
template <typename scalar_t>
struct KernelProfile {
  scalar_t value;  // f(r)
  scalar_t slope;  // 2 f'(r)
};

template <typename scalar_t, KernelKind kKind, bool kValue = true, bool kSlope = true>
__device__ __forceinline__ KernelProfile<scalar_t> kernel_profile(
    scalar_t r, const Bandwidths<scalar_t>& params) {
  static_assert(kKind == KernelKind::Rbf || kKind == KernelKind::Imq, "a kernel of r");
  KernelProfile<scalar_t> profile{0, 0};
  for (int s = 0; s < params.count; ++s) {
    const scalar_t p = params.value[s];
    if constexpr (kKind == KernelKind::Rbf) {
      // Both parts name exp(-p r); with both on, common-subexpression elimination keeps one.
      if constexpr (kValue) {
        profile.value += exp_of(-p * r);
      }
      if constexpr (kSlope) {
        profile.slope -= scalar_t(2) * p * exp_of(-p * r);
      }
    } else {
      const scalar_t q = p + r;
      if constexpr (kValue) {
        profile.value += p / q;
      }
      if constexpr (kSlope) {
        profile.slope -= scalar_t(2) * p / (q * q);
      }
    }
  }
  return profile;
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

// Shared-memory operands of the gradient product G @ z of one pair tile: g holds G (tile rows x
// partner columns, written by the caller), z the features [feature0, feature0 + kFeatureTile)
// of the partner rows. Thread (ty, tx) owns the output entries (ty + 16 i, tx + 16 f) for
// i < kMicro, f < kFeatureMicro. Rows of g are padded to a multiple of 16 bytes so that a thread
// reads kVec consecutive columns of its rows with one vector load.
template <typename scalar_t, int kFeatureMicro>
struct GradientTiles {
  static constexpr int kTile = TileShape<scalar_t>::kTile;
  static constexpr int kFeatureTile = kSide * kFeatureMicro;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));
  static_assert(kTile % kVec == 0, "vector loads must not cross a row of g");
  alignas(16) scalar_t g[kTile][kTile + kVec];
  scalar_t z[kTile][kFeatureTile + 1];
};

// Stages z[col0 + c, feature0 + f] into tiles.z (0 outside the matrix). Every thread must call it;
// the caller synchronises before reading.
template <typename scalar_t, int kFeatureMicro>
__device__ __forceinline__ void stage_partner_features(
    const scalar_t* __restrict__ z,  // [n_z, d]
    int64_t col0, int64_t n_z, int64_t feature0, int64_t d,
    GradientTiles<scalar_t, kFeatureMicro>& tiles) {
  using Tiles = GradientTiles<scalar_t, kFeatureMicro>;
  for (int e = threadIdx.x; e < Tiles::kTile * Tiles::kFeatureTile; e += kThreads) {
    const int c = e / Tiles::kFeatureTile;
    const int f = e % Tiles::kFeatureTile;
    const bool inside = col0 + c < n_z && feature0 + f < d;
    tiles.z[c][f] = inside ? z[(col0 + c) * d + feature0 + f] : scalar_t(0);
  }
}

// acc += coeff * (G @ z) on the thread's output entries: the tile's product in the input dtype
// (in column order, one FMA chain per entry), added in double.
template <typename scalar_t, int kFeatureMicro>
__device__ __forceinline__ void accumulate_gradient_product(
    const GradientTiles<scalar_t, kFeatureMicro>& tiles,
    double coeff,
    double (&acc)[TileShape<scalar_t>::kMicro][kFeatureMicro]) {
  using Tiles = GradientTiles<scalar_t, kFeatureMicro>;
  constexpr int kMicro = TileShape<scalar_t>::kMicro;
  constexpr int kVec = Tiles::kVec;
  struct alignas(16) Packet {
    scalar_t v[kVec];
  };
  const int tx = threadIdx.x % kSide;
  const int ty = threadIdx.x / kSide;
  scalar_t tile_acc[kMicro][kFeatureMicro] = {};
#pragma unroll 2
  for (int c0 = 0; c0 < Tiles::kTile; c0 += kVec) {
    Packet g_frag[kMicro];
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      g_frag[i] = *reinterpret_cast<const Packet*>(&tiles.g[ty + kSide * i][c0]);
    }
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      scalar_t z_frag[kFeatureMicro];
#pragma unroll
      for (int f = 0; f < kFeatureMicro; ++f) {
        z_frag[f] = tiles.z[c0 + v][tx + kSide * f];
      }
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
#pragma unroll
        for (int f = 0; f < kFeatureMicro; ++f) {
          tile_acc[i][f] = fma(g_frag[i].v[v], z_frag[f], tile_acc[i][f]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
#pragma unroll
    for (int f = 0; f < kFeatureMicro; ++f) {
      acc[i][f] += coeff * static_cast<double>(tile_acc[i][f]);
    }
  }
}

// out[row, feature] = a[row, feature] * row_sums[i] - acc[i][f] on the thread's entries inside
// the matrix: the gradient sum_j G_ij (a_i - z_j) from its two accumulated parts.
template <typename scalar_t, int kFeatureMicro>
__device__ __forceinline__ void write_gradient_rows(
    const scalar_t* __restrict__ a,  // [n_a, d]
    int64_t row0, int64_t feature0, int64_t n_a, int64_t d,
    const double (&row_sums)[TileShape<scalar_t>::kMicro],
    const double (&acc)[TileShape<scalar_t>::kMicro][kFeatureMicro],
    double* __restrict__ out) {  // [n_a, d]
#pragma unroll
  for (int i = 0; i < TileShape<scalar_t>::kMicro; ++i) {
    const int64_t row = thread_row(row0, i);
#pragma unroll
    for (int f = 0; f < kFeatureMicro; ++f) {
      const int64_t feature = thread_col(feature0, f);
      if (row < n_a && feature < d) {
        out[row * d + feature] =
            static_cast<double>(a[row * d + feature]) * row_sums[i] - acc[i][f];
      }
    }
  }
}

// Parses one kernel argument of op (e.g. "mmd", "kernel") and checks its params.
inline KernelKind parse_kernel(const char* op, const char* argument, std::string_view kernel,
                               c10::ArrayRef<double> params, bool allow_delta) {
  const bool known = kernel == "rbf" || kernel == "imq" || kernel == "linear" ||
                     (allow_delta && kernel == "delta");
  TORCH_CHECK(known, op, " (CUDA): unknown ", argument, " '", kernel, "'; expected ",
              allow_delta ? "rbf, imq, linear or delta" : "rbf, imq or linear");
  if (kernel == "linear" || kernel == "delta") {
    TORCH_CHECK(params.empty(), op, " (CUDA): the ", kernel, " ", argument, " takes no params");
    return kernel == "linear" ? KernelKind::Linear : KernelKind::Delta;
  }
  TORCH_CHECK(!params.empty(), op, " (CUDA): the ", kernel, " ", argument,
              " needs at least one param");
  TORCH_CHECK(static_cast<int64_t>(params.size()) <= kMaxParams, op, " (CUDA): at most ",
              kMaxParams, " params are supported, got ", params.size());
  return kernel == "rbf" ? KernelKind::Rbf : KernelKind::Imq;
}

// x and y are CUDA tensors on one device.
inline void check_cuda_pair(const char* op, const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.is_cuda() && y.is_cuda(), op, " (CUDA): x and y must be CUDA tensors");
  TORCH_CHECK(x.device() == y.device(), op, " (CUDA): x and y must be on the same device");
}

// x and y are both float32 or both float64, and contiguous.
inline void check_float_contiguous_pair(const char* op, const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.scalar_type() == y.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              op, " (CUDA): x and y must both be float32 or both float64");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), op, " (CUDA): x and y must be contiguous");
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

// Calls f(std::integral_constant<KernelKind, kind>{}) so the kernel kind becomes a template
// argument; only the kinds listed in kKinds are instantiated.
template <KernelKind... kKinds, typename F>
void with_kernel_kind(KernelKind kind, F&& f) {
  const bool dispatched =
      ((kind == kKinds && (f(std::integral_constant<KernelKind, kKinds>{}), true)) || ...);
  TORCH_INTERNAL_ASSERT(dispatched, "kernel kind outside the instantiated set");
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int multiprocessor_count(int device) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  return sm_count;
}

// Column splits so that programs * splits reaches 4 blocks per SM, at most one per column tile.
inline int64_t num_splits(int64_t programs, int64_t col_tiles, int device) {
  const int64_t target = 4 * static_cast<int64_t>(multiprocessor_count(device));
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

}  // namespace aelearn::cuda
