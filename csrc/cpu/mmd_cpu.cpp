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
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <numeric>
#include <string_view>
#include <tuple>
#include <vector>

#include "simd_exp.h"
#include "simd_vector.h"

namespace {

namespace simd = aelearn::simd;
using simd::Vec;
using simd::VecBits;

enum class KernelKind { kRbf, kImq, kLinear };

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
int worker_threads() {
  return at::get_num_threads();
}

int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
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
    double norm = 0.0;
    if (row < count) {
      for (int64_t k = 0; k < dim; ++k) norm += static_cast<double>(rows[row * dim + k]) * rows[row * dim + k];
    }
    norms[row] = static_cast<T>(norm);
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
};

// For both kernels 2 f'(r) = sum_s (-2 params[s]) * (the s-th shape), which the derivative methods
// take as factors, scaled by the term's coefficient.
template <typename T>
std::vector<T> derivative_factors(c10::ArrayRef<double> params, double coefficient) {
  std::vector<T> factors;
  for (double param : params) factors.push_back(static_cast<T>(-2.0 * param * coefficient));
  return factors;
}

template <typename T>
using DistanceTile = Vec<T>[Tiling<T>::kPairRows][Tiling<T>::kPairColVectors];

// Squared distances between rows [first_row, first_row + kPairRows) of `rows` and
// [first_col, first_col + kPairCols) of `cols`, as ||a||^2 + ||b||^2 - 2 a.b clamped at 0.
// Numerics: the expansion cancels for nearby points (absolute error ~ eps (||a||^2 + ||b||^2)),
// which is why the wrapper centres the samples first; the clamp removes negative round-off.
template <typename T>
inline __attribute__((always_inline)) void distance_tile(
    const PackedSample<T>& rows, int64_t first_row, const PackedSample<T>& cols, int64_t first_col,
    DistanceTile<T>& distances) {
  using Tiles = Tiling<T>;
  constexpr int kRows = Tiles::kPairRows;
  constexpr int kColVectors = Tiles::kPairColVectors;
  const T* row_values = rows.row_panel(first_row);
  const T* col_values = cols.col_panel(first_col);

  Vec<T> dots[kRows][kColVectors] = {};
  for (int64_t k = 0; k < rows.dim; ++k) {
    Vec<T> col_vectors[kColVectors];
    for (int v = 0; v < kColVectors; ++v) {
      col_vectors[v] = simd::load(col_values + k * Tiles::kPairCols + v * Tiles::kLanes);
    }
    for (int i = 0; i < kRows; ++i) {
      const Vec<T> row_value = simd::splat(row_values[k * kRows + i]);
      for (int v = 0; v < kColVectors; ++v) dots[i][v] += row_value * col_vectors[v];
    }
  }

  Vec<T> col_norms[kColVectors];
  for (int v = 0; v < kColVectors; ++v) col_norms[v] = simd::load(cols.norms() + first_col + v * Tiles::kLanes);
  for (int i = 0; i < kRows; ++i) {
    const Vec<T> row_norm = simd::splat(rows.norms()[first_row + i]);
    for (int v = 0; v < kColVectors; ++v) {
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
      DistanceTile<T> distances;
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

// Float64 gradient accumulators of one sample, shared by all threads:
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

// One thread's scratch for a block pair: its weights and its staged contribution to each side.
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
// shared float64 accumulators, under that block's lock.
template <typename T>
void add_to_shared(SharedGradient& target, int64_t block, int64_t first_row, int64_t rows, const T* weighted_rows,
                   const T* weight_sums) {
  const int64_t padded_dim = target.padded_dim;
  std::lock_guard<std::mutex> guard(target.block_locks[block]);
  double* out = target.weighted_rows + first_row * padded_dim;
  for (int64_t i = 0; i < rows * padded_dim; ++i) out[i] += static_cast<double>(weighted_rows[i]);
  for (int64_t i = 0; i < rows; ++i) target.weight_sums[first_row + i] += static_cast<double>(weight_sums[i]);
}

// Adds one block pair's contribution to the gradients: W_ij = (factors folded into) 2 f'(r_ij) over
// the counted pairs; rows get sum_j W_ij (row_i - col_j), columns sum_i W_ij (col_j - row_i).
template <typename T, typename Kernel>
void block_pair_gradient(const PackedSample<T>& rows, const PackedSample<T>& cols, bool symmetric, int64_t row_block,
                         int64_t col_block, const Kernel& kernel, const T* factors, BlockWorkspace<T>& workspace,
                         SharedGradient& row_gradient, SharedGradient& col_gradient) {
  using Tiles = Tiling<T>;
  constexpr int kLanes = Tiles::kLanes;
  const int64_t row_begin = row_block * Tiles::kBlock;
  const int64_t rows_here = std::min<int64_t>(rows.count - row_begin, Tiles::kBlock);
  const int64_t col_begin = col_block * Tiles::kBlock;
  const int64_t cols_here = std::min<int64_t>(cols.count - col_begin, Tiles::kBlock);
  T* weights = workspace.weights.data();
  std::fill(workspace.row_sum_lanes.begin(), workspace.row_sum_lanes.end(), Vec<T>{});
  std::fill(workspace.col_sums.begin(), workspace.col_sums.end(), Vec<T>{});

  for (int64_t tile_col = 0; tile_col < cols_here; tile_col += Tiles::kPairCols) {
    for (int64_t tile_row = 0; tile_row < rows_here; tile_row += Tiles::kPairRows) {
      const int64_t first_row = row_begin + tile_row;
      const int64_t first_col = col_begin + tile_col;
      T* tile_weights = weights + tile_row * Tiles::kWeightStride + tile_col;
      const TileCoverage coverage = tile_coverage<T>(first_row, first_col, rows.count, cols.count, symmetric);
      if (coverage == TileCoverage::kNone) {
        for (int i = 0; i < Tiles::kPairRows; ++i) {
          std::fill_n(tile_weights + i * Tiles::kWeightStride, Tiles::kPairCols, T(0));
        }
        continue;
      }
      DistanceTile<T> distances;
      distance_tile(rows, first_row, cols, first_col, distances);
      // Column sums of the tile in registers (the weight stores may alias the workspace).
      Vec<T> tile_col_sums[Tiles::kPairColVectors] = {};
      for (int i = 0; i < Tiles::kPairRows; ++i) {
        Vec<T> row_sum = workspace.row_sum_lanes[tile_row + i];
        for (int v = 0; v < Tiles::kPairColVectors; ++v) {
          Vec<T> weight = kernel.derivative(distances[i][v], factors);
          if (coverage == TileCoverage::kPartial) {
            const VecBits<T> keep =
                pair_mask<T>(first_row + i, first_col + v * kLanes, rows.count, cols.count, symmetric);
            weight = simd::keep_or_zero<T>(keep, weight);
          }
          simd::store(tile_weights + i * Tiles::kWeightStride + v * kLanes, weight);
          row_sum += weight;
          tile_col_sums[v] += weight;
        }
        workspace.row_sum_lanes[tile_row + i] = row_sum;
      }
      for (int v = 0; v < Tiles::kPairColVectors; ++v) workspace.col_sums[tile_col / kLanes + v] += tile_col_sums[v];
    }
  }

  for (int64_t i = 0; i < rows_here; ++i) {
    workspace.row_sums[i] = static_cast<T>(simd::sum_lanes<T>(workspace.row_sum_lanes[i]));
  }
  weighted_rows_of_block<T, false>(weights, rows_here, cols, col_begin, cols_here, workspace.weighted_rows.data());
  weighted_rows_of_block<T, true>(weights, cols_here, rows, row_begin, rows_here, workspace.weighted_cols.data());
  add_to_shared(row_gradient, row_block, row_begin, rows_here, workspace.weighted_rows.data(),
                workspace.row_sums.data());
  add_to_shared(col_gradient, col_block, col_begin, cols_here, workspace.weighted_cols.data(),
                reinterpret_cast<const T*>(workspace.col_sums.data()));
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

// Rows are summed in fixed chunks whose partials are added in order, so that the result does not
// depend on the number of threads.
template <typename T>
LinearMoments linear_moments(const at::Tensor& sample) {
  constexpr int64_t kChunkRows = 1024;
  const int64_t count = sample.size(0);
  const int64_t dim = sample.size(1);
  const T* rows = sample.data_ptr<T>();
  const int64_t chunks = (count + kChunkRows - 1) / kChunkRows;
  std::vector<double> chunk_sums(static_cast<size_t>(chunks * dim), 0.0);
  std::vector<double> chunk_squares(static_cast<size_t>(chunks), 0.0);
#pragma omp parallel for schedule(static) num_threads(worker_threads())
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    double* sums = chunk_sums.data() + chunk * dim;
    double squares = 0.0;
    for (int64_t row = chunk * kChunkRows; row < std::min(count, (chunk + 1) * kChunkRows); ++row) {
      for (int64_t k = 0; k < dim; ++k) {
        const double value = rows[row * dim + k];
        sums[k] += value;
        squares += value * value;
      }
    }
    chunk_squares[chunk] = squares;
  }
  LinearMoments moments;
  moments.row_sum.assign(dim, 0.0);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    for (int64_t k = 0; k < dim; ++k) moments.row_sum[k] += chunk_sums[chunk * dim + k];
    moments.squared_norm_sum += chunk_squares[chunk];
  }
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
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2, "mmd (cpu): x and y must be 2-D, got ", x.dim(), "-D and ", y.dim(), "-D");
  TORCH_CHECK(x.size(1) == y.size(1), "mmd (cpu): x and y must have the same number of features, got ", x.size(1),
              " and ", y.size(1));
  TORCH_CHECK(x.size(0) >= 1 && y.size(0) >= 1 && x.size(1) >= 1, "mmd (cpu): empty input, x is ", x.sizes(),
              " and y is ", y.sizes());
  // Pair indices are compared in lanes as wide as the dtype's (int32 for float32).
  TORCH_CHECK(x.size(0) < std::numeric_limits<int32_t>::max() && y.size(0) < std::numeric_limits<int32_t>::max(),
              "mmd (cpu): too many rows");
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "mmd (cpu): x and y must be CPU tensors, got ", x.device(),
              " and ", y.device());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "mmd (cpu): x and y must have the same dtype, got ", x.scalar_type(),
              " and ", y.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "mmd (cpu): dtype must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "mmd (cpu): x and y must be contiguous");
  KernelKind kind;
  if (kernel == "rbf") {
    kind = KernelKind::kRbf;
  } else if (kernel == "imq") {
    kind = KernelKind::kImq;
  } else if (kernel == "linear") {
    kind = KernelKind::kLinear;
  } else {
    TORCH_CHECK(false, "mmd (cpu): unknown kernel '", kernel, "' (expected rbf, imq or linear)");
  }
  if (kind == KernelKind::kLinear) {
    TORCH_CHECK(params.empty(), "mmd (cpu): the linear kernel takes no params, got ", params.size());
  } else {
    TORCH_CHECK(!params.empty(), "mmd (cpu): the ", kernel, " kernel needs at least one param");
    for (double param : params) {
      TORCH_CHECK(std::isfinite(param) && param > 0.0, "mmd (cpu): kernel params must be finite and > 0, got ", param);
    }
  }
  return kind;
}

at::Tensor mmd_sums_cpu(const at::Tensor& x, const at::Tensor& y, c10::string_view kernel, c10::ArrayRef<double> params,
                        bool unbiased) {
  const KernelKind kind = check_inputs(x, y, std::string_view(kernel.data(), kernel.size()), params);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmd_sums_cpu", [&] {
    switch (kind) {
      case KernelKind::kRbf:
        return distance_kernel_sums<scalar_t>(x, y, GaussianKernel<scalar_t>(params), params.size(), unbiased);
      case KernelKind::kImq:
        return distance_kernel_sums<scalar_t>(x, y, InverseMultiquadricKernel<scalar_t>(params), params.size(),
                                              unbiased);
      case KernelKind::kLinear:
        break;
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
    switch (kind) {
      case KernelKind::kRbf:
        return distance_kernel_gradients<scalar_t>(x, y, GaussianKernel<scalar_t>(params), params, coeff_xx, coeff_yy,
                                                   coeff_xy);
      case KernelKind::kImq:
        return distance_kernel_gradients<scalar_t>(x, y, InverseMultiquadricKernel<scalar_t>(params), params, coeff_xx,
                                                   coeff_yy, coeff_xy);
      case KernelKind::kLinear:
        break;
    }
    return linear_kernel_gradients<scalar_t>(x, y, unbiased, coeff_xx, coeff_yy, coeff_xy);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(aelearn, CPU, m) {
  m.impl("mmd_sums", &mmd_sums_cpu);
  m.impl("mmd_grads", &mmd_grads_cpu);
}
