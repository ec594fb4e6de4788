// AVX-512 helpers for kernels over short unit-stride rows (the 7-, 14-, 28- and 56-wide rows of
// the late ResNet stages): masked 16-lane loads of fp32, bf16 and fp16, and the sums of 16 row
// vectors as one vector. Compiled loops over such rows spend most of their time in scalar tails
// and one horizontal reduction per row; these keep every step in vectors.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
// The short-row kernels need AVX-512 F, BW and VL (the 16-bit masked loads); without them the
// callers take their compiled loops.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FASTATTN_SHORT_ROWS 1
#else
#define FASTATTN_SHORT_ROWS 0
#endif

namespace fastattn {

#if defined(__AVX512F__)
// The first min(16, n - j) of 16 lanes.
inline __mmask16 lanes_from(int64_t j, int64_t n) {
  return n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1);
}
#endif

// Calls f(std::integral_constant<int, NV>{}) with NV = ceil(W / 16) vectors per row (W <= 64).
template <typename F>
inline void with_row_vectors(int64_t W, const F& f) {
  switch ((W + 15) / 16) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

#if FASTATTN_SHORT_ROWS
// Every lane. The helpers below use the zero-masking forms of the intrinsics with it: GCC 12 warns
// (-Wmaybe-uninitialized) on the undefined source vector of the plain forms; the code is the same.
constexpr __mmask16 kAllLanes = 0xFFFF;

// The lanes of vector j of a row of NV vectors whose last vector has lanes `tail`.
template <int NV>
inline __mmask16 row_lanes(int j, __mmask16 tail) {
  return j == NV - 1 ? tail : kAllLanes;
}

// Lanes k of p as fp32 (exact for all three types), zeros elsewhere.
inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load16(const bf16_t* p, __mmask16 k) {
  const __m512i wide = _mm512_maskz_cvtepu16_epi32(kAllLanes, _mm256_maskz_loadu_epi16(k, p));
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAllLanes, wide, 16));
}
inline __m512 load16(const fp16_t* p, __mmask16 k) {
  return _mm512_maskz_cvtph_ps(kAllLanes, _mm256_maskz_loadu_epi16(k, p));
}

// v to lanes k of p, rounded to nearest even as from_float (a NaN stays a quiet NaN).
inline void store16(float* p, __m512 v, __mmask16 k) { _mm512_mask_storeu_ps(p, k, v); }
inline void store16(bf16_t* p, __m512 v, __mmask16 k) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i high = _mm512_maskz_srli_epi32(kAllLanes, u, 16);
  const __m512i odd = _mm512_and_si512(high, _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_maskz_srli_epi32(kAllLanes, r, 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, high, _mm512_set1_epi32(0x40));
  _mm256_mask_storeu_epi16(p, k, _mm512_maskz_cvtepi32_epi16(kAllLanes, r));
}
inline void store16(fp16_t* p, __m512 v, __mmask16 k) {
  const int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  _mm256_mask_storeu_epi16(p, k, _mm512_maskz_cvtps_ph(kAllLanes, v, round));
}

// The 128-bit lanes (a[I & 3], a[(I >> 2) & 3], b[(I >> 4) & 3], b[I >> 6]).
template <int I>
inline __m512 lanes128(__m512 a, __m512 b) {
  return _mm512_maskz_shuffle_f32x4(kAllLanes, a, b, I);
}

// Per 128-bit lane: (a[I & 3], a[(I >> 2) & 3], b[(I >> 4) & 3], b[I >> 6]).
template <int I>
inline __m512 lanes32(__m512 a, __m512 b) {
  return _mm512_maskz_shuffle_ps(kAllLanes, a, b, I);
}

// Lane r of the result = the sum of the 16 lanes of v[r]: a transpose folded into the adds
// (30 shuffles for 16 rows instead of 4 shuffles and a dependency chain per row).
inline __m512 row_sums16(const __m512 v[16]) {
  __m512 pairs[8], quads[4], octs[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    pairs[i] = _mm512_add_ps(_mm512_maskz_unpacklo_ps(kAllLanes, v[2 * i], v[2 * i + 1]),
                             _mm512_maskz_unpackhi_ps(kAllLanes, v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: rows 4i..4i+3, each a quarter of its row's sum
    quads[i] = _mm512_add_ps(lanes32<0x44>(pairs[2 * i], pairs[2 * i + 1]),
                             lanes32<0xEE>(pairs[2 * i], pairs[2 * i + 1]));
  // 128-bit lanes: rows 8i..8i+3 twice (two halves of their sums), then rows 8i+4..8i+7 twice
  for (int i = 0; i < 2; ++i)
    octs[i] = _mm512_add_ps(lanes128<0x88>(quads[2 * i], quads[2 * i + 1]),
                            lanes128<0xDD>(quads[2 * i], quads[2 * i + 1]));
  return _mm512_add_ps(lanes128<0x88>(octs[0], octs[1]), lanes128<0xDD>(octs[0], octs[1]));
}
#endif

}  // namespace fastattn
