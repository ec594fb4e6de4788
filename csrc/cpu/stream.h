// Streaming (non-temporal) stores for outputs larger than the last-level cache.
//
// A normal store first reads the destination line into the cache (read for ownership), so
// writing an output costs a read and a write of memory. When the output is far larger than the
// cache, nothing of it would still be cached for the next op anyway: a streaming store skips the
// read, which makes a one-read-one-write pass move 2 units of memory traffic instead of 3.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif
#include <unistd.h>

namespace fastattn {

// The native float vector of the build (AVX-512 or AVX) and the few operations the streaming
// loops and the pointwise products (pointwise.cpp) need; without AVX, a one-lane stand-in (kVecWidth = 0: the streaming body never runs).
#if defined(__AVX512F__)
using vfloat = __m512;
constexpr int64_t kVecWidth = 16;
inline vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
inline vfloat vbroadcast(float v) { return _mm512_set1_ps(v); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
inline void vstore(float* p, vfloat v) { _mm512_storeu_ps(p, v); }
// Through memory: GCC 12 warns (-Wmaybe-uninitialized) on the undefined vectors inside
// _mm512_reduce_add_ps and the 512-bit extracts. Used once per many vectors.
inline float vsum(vfloat v) {
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  for (int w = 8; w > 0; w >>= 1)
    for (int j = 0; j < w; ++j) t[j] += t[j + w];
  return t[0];
}
inline void vstream(float* p, vfloat v) { _mm512_stream_ps(p, v); }
// a NaN in either wins (torch.maximum): b where b > a or b is NaN, else a.
inline vfloat vnan_max(vfloat a, vfloat b) {
  const __mmask16 take_b = _mm512_cmp_ps_mask(b, a, _CMP_GT_OQ) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q);
  return _mm512_mask_blend_ps(take_b, a, b);
}
// The gradient factor of max(x g, x s) with respect to x as torch.maximum splits it (see
// max_grad_coef in se.cpp): g where x g > x s, s where less, (g + s) / 2 on a tie, g + s when
// unordered (a NaN).
// Its shares of the two sides, wa and ws: 1 to the larger side, 1/2 each on a tie, 1 to both when unordered.
inline void vmax_grad_weights(vfloat xa, vfloat xs, vfloat& wa, vfloat& ws) {
  const vfloat one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps(), half = _mm512_set1_ps(0.5f);
  const __mmask16 eq = _mm512_cmp_ps_mask(xa, xs, _CMP_EQ_OQ);
  wa = _mm512_mask_blend_ps(eq, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(xa, xs, _CMP_LT_OQ), one, zero), half);
  ws = _mm512_mask_blend_ps(eq, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(xa, xs, _CMP_GT_OQ), one, zero), half);
}
inline vfloat vmax_grad_coef(vfloat x, vfloat g, vfloat s) {
  const vfloat xa = _mm512_mul_ps(x, g), xs = _mm512_mul_ps(x, s), both = _mm512_add_ps(g, s);
  vfloat k = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(xa, xs, _CMP_GT_OQ), both, g);
  k = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(xa, xs, _CMP_LT_OQ), k, s);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(xa, xs, _CMP_EQ_OQ), k, _mm512_mul_ps(both, _mm512_set1_ps(0.5f)));
}
#elif defined(__AVX__)
using vfloat = __m256;
constexpr int64_t kVecWidth = 8;
inline vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
inline vfloat vbroadcast(float v) { return _mm256_set1_ps(v); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
#if defined(__FMA__)
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
#else
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_add_ps(_mm256_mul_ps(a, b), c); }
#endif
inline vfloat vadd(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
inline void vstore(float* p, vfloat v) { _mm256_storeu_ps(p, v); }
inline float vsum(vfloat v) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
inline void vstream(float* p, vfloat v) { _mm256_stream_ps(p, v); }
inline vfloat vnan_max(vfloat a, vfloat b) {
  const __m256 take_b = _mm256_or_ps(_mm256_cmp_ps(b, a, _CMP_GT_OQ), _mm256_cmp_ps(b, b, _CMP_UNORD_Q));
  return _mm256_blendv_ps(a, b, take_b);
}
inline void vmax_grad_weights(vfloat xa, vfloat xs, vfloat& wa, vfloat& ws) {
  const vfloat one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps(), half = _mm256_set1_ps(0.5f);
  const __m256 eq = _mm256_cmp_ps(xa, xs, _CMP_EQ_OQ);
  wa = _mm256_blendv_ps(_mm256_blendv_ps(one, zero, _mm256_cmp_ps(xa, xs, _CMP_LT_OQ)), half, eq);
  ws = _mm256_blendv_ps(_mm256_blendv_ps(one, zero, _mm256_cmp_ps(xa, xs, _CMP_GT_OQ)), half, eq);
}
inline vfloat vmax_grad_coef(vfloat x, vfloat g, vfloat s) {
  const vfloat xa = _mm256_mul_ps(x, g), xs = _mm256_mul_ps(x, s), both = _mm256_add_ps(g, s);
  vfloat k = _mm256_blendv_ps(both, g, _mm256_cmp_ps(xa, xs, _CMP_GT_OQ));
  k = _mm256_blendv_ps(k, s, _mm256_cmp_ps(xa, xs, _CMP_LT_OQ));
  return _mm256_blendv_ps(k, _mm256_mul_ps(both, _mm256_set1_ps(0.5f)), _mm256_cmp_ps(xa, xs, _CMP_EQ_OQ));
}
#else
struct vfloat { float v; };
constexpr int64_t kVecWidth = 0;
inline vfloat vload(const float* p) { return {*p}; }
inline vfloat vbroadcast(float v) { return {v}; }
inline vfloat vmul(vfloat a, vfloat b) { return {a.v * b.v}; }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return {a.v * b.v + c.v}; }
inline vfloat vadd(vfloat a, vfloat b) { return {a.v + b.v}; }
inline void vstore(float* p, vfloat v) { *p = v.v; }
inline float vsum(vfloat v) { return v.v; }
inline void vstream(float* p, vfloat v) { *p = v.v; }
inline vfloat vnan_max(vfloat a, vfloat b) { return {(b.v > a.v || b.v != b.v) ? b.v : a.v}; }
inline void vmax_grad_weights(vfloat xa, vfloat xs, vfloat& wa, vfloat& ws) {
  wa.v = xa.v == xs.v ? 0.5f : (xa.v < xs.v ? 0.0f : 1.0f);
  ws.v = xa.v == xs.v ? 0.5f : (xa.v > xs.v ? 0.0f : 1.0f);
}
inline vfloat vmax_grad_coef(vfloat x, vfloat g, vfloat s) {
  const float xa = x.v * g.v, xs = x.v * s.v;
  return {xa > xs ? g.v : xa < xs ? s.v : xa == xs ? 0.5f * (g.v + s.v) : g.v + s.v};
}
#endif

// The number of CPUs in a sysfs cpu list ("0-1", "0,2,4-7"); 0 when it does not parse.
inline int64_t count_cpu_list(const std::string& list) {
  int64_t count = 0;
  size_t i = 0;
  while (i < list.size()) {
    size_t used = 0;
    long first = 0, last = 0;
    try {
      first = std::stol(list.substr(i), &used);
    } catch (...) {
      return 0;
    }
    i += used;
    last = first;
    if (i < list.size() && list[i] == '-') {
      try {
        last = std::stol(list.substr(i + 1), &used);
      } catch (...) {
        return 0;
      }
      i += 1 + used;
    }
    if (last < first) return 0;
    count += last - first + 1;
    if (i < list.size() && list[i] == ',') ++i;
    else if (i < list.size() && list[i] != '\n') return 0;
    else break;
  }
  return count;
}

// At most this much last-level cache per CPU sharing it is believed: a VM may be shown its host's
// whole L3 for a share of it. Real parts stay under it (3D V-Cache desktop parts: 96 MB for 12
// threads), except a few frequency-optimised EPYCs with 3D V-Cache (96 MB per CCD of 2 cores, 24
// MiB per thread), which are then planned with 64 MiB per CCD. The 2-vCPU Xeon dev guest reports
// 480 MiB shared by its 2 CPUs; planning with that kept every output of this project's shapes from streaming stores, and taking 32 MiB made the
// ResNet-50 stage table 6% faster (geometric mean of 96 cells, interleaved A/B; the pooled-gate
// training steps 7-21%).
constexpr int64_t kMaxLlcPerCpu = int64_t(16) << 20;

// FASTATTN_LLC_BYTES as a positive integer; 0 when unset or empty, -1 when it is anything else
// (fastattn._C then refuses to load, naming the variable: see ops.cpp).
inline int64_t llc_bytes_from_env() {
  const char* env = std::getenv("FASTATTN_LLC_BYTES");
  if (env == nullptr || *env == '\0') return 0;
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(env, &end, 10);
  return (*end == '\0' && errno == 0 && v > 0) ? static_cast<int64_t>(v) : -1;   // ERANGE: too large
}

struct LlcInfo {
  int64_t bytes;        // what the kernels plan with
  int64_t reported;     // what sysfs / sysconf reported (0: nothing)
  int64_t shared_cpus;  // the CPUs sysfs says share it (0: unknown)
  const char* source;   // "FASTATTN_LLC_BYTES", "sysfs", "sysfs-capped", "sysconf" or "default"
};

// The last-level cache the CPU kernels plan with: FASTATTN_LLC_BYTES when set (a positive
// integer of bytes; the test suite pins 32 MiB, so that its shapes sized to cross these
// thresholds stay small), else sysfs's largest cache of cpu0 (what lscpu reports) capped at
// kMaxLlcPerCpu per CPU sharing it, else sysconf, else 32 MiB. Read once per process.
inline const LlcInfo& llc_info() {
  static const LlcInfo info = [] {
    if (const int64_t v = llc_bytes_from_env(); v > 0) return LlcInfo{v, 0, 0, "FASTATTN_LLC_BYTES"};
    int64_t best = 0, shared = 0;
    for (int index = 0; index < 8; ++index) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
      std::ifstream level_file(dir + "level"), size_file(dir + "size"), shared_file(dir + "shared_cpu_list");
      int level = 0;
      std::string size, cpus;
      if (!(level_file >> level) || !(size_file >> size) || level < 2 || size.empty()) continue;
      int64_t v = std::atoll(size.c_str());
      const char unit = size.back();
      if (unit == 'K') v <<= 10;
      else if (unit == 'M') v <<= 20;
      if (v > best) {
        best = v;
        shared = (shared_file >> cpus) ? count_cpu_list(cpus) : 0;
      }
    }
    if (best > 0) {
      if (shared > 0 && best > shared * kMaxLlcPerCpu)
        return LlcInfo{shared * kMaxLlcPerCpu, best, shared, "sysfs-capped"};
      return LlcInfo{best, best, shared, "sysfs"};
    }
    long v = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
    v = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    if (v > 0) return LlcInfo{static_cast<int64_t>(v), static_cast<int64_t>(v), 0, "sysconf"};
    return LlcInfo{int64_t(32) << 20, 0, 0, "default"};
  }();
  return info;
}

inline int64_t llc_bytes() { return llc_info().bytes; }

// Whether an output of `bytes`, written by a pass that reads as many bytes of input, should be
// written with streaming stores: at least half the last-level cache. Input and output then fill
// the cache, so a normally stored output is mostly evicted before the next op reads it, and its
// read for ownership costs as much memory traffic as the input. (Measured on the 2-core EPYC
// dev VM, 32 MiB L3, fp32 32x1024x14x14 (25.7 MB), A/B interleaved: ECA inference 1.56 -> 1.25
// ms, channel_scale 1.02 -> 0.88 ms; the threshold was 2x LLC before.)
inline bool stream_output(int64_t bytes) { return 2 * bytes >= llc_bytes(); }

// y[i] = f(i) for i in [0, n) over float with streaming stores: a scalar head up to the 64-byte
// alignment of y, a streaming body of kVecWidth lanes, a scalar tail. `vec(i)` returns lanes
// i .. i + kVecWidth - 1 as a vfloat, `one(i)` lane i. Call stream_fence() once per thread after.
template <typename VecFn, typename OneFn>
inline void stream_row_f32(float* __restrict__ y, int64_t n, VecFn vec, OneFn one) {
  int64_t i = 0;
  if constexpr (kVecWidth > 0) {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(y);
    int64_t head = addr % sizeof(float) ? n : static_cast<int64_t>(((64 - addr % 64) % 64) / sizeof(float));
    head = head < n ? head : n;
    for (; i < head; ++i) y[i] = one(i);
    for (; i + kVecWidth <= n; i += kVecWidth) vstream(y + i, vec(i));
  }
  for (; i < n; ++i) y[i] = one(i);
}

// The same with plain stores (stream false) or streaming ones (stream_row_f32): for loops whose
// vector body GCC does not match (masked selects: its 256-bit code ran at half the speed).
template <typename VecFn, typename OneFn>
inline void store_row_f32(float* __restrict__ y, int64_t n, bool stream, VecFn vec, OneFn one) {
  if (stream) return stream_row_f32(y, n, vec, one);
  int64_t i = 0;
  if constexpr (kVecWidth > 0)
    for (; i + kVecWidth <= n; i += kVecWidth) vstore(y + i, vec(i));
  for (; i < n; ++i) y[i] = one(i);
}

// Orders the streaming stores of this thread before later loads/stores (call once per thread,
// e.g. at the end of the parallel region, before the output is handed back).
inline void stream_fence() {
#if defined(__AVX512F__) || defined(__AVX__)
  _mm_sfence();
#endif
}

}  // namespace fastattn
