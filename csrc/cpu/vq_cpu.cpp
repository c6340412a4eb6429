// CPU kernel of aelearn::vq_nearest (schema and contract in ../vq.cpp; wrapper in aelearn/ops/vq.py).
//
// Stage 1, the hot path: a matrix product with an argmin epilogue, never an N x K matrix.
//   * The codebook is centred on its float64 mean s once per call, e'_k = fl(e_k - s), and packed
//     into panels of kCodes codes ([D, kCodes] each, zero codes past K) with ||e'_k||^2 rounded to
//     the input dtype (+inf past K, so padding codes never win).
//   * Rows of z are taken in blocks of kRows = kRowVectors vectors of lanes: a thread centres its
//     block, z'_n = fl(z_n - s), and packs -2 z'_n transposed ([D, kRows], one row per lane; the
//     factor -2 is exact). No N x D copy of z is made.
//   * A register tile (add_dot_panel_tile, distance_tiles.h) of kCodes broadcast codes times kRows
//     rows accumulates the scores s_nk = ||e'_k||^2 - 2 z'_n . e'_k (||z'_n||^2, common to the row,
//     left out) in the input dtype; they then update each row's best score b1, its code i1 and the
//     second-best score b2, lane by lane in registers. A lane is a row, so there is no cross-lane
//     reduction; each lane sees the codes in increasing order and takes strictly smaller scores
//     only, so equal scores keep the lowest code. b2 = min(b2, max(b1, s)) is the smallest score of
//     all codes but i1 (b2 = b1 when two codes share the best score, +inf while only one code has
//     been seen). Tiles whose scores are all >= the rows' b2 are skipped after one min per score
//     (see search_block).
//   * The block's rows sweep the whole packed codebook (from L2/L3: one code value per 2 kRows flops); the
//     tile's z operand stays in L1. Threads take blocks of rows dynamically.
// Stage 2, per row: certification and exact distance.
//   * With u the unit roundoff of the input dtype, A_n = ||z'_n||^2 + max_k ||e'_k||^2 and
//     delta_n = (2 D + 16) u A_n bounds |(||z'_n||^2 + s_nk) - d_nk| for every code (centring
//     roundings, the D-term dot products and norms, the final additions). If b2 - b1 > 2 delta_n,
//     every other code is provably farther than i1 and the winner is i1. Otherwise (near-ties,
//     duplicate codes, extreme cancellation, scores out of the dtype's range) the row is searched
//     again over every code in float64 by direct differences of the original inputs. On random
//     normal data (K = 8192, D = 64, float32) about 0.1% of the rows take that path.
//   * sqdist_n = d_{n, i_n} in float64 by direct differences, rounded to the input dtype.
// Memory: the outputs, the centred and packed codebook (O(K D)) and one block of rows per thread.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "distance_tiles.h"

namespace {

using namespace aelearn::cpu;

template <typename T>
struct SearchTiling {
  static constexpr int kLanes = simd::kLanes<T>;
  // Register tile: kCodes x kRowVectors accumulators, kRowVectors row vectors and one broadcast.
  // With 32 registers the per-row search state (3 vectors per row vector) stays in registers too:
  // 10 x 2 + 2 + 1 + 6 = 29; with 16 the tile takes 6 x 2 + 2 + 1 = 15 and the state is reloaded
  // after each tile.
  static constexpr int kRowVectors = 2;
  static constexpr int kCodes = simd::kVectorRegisters >= 32 ? 10 : 6;
  static constexpr int kRows = kRowVectors * kLanes;
};

// The centred codebook in the layout of the tiles.
template <typename T>
struct PackedCodebook {
  int64_t count = 0;
  int64_t dim = 0;
  int64_t tiles = 0;           // ceil(count / kCodes)
  std::vector<double> shift;   // s, the mean of the codes, [dim]
  at::Tensor panels;           // [tiles, dim, kCodes]: e'_k interleaved, zeros past count
  at::Tensor norms;            // [tiles * kCodes]: ||e'_k||^2 (float64 sum, rounded), +inf past count
  double max_norm = 0.0;       // max_k ||e'_k||^2 in float64
  const T* panel_data = nullptr;
  const T* norm_data = nullptr;
};

template <typename T>
PackedCodebook<T> pack_codebook(const at::Tensor& codebook) {
  using Tiles = SearchTiling<T>;
  PackedCodebook<T> packed;
  packed.count = codebook.size(0);
  packed.dim = codebook.size(1);
  packed.tiles = (packed.count + Tiles::kCodes - 1) / Tiles::kCodes;
  const int64_t count = packed.count;
  const int64_t dim = packed.dim;
  const T* codes = codebook.data_ptr<T>();

  packed.shift = chunked_row_sums(count, dim, [&](int64_t code, double* terms) {
    for (int64_t k = 0; k < dim; ++k) terms[k] += static_cast<double>(codes[code * dim + k]);
  });
  for (double& value : packed.shift) value /= static_cast<double>(count);

  at::Tensor centred = at::empty({count, dim}, codebook.options());
  T* centred_codes = centred.data_ptr<T>();
  const int64_t padded_count = packed.tiles * Tiles::kCodes;
  packed.norms = at::empty({padded_count}, codebook.options());
  T* norms = packed.norms.template data_ptr<T>();
  std::vector<double> exact_norms(static_cast<size_t>(count));
#pragma omp parallel for schedule(static) num_threads(worker_threads())
  for (int64_t code = 0; code < count; ++code) {
    T* out = centred_codes + code * dim;
    for (int64_t k = 0; k < dim; ++k) out[k] = static_cast<T>(static_cast<double>(codes[code * dim + k]) - packed.shift[k]);
    exact_norms[code] = squared_norm(out, dim);
    norms[code] = static_cast<T>(exact_norms[code]);
  }
  std::fill(norms + count, norms + padded_count, std::numeric_limits<T>::infinity());
  packed.max_norm = *std::max_element(exact_norms.begin(), exact_norms.end());

  packed.panels = at::empty({padded_count * dim}, codebook.options());
  pack_panels(centred_codes, count, dim, Tiles::kCodes, packed.panels.template data_ptr<T>());
  packed.panel_data = packed.panels.template data_ptr<T>();
  packed.norm_data = norms;
  return packed;
}

// One thread's block of rows: -2 z'_n transposed ([dim, kRows], lane = row, zeros past the block)
// and ||z'_n||^2 in float64; room for one row in float64 (for the exact distances).
template <typename T>
struct RowBlock {
  std::vector<T> panel;
  double squared_norms[SearchTiling<T>::kRows];
  std::vector<double> exact_row;

  explicit RowBlock(int64_t dim)
      : panel(static_cast<size_t>(dim * SearchTiling<T>::kRows)), exact_row(static_cast<size_t>(dim)) {}

  void pack(const T* rows, int64_t count, int64_t dim, const std::vector<double>& shift) {
    constexpr int kRows = SearchTiling<T>::kRows;
    for (int lane = 0; lane < kRows; ++lane) {
      double norm = 0.0;
      for (int64_t k = 0; k < dim; ++k) {
        const T centred = lane < count ? static_cast<T>(static_cast<double>(rows[lane * dim + k]) - shift[k]) : T(0);
        norm += static_cast<double>(centred) * centred;
        panel[k * kRows + lane] = T(-2) * centred;
      }
      squared_norms[lane] = norm;
    }
  }
};

// Best score, its code and second-best score of each row of a block, lane by lane.
template <typename T>
struct RowSearchState {
  static constexpr int kRowVectors = SearchTiling<T>::kRowVectors;
  Vec<T> best[kRowVectors];
  Vec<T> second[kRowVectors];
  VecBits<T> best_code[kRowVectors];
};

// Stage 1 for one block of rows (packed in `block`): every code of the codebook, tile by tile.
// Only a score below a row's second-best can change its state, which after the first few hundred
// codes is rare; so each tile first takes the smallest score of each lane (one min per score) and
// runs the full update (compare, max, min and two selects per score) only for the vectors of rows
// where that minimum is below the second-best. Skipping a tile whose scores are all >= the
// second-best leaves the state as the full update would (strict comparisons).
template <typename T>
inline void search_block(const PackedCodebook<T>& codebook, const RowBlock<T>& block, RowSearchState<T>& state) {
  using Tiles = SearchTiling<T>;
  constexpr int kCodes = Tiles::kCodes;
  constexpr int kRowVectors = Tiles::kRowVectors;
  using Lane = simd::LaneInteger<T>;
  const int64_t dim = codebook.dim;
  Vec<T> best[kRowVectors];
  Vec<T> second[kRowVectors];
  VecBits<T> best_code[kRowVectors];
  for (int v = 0; v < kRowVectors; ++v) {
    best[v] = simd::splat(std::numeric_limits<T>::infinity());
    second[v] = best[v];
    best_code[v] = VecBits<T>{};
  }
  for (int64_t tile = 0; tile < codebook.tiles; ++tile) {
    // s_nk = ||e'_k||^2 + sum_d (-2 z'_nd) e'_kd: the accumulators start at the norms.
    Vec<T> scores[kCodes][kRowVectors];
    const T* norms = codebook.norm_data + tile * kCodes;
    for (int c = 0; c < kCodes; ++c) {
      for (int v = 0; v < kRowVectors; ++v) scores[c][v] = simd::splat(norms[c]);
    }
    add_dot_panel_tile<T, kCodes, kRowVectors>(codebook.panel_data + tile * dim * kCodes, block.panel.data(), dim,
                                               scores);
    Vec<T> tile_min[kRowVectors];
    for (int v = 0; v < kRowVectors; ++v) {
      tile_min[v] = scores[0][v];
      for (int c = 1; c < kCodes; ++c) tile_min[v] = scores[c][v] < tile_min[v] ? scores[c][v] : tile_min[v];
    }
    for (int v = 0; v < kRowVectors; ++v) {
      if (!simd::any_lane<T>(tile_min[v] < second[v])) continue;
      for (int c = 0; c < kCodes; ++c) {
        const Vec<T> score = scores[c][v];
        const VecBits<T> better = score < best[v];
        const Vec<T> displaced = best[v] < score ? score : best[v];  // max(b1, s)
        second[v] = displaced < second[v] ? displaced : second[v];
        best[v] = better ? score : best[v];
        best_code[v] = better ? VecBits<T>{} + static_cast<Lane>(tile * kCodes + c) : best_code[v];
      }
    }
  }
  for (int v = 0; v < kRowVectors; ++v) {
    state.best[v] = best[v];
    state.second[v] = second[v];
    state.best_code[v] = best_code[v];
  }
}

// Exact distances d(a, b) = sum_k (a_k - b_k)^2 in float64, by direct differences, are summed in
// one fixed order for every pair, so that equal distances (duplicate codes, a row halfway between
// two codes) compare equal: lane l of a float64 vector accumulates the features k = l (mod kLanes)
// of the whole vectors, the lanes are then added pairwise in a tree (pair_sums), and the last
// dim % kLanes features one by one. The exact search runs kLanes codes at once, their trees
// interleaved in the lanes of one vector.

// kLanes<double> values of T from `source`, converted to double (one vector load and conversion).
template <typename T>
inline Vec<double> load_as_double(const T* source) {
  typedef T Narrow __attribute__((vector_size(simd::kLanes<double> * sizeof(T))));
  Narrow narrow;
  std::memcpy(&narrow, source, sizeof(narrow));
  return __builtin_convertvector(narrow, Vec<double>);
}

// Lane-wise partial sums of (a_k - b_k)^2 over the first `whole_features` (a multiple of kLanes)
// features; `a` in float64.
template <typename T>
inline Vec<double> lane_partial_sums(const double* a, const T* b, int64_t whole_features) {
  Vec<double> partial{};
  for (int64_t k = 0; k < whole_features; k += simd::kLanes<double>) {
    const Vec<double> difference = simd::load(a + k) - load_as_double(b + k);
    partial += difference * difference;
  }
  return partial;
}

// sum_k (a_k - b_k)^2 over the features from `first_feature` to dim, one by one.
template <typename T>
inline double tail_sum(const double* a, const T* b, int64_t first_feature, int64_t dim) {
  double total = 0.0;
  for (int64_t k = first_feature; k < dim; ++k) {
    const double difference = a[k] - static_cast<double>(b[k]);
    total += difference * difference;
  }
  return total;
}

// One level of the pairwise trees: lanes are taken in blocks of kWidth; block q of the result is
// the sum of the two halves of block q / 2 (pairs of blocks) of `a` (q even) or `b` (q odd).
template <int kWidth, bool kSecondHalf>
constexpr int pair_sum_source(int lane) {
  const int block = lane / kWidth;
  const int index = (block / 2) * 2 * kWidth + (kSecondHalf ? kWidth : 0) + lane % kWidth;
  return block % 2 == 0 ? index : simd::kLanes<double> + index;
}

template <int kWidth, std::size_t... kLane>
inline Vec<double> pair_sums(Vec<double> a, Vec<double> b, std::index_sequence<kLane...>) {
  return __builtin_shufflevector(a, b, pair_sum_source<kWidth, false>(kLane)...) +
         __builtin_shufflevector(a, b, pair_sum_source<kWidth, true>(kLane)...);
}

// Lane j of the result: the tree sum of the lanes of partials[j] (partials: `count` vectors, count
// = kLanes / kWidth; overwritten).
template <int kWidth = 1>
inline Vec<double> tree_sums(Vec<double>* partials, int count = simd::kLanes<double>) {
  if constexpr (kWidth == simd::kLanes<double>) {
    return partials[0];
  } else {
    for (int i = 0; i < count / 2; ++i) {
      partials[i] = pair_sums<kWidth>(partials[2 * i], partials[2 * i + 1],
                                      std::make_index_sequence<simd::kLanes<double>>{});
    }
    return tree_sums<2 * kWidth>(partials, count / 2);
  }
}

template <typename T>
double exact_squared_distance(const double* a, const T* b, int64_t dim) {
  constexpr int kLanes = simd::kLanes<double>;
  const int64_t whole_features = dim / kLanes * kLanes;
  Vec<double> partials[kLanes];
  std::fill_n(partials, kLanes, lane_partial_sums(a, b, whole_features));
  return tree_sums(partials)[0] + tail_sum(a, b, whole_features, dim);
}

// The exact search of one row (in float64): argmin_k d(row, e_k), ties to the lowest k.
template <typename T>
int64_t exact_nearest(const double* row, const T* codes, int64_t count, int64_t dim) {
  constexpr int kLanes = simd::kLanes<double>;
  const int64_t whole_features = dim / kLanes * kLanes;
  int64_t best_code = 0;
  double best = std::numeric_limits<double>::infinity();
  for (int64_t first = 0; first < count; first += kLanes) {
    const int group = static_cast<int>(std::min<int64_t>(kLanes, count - first));
    Vec<double> partials[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      // A short last group repeats its last code in the unused lanes.
      partials[j] = lane_partial_sums(row, codes + (first + std::min(j, group - 1)) * dim, whole_features);
    }
    const Vec<double> sums = tree_sums(partials);
    for (int j = 0; j < group; ++j) {
      const double distance = sums[j] + tail_sum(row, codes + (first + j) * dim, whole_features, dim);
      if (distance < best) {
        best = distance;
        best_code = first + j;
      }
    }
  }
  return best_code;
}

// Stage 2 for the `count` rows of one block, written to indices and sqdist from `first`.
template <typename T>
void finish_block(const at::Tensor& z, const at::Tensor& codebook, const PackedCodebook<T>& packed,
                  RowBlock<T>& block, const RowSearchState<T>& state, int64_t first, int64_t count,
                  int64_t* indices, T* sqdist) {
  constexpr int kLanes = simd::kLanes<T>;
  const int64_t dim = packed.dim;
  const T* rows = z.data_ptr<T>();
  const T* codes = codebook.data_ptr<T>();
  const double unit_roundoff = 0.5 * static_cast<double>(std::numeric_limits<T>::epsilon());
  // 2 delta_n = bound_factor * A_n.
  const double bound_factor = 2.0 * (2.0 * static_cast<double>(dim) + 16.0) * unit_roundoff;
  // The bound assumes the scores' arithmetic neither overflows (no intermediate exceeds 2 A_n in
  // magnitude) nor loses more than u A_n to underflow (each of the fewer than 4 D + 8 roundings
  // behind a score difference errs by at most the smallest subnormal beyond its relative error).
  const double largest_reach = 0.25 * static_cast<double>(std::numeric_limits<T>::max());
  const double smallest_reach =
      (4.0 * static_cast<double>(dim) + 8.0) * static_cast<double>(std::numeric_limits<T>::denorm_min()) / unit_roundoff;
  for (int64_t lane = 0; lane < count; ++lane) {
    const int v = static_cast<int>(lane / kLanes);
    const int l = static_cast<int>(lane % kLanes);
    const T* source_row = rows + (first + lane) * dim;
    double* row = block.exact_row.data();
    for (int64_t k = 0; k < dim; ++k) row[k] = static_cast<double>(source_row[k]);
    const double reach = block.squared_norms[lane] + packed.max_norm;  // A_n
    const double margin = static_cast<double>(state.second[v][l]) - static_cast<double>(state.best[v][l]);
    const bool certified = reach >= smallest_reach && reach <= largest_reach && margin > bound_factor * reach;
    const int64_t code = certified ? state.best_code[v][l] : exact_nearest(row, codes, packed.count, dim);
    indices[first + lane] = code;
    sqdist[first + lane] = static_cast<T>(exact_squared_distance(row, codes + code * dim, dim));
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> nearest_codes(const at::Tensor& z, const at::Tensor& codebook) {
  using Tiles = SearchTiling<T>;
  const int64_t count = z.size(0);
  at::Tensor indices = at::empty({count}, z.options().dtype(at::kLong));
  at::Tensor sqdist = at::empty({count}, z.options());
  if (count == 0) return {indices, sqdist};
  const PackedCodebook<T> packed = pack_codebook<T>(codebook);
  const int64_t dim = packed.dim;
  const T* rows = z.data_ptr<T>();
  int64_t* index_out = indices.data_ptr<int64_t>();
  T* sqdist_out = sqdist.data_ptr<T>();
  const int64_t blocks = (count + Tiles::kRows - 1) / Tiles::kRows;
#pragma omp parallel num_threads(worker_threads())
  {
    RowBlock<T> block(dim);
    RowSearchState<T> state;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t first = b * Tiles::kRows;
      const int64_t rows_here = std::min<int64_t>(Tiles::kRows, count - first);
      block.pack(rows + first * dim, rows_here, dim, packed.shift);
      search_block(packed, block, state);
      finish_block(z, codebook, packed, block, state, first, rows_here, index_out, sqdist_out);
    }
  }
  return {indices, sqdist};
}

// Internal guards: the Python wrapper has already validated the user's input (and finiteness).
void check_inputs(const at::Tensor& z, const at::Tensor& codebook) {
  constexpr std::string_view kOp = "vq_nearest (cpu)";
  TORCH_CHECK(z.dim() == 2, kOp, ": z must be 2-D [N, D], got ", z.dim(), "-D");
  TORCH_CHECK(codebook.dim() == 2, kOp, ": codebook must be 2-D [K, D], got ", codebook.dim(), "-D");
  TORCH_CHECK(codebook.size(0) >= 1 && codebook.size(1) >= 1, kOp, ": codebook must hold at least one code of "
              "dimension >= 1, got ", codebook.sizes());
  TORCH_CHECK(z.size(1) == codebook.size(1), kOp, ": z must have the codebook's dimension ", codebook.size(1),
              ", got ", z.sizes());
  // Code numbers are held in lanes as wide as the dtype's (int32 for float32).
  TORCH_CHECK(codebook.size(0) < std::numeric_limits<int32_t>::max(), kOp, ": too many codes, got ",
              codebook.size(0));
  TORCH_CHECK(z.device().is_cpu(), kOp, ": z must be a CPU tensor, got ", z.device());
  TORCH_CHECK(codebook.device().is_cpu(), kOp, ": codebook must be a CPU tensor, got ", codebook.device());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, kOp,
              ": z's dtype must be float32 or float64, got ", z.scalar_type());
  TORCH_CHECK(codebook.scalar_type() == z.scalar_type(), kOp, ": codebook must have z's dtype ", z.scalar_type(),
              ", got ", codebook.scalar_type());
  TORCH_CHECK(z.is_contiguous(), kOp, ": z must be contiguous");
  TORCH_CHECK(codebook.is_contiguous(), kOp, ": codebook must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> vq_nearest_cpu(const at::Tensor& z, const at::Tensor& codebook) {
  check_inputs(z, codebook);
  return AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "vq_nearest_cpu",
                                    [&] { return nearest_codes<scalar_t>(z, codebook); });
}

}  // namespace

TORCH_LIBRARY_IMPL(aelearn, CPU, m) {
  m.impl("vq_nearest", &vq_nearest_cpu);
}
