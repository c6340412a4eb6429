// CPU kernel of aelearn::pixelcnn_step (schema and contract in ../pixelcnn.cpp; the wrapper, the
// reference and the model in aelearn/ops/pixelcnn.py and aelearn/models/pixelcnn.py).
//
// The step is a chain of small matrix products over a batch of rows (images): per layer
// [rows, kw C] x [kw C, 2C] for the gate pre-activations, the gated activation, then
// [rows, C] x [C, C] (residual) and [rows, C] x [C, S] (skip), and two output layers at the end.
// Decoding calls it once per pixel at small batches, so it is organised for the per-call cost:
//   * Work split: the images are split into one contiguous range per thread, and each thread runs
//     the whole L-layer chain for its rows, in chunks of at most kRows rows: no barrier between
//     layers, one parallel region per call (none when the call is too small to pay for threads).
//     A row's arithmetic does not depend on the chunk or thread it falls in, so the results are
//     the same bit for bit whatever the number of threads.
//   * Products: a register tile of kRows rows x kColVectors vectors of output channels
//     (add_dot_tile, distance_tiles.h) reads each weight vector once per chunk, straight from the
//     contract's [in, out] layouts (no packing: the weights are read in place on every call), and
//     broadcasts the rows' values from their own strided storage (x_row, h_row, h_col or the
//     thread's buffers). The kw taps of a layer are one tile pass over kw operands; taps left of
//     column 0 are skipped (zero padding). Output channels past the last whole vector are summed
//     by a scalar loop in the same order.
//   * Sums of a layer are accumulated from zero in the input dtype, then added to their starting
//     value (v_row, a bias, the skip sum) and to the residual stream, in the reference's order:
//     the residual stream and the skip sum grow through the layers, and adding a layer's update
//     to them once keeps their rounding errors from compounding inside the dot products.
//   * Gated activation, vectorised, from simd_exp.h's polynomial p for 2^f = 1 + f p(f) on
//     [-1/2, 1/2], after a reduction x = (k + f) ln 2 done in natural base (Cody-Waite), accurate
//     however large |x|: sigmoid(b) = 1 / (1 + e) or e / (1 + e) with e = exp(-|b|), and
//     tanh(|a|) = -m / (2 + m) with m = expm1(-2 |a|) = 2^k f p(f) + (2^k - 1), accurate near 0
//     too (1 - exp(-2 |a|), or 2 sigmoid(2a) - 1, would cancel there). Measured: at most 4.2 ulp
//     of tanh(a) sigmoid(b) in float32 and float64 (5 ulp in float64 on targets without FMA).
// Memory: the outputs and, per thread, buffers of kRows rows for the pre-activations, the gates,
// the skip sums and the output hidden layer (O(kRows (C + S + M)), whatever N).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "distance_tiles.h"

namespace {

using namespace aelearn::cpu;

constexpr const char* kOp = "pixelcnn_step (cpu)";

template <typename T>
struct StepTiling {
  static constexpr int kLanes = simd::kLanes<T>;
  // Register tile: kRows x kColVectors accumulators, kColVectors weight vectors and a broadcast
  // (12 x 2 + 3 of 32 registers, or 6 x 2 + 3 of 16). Each weight vector read serves kRows images;
  // the rows' broadcasts come from memory, one per row and step of the inner loop.
  static constexpr int kRows = simd::kVectorRegisters >= 32 ? 12 : 6;
  static constexpr int kColVectors = 2;
  static constexpr int kCols = kColVectors * kLanes;
};

// Calls body(std::integral_constant<int, count>{}) for a runtime count in [1, kMax]: the row and
// column counts of the register tiles are compile-time constants.
template <int kMax, typename Body>
inline void with_count(int count, Body&& body) {
  [&]<int... kIndex>(std::integer_sequence<int, kIndex...>) {
    (void)((count == kIndex + 1 ? (body(std::integral_constant<int, kIndex + 1>{}), true) : false) || ...);
  }(std::make_integer_sequence<int, kMax>{});
}

// One input of a product: rows [r * row_stride, + depth) times weights [depth, *] (row stride
// weight_stride), the weights' output columns starting at `weights`.
template <typename T>
struct Operand {
  const T* rows;
  int64_t row_stride;
  const T* weights;
  int64_t weight_stride;
  int64_t depth;
};

// Where a product goes: out[r, o] = act(sum + start[r, o] + residual[r, o]) for o < cols, with
// start's row stride 0 for a bias, residual optional (nullptr) and act the identity or relu.
template <typename T>
struct Target {
  T* out;
  int64_t out_stride;
  const T* start;
  int64_t start_stride;
  const T* residual;
  int64_t residual_stride;
  int64_t cols;
  bool relu;
};

// Output columns [col, col + kColVectors * kLanes) of kRows rows.
template <typename T, int kRows, int kColVectors>
void product_tile(const std::vector<Operand<T>>& operands, const Target<T>& target, int64_t col) {
  constexpr int kLanes = simd::kLanes<T>;
  Vec<T> sums[kRows][kColVectors] = {};
  for (const Operand<T>& operand : operands) {
    add_dot_tile<T, kRows, kColVectors>(operand.rows, operand.row_stride, 1, operand.weights + col,
                                        operand.weight_stride, operand.depth, sums);
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kColVectors; ++v) {
      const int64_t column = col + v * kLanes;
      Vec<T> value = sums[r][v] + simd::load(target.start + r * target.start_stride + column);
      if (target.residual != nullptr) value += simd::load(target.residual + r * target.residual_stride + column);
      if (target.relu) value = value > T(0) ? value : Vec<T>{};
      simd::store(target.out + r * target.out_stride + column, value);
    }
  }
}

// Output column `col` of kRows rows, one at a time (the channels past the last whole vector).
template <typename T, int kRows>
void product_column(const std::vector<Operand<T>>& operands, const Target<T>& target, int64_t col) {
  for (int r = 0; r < kRows; ++r) {
    T sum = T(0);
    for (const Operand<T>& operand : operands) {
      for (int64_t k = 0; k < operand.depth; ++k) {
        sum += operand.rows[r * operand.row_stride + k] * operand.weights[k * operand.weight_stride + col];
      }
    }
    T value = sum + target.start[r * target.start_stride + col];
    if (target.residual != nullptr) value += target.residual[r * target.residual_stride + col];
    if (target.relu) value = std::max(value, T(0));
    target.out[r * target.out_stride + col] = value;
  }
}

// The product of kRows rows: whole tiles, then the remaining whole vectors in one narrower tile,
// then the remaining columns one by one.
template <typename T, int kRows>
void multiply_rows(const std::vector<Operand<T>>& operands, const Target<T>& target) {
  using Tiles = StepTiling<T>;
  int64_t col = 0;
  for (; col + Tiles::kCols <= target.cols; col += Tiles::kCols) {
    product_tile<T, kRows, Tiles::kColVectors>(operands, target, col);
  }
  const int vectors = static_cast<int>((target.cols - col) / Tiles::kLanes);
  if (vectors > 0) {
    with_count<Tiles::kColVectors - 1>(
        vectors, [&](auto count) { product_tile<T, kRows, decltype(count)::value>(operands, target, col); });
    col += vectors * Tiles::kLanes;
  }
  for (; col < target.cols; ++col) product_column<T, kRows>(operands, target, col);
}

// ln 2 split in two (Cody and Waite): the high part has enough trailing zero bits that k ln2_high is
// exact for every exponent k of the dtype, so x - k ln 2 is computed to about the dtype's precision
// even where x is large.
template <typename T>
struct Ln2Split;

template <>
struct Ln2Split<float> {
  static constexpr float kHigh = 0.693359375f;
  static constexpr float kLow = -2.12194440e-4f;
};

template <>
struct Ln2Split<double> {
  static constexpr double kHigh = 6.93147180369123816490e-01;
  static constexpr double kLow = 1.90821492927058770002e-10;
};

// x = (k + f) ln 2 for x <= 0, lane by lane, with k = round(x log2(e)) and f = (x - k ln 2) log2(e)
// in about [-1/2, 1/2], accurate to an ulp of f: 2^f then comes from simd_exp.h's polynomial, and
// exp(x) = 2^k 2^f is accurate to a few ulp however large |x| (scaling x log2(e) as a whole, as
// exp2_nonpositive's callers do, would leave a relative error of |x| ulp). x is clamped where 2^k
// would leave the normal range: exp(x) < 2^-125 there, and the activations below only add it to 1
// or return it (an absolute error below 2^-125).
template <typename T>
struct ExpReduction {
  Vec<T> f;
  Vec<T> two_to_k;
};

template <typename T>
inline ExpReduction<T> reduce_exp(Vec<T> x) {
  using Constants = simd::Exp2Constants<T>;
  using Bits = VecBits<T>;
  constexpr T kLowest = static_cast<T>((Constants::kMinExponent + 1) * 0.69314718055994530942);
  x = x < kLowest ? simd::splat<T>(kLowest) : x;
  // rounded = 1.5 * 2^(mantissa bits) + k exactly: its low bits are k in two's complement.
  const Vec<T> rounded = x * static_cast<T>(simd::kLog2e) + Constants::kRoundingShift;
  const Vec<T> k = rounded - Constants::kRoundingShift;
  const Vec<T> remainder = (x - k * Ln2Split<T>::kHigh) - k * Ln2Split<T>::kLow;
  constexpr simd::LaneInteger<T> kOneBits = simd::LaneInteger<T>{Constants::kExponentBias} << Constants::kMantissaBits;
  const Bits exponent = (reinterpret_cast<Bits>(rounded) << Constants::kMantissaBits) + kOneBits;
  return {remainder * static_cast<T>(simd::kLog2e), reinterpret_cast<Vec<T>>(exponent)};
}

// tanh(a) sigmoid(b), lane by lane:
//   sigmoid(b) = 1 / (1 + e) for b >= 0, e / (1 + e) for b < 0, with e = exp(-|b|);
//   tanh(|a|) = -m / (2 + m) with m = expm1(-2 |a|) = 2^k (2^f - 1) + (2^k - 1), where 2^f - 1 =
//   f p(f) is simd_exp.h's polynomial without its final + 1: relative error of a few ulp near 0 too,
//   where 1 - exp(-2 |a|) (or 2 sigmoid(2a) - 1) would cancel; 2^k - 1 is exact for the k that matter.
template <typename T>
inline Vec<T> gated_activation(Vec<T> a, Vec<T> b) {
  using Constants = simd::Exp2Constants<T>;
  const Vec<T> abs_a = a < T(0) ? -a : a;
  const ExpReduction<T> tanh_part = reduce_exp<T>(abs_a * T(-2));
  const Vec<T> f = tanh_part.f;
  Vec<T> polynomial = simd::splat<T>(Constants::kPoly[Constants::kDegree]);
  for (int power = Constants::kDegree - 1; power >= 0; --power) polynomial = polynomial * f + Constants::kPoly[power];
  const Vec<T> m = tanh_part.two_to_k * (polynomial * f) + (tanh_part.two_to_k - T(1));
  const Vec<T> tanh_abs = -m / (m + T(2));

  const Vec<T> abs_b = b < T(0) ? -b : b;
  const ExpReduction<T> sigmoid_part = reduce_exp<T>(-abs_b);
  const Vec<T> e = simd::exp2_reduced<T>(sigmoid_part.f) * sigmoid_part.two_to_k;
  const Vec<T> sigmoid = (b < T(0) ? e : simd::splat<T>(T(1))) / (e + T(1));
  return (a < T(0) ? -tanh_abs : tanh_abs) * sigmoid;
}

// The call's tensors as raw pointers, with their sizes.
template <typename T>
struct StepProblem {
  int64_t images, width, features, layers, channels, taps, skips, hidden, outputs, col;
  const T *x_row, *h_row, *v_row, *w_in, *w_hidden, *w_res, *b_res, *w_skip, *b_skip, *w_out1, *b_out1, *w_out2,
      *b_out2;
  T *logits, *h_col;
};

// One thread's buffers, for kRows images: the two halves of the gate pre-activations, the gates,
// the skip sums and the output hidden layer, rows padded to whole vectors. The padding is zero and
// never written, so that the vectorised activations read finite values there.
template <typename T>
struct Scratch {
  int64_t channel_stride, skip_stride, hidden_stride;
  std::vector<T> pre_tanh, pre_sigmoid, gate, skip, hidden;
  std::vector<Operand<T>> operands;

  explicit Scratch(const StepProblem<T>& p)
      : channel_stride(round_up(p.channels, simd::kLanes<T>)),
        skip_stride(round_up(p.skips, simd::kLanes<T>)),
        hidden_stride(round_up(p.hidden, simd::kLanes<T>)),
        pre_tanh(static_cast<size_t>(StepTiling<T>::kRows * channel_stride)),
        pre_sigmoid(static_cast<size_t>(StepTiling<T>::kRows * channel_stride)),
        gate(static_cast<size_t>(StepTiling<T>::kRows * channel_stride)),
        skip(static_cast<size_t>(StepTiling<T>::kRows * skip_stride)),
        hidden(static_cast<size_t>(StepTiling<T>::kRows * hidden_stride)) {
    operands.reserve(static_cast<size_t>(p.taps));
  }
};

// The gates of layer `layer` for kRows images from `first`: a = sum over the taps of the window +
// v_row[layer, :, col], the last tap of a layer > 0 being the previous layer's output at this
// column (in h_col); then tanh(a[:, :C]) sigmoid(a[:, C:]).
template <typename T, int kRows>
void gate_rows(const StepProblem<T>& p, int64_t layer, int64_t first, Scratch<T>& scratch) {
  constexpr int kLanes = simd::kLanes<T>;
  const int64_t c = p.channels;
  std::vector<Operand<T>>& operands = scratch.operands;
  operands.clear();
  for (int64_t tap = 0; tap < p.taps; ++tap) {
    const int64_t column = p.col - p.taps + 1 + tap;
    if (column < 0) continue;
    if (layer == 0) {
      operands.push_back({p.x_row + (first * p.width + column) * p.features, p.width * p.features,
                          p.w_in + tap * p.features * 2 * c, 2 * c, p.features});
      continue;
    }
    const T* weights = p.w_hidden + ((layer - 1) * p.taps + tap) * c * 2 * c;
    if (tap < p.taps - 1) {
      operands.push_back(
          {p.h_row + (((layer - 1) * p.images + first) * p.width + column) * c, p.width * c, weights, 2 * c, c});
    } else {
      operands.push_back({p.h_col + ((layer - 1) * p.images + first) * c, c, weights, 2 * c, c});
    }
  }
  const int64_t stride = scratch.channel_stride;
  const T* v = p.v_row + ((layer * p.images + first) * p.width + p.col) * 2 * c;
  const int64_t v_stride = p.width * 2 * c;
  multiply_rows<T, kRows>(operands, {scratch.pre_tanh.data(), stride, v, v_stride, nullptr, 0, c, false});
  for (Operand<T>& operand : operands) operand.weights += c;
  multiply_rows<T, kRows>(operands, {scratch.pre_sigmoid.data(), stride, v + c, v_stride, nullptr, 0, c, false});

  for (int64_t k = 0; k < kRows * stride; k += kLanes) {
    simd::store(scratch.gate.data() + k, gated_activation<T>(simd::load(scratch.pre_tanh.data() + k),
                                                             simd::load(scratch.pre_sigmoid.data() + k)));
  }
}

// From the gates of layer `layer`: h_col[layer] = [layer > 0] h_col[layer - 1] + g w_res + b_res,
// and the skip sums s += g w_skip (s = b_skip + g w_skip at layer 0).
template <typename T, int kRows>
void residual_and_skip_rows(const StepProblem<T>& p, int64_t layer, int64_t first, Scratch<T>& scratch) {
  const int64_t c = p.channels;
  std::vector<Operand<T>>& operands = scratch.operands;
  operands.assign(1, {scratch.gate.data(), scratch.channel_stride, p.w_res + layer * c * c, c, c});
  T* h = p.h_col + (layer * p.images + first) * c;
  const T* h_previous = layer > 0 ? h - p.images * c : nullptr;
  multiply_rows<T, kRows>(operands, {h, c, p.b_res + layer * c, 0, h_previous, c, c, false});

  operands.assign(1, {scratch.gate.data(), scratch.channel_stride, p.w_skip + layer * c * p.skips, p.skips, c});
  T* skip = scratch.skip.data();
  const bool first_layer = layer == 0;
  multiply_rows<T, kRows>(operands, {skip, scratch.skip_stride, first_layer ? p.b_skip : skip,
                                     first_layer ? 0 : scratch.skip_stride, nullptr, 0, p.skips, false});
}

// logits = relu(relu(s) w_out1 + b_out1) w_out2 + b_out2 for kRows images from `first`.
template <typename T, int kRows>
void logit_rows(const StepProblem<T>& p, int64_t first, Scratch<T>& scratch) {
  std::vector<Operand<T>>& operands = scratch.operands;
  for (T& value : scratch.skip) value = std::max(value, T(0));
  operands.assign(1, {scratch.skip.data(), scratch.skip_stride, p.w_out1, p.hidden, p.skips});
  multiply_rows<T, kRows>(operands,
                          {scratch.hidden.data(), scratch.hidden_stride, p.b_out1, 0, nullptr, 0, p.hidden, true});
  operands.assign(1, {scratch.hidden.data(), scratch.hidden_stride, p.w_out2, p.outputs, p.hidden});
  multiply_rows<T, kRows>(operands,
                          {p.logits + first * p.outputs, p.outputs, p.b_out2, 0, nullptr, 0, p.outputs, false});
}

// The whole chain for images [begin, end), in chunks of at most kRows images of sizes as equal as
// possible.
template <typename T>
void step_images(const StepProblem<T>& p, int64_t begin, int64_t end) {
  constexpr int kRows = StepTiling<T>::kRows;
  Scratch<T> scratch(p);
  const int64_t chunks = (end - begin + kRows - 1) / kRows;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t first = begin + (end - begin) * chunk / chunks;
    const int64_t last = begin + (end - begin) * (chunk + 1) / chunks;
    with_count<kRows>(static_cast<int>(last - first), [&](auto rows) {
      constexpr int kChunkRows = decltype(rows)::value;
      for (int64_t layer = 0; layer < p.layers; ++layer) {
        gate_rows<T, kChunkRows>(p, layer, first, scratch);
        residual_and_skip_rows<T, kChunkRows>(p, layer, first, scratch);
      }
      logit_rows<T, kChunkRows>(p, first, scratch);
    });
  }
}

// Multiply-adds of a call per thread started: below, the call runs on the calling thread alone
// (about 5 microseconds of work: a parallel region costs about a microsecond, and at one image
// per thread each thread reads every weight anyway).
constexpr int64_t kMinWorkPerThread = 200000;

template <typename T>
void run_step(const StepProblem<T>& p) {
  const int64_t image_work = p.layers * (p.taps * p.channels * 2 * p.channels + p.channels * (p.channels + p.skips)) +
                             p.skips * p.hidden + p.hidden * p.outputs;
  const int64_t threads =
      std::clamp<int64_t>(std::min(p.images * image_work / kMinWorkPerThread, p.images), 1, worker_threads());
  if (threads == 1) {
    step_images(p, 0, p.images);
    return;
  }
#pragma omp parallel for schedule(static, 1) num_threads(static_cast<int>(threads))
  for (int64_t thread = 0; thread < threads; ++thread) {
    step_images(p, p.images * thread / threads, p.images * (thread + 1) / threads);
  }
}

void check_argument(const at::Tensor& tensor, const char* name, at::IntArrayRef shape, const char* meaning,
                    const at::Tensor& x_row) {
  TORCH_CHECK(tensor.sizes() == shape, kOp, ": ", name, " must have shape [", meaning, "] = ", shape, ", got ",
              tensor.sizes());
  TORCH_CHECK(tensor.device().is_cpu(), kOp, ": ", name, " must be a CPU tensor, got ", tensor.device());
  TORCH_CHECK(tensor.scalar_type() == x_row.scalar_type(), kOp, ": ", name, " must have x_row's dtype ",
              x_row.scalar_type(), ", got ", tensor.scalar_type());
  TORCH_CHECK(tensor.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> pixelcnn_step_cpu(const at::Tensor& x_row, const at::Tensor& h_row,
                                                     const at::Tensor& v_row, int64_t col, const at::Tensor& w_in,
                                                     const at::Tensor& w_hidden, const at::Tensor& w_res,
                                                     const at::Tensor& b_res, const at::Tensor& w_skip,
                                                     const at::Tensor& b_skip, const at::Tensor& w_out1,
                                                     const at::Tensor& b_out1, const at::Tensor& w_out2,
                                                     const at::Tensor& b_out2) {
  TORCH_CHECK(x_row.scalar_type() == at::kFloat || x_row.scalar_type() == at::kDouble, kOp,
              ": dtype must be float32 or float64, got ", x_row.scalar_type());
  TORCH_CHECK(x_row.dim() == 3, kOp, ": x_row must have shape [N, W, F], got ", x_row.sizes());
  TORCH_CHECK(w_res.dim() == 3 && w_res.size(0) >= 1 && w_res.size(1) == w_res.size(2), kOp,
              ": w_res must have shape [L, C, C] with L >= 1, got ", w_res.sizes());
  TORCH_CHECK(w_in.dim() == 3 && w_in.size(0) >= 1, kOp, ": w_in must have shape [kw, F, 2C] with kw >= 1, got ",
              w_in.sizes());
  TORCH_CHECK(b_skip.dim() == 1, kOp, ": b_skip must have shape [S], got ", b_skip.sizes());
  TORCH_CHECK(b_out1.dim() == 1, kOp, ": b_out1 must have shape [M], got ", b_out1.sizes());
  TORCH_CHECK(b_out2.dim() == 1, kOp, ": b_out2 must have shape [O], got ", b_out2.sizes());
  const int64_t n = x_row.size(0), width = x_row.size(1), features = x_row.size(2);
  const int64_t layers = w_res.size(0), channels = w_res.size(1), taps = w_in.size(0);
  const int64_t skips = b_skip.size(0), hidden = b_out1.size(0), outputs = b_out2.size(0);
  check_argument(x_row, "x_row", {n, width, features}, "N, W, F", x_row);
  check_argument(h_row, "h_row", {layers, n, width, channels}, "L, N, W, C", x_row);
  check_argument(v_row, "v_row", {layers, n, width, 2 * channels}, "L, N, W, 2C", x_row);
  check_argument(w_in, "w_in", {taps, features, 2 * channels}, "kw, F, 2C", x_row);
  check_argument(w_hidden, "w_hidden", {layers - 1, taps, channels, 2 * channels}, "L - 1, kw, C, 2C", x_row);
  check_argument(w_res, "w_res", {layers, channels, channels}, "L, C, C", x_row);
  check_argument(b_res, "b_res", {layers, channels}, "L, C", x_row);
  check_argument(w_skip, "w_skip", {layers, channels, skips}, "L, C, S", x_row);
  check_argument(b_skip, "b_skip", {skips}, "S", x_row);
  check_argument(w_out1, "w_out1", {skips, hidden}, "S, M", x_row);
  check_argument(b_out1, "b_out1", {hidden}, "M", x_row);
  check_argument(w_out2, "w_out2", {hidden, outputs}, "M, O", x_row);
  check_argument(b_out2, "b_out2", {outputs}, "O", x_row);
  TORCH_CHECK(0 <= col && col < width, kOp, ": col must be in [0, W = ", width, "), got ", col);

  at::Tensor logits = at::empty({n, outputs}, x_row.options());
  at::Tensor h_col = at::empty({layers, n, channels}, x_row.options());
  if (n == 0) return {logits, h_col};
  AT_DISPATCH_FLOATING_TYPES(x_row.scalar_type(), "pixelcnn_step_cpu", [&] {
    run_step<scalar_t>({n,
                        width,
                        features,
                        layers,
                        channels,
                        taps,
                        skips,
                        hidden,
                        outputs,
                        col,
                        x_row.data_ptr<scalar_t>(),
                        h_row.data_ptr<scalar_t>(),
                        v_row.data_ptr<scalar_t>(),
                        w_in.data_ptr<scalar_t>(),
                        w_hidden.data_ptr<scalar_t>(),
                        w_res.data_ptr<scalar_t>(),
                        b_res.data_ptr<scalar_t>(),
                        w_skip.data_ptr<scalar_t>(),
                        b_skip.data_ptr<scalar_t>(),
                        w_out1.data_ptr<scalar_t>(),
                        b_out1.data_ptr<scalar_t>(),
                        w_out2.data_ptr<scalar_t>(),
                        b_out2.data_ptr<scalar_t>(),
                        logits.data_ptr<scalar_t>(),
                        h_col.data_ptr<scalar_t>()});
  });
  return {logits, h_col};
}

}  // namespace

TORCH_LIBRARY_IMPL(aelearn, CPU, m) {
  m.impl("pixelcnn_step", &pixelcnn_step_cpu);
}
