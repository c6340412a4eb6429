// Fixed-width SIMD vectors for the CPU kernels, written with the GCC/Clang vector extensions.
//
// Why vector extensions rather than plain loops or intrinsics: the register-tiled kernels need
// their accumulators to stay in registers and their exponentials to be vectorised, which plain
// loops only get from the auto-vectoriser by luck (and never for exp without -ffast-math);
// intrinsics would tie the code to one instruction set. Vector extensions are compiled to
// AVX-512, AVX2, SSE or NEON by the target flags (the extension is built with -march=native),
// from one source; only simd_exp.h adds an AVX-512 specialisation, for two instructions that have
// no portable spelling, and any_lane one test instruction on x86. GCC and Clang only.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace aelearn::simd {

// Width of one hardware vector register and how many of them there are: they size the register
// tiles of the kernels.
#if defined(__AVX512F__)
inline constexpr int kVectorBytes = 64;
inline constexpr int kVectorRegisters = 32;
#elif defined(__AVX__)
inline constexpr int kVectorBytes = 32;
inline constexpr int kVectorRegisters = 16;
#elif defined(__aarch64__)
inline constexpr int kVectorBytes = 16;
inline constexpr int kVectorRegisters = 32;
#else
inline constexpr int kVectorBytes = 16;
inline constexpr int kVectorRegisters = 16;
#endif

template <typename T>
struct VectorOf;

template <>
struct VectorOf<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
  // Same-width integer lanes: the type of comparison results and of the bit patterns.
  typedef std::int32_t bits __attribute__((vector_size(kVectorBytes)));
  typedef std::int32_t lane_integer;
};

template <>
struct VectorOf<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
  typedef std::int64_t bits __attribute__((vector_size(kVectorBytes)));
  typedef std::int64_t lane_integer;
};

template <typename T>
using Vec = typename VectorOf<T>::type;
template <typename T>
using VecBits = typename VectorOf<T>::bits;
template <typename T>
using LaneInteger = typename VectorOf<T>::lane_integer;

template <typename T>
inline constexpr int kLanes = kVectorBytes / static_cast<int>(sizeof(T));

// Unaligned load and store (memcpy compiles to a single vector move).
template <typename T>
inline Vec<T> load(const T* source) {
  Vec<T> value;
  std::memcpy(&value, source, sizeof(value));
  return value;
}

template <typename T>
inline void store(T* destination, Vec<T> value) {
  std::memcpy(destination, &value, sizeof(value));
}

// All lanes equal to `scalar`. Written as an initializer of identical elements, which the compiler
// always turns into one broadcast (or folds into an FMA's memory operand); a lane loop may be
// vectorised into partial stores and reloads, and `Vec{} + scalar` would add a real 0.0.
template <typename T, std::size_t... kLane>
inline Vec<T> splat_lanes(T scalar, std::index_sequence<kLane...>) {
  return Vec<T>{((void)kLane, scalar)...};
}

template <typename T>
inline Vec<T> splat(T scalar) {
  return splat_lanes<T>(scalar, std::make_index_sequence<kLanes<T>>{});
}

// Lane numbers 0, 1, ..., kLanes - 1 as integers of the lane width (for index masks).
template <typename T>
inline VecBits<T> lane_indices() {
  VecBits<T> value;
  for (int lane = 0; lane < kLanes<T>; ++lane) value[lane] = lane;
  return value;
}

// Whether any lane of a comparison result is true. A branch on it needs the lanes gathered into
// one flag: a single test instruction on x86 (no portable spelling), a lane loop elsewhere.
template <typename T>
inline bool any_lane(VecBits<T> mask) {
#if defined(__AVX512F__)
  if constexpr (kVectorBytes == 64) {
    const __m512i bits = reinterpret_cast<__m512i>(mask);
    return _mm512_test_epi32_mask(bits, bits) != 0;
  }
#elif defined(__AVX__)
  if constexpr (kVectorBytes == 32) {
    const __m256i bits = reinterpret_cast<__m256i>(mask);
    return _mm256_testz_si256(bits, bits) == 0;
  }
#endif
  bool any = false;
  for (int lane = 0; lane < kLanes<T>; ++lane) any |= mask[lane] != 0;
  return any;
}

// Lanes where `keep` is false become +0.0.
template <typename T>
inline Vec<T> keep_or_zero(VecBits<T> keep, Vec<T> value) {
  return reinterpret_cast<Vec<T>>(reinterpret_cast<VecBits<T>>(value) & keep);
}

// Sum of the lanes, accumulated in double.
template <typename T>
inline double sum_lanes(Vec<T> value) {
  double total = 0.0;
  for (int lane = 0; lane < kLanes<T>; ++lane) total += static_cast<double>(value[lane]);
  return total;
}

// How many vectors of double hold the lanes of one Vec<T>.
template <typename T>
inline constexpr int kWideParts = kLanes<T> / kLanes<double>;

// Lanes [kPart * kLanes<double>, (kPart + 1) * kLanes<double>) of a vector of double wider than Vec.
template <int kPart, typename Wide, std::size_t... kLane>
inline Vec<double> double_part(const Wide& wide, std::index_sequence<kLane...>) {
  return __builtin_shufflevector(wide, wide, (kPart * kLanes<double> + kLane)...);
}

// Adds the lanes of `value`, converted to double, to the kWideParts<T> vectors `sums`: lane l goes
// to lane l % kLanes<double> of sums[l / kLanes<double>]. The whole vector is converted at once (to
// a vector of double twice as wide, then split by shuffles): GCC compiles that to full-width
// conversions, where converting extracted halves is split into 128-bit pieces.
template <typename T>
inline void add_widened(Vec<double>* sums, Vec<T> value) {
  if constexpr (kWideParts<T> == 1) {
    sums[0] += __builtin_convertvector(value, Vec<double>);
  } else {
    static_assert(kWideParts<T> == 2, "float has twice the lanes of double");
    typedef double Wide __attribute__((vector_size(2 * sizeof(Vec<double>))));
    const Wide wide = __builtin_convertvector(value, Wide);
    sums[0] += double_part<0>(wide, std::make_index_sequence<kLanes<double>>{});
    sums[1] += double_part<1>(wide, std::make_index_sequence<kLanes<double>>{});
  }
}

}  // namespace aelearn::simd
