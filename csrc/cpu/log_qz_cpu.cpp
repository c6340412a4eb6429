// CPU kernels of aelearn::log_qz_forward and aelearn::log_qz_backward (schemas and their meaning in
// ../log_qz.cpp; the wrapper in aelearn/ops/log_qz.py chooses the MWS / MSS log-weights).
//
// Terms. Every l_ijd is evaluated in base 2 from constants computed once per column j:
//   l_ijd log2(e) = scale_jd (z_id - mu_jd)^2 + offset_jd,
//   scale_jd = -0.5 log2(e) exp(-logvar_jd),   offset_jd = -0.5 log2(e) (log(2 pi) + logvar_jd),
// a subtraction, a product and an FMA per term, and every exponential is an exp2 (simd_exp.h).
// The values of singleton groups (one term each) stay in base 2; the joint values and those of
// larger groups (sums of terms) are turned into natural units with the log-weight included (see
// in_output_units for why).
//
// Layout. The columns j (the mixture components) are packed into panels of one vector of
// consecutive j's; per dimension, a panel holds its mu, scale, offset (and, for the backward,
// exp(-logvar)) vectors side by side. Lanes run over j, so the sums over d of the joint and of
// the groups are lane-wise and every exp2 is a full vector. The dimensions are reordered so that
// each group's dimensions are contiguous (a stable sort by group); singleton groups
// (num_groups == D, the default) are special-cased at compile time: one dimension per group.
// Columns past B are padding with offset = -inf: their terms are -inf and weigh exactly 0.
//
// Log-weights. w_ij differs from log_w_other on two columns per row only (j = i, j = i + 1 mod B):
// the differences are added, as lane vectors, on the blocks of columns that hold those two columns
// (on none when the weights are equal, as in MWS); log_w_other is added to the values that change
// to natural units, and to the base-2 log-sum-exps at the end.
//
// Forward. A work item is kForwardRows rows i against all columns, in blocks of kBlockPanels
// panels. For every (row, group) and for the joint, a running log-sum-exp is kept per lane (max m
// and sum s): a block's values are computed, their lane-wise max taken, the running sum rescaled
// once per block by exp(m_old - m_new) and the block's exp(v - m_new) added. The lanes are
// combined at the end. Extra memory: the packed columns, O(B D), and per thread the running
// states of one work item.
//
// Backward, FlashAttention style: the pair weights are recomputed from the saved log-sum-exps,
//   c_ijd = gj_i exp(joint_ij - log_qz_i) + gg_ig exp(group_ijg - log_qz_ig)    (g = the group of d),
//   u_ijd = (z_id - mu_jd) exp(-logvar_jd),
//   grad_z[i, d] = -sum_j c u,   grad_mu[j, d] = sum_i c u,   grad_logvar[j, d] = 0.5 sum_i c (u (z - mu) - 1).
// A work item is a block of kBackwardRows rows by kBlockPanels panels, and one pass gives all three
// gradients:
//   1. gj_i exp(joint_ij - log_qz_i) over the block (a sum over every d, one exp2 per (i, j));
//   2. per group, c over the block (one exp2 per (i, j, group)); then per dimension of the group,
//      rows inner: the column sums of c u and of c (u (z - mu) - 1) stay in registers across the
//      rows, and the row sum of c u is one vector per (i, d), added across its lanes at the end.
//      Singleton groups compute c where it is used, in the same loop.
// The joint and group values are recomputed by the forward's operations, bit for bit, so that the
// weights are normalised exactly as the forward's sums were.
// A block's row and column sums are added to shared float64 accumulators under one lock per block
// of rows and one per block of columns: O(B D) memory whatever the number of threads.
//
// Precision: inside a block (its sums over kBlockPanels panels or kBackwardRows rows), everything is
// in the input dtype; the lanes of a log-sum-exp are combined in float64, and the gradients are
// summed across blocks in float64. The forward is the same bit for bit whatever the number of
// threads; the gradients' float64 accumulation order follows the schedule, so they may differ in
// the last bits from run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <numbers>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd_exp.h"
#include "simd_vector.h"

namespace {

namespace simd = aelearn::simd;
using simd::Vec;

template <typename T>
struct Tiling {
  static constexpr int kLanes = simd::kLanes<T>;
  // Panels (vectors of columns) evaluated together. Their values and accumulators stay in
  // registers: 8 group values + 8 joint accumulators in the forward, 8 + 8 column sums in the
  // backward, with the operands, of 32 vector registers (4 + 4 of 16).
  static constexpr int kBlockPanels = simd::kVectorRegisters >= 32 ? 8 : 4;
  static constexpr int kBlockColumns = kBlockPanels * kLanes;
  // Rows of a forward work item: a block of columns is read once for all of them, and their
  // running states (2 (G + 1) vectors per row) stay in L2.
  static constexpr int kForwardRows = 16;
  // Rows of a backward block: its joint weights and group weights (kBlockPanels vectors per row)
  // stay in L1 while every dimension runs over them.
  static constexpr int kBackwardRows = 32;
};

// Threads of every parallel region: torch's intra-op setting (torch.set_num_threads), which holds
// on whatever thread calls the op, unlike the calling thread's OpenMP default.
int worker_threads() {
  return at::get_num_threads();
}

constexpr double kLn2 = std::numbers::ln2;
constexpr double kLog2Pi = 1.83787706640934548356;  // log(2 pi)

// --- Horizontal reductions -----------------------------------------------------------------------

template <typename T, int kBytes>
struct PartialVector {
  typedef T type __attribute__((vector_size(kBytes)));
};

// op over the lanes, by halving the vector (log2(lanes) narrowing steps, no scalar loop). The halves
// are taken by memcpy, which compilers turn into register extracts or a store and two loads; GCC
// only has a shuffle builtin that narrows (__builtin_shufflevector) from version 12 on.
template <typename T, int kBytes, typename Op>
inline T reduce_lanes(typename PartialVector<T, kBytes>::type value, Op op) {
  if constexpr (kBytes == static_cast<int>(sizeof(T))) {
    return value[0];
  } else {
    typename PartialVector<T, kBytes / 2>::type low;
    typename PartialVector<T, kBytes / 2>::type high;
    std::memcpy(&low, &value, kBytes / 2);
    std::memcpy(&high, reinterpret_cast<const char*>(&value) + kBytes / 2, kBytes / 2);
    return reduce_lanes<T, kBytes / 2>(op(low, high), op);
  }
}

// In the input dtype, by halves: cheaper than simd::sum_lanes (float64, lane by lane) in the
// backward's loops, which sum one vector per (row, dimension, block).
template <typename T>
inline T lanes_sum(Vec<T> value) {
  return reduce_lanes<T, simd::kVectorBytes>(value, [](auto a, auto b) { return a + b; });
}

template <typename T>
inline T lanes_max(Vec<T> value) {
  return reduce_lanes<T, simd::kVectorBytes>(value, [](auto a, auto b) { return a > b ? a : b; });
}

// --- Inputs in the kernels' layouts ----------------------------------------------------------------

// The dimensions sorted by group (stable): group g holds positions [begin[g], begin[g + 1]).
struct DimGroups {
  int64_t count = 0;
  bool singleton = false;      // one dimension per group (num_groups == D): group g is position g
  bool identity = false;       // order[p] == p
  std::vector<int64_t> order;  // position -> dimension
  std::vector<int64_t> begin;  // group -> first position, begin[count] = D
};

DimGroups sort_dimensions(const at::Tensor& group_of_dim, int64_t num_groups) {
  const int64_t dim = group_of_dim.size(0);
  const int64_t* group = group_of_dim.data_ptr<int64_t>();
  DimGroups groups;
  groups.count = num_groups;
  groups.singleton = num_groups == dim;
  groups.begin.assign(static_cast<size_t>(num_groups + 1), 0);
  for (int64_t d = 0; d < dim; ++d) {
    TORCH_CHECK(group[d] >= 0 && group[d] < num_groups, "log_qz (cpu): group_of_dim[", d, "] = ", group[d],
                " is outside [0, num_groups = ", num_groups, ")");
    ++groups.begin[group[d] + 1];
  }
  for (int64_t g = 0; g < num_groups; ++g) {
    TORCH_CHECK(groups.begin[g + 1] > 0, "log_qz (cpu): group ", g, " has no dimension in group_of_dim");
    groups.begin[g + 1] += groups.begin[g];
  }
  groups.order.resize(static_cast<size_t>(dim));
  std::vector<int64_t> next(groups.begin.begin(), groups.begin.end() - 1);
  for (int64_t d = 0; d < dim; ++d) groups.order[next[group[d]]++] = d;
  groups.identity = true;
  for (int64_t p = 0; p < dim; ++p) groups.identity = groups.identity && groups.order[p] == p;
  return groups;
}

enum ColumnField { kMean = 0, kScale = 1, kOffset = 2, kPrecision = 3 };

// The columns as panels: [panels][positions][fields][kLanes], panels padded to whole blocks.
template <typename T>
struct ColumnPanels {
  static constexpr int kLanes = Tiling<T>::kLanes;
  int64_t panels = 0;
  int64_t dim = 0;
  int64_t fields = 0;
  at::Tensor storage;
  const T* data = nullptr;

  // The vectors of one (panel, position): field f at cell + f * kLanes.
  const T* cell(int64_t panel, int64_t position) const { return data + (panel * dim + position) * fields * kLanes; }
};

// fields: 3 (mean, scale, offset) for the forward, 4 (and exp(-logvar)) for the backward.
template <typename T>
ColumnPanels<T> pack_columns(const at::Tensor& mu, const at::Tensor& logvar, const DimGroups& groups, int64_t fields) {
  using Tiles = Tiling<T>;
  constexpr int kLanes = Tiles::kLanes;
  const int64_t count = mu.size(0);
  const int64_t dim = mu.size(1);
  ColumnPanels<T> packed;
  packed.dim = dim;
  packed.fields = fields;
  packed.panels = (count + Tiles::kBlockColumns - 1) / Tiles::kBlockColumns * Tiles::kBlockPanels;
  packed.storage = at::empty({packed.panels * dim * fields * kLanes}, mu.options());
  T* out = packed.storage.template data_ptr<T>();
  const T* means = mu.data_ptr<T>();
  const T* logvars = logvar.data_ptr<T>();
  const int64_t* order = groups.order.data();
  const int64_t panels = packed.panels;
#pragma omp parallel for schedule(static) num_threads(worker_threads())
  for (int64_t panel = 0; panel < panels; ++panel) {
    for (int64_t position = 0; position < dim; ++position) {
      T* cell = out + (panel * dim + position) * fields * kLanes;
      for (int lane = 0; lane < kLanes; ++lane) {
        const int64_t column = panel * kLanes + lane;
        if (column < count) {
          const int64_t index = column * dim + order[position];
          const double log_variance = logvars[index];
          const double precision = std::exp(-log_variance);
          cell[kMean * kLanes + lane] = means[index];
          cell[kScale * kLanes + lane] = static_cast<T>(-0.5 * simd::kLog2e * precision);
          cell[kOffset * kLanes + lane] = static_cast<T>(-0.5 * simd::kLog2e * (kLog2Pi + log_variance));
          if (fields > kPrecision) cell[kPrecision * kLanes + lane] = static_cast<T>(precision);
        } else {
          cell[kMean * kLanes + lane] = T(0);
          cell[kScale * kLanes + lane] = T(0);
          cell[kOffset * kLanes + lane] = -std::numeric_limits<T>::infinity();
          if (fields > kPrecision) cell[kPrecision * kLanes + lane] = T(0);
        }
      }
    }
  }
  packed.data = out;
  return packed;
}

// z with its dimensions in group order (z itself when the order is the identity).
at::Tensor rows_in_group_order(const at::Tensor& z, const DimGroups& groups) {
  if (groups.identity) return z;
  const at::Tensor order = at::tensor(at::ArrayRef<int64_t>(groups.order), z.options().dtype(at::kLong));
  return z.index_select(1, order).contiguous();
}

// The log-weights, as the kernels use them.
struct LogWeights {
  double other = 0.0;        // log_w_other
  bool distinct = false;     // log_w_self or log_w_next differs from log_w_other
  double self_shift = 0.0;   // (log_w_self - log_w_other) log2(e)
  double next_shift = 0.0;   // (log_w_next - log_w_other) log2(e)
};

LogWeights log_weights(double log_w_self, double log_w_next, double log_w_other) {
  LogWeights weights;
  weights.other = log_w_other;
  weights.self_shift = (log_w_self - log_w_other) * simd::kLog2e;
  weights.next_shift = (log_w_next - log_w_other) * simd::kLog2e;
  weights.distinct = weights.self_shift != 0.0 || weights.next_shift != 0.0;
  return weights;
}

// Whether the block of columns [first_column, first_column + kBlockColumns) needs log-weight shifts
// in row i: it holds the row's own column or the next one (i + 1 mod B) and the weights are
// distinct. With distinct weights, writes the block's shifts for the row (kBlockPanels vectors,
// 0 but on those two columns) either way.
template <typename T>
bool row_shifts(int64_t row, int64_t first_column, int64_t count, const LogWeights& weights, Vec<T>* shifts) {
  using Tiles = Tiling<T>;
  constexpr int kLanes = Tiles::kLanes;
  if (!weights.distinct) return false;
  const int64_t next = (row + 1) % count;
  const bool holds_self = row >= first_column && row < first_column + Tiles::kBlockColumns;
  // With B == 1 the next column is the row's own: log_w_self wins.
  const bool holds_next = next != row && next >= first_column && next < first_column + Tiles::kBlockColumns;
  std::fill_n(shifts, Tiles::kBlockPanels, Vec<T>{});
  auto set = [&](int64_t column, double shift) {
    shifts[(column - first_column) / kLanes][(column - first_column) % kLanes] = static_cast<T>(shift);
  };
  if (holds_next) set(next, weights.next_shift);
  if (holds_self) set(row, weights.self_shift);
  return holds_self || holds_next;
}

// Calls body(std::bool_constant<first>, std::bool_constant<second>): two run-time flags to template
// arguments.
template <typename Body>
inline void with_flags(bool first, bool second, Body&& body) {
  if (first) {
    if (second) {
      body(std::true_type{}, std::true_type{});
    } else {
      body(std::true_type{}, std::false_type{});
    }
  } else if (second) {
    body(std::false_type{}, std::true_type{});
  } else {
    body(std::false_type{}, std::false_type{});
  }
}

// --- Shared inner loops ----------------------------------------------------------------------------

template <typename T>
inline Vec<T> lane_max(Vec<T> a, Vec<T> b) {
  return a > b ? a : b;
}

// values[k] = sum over positions [begin, end) of the base-2 terms scale (z - mu)^2 + offset, for
// panel first_panel + k and the row `row` (in group order).
template <typename T>
inline void group_values(const ColumnPanels<T>& columns, int64_t first_panel, const T* row, int64_t begin,
                         int64_t end, Vec<T> (&values)[Tiling<T>::kBlockPanels]) {
  constexpr int kLanes = Tiling<T>::kLanes;
  constexpr int kPanels = Tiling<T>::kBlockPanels;
  auto term = [&](int64_t position, int panel) {
    const T* cell = columns.cell(first_panel + panel, position);
    const Vec<T> difference = simd::splat(row[position]) - simd::load(cell + kMean * kLanes);
    return difference * difference * simd::load(cell + kScale * kLanes) + simd::load(cell + kOffset * kLanes);
  };
  for (int panel = 0; panel < kPanels; ++panel) values[panel] = term(begin, panel);
  for (int64_t position = begin + 1; position < end; ++position) {
    for (int panel = 0; panel < kPanels; ++panel) values[panel] += term(position, panel);
  }
}

// --- Forward -----------------------------------------------------------------------------------------

// The units of the values a running state sees: base-2 log-densities without the log-weight
// (singleton groups), or natural ones with it (the joint and larger groups, see in_output_units).
enum class Units { kBase2, kNatural };

// 2^difference or e^difference, for difference <= 0 in the given units.
template <typename T, Units kUnits>
inline Vec<T> exp_in(Vec<T> difference) {
  if constexpr (kUnits == Units::kNatural) {
    return simd::exp2_nonpositive<T>(difference * static_cast<T>(simd::kLog2e));
  } else {
    return simd::exp2_nonpositive<T>(difference);
  }
}

// Per lane, the log-sum-exp of the values seen so far is max + log(sum) (in the values' units).
// max starts at the lowest finite value, not -inf, so that lanes that only ever see padding
// (-inf) rescale by exp(0) instead of exp(-inf - -inf) = NaN.
template <typename T>
struct RunningLogSumExp {
  Vec<T> max = simd::splat(std::numeric_limits<T>::lowest());
  Vec<T> sum{};
};

template <typename T, Units kUnits>
inline void accumulate(RunningLogSumExp<T>& state, const Vec<T> (&values)[Tiling<T>::kBlockPanels]) {
  constexpr int kPanels = Tiling<T>::kBlockPanels;
  Vec<T> block_max = values[0];
  for (int panel = 1; panel < kPanels; ++panel) block_max = lane_max<T>(block_max, values[panel]);
  const Vec<T> new_max = lane_max<T>(state.max, block_max);
  Vec<T> sum = state.sum * exp_in<T, kUnits>(state.max - new_max);
  for (int panel = 0; panel < kPanels; ++panel) sum += exp_in<T, kUnits>(values[panel] - new_max);
  state.max = new_max;
  state.sum = sum;
}

// The natural log-sum-exp of a running state: its lanes combined in float64.
template <typename T, Units kUnits>
double finish(const RunningLogSumExp<T>& state) {
  const T max = lanes_max<T>(state.max);
  const double total = lanes_sum<T>(state.sum * exp_in<T, kUnits>(state.max - max));
  if constexpr (kUnits == Units::kNatural) {
    return static_cast<double>(max) + std::log(total);
  } else {
    return kLn2 * (static_cast<double>(max) + std::log2(total));
  }
}

// Base-2 values (with their weight shifts) in the units of the outputs, natural and with the
// log-weight, rounded to the input dtype. Why: the backward normalises its weights by the saved
// log-sum-exps, rounded to the input dtype in natural units. Where one column dominates a row, as
// j = i does over many dimensions, the forward's natural log-sum-exp rounds to that column's value
// exactly, and the backward, which recomputes the value by the same operations, gets a weight of
// exactly 1. Converting a saved log-sum-exp back to base 2 instead costs an error of order
// ulp(log_qz) in every weight of its row, and |log_qz| reaches hundreds for the joint (and for
// large groups) where a 1-D marginal stays near 10: singleton groups keep the cheaper base 2,
// which spares a product per term in the hot loops.
// The forward and the backward must round these values identically, so the product and the sum
// are one explicit fma (one vector FMA where the target has them): written as base2 * ln2 + w, the
// compiler contracts it or not depending on the surrounding code (the backward's copy was seen
// unfused, one ulp off the forward's), or fuses the product into the backward's later subtraction.
template <typename T>
inline Vec<T> in_output_units(Vec<T> base2, T log_w_other) {
  Vec<T> natural;
  for (int lane = 0; lane < simd::kLanes<T>; ++lane) {
    natural[lane] = std::fma(base2[lane], static_cast<T>(kLn2), log_w_other);
  }
  return natural;
}

// joint[k] = the sum of the group values of panel first_panel + k, calling group_done(g, values)
// on each group's values. The backward recomputes the joint and the groups through this function
// and group_values, in the forward's order of operations: the same bits as the forward's values,
// so that its weights 2^(value - log-sum-exp) are normalised as the forward's were.
template <typename T, bool kSingleton, typename GroupDone>
inline void joint_values(const ColumnPanels<T>& columns, int64_t first_panel, const T* row, const DimGroups& groups,
                         Vec<T> (&joint)[Tiling<T>::kBlockPanels], GroupDone group_done) {
  constexpr int kPanels = Tiling<T>::kBlockPanels;
  for (int panel = 0; panel < kPanels; ++panel) joint[panel] = Vec<T>{};
  for (int64_t g = 0; g < groups.count; ++g) {
    const int64_t begin = kSingleton ? g : groups.begin[g];
    const int64_t end = kSingleton ? g + 1 : groups.begin[g + 1];
    Vec<T> values[kPanels];
    group_values(columns, first_panel, row, begin, end, values);
    for (int panel = 0; panel < kPanels; ++panel) joint[panel] += values[panel];
    group_done(g, values);
  }
}

// Adds one block of columns to one row's running states: states[g] for the groups, states[G] for
// the joint. shifts: the block's log-weight shifts (kShifted only).
template <typename T, bool kSingleton, bool kShifted>
void forward_block(const ColumnPanels<T>& columns, int64_t first_panel, const T* row, const DimGroups& groups,
                   T log_w_other, RunningLogSumExp<T>* states, const Vec<T>* shifts) {
  constexpr int kPanels = Tiling<T>::kBlockPanels;
  Vec<T> joint[kPanels];
  joint_values<T, kSingleton>(columns, first_panel, row, groups, joint, [&](int64_t g, Vec<T>(&values)[kPanels]) {
    if constexpr (kShifted) {
      for (int panel = 0; panel < kPanels; ++panel) values[panel] += shifts[panel];
    }
    if constexpr (kSingleton) {
      accumulate<T, Units::kBase2>(states[g], values);
    } else {
      for (int panel = 0; panel < kPanels; ++panel) values[panel] = in_output_units(values[panel], log_w_other);
      accumulate<T, Units::kNatural>(states[g], values);
    }
  });
  for (int panel = 0; panel < kPanels; ++panel) {
    if constexpr (kShifted) joint[panel] += shifts[panel];
    joint[panel] = in_output_units(joint[panel], log_w_other);
  }
  accumulate<T, Units::kNatural>(states[groups.count], joint);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& z, const at::Tensor& mu, const at::Tensor& logvar,
                                           const DimGroups& groups, const LogWeights& weights) {
  using Tiles = Tiling<T>;
  const int64_t count = z.size(0);
  const int64_t dim = z.size(1);
  const int64_t group_count = groups.count;
  const ColumnPanels<T> columns = pack_columns<T>(mu, logvar, groups, 3);
  const at::Tensor rows = rows_in_group_order(z, groups);
  const T* row_data = rows.data_ptr<T>();
  at::Tensor log_qz = at::empty({count}, z.options());
  at::Tensor log_qz_groups = at::empty({count, group_count}, z.options());
  T* joint_out = log_qz.data_ptr<T>();
  T* groups_out = log_qz_groups.data_ptr<T>();
  const int64_t items = (count + Tiles::kForwardRows - 1) / Tiles::kForwardRows;
  const int64_t blocks = columns.panels / Tiles::kBlockPanels;
  const T log_w_other = static_cast<T>(weights.other);

#pragma omp parallel num_threads(worker_threads())
  {
    std::vector<RunningLogSumExp<T>> states(static_cast<size_t>(Tiles::kForwardRows * (group_count + 1)));
    Vec<T> shifts[Tiles::kBlockPanels];
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t first_row = item * Tiles::kForwardRows;
      const int64_t rows_here = std::min<int64_t>(Tiles::kForwardRows, count - first_row);
      std::fill(states.begin(), states.end(), RunningLogSumExp<T>{});
      for (int64_t block = 0; block < blocks; ++block) {
        for (int64_t r = 0; r < rows_here; ++r) {
          const int64_t i = first_row + r;
          const bool shifted = row_shifts<T>(i, block * Tiles::kBlockColumns, count, weights, shifts);
          with_flags(groups.singleton, shifted, [&](auto singleton, auto shift) {
            forward_block<T, decltype(singleton)::value, decltype(shift)::value>(
                columns, block * Tiles::kBlockPanels, row_data + i * dim, groups, log_w_other,
                states.data() + r * (group_count + 1), shifts);
          });
        }
      }
      for (int64_t r = 0; r < rows_here; ++r) {
        const int64_t i = first_row + r;
        const RunningLogSumExp<T>* row_states = states.data() + r * (group_count + 1);
        for (int64_t g = 0; g < group_count; ++g) {
          groups_out[i * group_count + g] =
              static_cast<T>(groups.singleton ? finish<T, Units::kBase2>(row_states[g]) + weights.other
                                              : finish<T, Units::kNatural>(row_states[g]));
        }
        joint_out[i] = static_cast<T>(finish<T, Units::kNatural>(row_states[group_count]));
      }
    }
  }
  return {log_qz, log_qz_groups};
}

// --- Backward ----------------------------------------------------------------------------------------

template <typename T>
struct BackwardInputs {
  ColumnPanels<T> columns;
  at::Tensor rows;              // z in group order
  const T* row_data = nullptr;  // [B, D]
  int64_t count = 0;
  int64_t dim = 0;
  const DimGroups* groups = nullptr;
  T log_w_other = 0;
  const T* joint_log_q = nullptr;  // log_qz [B]
  const T* joint_grad = nullptr;   // grad_log_qz [B]
  // The saved group log-sum-exps and their upstream gradients, [B, G]: log_qz_groups and
  // grad_log_qz_groups, or, for singleton groups (base 2), log2 q = (log_qz_groups - log_w_other)
  // log2(e) (float64) rounded to the input dtype, log_q = round(log2 q), with the rounding undone
  // in the gradients, grad = grad_log_qz_groups 2^(log_q - log2 q), so that grad 2^(v - log_q) =
  // grad_log_qz_groups 2^(v - log2 q) exactly.
  const T* group_log_q = nullptr;
  const T* group_grad = nullptr;
  std::vector<T> base2_group_log_q;
  std::vector<T> base2_group_grad;
};

// One thread's scratch for a block.
template <typename T>
struct BackwardWorkspace {
  using Tiles = Tiling<T>;
  static constexpr size_t kBlockVectors = static_cast<size_t>(Tiles::kBackwardRows) * Tiles::kBlockPanels;
  std::vector<Vec<T>> joint_weights = std::vector<Vec<T>>(kBlockVectors);  // [rows][panels]: gj_i exp(joint - log_qz_i)
  std::vector<Vec<T>> pair_weights = std::vector<Vec<T>>(kBlockVectors);   // [rows][panels]: c of the current group
  std::vector<Vec<T>> shifts = std::vector<Vec<T>>(kBlockVectors);         // [rows][panels]: log-weight shifts
  std::vector<T> row_sums;             // [rows][D]: sum_j c u
  std::vector<Vec<T>> mean_sums;       // [D][panels]: sum_i c u
  std::vector<Vec<T>> log_variance_sums;  // [D][panels]: sum_i c (u (z - mu) - 1)

  explicit BackwardWorkspace(int64_t dim)
      : row_sums(static_cast<size_t>(Tiles::kBackwardRows * dim)),
        mean_sums(static_cast<size_t>(dim * Tiles::kBlockPanels)),
        log_variance_sums(static_cast<size_t>(dim * Tiles::kBlockPanels)) {}
};

// Float64 sums of every block, shared by all threads, in position order (see DimGroups). The
// column sums are stored position-major, so that a block adds its contiguous columns to them.
struct SharedGradients {
  at::Tensor storage;               // [3, B * D] float64
  double* z = nullptr;              // [B, D]: sum_j c u, grad_z = -z
  double* mean = nullptr;           // [D, B]: grad_mu
  double* log_variance = nullptr;   // [D, B]: 2 grad_logvar
  std::vector<std::mutex> row_locks;
  std::vector<std::mutex> column_locks;

  SharedGradients(int64_t count, int64_t dim, int64_t row_blocks, int64_t column_blocks,
                  const at::TensorOptions& options)
      : storage(at::zeros({3, count * dim}, options.dtype(at::kDouble))),
        row_locks(static_cast<size_t>(row_blocks)),
        column_locks(static_cast<size_t>(column_blocks)) {
    z = storage.data_ptr<double>();
    mean = z + count * dim;
    log_variance = mean + count * dim;
  }
};

// Adds the pair terms of one (row, panel, dimension) with weight c to the row sum and the column sums.
template <typename T>
inline void add_pair_terms(Vec<T> weight, Vec<T> difference, Vec<T> precision, Vec<T>& row_sum, Vec<T>& mean_sum,
                           Vec<T>& log_variance_sum) {
  const Vec<T> weighted_u = weight * (difference * precision);
  row_sum += weighted_u;
  mean_sum += weighted_u;
  log_variance_sum += weighted_u * difference - weight;
}

// The block's sums for dimension `position`, rows inner; pair_weight(r, panel, difference, cell)
// gives c for row r and a panel of columns.
template <typename T, typename PairWeight>
inline void dimension_sums(const BackwardInputs<T>& in, int64_t first_row, int64_t rows_here, int64_t first_panel,
                           int64_t position, BackwardWorkspace<T>& workspace, PairWeight pair_weight) {
  constexpr int kLanes = Tiling<T>::kLanes;
  constexpr int kPanels = Tiling<T>::kBlockPanels;
  Vec<T> mean_sums[kPanels] = {};
  Vec<T> log_variance_sums[kPanels] = {};
  for (int64_t r = 0; r < rows_here; ++r) {
    const Vec<T> z = simd::splat(in.row_data[(first_row + r) * in.dim + position]);
    Vec<T> row_sum{};
    // Unrolled so that the column sums stay in registers (GCC keeps this loop, with its exp2, rolled).
#pragma GCC unroll 16
    for (int panel = 0; panel < kPanels; ++panel) {
      const T* cell = in.columns.cell(first_panel + panel, position);
      const Vec<T> difference = z - simd::load(cell + kMean * kLanes);
      add_pair_terms<T>(pair_weight(r, panel, difference, cell), difference, simd::load(cell + kPrecision * kLanes),
                     row_sum, mean_sums[panel], log_variance_sums[panel]);
    }
    workspace.row_sums[r * in.dim + position] = lanes_sum<T>(row_sum);
  }
  for (int panel = 0; panel < kPanels; ++panel) {
    workspace.mean_sums[position * kPanels + panel] = mean_sums[panel];
    workspace.log_variance_sums[position * kPanels + panel] = log_variance_sums[panel];
  }
}

template <typename T, bool kSingleton, bool kShifted>
void backward_block(const BackwardInputs<T>& in, int64_t first_row, int64_t rows_here, int64_t first_panel,
                    BackwardWorkspace<T>& workspace) {
  constexpr int kLanes = Tiling<T>::kLanes;
  constexpr int kPanels = Tiling<T>::kBlockPanels;
  const DimGroups& groups = *in.groups;
  const int64_t dim = in.dim;
  const int64_t group_count = groups.count;
  const Vec<T>* shifts = workspace.shifts.data();

  // 1. gj_i exp(joint_ij - log_qz_i).
  for (int64_t r = 0; r < rows_here; ++r) {
    const int64_t i = first_row + r;
    Vec<T> joint[kPanels];
    joint_values<T, kSingleton>(in.columns, first_panel, in.row_data + i * dim, groups, joint,
                                [](int64_t, Vec<T>(&)[kPanels]) {});
    const Vec<T> log_q = simd::splat(in.joint_log_q[i]);
    for (int panel = 0; panel < kPanels; ++panel) {
      if constexpr (kShifted) joint[panel] += shifts[r * kPanels + panel];
      const Vec<T> value = in_output_units(joint[panel], in.log_w_other);
      workspace.joint_weights[r * kPanels + panel] = in.joint_grad[i] * exp_in<T, Units::kNatural>(value - log_q);
    }
  }

  // 2. Per group: c, then the sums of its dimensions.
  const Vec<T>* joint_weights = workspace.joint_weights.data();
  if constexpr (kSingleton) {
    for (int64_t position = 0; position < dim; ++position) {
      dimension_sums(in, first_row, rows_here, first_panel, position, workspace,
                     [&](int64_t r, int panel, Vec<T> difference, const T* cell) {
                       const int64_t group_index = (first_row + r) * group_count + position;
                       Vec<T> value = difference * difference * simd::load(cell + kScale * kLanes) +
                                      simd::load(cell + kOffset * kLanes);
                       if constexpr (kShifted) value += shifts[r * kPanels + panel];
                       return joint_weights[r * kPanels + panel] +
                              in.group_grad[group_index] *
                                  simd::exp2_nonpositive<T>(value - in.group_log_q[group_index]);
                     });
    }
  } else {
    Vec<T>* pair_weights = workspace.pair_weights.data();
    for (int64_t g = 0; g < group_count; ++g) {
      const int64_t begin = groups.begin[g];
      const int64_t end = groups.begin[g + 1];
      for (int64_t r = 0; r < rows_here; ++r) {
        const int64_t i = first_row + r;
        Vec<T> values[kPanels];
        group_values(in.columns, first_panel, in.row_data + i * dim, begin, end, values);
        const Vec<T> log_q = simd::splat(in.group_log_q[i * group_count + g]);
        const T grad = in.group_grad[i * group_count + g];
        for (int panel = 0; panel < kPanels; ++panel) {
          if constexpr (kShifted) values[panel] += shifts[r * kPanels + panel];
          const Vec<T> value = in_output_units(values[panel], in.log_w_other);
          pair_weights[r * kPanels + panel] =
              joint_weights[r * kPanels + panel] + grad * exp_in<T, Units::kNatural>(value - log_q);
        }
      }
      for (int64_t position = begin; position < end; ++position) {
        dimension_sums(in, first_row, rows_here, first_panel, position, workspace,
                       [&](int64_t r, int panel, Vec<T>, const T*) { return pair_weights[r * kPanels + panel]; });
      }
    }
  }
}

// Adds a block's sums to the shared accumulators, rows and columns each under their block's lock.
template <typename T>
void add_block_sums(const BackwardInputs<T>& in, int64_t row_block, int64_t first_row, int64_t rows_here,
                    int64_t column_block, const BackwardWorkspace<T>& workspace, SharedGradients& shared) {
  constexpr int kPanels = Tiling<T>::kBlockPanels;
  const int64_t dim = in.dim;
  {
    std::lock_guard<std::mutex> guard(shared.row_locks[row_block]);
    double* out = shared.z + first_row * dim;
    for (int64_t k = 0; k < rows_here * dim; ++k) out[k] += static_cast<double>(workspace.row_sums[k]);
  }
  const int64_t first_column = column_block * Tiling<T>::kBlockColumns;
  const int64_t columns_here = std::min<int64_t>(Tiling<T>::kBlockColumns, in.count - first_column);
  std::lock_guard<std::mutex> guard(shared.column_locks[column_block]);
  for (int64_t position = 0; position < dim; ++position) {
    // The block's panels of one position are its columns in order.
    const T* mean_sums = reinterpret_cast<const T*>(workspace.mean_sums.data() + position * kPanels);
    const T* log_variance_sums = reinterpret_cast<const T*>(workspace.log_variance_sums.data() + position * kPanels);
    double* mean_out = shared.mean + position * in.count + first_column;
    double* log_variance_out = shared.log_variance + position * in.count + first_column;
    for (int64_t c = 0; c < columns_here; ++c) {
      mean_out[c] += static_cast<double>(mean_sums[c]);
      log_variance_out[c] += static_cast<double>(log_variance_sums[c]);
    }
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& z, const at::Tensor& mu,
                                                        const at::Tensor& logvar, const DimGroups& groups,
                                                        const LogWeights& weights, const at::Tensor& log_qz,
                                                        const at::Tensor& log_qz_groups, const at::Tensor& grad_log_qz,
                                                        const at::Tensor& grad_log_qz_groups) {
  using Tiles = Tiling<T>;
  const int64_t count = z.size(0);
  const int64_t dim = z.size(1);
  const int64_t group_count = groups.count;

  BackwardInputs<T> in;
  in.columns = pack_columns<T>(mu, logvar, groups, 4);
  in.rows = rows_in_group_order(z, groups);
  in.row_data = in.rows.template data_ptr<T>();
  in.count = count;
  in.dim = dim;
  in.groups = &groups;
  in.log_w_other = static_cast<T>(weights.other);
  in.joint_log_q = log_qz.data_ptr<T>();
  in.joint_grad = grad_log_qz.data_ptr<T>();
  in.group_log_q = log_qz_groups.data_ptr<T>();
  in.group_grad = grad_log_qz_groups.data_ptr<T>();
  if (groups.singleton) {
    in.base2_group_log_q.resize(static_cast<size_t>(count * group_count));
    in.base2_group_grad.resize(static_cast<size_t>(count * group_count));
    T* log_q = in.base2_group_log_q.data();
    T* grad = in.base2_group_grad.data();
#pragma omp parallel for schedule(static) num_threads(worker_threads())
    for (int64_t k = 0; k < count * group_count; ++k) {
      const double exact = (static_cast<double>(in.group_log_q[k]) - weights.other) * simd::kLog2e;
      log_q[k] = static_cast<T>(exact);
      const double rounding = static_cast<double>(log_q[k]) - exact;
      grad[k] = static_cast<T>(static_cast<double>(in.group_grad[k]) * std::exp2(rounding));
    }
    in.group_log_q = log_q;
    in.group_grad = grad;
  }

  const int64_t row_blocks = (count + Tiles::kBackwardRows - 1) / Tiles::kBackwardRows;
  const int64_t column_blocks = in.columns.panels / Tiles::kBlockPanels;
  SharedGradients shared(count, dim, row_blocks, column_blocks, z.options());
  const int64_t items = row_blocks * column_blocks;

#pragma omp parallel num_threads(worker_threads())
  {
    BackwardWorkspace<T> workspace(dim);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t row_block = item / column_blocks;
      const int64_t column_block = item % column_blocks;
      const int64_t first_row = row_block * Tiles::kBackwardRows;
      const int64_t rows_here = std::min<int64_t>(Tiles::kBackwardRows, count - first_row);
      bool shifted = false;
      for (int64_t r = 0; r < rows_here; ++r) {
        shifted |= row_shifts<T>(first_row + r, column_block * Tiles::kBlockColumns, count, weights,
                                 workspace.shifts.data() + r * Tiles::kBlockPanels);
      }
      with_flags(groups.singleton, shifted, [&](auto singleton, auto shift) {
        backward_block<T, decltype(singleton)::value, decltype(shift)::value>(
            in, first_row, rows_here, column_block * Tiles::kBlockPanels, workspace);
      });
      add_block_sums(in, row_block, first_row, rows_here, column_block, workspace, shared);
    }
  }

  at::Tensor grad_z = at::empty_like(z);
  at::Tensor grad_mu = at::empty_like(mu);
  at::Tensor grad_logvar = at::empty_like(logvar);
  T* grad_z_out = grad_z.data_ptr<T>();
  T* grad_mu_out = grad_mu.data_ptr<T>();
  T* grad_logvar_out = grad_logvar.data_ptr<T>();
  const int64_t* order = groups.order.data();
#pragma omp parallel for schedule(static) num_threads(worker_threads())
  for (int64_t i = 0; i < count; ++i) {
    for (int64_t position = 0; position < dim; ++position) {
      const int64_t out_index = i * dim + order[position];
      grad_z_out[out_index] = static_cast<T>(-shared.z[i * dim + position]);
      grad_mu_out[out_index] = static_cast<T>(shared.mean[position * count + i]);
      grad_logvar_out[out_index] = static_cast<T>(0.5 * shared.log_variance[position * count + i]);
    }
  }
  return {grad_z, grad_mu, grad_logvar};
}

// --- Entry points --------------------------------------------------------------------------------

// Internal guards: the Python wrapper has already validated the user's input.
DimGroups check_inputs(const at::Tensor& z, const at::Tensor& mu, const at::Tensor& logvar,
                       const at::Tensor& group_of_dim, int64_t num_groups, double log_w_self, double log_w_next,
                       double log_w_other) {
  TORCH_CHECK(z.dim() == 2, "log_qz (cpu): z must be 2-D [B, D], got ", z.dim(), "-D");
  TORCH_CHECK(mu.sizes() == z.sizes() && logvar.sizes() == z.sizes(),
              "log_qz (cpu): mu and logvar must have z's shape ", z.sizes(), ", got ", mu.sizes(), " and ",
              logvar.sizes());
  TORCH_CHECK(z.size(0) >= 1 && z.size(1) >= 1, "log_qz (cpu): empty input, z is ", z.sizes());
  TORCH_CHECK(z.device().is_cpu() && mu.device().is_cpu() && logvar.device().is_cpu() &&
                  group_of_dim.device().is_cpu(),
              "log_qz (cpu): z, mu, logvar and group_of_dim must be CPU tensors, got ", z.device(), ", ", mu.device(),
              ", ", logvar.device(), " and ", group_of_dim.device());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "log_qz (cpu): z's dtype must be float32 or float64, got ", z.scalar_type());
  TORCH_CHECK(mu.scalar_type() == z.scalar_type() && logvar.scalar_type() == z.scalar_type(),
              "log_qz (cpu): mu and logvar must have z's dtype ", z.scalar_type(), ", got ", mu.scalar_type(), " and ",
              logvar.scalar_type());
  TORCH_CHECK(z.is_contiguous() && mu.is_contiguous() && logvar.is_contiguous(),
              "log_qz (cpu): z, mu and logvar must be contiguous");
  TORCH_CHECK(group_of_dim.scalar_type() == at::kLong && group_of_dim.dim() == 1 &&
                  group_of_dim.size(0) == z.size(1) && group_of_dim.is_contiguous(),
              "log_qz (cpu): group_of_dim must be a contiguous int64 tensor [D = ", z.size(1), "], got ",
              group_of_dim.scalar_type(), " ", group_of_dim.sizes());
  TORCH_CHECK(num_groups >= 1 && num_groups <= z.size(1), "log_qz (cpu): num_groups must be in [1, D = ", z.size(1),
              "], got ", num_groups);
  TORCH_CHECK(std::isfinite(log_w_self) && std::isfinite(log_w_next) && std::isfinite(log_w_other),
              "log_qz (cpu): the log-weights must be finite, got ", log_w_self, ", ", log_w_next, " and ",
              log_w_other);
  return sort_dimensions(group_of_dim, num_groups);
}

void check_saved(const char* name, const at::Tensor& t, const at::Tensor& z, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, "log_qz (cpu): ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "log_qz (cpu): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == z.scalar_type(), "log_qz (cpu): ", name, " must have z's dtype ", z.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "log_qz (cpu): ", name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> log_qz_forward_cpu(const at::Tensor& z, const at::Tensor& mu,
                                                      const at::Tensor& logvar, const at::Tensor& group_of_dim,
                                                      int64_t num_groups, double log_w_self, double log_w_next,
                                                      double log_w_other) {
  const DimGroups groups = check_inputs(z, mu, logvar, group_of_dim, num_groups, log_w_self, log_w_next, log_w_other);
  const LogWeights weights = log_weights(log_w_self, log_w_next, log_w_other);
  return AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "log_qz_forward_cpu",
                                    [&] { return forward<scalar_t>(z, mu, logvar, groups, weights); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> log_qz_backward_cpu(
    const at::Tensor& z, const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& group_of_dim,
    int64_t num_groups, double log_w_self, double log_w_next, double log_w_other, const at::Tensor& log_qz,
    const at::Tensor& log_qz_groups, const at::Tensor& grad_log_qz, const at::Tensor& grad_log_qz_groups) {
  const DimGroups groups = check_inputs(z, mu, logvar, group_of_dim, num_groups, log_w_self, log_w_next, log_w_other);
  const int64_t count = z.size(0);
  check_saved("log_qz", log_qz, z, {count});
  check_saved("log_qz_groups", log_qz_groups, z, {count, num_groups});
  check_saved("grad_log_qz", grad_log_qz, z, {count});
  check_saved("grad_log_qz_groups", grad_log_qz_groups, z, {count, num_groups});
  const LogWeights weights = log_weights(log_w_self, log_w_next, log_w_other);
  return AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "log_qz_backward_cpu", [&] {
    return backward<scalar_t>(z, mu, logvar, groups, weights, log_qz, log_qz_groups, grad_log_qz, grad_log_qz_groups);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(aelearn, CPU, m) {
  m.impl("log_qz_forward", &log_qz_forward_cpu);
  m.impl("log_qz_backward", &log_qz_backward_cpu);
}
