// Vectorised 2^t for t <= 0, on the vectors of simd_vector.h; exp(x) = 2^(x log2(e)).
//
// Why not std::exp: GCC only vectorises exp calls under -ffast-math (through libmvec), and the
// Gaussian kernels spend about as much time in exp as in the distance products.
//
// Why base 2: callers that compute exp(-gamma * r) fold log2(e) into their constant and pass
// t = r * (-gamma log2(e)). That is one product of r with a constant rounded once, exactly like
// x = r * (-gamma), so it is as accurate as exp(x) of the rounded x, and it saves the two-step
// (Cody-Waite) reduction x - k ln2 of a natural-base exp: here the reduction f = t - k is exact.
//
// Method: 2^t = 2^k * 2^f with k = round(t) and f = t - k in [-1/2, 1/2].
//   * k is rounded by adding and subtracting 1.5 * 2^(mantissa bits): the sum holds k in its low
//     mantissa bits, which also give 2^k directly by an integer shift into the exponent field.
//   * 2^f = 1 + f p(f), with p a minimax polynomial for the relative error on [-1/2, 1/2]
//     (fitted for this file with Lawson's algorithm in 40-digit arithmetic):
//       float:  p of degree 5,  relative error of the polynomial 2.0e-9  (0.03 ulp)
//       double: p of degree 10, relative error of the polynomial 3.4e-18 (0.03 ulp)
//   * Inputs below the smallest normal exponent (t < -126 float, t < -1022 double) give exactly
//     0: the subnormal range is flushed (an absolute error below 1.2e-38 / 2.3e-308), which also
//     keeps subnormal operands, slow on some processors, out of the callers' sums.
// Measured error against the exact 2^t (every rounding included), on targets with FMA:
//   float:  at most 0.95 ulp, over every representable t in [-126, 0];
//   double: at most 0.94 ulp, over 10^7 random t in [-1022, 0] (half of them in [-1, 0]);
// without FMA (plain x86-64) at most 1.23 ulp for both. The AVX-512 specialisation at the end
// gives the same bits as the generic code (checked over every float t in [-200, 0]).
// NaN inputs give NaN, -inf gives 0; t > 0 is outside the domain.
//
// The rounding trick relies on IEEE round-to-nearest arithmetic that the compiler does not
// reassociate, so -ffast-math (which would fold (t + C) - C to t) is refused below.
#pragma once

#include "simd_vector.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__FAST_MATH__)
#error "simd_exp.h needs IEEE arithmetic: do not compile the aelearn CPU kernels with -ffast-math"
#endif

namespace aelearn::simd {

// log2(e), to turn exp(x) into 2^(x log2(e)).
inline constexpr double kLog2e = 1.44269504088896340736;

template <typename T>
struct Exp2Constants;

template <>
struct Exp2Constants<float> {
  static constexpr float kRoundingShift = 12582912.0f;  // 1.5 * 2^23
  static constexpr int kMantissaBits = 23;
  static constexpr int kExponentBias = 127;
  static constexpr float kMinExponent = -126.0f;
  static constexpr int kDegree = 5;
  // Coefficients of p, of f^0 .. f^5.
  static constexpr float kPoly[kDegree + 1] = {0.6931472028563762134f,  0.2402264791344206010f,
                                               0.05550332469052024047f, 0.009618437370201563673f,
                                               0.001339887506929992509f, 0.0001535336009160614369f};
};

template <>
struct Exp2Constants<double> {
  static constexpr double kRoundingShift = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int kMantissaBits = 52;
  static constexpr int kExponentBias = 1023;
  static constexpr double kMinExponent = -1022.0;
  static constexpr int kDegree = 10;
  // Coefficients of p, of f^0 .. f^10.
  static constexpr double kPoly[kDegree + 1] = {
      0.6931471805599453258062,    0.2402265069591013126232,    0.05550410866482008315646,
      0.009618129107594119370278,  0.001333355814677463488457,  0.000154035304571128624067,
      1.525273349311527799239e-5,  1.321543528197125208516e-6,  1.01781995764716990884e-7,
      7.073783300360880024666e-9,  4.434770651910847849581e-10};
};

// 2^f = 1 + f p(f) for f in [-1/2, 1/2].
template <typename T>
inline Vec<T> exp2_reduced(Vec<T> f) {
  using C = Exp2Constants<T>;
  Vec<T> p = splat<T>(C::kPoly[C::kDegree]);
  for (int power = C::kDegree - 1; power >= 0; --power) p = p * f + C::kPoly[power];
  return p * f + T(1);
}

// 2^t lane by lane, for t <= 0 (see the accuracy notes above).
template <typename T>
inline Vec<T> exp2_nonpositive(Vec<T> t) {
  using C = Exp2Constants<T>;
  using Bits = VecBits<T>;
  const Bits underflow = t < splat<T>(C::kMinExponent);
  t = underflow ? splat<T>(C::kMinExponent) : t;

  // shifted = 1.5 * 2^(mantissa bits) + k exactly (|k| < 2^22), so its low bits are k in two's
  // complement; subtracting the constant again gives k as a float, and f = t - k exactly.
  const Vec<T> shifted = t + C::kRoundingShift;
  const Vec<T> two_to_f = exp2_reduced<T>(t - (shifted - C::kRoundingShift));

  // 2^k: k's bits shifted into the exponent field. The constant's own bits of `shifted` sit above
  // the field after the shift and drop out; adding the bias completes the exponent.
  constexpr LaneInteger<T> kBiasBits = LaneInteger<T>{C::kExponentBias} << C::kMantissaBits;
  const Bits two_to_k = (reinterpret_cast<Bits>(shifted) << C::kMantissaBits) + kBiasBits;
  return keep_or_zero<T>(~underflow, two_to_f * reinterpret_cast<Vec<T>>(two_to_k));
}

#if defined(__AVX512F__)
// AVX-512 has single instructions for the rounding (vrndscale) and for the scaling by 2^k (vscalef,
// which takes k as a float and zeroes the underflowing lanes as it writes): 10 operations instead
// of 15. The results are bit for bit those of the generic version: same k, same f, same
// polynomial, and both scalings are exact in the normal range. (vrndscale is used in its masked
// form with every lane selected, which avoids the undefined source operand that GCC 12's header
// warns about.)
template <>
inline Vec<float> exp2_nonpositive<float>(Vec<float> t) {
  const __m512 t_register = reinterpret_cast<__m512>(t);
  const __mmask16 normal =
      _mm512_cmp_ps_mask(t_register, _mm512_set1_ps(Exp2Constants<float>::kMinExponent), _CMP_NLT_UQ);
  const __m512 k =
      _mm512_mask_roundscale_ps(t_register, 0xFFFF, t_register, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec<float> two_to_f = exp2_reduced<float>(reinterpret_cast<Vec<float>>(_mm512_sub_ps(t_register, k)));
  return reinterpret_cast<Vec<float>>(_mm512_maskz_scalef_ps(normal, reinterpret_cast<__m512>(two_to_f), k));
}

template <>
inline Vec<double> exp2_nonpositive<double>(Vec<double> t) {
  const __m512d t_register = reinterpret_cast<__m512d>(t);
  const __mmask8 normal =
      _mm512_cmp_pd_mask(t_register, _mm512_set1_pd(Exp2Constants<double>::kMinExponent), _CMP_NLT_UQ);
  const __m512d k =
      _mm512_mask_roundscale_pd(t_register, 0xFF, t_register, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec<double> two_to_f = exp2_reduced<double>(reinterpret_cast<Vec<double>>(_mm512_sub_pd(t_register, k)));
  return reinterpret_cast<Vec<double>>(_mm512_maskz_scalef_pd(normal, reinterpret_cast<__m512d>(two_to_f), k));
}
#endif

}  // namespace aelearn::simd
