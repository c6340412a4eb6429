// CUDA backend of the aggregate-posterior log-density op (schemas in ../log_qz.cpp): the minibatch
// log-sum-exps log q(z_i), log q(z_i,g) of beta-TCVAE / HFVAE and their gradients.
//
// Algorithm (FlashAttention style; no [B, B] or [B, B, D] buffer anywhere):
// - Forward: a thread block owns kThreads rows i, one per thread, and walks a range of tiles of
//   kTile columns j. A tile stages mu_jd, h_jd and c_jd (below) of kSlotChunk dimensions at a
//   time in shared memory; each thread evaluates its row against the kTile columns, dimension
//   after dimension, and folds the kTile values of every group, and of the joint, into a running
//   (max, sum) log-sum-exp state: one rescale per tile and state, not per element.
// - Backward: two launches that own their outputs, so no atomics. grad_z: blocks own rows i and
//   walk column tiles like the forward pass; grad_mu / grad_logvar: blocks own columns j and walk
//   tiles of rows i (z_id and, for singleton groups, the upstream terms of (i, d) staged). Each
//   recomputes the pair values, first the joint ones for p_ij, then the groups' for p^g_ij,
//   normalised by the saved log-sum-exps (exponents <= 0 up to rounding: no running max needed).
// - Occupancy: when there are few blocks of rows (columns), the tile range is split over a second
//   grid axis; every split keeps its states / float64 partial gradients in its own slice of a
//   scratch buffer, and a small kernel combines the slices. Deterministic: fixed orders, no atomics.
//
// Units: pair values are kept in log2 units, so every exponential is one exp2 (ex2.approx, the
// SFU instruction, for float): with
//   h_jd = -0.5 log2(e) exp(-logvar_jd),   c_jd = -0.5 log2(e) (log(2 pi) + logvar_jd),
//   l_ijd log2(e) = c_jd + h_jd (z_id - mu_jd)^2,   u_ijd = (z_id - mu_jd) exp(-logvar_jd) = -2 ln(2) q_ijd
// where q_ijd = (z_id - mu_jd) h_jd. The weight log_w_other is shared by all but two pairs per row,
// so it is factored out of every log-sum-exp; the pairs j == i and j == (i + 1) mod B get the
// offsets log_w_self - log_w_other and log_w_next - log_w_other, added only in tiles that hold
// such a pair (or reach past B, where the offset -inf masks the padding).
//
// Groups: dimensions are renumbered into slots so that every group is a contiguous run of slots
// (a stable sort by group; group g ends at slot group_end[g]). All per-dimension arrays are
// copied once into slot-major [D, B] layout, so a warp's 32 rows (or columns) read consecutive
// addresses. When num_groups == D every group is one dimension (the contract has no empty group)
// and its slot is its group index: this singleton path needs no renumbering kernel and evaluates
// each l_ijd once for its group and the joint.
//
// Numerics: pair values, exponentials and within-tile sums in the input dtype (float keeps ~1e-7
// relative of values that are sums of D terms); log-sum-exp sums and gradient accumulators across
// tiles and splits in float64; per-sample constants computed in float64 and rounded once. Every
// pass forms the pair values with the same operations in the same order (sweep_groups), so the
// backward pass normalises p_ij by a log-sum-exp of bit-identical values: the dominant p_ij ~ 1
// then carry only the rounding of the saved log-sum-exp, as a float32 autograd evaluation does.
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

namespace {

constexpr int kThreads = 128;    // rows (forward, grad_z) or columns (grad_mu / grad_logvar) per block
constexpr int kSlotChunk = 64;   // dimensions (slots) of a tile staged in shared memory at a time
constexpr int kBlocksPerSm = 4;  // tile splits aim at this many blocks per SM
constexpr int kSmallKernelThreads = 256;
// Cap on one launch's split scratch: it grows as splits * B * D (or G) and splits as
// kBlocksPerSm * SMs * kThreads / B, so at most ~4 * 132 * 128 * D * 24 bytes for grad_mu/logvar.
constexpr int64_t kSplitBudgetBytes = int64_t{128} << 20;

constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;
constexpr double kLog2Pi = 1.8378770664093454836;  // natural log of 2 pi

// Samples per tile: 32 for float, 16 for double (per-thread arrays of kTile values stay in
// registers; the staged tile, three planes of kSlotChunk x kTile, is 24 KB either way).
template <typename scalar_t>
struct Tiling {
  static constexpr int kTile = std::is_same_v<scalar_t, float> ? 32 : 16;
};

template <typename scalar_t>
constexpr scalar_t kNegInf = -std::numeric_limits<scalar_t>::infinity();

// 2^x; float uses the SFU (relative error ~2^-22, results below 2^-126 flushed to 0: such terms
// are far below the resolution of a sum that holds a term >= 1).
__device__ __forceinline__ float exp2_of(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ double exp2_of(double x) { return exp2(x); }

// Slot-major copies of the inputs and per-sample constants (see the file comment), built by
// prepare_columns_kernel; every array is [D, B] unless said otherwise.
template <typename scalar_t>
struct Prepared {
  const scalar_t* z;
  const scalar_t* mu;
  const scalar_t* h;
  const scalar_t* c;
  const scalar_t* c_group;   // [G, B] sum of c over each group's slots (unused for singletons)
  const int64_t* group_end;  // [G] one past the last slot of each group (unused for singletons)
  int64_t batch;             // B
  int64_t dims;              // D
  int64_t groups;            // G
  scalar_t offset_self;      // (log_w_self - log_w_other) log2(e)
  scalar_t offset_next;      // (log_w_next - log_w_other) log2(e)
  bool has_offsets;          // either offset is non-zero
};

// Upstream terms of the backward pass per row i. The shift (log_w_other - lse) log2(e) is rounded
// to scalar_t; the grad is scaled by 2^(rounding error), so shift + log2(grad) stays exact.
template <typename scalar_t>
struct RowTerms {
  const scalar_t* joint_shift;  // [B] from log_qz
  const scalar_t* joint_grad;   // [B] from grad_log_qz
  const scalar_t* group_shift;  // [G, B] from log_qz_groups
  const scalar_t* group_grad;   // [G, B] from grad_log_qz_groups
};

// Log-weight offset of the pair (i, j) relative to log_w_other; -inf outside the batch.
template <typename scalar_t>
__device__ __forceinline__ scalar_t pair_offset(int64_t i, int64_t j, const Prepared<scalar_t>& p) {
  if (i >= p.batch || j >= p.batch) {
    return kNegInf<scalar_t>;
  }
  if (j == i) {
    return p.offset_self;
  }
  return j == (i + 1 == p.batch ? 0 : i + 1) ? p.offset_next : scalar_t(0);
}

// Whether rows [row0, row_end) x columns [col0, col_end) (both clamped to B) hold a pair with
// j == i or j == (i + 1) mod B. Block-uniform.
__device__ __forceinline__ bool holds_weighted_pair(int64_t row0, int64_t row_end, int64_t col0,
                                                    int64_t col_end, int64_t batch) {
  const bool self = std::max(row0, col0) < std::min(row_end, col_end);
  const bool next = std::max(row0 + 1, col0) < std::min(row_end + 1, col_end) ||
                    (row_end == batch && col0 == 0);
  return self || next;
}

// p[index], or 0 past B when kMasked (the padding of a tile that reaches past B).
template <bool kMasked, typename scalar_t>
__device__ __forceinline__ scalar_t sample_value(const scalar_t* p, int64_t index, int64_t batch) {
  if constexpr (kMasked) {
    return index < batch ? p[index] : scalar_t(0);
  } else {
    return p[index];
  }
}

// Three planes of kSlotChunk slots x kTile samples, staged on demand, one chunk of slots at a time.
template <typename scalar_t>
struct StagedTile {
  static constexpr int kTile = Tiling<scalar_t>::kTile;
  alignas(16) scalar_t plane[3][kSlotChunk][kTile];

  // Makes plane k hold src_k[s, tile0 + t] for the chunk of `slot` (0 past B; planes with a
  // null source left alone); staged_chunk (block-uniform) tracks the chunk held, -1 for none.
  // Every thread of the block must call it with the same arguments.
  __device__ __forceinline__ void ensure(int64_t slot, int64_t& staged_chunk, const scalar_t* src0,
                                         const scalar_t* src1, const scalar_t* src2, int64_t tile0,
                                         int64_t batch, int64_t dims) {
    const int64_t chunk = slot / kSlotChunk;
    if (chunk == staged_chunk) {
      return;
    }
    __syncthreads();  // every thread is done with the previous chunk
    const int64_t slot0 = chunk * kSlotChunk;
    const int slots = static_cast<int>(std::min<int64_t>(kSlotChunk, dims - slot0));
    const scalar_t* const sources[3] = {src0, src1, src2};
    // Consecutive threads copy consecutive samples of one slot: coalesced reads of the [D, B]
    // arrays and conflict-free writes.
    for (int e = threadIdx.x; e < slots * kTile; e += kThreads) {
      const int local = e / kTile;
      const int t = e % kTile;
      const int64_t sample = tile0 + t;
      const int64_t at = (slot0 + local) * batch + sample;
#pragma unroll
      for (int k = 0; k < 3; ++k) {
        if (sources[k] != nullptr) {
          plane[k][local][t] = sample < batch ? sources[k][at] : scalar_t(0);
        }
      }
    }
    __syncthreads();
    staged_chunk = chunk;
  }
};

// The pairs of a thread that owns row i (own) against a staged tile of columns j = tile0 + t:
// z_id per slot from the [D, B] copy, mu_jd, h_jd (and c_jd for singletons) from the tile.
// kMasked: the tile may reach past B (guards the reads of per-column arrays).
template <typename scalar_t, bool kSingleton, bool kMasked>
struct RowSide {
  const Prepared<scalar_t>& p;
  const RowTerms<scalar_t>& r;
  StagedTile<scalar_t>& tile;
  int64_t own;
  int64_t tile0;
  int64_t staged_chunk = -1;
  int local = 0;
  scalar_t z = 0;
  scalar_t shift = 0;
  scalar_t grad = 0;

  __device__ __forceinline__ void load_slot(int64_t slot) {
    tile.ensure(slot, staged_chunk, p.mu, p.h, kSingleton ? p.c : nullptr, tile0, p.batch, p.dims);
    local = static_cast<int>(slot % kSlotChunk);
    z = p.z[slot * p.batch + own];
  }
  __device__ __forceinline__ scalar_t diff(int t) const { return z - tile.plane[0][local][t]; }
  __device__ __forceinline__ scalar_t h(int t) const { return tile.plane[1][local][t]; }
  __device__ __forceinline__ scalar_t c(int t) const { return tile.plane[2][local][t]; }
  __device__ __forceinline__ scalar_t c_group(int64_t g, int t) const {
    return sample_value<kMasked>(p.c_group + g * p.batch, tile0 + t, p.batch);
  }
  __device__ __forceinline__ scalar_t offset(int t) const { return pair_offset(own, tile0 + t, p); }
  __device__ __forceinline__ scalar_t joint_shift(int) const { return r.joint_shift[own]; }
  __device__ __forceinline__ scalar_t joint_grad(int) const { return r.joint_grad[own]; }
  // Upstream terms of group g for this row (after load_slot(g) for singletons).
  __device__ __forceinline__ void load_group(int64_t g) {
    shift = r.group_shift[g * p.batch + own];
    grad = r.group_grad[g * p.batch + own];
  }
  __device__ __forceinline__ scalar_t group_shift(int) const { return shift; }
  __device__ __forceinline__ scalar_t group_grad(int) const { return grad; }
};

// The pairs of a thread that owns column j (own) against a staged tile of rows i = tile0 + t:
// z_id from the tile; mu_jd, h_jd, c_jd per slot from the [D, B] copies. Singleton groups also
// stage their upstream terms per slot (planes 1 and 2); other groups read them per group.
template <typename scalar_t, bool kSingleton, bool kMasked>
struct ColumnSide {
  const Prepared<scalar_t>& p;
  const RowTerms<scalar_t>& r;
  StagedTile<scalar_t>& tile;
  int64_t own;
  int64_t tile0;
  int64_t staged_chunk = -1;
  int local = 0;
  scalar_t mu = 0;
  scalar_t h_own = 0;
  scalar_t c_own = 0;
  int64_t group = 0;

  __device__ __forceinline__ void load_slot(int64_t slot) {
    tile.ensure(slot, staged_chunk, p.z, kSingleton ? r.group_grad : nullptr,
                kSingleton ? r.group_shift : nullptr, tile0, p.batch, p.dims);
    local = static_cast<int>(slot % kSlotChunk);
    mu = p.mu[slot * p.batch + own];
    h_own = p.h[slot * p.batch + own];
    if constexpr (kSingleton) {
      c_own = p.c[slot * p.batch + own];
    }
  }
  __device__ __forceinline__ scalar_t diff(int t) const { return tile.plane[0][local][t] - mu; }
  __device__ __forceinline__ scalar_t h(int) const { return h_own; }
  __device__ __forceinline__ scalar_t c(int) const { return c_own; }
  __device__ __forceinline__ scalar_t c_group(int64_t g, int) const { return p.c_group[g * p.batch + own]; }
  __device__ __forceinline__ scalar_t offset(int t) const { return pair_offset(tile0 + t, own, p); }
  __device__ __forceinline__ scalar_t joint_shift(int t) const {
    return sample_value<kMasked>(r.joint_shift, tile0 + t, p.batch);
  }
  __device__ __forceinline__ scalar_t joint_grad(int t) const {
    return sample_value<kMasked>(r.joint_grad, tile0 + t, p.batch);
  }
  __device__ __forceinline__ void load_group(int64_t g) { group = g; }
  __device__ __forceinline__ scalar_t group_shift(int t) const {
    if constexpr (kSingleton) {
      return tile.plane[2][local][t];
    } else {
      return sample_value<kMasked>(r.group_shift + group * p.batch, tile0 + t, p.batch);
    }
  }
  __device__ __forceinline__ scalar_t group_grad(int t) const {
    if constexpr (kSingleton) {
      return tile.plane[1][local][t];
    } else {
      return sample_value<kMasked>(r.group_grad + group * p.batch, tile0 + t, p.batch);
    }
  }
};

// The pair values of every group, in the one order all passes use: for each group g in turn,
// val[t] = sum over its slots of the log-densities (log2 units, no weights) -- a singleton's
// fma(diff^2, h, c), otherwise an fma chain of diff^2 h plus c_group -- then joint[t] += val[t]
// and on_group(g, begin_slot, end_slot, val).
template <typename scalar_t, bool kSingleton, typename Side, typename OnGroup>
__device__ __forceinline__ void sweep_groups(Side& side, scalar_t (&joint)[Tiling<scalar_t>::kTile],
                                             OnGroup&& on_group) {
  constexpr int kTile = Tiling<scalar_t>::kTile;
  if constexpr (kSingleton) {
    for (int64_t slot = 0; slot < side.p.dims; ++slot) {
      side.load_slot(slot);
      scalar_t val[kTile];
#pragma unroll
      for (int t = 0; t < kTile; ++t) {
        const scalar_t diff = side.diff(t);
        val[t] = fma(diff * diff, side.h(t), side.c(t));
        joint[t] += val[t];
      }
      on_group(slot, slot, slot + 1, val);
    }
  } else {
    int64_t slot = 0;
    for (int64_t g = 0; g < side.p.groups; ++g) {
      const int64_t begin = slot;
      const int64_t end = side.p.group_end[g];
      scalar_t val[kTile] = {};
      for (; slot < end; ++slot) {
        side.load_slot(slot);
#pragma unroll
        for (int t = 0; t < kTile; ++t) {
          const scalar_t diff = side.diff(t);
          val[t] = fma(diff * diff, side.h(t), val[t]);
        }
      }
#pragma unroll
      for (int t = 0; t < kTile; ++t) {
        val[t] += side.c_group(g, t);
        joint[t] += val[t];
      }
      on_group(g, begin, end, val);
    }
  }
}

// val[t] + offset[t] when the tile has offsets.
template <bool kOffsets, typename scalar_t, int kTile>
__device__ __forceinline__ void add_offsets(scalar_t (&val)[kTile], const scalar_t (&offset)[kTile]) {
  if constexpr (kOffsets) {
#pragma unroll
    for (int t = 0; t < kTile; ++t) {
      val[t] += offset[t];
    }
  }
}

// Folds kTile values (log2 units) into the running log-sum-exp state (max in scalar_t, sum in
// double, relative to the max) at *state_max, *state_sum; `first` starts a fresh state.
template <typename scalar_t, int kTile>
__device__ __forceinline__ void fold_tile(const scalar_t (&val)[kTile], scalar_t* state_max,
                                          double* state_sum, bool first, bool active) {
  scalar_t tile_max = val[0];
#pragma unroll
  for (int t = 1; t < kTile; ++t) {
    tile_max = fmax(tile_max, val[t]);
  }
  if (!active) {
    return;
  }
  const scalar_t old_max = first ? kNegInf<scalar_t> : *state_max;
  const double old_sum = first ? 0.0 : *state_sum;
  const scalar_t new_max = fmax(old_max, tile_max);
  // A state with no finite value yet keeps every exponent at -inf - 0 rather than -inf - -inf.
  const scalar_t ref = new_max == kNegInf<scalar_t> ? scalar_t(0) : new_max;
  scalar_t tile_sum = 0;
#pragma unroll
  for (int t = 0; t < kTile; ++t) {
    tile_sum += exp2_of(val[t] - ref);
  }
  *state_sum = old_sum * static_cast<double>(exp2_of(old_max - ref)) + static_cast<double>(tile_sum);
  *state_max = new_max;
}

// *acc = value on the first tile of a split, else *acc + value (float64).
__device__ __forceinline__ void accumulate(double* acc, double value, bool first, bool active) {
  if (active) {
    *acc = first ? value : *acc + value;
  }
}

// Per-slot sums of a row-owning thread for grad_z: sum_j c_ijd q_ijd, at out[s B].
template <typename scalar_t>
struct GradZSums {
  scalar_t q = 0;
  __device__ __forceinline__ void add(scalar_t coef, scalar_t diff, scalar_t h) { q = fma(coef, diff * h, q); }
  __device__ __forceinline__ void store(double* out, int64_t slot, int64_t batch, int64_t, bool first,
                                        bool active) {
    accumulate(out + slot * batch, static_cast<double>(q), first, active);
    q = 0;
  }
};

// Per-slot sums of a column-owning thread for grad_mu / grad_logvar: sum_i c_ijd q_ijd,
// sum_i c_ijd (z_id - mu_jd) q_ijd and sum_i c_ijd, at out[s B], out[(D + s) B], out[(2 D + s) B].
template <typename scalar_t>
struct GradMuLogvarSums {
  scalar_t q = 0;
  scalar_t sq = 0;
  scalar_t c = 0;
  __device__ __forceinline__ void add(scalar_t coef, scalar_t diff, scalar_t h) {
    const scalar_t qd = diff * h;
    q = fma(coef, qd, q);
    sq = fma(coef, diff * qd, sq);
    c += coef;
  }
  __device__ __forceinline__ void store(double* out, int64_t slot, int64_t batch, int64_t dims, bool first,
                                        bool active) {
    accumulate(out + slot * batch, static_cast<double>(q), first, active);
    accumulate(out + (dims + slot) * batch, static_cast<double>(sq), first, active);
    accumulate(out + (2 * dims + slot) * batch, static_cast<double>(c), first, active);
    q = 0;
    sq = 0;
    c = 0;
  }
};

// Forward pass over one tile: folds the tile's values into the G group states and the joint
// state (index G) at state_max[k B], state_sum[k B].
template <typename scalar_t, bool kSingleton, bool kOffsets, typename Side>
__device__ __forceinline__ void forward_tile(Side& side, bool first, bool active, scalar_t* state_max,
                                             double* state_sum) {
  constexpr int kTile = Tiling<scalar_t>::kTile;
  const int64_t batch = side.p.batch;
  scalar_t offset[kTile];
#pragma unroll
  for (int t = 0; t < kTile; ++t) {
    offset[t] = kOffsets ? side.offset(t) : scalar_t(0);
  }
  scalar_t joint[kTile] = {};
  sweep_groups<scalar_t, kSingleton>(side, joint, [&](int64_t g, int64_t, int64_t, scalar_t(&val)[kTile]) {
    add_offsets<kOffsets>(val, offset);
    fold_tile(val, state_max + g * batch, state_sum + g * batch, first, active);
  });
  add_offsets<kOffsets>(joint, offset);
  fold_tile(joint, state_max + side.p.groups * batch, state_sum + side.p.groups * batch, first, active);
}

// Backward pass over one tile: c_ijd = grad_log_qz_i p_ij + grad_log_qz_groups_ig p^g_ij for the
// thread's pairs, summed per slot by Sums into out.
template <typename scalar_t, bool kSingleton, bool kOffsets, typename Sums, typename Side>
__device__ __forceinline__ void backward_tile(Side& side, bool first, bool active, double* out) {
  constexpr int kTile = Tiling<scalar_t>::kTile;
  const int64_t batch = side.p.batch;
  const int64_t dims = side.p.dims;
  scalar_t offset[kTile];
#pragma unroll
  for (int t = 0; t < kTile; ++t) {
    offset[t] = kOffsets ? side.offset(t) : scalar_t(0);
  }
  // The exponent of a pair is (value + offset) + shift, its value bit-identical to the forward's.
  const auto weighted_exp2 = [&](scalar_t value, int t, scalar_t shift) {
    return exp2_of((kOffsets ? value + offset[t] : value) + shift);
  };

  // Pass 1: joint values, then weight[t] = grad_log_qz_i p_ij.
  scalar_t weight[kTile] = {};
  sweep_groups<scalar_t, kSingleton>(side, weight, [](int64_t, int64_t, int64_t, scalar_t(&)[kTile]) {});
#pragma unroll
  for (int t = 0; t < kTile; ++t) {
    weight[t] = side.joint_grad(t) * weighted_exp2(weight[t], t, side.joint_shift(t));
  }

  // Pass 2: the groups' values, c_ijd, and the sums.
  Sums sums;
  if constexpr (kSingleton) {
    // One slot per group: the value, c_ijd and the sums in one sweep (the value formed as in
    // sweep_groups).
    for (int64_t slot = 0; slot < dims; ++slot) {
      side.load_slot(slot);
      side.load_group(slot);
#pragma unroll
      for (int t = 0; t < kTile; ++t) {
        const scalar_t diff = side.diff(t);
        const scalar_t value = fma(diff * diff, side.h(t), side.c(t));
        const scalar_t coef = fma(side.group_grad(t), weighted_exp2(value, t, side.group_shift(t)), weight[t]);
        sums.add(coef, diff, side.h(t));
      }
      sums.store(out, slot, batch, dims, first, active);
    }
  } else {
    scalar_t unused[kTile] = {};
    sweep_groups<scalar_t, kSingleton>(side, unused, [&](int64_t g, int64_t begin, int64_t end, scalar_t(&val)[kTile]) {
      side.load_group(g);
      scalar_t coef[kTile];
#pragma unroll
      for (int t = 0; t < kTile; ++t) {
        coef[t] = fma(side.group_grad(t), weighted_exp2(val[t], t, side.group_shift(t)), weight[t]);
      }
      for (int64_t slot = begin; slot < end; ++slot) {
        side.load_slot(slot);
#pragma unroll
        for (int t = 0; t < kTile; ++t) {
          sums.add(coef[t], side.diff(t), side.h(t));
        }
        sums.store(out, slot, batch, dims, first, active);
      }
    });
  }
}

enum class Pass { Forward, GradZ, GradMuLogvar };

// One block: kThreads rows (Forward, GradZ) or columns (GradMuLogvar) blockIdx.x, against the
// tiles of split blockIdx.y. Outputs, at [blockIdx.y, ..., own] of
//   Forward:      state_max, out = state sums [splits, G + 1, B] (state G is the joint);
//   GradZ:        out [splits, D, B]     sum_j c_ijd q_ijd;
//   GradMuLogvar: out [splits, 3, D, B]  sum_i c_ijd (q_ijd, (z_id - mu_jd) q_ijd, 1).
template <typename scalar_t, bool kSingleton, Pass kPass>
__global__ void __launch_bounds__(kThreads)
    tiles_kernel(const __grid_constant__ Prepared<scalar_t> p, const __grid_constant__ RowTerms<scalar_t> r,
                 int64_t tiles_per_split, scalar_t* __restrict__ state_max, double* __restrict__ out) {
  constexpr int kTile = Tiling<scalar_t>::kTile;
  constexpr bool kOwnsRows = kPass != Pass::GradMuLogvar;
  __shared__ StagedTile<scalar_t> tile;
  const int64_t batch = p.batch;
  const int64_t own0 = static_cast<int64_t>(blockIdx.x) * kThreads;
  const int64_t own_end = std::min<int64_t>(own0 + kThreads, batch);
  const bool active = own0 + threadIdx.x < batch;
  // Threads past B work on a copy of the last sample (they must reach every barrier) and store nothing.
  const int64_t own = active ? own0 + threadIdx.x : batch - 1;
  const int64_t split_size = (kPass == Pass::Forward ? p.groups + 1 : (kPass == Pass::GradZ ? 1 : 3) * p.dims) * batch;
  const int64_t split_offset = static_cast<int64_t>(blockIdx.y) * split_size + own;
  out += split_offset;
  if constexpr (kPass == Pass::Forward) {
    state_max += split_offset;
  }

  const int64_t tiles = (batch + kTile - 1) / kTile;
  const int64_t first_tile = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  const int64_t last_tile = std::min(first_tile + tiles_per_split, tiles);
  for (int64_t t = first_tile; t < last_tile; ++t) {
    const int64_t tile0 = t * kTile;
    const int64_t tile_end = std::min<int64_t>(tile0 + kTile, batch);
    const bool first = t == first_tile;
    const bool weighted_pair = kOwnsRows ? holds_weighted_pair(own0, own_end, tile0, tile_end, batch)
                                         : holds_weighted_pair(tile0, tile_end, own0, own_end, batch);
    const auto run = [&](auto offsets_tag) {
      constexpr bool kOffsets = decltype(offsets_tag)::value;
      if constexpr (kPass == Pass::Forward) {
        RowSide<scalar_t, kSingleton, kOffsets> side{p, r, tile, own, tile0};
        forward_tile<scalar_t, kSingleton, kOffsets>(side, first, active, state_max, out);
      } else if constexpr (kPass == Pass::GradZ) {
        RowSide<scalar_t, kSingleton, kOffsets> side{p, r, tile, own, tile0};
        backward_tile<scalar_t, kSingleton, kOffsets, GradZSums<scalar_t>>(side, first, active, out);
      } else {
        ColumnSide<scalar_t, kSingleton, kOffsets> side{p, r, tile, own, tile0};
        backward_tile<scalar_t, kSingleton, kOffsets, GradMuLogvarSums<scalar_t>>(side, first, active, out);
      }
    };
    // Offsets (and masks) only where the tile needs them; block-uniform branch.
    if (tile0 + kTile > batch || (p.has_offsets && weighted_pair)) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  }
}

// log_qz_i = log_w_other + ln(2) (M + log2 S) over the splits' states (M their max, S the sum of
// their sums rescaled to M); state G gives log_qz, state g < G log_qz_groups[:, g].
template <typename scalar_t>
__global__ void __launch_bounds__(kSmallKernelThreads)
    merge_states_kernel(const scalar_t* __restrict__ state_max,  // [splits, G + 1, B]
                        const double* __restrict__ state_sum,    // [splits, G + 1, B]
                        int64_t splits, int64_t batch, int64_t groups, double log_w_other,
                        scalar_t* __restrict__ log_qz,           // [B]
                        scalar_t* __restrict__ log_qz_groups) {  // [B, G]
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t states = groups + 1;
  if (e >= states * batch) {
    return;
  }
  const int64_t k = e / batch;  // consecutive threads read consecutive rows of one state
  const int64_t i = e % batch;
  constexpr double kNegInfDouble = -std::numeric_limits<double>::infinity();
  double best = kNegInfDouble;
  for (int64_t s = 0; s < splits; ++s) {
    best = fmax(best, static_cast<double>(state_max[(s * states + k) * batch + i]));
  }
  double value = best;
  if (best != kNegInfDouble) {
    double total = 0.0;
    for (int64_t s = 0; s < splits; ++s) {
      const int64_t at = (s * states + k) * batch + i;
      total += state_sum[at] * exp2(static_cast<double>(state_max[at]) - best);
    }
    value = log_w_other + kLn2 * (best + log2(total));
  }
  if (k == groups) {
    log_qz[i] = static_cast<scalar_t>(value);
  } else {
    log_qz_groups[i * groups + k] = static_cast<scalar_t>(value);
  }
}

// Sums the splits' partials and scales them into the gradients ([B, D], dimension order):
//   grad_z = 2 ln2 sum_j c q,  grad_mu = -2 ln2 sum_i c q,  grad_logvar = -ln2 sum_i c (z - mu) q - 0.5 sum_i c.
template <typename scalar_t>
__global__ void __launch_bounds__(kSmallKernelThreads)
    finish_grads_kernel(const double* __restrict__ z_partial,     // [z_splits, D, B]
                        int64_t z_splits,
                        const double* __restrict__ col_partial,   // [col_splits, 3, D, B]
                        int64_t col_splits,
                        const int64_t* __restrict__ slot_of_dim,  // [D]
                        int64_t batch, int64_t dims,
                        scalar_t* __restrict__ grad_z, scalar_t* __restrict__ grad_mu,
                        scalar_t* __restrict__ grad_logvar) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= batch * dims) {
    return;
  }
  const int64_t d = e / batch;  // consecutive threads read consecutive samples of one slot
  const int64_t b = e % batch;
  const int64_t slot = slot_of_dim[d];
  double sum_z = 0.0;
  for (int64_t s = 0; s < z_splits; ++s) {
    sum_z += z_partial[(s * dims + slot) * batch + b];
  }
  double sum_q = 0.0;
  double sum_sq = 0.0;
  double sum_c = 0.0;
  for (int64_t s = 0; s < col_splits; ++s) {
    const double* base = col_partial + (s * 3 * dims + slot) * batch + b;
    sum_q += base[0];
    sum_sq += base[dims * batch];
    sum_c += base[2 * dims * batch];
  }
  grad_z[b * dims + d] = static_cast<scalar_t>(2.0 * kLn2 * sum_z);
  grad_mu[b * dims + d] = static_cast<scalar_t>(-2.0 * kLn2 * sum_q);
  grad_logvar[b * dims + d] = static_cast<scalar_t>(-kLn2 * sum_sq - 0.5 * sum_c);
}

// Slot of every dimension (stable sort by group: slot(d) = #{d' : g(d') < g(d)} +
// #{d' < d : g(d') = g(d)}) and the end slot of every group; checks the group indices on device.
// O(D) per thread: D is small next to the B^2 D of the main kernels.
__global__ void __launch_bounds__(kSmallKernelThreads)
    group_layout_kernel(const int64_t* __restrict__ group_of_dim, int64_t dims, int64_t groups,
                        int64_t* __restrict__ slot_of_dim,  // [D]
                        int64_t* __restrict__ group_end) {  // [G]
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < dims) {
    const int64_t g = group_of_dim[e];
    CUDA_KERNEL_ASSERT_MSG(g >= 0 && g < groups,
                           "log_qz (CUDA): group_of_dim holds a value outside [0, num_groups)");
    int64_t slot = 0;
    for (int64_t d = 0; d < dims; ++d) {
      const int64_t other = group_of_dim[d];
      slot += (other < g || (other == g && d < e)) ? 1 : 0;
    }
    slot_of_dim[e] = slot;
  }
  if (e < groups) {
    int64_t end = 0;
    int64_t size = 0;
    for (int64_t d = 0; d < dims; ++d) {
      const int64_t other = group_of_dim[d];
      end += other <= e ? 1 : 0;
      size += other == e ? 1 : 0;
    }
    CUDA_KERNEL_ASSERT_MSG(size > 0, "log_qz (CUDA): a group of group_of_dim has no dimension");
    group_end[e] = end;
  }
}

// Slot-major copies of z and mu, h and c (see the file comment), and c summed over every group's
// slots. One thread per sample b; constants in double, rounded once.
template <typename scalar_t, bool kSingleton>
__global__ void __launch_bounds__(kSmallKernelThreads)
    prepare_columns_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ mu,
                           const scalar_t* __restrict__ logvar,      // [B, D] each
                           const int64_t* __restrict__ slot_of_dim,  // [D]
                           const int64_t* __restrict__ group_end,    // [G], null for singletons
                           int64_t batch, int64_t dims, int64_t groups,
                           scalar_t* __restrict__ z_out, scalar_t* __restrict__ mu_out,
                           scalar_t* __restrict__ h_out, scalar_t* __restrict__ c_out,  // [D, B] each
                           scalar_t* __restrict__ c_group) {         // [G, B], null for singletons
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) {
    return;
  }
  for (int64_t d = 0; d < dims; ++d) {
    const int64_t slot = slot_of_dim[d];
    if constexpr (kSingleton) {
      CUDA_KERNEL_ASSERT_MSG(slot >= 0 && slot < groups,
                             "log_qz (CUDA): group_of_dim holds a value outside [0, num_groups)");
    }
    const int64_t from = b * dims + d;
    const int64_t to = slot * batch + b;
    const double lv = static_cast<double>(logvar[from]);
    z_out[to] = z[from];
    mu_out[to] = mu[from];
    h_out[to] = static_cast<scalar_t>(-0.5 * kLog2e * exp(-lv));
    c_out[to] = static_cast<scalar_t>(-0.5 * kLog2e * (kLog2Pi + lv));
  }
  if constexpr (!kSingleton) {
    // This thread wrote c_out[:, b] above, so it reads its own stores back in slot order.
    int64_t slot = 0;
    for (int64_t g = 0; g < groups; ++g) {
      double sum = 0.0;
      for (const int64_t end = group_end[g]; slot < end; ++slot) {
        sum += static_cast<double>(c_out[slot * batch + b]);
      }
      c_group[g * batch + b] = static_cast<scalar_t>(sum);
    }
  }
}

// shift = (log_w_other - lse) log2(e) rounded to scalar_t, and grad 2^(exact shift - shift), so
// that the rounding of the shift costs nothing in grad 2^(value + shift).
template <typename scalar_t>
__device__ __forceinline__ void write_row_term(double log_w_other, scalar_t lse, scalar_t grad,
                                               scalar_t* shift_out, scalar_t* grad_out) {
  const double shift = (log_w_other - static_cast<double>(lse)) * kLog2e;
  const scalar_t rounded = static_cast<scalar_t>(shift);
  *shift_out = rounded;
  *grad_out = static_cast<scalar_t>(static_cast<double>(grad) * exp2(shift - static_cast<double>(rounded)));
}

// Upstream terms of the backward pass, slot-major (see RowTerms). One thread per row.
template <typename scalar_t>
__global__ void __launch_bounds__(kSmallKernelThreads)
    prepare_row_terms_kernel(const scalar_t* __restrict__ log_qz,              // [B]
                             const scalar_t* __restrict__ log_qz_groups,       // [B, G]
                             const scalar_t* __restrict__ grad_log_qz,         // [B]
                             const scalar_t* __restrict__ grad_log_qz_groups,  // [B, G]
                             int64_t batch, int64_t groups, double log_w_other,
                             scalar_t* __restrict__ joint_shift, scalar_t* __restrict__ joint_grad,  // [B]
                             scalar_t* __restrict__ group_shift,   // [G, B]
                             scalar_t* __restrict__ group_grad) {  // [G, B]
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch) {
    return;
  }
  write_row_term(log_w_other, log_qz[i], grad_log_qz[i], joint_shift + i, joint_grad + i);
  for (int64_t g = 0; g < groups; ++g) {
    write_row_term(log_w_other, log_qz_groups[i * groups + g], grad_log_qz_groups[i * groups + g],
                   group_shift + g * batch + i, group_grad + g * batch + i);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned small_kernel_blocks(int64_t items) { return static_cast<unsigned>(ceil_div(items, kSmallKernelThreads)); }

void check_float_input(const at::Tensor& t, const at::Tensor& z, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == z.device(), "log_qz (CUDA): ", name,
              " must be a CUDA tensor on z's device (", z.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == z.scalar_type(), "log_qz (CUDA): ", name, " must have z's dtype (",
              z.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "log_qz (CUDA): ", name, " must be contiguous");
}

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, "log_qz (CUDA): ", name, " must have shape ", expected, ", got ", t.sizes());
}

void check_inputs(const at::Tensor& z, const at::Tensor& mu, const at::Tensor& logvar,
                  const at::Tensor& group_of_dim, int64_t num_groups, double log_w_self, double log_w_next,
                  double log_w_other) {
  TORCH_CHECK(z.is_cuda(), "log_qz (CUDA): z must be a CUDA tensor, got ", z.device());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "log_qz (CUDA): z must be float32 or float64, got ", z.scalar_type());
  TORCH_CHECK(z.dim() == 2 && z.size(0) >= 1 && z.size(1) >= 1,
              "log_qz (CUDA): z must be [B, D] with B, D >= 1, got ", z.sizes());
  check_float_input(z, z, "z");
  check_float_input(mu, z, "mu");
  check_float_input(logvar, z, "logvar");
  check_shape(mu, z.sizes(), "mu");
  check_shape(logvar, z.sizes(), "logvar");
  TORCH_CHECK(group_of_dim.is_cuda() && group_of_dim.device() == z.device(),
              "log_qz (CUDA): group_of_dim must be on z's device (", z.device(), "), got ", group_of_dim.device());
  TORCH_CHECK(group_of_dim.scalar_type() == at::kLong, "log_qz (CUDA): group_of_dim must be int64, got ",
              group_of_dim.scalar_type());
  TORCH_CHECK(group_of_dim.is_contiguous(), "log_qz (CUDA): group_of_dim must be contiguous");
  check_shape(group_of_dim, {z.size(1)}, "group_of_dim");
  TORCH_CHECK(num_groups >= 1 && num_groups <= z.size(1), "log_qz (CUDA): num_groups must be in [1, D = ",
              z.size(1), "] (no group is empty), got ", num_groups);
  TORCH_CHECK(std::isfinite(log_w_self) && std::isfinite(log_w_next) && std::isfinite(log_w_other),
              "log_qz (CUDA): log_w_self, log_w_next and log_w_other must be finite, got ", log_w_self, ", ",
              log_w_next, ", ", log_w_other);
}

// Slots of the dimensions and end slots of the groups. Singleton groups (G == D) are their own
// slots: group_of_dim itself, and no end slots.
struct GroupLayout {
  at::Tensor slot_of_dim;  // [D] int64
  at::Tensor group_end;    // [G] int64; undefined for singletons
  bool singleton;
};

GroupLayout group_layout(const at::Tensor& group_of_dim, int64_t num_groups, cudaStream_t stream) {
  const int64_t dims = group_of_dim.size(0);
  if (num_groups == dims) {
    return {group_of_dim, at::Tensor(), true};
  }
  GroupLayout layout{at::empty({dims}, group_of_dim.options()), at::empty({num_groups}, group_of_dim.options()),
                     false};
  group_layout_kernel<<<small_kernel_blocks(dims), kSmallKernelThreads, 0, stream>>>(
      group_of_dim.data_ptr<int64_t>(), dims, num_groups, layout.slot_of_dim.data_ptr<int64_t>(),
      layout.group_end.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return layout;
}

// The arrays of Prepared in one buffer (z, mu, h, c [D, B] each, then c_group [G, B] unless the
// groups are singletons), filled by prepare_columns_kernel.
template <typename scalar_t>
Prepared<scalar_t> prepare_columns(const at::Tensor& z, const at::Tensor& mu, const at::Tensor& logvar,
                                   const GroupLayout& layout, int64_t num_groups, double log_w_self,
                                   double log_w_next, double log_w_other, at::Tensor& storage, cudaStream_t stream) {
  const int64_t batch = z.size(0);
  const int64_t dims = z.size(1);
  const int64_t plane = dims * batch;
  storage = at::empty({4 * plane + (layout.singleton ? 0 : num_groups * batch)}, z.options());
  scalar_t* base = storage.data_ptr<scalar_t>();
  scalar_t* c_group = layout.singleton ? nullptr : base + 4 * plane;
  const int64_t* group_end = layout.singleton ? nullptr : layout.group_end.data_ptr<int64_t>();
  const auto launch = [&](auto kernel) {
    kernel<<<small_kernel_blocks(batch), kSmallKernelThreads, 0, stream>>>(
        z.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(),
        layout.slot_of_dim.data_ptr<int64_t>(), group_end, batch, dims, num_groups, base, base + plane,
        base + 2 * plane, base + 3 * plane, c_group);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (layout.singleton) {
    launch(prepare_columns_kernel<scalar_t, true>);
  } else {
    launch(prepare_columns_kernel<scalar_t, false>);
  }
  const scalar_t offset_self = static_cast<scalar_t>((log_w_self - log_w_other) * kLog2e);
  const scalar_t offset_next = static_cast<scalar_t>((log_w_next - log_w_other) * kLog2e);
  return {base,          base + plane, base + 2 * plane, base + 3 * plane, c_group, group_end, batch, dims,
          num_groups,    offset_self,  offset_next,      offset_self != scalar_t(0) || offset_next != scalar_t(0)};
}

// Splits of `tiles` tiles over the second grid axis for `blocks` blocks on the first: enough for
// kBlocksPerSm blocks per SM, at most one per tile, within kSplitBudgetBytes of scratch
// (bytes_per_split each); every split gets at least one tile.
struct TileSplit {
  int64_t splits;
  int64_t tiles_per_split;
};

TileSplit split_tiles(int64_t blocks, int64_t tiles, int64_t bytes_per_split, int device) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  int64_t splits = ceil_div(kBlocksPerSm * static_cast<int64_t>(sm_count), blocks);
  splits = std::min(splits, std::max<int64_t>(1, kSplitBudgetBytes / bytes_per_split));
  splits = std::clamp<int64_t>(splits, 1, tiles);
  const int64_t tiles_per_split = ceil_div(tiles, splits);
  return {ceil_div(tiles, tiles_per_split), tiles_per_split};
}

// Launches tiles_kernel<kPass> over all blocks and splits, with the group kind as a template argument.
template <typename scalar_t, Pass kPass>
void launch_tiles(const Prepared<scalar_t>& prepared, const RowTerms<scalar_t>& terms, bool singleton,
                  const TileSplit& split, scalar_t* state_max, double* out, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(prepared.batch, kThreads)), static_cast<unsigned>(split.splits));
  if (singleton) {
    tiles_kernel<scalar_t, true, kPass><<<grid, kThreads, 0, stream>>>(prepared, terms, split.tiles_per_split,
                                                                         state_max, out);
  } else {
    tiles_kernel<scalar_t, false, kPass><<<grid, kThreads, 0, stream>>>(prepared, terms, split.tiles_per_split,
                                                                          state_max, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> log_qz_forward_cuda(const at::Tensor& z, const at::Tensor& mu,
                                                       const at::Tensor& logvar, const at::Tensor& group_of_dim,
                                                       int64_t num_groups, double log_w_self, double log_w_next,
                                                       double log_w_other) {
  check_inputs(z, mu, logvar, group_of_dim, num_groups, log_w_self, log_w_next, log_w_other);
  const c10::cuda::CUDAGuard guard(z.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t batch = z.size(0);
  at::Tensor log_qz = at::empty({batch}, z.options());
  at::Tensor log_qz_groups = at::empty({batch, num_groups}, z.options());
  const GroupLayout layout = group_layout(group_of_dim, num_groups, stream);

  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "log_qz_forward_cuda", [&] {
    at::Tensor storage;
    const Prepared<scalar_t> prepared = prepare_columns<scalar_t>(z, mu, logvar, layout, num_groups, log_w_self,
                                                                  log_w_next, log_w_other, storage, stream);
    const int64_t states = num_groups + 1;
    const TileSplit split =
        split_tiles(ceil_div(batch, kThreads), ceil_div(batch, Tiling<scalar_t>::kTile),
                    states * batch * static_cast<int64_t>(sizeof(scalar_t) + sizeof(double)), z.get_device());
    at::Tensor state_max = at::empty({split.splits, states, batch}, z.options());
    at::Tensor state_sum = at::empty({split.splits, states, batch}, z.options().dtype(at::kDouble));
    launch_tiles<scalar_t, Pass::Forward>(prepared, RowTerms<scalar_t>{}, layout.singleton, split,
                                          state_max.data_ptr<scalar_t>(), state_sum.data_ptr<double>(), stream);
    merge_states_kernel<scalar_t><<<small_kernel_blocks(states * batch), kSmallKernelThreads, 0, stream>>>(
        state_max.data_ptr<scalar_t>(), state_sum.data_ptr<double>(), split.splits, batch, num_groups, log_w_other,
        log_qz.data_ptr<scalar_t>(), log_qz_groups.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {log_qz, log_qz_groups};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> log_qz_backward_cuda(
    const at::Tensor& z, const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& group_of_dim,
    int64_t num_groups, double log_w_self, double log_w_next, double log_w_other, const at::Tensor& log_qz,
    const at::Tensor& log_qz_groups, const at::Tensor& grad_log_qz, const at::Tensor& grad_log_qz_groups) {
  check_inputs(z, mu, logvar, group_of_dim, num_groups, log_w_self, log_w_next, log_w_other);
  const int64_t batch = z.size(0);
  const int64_t dims = z.size(1);
  check_float_input(log_qz, z, "log_qz");
  check_float_input(log_qz_groups, z, "log_qz_groups");
  check_float_input(grad_log_qz, z, "grad_log_qz");
  check_float_input(grad_log_qz_groups, z, "grad_log_qz_groups");
  check_shape(log_qz, {batch}, "log_qz");
  check_shape(log_qz_groups, {batch, num_groups}, "log_qz_groups");
  check_shape(grad_log_qz, {batch}, "grad_log_qz");
  check_shape(grad_log_qz_groups, {batch, num_groups}, "grad_log_qz_groups");
  const c10::cuda::CUDAGuard guard(z.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad_z = at::empty(z.sizes(), z.options());
  at::Tensor grad_mu = at::empty(z.sizes(), z.options());
  at::Tensor grad_logvar = at::empty(z.sizes(), z.options());
  const GroupLayout layout = group_layout(group_of_dim, num_groups, stream);

  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "log_qz_backward_cuda", [&] {
    at::Tensor storage;
    const Prepared<scalar_t> prepared = prepare_columns<scalar_t>(z, mu, logvar, layout, num_groups, log_w_self,
                                                                  log_w_next, log_w_other, storage, stream);
    at::Tensor row_storage = at::empty({2 * (num_groups + 1) * batch}, z.options());
    scalar_t* rows = row_storage.data_ptr<scalar_t>();
    scalar_t* group_shift = rows + 2 * batch;
    scalar_t* group_grad = group_shift + num_groups * batch;
    prepare_row_terms_kernel<scalar_t><<<small_kernel_blocks(batch), kSmallKernelThreads, 0, stream>>>(
        log_qz.data_ptr<scalar_t>(), log_qz_groups.data_ptr<scalar_t>(), grad_log_qz.data_ptr<scalar_t>(),
        grad_log_qz_groups.data_ptr<scalar_t>(), batch, num_groups, log_w_other, rows, rows + batch, group_shift,
        group_grad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const RowTerms<scalar_t> terms{rows, rows + batch, group_shift, group_grad};

    const int64_t blocks = ceil_div(batch, kThreads);
    const int64_t tiles = ceil_div(batch, Tiling<scalar_t>::kTile);
    const int64_t plane_bytes = dims * batch * static_cast<int64_t>(sizeof(double));
    const TileSplit z_split = split_tiles(blocks, tiles, plane_bytes, z.get_device());
    const TileSplit col_split = split_tiles(blocks, tiles, 3 * plane_bytes, z.get_device());
    at::Tensor z_partial = at::empty({z_split.splits, dims, batch}, z.options().dtype(at::kDouble));
    at::Tensor col_partial = at::empty({col_split.splits, 3, dims, batch}, z.options().dtype(at::kDouble));
    launch_tiles<scalar_t, Pass::GradZ>(prepared, terms, layout.singleton, z_split, nullptr,
                                        z_partial.data_ptr<double>(), stream);
    launch_tiles<scalar_t, Pass::GradMuLogvar>(prepared, terms, layout.singleton, col_split, nullptr,
                                               col_partial.data_ptr<double>(), stream);
    finish_grads_kernel<scalar_t><<<small_kernel_blocks(batch * dims), kSmallKernelThreads, 0, stream>>>(
        z_partial.data_ptr<double>(), z_split.splits, col_partial.data_ptr<double>(), col_split.splits,
        layout.slot_of_dim.data_ptr<int64_t>(), batch, dims, grad_z.data_ptr<scalar_t>(), grad_mu.data_ptr<scalar_t>(),
        grad_logvar.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_z, grad_mu, grad_logvar};
}

}  // namespace

TORCH_LIBRARY_IMPL(aelearn, CUDA, m) {
  m.impl("log_qz_forward", &log_qz_forward_cuda);
  m.impl("log_qz_backward", &log_qz_backward_cuda);
}
