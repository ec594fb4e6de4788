// Loads and stores of the pooling kernels (pool.cpp, bins.cpp): common.h's to_float / store,
// except where those branch per value (fp16 both ways, the NaN case of the bf16 store) and so keep
// loops scalar. Here they are selects only, which vectorise, with results bit-identical to
// common.h's (checked on every fp16 value and on 54M floats including every rounding midpoint), as
// long as denormals are not flushed (the default floating-point environment).
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

namespace fastattn {
namespace pool_cvt {

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

template <typename T>
inline acc_t<T> ld(const T& v) {
  return static_cast<acc_t<T>>(to_float(v));
}

// fp16 -> float: exponent and mantissa moved into place, then a multiply by 2^112 rebiases the
// exponent (exact; a subnormal half becomes a normal float on the way); inf / NaN patterns keep
// the all-ones exponent.
inline float ld(const fp16_t& v) {
  const uint32_t h = v.bits;
  const uint32_t em = h & 0x7FFFu;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t scaled = float_bits(bits_float(em << 13) * 5.192296858534828e+33f);  // 2^112
  const uint32_t special = (em << 13) | 0x7F800000u;
  return bits_float(sign | (em >= 0x7C00u ? special : scaled));
}

template <typename T>
inline T put(acc_t<T> v) {
  return store<T>(v);
}

// float -> fp16, round to nearest even: NaN -> quiet NaN, >= 65520 -> inf; subnormal results by
// an add of 0.5 that lets the FPU round (the half's bits land in the low mantissa); normals by
// integer rounding of the rebiased pattern.
template <>
inline fp16_t put<fp16_t>(float v) {
  const uint32_t u = float_bits(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  const uint32_t big = a > 0x7F800000u ? 0x7E00u : 0x7C00u;
  const uint32_t sub = float_bits(bits_float(a) + 0.5f) - 0x3F000000u;
  const uint32_t nrm = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;  // (15 - 127) << 23, + 0xFFF, + odd
  const uint32_t o = a >= 0x47800000u ? big : a < 0x38800000u ? sub : nrm;
  return fp16_t{static_cast<uint16_t>(sign | o)};
}

// float -> bf16, round to nearest even; NaN -> quiet NaN (as common.h, with a select).
template <>
inline bf16_t put<bf16_t>(float v) {
  const uint32_t u = float_bits(v);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t q = (u >> 16) | 0x40u;
  return bf16_t{static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? q : r)};
}

}  // namespace pool_cvt
}  // namespace fastattn
