// CUDA backend of the HSIC op family (schemas in ../hsic.cpp): the pair sum and the row sums of
// two Gram matrices, and the gradients of their combination, each in one tiled sweep over the
// pairs.
//
// Algorithm: a thread block owns one tile of kTile rows and walks a range of column tiles (the
// column tiles are split over another grid axis when there are few row tiles). On every pair
// tile both kernels are evaluated: K from the dot products of x, L from those of y (or from the
// labels y[:, 0] for delta), each accumulated over kChunk-wide feature slices staged in shared
// memory (common.cuh). No n x n matrix is formed: extra memory is O(n (p + q)) plus per-block
// partials.
//
// hsic_sums: each thread sums K_ij L_ij, K_ij and L_ij over its entries of a tile in the input
// dtype and adds the tile's sums to float64 accumulators; at the end the 16 threads sharing a
// row add up its row sums by shuffles, the block adds up its pair sum, and every block writes
// its own float64 partials ([splits, n] row sums, one pair sum) for ATen to add up: no atomics,
// so the result does not depend on scheduling.
//
// hsic_grads: with the pair weights (contract in ../hsic.cpp)
//   W_ij = dF/dK_ij + dF/dK_ji = 2 c1 L_ij + c2 (l_i + l_j) + 2 c3 sum(l),  V_ij likewise from K,
//   gx_i = sum_j W_ij dK_ij/dx_i = x_i sum_j G_ij - sum_j G_ij x_j,  G_ij = W_ij 2 f'(r_ij)
// for rbf/imq (a diagonal pair contributes exactly 0 and is masked), and gx_i = sum_j W_ij x_j
// for linear (G_ij = -W_ij without the row-sum term; a kept diagonal pair gives W_ii x_i, which
// is its weight times d(x_i . x_i)/dx_i). gy likewise from V and L; delta labels get no gradient.
// Both G tiles come from the same K and L values of a pair tile: G_x goes through shared memory
// into G_x @ x (common.cuh's gradient tiles), then G_y, held in registers meanwhile, into
// G_y @ y. Each block owns its output rows and writes float64 partials [splits, n, p] and
// [splits, n, q] for ATen to add up.
//
// Symmetry: K and L are symmetric, but a block using that would have to add a tile's column sums
// (forward) or column gradients (backward) to rows that other blocks own, with float64 atomics in
// scheduling order or an O(n^2 / kTile) buffer. Every column tile is visited instead: twice the
// kernel evaluations, deterministic results.
//
// Numerics: kernels in the input dtype; sums in the input dtype only within one tile (kMicro
// values for a row sum, kMicro^2 for the pair sum, one tile row for G @ z), in float64 across
// tiles and blocks. The weights W and V are formed in float64 and rounded once: their terms are
// of one size and largely cancel (for the estimators W is a doubly centred L), so rounding each
// term first would cost digits of the gradient. Diagonal pairs are masked, never subtracted:
// left out when exclude_diagonal, r_ii := 0 exactly otherwise.
// The linear kernel gets two float64 shortcuts, because on centred data its sums are small
// differences of large terms that float products would leave with large relative errors:
//   its row sums k_i = x_i . (sum_j x_j - [exclude_diagonal] x_i), and
//   in its gradient the row constant of W_ij = 2 c1 L_ij + c2 (l_j - mean(l)) + w_row_i, the
//   bulk of W when c3 is not small, as w_row_i (sum_j x_j - [exclude_diagonal] x_i); only
//   2 c1 L_ij + c2 (l_j - mean(l)) goes through the tile products.
//
// Feature tiles of the gradients: the grid's y axis covers the features of x and y in tiles of
// 16 * kFeatureMicro, and every such block recomputes its pair tiles. Narrow tiles (16 features)
// when p and q are at most 16, the common case, so the G @ z products do no work on zero padding;
// kTile features otherwise, so wide samples recompute the pair tiles less often.
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "common.cuh"

namespace {

using namespace aelearn::cuda;

// What both passes read, passed by value in the launch (constant bank).
template <typename scalar_t>
struct Samples {
  const scalar_t* x;         // [n, p]
  const scalar_t* y;         // [n, q]
  const scalar_t* x_norms;   // [n] ||x_i||^2 (rbf/imq kernel_x, else null)
  const scalar_t* y_norms;   // [n] ||y_i||^2 (rbf/imq kernel_y, else null)
  const double* x_col_sums;  // [p] sum_i x_i (linear kernel_x, else null)
  const double* y_col_sums;  // [q] sum_i y_i (linear kernel_y, else null)
  int64_t n;
  int64_t p;
  int64_t q;
  Bandwidths<scalar_t> params_x;
  Bandwidths<scalar_t> params_y;
  bool exclude_diagonal;
};

// Whether the ordered pair (row, col) belongs to the pair set P.
__device__ __forceinline__ bool in_pairs(int64_t row, int64_t col, int64_t n,
                                         bool exclude_diagonal) {
  return row < n && col < n && !(exclude_diagonal && row == col);
}

// What a kernel needs of one row of its sample besides the dot products: ||a_row||^2 for
// rbf/imq, the label a_row,0 for delta (0 outside the sample and for linear).
template <typename scalar_t, KernelKind kKind>
__device__ __forceinline__ scalar_t row_key(const scalar_t* __restrict__ a,      // [n, d]
                                            const scalar_t* __restrict__ norms,  // [n] (rbf/imq)
                                            int64_t row, int64_t n, int64_t d) {
  if (row >= n) {
    return 0;
  }
  if constexpr (kKind == KernelKind::Delta) {
    return a[row * d];
  } else if constexpr (kKind == KernelKind::Linear) {
    return 0;
  } else {
    return norms[row];
  }
}

// The kernel of one pair from what PairTiles keeps of it: its dot product (rbf/imq/linear) and
// the row keys of its two rows; r := 0 exactly on the diagonal.
template <typename scalar_t, KernelKind kKind>
__device__ __forceinline__ KernelProfile<scalar_t> pair_kernel(scalar_t dot, scalar_t row_key,
                                                               scalar_t col_key, bool diagonal,
                                                               const Bandwidths<scalar_t>& params) {
  if constexpr (kKind == KernelKind::Delta) {
    return {row_key == col_key ? scalar_t(1) : scalar_t(0), scalar_t(0)};
  } else if constexpr (kKind == KernelKind::Linear) {
    return {dot, scalar_t(0)};
  } else {
    const scalar_t r =
        diagonal ? scalar_t(0) : max(row_key + col_key - scalar_t(2) * dot, scalar_t(0));
    return kernel_profile<scalar_t, kKind>(r, params);
  }
}

// Both kernels on the thread's entries of the pair tiles of one row tile. A pair tile is kept as
// its dot products and column keys (32 + 8 registers for float), and K and L of an entry are
// evaluated where they are used: keeping their values and slopes instead would hold 64.
template <typename scalar_t, KernelKind kKindX, KernelKind kKindY>
struct PairTiles {
  static constexpr int kMicro = TileShape<scalar_t>::kMicro;
  scalar_t row_keys_x[kMicro];       // row_key of x on the thread's rows
  scalar_t row_keys_y[kMicro];       // row_key of y on the thread's rows
  scalar_t col_keys_x[kMicro];       // row_key of x on the thread's columns of the current tile
  scalar_t col_keys_y[kMicro];       // row_key of y on the thread's columns of the current tile
  scalar_t dots_x[kMicro][kMicro];   // x_i . x_j on the current tile (not for delta)
  scalar_t dots_y[kMicro][kMicro];   // y_i . y_j on the current tile (not for delta)

  __device__ __forceinline__ PairTiles(const Samples<scalar_t>& s, int64_t row0) {
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      row_keys_x[i] = row_key<scalar_t, kKindX>(s.x, s.x_norms, thread_row(row0, i), s.n, s.p);
      row_keys_y[i] = row_key<scalar_t, kKindY>(s.y, s.y_norms, thread_row(row0, i), s.n, s.q);
    }
  }

  // Moves to the pair tile (row0, col0). Every thread of the block must call it (the dot
  // products synchronise the block).
  __device__ __forceinline__ void load(const Samples<scalar_t>& s, int64_t row0, int64_t col0,
                                       OperandSlices<scalar_t>& slices) {
    if constexpr (kKindX != KernelKind::Delta) {
      dot_tile(s.x, s.x, row0, col0, s.n, s.n, s.p, slices, dots_x);
    }
    if constexpr (kKindY != KernelKind::Delta) {
      dot_tile(s.y, s.y, row0, col0, s.n, s.n, s.q, slices, dots_y);
    }
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      col_keys_x[j] = row_key<scalar_t, kKindX>(s.x, s.x_norms, thread_col(col0, j), s.n, s.p);
      col_keys_y[j] = row_key<scalar_t, kKindY>(s.y, s.y_norms, thread_col(col0, j), s.n, s.q);
    }
  }

  // K and L of the thread's entry (i, j) of the current tile.
  __device__ __forceinline__ KernelProfile<scalar_t> k(const Samples<scalar_t>& s, int i, int j,
                                                       bool diagonal) const {
    const scalar_t dot = kKindX == KernelKind::Delta ? scalar_t(0) : dots_x[i][j];
    return pair_kernel<scalar_t, kKindX>(dot, row_keys_x[i], col_keys_x[j], diagonal, s.params_x);
  }
  __device__ __forceinline__ KernelProfile<scalar_t> l(const Samples<scalar_t>& s, int i, int j,
                                                       bool diagonal) const {
    const scalar_t dot = kKindY == KernelKind::Delta ? scalar_t(0) : dots_y[i][j];
    return pair_kernel<scalar_t, kKindY>(dot, row_keys_y[i], col_keys_y[j], diagonal, s.params_y);
  }
};

// This thread's part (features tx, tx + 16, ...) of the linear kernel's row sums on its rows,
// sum_{j: (i,j) in P} a_i . a_j = a_i . (sum_j a_j - [exclude_diagonal] a_i), in double.
template <typename scalar_t>
__device__ __forceinline__ void linear_row_sum_parts(
    const scalar_t* __restrict__ a,       // [n, d]
    const double* __restrict__ col_sums,  // [d] sum_j a_j
    int64_t row0, int64_t n, int64_t d, bool exclude_diagonal,
    double (&parts)[TileShape<scalar_t>::kMicro]) {
#pragma unroll
  for (int i = 0; i < TileShape<scalar_t>::kMicro; ++i) {
    const int64_t row = thread_row(row0, i);
    parts[i] = 0.0;
    for (int64_t f = thread_col(0, 0); row < n && f < d; f += kSide) {
      const double v = a[row * d + f];
      parts[i] += v * (col_sums[f] - (exclude_diagonal ? v : 0.0));
    }
  }
}

// Row sums and pair-sum partials for row tile blockIdx.x over the column tiles of split
// blockIdx.y. Row sums of a linear kernel come from its factorisation (split 0 writes them,
// the other splits 0): for centred data they are differences of large terms, which the
// float products of the tiles would leave with large relative errors.
template <typename scalar_t, KernelKind kKindX, KernelKind kKindY>
__global__ void __launch_bounds__(kThreads) hsic_sums_kernel(
    const __grid_constant__ Samples<scalar_t> samples,
    int64_t tiles_per_split,
    double* __restrict__ pair_partials,     // [gridDim.x * gridDim.y] one per block
    double* __restrict__ row_k_partials,    // [gridDim.y, n]
    double* __restrict__ row_l_partials) {  // [gridDim.y, n]
  constexpr int kMicro = TileShape<scalar_t>::kMicro;
  constexpr int kTile = TileShape<scalar_t>::kTile;
  __shared__ OperandSlices<scalar_t> slices;
  const int64_t n = samples.n;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  PairTiles<scalar_t, kKindX, kKindY> tiles(samples, row0);

  const int64_t first = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  const int64_t last = std::min(first + tiles_per_split, ceil_div(n, kTile));
  double pair_total = 0.0;
  double row_k_acc[kMicro] = {};
  double row_l_acc[kMicro] = {};
  for (int64_t col_tile = first; col_tile < last; ++col_tile) {
    const int64_t col0 = col_tile * kTile;
    tiles.load(samples, row0, col0, slices);
    // Within the tile in the input dtype, across tiles in double.
    scalar_t tile_pair = 0;
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int64_t row = thread_row(row0, i);
      scalar_t tile_k = 0;
      scalar_t tile_l = 0;
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        const int64_t col = thread_col(col0, j);
        if (in_pairs(row, col, n, samples.exclude_diagonal)) {
          const scalar_t k = tiles.k(samples, i, j, row == col).value;
          const scalar_t l = tiles.l(samples, i, j, row == col).value;
          tile_pair = fma(k, l, tile_pair);
          tile_k += k;
          tile_l += l;
        }
      }
      if constexpr (kKindX != KernelKind::Linear) {
        row_k_acc[i] += static_cast<double>(tile_k);
      }
      if constexpr (kKindY != KernelKind::Linear) {
        row_l_acc[i] += static_cast<double>(tile_l);
      }
    }
    pair_total += static_cast<double>(tile_pair);
  }
  if (blockIdx.y == 0) {
    if constexpr (kKindX == KernelKind::Linear) {
      linear_row_sum_parts(samples.x, samples.x_col_sums, row0, n, samples.p,
                           samples.exclude_diagonal, row_k_acc);
    }
    if constexpr (kKindY == KernelKind::Linear) {
      linear_row_sum_parts(samples.y, samples.y_col_sums, row0, n, samples.q,
                           samples.exclude_diagonal, row_l_acc);
    }
  }

  // The 16 threads sharing ty are lanes 0-15 or 16-31 of one warp: a width-16 butterfly gives
  // each of them the block's row sums.
  double* __restrict__ row_k_out = row_k_partials + static_cast<int64_t>(blockIdx.y) * n;
  double* __restrict__ row_l_out = row_l_partials + static_cast<int64_t>(blockIdx.y) * n;
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const double k_sum = warp_sum(row_k_acc[i], kSide);
    const double l_sum = warp_sum(row_l_acc[i], kSide);
    const int64_t row = thread_row(row0, i);
    if (threadIdx.x % kSide == 0 && row < n) {
      row_k_out[row] = k_sum;
      row_l_out[row] = l_sum;
    }
  }
  pair_total = block_sum(pair_total);
  if (threadIdx.x == 0) {
    pair_partials[static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y] = pair_total;
  }
}

// G_ij of a gradient product for one pair of P, from its weight (W_ij or V_ij; for linear without
// the row constant): weight * 2 f'(r) for rbf/imq (0 on the diagonal, where a_i - a_j = 0),
// -weight for linear (whose gradient sum_j weight a_j is written as minus the product term).
template <typename scalar_t, KernelKind kKind>
__device__ __forceinline__ scalar_t gradient_entry(double weight, scalar_t slope, bool diagonal) {
  if constexpr (kKind == KernelKind::Linear) {
    return -static_cast<scalar_t>(weight);
  } else {
    return diagonal ? scalar_t(0) : static_cast<scalar_t>(weight) * slope;
  }
}

// The row-constant part of a linear kernel's gradient, w_row_i * sum_{j: (i,j) in P} a_j
// = w_row_i (sum_j a_j - [exclude_diagonal] a_i), in double, put into the two accumulators that
// write_gradient_rows combines as a_i * row_sums - acc. Added once, by split 0.
template <typename scalar_t, int kFeatureMicro>
__device__ __forceinline__ void add_linear_row_constant(
    const double* __restrict__ col_sums,  // [d] sum_j a_j
    int64_t feature0, int64_t d, bool exclude_diagonal,
    const double* w_row,  // [kTile] w_row of the block's rows
    double (&row_sums)[TileShape<scalar_t>::kMicro],
    double (&acc)[TileShape<scalar_t>::kMicro][kFeatureMicro]) {
#pragma unroll
  for (int i = 0; i < TileShape<scalar_t>::kMicro; ++i) {
    const double weight = w_row[thread_row(0, i)];
    row_sums[i] = exclude_diagonal ? -weight : 0.0;
#pragma unroll
    for (int f = 0; f < kFeatureMicro; ++f) {
      const int64_t feature = thread_col(feature0, f);
      if (feature < d) {
        acc[i][f] -= weight * col_sums[feature];
      }
    }
  }
}

// Gradient partials for row tile blockIdx.x, feature tile blockIdx.y (features
// [16 kFeatureMicro blockIdx.y, +16 kFeatureMicro) of x and of y, where they exist) and split
// blockIdx.z of the column tiles.
template <typename scalar_t, KernelKind kKindX, KernelKind kKindY, int kFeatureMicro>
__global__ void __launch_bounds__(kThreads) hsic_grads_kernel(
    const __grid_constant__ Samples<scalar_t> samples,
    const double* __restrict__ row_k,    // [n] k_i
    const double* __restrict__ row_l,    // [n] l_i
    const double* __restrict__ k_total,  // [] sum_i k_i
    const double* __restrict__ l_total,  // [] sum_i l_i
    double c1,
    double c2,
    double c3,
    int64_t tiles_per_split,
    double* __restrict__ gx_partials,    // [gridDim.z, n, p]
    double* __restrict__ gy_partials) {  // [gridDim.z, n, q] (unused for delta)
  using GradTiles = GradientTiles<scalar_t, kFeatureMicro>;
  constexpr int kMicro = TileShape<scalar_t>::kMicro;
  constexpr int kTile = TileShape<scalar_t>::kTile;
  constexpr bool kHasGradY = kKindY != KernelKind::Delta;
  // Whether the gradients have the row-sum term x_i sum_j G_ij (kernels of r).
  constexpr bool kRowTermX = kKindX == KernelKind::Rbf || kKindX == KernelKind::Imq;
  constexpr bool kRowTermY = kKindY == KernelKind::Rbf || kKindY == KernelKind::Imq;
  __shared__ OperandSlices<scalar_t> slices;
  __shared__ GradTiles grad_tiles;
  // The row constants w_row and v_row of the block's rows (below). In shared memory rather than
  // registers: that keeps the float rbf kernels within 128 registers (2 blocks per SM) without
  // spills, for one broadcast load per use.
  __shared__ double row_weights[2][kTile];
  const int64_t n = samples.n;
  const bool exclude_diagonal = samples.exclude_diagonal;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t feature0 = static_cast<int64_t>(blockIdx.y) * GradTiles::kFeatureTile;
  // Block-uniform: which of the two outputs have features in this feature tile.
  const bool grad_x = feature0 < samples.p;
  const bool grad_y = kHasGradY && feature0 < samples.q;
  PairTiles<scalar_t, kKindX, kKindY> tiles(samples, row0);

  // The weights split into W_ij = 2 c1 L_ij + c2 (l_j - mean(l)) + w_row_i with the row constant
  // w_row_i = c2 (l_i + mean(l)) + 2 c3 sum(l); V_ij likewise.
  const double two_c1 = 2.0 * c1;
  const double l_mean = *l_total / static_cast<double>(n);
  const double k_mean = *k_total / static_cast<double>(n);
  double* w_row = row_weights[0];
  double* v_row = row_weights[1];
  for (int r = threadIdx.x; r < kTile; r += kThreads) {
    const int64_t row = row0 + r;
    w_row[r] = row < n ? c2 * (row_l[row] + l_mean) + 2.0 * c3 * *l_total : 0.0;
    v_row[r] = row < n ? c2 * (row_k[row] + k_mean) + 2.0 * c3 * *k_total : 0.0;
  }
  __syncthreads();

  double acc_x[kMicro][kFeatureMicro] = {};  // sum over tiles of G_x @ x
  double acc_y[kMicro][kFeatureMicro] = {};  // sum over tiles of G_y @ y
  double g_row_x[kMicro] = {};               // sum_j G_x,ij over this thread's columns (kRowTermX)
  double g_row_y[kMicro] = {};               // sum_j G_y,ij over this thread's columns (kRowTermY)
  const int64_t first = static_cast<int64_t>(blockIdx.z) * tiles_per_split;
  const int64_t last = std::min(first + tiles_per_split, ceil_div(n, kTile));
  for (int64_t col_tile = first; col_tile < last; ++col_tile) {
    const int64_t col0 = col_tile * kTile;
    tiles.load(samples, row0, col0, slices);

    scalar_t g_y[kMicro][kMicro];  // G_y waits here while G_x occupies grad_tiles.g
    scalar_t tile_row_x[kMicro] = {};
    scalar_t tile_row_y[kMicro] = {};
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t col = thread_col(col0, j);
      const double w_col = col < n ? c2 * (row_l[col] - l_mean) : 0.0;
      const double v_col = col < n ? c2 * (row_k[col] - k_mean) : 0.0;
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
        const int64_t row = thread_row(row0, i);
        scalar_t gx_entry = 0;
        scalar_t gy_entry = 0;
        if (in_pairs(row, col, n, exclude_diagonal)) {
          const KernelProfile<scalar_t> k = tiles.k(samples, i, j, row == col);
          const KernelProfile<scalar_t> l = tiles.l(samples, i, j, row == col);
          const double w = fma(two_c1, static_cast<double>(l.value),
                               kKindX == KernelKind::Linear ? w_col : w_row[row - row0] + w_col);
          gx_entry = gradient_entry<scalar_t, kKindX>(w, k.slope, row == col);
          if constexpr (kHasGradY) {
            const double v = fma(two_c1, static_cast<double>(k.value),
                                 kKindY == KernelKind::Linear ? v_col : v_row[row - row0] + v_col);
            gy_entry = gradient_entry<scalar_t, kKindY>(v, l.slope, row == col);
          }
        }
        if (grad_x) {
          grad_tiles.g[thread_row(0, i)][thread_col(0, j)] = gx_entry;
        }
        g_y[i][j] = gy_entry;
        tile_row_x[i] += gx_entry;
        tile_row_y[i] += gy_entry;
      }
    }
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      if constexpr (kRowTermX) {
        g_row_x[i] += static_cast<double>(tile_row_x[i]);
      }
      if constexpr (kRowTermY) {
        g_row_y[i] += static_cast<double>(tile_row_y[i]);
      }
    }
    if (grad_x) {
      stage_partner_features(samples.x, col0, n, feature0, samples.p, grad_tiles);
      __syncthreads();
      accumulate_gradient_product(grad_tiles, 1.0, acc_x);
      __syncthreads();  // G_y or the next tile overwrites grad_tiles
    }
    if (grad_y) {
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
#pragma unroll
        for (int j = 0; j < kMicro; ++j) {
          grad_tiles.g[thread_row(0, i)][thread_col(0, j)] = g_y[i][j];
        }
      }
      stage_partner_features(samples.y, col0, n, feature0, samples.q, grad_tiles);
      __syncthreads();
      accumulate_gradient_product(grad_tiles, 1.0, acc_y);
      __syncthreads();  // the next tile overwrites grad_tiles
    }
  }

  // Full row sums of G from the 16 threads sharing ty (lanes 0-15 or 16-31 of one warp).
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    if constexpr (kRowTermX) {
      g_row_x[i] = warp_sum(g_row_x[i], kSide);
    }
    if constexpr (kRowTermY) {
      g_row_y[i] = warp_sum(g_row_y[i], kSide);
    }
  }
  const int64_t split = blockIdx.z;
  if (split == 0) {
    if constexpr (kKindX == KernelKind::Linear) {
      if (grad_x) {
        add_linear_row_constant<scalar_t>(samples.x_col_sums, feature0, samples.p,
                                          exclude_diagonal, w_row, g_row_x, acc_x);
      }
    }
    if constexpr (kKindY == KernelKind::Linear) {
      if (grad_y) {
        add_linear_row_constant<scalar_t>(samples.y_col_sums, feature0, samples.q,
                                          exclude_diagonal, v_row, g_row_y, acc_y);
      }
    }
  }
  if (grad_x) {
    write_gradient_rows(samples.x, row0, feature0, n, samples.p, g_row_x, acc_x,
                        gx_partials + split * n * samples.p);
  }
  if (grad_y) {
    write_gradient_rows(samples.y, row0, feature0, n, samples.q, g_row_y, acc_y,
                        gy_partials + split * n * samples.q);
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& y) {
  check_cuda_pair("hsic", x, y);
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0),
              "hsic (CUDA): expected x [n, p] and y [n, q], got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.size(0) >= 1 && x.size(1) >= 1 && y.size(1) >= 1,
              "hsic (CUDA): n, p and q must be at least 1");
  check_float_contiguous_pair("hsic", x, y);
}

void check_row_sums(const char* name, const at::Tensor& sums, const at::Tensor& x) {
  TORCH_CHECK(sums.is_cuda() && sums.device() == x.device(), "hsic (CUDA): ", name,
              " must be on the device of x");
  TORCH_CHECK(sums.scalar_type() == at::kDouble && sums.dim() == 1 && sums.size(0) == x.size(0),
              "hsic (CUDA): ", name, " must be float64 [n] with n = ", x.size(0), ", got ",
              sums.scalar_type(), " ", sums.sizes());
  TORCH_CHECK(sums.is_contiguous(), "hsic (CUDA): ", name, " must be contiguous");
}

struct Kinds {
  KernelKind x;
  KernelKind y;
};

Kinds parse_kinds(c10::string_view kernel_x, c10::ArrayRef<double> params_x,
                  c10::string_view kernel_y, c10::ArrayRef<double> params_y) {
  return {parse_kernel("hsic", "kernel_x", kernel_x, params_x, /*allow_delta=*/false),
          parse_kernel("hsic", "kernel_y", kernel_y, params_y, /*allow_delta=*/true)};
}

// Calls f(kind_x_tag, kind_y_tag) with both kernel kinds as template arguments.
template <typename F>
void with_kinds(Kinds kinds, F&& f) {
  with_kernel_kind<KernelKind::Rbf, KernelKind::Imq, KernelKind::Linear>(kinds.x, [&](auto kind_x) {
    with_kernel_kind<KernelKind::Rbf, KernelKind::Imq, KernelKind::Linear, KernelKind::Delta>(
        kinds.y, [&](auto kind_y) { f(kind_x, kind_y); });
  });
}

// Samples for the kernels, with the buffers they point to: ||a_i||^2 for the kernels of r and
// sum_i a_i in float64 for the linear kernel (undefined tensors, null pointers, otherwise).
template <typename scalar_t>
struct SampleBuffers {
  at::Tensor x_norms;
  at::Tensor y_norms;
  at::Tensor x_col_sums;
  at::Tensor y_col_sums;
  Samples<scalar_t> samples;

  SampleBuffers(const at::Tensor& x, const at::Tensor& y, Kinds kinds,
                c10::ArrayRef<double> params_x, c10::ArrayRef<double> params_y,
                bool exclude_diagonal, cudaStream_t stream)
      : x_norms(norms_if_needed(x, kinds.x, stream)),
        y_norms(norms_if_needed(y, kinds.y, stream)),
        x_col_sums(col_sums_if_linear(x, kinds.x)),
        y_col_sums(col_sums_if_linear(y, kinds.y)),
        samples{x.data_ptr<scalar_t>(),
                y.data_ptr<scalar_t>(),
                data_or_null<scalar_t>(x_norms),
                data_or_null<scalar_t>(y_norms),
                data_or_null<double>(x_col_sums),
                data_or_null<double>(y_col_sums),
                x.size(0),
                x.size(1),
                y.size(1),
                make_bandwidths<scalar_t>(params_x),
                make_bandwidths<scalar_t>(params_y),
                exclude_diagonal} {}

  static at::Tensor norms_if_needed(const at::Tensor& a, KernelKind kind, cudaStream_t stream) {
    const bool needed = kind == KernelKind::Rbf || kind == KernelKind::Imq;
    return needed ? row_sq_norms<scalar_t>(a, stream) : at::Tensor();
  }

  static at::Tensor col_sums_if_linear(const at::Tensor& a, KernelKind kind) {
    return kind == KernelKind::Linear ? a.sum(0, /*keepdim=*/false, at::kDouble) : at::Tensor();
  }

  template <typename T>
  static const T* data_or_null(const at::Tensor& t) {
    return t.defined() ? t.data_ptr<T>() : nullptr;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> hsic_sums_cuda(
    const at::Tensor& x, const at::Tensor& y, c10::string_view kernel_x,
    c10::ArrayRef<double> params_x, c10::string_view kernel_y, c10::ArrayRef<double> params_y,
    bool exclude_diagonal) {
  check_inputs(x, y);
  const Kinds kinds = parse_kinds(kernel_x, params_x, kernel_y, params_y);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = x.size(0);
  at::Tensor pair_partials;
  at::Tensor row_k_partials;
  at::Tensor row_l_partials;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hsic_sums_cuda", [&] {
    constexpr int64_t kTile = TileShape<scalar_t>::kTile;
    const SampleBuffers<scalar_t> buffers(x, y, kinds, params_x, params_y, exclude_diagonal,
                                          stream);
    const int64_t row_tiles = ceil_div(n, kTile);
    const int64_t splits = num_splits(row_tiles, row_tiles, x.get_device());
    const int64_t tiles_per_split = ceil_div(row_tiles, splits);
    // Every block writes all of its partials (zeros for an empty column range): no zero fill.
    const at::TensorOptions doubles = x.options().dtype(at::kDouble);
    pair_partials = at::empty({row_tiles * splits}, doubles);
    row_k_partials = at::empty({splits, n}, doubles);
    row_l_partials = at::empty({splits, n}, doubles);
    with_kinds(kinds, [&](auto kind_x, auto kind_y) {
      const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(splits));
      hsic_sums_kernel<scalar_t, decltype(kind_x)::value, decltype(kind_y)::value>
          <<<grid, kThreads, 0, stream>>>(buffers.samples, tiles_per_split,
                                          pair_partials.data_ptr<double>(),
                                          row_k_partials.data_ptr<double>(),
                                          row_l_partials.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {pair_partials.sum(), row_k_partials.sum(0), row_l_partials.sum(0)};
}

std::tuple<at::Tensor, at::Tensor> hsic_grads_cuda(
    const at::Tensor& x, const at::Tensor& y, c10::string_view kernel_x,
    c10::ArrayRef<double> params_x, c10::string_view kernel_y, c10::ArrayRef<double> params_y,
    bool exclude_diagonal, const at::Tensor& row_k, const at::Tensor& row_l, double c1, double c2,
    double c3) {
  check_inputs(x, y);
  check_row_sums("row_k", row_k, x);
  check_row_sums("row_l", row_l, x);
  const Kinds kinds = parse_kinds(kernel_x, params_x, kernel_y, params_y);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = x.size(0);
  const int64_t p = x.size(1);
  const int64_t q = y.size(1);
  const bool has_grad_y = kinds.y != KernelKind::Delta;
  // Device scalars: the kernel reads them, so no host synchronisation.
  const at::Tensor k_total = row_k.sum();
  const at::Tensor l_total = row_l.sum();
  at::Tensor gx;
  at::Tensor gy;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hsic_grads_cuda", [&] {
    constexpr int kMicro = TileShape<scalar_t>::kMicro;
    constexpr int64_t kTile = TileShape<scalar_t>::kTile;
    const SampleBuffers<scalar_t> buffers(x, y, kinds, params_x, params_y, exclude_diagonal,
                                          stream);
    const int64_t features = std::max(p, has_grad_y ? q : int64_t{0});
    const bool narrow = features <= kSide;
    const int64_t feature_tiles = ceil_div(features, narrow ? kSide : kTile);
    TORCH_CHECK(feature_tiles <= 65535, "hsic (CUDA): ", features,
                " features are too many for the grid");
    const int64_t row_tiles = ceil_div(n, kTile);
    const int64_t splits = num_splits(row_tiles * feature_tiles, row_tiles, x.get_device());
    const int64_t tiles_per_split = ceil_div(row_tiles, splits);
    // Every block writes its rows and features of each output it has: no zero fill.
    const at::TensorOptions doubles = x.options().dtype(at::kDouble);
    const at::Tensor gx_partials = at::empty({splits, n, p}, doubles);
    const at::Tensor gy_partials = has_grad_y ? at::empty({splits, n, q}, doubles) : at::Tensor();
    const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(feature_tiles),
                    static_cast<unsigned>(splits));
    with_kinds(kinds, [&](auto kind_x, auto kind_y) {
      const auto launch = [&](auto feature_micro) {
        hsic_grads_kernel<scalar_t, decltype(kind_x)::value, decltype(kind_y)::value,
                          decltype(feature_micro)::value><<<grid, kThreads, 0, stream>>>(
            buffers.samples, row_k.data_ptr<double>(), row_l.data_ptr<double>(),
            k_total.data_ptr<double>(), l_total.data_ptr<double>(), c1, c2, c3, tiles_per_split,
            gx_partials.data_ptr<double>(), has_grad_y ? gy_partials.data_ptr<double>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (narrow) {
        launch(std::integral_constant<int, 1>{});
      } else {
        launch(std::integral_constant<int, kMicro>{});
      }
    });
    gx = gx_partials.sum(0).to(x.scalar_type());
    gy = has_grad_y ? gy_partials.sum(0).to(y.scalar_type()) : at::zeros_like(y);
  });
  return {gx, gy};
}

}  // namespace

TORCH_LIBRARY_IMPL(aelearn, CUDA, m) {
  m.impl("hsic_sums", &hsic_sums_cuda);
  m.impl("hsic_grads", &hsic_grads_cuda);
}
