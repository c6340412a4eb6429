// CUDA backend of the incremental step of cached PixelCNN decoding (schema and formula in
// ../pixelcnn.cpp): the L gated layers of one column and the output head, for N images, in ONE
// kernel launch.
//
// Algorithm. A thread block owns kRows images (1, 2, 4 or 8, chosen on the host) and runs the
// whole chain for them: layer l's input is layer l-1's output of the same block, so no grid-wide
// synchronisation is needed. The step is a sequence of small matrix products, kRows input vectors
// (one per image) times a weight matrix [K, width] in the contract's [in, out] layout:
//   per layer  Gate      [window taps, h_{l-1}] . (w_in or w_hidden[l-1]) + v_row, then the gate
//              Residual  g . w_res[l] + b_res[l], added to h_{l-1}
//              Skip      g . w_skip[l], added to s
//   head       Hidden    relu(s) . w_out1 + b_out1, then relu;   Logits  hidden . w_out2 + b_out2
// The weights (~1.2 MB for float at size A) are the bulk of the traffic and do not depend on the
// computation, so the block streams them, with each layer's cached taps and vertical term, as one
// flat sequence of items through a kStages-deep cp.async ring in shared memory (StreamCursor
// enumerates the items; the copy cursor runs kStages - 1 items ahead of the compute cursor,
// across products and layers, so the pipeline never drains). An item is either the Inputs of a
// layer (window taps and v_row of the block's images) or rows [k0, k0 + rows) of one column tile
// of a product, at most stage_elems weights. A tile spans at most kMaxTileCols columns, so every
// product of sizes A and B is a single tile whose items are contiguous in global memory and are
// copied as 16-byte packets (the item is placed at the source's alignment phase within its slot).
// Wider products are split into column tiles copied element by element; a Gate tile holds
// channels [c0, c0 + half) of both the tanh and the sigmoid half, so the gate always follows the
// tile's sums directly.
//
// Thread layout of a tile of width w: the tile's columns form ceil(w / kColBlock) blocks of
// kColBlock; warp i computes block i % blocks for the rows k0 + i / blocks + slices * m of each
// item (slices = kWarps / blocks), lane the columns lane + 32 j (j < kColMicro) of its block, for
// all kRows images (registers acc[kRows][kColMicro]; inputs are block-wide broadcasts from shared
// memory, weights conflict-free consecutive words). At the end of a tile the slices' partial sums
// go to shared memory and one thread per (image, column) adds them in slice order and applies the
// epilogue.
//
// Numerics: dot products in the input dtype with FMA (no tensor cores, no TF32); the order of
// every sum is fixed by the shapes alone (rows of a slice in increasing order, then slices in
// increasing order), so equal inputs give bitwise equal outputs. tanh and the sigmoid
// 1 / (1 + exp(-x)) use the accurate CUDA maths functions (no fast-math intrinsics).
//
// Memory: shared memory only, O(kRows (kw max(F, C) + 3 C + S + M)) plus the ring and the partial
// sums (kRows kMaxTileCols); nothing grows with N beyond the outputs.
//
// Performance (estimated, not measured: no device was available). Size A, float: 86 items of
// <= 16 KB per call (7 per layer); a block streams the ~1.2 MB of weights from L2 with 64 KB of
// copies in flight, ~10 us at an SM's L2 bandwidth (~64 B/clk at ~1.9 GHz), while the per-item
// work (four 16-byte copies, 16 FMAs per thread at one image per block, two barriers) stays
// below the ~256 clk an item takes to arrive. Up to one wave (N <= 132 on an H200) runs one image
// per block, every block streaming the weights from L2 in parallel: ~10-15 us per call at N = 1
// and 16; N = 256 runs two images per block, ~15 us.
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_pipeline.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <tuple>

#include "common.cuh"

namespace {

using namespace aelearn::cuda;

constexpr int kWarps = kThreads / 32;
constexpr int kColMicro = 4;                          // columns per lane of a column block
constexpr int kColBlock = 32 * kColMicro;             // columns of a warp
constexpr int kMaxTileCols = kWarps * kColBlock;      // columns of a tile
constexpr int kGateChannels = kMaxTileCols / 2;       // gate channels of a Gate tile
constexpr int kStages = 5;                            // ring slots: kStages - 1 items in flight
constexpr int kStageBytes = 16 * 1024;                // weights per item (at least)
constexpr int kMaxRows = 8;

template <typename scalar_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));  // elements per 16-byte packet

static_assert(kStageBytes / static_cast<int>(sizeof(double)) >= kMaxTileCols, "an item holds a row of any tile");

// Pointers and sizes of one call; by value in the launch's constant bank.
template <typename scalar_t>
struct StepArgs {
  const scalar_t* x_row;     // [N, W, F]
  const scalar_t* h_row;     // [L, N, W, C]
  const scalar_t* v_row;     // [L, N, W, 2C]
  const scalar_t* w_in;      // [kw, F, 2C]
  const scalar_t* w_hidden;  // [L - 1, kw, C, 2C]
  const scalar_t* w_res;     // [L, C, C]
  const scalar_t* b_res;     // [L, C]
  const scalar_t* w_skip;    // [L, C, S]
  const scalar_t* b_skip;    // [S]
  const scalar_t* w_out1;    // [S, M]
  const scalar_t* b_out1;    // [M]
  const scalar_t* w_out2;    // [M, O]
  const scalar_t* b_out2;    // [O]
  scalar_t* logits;          // [N, O]
  scalar_t* h_col;           // [L, N, C]
  int64_t images;            // N
  int width;                 // W
  int features;              // F
  int channels;              // C
  int layers;                // L
  int skips;                 // S
  int hidden;                // M
  int outputs;               // O
  int taps;                  // kw
  int col;                   // j
  int first_tap;             // max(0, kw - 1 - j): taps before it lie left of column 0
  int stage_elems;           // capacity of an item, a multiple of kVec
};

// Offsets (in elements) of the shared-memory arrays; the same function sizes the launch. A ring
// slot holds stage_elems + kVec elements: an item plus its alignment shift.
struct SharedLayout {
  int64_t ring;      // [kStages][stage_elems + kVec]
  int64_t partial;   // [slices][rows][tile width] partial sums of a tile
  int64_t inputs;    // [kw max(F, C)][rows] Gate input: window taps, then h_{l-1} at (kw - 1) C
  int64_t vertical;  // [rows][2C] v_row of the current layer
  int64_t gates;     // [C][rows] g_l
  int64_t skip;      // [S][rows] s (relu(s) after the last layer)
  int64_t head;      // [M][rows] relu(relu(s) w_out1 + b_out1)
  int64_t total;
};

__host__ __device__ inline SharedLayout shared_layout(int64_t rows, int64_t stage_elems, int64_t vec, int64_t taps,
                                                      int64_t features, int64_t channels, int64_t skips,
                                                      int64_t hidden) {
  SharedLayout layout{};
  layout.ring = 0;
  layout.partial = layout.ring + kStages * (stage_elems + vec);
  layout.inputs = layout.partial + rows * kMaxTileCols;
  layout.vertical = layout.inputs + taps * std::max(features, channels) * rows;
  layout.gates = layout.vertical + rows * 2 * channels;
  layout.skip = layout.gates + channels * rows;
  layout.head = layout.skip + skips * rows;
  layout.total = layout.head + hidden * rows;
  return layout;
}

enum class Segment : int { Inputs, Gate, Residual, Skip, Hidden, Logits, End };

// Position in the item sequence of one call:
//   for l < L: Inputs(l), Gate(l), Residual(l), Skip(l) tiles;  then Hidden, Logits tiles.
// Within a tile, items cover rows [k_begin, k_end) in steps of rows_per_item(); a tile whose
// product has no rows (e.g. F = 0) still gets one empty item, which runs its epilogue. Every
// thread advances its cursors identically, so all branches on them are block-uniform.
template <typename scalar_t>
struct StreamCursor {
  Segment segment;
  int layer;
  int tile;
  int k0;

  // Columns of the product (Gate: 2C, tanh half then sigmoid half).
  __device__ int product_width(const StepArgs<scalar_t>& a) const {
    switch (segment) {
      case Segment::Gate: return 2 * a.channels;
      case Segment::Residual: return a.channels;
      case Segment::Skip: return a.skips;
      case Segment::Hidden: return a.hidden;
      case Segment::Logits: return a.outputs;
      default: return 0;
    }
  }
  __device__ int num_tiles(const StepArgs<scalar_t>& a) const {
    return segment == Segment::Inputs ? 1 : static_cast<int>(ceil_div(product_width(a), kMaxTileCols));
  }
  __device__ int tile_width(const StepArgs<scalar_t>& a) const {
    return segment == Segment::Gate ? 2 * min(kGateChannels, a.channels - tile * kGateChannels)
                                    : min(kMaxTileCols, product_width(a) - tile * kMaxTileCols);
  }
  // A single tile spans whole rows of its matrix: an item is one contiguous run of weights.
  __device__ bool contiguous(const StepArgs<scalar_t>& a) const { return num_tiles(a) == 1; }
  // Width of one window tap of the Gate input: F at layer 0, C above.
  __device__ int tap_width(const StepArgs<scalar_t>& a) const { return layer == 0 ? a.features : a.channels; }
  __device__ int k_begin(const StepArgs<scalar_t>& a) const {
    return segment == Segment::Gate ? a.first_tap * tap_width(a) : 0;
  }
  __device__ int k_end(const StepArgs<scalar_t>& a) const {
    switch (segment) {
      case Segment::Gate: return a.taps * tap_width(a);
      case Segment::Residual:
      case Segment::Skip: return a.channels;
      case Segment::Hidden: return a.skips;
      case Segment::Logits: return a.hidden;
      default: return 0;
    }
  }
  __device__ int rows_per_item(const StepArgs<scalar_t>& a) const { return a.stage_elems / tile_width(a); }
  __device__ int item_rows(const StepArgs<scalar_t>& a) const { return min(rows_per_item(a), k_end(a) - k0); }
  __device__ bool last_of_tile(const StepArgs<scalar_t>& a) const { return k0 + rows_per_item(a) >= k_end(a); }

  __device__ void start() {
    segment = Segment::Inputs;
    layer = 0;
    tile = 0;
    k0 = 0;
  }

  __device__ void advance(const StepArgs<scalar_t>& a) {
    if (segment != Segment::Inputs) {
      k0 += rows_per_item(a);
      if (k0 < k_end(a)) {
        return;
      }
      if (++tile < num_tiles(a)) {
        k0 = k_begin(a);
        return;
      }
    }
    // Products without columns (C, S, M or O of 0) are skipped.
    do {
      next_segment(a);
    } while (segment != Segment::End && num_tiles(a) == 0);
    tile = 0;
    k0 = k_begin(a);
  }

 private:
  __device__ void next_segment(const StepArgs<scalar_t>& a) {
    switch (segment) {
      case Segment::Inputs: segment = Segment::Gate; break;
      case Segment::Gate: segment = Segment::Residual; break;
      case Segment::Residual: segment = Segment::Skip; break;
      case Segment::Skip:
        if (layer + 1 < a.layers) {
          ++layer;
          segment = Segment::Inputs;
        } else {
          segment = Segment::Hidden;
        }
        break;
      case Segment::Hidden: segment = Segment::Logits; break;
      default: segment = Segment::End; break;
    }
  }
};

// Address of weight (k, c) of the cursor's tile: row k of the product's matrix, tile column c.
template <typename scalar_t>
__device__ __forceinline__ const scalar_t* weight_address(const StepArgs<scalar_t>& a, const StreamCursor<scalar_t>& at,
                                                          int tile_width, int k, int c) {
  const int64_t column0 = static_cast<int64_t>(at.tile) * kMaxTileCols;
  switch (at.segment) {
    case Segment::Gate: {
      const int64_t two_c = 2 * static_cast<int64_t>(a.channels);
      const scalar_t* matrix = at.layer == 0
                                   ? a.w_in
                                   : a.w_hidden + static_cast<int64_t>(at.layer - 1) * a.taps * a.channels * two_c;
      const int half = tile_width / 2;
      const int64_t channel0 = static_cast<int64_t>(at.tile) * kGateChannels;
      const int64_t column = c < half ? channel0 + c : a.channels + channel0 + (c - half);
      return matrix + k * two_c + column;
    }
    case Segment::Residual:
      return a.w_res + (static_cast<int64_t>(at.layer) * a.channels + k) * a.channels + column0 + c;
    case Segment::Skip: return a.w_skip + (static_cast<int64_t>(at.layer) * a.channels + k) * a.skips + column0 + c;
    case Segment::Hidden: return a.w_out1 + static_cast<int64_t>(k) * a.hidden + column0 + c;
    default: return a.w_out2 + static_cast<int64_t>(k) * a.outputs + column0 + c;
  }
}

// Offset within its slot of a contiguous item: the source's alignment phase (in elements) modulo
// a 16-byte packet, so that slot and source packets line up; 0 for other items.
template <typename scalar_t>
__device__ __forceinline__ int item_shift(const StepArgs<scalar_t>& a, const StreamCursor<scalar_t>& at) {
  if (at.segment == Segment::Inputs || !at.contiguous(a)) {
    return 0;
  }
  const auto address = reinterpret_cast<uintptr_t>(weight_address(a, at, at.tile_width(a), at.k0, 0));
  return static_cast<int>((address / sizeof(scalar_t)) % kVec<scalar_t>);
}

// Starts the asynchronous copies of item `at` into `slot` (16-byte aligned; the caller commits
// the group). Inputs item: [kRows][tap_len] window taps of the block's images, then [kRows][2C]
// v_row; rows past N are not copied (their consumer writes zeros). Product item: its weights
// [item_rows][tile_width] from slot + item_shift.
template <typename scalar_t, int kRows>
__device__ __forceinline__ void copy_item(const StepArgs<scalar_t>& a, const StreamCursor<scalar_t>& at,
                                          int64_t image0, int rows_here, scalar_t* slot) {
  constexpr int kSize = sizeof(scalar_t);
  if (at.segment == Segment::Inputs) {
    const int taps_here = at.layer == 0 ? a.taps - a.first_tap : a.taps - 1 - a.first_tap;
    const int tap_len = taps_here * at.tap_width(a);
    const int64_t window0 = a.col - a.taps + 1 + a.first_tap;  // first column read, >= 0
    for (int e = threadIdx.x; e < rows_here * tap_len; e += kThreads) {
      const int r = e / tap_len;
      const int k = e % tap_len;
      const int64_t image = image0 + r;
      const scalar_t* src =
          at.layer == 0
              ? a.x_row + (image * a.width + window0) * a.features + k
              : a.h_row + ((static_cast<int64_t>(at.layer - 1) * a.images + image) * a.width + window0) * a.channels + k;
      __pipeline_memcpy_async(slot + r * tap_len + k, src, kSize);
    }
    const int two_c = 2 * a.channels;
    for (int e = threadIdx.x; e < rows_here * two_c; e += kThreads) {
      const int r = e / two_c;
      const int o = e % two_c;
      const int64_t image = image0 + r;
      const scalar_t* src = a.v_row + ((static_cast<int64_t>(at.layer) * a.images + image) * a.width + a.col) * two_c + o;
      __pipeline_memcpy_async(slot + kRows * tap_len + r * two_c + o, src, kSize);
    }
    return;
  }
  const int tile_width = at.tile_width(a);
  const int count = at.item_rows(a) * tile_width;
  if (at.contiguous(a)) {
    // Single elements up to the first packet boundary, whole packets, then the remainder.
    const scalar_t* src = weight_address(a, at, tile_width, at.k0, 0);
    const int shift = item_shift(a, at);
    scalar_t* dst = slot + shift;
    const int tid = static_cast<int>(threadIdx.x);
    const int head = min(count, (kVec<scalar_t> - shift) % kVec<scalar_t>);
    const int packets = (count - head) / kVec<scalar_t>;
    const int tail = head + packets * kVec<scalar_t>;  // fewer than kVec elements follow
    if (tid < head) {
      __pipeline_memcpy_async(dst + tid, src + tid, kSize);
    }
    for (int p = tid; p < packets; p += kThreads) {
      __pipeline_memcpy_async(dst + head + p * kVec<scalar_t>, src + head + p * kVec<scalar_t>, 16);
    }
    if (tail + tid < count) {
      __pipeline_memcpy_async(dst + tail + tid, src + tail + tid, kSize);
    }
    return;
  }
  for (int e = threadIdx.x; e < count; e += kThreads) {
    const int row = e / tile_width;
    const int c = e % tile_width;
    __pipeline_memcpy_async(slot + e, weight_address(a, at, tile_width, at.k0 + row, c), kSize);
  }
}

__device__ __forceinline__ float tanh_of(float v) { return tanhf(v); }
__device__ __forceinline__ double tanh_of(double v) { return tanh(v); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t sigmoid(scalar_t v) {
  return scalar_t(1) / (scalar_t(1) + exp_of(-v));
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t relu(scalar_t v) {
  return v > scalar_t(0) ? v : scalar_t(0);
}

// Shared-memory arrays of a block, carved from the dynamic allocation by shared_layout.
template <typename scalar_t>
struct SharedArrays {
  scalar_t* ring;
  scalar_t* partial;
  scalar_t* inputs;
  scalar_t* vertical;
  scalar_t* gates;
  scalar_t* skip;
  scalar_t* head;
};

// Consumes an Inputs item: window taps into inputs[k][r] (k from first_tap * tap width), v_row
// into vertical[r][o]; rows past N get zeros, which keep their (unwritten) results finite.
template <typename scalar_t, int kRows>
__device__ __forceinline__ void consume_inputs(const StepArgs<scalar_t>& a, const StreamCursor<scalar_t>& at,
                                               int rows_here, const scalar_t* slot, const SharedArrays<scalar_t>& s) {
  const int taps_here = at.layer == 0 ? a.taps - a.first_tap : a.taps - 1 - a.first_tap;
  const int tap_len = taps_here * at.tap_width(a);
  const int k_first = a.first_tap * at.tap_width(a);
  for (int e = threadIdx.x; e < kRows * tap_len; e += kThreads) {
    const int r = e / tap_len;
    const int k = e % tap_len;
    s.inputs[(k_first + k) * kRows + r] = r < rows_here ? slot[r * tap_len + k] : scalar_t(0);
  }
  const int two_c = 2 * a.channels;
  for (int e = threadIdx.x; e < kRows * two_c; e += kThreads) {
    const int r = e / two_c;
    s.vertical[e] = r < rows_here ? slot[kRows * tap_len + e] : scalar_t(0);
  }
}

// Column blocks of a tile and the row slices its warps split the items into.
struct TileSplit {
  int blocks;
  int slices;
};

__device__ __forceinline__ TileSplit tile_split(int tile_width) {
  const int blocks = max(1, static_cast<int>(ceil_div(tile_width, kColBlock)));
  return {blocks, kWarps / blocks};
}

// Sum over slices, in slice order, of the partial sums of (image r, tile column c).
template <typename scalar_t, int kRows>
__device__ __forceinline__ scalar_t tile_sum(const scalar_t* partial, int slices, int tile_width, int r, int c) {
  scalar_t sum = partial[r * tile_width + c];
  for (int slice = 1; slice < slices; ++slice) {
    sum += partial[(slice * kRows + r) * tile_width + c];
  }
  return sum;
}

// The epilogue of a finished tile, one thread per (image, output): gate, residual and skip
// updates, head activations or logits.
template <typename scalar_t, int kRows>
__device__ __forceinline__ void finish_tile(const StepArgs<scalar_t>& a, const StreamCursor<scalar_t>& at,
                                            int64_t image0, int rows_here, const SharedArrays<scalar_t>& s) {
  const int tile_width = at.tile_width(a);
  const int slices = tile_split(tile_width).slices;
  if (at.segment == Segment::Gate) {
    // a_l = dot + v_row; g = tanh(a[c]) sigmoid(a[C + c]) for the tile's channels.
    const int half = tile_width / 2;
    const int channel0 = at.tile * kGateChannels;
    for (int e = threadIdx.x; e < kRows * half; e += kThreads) {
      const int r = e / half;
      const int c = e % half;
      const scalar_t* v = s.vertical + r * 2 * a.channels;
      const scalar_t tanh_part = tile_sum<scalar_t, kRows>(s.partial, slices, tile_width, r, c) + v[channel0 + c];
      const scalar_t sigmoid_part =
          tile_sum<scalar_t, kRows>(s.partial, slices, tile_width, r, half + c) + v[a.channels + channel0 + c];
      s.gates[(channel0 + c) * kRows + r] = tanh_of(tanh_part) * sigmoid(sigmoid_part);
    }
    return;
  }
  for (int e = threadIdx.x; e < kRows * tile_width; e += kThreads) {
    const int r = e / tile_width;
    const int c = e % tile_width;
    const int column = at.tile * kMaxTileCols + c;
    const scalar_t dot = tile_sum<scalar_t, kRows>(s.partial, slices, tile_width, r, c);
    switch (at.segment) {
      case Segment::Residual: {
        // h_l = [l > 0] h_{l-1} + (g w_res + b_res), in place of h_{l-1} (the next Gate input).
        scalar_t& h = s.inputs[((a.taps - 1) * a.channels + column) * kRows + r];
        const scalar_t update = dot + a.b_res[static_cast<int64_t>(at.layer) * a.channels + column];
        h = at.layer == 0 ? update : h + update;
        if (r < rows_here) {
          a.h_col[(static_cast<int64_t>(at.layer) * a.images + image0 + r) * a.channels + column] = h;
        }
        break;
      }
      case Segment::Skip: {
        scalar_t& skip = s.skip[column * kRows + r];
        skip += dot;
        if (at.layer == a.layers - 1) {
          skip = relu(skip);  // only relu(s) is read from here on (the Hidden input)
        }
        break;
      }
      case Segment::Hidden: s.head[column * kRows + r] = relu(dot + a.b_out1[column]); break;
      default:
        if (r < rows_here) {
          a.logits[(image0 + r) * a.outputs + column] = dot + a.b_out2[column];
        }
        break;
    }
  }
}

// One step for images [blockIdx.x kRows, + kRows): the whole item sequence of StreamCursor.
template <typename scalar_t, int kRows>
__global__ void __launch_bounds__(kThreads) pixelcnn_step_kernel(const __grid_constant__ StepArgs<scalar_t> a) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  scalar_t* const base = reinterpret_cast<scalar_t*>(shared_bytes);
  const SharedLayout layout = shared_layout(kRows, a.stage_elems, kVec<scalar_t>, a.taps, a.features, a.channels,
                                            a.skips, a.hidden);
  const SharedArrays<scalar_t> s{base + layout.ring,     base + layout.partial, base + layout.inputs,
                                 base + layout.vertical, base + layout.gates,   base + layout.skip,
                                 base + layout.head};
  const int slot_elems = a.stage_elems + kVec<scalar_t>;
  const int64_t image0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int rows_here = static_cast<int>(std::min<int64_t>(kRows, a.images - image0));
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  for (int e = threadIdx.x; e < a.skips * kRows; e += kThreads) {
    s.skip[e] = a.b_skip[e / kRows];  // s starts at b_skip; read after the first barrier below
  }

  StreamCursor<scalar_t> copy_at;
  copy_at.start();
  for (int stage = 0; stage < kStages - 1; ++stage) {
    if (copy_at.segment != Segment::End) {
      copy_item<scalar_t, kRows>(a, copy_at, image0, rows_here, s.ring + stage * slot_elems);
      copy_at.advance(a);
    }
    __pipeline_commit();  // one group per item, empty past the end, so the wait count holds
  }

  scalar_t acc[kRows][kColMicro] = {};
  StreamCursor<scalar_t> at;
  at.start();
  for (int item = 0; at.segment != Segment::End; ++item) {
    __pipeline_wait_prior(kStages - 2);  // this thread's copies of `item` have landed
    __syncthreads();  // everyone's copies have landed and everyone has finished item - 1
    if (copy_at.segment != Segment::End) {
      // Into the slot of item - 1, which no thread reads any more.
      copy_item<scalar_t, kRows>(a, copy_at, image0, rows_here, s.ring + ((item + kStages - 1) % kStages) * slot_elems);
      copy_at.advance(a);
    }
    __pipeline_commit();
    const scalar_t* slot = s.ring + (item % kStages) * slot_elems;

    if (at.segment == Segment::Inputs) {
      consume_inputs<scalar_t, kRows>(a, at, rows_here, slot, s);
      at.advance(a);
      continue;
    }
    const scalar_t* input = at.segment == Segment::Gate                                        ? s.inputs
                            : at.segment == Segment::Residual || at.segment == Segment::Skip ? s.gates
                            : at.segment == Segment::Hidden                                      ? s.skip
                                                                                                 : s.head;
    const scalar_t* weights = slot + item_shift(a, at);
    const int tile_width = at.tile_width(a);
    const TileSplit split = tile_split(tile_width);
    const int slice = warp / split.blocks;
    const int column0 = (warp % split.blocks) * kColBlock + lane;
    const int rows = slice < split.slices ? at.item_rows(a) : 0;  // warps past the slices idle
    for (int k = slice; k < rows; k += split.slices) {
      scalar_t x[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        x[r] = input[(at.k0 + k) * kRows + r];  // the same address across the block: broadcast
      }
#pragma unroll
      for (int j = 0; j < kColMicro; ++j) {
        const int c = column0 + 32 * j;
        if (c < tile_width) {
          const scalar_t w = weights[k * tile_width + c];
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            acc[r][j] = fma(x[r], w, acc[r][j]);
          }
        }
      }
    }
    if (at.last_of_tile(a)) {
      if (slice < split.slices) {
#pragma unroll
        for (int j = 0; j < kColMicro; ++j) {
          const int c = column0 + 32 * j;
          if (c < tile_width) {
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
              s.partial[(slice * kRows + r) * tile_width + c] = acc[r][j];
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int j = 0; j < kColMicro; ++j) {
          acc[r][j] = 0;
        }
      }
      __syncthreads();
      // The next write of the partial sums follows at least one loop barrier.
      finish_tile<scalar_t, kRows>(a, at, image0, rows_here, s);
    }
    at.advance(a);
  }
}

void check_tensor(const at::Tensor& t, const at::Tensor& x_row, const char* name, at::IntArrayRef expected,
                  const char* meaning) {
  TORCH_CHECK(t.is_cuda() && t.device() == x_row.device(), "pixelcnn_step (CUDA): ", name,
              " must be a CUDA tensor on x_row's device (", x_row.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == x_row.scalar_type(), "pixelcnn_step (CUDA): ", name, " must have x_row's dtype (",
              x_row.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == expected, "pixelcnn_step (CUDA): ", name, " must have shape [", meaning, "] = ", expected,
              ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "pixelcnn_step (CUDA): ", name, " must be contiguous");
}

template <typename scalar_t, int kRows>
void launch_step(const StepArgs<scalar_t>& args, int64_t shared_bytes, cudaStream_t stream) {
  const auto kernel = pixelcnn_step_kernel<scalar_t, kRows>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(shared_bytes)));
  const unsigned blocks = static_cast<unsigned>(ceil_div(args.images, kRows));
  kernel<<<blocks, kThreads, static_cast<size_t>(shared_bytes), stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> pixelcnn_step_cuda(
    const at::Tensor& x_row, const at::Tensor& h_row, const at::Tensor& v_row, int64_t col, const at::Tensor& w_in,
    const at::Tensor& w_hidden, const at::Tensor& w_res, const at::Tensor& b_res, const at::Tensor& w_skip,
    const at::Tensor& b_skip, const at::Tensor& w_out1, const at::Tensor& b_out1, const at::Tensor& w_out2,
    const at::Tensor& b_out2) {
  TORCH_CHECK(x_row.is_cuda(), "pixelcnn_step (CUDA): x_row must be a CUDA tensor, got ", x_row.device());
  TORCH_CHECK(x_row.scalar_type() == at::kFloat || x_row.scalar_type() == at::kDouble,
              "pixelcnn_step (CUDA): x_row must be float32 or float64, got ", x_row.scalar_type());
  TORCH_CHECK(x_row.dim() == 3, "pixelcnn_step (CUDA): x_row must have shape [N, W, F], got ", x_row.sizes());
  TORCH_CHECK(w_res.dim() == 3 && w_res.size(0) >= 1 && w_res.size(1) == w_res.size(2),
              "pixelcnn_step (CUDA): w_res must have shape [L, C, C] with L >= 1, got ", w_res.sizes());
  TORCH_CHECK(w_in.dim() == 3 && w_in.size(0) >= 1,
              "pixelcnn_step (CUDA): w_in must have shape [kw, F, 2C] with kw >= 1, got ", w_in.sizes());
  TORCH_CHECK(b_skip.dim() == 1, "pixelcnn_step (CUDA): b_skip must have shape [S], got ", b_skip.sizes());
  TORCH_CHECK(b_out1.dim() == 1, "pixelcnn_step (CUDA): b_out1 must have shape [M], got ", b_out1.sizes());
  TORCH_CHECK(b_out2.dim() == 1, "pixelcnn_step (CUDA): b_out2 must have shape [O], got ", b_out2.sizes());
  const int64_t images = x_row.size(0);
  const int64_t width = x_row.size(1);
  const int64_t features = x_row.size(2);
  const int64_t layers = w_res.size(0);
  const int64_t channels = w_res.size(1);
  const int64_t taps = w_in.size(0);
  const int64_t skips = b_skip.size(0);
  const int64_t hidden = b_out1.size(0);
  const int64_t outputs = b_out2.size(0);
  check_tensor(x_row, x_row, "x_row", {images, width, features}, "N, W, F");
  check_tensor(h_row, x_row, "h_row", {layers, images, width, channels}, "L, N, W, C");
  check_tensor(v_row, x_row, "v_row", {layers, images, width, 2 * channels}, "L, N, W, 2C");
  check_tensor(w_in, x_row, "w_in", {taps, features, 2 * channels}, "kw, F, 2C");
  check_tensor(w_hidden, x_row, "w_hidden", {layers - 1, taps, channels, 2 * channels}, "L - 1, kw, C, 2C");
  check_tensor(w_res, x_row, "w_res", {layers, channels, channels}, "L, C, C");
  check_tensor(b_res, x_row, "b_res", {layers, channels}, "L, C");
  check_tensor(w_skip, x_row, "w_skip", {layers, channels, skips}, "L, C, S");
  check_tensor(b_skip, x_row, "b_skip", {skips}, "S");
  check_tensor(w_out1, x_row, "w_out1", {skips, hidden}, "S, M");
  check_tensor(b_out1, x_row, "b_out1", {hidden}, "M");
  check_tensor(w_out2, x_row, "w_out2", {hidden, outputs}, "M, O");
  check_tensor(b_out2, x_row, "b_out2", {outputs}, "O");
  TORCH_CHECK(0 <= col && col < width, "pixelcnn_step (CUDA): col must be in [0, W = ", width, "), got ", col);
  // Sizes and in-block offsets are int in the kernel.
  constexpr int64_t kMaxSize = int64_t{1} << 24;
  for (const int64_t size : {width, features, channels, layers, skips, hidden, outputs, taps}) {
    TORCH_CHECK(size <= kMaxSize, "pixelcnn_step (CUDA): every size (W, F, C, L, S, M, O, kw) must be at most 2^24, got ",
                size);
  }

  const c10::cuda::CUDAGuard guard(x_row.device());
  at::Tensor logits = at::empty({images, outputs}, x_row.options());
  at::Tensor h_col = at::empty({layers, images, channels}, x_row.options());
  if (images == 0) {
    return {logits, h_col};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = x_row.get_device();

  AT_DISPATCH_FLOATING_TYPES(x_row.scalar_type(), "pixelcnn_step_cuda", [&] {
    // Fewest images per block that keep the grid within one wave: at small N every block streams
    // the weights at its SM's L2 bandwidth whatever its image count, so more blocks finish sooner.
    const int64_t sms = multiprocessor_count(device);
    int rows = kMaxRows;
    for (const int candidate : {1, 2, 4}) {
      if (ceil_div(images, candidate) <= sms) {
        rows = candidate;
        break;
      }
    }
    int max_shared = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const auto bytes_for = [&](int candidate, int64_t stage_elems) {
      return static_cast<int64_t>(sizeof(scalar_t)) *
             shared_layout(candidate, stage_elems, kVec<scalar_t>, taps, features, channels, skips, hidden).total;
    };
    // An item holds at least kStageBytes of weights (whole tile rows, as tiles are at most
    // kMaxTileCols wide) and one Inputs item: the window taps and v_row of every image of the block.
    const auto stage_for = [&](int candidate) {
      const int64_t elems = std::max<int64_t>(kStageBytes / static_cast<int64_t>(sizeof(scalar_t)),
                                              candidate * (taps * std::max(features, channels) + 2 * channels));
      return ceil_div(elems, kVec<scalar_t>) * kVec<scalar_t>;
    };
    while (rows > 1 && bytes_for(rows, stage_for(rows)) > max_shared) {
      rows /= 2;
    }
    const int64_t stage_elems = stage_for(rows);
    const int64_t shared_bytes = bytes_for(rows, stage_elems);
    TORCH_CHECK(shared_bytes <= max_shared, "pixelcnn_step (CUDA): the sizes need ", shared_bytes,
                " bytes of shared memory per block, more than the device's ", max_shared,
                " (C, F, kw, S or M too large for this backend)");

    StepArgs<scalar_t> args{};
    args.x_row = x_row.data_ptr<scalar_t>();
    args.h_row = h_row.data_ptr<scalar_t>();
    args.v_row = v_row.data_ptr<scalar_t>();
    args.w_in = w_in.data_ptr<scalar_t>();
    args.w_hidden = w_hidden.data_ptr<scalar_t>();
    args.w_res = w_res.data_ptr<scalar_t>();
    args.b_res = b_res.data_ptr<scalar_t>();
    args.w_skip = w_skip.data_ptr<scalar_t>();
    args.b_skip = b_skip.data_ptr<scalar_t>();
    args.w_out1 = w_out1.data_ptr<scalar_t>();
    args.b_out1 = b_out1.data_ptr<scalar_t>();
    args.w_out2 = w_out2.data_ptr<scalar_t>();
    args.b_out2 = b_out2.data_ptr<scalar_t>();
    args.logits = logits.data_ptr<scalar_t>();
    args.h_col = h_col.data_ptr<scalar_t>();
    args.images = images;
    args.width = static_cast<int>(width);
    args.features = static_cast<int>(features);
    args.channels = static_cast<int>(channels);
    args.layers = static_cast<int>(layers);
    args.skips = static_cast<int>(skips);
    args.hidden = static_cast<int>(hidden);
    args.outputs = static_cast<int>(outputs);
    args.taps = static_cast<int>(taps);
    args.col = static_cast<int>(col);
    args.first_tap = static_cast<int>(std::max<int64_t>(0, taps - 1 - col));
    args.stage_elems = static_cast<int>(stage_elems);
    switch (rows) {
      case 1: launch_step<scalar_t, 1>(args, shared_bytes, stream); break;
      case 2: launch_step<scalar_t, 2>(args, shared_bytes, stream); break;
      case 4: launch_step<scalar_t, 4>(args, shared_bytes, stream); break;
      default: launch_step<scalar_t, 8>(args, shared_bytes, stream); break;
    }
  });
  return {logits, h_col};
}

}  // namespace

TORCH_LIBRARY_IMPL(aelearn, CUDA, m) {
  m.impl("pixelcnn_step", &pixelcnn_step_cuda);
}
