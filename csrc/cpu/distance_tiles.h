// Building blocks of the CPU kernels that sum a pair kernel k(a_i, b_j) over every pair of rows of
// two samples without holding the n x m matrix (used by mmd_cpu.cpp and hsic_cpu.cpp; vq_cpu.cpp
// uses the register tile, the panels and the helpers, pixelcnn_cpu.cpp the strided register tile):
//   * PackedSample: a sample laid out for register tiles (interleaved row and column panels,
//     squared norms, zero-padded rows);
//   * add_dot_tile / add_dot_panel_tile: a register tile of dot products of any shape, on strided
//     operands / on panels, computed like a matrix product (one broadcast row value times one
//     vector of column values per step of the feature loop); dot_tile / distance_tile: its
//     kPairRows x kPairCols dot products or squared distances;
//   * TileCoverage / pair_mask: which pairs of a tile count (symmetric terms keep j > i only);
//   * GaussianKernel / InverseMultiquadricKernel: kernel values and derivatives from distances;
//   * BlockWorkspace / scatter_block_weights / SharedGradient / finish_gradient: the backward of a
//     block pair: given its weights W_ij (kBlock x kBlock, in a per-thread buffer), the products
//     sum_j W_ij z_j and sum_i W_ij z_i on register tiles, added to float64 accumulators;
//   * chunked_row_sums: deterministic parallel float64 sums over rows (closed forms);
//   * input checks shared by the ops.
// Samples are split into blocks of Tiling::kBlock rows; the ops schedule pairs of blocks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <numeric>
#include <string_view>
#include <vector>

#include "simd_exp.h"
#include "simd_vector.h"

namespace aelearn::cpu {

namespace simd = aelearn::simd;
using simd::Vec;
using simd::VecBits;

// Tile and block sizes, from the vector width and register count of the target.
template <typename T>
struct Tiling {
  static constexpr int kLanes = simd::kLanes<T>;
  static constexpr bool kManyRegisters = simd::kVectorRegisters >= 32;

  // Distance tile: kPairRows x kPairColVectors accumulators, plus kPairColVectors column vectors and
  // one broadcast, must fit in the vector registers (8 x 2 + 3 of 32, or 6 x 2 + 3 of 16).
  static constexpr int kPairRows = kManyRegisters ? 8 : 6;
  static constexpr int kPairColVectors = 2;
  static constexpr int kPairCols = kPairColVectors * kLanes;

  // Gradient tile: kGradRows output rows x up to kGradVectors vectors of features: 6 x 4
  // accumulators, 4 operand vectors and one broadcast of 32 registers, or 3 x 4 accumulators of 16
  // (the operand vectors then come from memory as FMA operands).
  static constexpr int kGradRows = kManyRegisters ? 6 : 3;
  static constexpr int kGradVectors = 4;

  // Block side: a multiple of both sides of the distance tile (diagonal blocks then split into
  // whole tiles), close to 128 so that a block pair's operands and weights stay in L2.
  static constexpr int kTileLcm = std::lcm(kPairRows, kPairCols);
  static constexpr int kBlock = kTileLcm * std::max(1, 128 / kTileLcm);

  // Row length of the weight buffer, rounded up so that gradient tiles running over the edge of a
  // block read zeros instead of leaving the buffer.
  static constexpr int kWeightStride = (kBlock + kGradRows - 1) / kGradRows * kGradRows;
};

// Threads of every parallel region: torch's intra-op setting (torch.set_num_threads), which holds
// on whatever thread calls the op, unlike the calling thread's OpenMP default.
inline int worker_threads() {
  return at::get_num_threads();
}

inline int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// ||row||^2 of `dim` values, in float64.
template <typename T>
double squared_norm(const T* row, int64_t dim) {
  double norm = 0.0;
  for (int64_t k = 0; k < dim; ++k) norm += static_cast<double>(row[k]) * row[k];
  return norm;
}

// Rows [begin, begin + count) of one block of a sample (the last block may be short).
struct BlockRows {
  int64_t begin;
  int64_t count;
};

template <typename T>
BlockRows block_rows(int64_t block, int64_t sample_count) {
  const int64_t begin = block * Tiling<T>::kBlock;
  return {begin, std::min<int64_t>(sample_count - begin, Tiling<T>::kBlock)};
}

// One sample in the layouts the tiles read.
template <typename T>
struct PackedSample {
  using Tiles = Tiling<T>;
  int64_t count = 0;
  int64_t dim = 0;
  int64_t padded_dim = 0;  // dim rounded up to whole vectors
  // [ceil(count / kPairRows), dim, kPairRows]: the rows of one distance tile interleaved, so that
  // one step of the feature loop reads kPairRows consecutive values (zeros past the last row).
  at::Tensor row_panels;
  // [ceil(count / kPairCols), dim, kPairCols]: same for the columns of a distance tile.
  at::Tensor col_panels;
  // [count rounded up to kBlock]: ||row||^2 (summed in float64, then rounded), zeros past count.
  at::Tensor squared_norms;
  // [count, padded_dim]: the rows with zero-padded features, the operand of the gradient tiles
  // (only built for gradients).
  at::Tensor padded_rows;
  // Raw views of the buffers above (data_ptr checks its tensor on every call, too slow per tile).
  const T* row_panel_data = nullptr;
  const T* col_panel_data = nullptr;
  const T* norm_data = nullptr;
  const T* padded_row_data = nullptr;

  const T* row_panel(int64_t first_row) const {
    return row_panel_data + (first_row / Tiles::kPairRows) * dim * Tiles::kPairRows;
  }
  const T* col_panel(int64_t first_col) const {
    return col_panel_data + (first_col / Tiles::kPairCols) * dim * Tiles::kPairCols;
  }
  const T* norms() const { return norm_data; }
  const T* padded_row(int64_t row) const { return padded_row_data + row * padded_dim; }
  int64_t blocks() const { return (count + Tiles::kBlock - 1) / Tiles::kBlock; }
};

// Interleaves rows [p * width, (p + 1) * width) of `rows` into panel p: [dim, width].
template <typename T>
void pack_panels(const T* rows, int64_t count, int64_t dim, int width, T* panels) {
  const int64_t panel_count = (count + width - 1) / width;
#pragma omp parallel for schedule(static) num_threads(worker_threads())
  for (int64_t panel = 0; panel < panel_count; ++panel) {
    T* out = panels + panel * dim * width;
    for (int lane = 0; lane < width; ++lane) {
      const int64_t row = panel * width + lane;
      for (int64_t k = 0; k < dim; ++k) out[k * width + lane] = row < count ? rows[row * dim + k] : T(0);
    }
  }
}

// sample: [count, dim], contiguous, of dtype T.
template <typename T>
PackedSample<T> pack_sample(const at::Tensor& sample, bool with_padded_rows) {
  using Tiles = Tiling<T>;
  PackedSample<T> packed;
  packed.count = sample.size(0);
  packed.dim = sample.size(1);
  packed.padded_dim = round_up(packed.dim, Tiles::kLanes);
  const T* rows = sample.data_ptr<T>();
  const int64_t count = packed.count;
  const int64_t dim = packed.dim;
  const auto options = sample.options();

  packed.row_panels = at::empty({round_up(count, Tiles::kPairRows) * dim}, options);
  pack_panels(rows, count, dim, Tiles::kPairRows, packed.row_panels.template data_ptr<T>());
  packed.col_panels = at::empty({round_up(count, Tiles::kPairCols) * dim}, options);
  pack_panels(rows, count, dim, Tiles::kPairCols, packed.col_panels.template data_ptr<T>());

  const int64_t norm_count = round_up(count, Tiles::kBlock);
  packed.squared_norms = at::empty({norm_count}, options);
  T* norms = packed.squared_norms.template data_ptr<T>();
#pragma omp parallel for schedule(static) num_threads(worker_threads())
  for (int64_t row = 0; row < norm_count; ++row) {
    norms[row] = row < count ? static_cast<T>(squared_norm(rows + row * dim, dim)) : T(0);
  }

  if (with_padded_rows) {
    const int64_t padded_dim = packed.padded_dim;
    packed.padded_rows = at::empty({count * padded_dim}, options);
    T* padded = packed.padded_rows.template data_ptr<T>();
#pragma omp parallel for schedule(static) num_threads(worker_threads())
    for (int64_t row = 0; row < count; ++row) {
      for (int64_t k = 0; k < padded_dim; ++k) padded[row * padded_dim + k] = k < dim ? rows[row * dim + k] : T(0);
    }
    packed.padded_row_data = padded;
  }
  packed.row_panel_data = packed.row_panels.template data_ptr<T>();
  packed.col_panel_data = packed.col_panels.template data_ptr<T>();
  packed.norm_data = norms;
  return packed;
}

// k(r) = sum_s exp(-gamma_s r), so 2 f'(r) = sum_s -2 gamma_s exp(-gamma_s r).
// exp(-gamma_s r) is evaluated as 2^(r * (-gamma_s log2(e))), the constant rounded once from
// float64: as accurate as exp of the rounded product -gamma_s * r (see simd_exp.h).
template <typename T>
struct GaussianKernel {
  std::vector<T> exponent_scales;  // -gamma_s log2(e)

  explicit GaussianKernel(c10::ArrayRef<double> gammas) {
    for (double gamma : gammas) exponent_scales.push_back(static_cast<T>(-gamma * simd::kLog2e));
  }
  Vec<T> value(Vec<T> r) const {
    Vec<T> total{};
    for (T scale : exponent_scales) total += simd::exp2_nonpositive<T>(r * scale);
    return total;
  }
  // sum_s factors[s] * exp(-gamma_s r), with factors[s] = coefficient * (-2 gamma_s).
  Vec<T> derivative(Vec<T> r, const T* factors) const {
    Vec<T> total{};
    for (size_t s = 0; s < exponent_scales.size(); ++s) {
      total += factors[s] * simd::exp2_nonpositive<T>(r * exponent_scales[s]);
    }
    return total;
  }
  // value(r) and derivative(r, factors) from the same exponentials.
  void value_and_derivative(Vec<T> r, const T* factors, Vec<T>& value, Vec<T>& derivative) const {
    value = Vec<T>{};
    derivative = Vec<T>{};
    for (size_t s = 0; s < exponent_scales.size(); ++s) {
      const Vec<T> exponential = simd::exp2_nonpositive<T>(r * exponent_scales[s]);
      value += exponential;
      derivative += factors[s] * exponential;
    }
  }
};

// k(r) = sum_s c_s / (c_s + r), so 2 f'(r) = sum_s -2 c_s / (c_s + r)^2.
template <typename T>
struct InverseMultiquadricKernel {
  std::vector<T> offsets;

  explicit InverseMultiquadricKernel(c10::ArrayRef<double> params) {
    for (double c : params) offsets.push_back(static_cast<T>(c));
  }
  Vec<T> value(Vec<T> r) const {
    Vec<T> total{};
    for (T c : offsets) total += c / (r + c);
    return total;
  }
  // sum_s factors[s] / (c_s + r)^2, with factors[s] = coefficient * (-2 c_s).
  Vec<T> derivative(Vec<T> r, const T* factors) const {
    Vec<T> total{};
    for (size_t s = 0; s < offsets.size(); ++s) {
      const Vec<T> inverse = T(1) / (r + offsets[s]);
      total += factors[s] * (inverse * inverse);
    }
    return total;
  }
  // value(r) and derivative(r, factors) from the same divisions.
  void value_and_derivative(Vec<T> r, const T* factors, Vec<T>& value, Vec<T>& derivative) const {
    value = Vec<T>{};
    derivative = Vec<T>{};
    for (size_t s = 0; s < offsets.size(); ++s) {
      const Vec<T> inverse = T(1) / (r + offsets[s]);
      value += offsets[s] * inverse;
      derivative += factors[s] * (inverse * inverse);
    }
  }
};

// For both kernels 2 f'(r) = sum_s (-2 params[s]) * (the s-th shape), which the derivative methods
// take as factors, scaled by the term's coefficient.
template <typename T>
std::vector<T> derivative_factors(c10::ArrayRef<double> params, double coefficient) {
  std::vector<T> factors;
  for (double param : params) factors.push_back(static_cast<T>(-2.0 * param * coefficient));
  return factors;
}

// One value per pair of a register tile: [kPairRows][kPairColVectors] vectors.
template <typename T>
using PairTile = Vec<T>[Tiling<T>::kPairRows][Tiling<T>::kPairColVectors];

// Adds to a register tile the dot products between kRows rows and kColVectors * kLanes columns, like
// a matrix product: dots[i][v] lane l += sum_k row_values[i * row_stride + k * row_step] *
// col_values[k * col_stride + v * kLanes + l] over k < dim. Each step of the feature loop loads
// kColVectors vectors and broadcasts kRows values, so that kRows * kColVectors accumulators (plus the
// column vectors) must fit in the vector registers. The caller sets the starting values (zeros for
// plain products).
template <typename T, int kRows, int kColVectors>
inline __attribute__((always_inline)) void add_dot_tile(const T* row_values, int64_t row_stride, int64_t row_step,
                                                        const T* col_values, int64_t col_stride, int64_t dim,
                                                        Vec<T> (&dots)[kRows][kColVectors]) {
  constexpr int kLanes = simd::kLanes<T>;
  for (int64_t k = 0; k < dim; ++k) {
    Vec<T> col_vectors[kColVectors];
    for (int v = 0; v < kColVectors; ++v) col_vectors[v] = simd::load(col_values + k * col_stride + v * kLanes);
    for (int i = 0; i < kRows; ++i) {
      const Vec<T> row_value = simd::splat(row_values[i * row_stride + k * row_step]);
      for (int v = 0; v < kColVectors; ++v) dots[i][v] += row_value * col_vectors[v];
    }
  }
}

// add_dot_tile on operands interleaved in panels (see pack_panels): row_values [dim, kRows],
// col_values [dim, kColVectors * kLanes].
template <typename T, int kRows, int kColVectors>
inline __attribute__((always_inline)) void add_dot_panel_tile(const T* row_values, const T* col_values, int64_t dim,
                                                              Vec<T> (&dots)[kRows][kColVectors]) {
  add_dot_tile<T, kRows, kColVectors>(row_values, 1, kRows, col_values, kColVectors * simd::kLanes<T>, dim, dots);
}

// Dot products a.b between rows [first_row, first_row + kPairRows) of `rows` and
// [first_col, first_col + kPairCols) of `cols` (zeros for rows or columns past the samples' ends).
template <typename T>
inline __attribute__((always_inline)) void dot_tile(const PackedSample<T>& rows, int64_t first_row,
                                                    const PackedSample<T>& cols, int64_t first_col, PairTile<T>& dots) {
  using Tiles = Tiling<T>;
  for (int i = 0; i < Tiles::kPairRows; ++i) {
    for (int v = 0; v < Tiles::kPairColVectors; ++v) dots[i][v] = Vec<T>{};
  }
  add_dot_panel_tile<T, Tiles::kPairRows, Tiles::kPairColVectors>(rows.row_panel(first_row),
                                                                  cols.col_panel(first_col), rows.dim, dots);
}

// Squared distances between the rows and columns of dot_tile, as ||a||^2 + ||b||^2 - 2 a.b clamped
// at 0. Numerics: the expansion cancels for nearby points (absolute error ~ eps (||a||^2 + ||b||^2)),
// which is why the wrappers centre the samples first; the clamp removes negative round-off.
template <typename T>
inline __attribute__((always_inline)) void distance_tile(const PackedSample<T>& rows, int64_t first_row,
                                                         const PackedSample<T>& cols, int64_t first_col,
                                                         PairTile<T>& distances) {
  using Tiles = Tiling<T>;
  PairTile<T> dots;
  dot_tile(rows, first_row, cols, first_col, dots);
  Vec<T> col_norms[Tiles::kPairColVectors];
  for (int v = 0; v < Tiles::kPairColVectors; ++v) {
    col_norms[v] = simd::load(cols.norms() + first_col + v * Tiles::kLanes);
  }
  for (int i = 0; i < Tiles::kPairRows; ++i) {
    const Vec<T> row_norm = simd::splat(rows.norms()[first_row + i]);
    for (int v = 0; v < Tiles::kPairColVectors; ++v) {
      const Vec<T> distance = (row_norm + col_norms[v]) - T(2) * dots[i][v];
      distances[i][v] = distance > T(0) ? distance : Vec<T>{};
    }
  }
}

// Which pairs of a distance tile count.
enum class TileCoverage {
  kNone,     // below the diagonal of a symmetric term
  kAll,      // every pair
  kPartial,  // some: the tile crosses the diagonal or the end of a sample (see pair_mask)
};

template <typename T>
TileCoverage tile_coverage(int64_t first_row, int64_t first_col, int64_t row_count, int64_t col_count, bool symmetric) {
  using Tiles = Tiling<T>;
  if (symmetric && first_col + Tiles::kPairCols - 1 <= first_row) return TileCoverage::kNone;
  const bool crosses_diagonal = symmetric && first_col < first_row + Tiles::kPairRows;
  const bool crosses_end = first_row + Tiles::kPairRows > row_count || first_col + Tiles::kPairCols > col_count;
  return crosses_diagonal || crosses_end ? TileCoverage::kPartial : TileCoverage::kAll;
}

// Lanes (pairs (row, first_col + lane)) that count: both inside their samples and, for a symmetric
// term, strictly above the diagonal.
template <typename T>
inline VecBits<T> pair_mask(int64_t row, int64_t first_col, int64_t row_count, int64_t col_count, bool symmetric) {
  using Lane = simd::LaneInteger<T>;
  const VecBits<T> cols = simd::lane_indices<T>() + static_cast<Lane>(first_col);
  VecBits<T> keep = cols < static_cast<Lane>(col_count);
  if (symmetric) keep &= cols > static_cast<Lane>(row);
  return row < row_count ? keep : VecBits<T>{};
}

// Float64 gradient accumulators of one sample:
// gradient_i = row_i * weight_sums[i] - weighted_rows[i], where weight_sums[i] = sum_j W_ij and
// weighted_rows[i] = sum_j W_ij z_j over every counted pair (i, j). Block pairs add their
// contributions under the lock of the block of rows they touch, so the memory stays O(count * dim)
// whatever the number of threads (per-thread copies would also need a reduction pass that grows
// with the thread count).
struct SharedGradient {
  int64_t padded_dim = 0;
  at::Tensor storage;              // [count * padded_dim + count] float64
  double* weighted_rows = nullptr;  // [count, padded_dim]
  double* weight_sums = nullptr;    // [count]
  std::vector<std::mutex> block_locks;

  template <typename T>
  SharedGradient(const PackedSample<T>& sample, const at::TensorOptions& options)
      : padded_dim(sample.padded_dim),
        storage(at::empty({sample.count * sample.padded_dim + sample.count}, options.dtype(at::kDouble))),
        block_locks(static_cast<size_t>(sample.blocks())) {
    weighted_rows = storage.data_ptr<double>();
    weight_sums = weighted_rows + sample.count * sample.padded_dim;
    const int64_t size = storage.numel();
#pragma omp parallel for schedule(static) num_threads(worker_threads())
    for (int64_t i = 0; i < size; ++i) weighted_rows[i] = 0.0;
  }
};

// One thread's scratch for the weights of one block pair and its staged contribution to each side.
template <typename T>
struct BlockWorkspace {
  using Tiles = Tiling<T>;
  // [kWeightStride, kWeightStride], zeros beyond the block (never written).
  std::vector<T> weights = std::vector<T>(static_cast<size_t>(Tiles::kWeightStride) * Tiles::kWeightStride, T(0));
  std::vector<Vec<T>> row_sum_lanes = std::vector<Vec<T>>(Tiles::kBlock);  // lane-wise partial row sums of W
  std::vector<Vec<T>> col_sums = std::vector<Vec<T>>(Tiles::kBlock / Tiles::kLanes);
  std::vector<T> row_sums = std::vector<T>(Tiles::kBlock);
  // [kWeightStride, padded_dim]: sum_j W_ij z_j of the rows, sum_i W_ij z_i of the columns.
  std::vector<T> weighted_rows;
  std::vector<T> weighted_cols;

  explicit BlockWorkspace(int64_t padded_dim)
      : weighted_rows(static_cast<size_t>(Tiles::kWeightStride * padded_dim)),
        weighted_cols(static_cast<size_t>(Tiles::kWeightStride * padded_dim)) {}

  // Clears the row and column sums before a block pair.
  void clear_sums() {
    std::fill(row_sum_lanes.begin(), row_sum_lanes.end(), Vec<T>{});
    std::fill(col_sums.begin(), col_sums.end(), Vec<T>{});
  }
  // The row and column sums of one tile of weights, W[i][v] at rows tile_row + i and columns
  // tile_col + v * kLanes + lane of the block pair.
  void add_tile_sums(int64_t tile_row, int64_t tile_col, const PairTile<T>& tile_weights) {
    Vec<T> tile_col_sums[Tiles::kPairColVectors] = {};
    for (int i = 0; i < Tiles::kPairRows; ++i) {
      Vec<T> row_sum = row_sum_lanes[tile_row + i];
      for (int v = 0; v < Tiles::kPairColVectors; ++v) {
        row_sum += tile_weights[i][v];
        tile_col_sums[v] += tile_weights[i][v];
      }
      row_sum_lanes[tile_row + i] = row_sum;
    }
    for (int v = 0; v < Tiles::kPairColVectors; ++v) col_sums[tile_col / Tiles::kLanes + v] += tile_col_sums[v];
  }
  // Stores one tile of weights (see add_tile_sums) into `weights`.
  void store_tile(int64_t tile_row, int64_t tile_col, const PairTile<T>& tile_weights) {
    T* out = weights.data() + tile_row * Tiles::kWeightStride + tile_col;
    for (int i = 0; i < Tiles::kPairRows; ++i) {
      for (int v = 0; v < Tiles::kPairColVectors; ++v) {
        simd::store(out + i * Tiles::kWeightStride + v * Tiles::kLanes, tile_weights[i][v]);
      }
    }
  }
  // Zeros for a tile that holds no counted pair (below the diagonal).
  void clear_tile(int64_t tile_row, int64_t tile_col) {
    T* out = weights.data() + tile_row * Tiles::kWeightStride + tile_col;
    for (int i = 0; i < Tiles::kPairRows; ++i) std::fill_n(out + i * Tiles::kWeightStride, Tiles::kPairCols, T(0));
  }
};

// acc[r][:] = sum_{k < depth} weight(r, k) * operand[k * operand_stride + :] over kVectors vectors of
// features, for the kGradRows outputs r of one gradient tile. weight(r, k) is weights[r * kWeightStride + k]
// (rows of W: the sample the rows belong to) or, with kTransposed, weights[k * kWeightStride + r] (columns).
template <typename T, int kVectors, bool kTransposed>
inline void weighted_row_tile(const T* weights, const T* operand, int64_t operand_stride, int64_t depth,
                              Vec<T> (&acc)[Tiling<T>::kGradRows][kVectors]) {
  using Tiles = Tiling<T>;
  constexpr int64_t kRowStep = kTransposed ? 1 : Tiles::kWeightStride;
  constexpr int64_t kDepthStep = kTransposed ? Tiles::kWeightStride : 1;
  for (int r = 0; r < Tiles::kGradRows; ++r) {
    for (int v = 0; v < kVectors; ++v) acc[r][v] = Vec<T>{};
  }
  for (int64_t k = 0; k < depth; ++k) {
    Vec<T> operand_vectors[kVectors];
    for (int v = 0; v < kVectors; ++v) {
      operand_vectors[v] = simd::load(operand + k * operand_stride + v * Tiles::kLanes);
    }
    for (int r = 0; r < Tiles::kGradRows; ++r) {
      const Vec<T> weight = simd::splat(weights[r * kRowStep + k * kDepthStep]);
      for (int v = 0; v < kVectors; ++v) acc[r][v] += weight * operand_vectors[v];
    }
  }
}

// out[r] = sum_{k < depth} weight(r, k) * operand row k for the `outputs` rows of one side of the
// block pair (out: [outputs rounded up to kGradRows, padded_dim]), in gradient tiles over the features.
template <typename T, bool kTransposed>
void weighted_rows_of_block(const T* weights, int64_t outputs, const PackedSample<T>& operand_sample,
                            int64_t first_operand, int64_t depth, T* out) {
  using Tiles = Tiling<T>;
  const int64_t padded_dim = operand_sample.padded_dim;
  const T* operand = operand_sample.padded_row(first_operand);
  constexpr int kChunk = Tiles::kGradVectors * Tiles::kLanes;
  for (int64_t first = 0; first < outputs; first += Tiles::kGradRows) {
    const T* tile_weights = weights + first * (kTransposed ? 1 : Tiles::kWeightStride);
    for (int64_t feature = 0; feature < padded_dim; feature += kChunk) {
      const int vectors =
          static_cast<int>(std::min<int64_t>(Tiles::kGradVectors, (padded_dim - feature) / Tiles::kLanes));
      auto run = [&](auto vector_count) {
        constexpr int kVectors = decltype(vector_count)::value;
        Vec<T> acc[Tiles::kGradRows][kVectors];
        weighted_row_tile<T, kVectors, kTransposed>(tile_weights, operand + feature, padded_dim, depth, acc);
        for (int r = 0; r < Tiles::kGradRows; ++r) {
          T* out_row = out + (first + r) * padded_dim + feature;
          for (int v = 0; v < kVectors; ++v) simd::store(out_row + v * Tiles::kLanes, acc[r][v]);
        }
      };
      switch (vectors) {
        case 1: run(std::integral_constant<int, 1>{}); break;
        case 2: run(std::integral_constant<int, 2>{}); break;
        case 3: run(std::integral_constant<int, 3>{}); break;
        default: run(std::integral_constant<int, 4>{}); break;
      }
    }
  }
}

// Adds a block's staged contribution (rows [first_row, first_row + rows) of the sample) into the
// shared float64 accumulators, under that block's lock. weight_sums may be null: the weights'
// sums are then not needed (see scatter_block_weights).
template <typename T>
void add_to_shared(SharedGradient& target, int64_t block, int64_t first_row, int64_t rows, const T* weighted_rows,
                   const T* weight_sums) {
  const int64_t padded_dim = target.padded_dim;
  std::lock_guard<std::mutex> guard(target.block_locks[block]);
  double* out = target.weighted_rows + first_row * padded_dim;
  for (int64_t i = 0; i < rows * padded_dim; ++i) out[i] += static_cast<double>(weighted_rows[i]);
  if (weight_sums == nullptr) return;
  for (int64_t i = 0; i < rows; ++i) target.weight_sums[first_row + i] += static_cast<double>(weight_sums[i]);
}

// Adds the gradient contributions of one block pair whose weights W (and, with_weight_sums, their
// row and column sums) are in `workspace`: rows get sum_j W_ij (row_i - col_j), columns
// sum_i W_ij (col_j - row_i). Without weight sums only the -sum_j W_ij col_j parts are added (the
// linear kernel's gradient, see hsic_cpu.cpp).
template <typename T>
void scatter_block_weights(BlockWorkspace<T>& workspace, const PackedSample<T>& rows, int64_t row_block,
                           const PackedSample<T>& cols, int64_t col_block, bool with_weight_sums,
                           SharedGradient& row_gradient, SharedGradient& col_gradient) {
  const BlockRows row_range = block_rows<T>(row_block, rows.count);
  const BlockRows col_range = block_rows<T>(col_block, cols.count);
  const T* weights = workspace.weights.data();
  if (with_weight_sums) {
    for (int64_t i = 0; i < row_range.count; ++i) {
      workspace.row_sums[i] = static_cast<T>(simd::sum_lanes<T>(workspace.row_sum_lanes[i]));
    }
  }
  weighted_rows_of_block<T, false>(weights, row_range.count, cols, col_range.begin, col_range.count,
                                   workspace.weighted_rows.data());
  weighted_rows_of_block<T, true>(weights, col_range.count, rows, row_range.begin, row_range.count,
                                  workspace.weighted_cols.data());
  add_to_shared(row_gradient, row_block, row_range.begin, row_range.count, workspace.weighted_rows.data(),
                with_weight_sums ? workspace.row_sums.data() : nullptr);
  add_to_shared(col_gradient, col_block, col_range.begin, col_range.count, workspace.weighted_cols.data(),
                with_weight_sums ? reinterpret_cast<const T*>(workspace.col_sums.data()) : nullptr);
}

// gradient = row * weight_sums - weighted_rows, in the input dtype.
template <typename T>
at::Tensor finish_gradient(const at::Tensor& sample, const SharedGradient& accumulated) {
  const int64_t count = sample.size(0);
  const int64_t dim = sample.size(1);
  const int64_t padded_dim = accumulated.padded_dim;
  const T* rows = sample.data_ptr<T>();
  at::Tensor gradient = at::empty_like(sample);
  T* out = gradient.data_ptr<T>();
#pragma omp parallel for schedule(static) num_threads(worker_threads())
  for (int64_t row = 0; row < count; ++row) {
    const double weight_sum = accumulated.weight_sums[row];
    const double* weighted = accumulated.weighted_rows + row * padded_dim;
    for (int64_t k = 0; k < dim; ++k) {
      out[row * dim + k] = static_cast<T>(static_cast<double>(rows[row * dim + k]) * weight_sum - weighted[k]);
    }
  }
  return gradient;
}

// sum over rows of the `size` float64 terms that add_row_terms(row, terms) adds into `terms`.
// Rows are taken in fixed chunks whose partials are added in order, so that the result does not
// depend on the number of threads.
template <typename RowTerms>
std::vector<double> chunked_row_sums(int64_t count, int64_t size, const RowTerms& add_row_terms) {
  constexpr int64_t kChunkRows = 1024;
  const int64_t chunks = (count + kChunkRows - 1) / kChunkRows;
  std::vector<double> chunk_sums(static_cast<size_t>(chunks * size), 0.0);
#pragma omp parallel for schedule(static) num_threads(worker_threads())
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    double* terms = chunk_sums.data() + chunk * size;
    for (int64_t row = chunk * kChunkRows; row < std::min(count, (chunk + 1) * kChunkRows); ++row) {
      add_row_terms(row, terms);
    }
  }
  std::vector<double> sums(static_cast<size_t>(size), 0.0);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    for (int64_t k = 0; k < size; ++k) sums[k] += chunk_sums[chunk * size + k];
  }
  return sums;
}

enum class KernelKind { kRbf, kImq, kLinear, kDelta };

// The kernel named `kernel` (rbf, imq, linear, or delta where delta_allowed) with its params
// checked; `op` prefixes the messages, `argument` names the kernel argument.
inline KernelKind parse_kernel(std::string_view op, std::string_view argument, std::string_view kernel,
                               c10::ArrayRef<double> params, bool delta_allowed) {
  KernelKind kind;
  if (kernel == "rbf") {
    kind = KernelKind::kRbf;
  } else if (kernel == "imq") {
    kind = KernelKind::kImq;
  } else if (kernel == "linear") {
    kind = KernelKind::kLinear;
  } else if (kernel == "delta" && delta_allowed) {
    kind = KernelKind::kDelta;
  } else {
    TORCH_CHECK(false, op, ": unknown ", argument, " '", kernel, "' (expected rbf, imq",
                delta_allowed ? ", linear or delta)" : " or linear)");
  }
  if (kind == KernelKind::kLinear || kind == KernelKind::kDelta) {
    TORCH_CHECK(params.empty(), op, ": the ", kernel, " kernel takes no params, got ", params.size());
  } else {
    TORCH_CHECK(!params.empty(), op, ": the ", kernel, " kernel needs at least one param");
    for (double param : params) {
      TORCH_CHECK(std::isfinite(param) && param > 0.0, op, ": kernel params must be finite and > 0, got ", param);
    }
  }
  return kind;
}

// x and y: 2-D, non-empty, CPU, contiguous, one floating dtype, fewer than 2^31 - 1 rows each.
inline void check_sample_pair(std::string_view op, const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2, op, ": x and y must be 2-D, got ", x.dim(), "-D and ", y.dim(), "-D");
  TORCH_CHECK(x.size(0) >= 1 && y.size(0) >= 1 && x.size(1) >= 1 && y.size(1) >= 1, op, ": empty input, x is ",
              x.sizes(), " and y is ", y.sizes());
  // Pair indices are compared in lanes as wide as the dtype's (int32 for float32).
  TORCH_CHECK(x.size(0) < std::numeric_limits<int32_t>::max() && y.size(0) < std::numeric_limits<int32_t>::max(), op,
              ": too many rows");
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), op, ": x and y must be CPU tensors, got ", x.device(),
              " and ", y.device());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), op, ": x and y must have the same dtype, got ", x.scalar_type(),
              " and ", y.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": dtype must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), op, ": x and y must be contiguous");
}

}  // namespace aelearn::cpu
