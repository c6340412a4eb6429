// CPU kernels of aelearn::hsic_sums and aelearn::hsic_grads (schemas and their meaning in
// ../hsic.cpp; the Python wrapper in aelearn/ops/hsic.py centres the samples and forms the
// estimators).
//
// Pair pass. K (kernel_x on x) and L (kernel_y on y) are evaluated together on the same pairs
// (i, j), tile by tile, with the building blocks of distance_tiles.h (shared with the MMD kernels),
// never holding an n x n matrix:
//   * the rows are split into blocks of Tiling::kBlock; a unit of parallel work is one pair of
//     blocks (a, b) with a <= b. K and L are symmetric, so only those block pairs are visited and,
//     inside the diagonal ones (a == b), only pairs j > i (lane masks on the tiles crossing the
//     diagonal). A visited pair stands for (i, j) and (j, i): it counts twice in pair_sum and adds
//     to the row sums of both i and j. The diagonal pairs, when included, are added afterwards in
//     O(n d), exactly: r_ii = 0 gives K_ii = len(params) for rbf and imq; ||x_i||^2 (float64) for
//     linear; 1 for delta.
//   * per tile of kPairRows x kPairCols pairs, x gives squared distances ||a||^2 + ||b||^2 - 2 a.b
//     (rbf, imq) or dot products (linear) on register tiles, y the same or label comparisons
//     (delta); every bandwidth is evaluated from the one distance tile.
//   * Schedule without races or locks: a block pair writes to the rows of both its blocks (row
//     sums forward, gradient accumulators backward). The block pairs are ordered in the rounds of a
//     round-robin tournament, in which no block appears twice: with s = the number of blocks
//     rounded up to odd, round t holds the pairs {a, b} with a + b = 2t (mod s), so every pair of
//     blocks, a == b included, falls in exactly one round (2 is invertible mod s) and a round has
//     about blocks / 2 of them. Threads take pairs in that order, each pair once the previous
//     pairs of its two blocks are done (BlockPairSchedule): the pairs of one round run in
//     parallel on disjoint rows, and every float64 accumulator receives its contributions in a
//     fixed order. Both ops give the same bits whatever the number of threads, with O(n (p + q))
//     memory plus fixed per-thread buffers.
//
// Backward. With alpha_i = c2 row_l_i + c3 Ltot, dF/dK_ij + dF/dK_ji = 2 c1 L_ij + alpha_i + alpha_j
// =: C_ij, and gx_a = sum_{j: (a, j) in P} C_aj dK_aj/dx_a:
//   rbf, imq: dK_aj/dx_a = 2 f'(r_aj) (x_a - x_j); with W_aj = C_aj 2 f'(r_aj),
//             gx_a = x_a sum_j W_aj - sum_j W_aj x_j; the same exponentials give K and f';
//   linear:   dK_aj/dx_a = x_j (2 x_a for the pair (a, a)), so gx_a = sum_j C_aj x_j: the pair pass
//             sums -W_aj x_j with W_aj = -2 c1 L_aj, and the separable alpha_a + alpha_j part and
//             the diagonal pair are added in closed form (add_linear_separable_terms).
// gy likewise, with K and L swapped (alpha from row_k and Ktot); none for delta. One pass gives both:
// per tile, the values and slopes of both kernels give W^x and W^y, which go to per-thread
// kBlock x kBlock buffers and are multiplied into the rows on register tiles (scatter_block_weights,
// as in the MMD backward; its per-block locks are never contended under this schedule).
//
// Precision: distances, kernel values and weights are in the input dtype inside a tile. Sums over
// more than one tile are float64: pair products and column sums per tile; row sums of a block pair
// in lanes of kBlock / kPairCols * kPairColVectors terms, then float64; gradient accumulators.
//
// Linear x linear: closed forms in O(n p q) float64, no pairs. With M = X^T Y (p x q),
// pair_sum = ||M||_F^2 - [excluded] sum_i ||x_i||^2 ||y_i||^2,
// row_k_i = x_i . sum_j x_j - [excluded] ||x_i||^2 (row_l likewise), and
// gx_a = 2 c1 M y_a + (c2 row_l_a + 2 c3 Ltot) sum_j x_j + c2 sum_j row_l_j x_j
//        - [excluded] (2 c1 ||y_a||^2 + 2 c2 row_l_a + 2 c3 Ltot) x_a   (gy with x, y swapped, M^T).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <numeric>
#include <optional>
#include <string_view>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "distance_tiles.h"

namespace {

using namespace aelearn::cpu;

// The sides: how one sample's kernel is evaluated on a tile of pairs. Each has
//   values(first_row, first_col, values): the kernel values of the tile's pairs;
//   values_and_slopes(first_row, first_col, values, slopes): also the factor s of the gradient
//     weight W = C s of its sample (2 f'(r) for rbf and imq, -1 for linear; see the file comment);
//   diagonal(row): the kernel value of the pair (row, row), float64;
//   kHasGradient: whether its sample gets a gradient (not for delta);
//   kRadial: gradient x_a sum_j W_aj - sum_j W_aj x_j, the diagonal pairs contributing nothing
//     (rbf, imq); otherwise -sum_j W_aj x_j, the diagonal pairs contributing C_aa x_a (linear).

// rbf and imq: k = f(||a - b||^2).
template <typename T, typename Kernel>
struct RadialSide {
  static constexpr bool kHasGradient = true;
  static constexpr bool kRadial = true;
  const PackedSample<T>& sample;
  Kernel kernel;
  std::vector<T> slope_factors;  // -2 params[s]: kernel.derivative is then 2 f'(r)
  double zero_distance_value;    // f(0) = len(params)

  RadialSide(const PackedSample<T>& packed, c10::ArrayRef<double> params)
      : sample(packed),
        kernel(params),
        slope_factors(derivative_factors<T>(params, 1.0)),
        zero_distance_value(static_cast<double>(params.size())) {}

  inline __attribute__((always_inline)) void values(int64_t first_row, int64_t first_col, PairTile<T>& out) const {
    distance_tile(sample, first_row, sample, first_col, out);
    for (int i = 0; i < Tiling<T>::kPairRows; ++i) {
      for (int v = 0; v < Tiling<T>::kPairColVectors; ++v) out[i][v] = kernel.value(out[i][v]);
    }
  }
  inline __attribute__((always_inline)) void values_and_slopes(int64_t first_row, int64_t first_col,
                                                               PairTile<T>& out, PairTile<T>& slopes) const {
    distance_tile(sample, first_row, sample, first_col, out);
    for (int i = 0; i < Tiling<T>::kPairRows; ++i) {
      for (int v = 0; v < Tiling<T>::kPairColVectors; ++v) {
        kernel.value_and_derivative(out[i][v], slope_factors.data(), out[i][v], slopes[i][v]);
      }
    }
  }
  double diagonal(int64_t) const { return zero_distance_value; }
};

// k = a . b.
template <typename T>
struct LinearSide {
  static constexpr bool kHasGradient = true;
  static constexpr bool kRadial = false;
  const PackedSample<T>& sample;
  const T* rows;  // the sample, [count, dim]

  LinearSide(const PackedSample<T>& packed, const at::Tensor& sample_rows)
      : sample(packed), rows(sample_rows.data_ptr<T>()) {}

  inline __attribute__((always_inline)) void values(int64_t first_row, int64_t first_col, PairTile<T>& out) const {
    dot_tile(sample, first_row, sample, first_col, out);
  }
  inline __attribute__((always_inline)) void values_and_slopes(int64_t first_row, int64_t first_col,
                                                               PairTile<T>& out, PairTile<T>& slopes) const {
    dot_tile(sample, first_row, sample, first_col, out);
    for (int i = 0; i < Tiling<T>::kPairRows; ++i) {
      for (int v = 0; v < Tiling<T>::kPairColVectors; ++v) slopes[i][v] = simd::splat<T>(T(-1));
    }
  }
  double diagonal(int64_t row) const { return squared_norm(rows + row * sample.dim, sample.dim); }
};

// l = 1 if a_0 == b_0 else 0, on a [count, 1] sample of label ids: its panels are then the labels
// in row order (zeros past the end).
template <typename T>
struct DeltaSide {
  static constexpr bool kHasGradient = false;
  static constexpr bool kRadial = false;
  const PackedSample<T>& sample;

  explicit DeltaSide(const PackedSample<T>& packed) : sample(packed) {}

  inline __attribute__((always_inline)) void values(int64_t first_row, int64_t first_col, PairTile<T>& out) const {
    using Tiles = Tiling<T>;
    const T* row_labels = sample.row_panel(first_row);
    const T* col_labels = sample.col_panel(first_col);
    for (int i = 0; i < Tiles::kPairRows; ++i) {
      const Vec<T> row_label = simd::splat(row_labels[i]);
      for (int v = 0; v < Tiles::kPairColVectors; ++v) {
        const VecBits<T> same = row_label == simd::load(col_labels + v * Tiles::kLanes);
        out[i][v] = simd::keep_or_zero<T>(same, simd::splat<T>(T(1)));
      }
    }
  }
  // No gradient: the slopes are not used.
  inline __attribute__((always_inline)) void values_and_slopes(int64_t first_row, int64_t first_col,
                                                               PairTile<T>& out, PairTile<T>&) const {
    values(first_row, first_col, out);
  }
  double diagonal(int64_t) const { return 1.0; }
};

// The order in which the pairs of blocks a <= b are visited: the rounds of the file comment (round t
// holds the pairs with a + b = 2t mod s), each pair after the earlier pairs of both its blocks.
// Threads claim pairs in round order from a shared counter; a pair waits only until the previous
// pairs of its own two blocks are done, not for whole rounds, so a stalled thread (a busy machine)
// holds up only the pairs that need its blocks. Every block's rows therefore receive their
// contributions one pair at a time, in round order.
class BlockPairSchedule {
 public:
  explicit BlockPairSchedule(int64_t blocks)
      : blocks_(blocks), slots_(blocks | 1), rounds_done_(static_cast<size_t>(blocks)) {}

  // Runs visit(a, b) for the pairs this thread claims. To be called by every thread of an OpenMP
  // parallel region (the shared counter hands out each pair once).
  template <typename Visit>
  void run(const Visit& visit) {
    const int64_t pairs_per_round = slots_ / 2 + 1;
    for (int64_t item = next_item_.fetch_add(1, std::memory_order_relaxed); item < slots_ * pairs_per_round;
         item = next_item_.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t round = item / pairs_per_round;
      // Pair `step` of the round is {round - step, round + step}; step 0, the diagonal block pair
      // (half the work of the others), comes last, to fill the end of the round.
      const int64_t step = pairs_per_round - 1 - item % pairs_per_round;
      const int64_t first = (round + slots_ - step) % slots_;
      const int64_t second = (round + step) % slots_;
      if (first >= blocks_ || second >= blocks_) continue;  // the empty slot's pair
      wait_for_previous_pair(first, round);
      wait_for_previous_pair(second, round);
      visit(std::min(first, second), std::max(first, second));
      rounds_done_[first].store(round + 1, std::memory_order_release);
      rounds_done_[second].store(round + 1, std::memory_order_release);
    }
  }

 private:
  // Waits until the last pair of `block` before `round` (if any) is done.
  void wait_for_previous_pair(int64_t block, int64_t round) const {
    int64_t previous = round - 1;
    while (previous >= 0 && (2 * previous + slots_ - block) % slots_ >= blocks_) --previous;  // its empty-slot round
    constexpr int kSpins = 256;
    for (int spin = 0; rounds_done_[block].load(std::memory_order_acquire) < previous + 1; ++spin) {
      if (spin >= kSpins) std::this_thread::yield();
    }
  }

  const int64_t blocks_;
  const int64_t slots_;  // blocks rounded up to odd
  std::atomic<int64_t> next_item_{0};
  std::vector<std::atomic<int64_t>> rounds_done_;  // per block: 1 + the round of its last finished pair
};

// One thread's scratch for the forward of a block pair: its partial row sums of K and L.
template <typename T>
struct SumsWorkspace {
  using Tiles = Tiling<T>;
  // Rows of the first block: lane-wise partial sums (kPairColVectors terms per lane and tile).
  std::vector<Vec<T>> row_k_lanes = std::vector<Vec<T>>(Tiles::kBlock);
  std::vector<Vec<T>> row_l_lanes = std::vector<Vec<T>>(Tiles::kBlock);
  // Columns (rows of the second block): float64, in vectors of kLanes<double>.
  std::vector<Vec<double>> col_k = std::vector<Vec<double>>(Tiles::kBlock / simd::kLanes<double>);
  std::vector<Vec<double>> col_l = std::vector<Vec<double>>(Tiles::kBlock / simd::kLanes<double>);
};

// The forward of block pair (row_block, col_block): adds the row sums of K and L over its counted
// pairs to row_k and row_l (both blocks' rows) and returns sum K_ij L_ij over them.
template <typename T, typename SideX, typename SideY>
double block_pair_sums(const SideX& x_side, const SideY& y_side, int64_t count, int64_t row_block, int64_t col_block,
                       SumsWorkspace<T>& workspace, double* row_k, double* row_l) {
  using Tiles = Tiling<T>;
  constexpr int kWide = simd::kWideParts<T>;
  const BlockRows rows = block_rows<T>(row_block, count);
  const BlockRows cols = block_rows<T>(col_block, count);
  std::fill(workspace.row_k_lanes.begin(), workspace.row_k_lanes.end(), Vec<T>{});
  std::fill(workspace.row_l_lanes.begin(), workspace.row_l_lanes.end(), Vec<T>{});
  std::fill(workspace.col_k.begin(), workspace.col_k.end(), Vec<double>{});
  std::fill(workspace.col_l.begin(), workspace.col_l.end(), Vec<double>{});
  Vec<double> products[kWide] = {};

  for (int64_t tile_col = 0; tile_col < cols.count; tile_col += Tiles::kPairCols) {
    for (int64_t tile_row = 0; tile_row < rows.count; tile_row += Tiles::kPairRows) {
      const int64_t first_row = rows.begin + tile_row;
      const int64_t first_col = cols.begin + tile_col;
      const TileCoverage coverage = tile_coverage<T>(first_row, first_col, count, count, true);
      if (coverage == TileCoverage::kNone) continue;
      PairTile<T> k_values;
      PairTile<T> l_values;
      x_side.values(first_row, first_col, k_values);
      y_side.values(first_row, first_col, l_values);
      Vec<T> tile_products{};
      Vec<T> tile_col_k[Tiles::kPairColVectors] = {};
      Vec<T> tile_col_l[Tiles::kPairColVectors] = {};
      for (int i = 0; i < Tiles::kPairRows; ++i) {
        Vec<T> row_k_sum = workspace.row_k_lanes[tile_row + i];
        Vec<T> row_l_sum = workspace.row_l_lanes[tile_row + i];
        for (int v = 0; v < Tiles::kPairColVectors; ++v) {
          Vec<T> k = k_values[i][v];
          Vec<T> l = l_values[i][v];
          if (coverage == TileCoverage::kPartial) {
            const VecBits<T> keep = pair_mask<T>(first_row + i, first_col + v * Tiles::kLanes, count, count, true);
            k = simd::keep_or_zero<T>(keep, k);
            l = simd::keep_or_zero<T>(keep, l);
          }
          tile_products += k * l;
          row_k_sum += k;
          row_l_sum += l;
          tile_col_k[v] += k;
          tile_col_l[v] += l;
        }
        workspace.row_k_lanes[tile_row + i] = row_k_sum;
        workspace.row_l_lanes[tile_row + i] = row_l_sum;
      }
      simd::add_widened<T>(products, tile_products);
      for (int v = 0; v < Tiles::kPairColVectors; ++v) {
        const int64_t wide_index = (tile_col + v * Tiles::kLanes) / simd::kLanes<double>;
        simd::add_widened<T>(workspace.col_k.data() + wide_index, tile_col_k[v]);
        simd::add_widened<T>(workspace.col_l.data() + wide_index, tile_col_l[v]);
      }
    }
  }

  for (int64_t i = 0; i < rows.count; ++i) {
    row_k[rows.begin + i] += simd::sum_lanes<T>(workspace.row_k_lanes[i]);
    row_l[rows.begin + i] += simd::sum_lanes<T>(workspace.row_l_lanes[i]);
  }
  const double* col_k = reinterpret_cast<const double*>(workspace.col_k.data());
  const double* col_l = reinterpret_cast<const double*>(workspace.col_l.data());
  for (int64_t j = 0; j < cols.count; ++j) {
    row_k[cols.begin + j] += col_k[j];
    row_l[cols.begin + j] += col_l[j];
  }
  double total = 0.0;
  for (int part = 0; part < kWide; ++part) total += simd::sum_lanes<double>(products[part]);
  return total;
}

// Adds the diagonal pairs (i, i): K_ii to row_k_i, L_ii to row_l_i; returns sum_i K_ii L_ii.
template <typename SideX, typename SideY>
double add_diagonal_pairs(int64_t count, const SideX& x_side, const SideY& y_side, double* row_k, double* row_l) {
  return chunked_row_sums(count, 1, [&](int64_t row, double* terms) {
    const double k = x_side.diagonal(row);
    const double l = y_side.diagonal(row);
    row_k[row] += k;
    row_l[row] += l;
    terms[0] += k * l;
  })[0];
}

template <typename T, typename SideX, typename SideY>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_pass_sums(const at::Tensor& x, const SideX& x_side,
                                                              const SideY& y_side, bool exclude_diagonal) {
  const int64_t count = x.size(0);
  const int64_t blocks = x_side.sample.blocks();
  const auto options = x.options().dtype(at::kDouble);
  at::Tensor row_k = at::zeros({count}, options);
  at::Tensor row_l = at::zeros({count}, options);
  double* row_k_data = row_k.data_ptr<double>();
  double* row_l_data = row_l.data_ptr<double>();
  // sum K L of the block pairs, by their first block (written by one pair per round at most).
  std::vector<double> block_products(static_cast<size_t>(blocks), 0.0);
  BlockPairSchedule schedule(blocks);
#pragma omp parallel num_threads(worker_threads())
  {
    SumsWorkspace<T> workspace;
    schedule.run([&](int64_t row_block, int64_t col_block) {
      block_products[row_block] +=
          block_pair_sums<T>(x_side, y_side, count, row_block, col_block, workspace, row_k_data, row_l_data);
    });
  }
  // Each visited pair stands for both orders.
  double pair_sum = 2.0 * std::accumulate(block_products.begin(), block_products.end(), 0.0);
  if (!exclude_diagonal) pair_sum += add_diagonal_pairs(count, x_side, y_side, row_k_data, row_l_data);
  return {at::scalar_tensor(pair_sum, options), row_k, row_l};
}

// The scalars of F and the row sums it is differentiated through.
struct GradientTerms {
  double c1;
  double c2;
  double c3;
  const double* row_k;  // [count]
  const double* row_l;  // [count]
  double k_total;       // sum_i row_k_i
  double l_total;       // sum_i row_l_i

  // alpha_a of one side, from the other kernel's row sums and total (row_l, Ltot for x).
  double alpha(const double* other_row_sums, double other_total, int64_t row) const {
    return c2 * other_row_sums[row] + c3 * other_total;
  }
};

// The parts of the pair weights in the input dtype: two_c1 L_ij + alpha_x_i + alpha_x_j for x,
// two_c1 K_ij + alpha_y_i + alpha_y_j for y. A linear side's alpha terms are added in closed form
// instead (see add_linear_separable_terms): zeros here.
template <typename T>
struct WeightCoefficients {
  T two_c1;
  at::Tensor storage;  // alpha_x then alpha_y, each [count rounded up to kBlock], zeros past count
  const T* alpha_x = nullptr;  // c2 row_l_i + c3 Ltot
  const T* alpha_y = nullptr;  // c2 row_k_i + c3 Ktot

  WeightCoefficients(const GradientTerms& terms, int64_t count, bool x_radial, bool y_radial,
                     const at::TensorOptions& options)
      : two_c1(static_cast<T>(2.0 * terms.c1)) {
    const int64_t padded = round_up(count, Tiling<T>::kBlock);
    storage = at::zeros({2 * padded}, options);
    T* alphas = storage.data_ptr<T>();
    for (int64_t row = 0; row < count; ++row) {
      if (x_radial) alphas[row] = static_cast<T>(terms.alpha(terms.row_l, terms.l_total, row));
      if (y_radial) alphas[padded + row] = static_cast<T>(terms.alpha(terms.row_k, terms.k_total, row));
    }
    alpha_x = alphas;
    alpha_y = alphas + padded;
  }
};

// weights = (two_c1 * other + alpha_i + alpha_j) * slopes over one tile, zero for the pairs that do
// not count; `other` holds the other kernel's values.
template <typename T>
inline __attribute__((always_inline)) void weight_tile(const PairTile<T>& other, const PairTile<T>& slopes, T two_c1,
                                                       const T* alpha, int64_t first_row, int64_t first_col,
                                                       int64_t count, TileCoverage coverage, PairTile<T>& weights) {
  using Tiles = Tiling<T>;
  Vec<T> col_alpha[Tiles::kPairColVectors];
  for (int v = 0; v < Tiles::kPairColVectors; ++v) col_alpha[v] = simd::load(alpha + first_col + v * Tiles::kLanes);
  for (int i = 0; i < Tiles::kPairRows; ++i) {
    const Vec<T> row_alpha = simd::splat(alpha[first_row + i]);
    for (int v = 0; v < Tiles::kPairColVectors; ++v) {
      weights[i][v] = (two_c1 * other[i][v] + (row_alpha + col_alpha[v])) * slopes[i][v];
      if (coverage == TileCoverage::kPartial) {
        const VecBits<T> keep = pair_mask<T>(first_row + i, first_col + v * Tiles::kLanes, count, count, true);
        weights[i][v] = simd::keep_or_zero<T>(keep, weights[i][v]);
      }
    }
  }
}

// Stages one tile of a side's weights in its workspace.
template <typename Side, typename T>
inline __attribute__((always_inline)) void stage_weights(BlockWorkspace<T>& workspace, int64_t tile_row,
                                                         int64_t tile_col, const PairTile<T>& weights) {
  workspace.store_tile(tile_row, tile_col, weights);
  if constexpr (Side::kRadial) workspace.add_tile_sums(tile_row, tile_col, weights);
}

// The backward of block pair (row_block, col_block): adds its pairs' contributions to both gradients.
template <typename T, typename SideX, typename SideY>
void block_pair_gradients(const SideX& x_side, const SideY& y_side, const WeightCoefficients<T>& coefficients,
                          int64_t count, int64_t row_block, int64_t col_block, BlockWorkspace<T>& x_workspace,
                          BlockWorkspace<T>& y_workspace, SharedGradient* x_gradient, SharedGradient* y_gradient) {
  using Tiles = Tiling<T>;
  const BlockRows rows = block_rows<T>(row_block, count);
  const BlockRows cols = block_rows<T>(col_block, count);
  x_workspace.clear_sums();
  y_workspace.clear_sums();

  for (int64_t tile_col = 0; tile_col < cols.count; tile_col += Tiles::kPairCols) {
    for (int64_t tile_row = 0; tile_row < rows.count; tile_row += Tiles::kPairRows) {
      const int64_t first_row = rows.begin + tile_row;
      const int64_t first_col = cols.begin + tile_col;
      const TileCoverage coverage = tile_coverage<T>(first_row, first_col, count, count, true);
      if (coverage == TileCoverage::kNone) {
        x_workspace.clear_tile(tile_row, tile_col);
        if constexpr (SideY::kHasGradient) y_workspace.clear_tile(tile_row, tile_col);
        continue;
      }
      PairTile<T> k_values;
      PairTile<T> x_slopes;
      PairTile<T> l_values;
      PairTile<T> y_slopes;
      x_side.values_and_slopes(first_row, first_col, k_values, x_slopes);
      y_side.values_and_slopes(first_row, first_col, l_values, y_slopes);
      PairTile<T> weights;
      weight_tile<T>(l_values, x_slopes, coefficients.two_c1, coefficients.alpha_x, first_row, first_col, count,
                     coverage, weights);
      stage_weights<SideX>(x_workspace, tile_row, tile_col, weights);
      if constexpr (SideY::kHasGradient) {
        weight_tile<T>(k_values, y_slopes, coefficients.two_c1, coefficients.alpha_y, first_row, first_col, count,
                       coverage, weights);
        stage_weights<SideY>(y_workspace, tile_row, tile_col, weights);
      }
    }
  }
  scatter_block_weights(x_workspace, x_side.sample, row_block, x_side.sample, col_block, SideX::kRadial, *x_gradient,
                        *x_gradient);
  if constexpr (SideY::kHasGradient) {
    scatter_block_weights(y_workspace, y_side.sample, row_block, y_side.sample, col_block, SideY::kRadial,
                          *y_gradient, *y_gradient);
  }
}

// A linear side's gradient is sum_{j: (a, j) in P} C_aj z_j. Its pair weights carry only 2 c1 L_aj;
// the separable alpha_a + alpha_j is added here in closed form and float64,
//   sum_{j: (a, j) in P} (alpha_a + alpha_j) z_j = alpha_a sum_j z_j + sum_j alpha_j z_j - [excluded] 2 alpha_a z_a,
// and so is, with the diagonal included, the pair (a, a)'s 2 c1 L_aa z_a (the pair pass never visits it).
// Why: for centred samples sum_j z_j ~ 0, so the alpha terms (c3 Ltot and c2 row_l_a, which can be
// far larger than the result) cancel; summed pair by pair in the input dtype they would leave their
// rounding error behind. Kept negated, in the accumulator of -sum_j W_aj z_j.
template <typename Side, typename OtherSide>
void add_linear_separable_terms(const Side& side, const OtherSide& other, const GradientTerms& terms,
                                const double* other_row_sums, double other_total, bool exclude_diagonal,
                                SharedGradient& gradient) {
  const int64_t count = side.sample.count;
  const int64_t dim = side.sample.dim;
  const auto* rows = side.rows;
  // Terms: sum_j z_j, then sum_j alpha_j z_j.
  const std::vector<double> sums = chunked_row_sums(count, 2 * dim, [&](int64_t row, double* out) {
    const double row_alpha = terms.alpha(other_row_sums, other_total, row);
    for (int64_t k = 0; k < dim; ++k) {
      out[k] += rows[row * dim + k];
      out[dim + k] += row_alpha * rows[row * dim + k];
    }
  });
#pragma omp parallel for schedule(static) num_threads(worker_threads())
  for (int64_t row = 0; row < count; ++row) {
    const double row_alpha = terms.alpha(other_row_sums, other_total, row);
    const double own_factor = exclude_diagonal ? -2.0 * row_alpha : 2.0 * terms.c1 * other.diagonal(row);
    double* accumulated = gradient.weighted_rows + row * gradient.padded_dim;
    for (int64_t k = 0; k < dim; ++k) {
      accumulated[k] -= row_alpha * sums[k] + sums[dim + k] + own_factor * rows[row * dim + k];
    }
  }
}

template <typename T, typename SideX, typename SideY>
std::tuple<at::Tensor, at::Tensor> pair_pass_gradients(const at::Tensor& x, const at::Tensor& y, const SideX& x_side,
                                                       const SideY& y_side, bool exclude_diagonal,
                                                       const GradientTerms& terms) {
  const int64_t count = x.size(0);
  const int64_t blocks = x_side.sample.blocks();
  const WeightCoefficients<T> coefficients(terms, count, SideX::kRadial, SideY::kRadial, x.options());
  SharedGradient x_gradient(x_side.sample, x.options());
  std::optional<SharedGradient> y_gradient;
  if constexpr (SideY::kHasGradient) y_gradient.emplace(y_side.sample, y.options());
  SharedGradient* y_gradient_data = y_gradient ? &*y_gradient : nullptr;
  BlockPairSchedule schedule(blocks);
#pragma omp parallel num_threads(worker_threads())
  {
    BlockWorkspace<T> x_workspace(x_side.sample.padded_dim);
    BlockWorkspace<T> y_workspace(SideY::kHasGradient ? y_side.sample.padded_dim : 0);
    schedule.run([&](int64_t row_block, int64_t col_block) {
      block_pair_gradients<T>(x_side, y_side, coefficients, count, row_block, col_block, x_workspace, y_workspace,
                              &x_gradient, y_gradient_data);
    });
  }
  if constexpr (!SideX::kRadial) {
    add_linear_separable_terms(x_side, y_side, terms, terms.row_l, terms.l_total, exclude_diagonal, x_gradient);
  }
  if constexpr (SideY::kHasGradient && !SideY::kRadial) {
    add_linear_separable_terms(y_side, x_side, terms, terms.row_k, terms.k_total, exclude_diagonal, *y_gradient);
  }
  at::Tensor gx = finish_gradient<T>(x, x_gradient);
  at::Tensor gy = y_gradient ? finish_gradient<T>(y, *y_gradient) : at::zeros_like(y);
  return {gx, gy};
}

// Linear x linear (see the file comment). Adds one row pair's terms sum_j x_j, sum_j y_j and
// M = sum_j x_j y_j^T (row-major p x q) to terms[0 .. p + q + p q).
template <typename T>
void add_linear_moments(const T* x_row, int64_t p, const T* y_row, int64_t q, double* terms) {
  for (int64_t k = 0; k < p; ++k) terms[k] += x_row[k];
  for (int64_t m = 0; m < q; ++m) terms[p + m] += y_row[m];
  double* cross = terms + p + q;
  for (int64_t k = 0; k < p; ++k) {
    const double x_value = x_row[k];
    for (int64_t m = 0; m < q; ++m) cross[k * q + m] += x_value * static_cast<double>(y_row[m]);
  }
}

// row_sums_i = z_i . sum_j z_j - [exclude_diagonal] ||z_i||^2.
template <typename T>
at::Tensor linear_row_sums(const at::Tensor& sample, const double* column_sums, bool exclude_diagonal) {
  const int64_t count = sample.size(0);
  const int64_t dim = sample.size(1);
  const T* rows = sample.data_ptr<T>();
  at::Tensor row_sums = at::empty({count}, sample.options().dtype(at::kDouble));
  double* out = row_sums.data_ptr<double>();
#pragma omp parallel for schedule(static) num_threads(worker_threads())
  for (int64_t row = 0; row < count; ++row) {
    double total = 0.0;
    for (int64_t k = 0; k < dim; ++k) total += column_sums[k] * rows[row * dim + k];
    out[row] = total - (exclude_diagonal ? squared_norm(rows + row * dim, dim) : 0.0);
  }
  return row_sums;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_kernels_sums(const at::Tensor& x, const at::Tensor& y,
                                                                   bool exclude_diagonal) {
  const int64_t p = x.size(1);
  const int64_t q = y.size(1);
  const T* x_rows = x.data_ptr<T>();
  const T* y_rows = y.data_ptr<T>();
  // Terms: sum x, sum y, M, then sum_i ||x_i||^2 ||y_i||^2.
  const int64_t diagonal_term = p + q + p * q;
  const std::vector<double> sums = chunked_row_sums(x.size(0), diagonal_term + 1, [&](int64_t row, double* terms) {
    add_linear_moments(x_rows + row * p, p, y_rows + row * q, q, terms);
    terms[diagonal_term] += squared_norm(x_rows + row * p, p) * squared_norm(y_rows + row * q, q);
  });
  double pair_sum = 0.0;
  for (int64_t e = p + q; e < diagonal_term; ++e) pair_sum += sums[e] * sums[e];
  if (exclude_diagonal) pair_sum -= sums[diagonal_term];
  return {at::scalar_tensor(pair_sum, x.options().dtype(at::kDouble)),
          linear_row_sums<T>(x, sums.data(), exclude_diagonal), linear_row_sums<T>(y, sums.data() + p, exclude_diagonal)};
}

// gz_a = 2 c1 cross z'_a + (c2 s'_a + 2 c3 S') sum_j z_j + c2 sum_j s'_j z_j
//        - [exclude_diagonal] (2 c1 ||z'_a||^2 + 2 c2 s'_a + 2 c3 S') z_a,
// for z = x, z' = y, s' = row_l, S' = Ltot, cross = M (or the same with x and y swapped, cross = M^T).
// cross: [dim, other_dim] row-major; column_sums = sum_j z_j; weighted_sums = sum_j s'_j z_j.
template <typename T>
at::Tensor linear_kernels_gradient(const at::Tensor& sample, const at::Tensor& other, const std::vector<double>& cross,
                                   const double* column_sums, const double* weighted_sums,
                                   const double* other_row_sums, double other_total, const GradientTerms& terms,
                                   bool exclude_diagonal) {
  const int64_t count = sample.size(0);
  const int64_t dim = sample.size(1);
  const int64_t other_dim = other.size(1);
  const T* rows = sample.data_ptr<T>();
  const T* other_rows = other.data_ptr<T>();
  at::Tensor gradient = at::empty_like(sample);
  T* out = gradient.data_ptr<T>();
#pragma omp parallel for schedule(static) num_threads(worker_threads())
  for (int64_t row = 0; row < count; ++row) {
    const T* other_row = other_rows + row * other_dim;
    const double column_factor = terms.c2 * other_row_sums[row] + 2.0 * terms.c3 * other_total;
    const double own_factor =
        exclude_diagonal ? 2.0 * terms.c1 * squared_norm(other_row, other_dim) + 2.0 * terms.c2 * other_row_sums[row] +
                               2.0 * terms.c3 * other_total
                         : 0.0;
    for (int64_t k = 0; k < dim; ++k) {
      double projected = 0.0;
      for (int64_t m = 0; m < other_dim; ++m) projected += cross[k * other_dim + m] * other_row[m];
      const double value = 2.0 * terms.c1 * projected + column_factor * column_sums[k] +
                           terms.c2 * weighted_sums[k] - own_factor * rows[row * dim + k];
      out[row * dim + k] = static_cast<T>(value);
    }
  }
  return gradient;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> linear_kernels_gradients(const at::Tensor& x, const at::Tensor& y,
                                                            bool exclude_diagonal, const GradientTerms& terms) {
  const int64_t p = x.size(1);
  const int64_t q = y.size(1);
  const T* x_rows = x.data_ptr<T>();
  const T* y_rows = y.data_ptr<T>();
  // Terms: sum x, sum y, M, then sum_j row_l_j x_j and sum_j row_k_j y_j.
  const int64_t weighted_x = p + q + p * q;
  const int64_t weighted_y = weighted_x + p;
  const std::vector<double> sums = chunked_row_sums(x.size(0), weighted_y + q, [&](int64_t row, double* terms_out) {
    add_linear_moments(x_rows + row * p, p, y_rows + row * q, q, terms_out);
    for (int64_t k = 0; k < p; ++k) terms_out[weighted_x + k] += terms.row_l[row] * x_rows[row * p + k];
    for (int64_t m = 0; m < q; ++m) terms_out[weighted_y + m] += terms.row_k[row] * y_rows[row * q + m];
  });
  const std::vector<double> cross(sums.begin() + p + q, sums.begin() + weighted_x);
  std::vector<double> cross_transposed(static_cast<size_t>(p * q));
  for (int64_t k = 0; k < p; ++k) {
    for (int64_t m = 0; m < q; ++m) cross_transposed[m * p + k] = cross[k * q + m];
  }
  return {linear_kernels_gradient<T>(x, y, cross, sums.data(), sums.data() + weighted_x, terms.row_l, terms.l_total,
                                     terms, exclude_diagonal),
          linear_kernels_gradient<T>(y, x, cross_transposed, sums.data() + p, sums.data() + weighted_y, terms.row_k,
                                     terms.k_total, terms, exclude_diagonal)};
}

// Calls body(x_side, y_side) with the sides of the two kernels, on packed copies of x and y.
template <typename T, typename Body>
auto with_sides(const at::Tensor& x, KernelKind kind_x, c10::ArrayRef<double> params_x, const at::Tensor& y,
                KernelKind kind_y, c10::ArrayRef<double> params_y, bool for_gradients, const Body& body) {
  const PackedSample<T> packed_x = pack_sample<T>(x, for_gradients);
  const PackedSample<T> packed_y = pack_sample<T>(y, for_gradients && kind_y != KernelKind::kDelta);
  auto with_y_side = [&](const auto& x_side) {
    if (kind_y == KernelKind::kRbf) return body(x_side, RadialSide<T, GaussianKernel<T>>(packed_y, params_y));
    if (kind_y == KernelKind::kImq) return body(x_side, RadialSide<T, InverseMultiquadricKernel<T>>(packed_y, params_y));
    if (kind_y == KernelKind::kLinear) return body(x_side, LinearSide<T>(packed_y, y));
    return body(x_side, DeltaSide<T>(packed_y));
  };
  if (kind_x == KernelKind::kRbf) return with_y_side(RadialSide<T, GaussianKernel<T>>(packed_x, params_x));
  if (kind_x == KernelKind::kImq) return with_y_side(RadialSide<T, InverseMultiquadricKernel<T>>(packed_x, params_x));
  return with_y_side(LinearSide<T>(packed_x, x));
}

// Internal guards: the Python wrapper has already validated the user's input.
constexpr std::string_view kOp = "hsic (cpu)";

std::pair<KernelKind, KernelKind> check_inputs(const at::Tensor& x, const at::Tensor& y, c10::string_view kernel_x,
                                               c10::ArrayRef<double> params_x, c10::string_view kernel_y,
                                               c10::ArrayRef<double> params_y) {
  check_sample_pair(kOp, x, y);
  TORCH_CHECK(x.size(0) == y.size(0), kOp, ": x and y must have the same number of rows, got ", x.size(0), " and ",
              y.size(0));
  const KernelKind kind_x =
      parse_kernel(kOp, "kernel_x", std::string_view(kernel_x.data(), kernel_x.size()), params_x, false);
  const KernelKind kind_y =
      parse_kernel(kOp, "kernel_y", std::string_view(kernel_y.data(), kernel_y.size()), params_y, true);
  TORCH_CHECK(kind_y != KernelKind::kDelta || y.size(1) == 1, kOp,
              ": the delta kernel takes y of shape [n, 1] (label ids), got ", y.sizes());
  return {kind_x, kind_y};
}

void check_row_sums(const at::Tensor& row_sums, std::string_view name, int64_t count) {
  TORCH_CHECK(row_sums.scalar_type() == at::kDouble, kOp, ": ", name, " must be float64, got ",
              row_sums.scalar_type());
  TORCH_CHECK(row_sums.dim() == 1 && row_sums.size(0) == count, kOp, ": ", name, " must have shape [", count,
              "], got ", row_sums.sizes());
  TORCH_CHECK(row_sums.device().is_cpu(), kOp, ": ", name, " must be a CPU tensor, got ", row_sums.device());
  TORCH_CHECK(row_sums.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hsic_sums_cpu(const at::Tensor& x, const at::Tensor& y,
                                                             c10::string_view kernel_x, c10::ArrayRef<double> params_x,
                                                             c10::string_view kernel_y, c10::ArrayRef<double> params_y,
                                                             bool exclude_diagonal) {
  const auto [kind_x, kind_y] = check_inputs(x, y, kernel_x, params_x, kernel_y, params_y);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hsic_sums_cpu", [&] {
    if (kind_x == KernelKind::kLinear && kind_y == KernelKind::kLinear) {
      return linear_kernels_sums<scalar_t>(x, y, exclude_diagonal);
    }
    return with_sides<scalar_t>(x, kind_x, params_x, y, kind_y, params_y, false,
                                [&](const auto& x_side, const auto& y_side) {
                                  return pair_pass_sums<scalar_t>(x, x_side, y_side, exclude_diagonal);
                                });
  });
}

std::tuple<at::Tensor, at::Tensor> hsic_grads_cpu(const at::Tensor& x, const at::Tensor& y, c10::string_view kernel_x,
                                                  c10::ArrayRef<double> params_x, c10::string_view kernel_y,
                                                  c10::ArrayRef<double> params_y, bool exclude_diagonal,
                                                  const at::Tensor& row_k, const at::Tensor& row_l, double c1,
                                                  double c2, double c3) {
  const auto [kind_x, kind_y] = check_inputs(x, y, kernel_x, params_x, kernel_y, params_y);
  const int64_t count = x.size(0);
  check_row_sums(row_k, "row_k", count);
  check_row_sums(row_l, "row_l", count);
  const double* row_k_data = row_k.data_ptr<double>();
  const double* row_l_data = row_l.data_ptr<double>();
  const GradientTerms terms{c1,
                            c2,
                            c3,
                            row_k_data,
                            row_l_data,
                            std::accumulate(row_k_data, row_k_data + count, 0.0),
                            std::accumulate(row_l_data, row_l_data + count, 0.0)};
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hsic_grads_cpu", [&] {
    if (kind_x == KernelKind::kLinear && kind_y == KernelKind::kLinear) {
      return linear_kernels_gradients<scalar_t>(x, y, exclude_diagonal, terms);
    }
    return with_sides<scalar_t>(x, kind_x, params_x, y, kind_y, params_y, true,
                                [&](const auto& x_side, const auto& y_side) {
                                  return pair_pass_gradients<scalar_t>(x, y, x_side, y_side, exclude_diagonal, terms);
                                });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(aelearn, CPU, m) {
  m.impl("hsic_sums", &hsic_sums_cpu);
  m.impl("hsic_grads", &hsic_grads_cpu);
}
