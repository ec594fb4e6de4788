// Shared helpers of the CPU kernels: dtype tags and 16-bit float conversions.
// Free of torch headers on purpose: these files compile in a second and know only memory and math.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastattn {

enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// Element strides of one (B, C, H, W) tensor.
struct Strides4 {
  int64_t b, c, h, w;
};

// Software prefetch of the n elements `offset` elements on from p (offset may reach past the
// tensor: the address is formed as an integer, and a prefetch never faults). For loops that
// stream through a tensor in small jobs (a plane of 14 x 14, a tile row), whose arithmetic
// between loads leaves the hardware prefetcher behind.
constexpr int64_t kAheadBytes = 4096;
template <typename T>
inline void prefetch_span(const T* p, int64_t offset, int64_t n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(offset * static_cast<int64_t>(sizeof(T)));
  for (int64_t o = 0; o < n * static_cast<int64_t>(sizeof(T)); o += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(a + static_cast<uintptr_t>(o)));
}
// The n elements at p, kAheadBytes on.
template <typename T>
inline void prefetch_ahead(const T* p, int64_t n) {
  prefetch_span(reinterpret_cast<const char*>(p), kAheadBytes, n * static_cast<int64_t>(sizeof(T)));
}
// For loops over rows `stride` elements apart (a tile of pixels, channel after channel): how many
// rows ahead is kAheadBytes on.
template <typename T>
inline int64_t rows_ahead(int64_t stride) {
  const int64_t bytes = std::max<int64_t>(1, (stride < 0 ? -stride : stride) * static_cast<int64_t>(sizeof(T)));
  return (kAheadBytes + bytes - 1) / bytes;
}

// Storage types of the 16-bit formats: plain bit patterns, converted through float.
struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };

inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }

inline float to_float(bf16_t v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float to_float(fp16_t v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t man = h & 0x3FFu;
  uint32_t u;
  if (exp == 0x1Fu) {                       // inf / nan
    u = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {                    // normal
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {                    // signed zero
    u = sign;
  } else {                                  // subnormal: value = man * 2^-24, exact in float
    float f = static_cast<float>(man) * 5.9604644775390625e-8f;
    std::memcpy(&u, &f, sizeof u);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T> inline T from_float(float v);
template <typename T> inline T from_double(double v) { return from_float<T>(static_cast<float>(v)); }
template <> inline double from_double<double>(double v) { return v; }

template <> inline float from_float<float>(float v) { return v; }
template <> inline double from_float<double>(float v) { return v; }

template <> inline bf16_t from_float<bf16_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet nan
  u += 0x7FFFu + ((u >> 16) & 1u);          // round to nearest even
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

template <> inline fp16_t from_float<fp16_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return fp16_t{static_cast<uint16_t>(sign | 0x7E00u)};   // nan
  if (a >= 0x477FF000u) return fp16_t{static_cast<uint16_t>(sign | 0x7C00u)};  // overflow to inf
  if (a < 0x38800000u) {                    // fp16 subnormal or zero: round a * 2^24 to an integer
    float af;
    std::memcpy(&af, &a, sizeof af);
    const float scaled = af * 16777216.0f;  // exact: a power-of-two scale
    // round half to even on the integer part
    float r = static_cast<float>(static_cast<uint32_t>(scaled));
    float frac = scaled - r;
    uint32_t m = static_cast<uint32_t>(r);
    if (frac > 0.5f || (frac == 0.5f && (m & 1u))) m += 1;
    return fp16_t{static_cast<uint16_t>(sign | m)};
  }
  // normal: rebias the exponent and round the mantissa to 10 bits, nearest even
  uint32_t v = a - 0x38000000u;             // exponent 127 -> 15
  v += 0x0FFFu + ((v >> 13) & 1u);
  return fp16_t{static_cast<uint16_t>(sign | (v >> 13))};
}

// ---------------------------------------------------------------------------------------------
// Shared by the kernel families
// ---------------------------------------------------------------------------------------------

// The math type of storage type T: double for double, float for float / fp16 / bf16.
template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// Store an accumulator value as T (from_float takes a float: fp64 needs from_double).
template <typename T>
inline T store(acc_t<T> v) {
  if constexpr (std::is_same<T, double>::value) return v;
  else return from_float<T>(v);
}

// Calls f(tag), a value of the storage type, for the four float dtypes.
template <typename F>
void for_every_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float16: return f(fp16_t{});
    case DType::BFloat16: return f(bf16_t{});
    case DType::Float64: return f(double{});
  }
}

// Calls f(tag) for the 16/32-bit float dtypes; nothing for Float64 (the kernels that use it
// compute in fp32, and their bindings refuse Float64).
template <typename F>
void for_dtype_16_32(DType dtype, const F& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float16: return f(fp16_t{});
    case DType::BFloat16: return f(bf16_t{});
    case DType::Float64: break;
  }
}

// Long sums run in fp32 over chunks of kChunk elements (vectorised) folded into a double total:
// one fp32 accumulator stops growing at 2^24 when adding ones.
constexpr int64_t kChunk = 4096;

// Sum of 16 lanes as a tree (four vector steps instead of a 16-add dependency chain).
template <typename A>
inline A lane_tree_sum(A* l) {
  for (int w = 8; w > 0; w >>= 1) {
#pragma omp simd
    for (int j = 0; j < w; ++j) l[j] += l[j + w];
  }
  return l[0];
}

// Sum of f(i) (of type A) for i in [i0, i1): 16 explicit lanes, their tree sum, a scalar tail.
// GCC 12 reduces an `omp simd reduction` loop through a 16-add scalar chain on the stack, a large
// share of the time on short runs (14 x 14 planes: SimAM's, the channel pools' statistics); this
// form keeps the adds in vectors. For short runs (at most kChunk: fp32 sums).
template <typename A, typename F>
inline A lane_sum(int64_t i0, int64_t i1, F f) {
  A lanes[16] = {};
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) {
#pragma omp simd
    for (int j = 0; j < 16; ++j) lanes[j] += f(i + j);
  }
  A tail = 0;
  for (; i < i1; ++i) tail += f(i);
  return lane_tree_sum(lanes) + tail;
}

// lane_sum with four accumulators of 16 lanes, which hide the add's latency (one accumulator makes a sum of
// cheap terms over cached data latency-bound), and the last partial group of 16 as one masked step (a 196-element
// plane's 4-element scalar tail cost as much as its vectors): a 14 x 14 plane's mean and variance in 31% less
// time. Used where measured (SimAM's moments): as the general lane_sum it made SRM's training step at
// 32x1024x14x14 12% slower (in its unrolled main loop GCC keeps these accumulators on the stack).
template <typename A, typename F>
inline A lane_sum_x4(int64_t i0, int64_t i1, F f) {
  A l0[16] = {}, l1[16] = {}, l2[16] = {}, l3[16] = {};
  int64_t i = i0;
  for (; i + 64 <= i1; i += 64) {
#pragma omp simd
    for (int j = 0; j < 16; ++j) {
      l0[j] += f(i + j);
      l1[j] += f(i + 16 + j);
      l2[j] += f(i + 32 + j);
      l3[j] += f(i + 48 + j);
    }
  }
  for (; i + 16 <= i1; i += 16) {
#pragma omp simd
    for (int j = 0; j < 16; ++j) l0[j] += f(i + j);
  }
  const int64_t rest = i1 - i;
#pragma omp simd
  for (int j = 0; j < 16; ++j) l1[j] += j < rest ? f(i + j) : A(0);
#pragma omp simd
  for (int j = 0; j < 16; ++j) l0[j] = (l0[j] + l1[j]) + (l2[j] + l3[j]);
  return lane_tree_sum(l0);
}

// Two sums at once: f(i, a, b) sets element i's terms a and b; s0, s1 receive the sums.
template <typename A, typename F>
inline void lane_sum2(int64_t i0, int64_t i1, F f, A& s0, A& s1) {
  A l0[16] = {}, l1[16] = {};
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) {
#pragma omp simd
    for (int j = 0; j < 16; ++j) {
      A a, b;
      f(i + j, a, b);
      l0[j] += a;
      l1[j] += b;
    }
  }
  A t0 = 0, t1 = 0;
  for (; i < i1; ++i) {
    A a, b;
    f(i, a, b);
    t0 += a;
    t1 += b;
  }
  s0 = lane_tree_sum(l0) + t0;
  s1 = lane_tree_sum(l1) + t1;
}

// Layout tests on element strides: each H x W plane contiguous (NCHW and its channel slices), or
// channels contiguous (channels_last).
inline bool plane_contiguous(const Strides4& s, int64_t H, int64_t W) {
  return (s.w == 1 || W == 1) && (s.h == W || H == 1);
}
inline bool channels_contiguous(const Strides4& s, int64_t C) { return s.c == 1 || C == 1; }

// torch.maximum's gradient shares for max(xa, xs): all to the larger side, half to each on a tie
// (x = 0 after a ReLU ties every pixel of max(x a, x s)), all to both when unordered (a NaN).
template <typename A>
inline void max_grad_weights(A xa, A xs, A& wa, A& ws) {
  wa = xa == xs ? A(0.5) : (xa < xs ? A(0) : A(1));
  ws = xa == xs ? A(0.5) : (xa > xs ? A(0) : A(1));
}

}  // namespace fastattn
