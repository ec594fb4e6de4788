// Triplet attention's passes over x and its gates' small convolution (see triplet.h).
#include "triplet.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "short_rows.h"
#include "stream.h"

namespace fastattn {
namespace {

// Whether v replaces the running maximum m as torch.amax with a first-index argmax: it is larger,
// or it is the first NaN.
template <typename A>
inline bool takes_max(A v, A m) {
  return v > m || (v != v && m == m);
}

// Sum of n values in 16 lanes (GCC 12 left an `omp simd reduction` scalar).
template <typename A>
A lane_sum_of(const A* p, int64_t n) {
  A lanes[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
#pragma omp simd
    for (int j = 0; j < 16; ++j) lanes[j] += p[i + j];
  }
  A acc = 0;
  for (; i < n; ++i) acc += p[i];
  for (int w = 8; w > 0; w >>= 1)
    for (int j = 0; j < w; ++j) lanes[j] += lanes[j + w];
  return acc + lanes[0];
}

#if defined(__AVX512F__)
// m, ix, s: where x (lanes k, NaN flags x_nan) beats m (takes_max), m = x and ix = value; s += x.
inline void running_step_f32(__m512 x, __mmask16 x_nan, __mmask16 k, float* m, int32_t* ix, float* s, __m512i value) {
  const __m512 mm = _mm512_maskz_loadu_ps(k, m);
  const __mmask16 m_nan = _mm512_cmp_ps_mask(mm, mm, _CMP_UNORD_Q);
  const __mmask16 take =
      static_cast<__mmask16>((_mm512_cmp_ps_mask(x, mm, _CMP_GT_OQ) | (x_nan & ~m_nan)) & k);
  _mm512_mask_storeu_ps(m, take, x);
  _mm512_mask_storeu_epi32(ix, take, value);
  _mm512_mask_storeu_ps(s, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, s), x));
}
#endif

// One row of a running pool: for i < n, where v[i] beats m[i] (takes_max), m[i] = v[i] and
// ix[i] = value; s[i] += v[i]. The pools call it on short rows (14 wide at the late ResNet
// stages), so fp32 under AVX-512 runs it in masked 16-lane steps (compiled loops left a scalar
// tail of up to 15 lanes per row, most of the kernel's time).
template <typename A>
inline void running_update(const A* __restrict__ v, A* __restrict__ m, int32_t* __restrict__ ix, A* __restrict__ s,
                           int64_t n, int32_t value) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<A, float>::value) {
    const __m512i vi = _mm512_set1_epi32(value);
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 k = lanes_from(j, n);
      const __m512 x = _mm512_maskz_loadu_ps(k, v + j);
      running_step_f32(x, _mm512_mask_cmp_ps_mask(k, x, x, _CMP_UNORD_Q), k, m + j, ix + j, s + j, vi);
    }
    return;
  }
#endif
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const bool t = takes_max(v[i], m[i]);
    m[i] = t ? v[i] : m[i];
    ix[i] = t ? value : ix[i];
    s[i] += v[i];
  }
}

#if defined(__AVX512F__)
// Row h of plane c (n floats), read once: into the running column pool of the plane (cmax, cidx,
// csum), the running pixel pool over the channels (hm, hi, hs: this row's W entries), and its
// own max, first argmax and sum. Returns false, the row's own pool unwritten, when it holds a NaN.
template <bool WithHW>
inline bool pool_row_f32(const float* row, int64_t n, int32_t h, float* cmax, int32_t* cidx, float* csum, int32_t c,
                         float* hm, int32_t* hi, float* hs, float* max_out, int32_t* idx_out, float* sum_out) {
  const __m512i vh = _mm512_set1_epi32(h), vc = _mm512_set1_epi32(c);
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), vsum = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = lanes_from(j, n);
    const __m512 x = _mm512_maskz_loadu_ps(k, row + j);
    const __mmask16 x_nan = _mm512_mask_cmp_ps_mask(k, x, x, _CMP_UNORD_Q);
    running_step_f32(x, x_nan, k, cmax + j, cidx + j, csum + j, vh);
    if constexpr (WithHW) running_step_f32(x, x_nan, k, hm + j, hi + j, hs + j, vc);
    nan |= x_nan;
    vmax = _mm512_mask_max_ps(vmax, k, vmax, x);
    vsum = _mm512_add_ps(vsum, x);
  }
  if (nan) return false;
  const float m = _mm512_reduce_max_ps(vmax);
  const __m512 vm = _mm512_set1_ps(m);
  for (int64_t j = 0;; j += 16) {   // the first lane equal to the max (one exists: no NaN)
    const __mmask16 k = lanes_from(j, n);
    const __mmask16 eq = _mm512_mask_cmp_ps_mask(k, _mm512_maskz_loadu_ps(k, row + j), vm, _CMP_EQ_OQ);
    if (eq) {
      *idx_out = static_cast<int32_t>(j + __builtin_ctz(static_cast<unsigned>(eq)));
      break;
    }
  }
  *max_out = m;
  *sum_out = _mm512_reduce_add_ps(vsum);
  return true;
}

// sample_pools for fp32 under AVX-512: each row read once (pool_row_f32); a row with a NaN gets
// its own pool from a scalar loop.
template <bool WithHW>
void sample_pools_f32(const float* xb, int64_t C, int64_t H, int64_t W, float* cw_max, int32_t* cw_idx,
                      float* hc_max, int32_t* hc_idx, float* hw_max, float* hw_sum, int32_t* hw_idx) {
  const int64_t HW = H * W;
  const float inf = std::numeric_limits<float>::infinity();
  float* cw_mean = cw_max + C * W;
  float* hc_mean = hc_max + H * C;
  const float inv_c = 1.0f / static_cast<float>(C), inv_h = 1.0f / static_cast<float>(H),
              inv_w = 1.0f / static_cast<float>(W);
  if constexpr (WithHW) {
    std::fill(hw_max, hw_max + HW, -inf);
    std::fill(hw_sum, hw_sum + HW, 0.0f);
    std::fill(hw_idx, hw_idx + HW, 0);
  }
  for (int64_t c = 0; c < C; ++c) {
    const float* plane = xb + c * HW;
    float* cmax = cw_max + c * W;
    float* csum = cw_mean + c * W;
    int32_t* cidx = cw_idx + c * W;
    std::fill(cmax, cmax + W, -inf);
    std::fill(csum, csum + W, 0.0f);
    std::fill(cidx, cidx + W, 0);
    for (int64_t h = 0; h < H; ++h) {
      const float* row = plane + h * W;
      float rmax, rsum;
      int32_t ridx;
      if (!pool_row_f32<WithHW>(row, W, static_cast<int32_t>(h), cmax, cidx, csum, static_cast<int32_t>(c),
                                WithHW ? hw_max + h * W : nullptr, WithHW ? hw_idx + h * W : nullptr,
                                WithHW ? hw_sum + h * W : nullptr, &rmax, &ridx, &rsum)) {
        rmax = -inf;
        rsum = 0.0f;
        ridx = 0;
        for (int64_t w = 0; w < W; ++w) {
          if (takes_max(row[w], rmax)) {
            rmax = row[w];
            ridx = static_cast<int32_t>(w);
          }
          rsum += row[w];
        }
      }
      hc_max[h * C + c] = rmax;
      hc_mean[h * C + c] = rsum * inv_w;
      hc_idx[h * C + c] = ridx;
    }
    for (int64_t w = 0; w < W; ++w) csum[w] *= inv_h;
  }
  if constexpr (WithHW)
    for (int64_t i = 0; i < HW; ++i) hw_sum[i] *= inv_c;
}
#endif

// One sample's three pools (see triplet_pools_cpu); hw_* are the sample's hw map and argmax when
// the hw branch is wanted, else null. Scratch of the thread: pa, tr (H * W: the plane in A, and
// transposed), rmax, rsum, ridx (H).
template <typename T, bool WithHW>
void sample_pools(const T* xb, int64_t C, int64_t H, int64_t W, acc_t<T>* cw_max, int32_t* cw_idx, acc_t<T>* hc_max,
                  int32_t* hc_idx, acc_t<T>* hw_max, acc_t<T>* hw_sum, int32_t* hw_idx, acc_t<T>* pa, acc_t<T>* tr,
                  acc_t<T>* rmax, acc_t<T>* rsum, int32_t* ridx) {
  using A = acc_t<T>;
  const int64_t HW = H * W;
  A* cw_mean = cw_max + C * W;
  A* hc_mean = hc_max + H * C;
  const A inv_c = A(1) / static_cast<A>(C), inv_h = A(1) / static_cast<A>(H), inv_w = A(1) / static_cast<A>(W);
  for (int64_t c = 0; c < C; ++c) {
    const A* plane = nullptr;
    if constexpr (std::is_same<T, A>::value) {
      plane = xb + c * HW;
    } else {
      const T* src = xb + c * HW;
      for (int64_t i = 0; i < HW; ++i) pa[i] = static_cast<A>(to_float(src[i]));
      plane = pa;
    }
    // over c: the running H x W map, one flat update per plane
    if constexpr (WithHW) {
      if (c == 0) {
        std::copy(plane, plane + HW, hw_max);
        std::copy(plane, plane + HW, hw_sum);
        std::fill(hw_idx, hw_idx + HW, 0);
      } else {
        running_update(plane, hw_max, hw_idx, hw_sum, HW, static_cast<int32_t>(c));
      }
    }
    // over h: the plane's rows into the running W-wide column pool
    A* cmax = cw_max + c * W;
    A* csum = cw_mean + c * W;
    int32_t* cidx = cw_idx + c * W;
    std::copy(plane, plane + W, cmax);
    std::copy(plane, plane + W, csum);
    std::fill(cidx, cidx + W, 0);
    for (int64_t h = 1; h < H; ++h) running_update(plane + h * W, cmax, cidx, csum, W, static_cast<int32_t>(h));
    for (int64_t w = 0; w < W; ++w) csum[w] *= inv_h;
    // over w: the same on the transposed plane (W rows of H)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) tr[w * H + h] = plane[h * W + w];
    std::copy(tr, tr + H, rmax);
    std::copy(tr, tr + H, rsum);
    std::fill(ridx, ridx + H, 0);
    for (int64_t w = 1; w < W; ++w) running_update(tr + w * H, rmax, ridx, rsum, H, static_cast<int32_t>(w));
    for (int64_t h = 0; h < H; ++h) {
      hc_max[h * C + c] = rmax[h];
      hc_mean[h * C + c] = rsum[h] * inv_w;
      hc_idx[h * C + c] = ridx[h];
    }
  }
  if constexpr (WithHW)
    for (int64_t i = 0; i < HW; ++i) hw_sum[i] *= inv_c;
}

template <typename T>
void pools_typed(const T* x, int64_t B, int64_t C, int64_t H, int64_t W, acc_t<T>* map_cw, int32_t* idx_cw,
                 acc_t<T>* map_hc, int32_t* idx_hc, acc_t<T>* map_hw, int32_t* idx_hw) {
  using A = acc_t<T>;
  const int64_t HW = H * W;
#pragma omp parallel
  {
    std::vector<A> pa(static_cast<size_t>(HW)), tr(static_cast<size_t>(HW)), rmax(static_cast<size_t>(H)),
        rsum(static_cast<size_t>(H));
    std::vector<int32_t> ridx(static_cast<size_t>(H));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const T* xb = x + b * C * HW;
      A* cw = map_cw + b * 2 * C * W;
      A* hc = map_hc + b * 2 * H * C;
#if defined(__AVX512F__)
      if constexpr (std::is_same<T, float>::value) {
        if (map_hw)
          sample_pools_f32<true>(xb, C, H, W, cw, idx_cw + b * C * W, hc, idx_hc + b * H * C, map_hw + b * 2 * HW,
                                 map_hw + b * 2 * HW + HW, idx_hw + b * HW);
        else
          sample_pools_f32<false>(xb, C, H, W, cw, idx_cw + b * C * W, hc, idx_hc + b * H * C, nullptr, nullptr,
                                  nullptr);
        continue;
      }
#endif
      if (map_hw) {
        A* hw = map_hw + b * 2 * HW;
        sample_pools<T, true>(xb, C, H, W, cw, idx_cw + b * C * W, hc, idx_hc + b * H * C, hw, hw + HW,
                              idx_hw + b * HW, pa.data(), tr.data(), rmax.data(), rsum.data(), ridx.data());
      } else {
        sample_pools<T, false>(xb, C, H, W, cw, idx_cw + b * C * W, hc, idx_hc + b * H * C, nullptr, nullptr,
                               nullptr, pa.data(), tr.data(), rmax.data(), rsum.data(), ridx.data());
      }
    }
  }
}

// Writes one H x W plane computed into the thread's buffer `plane` (A) as T: streamed for fp32
// when `stream`, else with normal stores.
template <typename T>
void write_plane(const acc_t<T>* plane, T* out, int64_t n, bool stream) {
  if constexpr (std::is_same<T, float>::value) {
    if (stream) {
      stream_row_f32(out, n, [&](int64_t i) { return vload(plane + i); }, [&](int64_t i) { return plane[i]; });
      return;
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = store<T>(plane[i]);
}

// For every (b, c) plane of out (B x C x HW of T), fill(b, c, buf) computes it into the thread's
// buffer of HW values of A, which write_plane then stores (streamed for fp32 outputs of at least
// LLC / 2). Planes in parallel.
template <typename T, typename Fill>
void write_planes(T* out, int64_t B, int64_t C, int64_t HW, const Fill& fill) {
  const bool stream = std::is_same<T, float>::value && stream_output(B * C * HW * static_cast<int64_t>(sizeof(T)));
#pragma omp parallel
  {
    std::vector<acc_t<T>> plane(static_cast<size_t>(HW));
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) {
        fill(b, c, plane.data());
        write_plane(plane.data(), out + (b * C + c) * HW, HW, stream);
      }
    if (stream) stream_fence();
  }
}

template <typename T, bool WithHW>
void scale_typed(const T* x, const acc_t<T>* g_cw, const acc_t<T>* g_hc, const acc_t<T>* g_hw, acc_t<T> scale, T* y,
                 int64_t B, int64_t C, int64_t H, int64_t W) {
  using A = acc_t<T>;
  const int64_t HW = H * W;
  write_planes(y, B, C, HW, [&](int64_t b, int64_t c, A* plane) {
    const int64_t off = (b * C + c) * HW;
    const A* gcw = g_cw + (b * C + c) * W;
    for (int64_t h = 0; h < H; ++h) {
      const T* xr = x + off + h * W;
      A* pr = plane + h * W;
      const A ghc = g_hc[(b * H + h) * C + c];
      const A* ghw_row = WithHW ? g_hw + b * HW + h * W : nullptr;
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) {
        A g = gcw[w] + ghc;
        if constexpr (WithHW) g += ghw_row[w];
        pr[w] = static_cast<A>(to_float(xr[w])) * (g * scale);
      }
    }
  });
}

template <typename T, bool WithHW>
void sums_typed(const T* dy, const T* x, acc_t<T> scale, acc_t<T>* d_cw, acc_t<T>* d_hc, acc_t<T>* d_hw, int64_t B,
                int64_t C, int64_t H, int64_t W) {
  using A = acc_t<T>;
  const int64_t HW = H * W;
#pragma omp parallel
  {
    std::vector<A> prow(static_cast<size_t>(W));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      A* dhw = WithHW ? d_hw + b * HW : nullptr;
      if constexpr (WithHW) std::fill(dhw, dhw + HW, A(0));
      for (int64_t c = 0; c < C; ++c) {
        const int64_t off = (b * C + c) * HW;
        A* dcw = d_cw + (b * C + c) * W;
        std::fill(dcw, dcw + W, A(0));
        for (int64_t h = 0; h < H; ++h) {
          const T* dr = dy + off + h * W;
          const T* xr = x + off + h * W;
          A* hw_row = WithHW ? dhw + h * W : nullptr;
#pragma omp simd
          for (int64_t w = 0; w < W; ++w) {
            const A p = static_cast<A>(to_float(dr[w])) * static_cast<A>(to_float(xr[w]));
            dcw[w] += p;
            prow[w] = p;
            if constexpr (WithHW) hw_row[w] += p;
          }
          d_hc[(b * H + h) * C + c] = lane_sum_of(prow.data(), W) * scale;
        }
        for (int64_t w = 0; w < W; ++w) dcw[w] *= scale;
      }
      if constexpr (WithHW)
        for (int64_t i = 0; i < HW; ++i) dhw[i] *= scale;
    }
  }
}

template <typename T, bool WithHW>
void dx_typed(const T* dy, const acc_t<T>* g_cw, const acc_t<T>* g_hc, const acc_t<T>* g_hw, acc_t<T> scale,
              const acc_t<T>* dm_cw, const int32_t* idx_cw, const acc_t<T>* dm_hc, const int32_t* idx_hc,
              const acc_t<T>* dm_hw, const int32_t* idx_hw, T* dx, int64_t B, int64_t C, int64_t H, int64_t W) {
  using A = acc_t<T>;
  const int64_t HW = H * W;
  const A inv_c = A(1) / static_cast<A>(C), inv_h = A(1) / static_cast<A>(H), inv_w = A(1) / static_cast<A>(W);
  write_planes(dx, B, C, HW, [&](int64_t b, int64_t c, A* plane) {
    const int64_t off = (b * C + c) * HW;
    const int32_t cc = static_cast<int32_t>(c);
    const A* gcw = g_cw + (b * C + c) * W;
    const A* cw_dmax = dm_cw + b * 2 * C * W + c * W;
    const A* cw_dmean = cw_dmax + C * W;
    const int32_t* cw_idx = idx_cw + (b * C + c) * W;
    const A* hw_dmax = WithHW ? dm_hw + b * 2 * HW : nullptr;
    const A* hw_dmean = WithHW ? hw_dmax + HW : nullptr;
    const int32_t* hw_idx = WithHW ? idx_hw + b * HW : nullptr;
    for (int64_t h = 0; h < H; ++h) {
      const T* dr = dy + off + h * W;
      A* pr = plane + h * W;
      const int64_t hc = (b * H + h) * C + c;
      const A ghc = g_hc[hc];
      const A hc_term = dm_hc[b * 2 * H * C + H * C + h * C + c] * inv_w;
      const int32_t hh = static_cast<int32_t>(h);
      const A* ghw_row = WithHW ? g_hw + b * HW + h * W : nullptr;
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) {
        A g = gcw[w] + ghc;
        A a = cw_dmean[w] * inv_h + hc_term + (cw_idx[w] == hh ? cw_dmax[w] : A(0));
        if constexpr (WithHW) {
          const int64_t p = h * W + w;
          g += ghw_row[w];
          a += hw_dmean[p] * inv_c + (hw_idx[p] == cc ? hw_dmax[p] : A(0));
        }
        pr[w] = static_cast<A>(to_float(dr[w])) * (g * scale) + a;
      }
      pr[idx_hc[hc]] += dm_hc[b * 2 * H * C + h * C + c];   // the row's max gradient
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The gates' convolution. Each sample's input rows are copied into a zero-padded buffer (S + 2 pad
// wide), so that an output element sums its k taps of a row without bounds tests, k multiply-adds
// per load and store of the output row (which stays in L1 across the cin * k input rows).
// ---------------------------------------------------------------------------------------------

// dst (rows, S + 2 pad) = src (rows, S) with pad zeros either side of each row.
template <typename A>
void pad_rows(const A* src, A* dst, int64_t rows, int64_t S, int64_t pad) {
  const int64_t SP = S + 2 * pad;
  for (int64_t r = 0; r < rows; ++r) {
    A* d = dst + r * SP;
    std::fill(d, d + pad, A(0));
    std::copy(src + r * S, src + (r + 1) * S, d + pad);
    std::fill(d + pad + S, d + SP, A(0));
  }
}

// out[s] += sum over j < k of wk[j] * in[s + j] for s < S (in: a padded row).
template <typename A>
inline void row_taps(A* __restrict__ out, const A* __restrict__ in, const A* wk, int64_t k, int64_t S) {
#pragma omp simd
  for (int64_t s = 0; s < S; ++s) {
    A acc = out[s];
    for (int64_t j = 0; j < k; ++j) acc += wk[j] * in[s + j];
    out[s] = acc;
  }
}

template <typename A>
void conv_typed(const A* in, const A* w, A* out, int64_t B, int64_t cin, int64_t R, int64_t S, int64_t k) {
  const int64_t pad = (k - 1) / 2, SP = S + 2 * pad;
#pragma omp parallel
  {
    std::vector<A> padded(static_cast<size_t>(cin * R * SP));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      pad_rows(in + b * cin * R * S, padded.data(), cin * R, S, pad);
      A* o = out + b * R * S;
      for (int64_t r = 0; r < R; ++r) {
        A* orow = o + r * S;
        std::fill(orow, orow + S, A(0));
        for (int64_t ch = 0; ch < cin; ++ch)
          for (int64_t i = 0; i < k; ++i) {
            const int64_t rr = r + i - pad;
            if (rr < 0 || rr >= R) continue;
            row_taps(orow, padded.data() + (ch * R + rr) * SP, w + (ch * k + i) * k, k, S);
          }
      }
    }
  }
}

template <typename A>
void conv_backward_typed(const A* d_out, const A* in, const A* w, A* d_in, A* d_w, int64_t B, int64_t cin, int64_t R,
                         int64_t S, int64_t k) {
  const int64_t pad = (k - 1) / 2, SP = S + 2 * pad, taps = cin * k * k;
  // d_in[ch, r, s] = sum over (i, j) of w[ch, i, j] d_out[r - i + pad, s - j + pad]: the same
  // row sums over the padded d_out with the kernel flipped.
  std::vector<A> flipped(static_cast<size_t>(taps));
  for (int64_t ch = 0; ch < cin; ++ch)
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) flipped[(ch * k + i) * k + j] = w[(ch * k + k - 1 - i) * k + k - 1 - j];
  // each sample's d_w in double, summed over the samples in order after: the same result for
  // any thread count
  std::vector<double> dw_per_sample(d_w ? static_cast<size_t>(B * taps) : 0, 0.0);
#pragma omp parallel
  {
    std::vector<A> padded_out(static_cast<size_t>(R * SP)), padded_in(d_w ? static_cast<size_t>(cin * R * SP) : 0);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const A* gb = d_out + b * R * S;
      if (d_in) {
        pad_rows(gb, padded_out.data(), R, S, pad);
        for (int64_t ch = 0; ch < cin; ++ch)
          for (int64_t r = 0; r < R; ++r) {
            A* drow = d_in + ((b * cin + ch) * R + r) * S;
            std::fill(drow, drow + S, A(0));
            for (int64_t i = 0; i < k; ++i) {
              const int64_t rr = r + i - pad;
              if (rr < 0 || rr >= R) continue;
              row_taps(drow, padded_out.data() + rr * SP, flipped.data() + (ch * k + i) * k, k, S);
            }
          }
      }
      if (d_w) {
        // d_w[ch, i, j] = sum over r, s of d_out[r, s] in[ch, r + i - pad, s + j - pad]
        pad_rows(in + b * cin * R * S, padded_in.data(), cin * R, S, pad);
        double* part = dw_per_sample.data() + b * taps;
        for (int64_t ch = 0; ch < cin; ++ch)
          for (int64_t i = 0; i < k; ++i)
            for (int64_t j = 0; j < k; ++j) {
              A lanes[16] = {};
              A tail = 0;
              for (int64_t r = std::max<int64_t>(0, pad - i); r < std::min<int64_t>(R, R + pad - i); ++r) {
                const A* g = gb + r * S;
                const A* v = padded_in.data() + (ch * R + r + i - pad) * SP + j;
                int64_t s = 0;
                for (; s + 16 <= S; s += 16) {
#pragma omp simd
                  for (int q = 0; q < 16; ++q) lanes[q] += g[s + q] * v[s + q];
                }
                for (; s < S; ++s) tail += g[s] * v[s];
              }
              part[(ch * k + i) * k + j] = static_cast<double>(lane_sum_of(lanes, 16) + tail);
            }
      }
    }
  }
  if (d_w)
    for (int64_t q = 0; q < taps; ++q) {
      double total = 0;
      for (int64_t b = 0; b < B; ++b) total += dw_per_sample[b * taps + q];
      d_w[q] = static_cast<A>(total);
    }
}

// Calls f(std::true_type) or f(std::false_type): the kernels' hw branch as a template argument.
template <typename F>
void with_hw(bool hw, const F& f) {
  if (hw)
    f(std::true_type{});
  else
    f(std::false_type{});
}

}  // namespace

void triplet_pools_cpu(const void* x, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, void* map_cw,
                       int32_t* idx_cw, void* map_hc, int32_t* idx_hc, void* map_hw, int32_t* idx_hw) {
  for_every_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    pools_typed(static_cast<const T*>(x), B, C, H, W, static_cast<A*>(map_cw), idx_cw, static_cast<A*>(map_hc), idx_hc,
                static_cast<A*>(map_hw), idx_hw);
  });
}

void triplet_scale_cpu(const void* x, const void* g_cw, const void* g_hc, const void* g_hw, double scale, void* y,
                       DType dtype, int64_t B, int64_t C, int64_t H, int64_t W) {
  for_every_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    with_hw(g_hw != nullptr, [&](auto hw) {
      scale_typed<T, decltype(hw)::value>(static_cast<const T*>(x), static_cast<const A*>(g_cw),
                                          static_cast<const A*>(g_hc), static_cast<const A*>(g_hw),
                                          static_cast<A>(scale), static_cast<T*>(y), B, C, H, W);
    });
  });
}

void triplet_backward_sums_cpu(const void* dy, const void* x, double scale, void* d_cw, void* d_hc, void* d_hw,
                               DType dtype, int64_t B, int64_t C, int64_t H, int64_t W) {
  for_every_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    with_hw(d_hw != nullptr, [&](auto hw) {
      sums_typed<T, decltype(hw)::value>(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<A>(scale),
                                         static_cast<A*>(d_cw), static_cast<A*>(d_hc), static_cast<A*>(d_hw), B, C,
                                         H, W);
    });
  });
}

void triplet_backward_dx_cpu(const void* dy, const void* g_cw, const void* g_hc, const void* g_hw, double scale,
                             const void* dm_cw, const int32_t* idx_cw, const void* dm_hc, const int32_t* idx_hc,
                             const void* dm_hw, const int32_t* idx_hw, void* dx, DType dtype, int64_t B, int64_t C,
                             int64_t H, int64_t W) {
  for_every_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    with_hw(g_hw != nullptr, [&](auto hw) {
      dx_typed<T, decltype(hw)::value>(
          static_cast<const T*>(dy), static_cast<const A*>(g_cw), static_cast<const A*>(g_hc),
          static_cast<const A*>(g_hw), static_cast<A>(scale), static_cast<const A*>(dm_cw), idx_cw,
          static_cast<const A*>(dm_hc), idx_hc, static_cast<const A*>(dm_hw), idx_hw, static_cast<T*>(dx), B, C, H,
          W);
    });
  });
}

void gate_conv_cpu(const void* in, const void* w, void* out, DType dtype, int64_t B, int64_t cin, int64_t R,
                   int64_t S, int64_t k) {
  if (dtype == DType::Float64)
    conv_typed(static_cast<const double*>(in), static_cast<const double*>(w), static_cast<double*>(out), B, cin, R, S,
               k);
  else
    conv_typed(static_cast<const float*>(in), static_cast<const float*>(w), static_cast<float*>(out), B, cin, R, S, k);
}

void gate_conv_backward_cpu(const void* d_out, const void* in, const void* w, void* d_in, void* d_w, DType dtype,
                            int64_t B, int64_t cin, int64_t R, int64_t S, int64_t k) {
  if (dtype == DType::Float64)
    conv_backward_typed(static_cast<const double*>(d_out), static_cast<const double*>(in),
                        static_cast<const double*>(w), static_cast<double*>(d_in), static_cast<double*>(d_w), B, cin,
                        R, S, k);
  else
    conv_backward_typed(static_cast<const float*>(d_out), static_cast<const float*>(in), static_cast<const float*>(w),
                        static_cast<float*>(d_in), static_cast<float*>(d_w), B, cin, R, S, k);
}

}  // namespace fastattn
