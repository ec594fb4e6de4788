// Coordinate attention: directional means and the two-axis scale, forward and backward.
// Every op is one pass over the (B, C, H, W) map. fp32 math for 16/32-bit inputs, fp64 for fp64.
// Three walks: rows of W unit stride (NCHW, its channel slices and spatial crops; a job owns
// planes), channels unit stride (channels_last; a job owns pixel rows of a sample, the inner loops
// run across the channels), anything else (generic: correct, not fast). Rows of at most 64 take
// AVX-512 kernels where the build has them (short_rows.h: compiled loops ran 14-wide rows mostly
// as scalar tails and one horizontal sum per row; coord_pool at 32x1024x14x14 went from 4.4 to
// 1.55 ms on the 2-vCPU Xeon VM). Sums along H are split into row segments when (b, c) or b alone
// gives too few jobs; the segments' partial sums are added in segment order, so results do not
// depend on the thread count.
#include "coord.h"

#include "short_rows.h"

#include <algorithm>
#include <initializer_list>
#include <type_traits>
#include <vector>

namespace fastattn {
namespace {

constexpr int64_t kMinJobs = 64;         // parallel jobs wanted before a plane is split into row segments
constexpr int64_t kMinSegment = 4096;    // elements: no row segment smaller than this
constexpr int64_t kPixelWork = 16384;    // elements per job of the element-wise channels-contiguous paths

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The row-walking paths need unit-stride rows of W only (any h stride: spatial crops qualify).
inline bool rows_contiguous(const Strides4& s, int64_t W) { return s.w == 1 || W == 1; }

// An axis of `len` items cut into `n` pieces of `len_per` (the last may be shorter).
struct Split {
  int64_t n, len_per;
};

// Cut an axis so that jobs * pieces reaches kMinJobs (pieces of at least min_len items) and no
// piece exceeds max_len. Depends on the shape only.
inline Split split_axis(int64_t jobs, int64_t len, int64_t min_len, int64_t max_len) {
  int64_t n = jobs >= kMinJobs ? 1 : ceil_div(kMinJobs, std::max<int64_t>(jobs, 1));
  n = std::min(n, std::max<int64_t>(1, len / std::max<int64_t>(1, min_len)));
  n = std::max(n, ceil_div(len, std::max<int64_t>(1, max_len)));
  n = std::max<int64_t>(1, std::min(n, len));
  const int64_t per = ceil_div(len, n);
  return {ceil_div(len, per), per};
}

// The small (B, C, L) gate or gradient rows as (B, L, C) rows of the accumulation type, so that the
// channels-contiguous paths read them with unit stride; `scale` divides (means) or is 1.
template <typename S, typename A>
void channel_major(const S* src, A* dst, int64_t B, int64_t C, int64_t L, A scale) {
#pragma omp parallel for schedule(static)
  for (int64_t bl = 0; bl < B * L; ++bl) {
    const int64_t b = bl / L, l = bl % L;
    const S* s = src + b * C * L + l;
    A* d = dst + bl * C;
    for (int64_t c = 0; c < C; ++c) d[c] = static_cast<A>(to_float(s[c * L])) / scale;
  }
}

// ---------------------------------------------------------------------------------------------
// coord_pool forward
// ---------------------------------------------------------------------------------------------

// Sum of row[0, n) (unit stride), also added element-wise into col: fp32 chunks folded into double.
template <typename T>
inline double row_sum_into(const T* __restrict__ row, int64_t n, acc_t<T>* __restrict__ col) {
  using A = acc_t<T>;
  double total = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = std::min(n, i0 + kChunk);
    A acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = i0; i < i1; ++i) {
      const A v = static_cast<A>(to_float(row[i]));
      acc += v;
      col[i] += v;
    }
    total += static_cast<double>(acc);
  }
  return total;
}

#if FASTATTN_SHORT_ROWS
// One plane with unit-stride rows of W <= 16 NV: each row in NV vectors, the column sums in NV
// registers, the row sums of 16 rows at a time as one vector (row_sums16). fp32 sums (H <= kChunk).
template <typename T, int NV>
void pool_fwd_plane_short(const T* p, int64_t sh, int64_t H, int64_t W, T* xh, T* xw) {
  const __mmask16 tail = lanes_from(16 * (NV - 1), W);
  __m512 col[NV];
  for (int j = 0; j < NV; ++j) col[j] = _mm512_setzero_ps();
  const __m512 width = _mm512_set1_ps(static_cast<float>(W));
  alignas(64) float sums[16];
  for (int64_t h0 = 0; h0 < H; h0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, H - h0));
    __m512 rows[16];
    for (int r = 0; r < 16; ++r) {
      __m512 acc = _mm512_setzero_ps();
      if (r < n) {
        const T* row = p + (h0 + r) * sh;
        for (int j = 0; j < NV; ++j) {
          const __m512 v = load16(row + 16 * j, row_lanes<NV>(j, tail));
          col[j] = _mm512_add_ps(col[j], v);
          acc = _mm512_add_ps(acc, v);
        }
      }
      rows[r] = acc;
    }
    _mm512_store_ps(sums, _mm512_div_ps(row_sums16(rows), width));
    for (int r = 0; r < n; ++r) xh[h0 + r] = store<T>(sums[r]);
  }
  alignas(64) float cs[16 * NV];
  const __m512 height = _mm512_set1_ps(static_cast<float>(H));
  for (int j = 0; j < NV; ++j) _mm512_store_ps(cs + 16 * j, _mm512_div_ps(col[j], height));
  for (int64_t w = 0; w < W; ++w) xw[w] = store<T>(cs[w]);
}

template <typename T, int NV>
void pool_fwd_short(const T* x, T* xh, T* xw, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx) {
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc)
    pool_fwd_plane_short<T, NV>(x + (bc / C) * sx.b + (bc % C) * sx.c, sx.h, H, W, xh + bc * H, xw + bc * W);
}
#endif

// Whether the short-row kernels take a rows-path pool of this shape: a 16/32-bit type, rows of at
// most 64, no plane split (enough planes for the threads) and fp32 column sums (H <= kChunk).
template <typename T>
constexpr bool short_rows_ok(int64_t BC, int64_t H, int64_t W) {
  return FASTATTN_SHORT_ROWS && !std::is_same<T, double>::value && W <= 64 && BC >= kMinJobs && H <= kChunk;
}

// One job = (b, c, a segment of at most kChunk rows): row sums complete, column sums partial.
template <typename T>
void pool_fwd_rows(const T* x, T* xh, T* xw, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx) {
  using A = acc_t<T>;
  const int64_t BC = B * C;
#if FASTATTN_SHORT_ROWS
  if constexpr (!std::is_same<T, double>::value) {
    if (short_rows_ok<T>(BC, H, W)) {
      with_row_vectors(W, [&](auto nv) { pool_fwd_short<T, decltype(nv)::value>(x, xh, xw, B, C, H, W, sx); });
      return;
    }
  }
#endif
  const Split sp = split_axis(BC, H, ceil_div(kMinSegment, W), kChunk);
  std::vector<double> partial(sp.n > 1 ? static_cast<size_t>(BC * sp.n * W) : 0);
#pragma omp parallel
  {
    std::vector<A> col(static_cast<size_t>(W));
#pragma omp for schedule(static)
    for (int64_t job = 0; job < BC * sp.n; ++job) {
      const int64_t bc = job / sp.n, part = job % sp.n;
      const int64_t b = bc / C, c = bc % C;
      const int64_t h0 = part * sp.len_per, h1 = std::min(H, h0 + sp.len_per);
      const T* p = x + b * sx.b + c * sx.c;
      std::fill(col.begin(), col.end(), A(0));
      for (int64_t h = h0; h < h1; ++h)
        xh[bc * H + h] = store<T>(static_cast<A>(row_sum_into(p + h * sx.h, W, col.data()) / W));
      if (sp.n == 1) {
        for (int64_t w = 0; w < W; ++w) xw[bc * W + w] = store<T>(static_cast<A>(static_cast<double>(col[w]) / H));
      } else {
        double* pp = partial.data() + (bc * sp.n + part) * W;
        for (int64_t w = 0; w < W; ++w) pp[w] = col[w];
      }
    }
  }
  if (sp.n > 1) {
#pragma omp parallel for schedule(static)
    for (int64_t bc = 0; bc < BC; ++bc)
      for (int64_t w = 0; w < W; ++w) {
        double t = 0;
        for (int64_t s = 0; s < sp.n; ++s) t += partial[(bc * sp.n + s) * W + w];
        xw[bc * W + w] = store<T>(static_cast<A>(t / H));
      }
  }
}

// One job = (b, a segment of at most kChunk rows); inner loops run along the channel rows.
template <typename T>
void pool_fwd_channels(const T* x, T* xh, T* xw, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx) {
  using A = acc_t<T>;
  const Split sp = split_axis(B, H, ceil_div(kMinSegment, W * C), kChunk);
  const int64_t WC = W * C;
  std::vector<double> partial(sp.n > 1 ? static_cast<size_t>(B * sp.n * WC) : 0);
#pragma omp parallel
  {
    std::vector<A> col(static_cast<size_t>(WC)), racc(static_cast<size_t>(C));
    std::vector<double> rtot(static_cast<size_t>(C));
#pragma omp for schedule(static)
    for (int64_t job = 0; job < B * sp.n; ++job) {
      const int64_t b = job / sp.n, part = job % sp.n;
      const int64_t h0 = part * sp.len_per, h1 = std::min(H, h0 + sp.len_per);
      std::fill(col.begin(), col.end(), A(0));
      for (int64_t h = h0; h < h1; ++h) {
        std::fill(rtot.begin(), rtot.end(), 0.0);
        for (int64_t w0 = 0; w0 < W; w0 += kChunk) {
          const int64_t w1 = std::min(W, w0 + kChunk);
          A* __restrict__ ra = racc.data();
          std::fill(racc.begin(), racc.end(), A(0));
          for (int64_t w = w0; w < w1; ++w) {
            const T* __restrict__ px = x + b * sx.b + h * sx.h + w * sx.w;
            A* __restrict__ cw = col.data() + w * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const A v = static_cast<A>(to_float(px[c]));
              ra[c] += v;
              cw[c] += v;
            }
          }
          for (int64_t c = 0; c < C; ++c) rtot[c] += static_cast<double>(ra[c]);
        }
        for (int64_t c = 0; c < C; ++c) xh[(b * C + c) * H + h] = store<T>(static_cast<A>(rtot[c] / W));
      }
      if (sp.n == 1) {
        for (int64_t c = 0; c < C; ++c)
          for (int64_t w = 0; w < W; ++w)
            xw[(b * C + c) * W + w] = store<T>(static_cast<A>(static_cast<double>(col[w * C + c]) / H));
      } else {
        double* pp = partial.data() + (b * sp.n + part) * WC;
        for (int64_t i = 0; i < WC; ++i) pp[i] = col[i];
      }
    }
  }
  if (sp.n > 1) {
#pragma omp parallel for schedule(static)
    for (int64_t bc = 0; bc < B * C; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      for (int64_t w = 0; w < W; ++w) {
        double t = 0;
        for (int64_t s = 0; s < sp.n; ++s) t += partial[(b * sp.n + s) * WC + w * C + c];
        xw[bc * W + w] = store<T>(static_cast<A>(t / H));
      }
    }
  }
}

template <typename T>
void pool_fwd_generic(const T* x, T* xh, T* xw, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx) {
  using A = acc_t<T>;
#pragma omp parallel
  {
    std::vector<double> col(static_cast<size_t>(W));
#pragma omp for schedule(static)
    for (int64_t bc = 0; bc < B * C; ++bc) {
      const T* p = x + (bc / C) * sx.b + (bc % C) * sx.c;
      std::fill(col.begin(), col.end(), 0.0);
      for (int64_t h = 0; h < H; ++h) {
        double rs = 0;
        for (int64_t w = 0; w < W; ++w) {
          const double v = static_cast<double>(to_float(p[h * sx.h + w * sx.w]));
          rs += v;
          col[w] += v;
        }
        xh[bc * H + h] = store<T>(static_cast<A>(rs / W));
      }
      for (int64_t w = 0; w < W; ++w) xw[bc * W + w] = store<T>(static_cast<A>(col[w] / H));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// coord_pool backward: dx = gh / W + gw / H (a write-only pass), and with the scale's term
// dy * aw * ah added (kDy: CoordinateAttention's whole dx in one pass)
// ---------------------------------------------------------------------------------------------

// The scale's term of the combined dx; unused (dy null) for the pool's gradient alone.
template <typename T>
struct ScaleTerm {
  const T* dy;
  Strides4 sdy;
  const acc_t<T>* ah;   // (B, C, H), contiguous
  const acc_t<T>* aw;   // (B, C, W), contiguous
};

#if FASTATTN_SHORT_ROWS
template <typename T, int NV, bool kDy>
void pool_bwd_short(const T* gh, const T* gw, ScaleTerm<T> st, T* dx, int64_t B, int64_t C, int64_t H, int64_t W,
                    Strides4 s) {
  const __mmask16 tail = lanes_from(16 * (NV - 1), W);
  const __m512 height = _mm512_set1_ps(static_cast<float>(H));
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    __m512 g_w[NV], a_w[NV];
    for (int j = 0; j < NV; ++j) {
      const __mmask16 k = row_lanes<NV>(j, tail);
      g_w[j] = _mm512_div_ps(load16(gw + bc * W + 16 * j, k), height);
      if constexpr (kDy) a_w[j] = load16(st.aw + bc * W + 16 * j, k);
    }
    for (int64_t h = 0; h < H; ++h) {
      const __m512 a = _mm512_set1_ps(to_float(gh[bc * H + h]) / static_cast<float>(W));
      T* row = dx + b * s.b + c * s.c + h * s.h;
      for (int j = 0; j < NV; ++j) {
        const __mmask16 k = row_lanes<NV>(j, tail);
        __m512 v = _mm512_add_ps(a, g_w[j]);
        if constexpr (kDy) {
          const T* pdy = st.dy + b * st.sdy.b + c * st.sdy.c + h * st.sdy.h;
          const __m512 sh = _mm512_set1_ps(st.ah[bc * H + h]);
          v = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(load16(pdy + 16 * j, k), a_w[j]), sh), v);
        }
        store16(row + 16 * j, v, k);
      }
    }
  }
}
#endif

template <typename T, bool kDy>
void pool_bwd_rows(const T* gh, const T* gw, ScaleTerm<T> st, T* dx, int64_t B, int64_t C, int64_t H, int64_t W,
                   Strides4 s) {
  using A = acc_t<T>;
  const int64_t BC = B * C;
#if FASTATTN_SHORT_ROWS
  if constexpr (!std::is_same<T, double>::value) {
    if (short_rows_ok<T>(BC, H, W)) {
      with_row_vectors(W, [&](auto nv) {
        pool_bwd_short<T, decltype(nv)::value, kDy>(gh, gw, st, dx, B, C, H, W, s);
      });
      return;
    }
  }
#endif
  const Split sp = split_axis(BC, H, ceil_div(kMinSegment, W), H);
#pragma omp parallel
  {
    std::vector<A> gwv(static_cast<size_t>(W));
#pragma omp for schedule(static)
    for (int64_t job = 0; job < BC * sp.n; ++job) {
      const int64_t bc = job / sp.n, part = job % sp.n;
      const int64_t b = bc / C, c = bc % C;
      const int64_t h0 = part * sp.len_per, h1 = std::min(H, h0 + sp.len_per);
      for (int64_t w = 0; w < W; ++w) gwv[w] = static_cast<A>(to_float(gw[bc * W + w])) / static_cast<A>(H);
      T* p = dx + b * s.b + c * s.c;
      const A* __restrict__ gv = gwv.data();
      for (int64_t h = h0; h < h1; ++h) {
        const A a = static_cast<A>(to_float(gh[bc * H + h])) / static_cast<A>(W);
        T* __restrict__ row = p + h * s.h;
        if constexpr (kDy) {
          const T* __restrict__ pdy = st.dy + b * st.sdy.b + c * st.sdy.c + h * st.sdy.h;
          const A* __restrict__ paw = st.aw + bc * W;
          const A sh = st.ah[bc * H + h];
#pragma omp simd
          for (int64_t w = 0; w < W; ++w)
            row[w] = store<T>(static_cast<A>(to_float(pdy[w])) * paw[w] * sh + (a + gv[w]));
        } else {
#pragma omp simd
          for (int64_t w = 0; w < W; ++w) row[w] = store<T>(a + gv[w]);
        }
      }
    }
  }
}

template <typename T, bool kDy>
void pool_bwd_channels(const T* gh, const T* gw, ScaleTerm<T> st, T* dx, int64_t B, int64_t C, int64_t H, int64_t W,
                       Strides4 s) {
  using A = acc_t<T>;
  std::vector<A> ghT(static_cast<size_t>(B * H * C)), gwT(static_cast<size_t>(B * W * C));
  channel_major(gh, ghT.data(), B, C, H, static_cast<A>(W));
  channel_major(gw, gwT.data(), B, C, W, static_cast<A>(H));
  std::vector<A> ahT(kDy ? static_cast<size_t>(B * H * C) : 0), awT(kDy ? static_cast<size_t>(B * W * C) : 0);
  if constexpr (kDy) {
    channel_major(st.ah, ahT.data(), B, C, H, A(1));
    channel_major(st.aw, awT.data(), B, C, W, A(1));
  }
  const int64_t HW = H * W;
  const int64_t P = std::max<int64_t>(1, kPixelWork / C);
  const int64_t nblk = ceil_div(HW, P);
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < B * nblk; ++job) {
    const int64_t b = job / nblk, i0 = (job % nblk) * P, i1 = std::min(HW, i0 + P);
    int64_t h = i0 / W, w = i0 % W;
    for (int64_t i = i0; i < i1; ++i) {
      T* __restrict__ p = dx + b * s.b + h * s.h + w * s.w;
      const A* __restrict__ a = ghT.data() + (b * H + h) * C;
      const A* __restrict__ g = gwT.data() + (b * W + w) * C;
      if constexpr (kDy) {
        const T* __restrict__ pdy = st.dy + b * st.sdy.b + h * st.sdy.h + w * st.sdy.w;
        const A* __restrict__ a_h = ahT.data() + (b * H + h) * C;
        const A* __restrict__ a_w = awT.data() + (b * W + w) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)
          p[c] = store<T>(static_cast<A>(to_float(pdy[c])) * a_w[c] * a_h[c] + (a[c] + g[c]));
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) p[c] = store<T>(a[c] + g[c]);
      }
      if (++w == W) {
        w = 0;
        ++h;
      }
    }
  }
}

template <typename T, bool kDy>
void pool_bwd_generic(const T* gh, const T* gw, ScaleTerm<T> st, T* dx, int64_t B, int64_t C, int64_t H, int64_t W,
                      Strides4 s) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    for (int64_t h = 0; h < H; ++h) {
      const A a = static_cast<A>(to_float(gh[bc * H + h])) / static_cast<A>(W);
      for (int64_t w = 0; w < W; ++w) {
        A v = a + static_cast<A>(to_float(gw[bc * W + w])) / static_cast<A>(H);
        if constexpr (kDy) {
          const T g = st.dy[b * st.sdy.b + c * st.sdy.c + h * st.sdy.h + w * st.sdy.w];
          v = static_cast<A>(to_float(g)) * st.aw[bc * W + w] * st.ah[bc * H + h] + v;
        }
        dx[b * s.b + c * s.c + h * s.h + w * s.w] = store<T>(v);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// coord_scale forward: y = x * aw * ah
// ---------------------------------------------------------------------------------------------

#if FASTATTN_SHORT_ROWS
// y = x * aw * ah over planes with unit-stride rows of W <= 16 NV: a_w in NV registers per plane.
template <typename T, int NV>
void scale_fwd_short(const T* x, const float* ah, const float* aw, T* y, int64_t B, int64_t C, int64_t H, int64_t W,
                     Strides4 sx, Strides4 sy) {
  const __mmask16 tail = lanes_from(16 * (NV - 1), W);
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    __m512 a_w[NV];
    for (int j = 0; j < NV; ++j) a_w[j] = load16(aw + bc * W + 16 * j, row_lanes<NV>(j, tail));
    if (sx.h == W && sy.h == W && H * W <= 4096) {
      // A contiguous plane is walked flat in 16-lane steps against both gates widened over the
      // plane (in L1): at 32x1024x14x14 2.25 ms row by row (one masked step per 14-wide row),
      // 1.75 flat, 1.65 with the prefetch 4 KiB ahead, on the 2-vCPU Xeon VM. Lanes of mw, mh past
      // H W are never stored.
      alignas(64) float mw[4096 + 16], mh[4096 + 16];
      for (int64_t h = 0; h < H; ++h) {
        const __m512 s = _mm512_set1_ps(ah[bc * H + h]);
        for (int j = 0; j < NV; ++j) {
          const __mmask16 k = row_lanes<NV>(j, tail);
          _mm512_mask_storeu_ps(mw + h * W + 16 * j, k, a_w[j]);
          _mm512_mask_storeu_ps(mh + h * W + 16 * j, k, s);
        }
      }
      const T* px = x + b * sx.b + c * sx.c;
      T* py = y + b * sy.b + c * sy.c;
      const int64_t n = H * W;
      for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = lanes_from(i, n);
        _mm_prefetch(reinterpret_cast<const char*>(px + i) + 4096, _MM_HINT_T0);
        const __m512 xw = _mm512_mul_ps(load16(px + i, k), _mm512_load_ps(mw + i));
        store16(py + i, _mm512_mul_ps(xw, _mm512_load_ps(mh + i)), k);
      }
      continue;
    }
    for (int64_t h = 0; h < H; ++h) {
      const __m512 s = _mm512_set1_ps(ah[bc * H + h]);
      const T* px = x + b * sx.b + c * sx.c + h * sx.h;
      T* py = y + b * sy.b + c * sy.c + h * sy.h;
      for (int j = 0; j < NV; ++j) {
        const __mmask16 k = row_lanes<NV>(j, tail);
        store16(py + 16 * j, _mm512_mul_ps(_mm512_mul_ps(load16(px + 16 * j, k), a_w[j]), s), k);
      }
    }
  }
}
#endif

template <typename T>
void scale_fwd_rows(const T* x, const acc_t<T>* ah, const acc_t<T>* aw, T* y, int64_t B, int64_t C, int64_t H,
                     int64_t W, Strides4 sx, Strides4 sy) {
  using A = acc_t<T>;
  const int64_t BC = B * C;
#if FASTATTN_SHORT_ROWS
  if constexpr (!std::is_same<T, double>::value) {
    if (short_rows_ok<T>(BC, H, W)) {
      with_row_vectors(W, [&](auto nv) {
        scale_fwd_short<T, decltype(nv)::value>(x, ah, aw, y, B, C, H, W, sx, sy);
      });
      return;
    }
  }
#endif
  const Split sp = split_axis(BC, H, ceil_div(kMinSegment, W), H);
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < BC * sp.n; ++job) {
    const int64_t bc = job / sp.n, part = job % sp.n;
    const int64_t b = bc / C, c = bc % C;
    const int64_t h0 = part * sp.len_per, h1 = std::min(H, h0 + sp.len_per);
    const A* __restrict__ paw = aw + bc * W;
    for (int64_t h = h0; h < h1; ++h) {
      const A s = ah[bc * H + h];
      const T* __restrict__ px = x + b * sx.b + c * sx.c + h * sx.h;
      T* __restrict__ py = y + b * sy.b + c * sy.c + h * sy.h;
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) py[w] = store<T>(static_cast<A>(to_float(px[w])) * paw[w] * s);
    }
  }
}

template <typename T>
void scale_fwd_channels(const T* x, const acc_t<T>* ah, const acc_t<T>* aw, T* y, int64_t B, int64_t C, int64_t H,
                        int64_t W, Strides4 sx, Strides4 sy) {
  using A = acc_t<T>;
  std::vector<A> ahT(static_cast<size_t>(B * H * C)), awT(static_cast<size_t>(B * W * C));
  channel_major(ah, ahT.data(), B, C, H, A(1));
  channel_major(aw, awT.data(), B, C, W, A(1));
  const int64_t HW = H * W;
  const int64_t P = std::max<int64_t>(1, kPixelWork / C);
  const int64_t nblk = ceil_div(HW, P);
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < B * nblk; ++job) {
    const int64_t b = job / nblk, i0 = (job % nblk) * P, i1 = std::min(HW, i0 + P);
    int64_t h = i0 / W, w = i0 % W;
    for (int64_t i = i0; i < i1; ++i) {
      const T* __restrict__ px = x + b * sx.b + h * sx.h + w * sx.w;
      T* __restrict__ py = y + b * sy.b + h * sy.h + w * sy.w;
      const A* __restrict__ a_h = ahT.data() + (b * H + h) * C;
      const A* __restrict__ a_w = awT.data() + (b * W + w) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) py[c] = store<T>(static_cast<A>(to_float(px[c])) * a_w[c] * a_h[c]);
      if (++w == W) {
        w = 0;
        ++h;
      }
    }
  }
}

template <typename T>
void scale_fwd_generic(const T* x, const acc_t<T>* ah, const acc_t<T>* aw, T* y, int64_t B, int64_t C, int64_t H,
                       int64_t W, Strides4 sx, Strides4 sy) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const A v = static_cast<A>(to_float(x[b * sx.b + c * sx.c + h * sx.h + w * sx.w]));
        y[b * sy.b + c * sy.c + h * sy.h + w * sy.w] = store<T>(v * aw[bc * W + w] * ah[bc * H + h]);
      }
  }
}

// ---------------------------------------------------------------------------------------------
// coord_scale backward: dx = dy * aw * ah, dah = sum_w dy x aw, daw = sum_h dy x ah, one pass
// ---------------------------------------------------------------------------------------------

#if FASTATTN_SHORT_ROWS
// scale_bwd_rows over planes with unit-stride rows of W <= 16 NV (dy's too): a_w and the column
// sums in NV registers, the row sums of 16 rows at a time as one vector (row_sums16). Without kDx
// only dah and daw.
template <typename T, int NV, bool kDx>
void scale_bwd_short(const T* dy, const T* x, const float* ah, const float* aw, T* dx, float* dah, float* daw,
                     int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx) {
  const __mmask16 tail = lanes_from(16 * (NV - 1), W);
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    __m512 a_w[NV], col[NV];
    for (int j = 0; j < NV; ++j) {
      a_w[j] = load16(aw + bc * W + 16 * j, row_lanes<NV>(j, tail));
      col[j] = _mm512_setzero_ps();
    }
    for (int64_t h0 = 0; h0 < H; h0 += 16) {
      const int n = static_cast<int>(std::min<int64_t>(16, H - h0));
      __m512 rows[16];
      for (int r = 0; r < 16; ++r) {
        __m512 acc = _mm512_setzero_ps();
        if (r < n) {
          const int64_t h = h0 + r;
          const __m512 s = _mm512_set1_ps(ah[bc * H + h]);
          const T* pdy = dy + b * sdy.b + c * sdy.c + h * sdy.h;
          const T* px = x + b * sx.b + c * sx.c + h * sx.h;
          for (int j = 0; j < NV; ++j) {
            const __mmask16 k = row_lanes<NV>(j, tail);
            const __m512 g = load16(pdy + 16 * j, k);
            const __m512 gx = _mm512_mul_ps(g, load16(px + 16 * j, k));
            if constexpr (kDx)
              store16(dx + b * sdx.b + c * sdx.c + h * sdx.h + 16 * j, _mm512_mul_ps(_mm512_mul_ps(g, a_w[j]), s), k);
            acc = _mm512_fmadd_ps(gx, a_w[j], acc);
            col[j] = _mm512_fmadd_ps(gx, s, col[j]);
          }
        }
        rows[r] = acc;
      }
      _mm512_mask_storeu_ps(dah + bc * H + h0, lanes_from(0, n), row_sums16(rows));
    }
    for (int j = 0; j < NV; ++j)
      _mm512_mask_storeu_ps(daw + bc * W + 16 * j, row_lanes<NV>(j, tail), col[j]);
  }
}
#endif

// One job = (b, c, a segment of at most kChunk rows). dy rows are read with their own w stride
// unless kUnitDy (an NCHW x with a dy in another layout stays on this path). Without kDx only dah
// and daw.
template <typename T, bool kUnitDy, bool kDx>
void scale_bwd_rows(const T* dy, const T* x, const acc_t<T>* ah, const acc_t<T>* aw, T* dx, acc_t<T>* dah,
                     acc_t<T>* daw, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sx,
                     Strides4 sdx) {
  using A = acc_t<T>;
  const int64_t BC = B * C;
#if FASTATTN_SHORT_ROWS
  if constexpr (kUnitDy && !std::is_same<T, double>::value) {
    if (short_rows_ok<T>(BC, H, W)) {
      with_row_vectors(W, [&](auto nv) {
        scale_bwd_short<T, decltype(nv)::value, kDx>(dy, x, ah, aw, dx, dah, daw, B, C, H, W, sdy, sx, sdx);
      });
      return;
    }
  }
#endif
  const Split sp = split_axis(BC, H, ceil_div(kMinSegment, W), kChunk);
  const int64_t dyw = kUnitDy ? 1 : sdy.w;
  std::vector<double> partial(sp.n > 1 ? static_cast<size_t>(BC * sp.n * W) : 0);
#pragma omp parallel
  {
    std::vector<A> colv(static_cast<size_t>(W));
#pragma omp for schedule(static)
    for (int64_t job = 0; job < BC * sp.n; ++job) {
      const int64_t bc = job / sp.n, part = job % sp.n;
      const int64_t b = bc / C, c = bc % C;
      const int64_t h0 = part * sp.len_per, h1 = std::min(H, h0 + sp.len_per);
      const A* __restrict__ paw = aw + bc * W;
      A* __restrict__ col = colv.data();
      std::fill(colv.begin(), colv.end(), A(0));
      for (int64_t h = h0; h < h1; ++h) {
        const A s = ah[bc * H + h];
        const T* __restrict__ pdy = dy + b * sdy.b + c * sdy.c + h * sdy.h;
        const T* __restrict__ px = x + b * sx.b + c * sx.c + h * sx.h;
        T* __restrict__ pdx = kDx ? dx + b * sdx.b + c * sdx.c + h * sdx.h : nullptr;
        double rt = 0;
        for (int64_t w0 = 0; w0 < W; w0 += kChunk) {
          const int64_t w1 = std::min(W, w0 + kChunk);
          A acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t w = w0; w < w1; ++w) {
            const A g = static_cast<A>(to_float(pdy[w * dyw]));
            const A gx = g * static_cast<A>(to_float(px[w]));
            if constexpr (kDx) pdx[w] = store<T>(g * paw[w] * s);
            acc += gx * paw[w];
            col[w] += gx * s;
          }
          rt += static_cast<double>(acc);
        }
        dah[bc * H + h] = static_cast<A>(rt);
      }
      if (sp.n == 1) {
        for (int64_t w = 0; w < W; ++w) daw[bc * W + w] = col[w];
      } else {
        double* pp = partial.data() + (bc * sp.n + part) * W;
        for (int64_t w = 0; w < W; ++w) pp[w] = col[w];
      }
    }
  }
  if (sp.n > 1) {
#pragma omp parallel for schedule(static)
    for (int64_t bc = 0; bc < BC; ++bc)
      for (int64_t w = 0; w < W; ++w) {
        double t = 0;
        for (int64_t s = 0; s < sp.n; ++s) t += partial[(bc * sp.n + s) * W + w];
        daw[bc * W + w] = static_cast<A>(t);
      }
  }
}

// One job = (b, a segment of at most kChunk rows); inner loops along the channel rows, with the
// gates transposed to (B, L, C) rows first. dy is read with its own channel stride unless kUnitDy.
// Without kDx only dah and daw.
template <typename T, bool kUnitDy, bool kDx>
void scale_bwd_channels(const T* dy, const T* x, const acc_t<T>* ah, const acc_t<T>* aw, T* dx, acc_t<T>* dah,
                        acc_t<T>* daw, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sx,
                        Strides4 sdx) {
  using A = acc_t<T>;
  std::vector<A> ahT(static_cast<size_t>(B * H * C)), awT(static_cast<size_t>(B * W * C));
  channel_major(ah, ahT.data(), B, C, H, A(1));
  channel_major(aw, awT.data(), B, C, W, A(1));
  const int64_t WC = W * C;
  const Split sp = split_axis(B, H, ceil_div(kMinSegment, WC), kChunk);
  const int64_t dyc = kUnitDy ? 1 : sdy.c;
  std::vector<double> partial(sp.n > 1 ? static_cast<size_t>(B * sp.n * WC) : 0);
#pragma omp parallel
  {
    std::vector<A> colv(static_cast<size_t>(WC)), racc(static_cast<size_t>(C));
    std::vector<double> rtot(static_cast<size_t>(C));
#pragma omp for schedule(static)
    for (int64_t job = 0; job < B * sp.n; ++job) {
      const int64_t b = job / sp.n, part = job % sp.n;
      const int64_t h0 = part * sp.len_per, h1 = std::min(H, h0 + sp.len_per);
      std::fill(colv.begin(), colv.end(), A(0));
      for (int64_t h = h0; h < h1; ++h) {
        const A* __restrict__ a_h = ahT.data() + (b * H + h) * C;
        std::fill(rtot.begin(), rtot.end(), 0.0);
        for (int64_t w0 = 0; w0 < W; w0 += kChunk) {
          const int64_t w1 = std::min(W, w0 + kChunk);
          A* __restrict__ ra = racc.data();
          std::fill(racc.begin(), racc.end(), A(0));
          for (int64_t w = w0; w < w1; ++w) {
            const T* __restrict__ pdy = dy + b * sdy.b + h * sdy.h + w * sdy.w;
            const T* __restrict__ px = x + b * sx.b + h * sx.h + w * sx.w;
            T* __restrict__ pdx = kDx ? dx + b * sdx.b + h * sdx.h + w * sdx.w : nullptr;
            const A* __restrict__ a_w = awT.data() + (b * W + w) * C;
            A* __restrict__ cw = colv.data() + w * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const A g = static_cast<A>(to_float(pdy[c * dyc]));
              const A gx = g * static_cast<A>(to_float(px[c]));
              if constexpr (kDx) pdx[c] = store<T>(g * a_w[c] * a_h[c]);
              ra[c] += gx * a_w[c];
              cw[c] += gx * a_h[c];
            }
          }
          for (int64_t c = 0; c < C; ++c) rtot[c] += static_cast<double>(ra[c]);
        }
        for (int64_t c = 0; c < C; ++c) dah[(b * C + c) * H + h] = static_cast<A>(rtot[c]);
      }
      if (sp.n == 1) {
        for (int64_t c = 0; c < C; ++c)
          for (int64_t w = 0; w < W; ++w) daw[(b * C + c) * W + w] = colv[w * C + c];
      } else {
        double* pp = partial.data() + (b * sp.n + part) * WC;
        for (int64_t i = 0; i < WC; ++i) pp[i] = colv[i];
      }
    }
  }
  if (sp.n > 1) {
#pragma omp parallel for schedule(static)
    for (int64_t bc = 0; bc < B * C; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      for (int64_t w = 0; w < W; ++w) {
        double t = 0;
        for (int64_t s = 0; s < sp.n; ++s) t += partial[(b * sp.n + s) * WC + w * C + c];
        daw[bc * W + w] = static_cast<A>(t);
      }
    }
  }
}

template <typename T>
void scale_bwd_generic(const T* dy, const T* x, const acc_t<T>* ah, const acc_t<T>* aw, T* dx, acc_t<T>* dah,
                       acc_t<T>* daw, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sx,
                       Strides4 sdx) {
  using A = acc_t<T>;
#pragma omp parallel
  {
    std::vector<double> col(static_cast<size_t>(W));
#pragma omp for schedule(static)
    for (int64_t bc = 0; bc < B * C; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      std::fill(col.begin(), col.end(), 0.0);
      for (int64_t h = 0; h < H; ++h) {
        const A s = ah[bc * H + h];
        double rs = 0;
        for (int64_t w = 0; w < W; ++w) {
          const A g = static_cast<A>(to_float(dy[b * sdy.b + c * sdy.c + h * sdy.h + w * sdy.w]));
          const A gx = g * static_cast<A>(to_float(x[b * sx.b + c * sx.c + h * sx.h + w * sx.w]));
          if (dx) dx[b * sdx.b + c * sdx.c + h * sdx.h + w * sdx.w] = store<T>(g * aw[bc * W + w] * s);
          rs += static_cast<double>(gx * aw[bc * W + w]);
          col[w] += static_cast<double>(gx * s);
        }
        dah[bc * H + h] = static_cast<A>(rs);
      }
      for (int64_t w = 0; w < W; ++w) daw[bc * W + w] = static_cast<A>(col[w]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// layout dispatch
// ---------------------------------------------------------------------------------------------

enum class Path { kRows, kChannels, kGeneric };

// The walk for tensors of sizes (C, W) with strides s (x and the output; dy is read with its own
// strides): unit-stride rows of W (NCHW, its channel slices and spatial crops), else unit-stride
// channels (channels_last), else rows of one element (W == 1), else generic.
inline Path pick_path(std::initializer_list<Strides4> s, int64_t C, int64_t W) {
  if (W > 1 && std::all_of(s.begin(), s.end(), [](const Strides4& t) { return t.w == 1; })) return Path::kRows;
  if (std::all_of(s.begin(), s.end(), [C](const Strides4& t) { return channels_contiguous(t, C); }))
    return Path::kChannels;
  return W == 1 ? Path::kRows : Path::kGeneric;
}

template <typename T>
void pool_fwd(const T* x, T* xh, T* xw, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx) {
  switch (pick_path({sx}, C, W)) {
    case Path::kRows: return pool_fwd_rows(x, xh, xw, B, C, H, W, sx);
    case Path::kChannels: return pool_fwd_channels(x, xh, xw, B, C, H, W, sx);
    default: return pool_fwd_generic(x, xh, xw, B, C, H, W, sx);
  }
}

template <typename T, bool kDy>
void pool_bwd_walk(const T* gh, const T* gw, ScaleTerm<T> st, T* dx, int64_t B, int64_t C, int64_t H, int64_t W,
                   Strides4 s) {
  switch (pick_path({s, kDy ? st.sdy : s}, C, W)) {
    case Path::kRows: return pool_bwd_rows<T, kDy>(gh, gw, st, dx, B, C, H, W, s);
    case Path::kChannels: return pool_bwd_channels<T, kDy>(gh, gw, st, dx, B, C, H, W, s);
    default: return pool_bwd_generic<T, kDy>(gh, gw, st, dx, B, C, H, W, s);
  }
}

template <typename T>
void pool_bwd(const T* gh, const T* gw, ScaleTerm<T> st, T* dx, int64_t B, int64_t C, int64_t H, int64_t W,
              Strides4 s) {
  if (st.dy) return pool_bwd_walk<T, true>(gh, gw, st, dx, B, C, H, W, s);
  return pool_bwd_walk<T, false>(gh, gw, st, dx, B, C, H, W, s);
}

template <typename T>
void scale_fwd(const T* x, const acc_t<T>* ah, const acc_t<T>* aw, T* y, int64_t B, int64_t C, int64_t H, int64_t W,
               Strides4 sx, Strides4 sy) {
  switch (pick_path({sx, sy}, C, W)) {
    case Path::kRows: return scale_fwd_rows(x, ah, aw, y, B, C, H, W, sx, sy);
    case Path::kChannels: return scale_fwd_channels(x, ah, aw, y, B, C, H, W, sx, sy);
    default: return scale_fwd_generic(x, ah, aw, y, B, C, H, W, sx, sy);
  }
}

// dx null: dah and daw only (sdx is then ignored).
template <typename T, bool kDx>
void scale_bwd_walk(const T* dy, const T* x, const acc_t<T>* ah, const acc_t<T>* aw, T* dx, acc_t<T>* dah,
                    acc_t<T>* daw, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sx,
                    Strides4 sdx) {
  switch (pick_path({sx, kDx ? sdx : sx}, C, W)) {
    case Path::kRows:
      if (sdy.w == 1 || W == 1)
        return scale_bwd_rows<T, true, kDx>(dy, x, ah, aw, dx, dah, daw, B, C, H, W, sdy, sx, sdx);
      return scale_bwd_rows<T, false, kDx>(dy, x, ah, aw, dx, dah, daw, B, C, H, W, sdy, sx, sdx);
    case Path::kChannels:
      if (channels_contiguous(sdy, C))
        return scale_bwd_channels<T, true, kDx>(dy, x, ah, aw, dx, dah, daw, B, C, H, W, sdy, sx, sdx);
      return scale_bwd_channels<T, false, kDx>(dy, x, ah, aw, dx, dah, daw, B, C, H, W, sdy, sx, sdx);
    default: return scale_bwd_generic(dy, x, ah, aw, dx, dah, daw, B, C, H, W, sdy, sx, sdx);
  }
}

template <typename T>
void scale_bwd(const T* dy, const T* x, const acc_t<T>* ah, const acc_t<T>* aw, T* dx, acc_t<T>* dah, acc_t<T>* daw,
               int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx) {
  if (dx) return scale_bwd_walk<T, true>(dy, x, ah, aw, dx, dah, daw, B, C, H, W, sdy, sx, sdx);
  return scale_bwd_walk<T, false>(dy, x, ah, aw, dx, dah, daw, B, C, H, W, sdy, sx, sdx);
}

}  // namespace

#define FA_DISPATCH(CALL)            \
  switch (dtype) {                   \
    case DType::Float32: {           \
      using T = float;               \
      CALL;                          \
      return;                        \
    }                                \
    case DType::Float64: {           \
      using T = double;              \
      CALL;                          \
      return;                        \
    }                                \
    case DType::Float16: {           \
      using T = fp16_t;              \
      CALL;                          \
      return;                        \
    }                                \
    case DType::BFloat16: {          \
      using T = bf16_t;              \
      CALL;                          \
      return;                        \
    }                                \
  }

void coord_pool_forward_cpu(const void* x, void* xh, void* xw, DType dtype, int64_t B, int64_t C, int64_t H,
                            int64_t W, Strides4 sx) {
  if (B * C * H * W == 0) return;
  FA_DISPATCH(pool_fwd(static_cast<const T*>(x), static_cast<T*>(xh), static_cast<T*>(xw), B, C, H, W, sx))
}

void coord_pool_backward_cpu(const void* gh, const void* gw, void* dx, DType dtype, int64_t B, int64_t C,
                             int64_t H, int64_t W, Strides4 sdx) {
  if (B * C * H * W == 0) return;
  FA_DISPATCH(pool_bwd(static_cast<const T*>(gh), static_cast<const T*>(gw),
                       ScaleTerm<T>{nullptr, sdx, nullptr, nullptr}, static_cast<T*>(dx), B, C, H, W, sdx))
}

void coord_backward_dx_cpu(const void* dy, const void* ah, const void* aw, const void* gh, const void* gw, void* dx,
                           DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sdx) {
  if (B * C * H * W == 0) return;
  FA_DISPATCH(pool_bwd(static_cast<const T*>(gh), static_cast<const T*>(gw),
                       ScaleTerm<T>{static_cast<const T*>(dy), sdy, static_cast<const acc_t<T>*>(ah),
                                    static_cast<const acc_t<T>*>(aw)},
                       static_cast<T*>(dx), B, C, H, W, sdx))
}

void coord_scale_forward_cpu(const void* x, const void* ah, const void* aw, void* y, DType dtype, int64_t B,
                             int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sy) {
  if (B * C * H * W == 0) return;
  FA_DISPATCH(scale_fwd(static_cast<const T*>(x), static_cast<const acc_t<T>*>(ah), static_cast<const acc_t<T>*>(aw),
                        static_cast<T*>(y), B, C, H, W, sx, sy))
}

void coord_scale_backward_cpu(const void* dy, const void* x, const void* ah, const void* aw, void* dx, void* dah,
                              void* daw, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy,
                              Strides4 sx, Strides4 sdx) {
  if (B * C * H * W == 0) return;
  FA_DISPATCH(scale_bwd(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const acc_t<T>*>(ah),
                        static_cast<const acc_t<T>*>(aw), static_cast<T*>(dx), static_cast<acc_t<T>*>(dah),
                        static_cast<acc_t<T>*>(daw), B, C, H, W, sdy, sx, sdx))
}

#undef FA_DISPATCH

}  // namespace fastattn
