// CPU kernels of aelearn::mmd_sums and aelearn::mmd_grads (schemas and their meaning in
// ../mmd.cpp; the Python wrapper in aelearn/ops/mmd.py centres the samples and combines the sums).
//
// Distance kernels (rbf, imq). Every pair sum is evaluated like a matrix product, block by block,
// without ever holding an n x m matrix:
//   * the samples are split into blocks of Tiling::kBlock rows; a unit of parallel work is one
//     pair of blocks of one of the three terms (x with x, y with y, x with y);
//   * inside a block pair, a register tile of kPairRows x kPairCols squared distances is computed as
//     ||a||^2 + ||b||^2 - 2 a.b (one broadcast row value times one vector of column values per step
//     of the feature loop), and every kernel bandwidth is evaluated from that one distance tile;
//   * S_xx and S_yy are symmetric: only block pairs on or above the diagonal are visited and only
//     pairs j > i are kept, by a lane mask on the tiles that straddle the diagonal; they count
//     twice. The diagonal pairs i == j have r = 0 exactly, so in the biased estimator each
//     contributes k(0) = len(params) exactly, which is added as such.
//   * gradients recompute the distance tiles; a block pair's weights W_ij = coeff * 2 f'(r_ij) live
//     in a per-thread kBlock x kBlock buffer and are multiplied into the other sample's rows
//     (x_i * sum_j W_ij - sum_j W_ij z_j, the products W z and W^T x done on register tiles too).
//     Both samples' gradients come out of the same pass: a block pair's two contributions are
//     added to shared float64 accumulators under one lock per block of rows (O((n + m) d) memory
//     in all, whatever the number of threads).
// Precision: products, distances and kernel values are in the input dtype inside a block pair;
// everything that crosses block pairs (sums, gradient accumulators) is float64. The sums are the
// same bit for bit whatever the number of threads; the gradients' float64 accumulation order
// follows the schedule, so they may differ in the last bits from run to run.
//
// Linear kernel. Its pair sums factorise, S_xy = (sum_i x_i) . (sum_j y_j), and
// S_xx = ||sum_i x_i||^2 - [unbiased] sum_i ||x_i||^2, so it is computed in O((n + m) d), in float64,
// with no pairs at all (the diagonal terms ||x_i||^2 are exact float64 sums of the inputs' squares).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <numeric>
#include <string_view>
#include <tuple>
#include <vector>

#include "distance_tiles.h"

namespace {

using namespace aelearn::cpu;

// sum of k over the counted pairs of one block pair (float64 across tiles).
template <typename T, typename Kernel>
double block_pair_sum(const PackedSample<T>& rows, const PackedSample<T>& cols, bool symmetric, int64_t row_block,
                      int64_t col_block, const Kernel& kernel) {
  using Tiles = Tiling<T>;
  const int64_t row_begin = row_block * Tiles::kBlock;
  const int64_t row_end = std::min(rows.count, row_begin + Tiles::kBlock);
  const int64_t col_begin = col_block * Tiles::kBlock;
  const int64_t col_end = std::min(cols.count, col_begin + Tiles::kBlock);
  double total = 0.0;
  // Column panel outside, row panels inside: the column panel stays in L1 while the row panels of
  // the block stream from L2.
  for (int64_t first_col = col_begin; first_col < col_end; first_col += Tiles::kPairCols) {
    for (int64_t first_row = row_begin; first_row < row_end; first_row += Tiles::kPairRows) {
      const TileCoverage coverage = tile_coverage<T>(first_row, first_col, rows.count, cols.count, symmetric);
      if (coverage == TileCoverage::kNone) continue;
      PairTile<T> distances;
      distance_tile(rows, first_row, cols, first_col, distances);
      Vec<T> tile_sum{};
      for (int i = 0; i < Tiles::kPairRows; ++i) {
        for (int v = 0; v < Tiles::kPairColVectors; ++v) {
          const Vec<T> values = kernel.value(distances[i][v]);
          if (coverage == TileCoverage::kAll) {
            tile_sum += values;
          } else {
            const VecBits<T> keep =
                pair_mask<T>(first_row + i, first_col + v * Tiles::kLanes, rows.count, cols.count, symmetric);
            tile_sum += simd::keep_or_zero<T>(keep, values);
          }
        }
      }
      total += simd::sum_lanes<T>(tile_sum);
    }
  }
  return total;
}

// One of the three pair terms of the MMD.
template <typename T>
struct PairTerm {
  int index;  // 0: S_xx, 1: S_yy, 2: S_xy
  const PackedSample<T>* rows;
  const PackedSample<T>* cols;
  bool symmetric;
};

struct BlockPair {
  int term;
  int64_t row_block;
  int64_t col_block;
};

// Every unit of work: the block pairs of each term, on and above the diagonal for symmetric ones.
template <typename T>
std::vector<BlockPair> list_block_pairs(const std::vector<PairTerm<T>>& terms) {
  std::vector<BlockPair> pairs;
  for (size_t term = 0; term < terms.size(); ++term) {
    const int64_t row_blocks = terms[term].rows->blocks();
    const int64_t col_blocks = terms[term].cols->blocks();
    for (int64_t row_block = 0; row_block < row_blocks; ++row_block) {
      for (int64_t col_block = terms[term].symmetric ? row_block : 0; col_block < col_blocks; ++col_block) {
        pairs.push_back({static_cast<int>(term), row_block, col_block});
      }
    }
  }
  return pairs;
}

template <typename T, typename Kernel>
at::Tensor distance_kernel_sums(const at::Tensor& x, const at::Tensor& y, const Kernel& kernel, int64_t param_count,
                                bool unbiased) {
  const PackedSample<T> packed_x = pack_sample<T>(x, false);
  const PackedSample<T> packed_y = pack_sample<T>(y, false);
  const std::vector<PairTerm<T>> terms = {
      {0, &packed_x, &packed_x, true}, {1, &packed_y, &packed_y, true}, {2, &packed_x, &packed_y, false}};
  const std::vector<BlockPair> work = list_block_pairs(terms);

  // One float64 partial per block pair, added up in a fixed order afterwards: the sums do not
  // depend on the number of threads or on the schedule, bit for bit.
  std::vector<double> partial_sums(work.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(worker_threads())
  for (size_t item = 0; item < work.size(); ++item) {
    const PairTerm<T>& term = terms[work[item].term];
    partial_sums[item] =
        block_pair_sum(*term.rows, *term.cols, term.symmetric, work[item].row_block, work[item].col_block, kernel);
  }
  std::array<double, 3> sums = {0.0, 0.0, 0.0};
  for (size_t item = 0; item < work.size(); ++item) sums[terms[work[item].term].index] += partial_sums[item];

  // Symmetric terms: pairs j > i were summed once and stand for both orders; the diagonal pairs,
  // r = 0 exactly, are k(0) = param_count each (biased estimator only).
  const double diagonal_value = unbiased ? 0.0 : static_cast<double>(param_count);
  at::Tensor result = at::empty({3}, x.options().dtype(at::kDouble));
  double* out = result.data_ptr<double>();
  out[0] = 2.0 * sums[0] + diagonal_value * static_cast<double>(x.size(0));
  out[1] = 2.0 * sums[1] + diagonal_value * static_cast<double>(y.size(0));
  out[2] = sums[2];
  return result;
}

// Adds one block pair's contribution to the gradients: W_ij = (factors folded into) 2 f'(r_ij) over
// the counted pairs; rows get sum_j W_ij (row_i - col_j), columns sum_i W_ij (col_j - row_i).
template <typename T, typename Kernel>
void block_pair_gradient(const PackedSample<T>& rows, const PackedSample<T>& cols, bool symmetric, int64_t row_block,
                         int64_t col_block, const Kernel& kernel, const T* factors, BlockWorkspace<T>& workspace,
                         SharedGradient& row_gradient, SharedGradient& col_gradient) {
  using Tiles = Tiling<T>;
  const BlockRows row_range = block_rows<T>(row_block, rows.count);
  const BlockRows col_range = block_rows<T>(col_block, cols.count);
  workspace.clear_sums();

  for (int64_t tile_col = 0; tile_col < col_range.count; tile_col += Tiles::kPairCols) {
    for (int64_t tile_row = 0; tile_row < row_range.count; tile_row += Tiles::kPairRows) {
      const int64_t first_row = row_range.begin + tile_row;
      const int64_t first_col = col_range.begin + tile_col;
      const TileCoverage coverage = tile_coverage<T>(first_row, first_col, rows.count, cols.count, symmetric);
      if (coverage == TileCoverage::kNone) {
        workspace.clear_tile(tile_row, tile_col);
        continue;
      }
      PairTile<T> weights;
      distance_tile(rows, first_row, cols, first_col, weights);
      for (int i = 0; i < Tiles::kPairRows; ++i) {
        for (int v = 0; v < Tiles::kPairColVectors; ++v) {
          weights[i][v] = kernel.derivative(weights[i][v], factors);
          if (coverage == TileCoverage::kPartial) {
            const VecBits<T> keep =
                pair_mask<T>(first_row + i, first_col + v * Tiles::kLanes, rows.count, cols.count, symmetric);
            weights[i][v] = simd::keep_or_zero<T>(keep, weights[i][v]);
          }
        }
      }
      workspace.store_tile(tile_row, tile_col, weights);
      workspace.add_tile_sums(tile_row, tile_col, weights);
    }
  }
  scatter_block_weights(workspace, rows, row_block, cols, col_block, true, row_gradient, col_gradient);
}

template <typename T, typename Kernel>
std::tuple<at::Tensor, at::Tensor> distance_kernel_gradients(const at::Tensor& x, const at::Tensor& y,
                                                             const Kernel& kernel, c10::ArrayRef<double> params,
                                                             double coeff_xx, double coeff_yy, double coeff_xy) {
  const PackedSample<T> packed_x = pack_sample<T>(x, true);
  const PackedSample<T> packed_y = pack_sample<T>(y, true);
  // A symmetric term visits each unordered pair once; its ordered sum holds it twice.
  const std::array<std::vector<T>, 3> factors = {derivative_factors<T>(params, 2.0 * coeff_xx),
                                                 derivative_factors<T>(params, 2.0 * coeff_yy),
                                                 derivative_factors<T>(params, coeff_xy)};
  std::vector<PairTerm<T>> terms;
  if (coeff_xx != 0.0) terms.push_back({0, &packed_x, &packed_x, true});
  if (coeff_yy != 0.0) terms.push_back({1, &packed_y, &packed_y, true});
  if (coeff_xy != 0.0) terms.push_back({2, &packed_x, &packed_y, false});
  const std::vector<BlockPair> work = list_block_pairs(terms);

  SharedGradient gradient_x(packed_x, x.options());
  SharedGradient gradient_y(packed_y, y.options());
#pragma omp parallel num_threads(worker_threads())
  {
    BlockWorkspace<T> workspace(packed_x.padded_dim);
#pragma omp for schedule(dynamic, 1)
    for (size_t item = 0; item < work.size(); ++item) {
      const PairTerm<T>& term = terms[work[item].term];
      SharedGradient& row_gradient = term.rows == &packed_x ? gradient_x : gradient_y;
      SharedGradient& col_gradient = term.cols == &packed_x ? gradient_x : gradient_y;
      block_pair_gradient(*term.rows, *term.cols, term.symmetric, work[item].row_block, work[item].col_block, kernel,
                          factors[term.index].data(), workspace, row_gradient, col_gradient);
    }
  }
  return {finish_gradient<T>(x, gradient_x), finish_gradient<T>(y, gradient_y)};
}

// Column sums sum_i row_i (float64) and the sum of squared norms sum_i ||row_i||^2 of one sample.
struct LinearMoments {
  std::vector<double> row_sum;
  double squared_norm_sum = 0.0;
};

// In fixed chunks of rows (chunked_row_sums): the result does not depend on the number of threads.
template <typename T>
LinearMoments linear_moments(const at::Tensor& sample) {
  const int64_t dim = sample.size(1);
  const T* rows = sample.data_ptr<T>();
  // Terms: the dim column sums, then the sum of squares.
  const std::vector<double> sums = chunked_row_sums(sample.size(0), dim + 1, [&](int64_t row, double* terms) {
    for (int64_t k = 0; k < dim; ++k) {
      const double value = rows[row * dim + k];
      terms[k] += value;
      terms[dim] += value * value;
    }
  });
  LinearMoments moments;
  moments.row_sum.assign(sums.begin(), sums.begin() + dim);
  moments.squared_norm_sum = sums[dim];
  return moments;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  return std::inner_product(a.begin(), a.end(), b.begin(), 0.0);
}

template <typename T>
at::Tensor linear_kernel_sums(const at::Tensor& x, const at::Tensor& y, bool unbiased) {
  const LinearMoments mx = linear_moments<T>(x);
  const LinearMoments my = linear_moments<T>(y);
  at::Tensor result = at::empty({3}, x.options().dtype(at::kDouble));
  double* out = result.data_ptr<double>();
  out[0] = dot(mx.row_sum, mx.row_sum) - (unbiased ? mx.squared_norm_sum : 0.0);
  out[1] = dot(my.row_sum, my.row_sum) - (unbiased ? my.squared_norm_sum : 0.0);
  out[2] = dot(mx.row_sum, my.row_sum);
  return result;
}

// d/dz_i of coeff_same * S_zz + coeff_cross * S_zw = 2 coeff_same (sum_j z_j - [unbiased] z_i) + coeff_cross sum_j w_j.
template <typename T>
at::Tensor linear_kernel_gradient(const at::Tensor& sample, const LinearMoments& own, const LinearMoments& other,
                                  bool unbiased, double coeff_same, double coeff_cross) {
  const int64_t count = sample.size(0);
  const int64_t dim = sample.size(1);
  std::vector<double> shared(dim);
  for (int64_t k = 0; k < dim; ++k) shared[k] = 2.0 * coeff_same * own.row_sum[k] + coeff_cross * other.row_sum[k];
  const double own_factor = unbiased ? -2.0 * coeff_same : 0.0;
  at::Tensor gradient = at::empty_like(sample);
  const T* rows = sample.data_ptr<T>();
  T* out = gradient.data_ptr<T>();
#pragma omp parallel for schedule(static) num_threads(worker_threads())
  for (int64_t row = 0; row < count; ++row) {
    for (int64_t k = 0; k < dim; ++k) out[row * dim + k] = static_cast<T>(shared[k] + own_factor * rows[row * dim + k]);
  }
  return gradient;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> linear_kernel_gradients(const at::Tensor& x, const at::Tensor& y, bool unbiased,
                                                           double coeff_xx, double coeff_yy, double coeff_xy) {
  const LinearMoments mx = linear_moments<T>(x);
  const LinearMoments my = linear_moments<T>(y);
  return {linear_kernel_gradient<T>(x, mx, my, unbiased, coeff_xx, coeff_xy),
          linear_kernel_gradient<T>(y, my, mx, unbiased, coeff_yy, coeff_xy)};
}

// Internal guards: the Python wrapper has already validated the user's input.
KernelKind check_inputs(const at::Tensor& x, const at::Tensor& y, std::string_view kernel,
                        c10::ArrayRef<double> params) {
  constexpr std::string_view kOp = "mmd (cpu)";
  check_sample_pair(kOp, x, y);
  TORCH_CHECK(x.size(1) == y.size(1), kOp, ": x and y must have the same number of features, got ", x.size(1),
              " and ", y.size(1));
  return parse_kernel(kOp, "kernel", kernel, params, false);
}

at::Tensor mmd_sums_cpu(const at::Tensor& x, const at::Tensor& y, c10::string_view kernel, c10::ArrayRef<double> params,
                        bool unbiased) {
  const KernelKind kind = check_inputs(x, y, std::string_view(kernel.data(), kernel.size()), params);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmd_sums_cpu", [&] {
    if (kind == KernelKind::kRbf) {
      return distance_kernel_sums<scalar_t>(x, y, GaussianKernel<scalar_t>(params), params.size(), unbiased);
    }
    if (kind == KernelKind::kImq) {
      return distance_kernel_sums<scalar_t>(x, y, InverseMultiquadricKernel<scalar_t>(params), params.size(),
                                            unbiased);
    }
    return linear_kernel_sums<scalar_t>(x, y, unbiased);
  });
}

std::tuple<at::Tensor, at::Tensor> mmd_grads_cpu(const at::Tensor& x, const at::Tensor& y, c10::string_view kernel,
                                                 c10::ArrayRef<double> params, bool unbiased, double coeff_xx,
                                                 double coeff_yy, double coeff_xy) {
  const KernelKind kind = check_inputs(x, y, std::string_view(kernel.data(), kernel.size()), params);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmd_grads_cpu", [&] {
    // The diagonal pairs of S_xx and S_yy have zero gradient for the distance kernels, so
    // `unbiased` only matters for the linear kernel.
    if (kind == KernelKind::kRbf) {
      return distance_kernel_gradients<scalar_t>(x, y, GaussianKernel<scalar_t>(params), params, coeff_xx, coeff_yy,
                                                 coeff_xy);
    }
    if (kind == KernelKind::kImq) {
      return distance_kernel_gradients<scalar_t>(x, y, InverseMultiquadricKernel<scalar_t>(params), params, coeff_xx,
                                                 coeff_yy, coeff_xy);
    }
    return linear_kernel_gradients<scalar_t>(x, y, unbiased, coeff_xx, coeff_yy, coeff_xy);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(aelearn, CPU, m) {
  m.impl("mmd_sums", &mmd_sums_cpu);
  m.impl("mmd_grads", &mmd_grads_cpu);
}
