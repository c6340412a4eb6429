// CUDA backend of the nearest-codebook search of vector quantisation (schema in ../vq.cpp):
// indices_n = argmin_k ||z_n - e_k||^2 (float64 semantics, ties to the lowest k) and the exact
// squared distance to that code. Nothing N x K is ever held; extra memory is O(N) scratch plus a
// centred copy of the codebook.
//
// Algorithm (the design every backend shares):
// 1. prepare_codebook_kernel: the codebook centred on its float64 mean s, e'_k = fl(e_k - s),
//    stored TRANSPOSED and zero-padded, [Dp, Kp] (Dp, Kp: D and K rounded up to the tile), so
//    that kChunk features of a tile of consecutive codes are kChunk contiguous 16-byte-aligned
//    rows that cp.async copies straight into shared memory. ||e'_k||^2 is summed in twice the
//    working precision and rounded once; padded codes get norm +inf, so they never win and need
//    no masks.
// 2. search_tiles_kernel (the hot path, a GEMM with an argmin epilogue): a block owns kRows rows
//    of z, centres them ONCE into shared memory as -2 z'_n (z'_n = fl(z_n - s); the factor -2 is
//    exact), and sweeps a contiguous range of code tiles, streaming kChunk-feature slices of the
//    centred codebook through a kStages-deep cp.async pipeline. Each thread accumulates a
//    kRowMicro x kCodeMicro register tile of scores s_nk = ||e'_k||^2 - 2 z'_n . e'_k (the
//    accumulators start at the norm). After the last slice of a tile, the 16 threads that share
//    a set of rows fold the tile into a running top-2 (best score, its code, best other score),
//    each thread keeping that of one row (fold_tile); the block finally writes one top-2 per row
//    and split. When there are few row tiles, the code tiles are split over the grid's y axis.
//    z is never copied: D > kMaxSegment is handled by re-staging kMaxSegment-feature segments of
//    the row tile for every code tile (rare widths; D <= 128 stages the tile once).
// 3. certify_rows_kernel: one warp per row merges the splits' top-2, computes ||z'_n||^2 and the
//    bound delta_n = (2 D + 16) u (||z'_n||^2 + max_k ||e'_k||^2) in float64, and certifies the
//    winner when second - best > 2 delta_n (then every other code is provably farther, VQ.md).
//    Certified rows get their index and the float64 direct-difference distance; the others are
//    appended to a compacted list (atomic counter; the list order does not affect any result).
// 4. exact_search_kernel: the listed rows are searched again over every code by float64 direct
//    differences of the ORIGINAL inputs, a group of kFallbackRows rows per block. Its grid is
//    fixed and it reads the list length on the device, so the host never waits for the count.
//
// Ties: every thread visits its codes in increasing order and replaces its best only on a
// strictly smaller score, so it keeps the lowest of equal codes; all merges (across threads,
// splits and warps) order states by (score, code), which makes them symmetric and associative:
// the result is a function of the set of scores alone, whatever the reduction order. Exact ties
// always reach step 4, because a tie leaves second == best.
//
// Numerics: float inputs are searched with fp32 FMA on the CUDA cores; tensor cores are not used.
// TF32 rounds operands to 11 significant bits, so its score errors would be ~2^13 times the
// delta_n above (which assumes IEEE fp32 round-to-nearest) and the certification would be
// invalid; 3xTF32 emulation gets close to fp32 accuracy, but tensor cores accumulate with
// truncation and no documented rounding rule, so no rigorous bound would hold either. float64
// inputs use FP64 FMA on the CUDA cores. Everything the bound depends on is computed as VQ.md
// says: centring in float64 rounded once, norms rounded once, dot products in the input dtype,
// ||z'_n||^2, delta_n and the score gap in float64. Certification also requires the row's scale
// to keep clear of overflow and underflow, and D <= 4096 for float (Certification below); other
// rows take step 4.
//
// Performance (float32, N = 262144, K = 8192, D = 64, H200): 2 N K D = 275 GFLOP, ~4.1 ms at the
// fp32 FMA peak. The per-thread 8 x 8 tile needs 4 LDS.128 per 64 FFMA; the epilogue costs ~7
// instructions per score (~11% of the FFMAs at D = 64); two blocks (16 warps) per SM at 128
// registers and ~59 KB of shared memory; z, staged once per block, and the 2 MiB centred codebook
// stay in L2. One cuBLAS SGEMM of that size does the same FMAs and also writes the 8.6 GB score
// matrix. Certification fails for ~0.1% of rows on random data (the gap between the two best of
// 8192 distances is rarely below 2 delta_n ~ 3e-3), so steps 3-4 cost a few percent of step 2.
// float64 runs one block per SM on the FP64 CUDA cores (half the fp32 rate on H200; the FP64
// tensor cores would double it, with fragment layouts that need a device to be tested).
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/max.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_pipeline.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "common.cuh"

namespace {

using namespace aelearn::cuda;

// Tile shape of the search per dtype: threads kSide x kSide (common.cuh), each owning kRowMicro
// rows x kCodeMicro codes. float: 128 x 128 tiles, 64 accumulators per thread (128 registers,
// no spills: two blocks per SM). double: 128 x 64 tiles, 32 double accumulators (~180 registers,
// one block per SM).
template <typename scalar_t>
struct SearchTiling {
  static constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));  // values per 16-byte load
  static constexpr int kRowMicro = 8;
  static constexpr int kCodeMicro = kFloat ? 8 : 4;
  static constexpr int kRows = kSide * kRowMicro;
  static constexpr int kCodes = kSide * kCodeMicro;
  // Row stride of the staged z tile: 16 bytes of padding keep the fragment loads aligned and cut
  // the bank conflicts of the (rare) transposing stores to 4-way.
  static constexpr int kZStride = kRows + kVec;
  // One pipeline stage: kChunk feature rows of kCodes codes, then the tile's norms (chunk 0 only).
  static constexpr int kStageElems = (kChunk + 1) * kCodes;
  static constexpr int kMinBlocksPerSm = kFloat ? 2 : 1;
  static_assert(kRowMicro % kVec == 0 && kCodeMicro % kVec == 0, "fragments are whole 16-byte loads");
};

constexpr int kStages = 3;                 // cp.async pipeline depth of the codebook slices
constexpr int kMaxSegment = 128;           // features of the z tile staged at a time (multiple of kChunk)
constexpr int kCertifyWarps = 8;           // rows per block of certify_rows_kernel
constexpr int kFallbackRows = 8;           // rows per group of exact_search_kernel
constexpr int kFallbackCodes = 2;          // codes per thread and pass of exact_search_kernel
constexpr int kFallbackBlocksPerSm = 4;
constexpr int32_t kNoCode = std::numeric_limits<int32_t>::max();  // index of an empty top-2 state

// u of the input dtype and where delta_n = (2 D + 16) u A_n (A_n = ||z'_n||^2 + max ||e'_k||^2) is a
// rigorous bound. The roundings of centring (4 u A_n), of the norm (u A_n) and of the D-term FMA
// chain started at the norm (2 gamma_D A_n, gamma_D = D u / (1 - D u)) add up to at most
// (2 D + 9) u A_n while D <= u^(-1/2) (kMaxDims), where the second-order part of gamma_D stays
// below 2 u. Below A_n = D kMinMagnitude, the absolute errors of subnormal results (~2 D ulps of
// the smallest subnormal) could exceed the remaining 7 u A_n; above kMaxMagnitude a partial sum
// (|.| <= 2 A_n) could overflow.
template <typename scalar_t>
struct Certification {
  static constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  static constexpr double kUnit = kFloat ? 0x1p-24 : 0x1p-53;
  static constexpr int64_t kMaxDims = kFloat ? 4096 : int64_t{1} << 26;
  static constexpr double kMinMagnitude = kFloat ? 0x1p-100 : 0x1p-900;  // per feature
  static constexpr double kMaxMagnitude = kFloat ? 0x1p120 : 0x1p1000;
};

template <typename scalar_t>
constexpr scalar_t kInf = std::numeric_limits<scalar_t>::infinity();

template <typename scalar_t>
struct alignas(16) Packet {
  scalar_t v[SearchTiling<scalar_t>::kVec];
};

// fl(v - s) in the input dtype: the difference in float64, rounded once. Every kernel that needs
// z'_n or e'_k forms it with this function, so they all see the same vectors.
template <typename scalar_t>
__device__ __forceinline__ scalar_t centre(scalar_t v, double s) {
  return static_cast<scalar_t>(static_cast<double>(v) - s);
}

// Sum of squares in twice the working precision (Dot2 of Ogita, Rump and Oishi: exact products
// by FMA, exact sums by TwoSum, errors accumulated apart): the result has error <= 2^-53 |sum|
// + O(D^2 2^-106) sum, so the norm rounded to the input dtype is within one rounding of exact.
// The _rn intrinsics keep nvcc from contracting the error-free transformations into FMAs.
struct CompensatedSquareSum {
  double sum = 0.0;
  double carry = 0.0;

  __device__ __forceinline__ void add_square(double x) {
    const double square = __dmul_rn(x, x);
    const double square_error = fma(x, x, -square);
    const double total = __dadd_rn(sum, square);
    const double back = __dsub_rn(total, sum);
    const double sum_error = __dadd_rn(__dsub_rn(sum, __dsub_rn(total, back)), __dsub_rn(square, back));
    sum = total;
    carry = __dadd_rn(carry, __dadd_rn(sum_error, square_error));
  }
  __device__ __forceinline__ double value() const { return __dadd_rn(sum, carry); }
};

// Best score of a set of codes, its code (kNoCode for an empty set) and the best score of the
// other codes (+inf when there is none).
template <typename scalar_t>
struct TopTwo {
  scalar_t best;
  scalar_t second;
  int32_t code;
};

template <typename scalar_t>
__device__ __forceinline__ TopTwo<scalar_t> empty_top_two() {
  return {kInf<scalar_t>, kInf<scalar_t>, kNoCode};
}

// Whether (value, code) comes first in the order of every merge: the smaller value, the lower code
// among equal values.
template <typename value_t>
__device__ __forceinline__ bool precedes(value_t value, int32_t code, value_t other_value, int32_t other_code) {
  return value < other_value || (value == other_value && code < other_code);
}

// Top-2 of the union of two disjoint sets: the winner by (score, code), the lowest code among
// equal scores, and as second the better of the winner's second and the loser's best.
// (Selections are made field by field on values: a conditional between two array elements is an
// lvalue and would push the arrays of fold_tile into local memory.)
template <typename scalar_t>
__device__ __forceinline__ TopTwo<scalar_t> select(bool first, const TopTwo<scalar_t>& a, const TopTwo<scalar_t>& b) {
  return {first ? a.best : b.best, first ? a.second : b.second, first ? a.code : b.code};
}

template <typename scalar_t>
__device__ __forceinline__ TopTwo<scalar_t> merge(const TopTwo<scalar_t>& a, const TopTwo<scalar_t>& b) {
  const bool a_wins = precedes(a.best, a.code, b.best, b.code);
  return {a_wins ? a.best : b.best, fmin(a_wins ? a.second : b.second, a_wins ? b.best : a.best),
          a_wins ? a.code : b.code};
}

template <typename scalar_t>
__device__ __forceinline__ TopTwo<scalar_t> shuffle_xor(const TopTwo<scalar_t>& state, int mask, int width) {
  return {__shfl_xor_sync(0xffffffffu, state.best, mask, width),
          __shfl_xor_sync(0xffffffffu, state.second, mask, width),
          __shfl_xor_sync(0xffffffffu, state.code, mask, width)};
}

// Adds the score of `code`, visited after every code already in the state. A NaN score (only
// from overflow, which certification excludes) leaves second <= best, i.e. an uncertified row.
template <typename scalar_t>
__device__ __forceinline__ void add_score(TopTwo<scalar_t>& state, scalar_t score, int32_t code) {
  state.second = fmin(state.second, fmax(score, state.best));
  if (score < state.best) {
    state.best = score;
    state.code = code;
  }
}

// Offset in a tile of fragment entry i of the thread at position `lane` (tx or ty) of its side:
// kVec consecutive entries per 16-byte load, loads kSide * kVec apart. Increasing in i.
template <typename scalar_t>
__device__ __forceinline__ int fragment_offset(int lane, int i) {
  constexpr int kVec = SearchTiling<scalar_t>::kVec;
  return (i / kVec) * (kSide * kVec) + lane * kVec + i % kVec;
}

// Lanes that end up holding the same row after fold_tile's reduce-scatter.
constexpr int kLanesPerRow = kSide / SearchTiling<float>::kRowMicro;
static_assert(SearchTiling<float>::kRowMicro == SearchTiling<double>::kRowMicro, "one row layout");

// Folds a finished code tile (acc[i][j]: score of row i, code code0 + fragment_offset(tx, j)) into
// the running top-2 of the thread's row. Each thread first forms the top-2 of each of its rows
// over its own codes (in increasing code order), then the kSide threads sharing ty -- lanes 0-15
// or 16-31 of one warp -- reduce-scatter them: at every step a lane keeps half of its rows,
// merged with its partner's copy of that half, until each lane holds one row,
// fragment_offset(ty, tx / kLanesPerRow), merged over all kSide lanes. Keeping one row's state
// per thread rather than kRowMicro saves ~20 registers, which the float kernel needs to run two
// blocks per SM without spilling; it costs ~2% more instructions than folding every score into
// per-row states.
template <typename scalar_t>
__device__ __forceinline__ void fold_tile(
    const scalar_t (&acc)[SearchTiling<scalar_t>::kRowMicro][SearchTiling<scalar_t>::kCodeMicro], int32_t code0,
    int tx, TopTwo<scalar_t>& row_top) {
  using Tiling = SearchTiling<scalar_t>;
  TopTwo<scalar_t> tops[Tiling::kRowMicro];
#pragma unroll
  for (int i = 0; i < Tiling::kRowMicro; ++i) {
    tops[i] = {acc[i][0], kInf<scalar_t>, code0 + fragment_offset<scalar_t>(tx, 0)};
#pragma unroll
    for (int j = 1; j < Tiling::kCodeMicro; ++j) {
      add_score(tops[i], acc[i][j], code0 + fragment_offset<scalar_t>(tx, j));
    }
  }
  static_assert(Tiling::kRowMicro == 8, "three halving steps");
#pragma unroll
  for (int step = 1; step <= 3; ++step) {
    const int held = Tiling::kRowMicro >> step;
    const int mask = kSide >> step;
    const bool upper = (tx & mask) != 0;  // this lane keeps rows [held, 2 held) of those it holds
#pragma unroll
    for (int r = 0; r < held; ++r) {
      const TopTwo<scalar_t> sent = shuffle_xor(select(upper, tops[r], tops[r + held]), mask, kSide);
      tops[r] = merge(select(upper, tops[r + held], tops[r]), sent);
    }
  }
#pragma unroll
  for (int mask = kLanesPerRow / 2; mask > 0; mask /= 2) {
    tops[0] = merge(tops[0], shuffle_xor(tops[0], mask, kSide));
  }
  row_top = merge(row_top, tops[0]);
}

// Transposed centred codebook and norms, one thread per (padded) code: centred[d, k] = e'_kd
// (0 in the padding), norms[k] = ||e'_k||^2 rounded once (+inf for padded codes).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) prepare_codebook_kernel(
    const scalar_t* __restrict__ codebook,  // [K, D]
    const double* __restrict__ shift,       // [D] codebook mean
    int64_t codes, int64_t dims, int64_t padded_codes, int64_t padded_dims,
    scalar_t* __restrict__ centred,  // [Dp, Kp]
    scalar_t* __restrict__ norms) {  // [Kp]
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (k >= padded_codes) {
    return;
  }
  CompensatedSquareSum norm;
  for (int64_t d = 0; d < padded_dims; ++d) {
    scalar_t value = 0;
    if (k < codes && d < dims) {
      value = centre(codebook[k * dims + d], shift[d]);
      norm.add_square(static_cast<double>(value));
    }
    centred[d * padded_codes + k] = value;  // consecutive threads write consecutive codes
  }
  norms[k] = k < codes ? static_cast<scalar_t>(norm.value()) : kInf<scalar_t>;
}

// acc[i][j] += sum over the chunk's kChunk features of (-2 z'_row(i)) e'_code(j), from the staged
// z rows (z_rows[f * kZStride + m]) and codebook slice (codes[f * kCodes + c]).
template <typename scalar_t>
__device__ __forceinline__ void multiply_chunk(
    const scalar_t* z_rows, const scalar_t* codes, int tx, int ty,
    scalar_t (&acc)[SearchTiling<scalar_t>::kRowMicro][SearchTiling<scalar_t>::kCodeMicro]) {
  using Tiling = SearchTiling<scalar_t>;
  constexpr int kVec = Tiling::kVec;
#pragma unroll
  for (int f = 0; f < kChunk; ++f) {
    // Within a warp the z loads hit two addresses (broadcast) and the code loads 16 consecutive
    // 16-byte packets: both conflict-free.
    Packet<scalar_t> a[Tiling::kRowMicro / kVec];
    Packet<scalar_t> b[Tiling::kCodeMicro / kVec];
#pragma unroll
    for (int h = 0; h < Tiling::kRowMicro / kVec; ++h) {
      a[h] = *reinterpret_cast<const Packet<scalar_t>*>(z_rows + f * Tiling::kZStride + fragment_offset<scalar_t>(ty, h * kVec));
    }
#pragma unroll
    for (int h = 0; h < Tiling::kCodeMicro / kVec; ++h) {
      b[h] = *reinterpret_cast<const Packet<scalar_t>*>(codes + f * Tiling::kCodes + fragment_offset<scalar_t>(tx, h * kVec));
    }
#pragma unroll
    for (int i = 0; i < Tiling::kRowMicro; ++i) {
#pragma unroll
      for (int j = 0; j < Tiling::kCodeMicro; ++j) {
        acc[i][j] = fma(a[i / kVec].v[i % kVec], b[j / kVec].v[j % kVec], acc[i][j]);
      }
    }
  }
}

// Top-2 of the scores of row tile blockIdx.x against the code tiles of split blockIdx.y, written
// to split_*[blockIdx.y, row]. Dynamic shared memory: the z tile [segment, kZStride] (feature-
// major), then kStages stages of [kChunk + 1, kCodes].
// kSegmented (D > kMaxSegment): the z tile holds one segment of features at a time and is
// re-staged inside the loop. Otherwise it is staged once, before the loop, which also keeps the
// staging's pointers and sizes out of the loop's registers (the float kernel fits 128 without
// spilling only so).
template <typename scalar_t, bool kSegmented>
__global__ void __launch_bounds__(kThreads, SearchTiling<scalar_t>::kMinBlocksPerSm) search_tiles_kernel(
    const scalar_t* __restrict__ z,        // [N, D]
    const double* __restrict__ shift,      // [D]
    const scalar_t* __restrict__ centred,  // [Dp, Kp]
    const scalar_t* __restrict__ norms,    // [Kp]
    int64_t rows, int64_t dims, int64_t padded_codes, int padded_dims, int segment,
    int64_t code_tiles, int64_t tiles_per_split,
    scalar_t* __restrict__ split_best,     // [splits, N]
    scalar_t* __restrict__ split_second,   // [splits, N]
    int32_t* __restrict__ split_code) {    // [splits, N]
  using Tiling = SearchTiling<scalar_t>;
  constexpr int kRowMicro = Tiling::kRowMicro;
  constexpr int kCodeMicro = Tiling::kCodeMicro;
  constexpr int kVec = Tiling::kVec;
  extern __shared__ __align__(16) unsigned char search_smem[];
  scalar_t* const z_tile = reinterpret_cast<scalar_t*>(search_smem);
  scalar_t* const stages = z_tile + segment * Tiling::kZStride;
  const int tx = threadIdx.x % kSide;
  const int ty = threadIdx.x / kSide;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * Tiling::kRows;
  const int64_t first_tile = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  const int tiles = static_cast<int>(std::min(tiles_per_split, code_tiles - first_tile));
  const int chunks = padded_dims / kChunk;        // slices per code tile
  const int segment_chunks = segment / kChunk;    // slices per staged z segment
  const int steps = tiles * chunks;               // < 2^31, checked by the host

  // Stages slice `chunk` of code tile `tile` (and with chunk 0 the tile's norms): consecutive
  // threads copy consecutive 16-byte packets of one feature row.
  const auto fetch = [&](int tile, int chunk, int stage) {
    constexpr int kPacketsPerRow = Tiling::kCodes / kVec;
    scalar_t* const dst = stages + stage * Tiling::kStageElems;
    const int64_t code0 = (first_tile + tile) * Tiling::kCodes;
    const scalar_t* const src = centred + static_cast<int64_t>(chunk) * kChunk * padded_codes + code0;
    static_assert(kChunk * kPacketsPerRow % kThreads == 0, "whole copies per thread");
#pragma unroll
    for (int q = 0; q < kChunk * kPacketsPerRow / kThreads; ++q) {
      const int e = q * kThreads + static_cast<int>(threadIdx.x);
      const int f = e / kPacketsPerRow;
      const int packet = e % kPacketsPerRow;
      __pipeline_memcpy_async(dst + f * Tiling::kCodes + packet * kVec, src + f * padded_codes + packet * kVec, 16);
    }
    if (chunk == 0 && threadIdx.x < kPacketsPerRow) {
      __pipeline_memcpy_async(dst + kChunk * Tiling::kCodes + threadIdx.x * kVec, norms + code0 + threadIdx.x * kVec, 16);
    }
  };
  // z_tile[f, m] = -2 z'[row0 + m, feature0 + f] for the segment at feature0 (0 past N or D).
  const scalar_t* const z_rows = z + row0 * dims;
  const int tile_rows = static_cast<int>(std::min<int64_t>(Tiling::kRows, rows - row0));
  const int features_in = static_cast<int>(dims);
  const auto stage_z = [&](int feature0) {
    const int features = std::min(segment, padded_dims - feature0);
    for (int e = threadIdx.x; e < Tiling::kRows * features; e += kThreads) {
      const int m = e / features;  // consecutive threads read consecutive features of a row
      const int d = feature0 + e % features;
      z_tile[(d - feature0) * Tiling::kZStride + m] =
          m < tile_rows && d < features_in
              ? scalar_t(-2) * centre(z_rows[static_cast<int64_t>(m) * features_in + d], shift[d])
              : scalar_t(0);
    }
  };

  // The slices run as one flat sequence of steps (tile, chunk), so the pipeline does not drain
  // between code tiles.
  int fetch_tile = 0;
  int fetch_chunk = 0;
  int fetch_stage = 0;
  const auto fetch_next = [&] {
    if (fetch_tile < tiles) {
      fetch(fetch_tile, fetch_chunk, fetch_stage);
      if (++fetch_chunk == chunks) {
        fetch_chunk = 0;
        ++fetch_tile;
      }
      fetch_stage = fetch_stage + 1 == kStages ? 0 : fetch_stage + 1;
    }
    __pipeline_commit();  // one group per step, empty past the end, so the wait count holds
  };
  for (int s = 0; s + 1 < kStages; ++s) {
    fetch_next();
  }
  if constexpr (!kSegmented) {
    stage_z(0);  // made visible by the first barrier of the loop
  }

  TopTwo<scalar_t> row_top = empty_top_two<scalar_t>();  // of row fragment_offset(ty, tx / kLanesPerRow)
  scalar_t acc[kRowMicro][kCodeMicro];
  int tile = 0;
  int chunk = 0;
  int stage = 0;
  for (int step = 0; step < steps; ++step) {
    __pipeline_wait_prior(kStages - 2);  // this thread's copies of `step` have landed
    __syncthreads();  // everyone's have, and everyone is done with step - 1
    fetch_next();     // refills the stage that step - 1 read
    if constexpr (kSegmented) {
      if (chunk % segment_chunks == 0) {
        stage_z(chunk / segment_chunks * segment);
        __syncthreads();
      }
    }
    const scalar_t* const codes = stages + stage * Tiling::kStageElems;
    if (chunk == 0) {
#pragma unroll
      for (int j = 0; j < kCodeMicro; ++j) {
        const scalar_t norm = codes[kChunk * Tiling::kCodes + fragment_offset<scalar_t>(tx, j)];
#pragma unroll
        for (int i = 0; i < kRowMicro; ++i) {
          acc[i][j] = norm;
        }
      }
    }
    multiply_chunk(z_tile + (chunk % segment_chunks) * kChunk * Tiling::kZStride, codes, tx, ty, acc);
    if (chunk == chunks - 1) {
      fold_tile(acc, static_cast<int32_t>((first_tile + tile) * Tiling::kCodes), tx, row_top);
    }
    if (++chunk == chunks) {
      chunk = 0;
      ++tile;
    }
    stage = stage + 1 == kStages ? 0 : stage + 1;
  }

  const int64_t row = row0 + fragment_offset<scalar_t>(ty, tx / kLanesPerRow);
  if (tx % kLanesPerRow == 0 && row < rows) {
    const int64_t at = static_cast<int64_t>(blockIdx.y) * rows + row;
    split_best[at] = row_top.best;
    split_second[at] = row_top.second;
    split_code[at] = row_top.code;
  }
}

// One warp per row: merges the splits' top-2, certifies the winner (file comment, step 3) and
// writes its index and float64 distance, or appends the row to failing_rows.
template <typename scalar_t>
__global__ void __launch_bounds__(kCertifyWarps * 32) certify_rows_kernel(
    const scalar_t* __restrict__ z,         // [N, D]
    const scalar_t* __restrict__ codebook,  // [K, D]
    const double* __restrict__ shift,       // [D]
    const scalar_t* __restrict__ max_norm,  // [] max_k ||e'_k||^2
    const scalar_t* __restrict__ split_best, const scalar_t* __restrict__ split_second,
    const int32_t* __restrict__ split_code,  // [splits, N] each
    int64_t rows, int64_t codes, int64_t dims, int64_t splits,
    int64_t* __restrict__ indices,           // [N]
    scalar_t* __restrict__ sqdist,           // [N]
    int64_t* __restrict__ failing_rows,      // [N], the first *failing_count entries used
    unsigned long long* __restrict__ failing_count) {
  using Bound = Certification<scalar_t>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kCertifyWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) {
    return;  // uniform per warp: the shuffles below never miss a lane
  }
  TopTwo<scalar_t> top = empty_top_two<scalar_t>();
  for (int64_t s = lane; s < splits; s += 32) {
    const int64_t at = s * rows + row;
    top = merge(top, TopTwo<scalar_t>{split_best[at], split_second[at], split_code[at]});
  }
  for (int mask = 16; mask > 0; mask /= 2) {
    top = merge(top, shuffle_xor(top, mask, 32));
  }
  // An empty state (every score +inf or NaN) is never certified; code 0 only keeps the reads valid.
  const int64_t code = top.code < codes ? top.code : 0;
  double centred_sq = 0.0;
  double distance = 0.0;
  for (int64_t d = lane; d < dims; d += 32) {
    const scalar_t value = z[row * dims + d];
    const double centred_value = static_cast<double>(centre(value, shift[d]));
    centred_sq = fma(centred_value, centred_value, centred_sq);
    const double diff = static_cast<double>(value) - static_cast<double>(codebook[code * dims + d]);
    distance = fma(diff, diff, distance);
  }
  centred_sq = warp_sum(centred_sq, 32);
  distance = warp_sum(distance, 32);
  if (lane == 0) {
    const double magnitude = centred_sq + static_cast<double>(*max_norm);
    const double delta = (2.0 * static_cast<double>(dims) + 16.0) * Bound::kUnit * magnitude;
    const double gap = static_cast<double>(top.second) - static_cast<double>(top.best);
    const bool in_range = dims <= Bound::kMaxDims && magnitude >= static_cast<double>(dims) * Bound::kMinMagnitude &&
                          magnitude <= Bound::kMaxMagnitude;
    const bool certified = in_range && gap > 2.0 * delta;
    if (certified) {
      indices[row] = top.code;
      sqdist[row] = static_cast<scalar_t>(distance);
    } else {
      failing_rows[atomicAdd(failing_count, 1ull)] = row;
    }
  }
}

// Exact search of the listed rows: d_nk = sum_d (z_nd - e_kd)^2 in float64 by direct differences
// of the original inputs, for every k. A block takes groups of kFallbackRows rows (grid-stride
// over the list); thread t evaluates codes t, t + kThreads, ... in increasing order against all
// rows of the group (the z values are block-uniform loads), then the block reduces every row by
// (distance, code).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) exact_search_kernel(
    const scalar_t* __restrict__ z,         // [N, D]
    const scalar_t* __restrict__ codebook,  // [K, D]
    int64_t codes, int64_t dims,
    const int64_t* __restrict__ failing_rows,                // [*failing_count]
    const unsigned long long* __restrict__ failing_count,
    int64_t* __restrict__ indices,   // [N]
    scalar_t* __restrict__ sqdist) { // [N]
  constexpr int kWarps = kThreads / 32;
  __shared__ double warp_distance[kWarps][kFallbackRows];
  __shared__ int32_t warp_code[kWarps][kFallbackRows];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t count = static_cast<int64_t>(*failing_count);
  const int64_t pass_codes = static_cast<int64_t>(kThreads) * kFallbackCodes;
  for (int64_t group0 = static_cast<int64_t>(blockIdx.x) * kFallbackRows; group0 < count;
       group0 += static_cast<int64_t>(gridDim.x) * kFallbackRows) {
    // Slots past the end of the list repeat its last row; they are not written.
    int64_t row[kFallbackRows];
#pragma unroll
    for (int r = 0; r < kFallbackRows; ++r) {
      row[r] = failing_rows[std::min(group0 + r, count - 1)];
    }
    double best[kFallbackRows];
    int32_t best_code[kFallbackRows];
#pragma unroll
    for (int r = 0; r < kFallbackRows; ++r) {
      best[r] = kInf<double>;
      best_code[r] = kNoCode;
    }
    for (int64_t code0 = 0; code0 < codes; code0 += pass_codes) {
      int64_t code[kFallbackCodes];
      double distance[kFallbackRows][kFallbackCodes] = {};
#pragma unroll
      for (int c = 0; c < kFallbackCodes; ++c) {
        code[c] = code0 + c * kThreads + threadIdx.x;
      }
      for (int64_t d = 0; d < dims; ++d) {
        double e[kFallbackCodes];
#pragma unroll
        for (int c = 0; c < kFallbackCodes; ++c) {
          e[c] = static_cast<double>(codebook[std::min(code[c], codes - 1) * dims + d]);
        }
#pragma unroll
        for (int r = 0; r < kFallbackRows; ++r) {
          const double zv = static_cast<double>(z[row[r] * dims + d]);
#pragma unroll
          for (int c = 0; c < kFallbackCodes; ++c) {
            const double diff = zv - e[c];
            distance[r][c] = fma(diff, diff, distance[r][c]);
          }
        }
      }
#pragma unroll
      for (int c = 0; c < kFallbackCodes; ++c) {
        if (code[c] < codes) {
#pragma unroll
          for (int r = 0; r < kFallbackRows; ++r) {
            if (precedes(distance[r][c], static_cast<int32_t>(code[c]), best[r], best_code[r])) {
              best[r] = distance[r][c];
              best_code[r] = static_cast<int32_t>(code[c]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kFallbackRows; ++r) {
      for (int mask = 16; mask > 0; mask /= 2) {
        const double other = __shfl_xor_sync(0xffffffffu, best[r], mask);
        const int32_t other_code = __shfl_xor_sync(0xffffffffu, best_code[r], mask);
        if (precedes(other, other_code, best[r], best_code[r])) {
          best[r] = other;
          best_code[r] = other_code;
        }
      }
      if (lane == 0) {
        warp_distance[warp][r] = best[r];
        warp_code[warp][r] = best_code[r];
      }
    }
    __syncthreads();
    if (threadIdx.x < kFallbackRows && group0 + threadIdx.x < count) {
      const int r = threadIdx.x;
      double distance = warp_distance[0][r];
      int32_t code = warp_code[0][r];
      for (int w = 1; w < kWarps; ++w) {
        if (precedes(warp_distance[w][r], warp_code[w][r], distance, code)) {
          distance = warp_distance[w][r];
          code = warp_code[w][r];
        }
      }
      const int64_t own_row = failing_rows[group0 + r];  // row[r], without indexing row by thread
      indices[own_row] = code;
      sqdist[own_row] = static_cast<scalar_t>(distance);
    }
    __syncthreads();  // the next group overwrites the warp results
  }
}

void check_inputs(const at::Tensor& z, const at::Tensor& codebook) {
  TORCH_CHECK(z.is_cuda(), "vq_nearest (CUDA): z must be a CUDA tensor, got ", z.device());
  TORCH_CHECK(codebook.is_cuda() && codebook.device() == z.device(),
              "vq_nearest (CUDA): codebook must be a CUDA tensor on z's device (", z.device(), "), got ",
              codebook.device());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "vq_nearest (CUDA): z must be float32 or float64, got ", z.scalar_type());
  TORCH_CHECK(codebook.scalar_type() == z.scalar_type(), "vq_nearest (CUDA): codebook must have z's dtype (",
              z.scalar_type(), "), got ", codebook.scalar_type());
  TORCH_CHECK(z.dim() == 2 && z.size(1) >= 1, "vq_nearest (CUDA): z must be [N, D] with D >= 1, got ", z.sizes());
  TORCH_CHECK(codebook.dim() == 2 && codebook.size(1) == z.size(1),
              "vq_nearest (CUDA): codebook must be [K, D] with z's D = ", z.size(1), ", got ", codebook.sizes());
  TORCH_CHECK(codebook.size(0) >= 1, "vq_nearest (CUDA): codebook must hold at least one code (K >= 1)");
  // Codes are int32 in the kernels, feature counts int (padded to whole tiles).
  TORCH_CHECK(codebook.size(0) <= (int64_t{1} << 30), "vq_nearest (CUDA): codebook has more than 2^30 codes");
  TORCH_CHECK(z.size(1) <= (int64_t{1} << 30), "vq_nearest (CUDA): D must be at most 2^30, got ", z.size(1));
  TORCH_CHECK(z.is_contiguous(), "vq_nearest (CUDA): z must be contiguous");
  TORCH_CHECK(codebook.is_contiguous(), "vq_nearest (CUDA): codebook must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> vq_nearest_cuda(const at::Tensor& z, const at::Tensor& codebook) {
  check_inputs(z, codebook);
  const c10::cuda::CUDAGuard guard(z.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = z.get_device();
  const int64_t rows = z.size(0);
  const int64_t codes = codebook.size(0);
  const int64_t dims = z.size(1);
  at::Tensor indices = at::empty({rows}, z.options().dtype(at::kLong));
  at::Tensor sqdist = at::empty({rows}, z.options());
  if (rows == 0) {
    return {indices, sqdist};
  }

  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "vq_nearest_cuda", [&] {
    using Tiling = SearchTiling<scalar_t>;
    const int64_t padded_codes = ceil_div(codes, Tiling::kCodes) * Tiling::kCodes;
    const int64_t padded_dims = ceil_div(dims, kChunk) * kChunk;
    const int segment = static_cast<int>(std::min<int64_t>(padded_dims, kMaxSegment));

    const at::Tensor shift = at::mean(codebook, {0}, /*keepdim=*/false, at::kDouble);
    at::Tensor centred = at::empty({padded_dims, padded_codes}, codebook.options());
    at::Tensor norms = at::empty({padded_codes}, codebook.options());
    const unsigned prepare_blocks = static_cast<unsigned>(ceil_div(padded_codes, kThreads));
    prepare_codebook_kernel<scalar_t><<<prepare_blocks, kThreads, 0, stream>>>(
        codebook.data_ptr<scalar_t>(), shift.data_ptr<double>(), codes, dims, padded_codes, padded_dims,
        centred.data_ptr<scalar_t>(), norms.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor max_norm = norms.narrow(0, 0, codes).max();  // stays on the device

    const int64_t row_tiles = ceil_div(rows, Tiling::kRows);
    const int64_t code_tiles = padded_codes / Tiling::kCodes;
    const int64_t tiles_per_split = ceil_div(code_tiles, num_splits(row_tiles, code_tiles, device));
    const int64_t splits = ceil_div(code_tiles, tiles_per_split);  // none of them empty
    at::Tensor split_best = at::empty({splits, rows}, z.options());
    at::Tensor split_second = at::empty({splits, rows}, z.options());
    at::Tensor split_code = at::empty({splits, rows}, z.options().dtype(at::kInt));
    TORCH_CHECK(tiles_per_split * (padded_dims / kChunk) < std::numeric_limits<int>::max(),
                "vq_nearest (CUDA): K * D = ", codes, " * ", dims, " is too large");
    const size_t search_smem_bytes =
        sizeof(scalar_t) * (static_cast<size_t>(segment) * Tiling::kZStride + kStages * Tiling::kStageElems);
    const dim3 search_grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(splits));
    const auto launch_search = [&](auto kernel) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(search_smem_bytes)));
      kernel<<<search_grid, kThreads, search_smem_bytes, stream>>>(
          z.data_ptr<scalar_t>(), shift.data_ptr<double>(), centred.data_ptr<scalar_t>(),
          norms.data_ptr<scalar_t>(), rows, dims, padded_codes, static_cast<int>(padded_dims), segment, code_tiles,
          tiles_per_split, split_best.data_ptr<scalar_t>(), split_second.data_ptr<scalar_t>(),
          split_code.data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (segment < padded_dims) {
      launch_search(search_tiles_kernel<scalar_t, true>);
    } else {
      launch_search(search_tiles_kernel<scalar_t, false>);
    }

    at::Tensor failing_rows = at::empty({rows}, z.options().dtype(at::kLong));
    at::Tensor failing_count = at::zeros({1}, z.options().dtype(at::kLong));
    auto* const count = reinterpret_cast<unsigned long long*>(failing_count.data_ptr<int64_t>());
    const unsigned certify_blocks = static_cast<unsigned>(ceil_div(rows, kCertifyWarps));
    certify_rows_kernel<scalar_t><<<certify_blocks, kCertifyWarps * 32, 0, stream>>>(
        z.data_ptr<scalar_t>(), codebook.data_ptr<scalar_t>(), shift.data_ptr<double>(),
        max_norm.data_ptr<scalar_t>(), split_best.data_ptr<scalar_t>(), split_second.data_ptr<scalar_t>(),
        split_code.data_ptr<int32_t>(), rows, codes, dims, splits, indices.data_ptr<int64_t>(),
        sqdist.data_ptr<scalar_t>(), failing_rows.data_ptr<int64_t>(), count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const unsigned fallback_blocks = static_cast<unsigned>(std::min<int64_t>(
        ceil_div(rows, kFallbackRows), kFallbackBlocksPerSm * int64_t{multiprocessor_count(device)}));
    exact_search_kernel<scalar_t><<<fallback_blocks, kThreads, 0, stream>>>(
        z.data_ptr<scalar_t>(), codebook.data_ptr<scalar_t>(), codes, dims, failing_rows.data_ptr<int64_t>(), count,
        indices.data_ptr<int64_t>(), sqdist.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {indices, sqdist};
}

}  // namespace

TORCH_LIBRARY_IMPL(aelearn, CUDA, m) {
  m.impl("vq_nearest", &vq_nearest_cuda);
}
