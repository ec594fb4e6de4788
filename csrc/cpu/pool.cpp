// Channel pooling on the CPU: mean / max / std of every (b, c) plane in one read of x, FcaNet's
// weighted (DCT) pool, and their backward passes. OpenMP across independent work; fp32 math for
// 16/32-bit inputs (chunks of fp32 sums folded into double), fp64 for fp64. Three layouts: H x W
// plane contiguous (NCHW and its channel slices), channels contiguous (channels_last), anything
// else (generic: correct, not fast). Every reduction is split at boundaries that depend on the
// shape alone and merged in a fixed order, so results do not depend on the thread count.
#include "pool.h"
#include "pool_convert.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace fastattn {
namespace {

// Split the work when B * C (or B * channel blocks) alone gives fewer jobs than this.
constexpr int64_t kMinJobs = 64;
// NCHW: a plane segment covers at least this many elements (the split only pays on big planes).
constexpr int64_t kMinSeg = 4 * kChunk;
// channels_last: channels per job at most, elements (pixels x channels) per cache-resident chunk.
constexpr int64_t kMaxBlock = 1024;
constexpr int64_t kBlockWork = 16384;
// channels_last: pixels per job segment at least.
constexpr int64_t kMinPixels = 64;

using pool_cvt::ld;
using pool_cvt::put;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Channel blocks of equal width (a multiple of 16), at most kMaxBlock wide.
inline int64_t block_width(int64_t C, int64_t* n_blocks) {
  const int64_t n = std::max<int64_t>(1, ceil_div(C, kMaxBlock));
  *n_blocks = n;
  return std::max<int64_t>(16, ceil_div(ceil_div(C, n), 16) * 16);
}

// Pixel segments per (sample, channel block) job group: enough jobs for the threads when B * nC is
// small, never shorter than min_len.
inline int64_t pixel_segments(int64_t jobs, int64_t HW, int64_t min_len) {
  const int64_t s = std::max<int64_t>(1, ceil_div(kMinJobs, std::max<int64_t>(jobs, 1)));
  return std::max<int64_t>(1, std::min(s, HW / min_len));
}

// ---------------------------------------------------------------------------------------------
// channel_pool forward
// ---------------------------------------------------------------------------------------------

// Statistics of a run of positions: count, sum, sum of squared deviations from the run's mean, and
// the max with the flat index of its first occurrence (NaN wins over any number; idx -1: none yet).
// With std, the sums are of x - K, K the plane's first value: a plane far from zero (mean 1e4,
// std 1) keeps its digits in fp32, as the deviations stay of the size of the spread.
template <typename A>
struct Stat {
  double n = 0, sum = 0, m2 = 0;
  A max = -std::numeric_limits<A>::infinity();
  int64_t idx = -1;
};

template <typename A>
inline bool is_nan(A v) { return v != v; }

// The shift of a plane's sums: its first value, or 0 when that is not finite (an inf would turn
// the shifted sums into NaN).
template <typename T>
inline acc_t<T> shift_of(const T& first) {
  const acc_t<T> v = ld(first);
  return std::isfinite(v) ? v : acc_t<T>(0);
}

// a <- a followed by b (b's positions come after a's). Chan et al.'s pairwise update of m2.
template <typename A>
inline void merge(Stat<A>& a, const Stat<A>& b) {
  if (b.n > 0) {
    if (a.n == 0) {
      a.m2 = b.m2;
    } else {
      const double d = b.sum / b.n - a.sum / a.n;
      a.m2 += b.m2 + d * d * (a.n * b.n / (a.n + b.n));
    }
    a.n += b.n;
    a.sum += b.sum;
  }
  if (b.idx >= 0 && (a.idx < 0 || (!is_nan(a.max) && (is_nan(b.max) || b.max > a.max)))) {
    a.max = b.max;
    a.idx = b.idx;
  }
}

// The first of n positions p[0], p[stride], ... holding a NaN (kNan) or the value mx; one exists.
// Blocks of 16 are tested with a vectorised OR before the scalar scan of the block that hits: a
// plain scalar scan cost as much as the whole fused sum/max pass on 14 x 14 planes.
template <typename T, bool kNan>
int64_t first_match(const T* __restrict__ p, int64_t n, int64_t stride, acc_t<T> mx) {
  using A = acc_t<T>;
  constexpr int64_t kBlock = 16;
  int64_t i0 = 0;
  for (; i0 + kBlock <= n; i0 += kBlock) {
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t j = 0; j < kBlock; ++j) {
      const A v = ld(p[(i0 + j) * stride]);
      hit |= kNan ? (v != v) : (v == mx);
    }
    if (hit) break;
  }
  for (int64_t i = i0;; ++i) {
    const A v = ld(p[i * stride]);
    if (kNan ? (v != v) : (v == mx)) return i;
  }
}

// Fold n positions p[0], p[stride], ... (flat indices idx0, idx0 + 1, ...) into st, the sums of
// x - K with std. The positions stay in L1 between the sum and the deviation passes (n <= kChunk).
template <typename T, bool kMax, bool kStd, bool kUnit>
void fold_run(const T* __restrict__ p, int64_t n, int64_t stride, int64_t idx0, acc_t<T> K, Stat<acc_t<T>>& st) {
  using A = acc_t<T>;
  const int64_t st_ = kUnit ? 1 : stride;
  Stat<A> c;
  c.n = static_cast<double>(n);
  A s = 0;
  const bool want_max = kMax && !(st.idx >= 0 && is_nan(st.max));  // a NaN already seen wins
  if (want_max) {
    A mx = -std::numeric_limits<A>::infinity();
    int nan = 0;
#pragma omp simd reduction(+ : s) reduction(max : mx) reduction(| : nan)
    for (int64_t i = 0; i < n; ++i) {
      const A v = ld(p[i * st_]);
      s += kStd ? v - K : v;
      mx = v > mx ? v : mx;
      nan |= (v != v);
    }
    if (nan) {
      c.max = std::numeric_limits<A>::quiet_NaN();
      c.idx = idx0 + first_match<T, true>(p, n, st_, mx);
    } else if (st.idx < 0 || mx > st.max) {
      c.max = mx;
      c.idx = idx0 + first_match<T, false>(p, n, st_, mx);
    }
  } else if constexpr (kUnit) {   // explicit lanes (see lane_sum in common.h): 14 x 14 planes
    s = lane_sum<A>(0, n, [&](int64_t i) { return kStd ? ld(p[i]) - K : ld(p[i]); });
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += kStd ? ld(p[i * st_]) - K : ld(p[i * st_]);
  }
  c.sum = static_cast<double>(s);
  if (kStd) {
    const A m = s / static_cast<A>(n);
    A q = 0;
    if constexpr (kUnit) {
      q = lane_sum<A>(0, n, [&](int64_t i) {
        const A d = (ld(p[i]) - K) - m;
        return d * d;
      });
    } else {
#pragma omp simd reduction(+ : q)
      for (int64_t i = 0; i < n; ++i) {
        const A d = (ld(p[i * st_]) - K) - m;
        q += d * d;
      }
    }
    c.m2 = static_cast<double>(q);
  }
  merge(st, c);
}

// The results of plane bc from its statistics (sums of x - K).
template <typename T>
void finalize(const Stat<acc_t<T>>& st, int64_t bc, int64_t HW, double eps, acc_t<T> K, const PoolOutputs& out) {
  using A = acc_t<T>;
  const double mean = static_cast<double>(K) + st.sum / static_cast<double>(HW);
  if (out.mean) static_cast<T*>(out.mean)[bc] = from_double<T>(mean);
  if (out.mean_acc) static_cast<A*>(out.mean_acc)[bc] = static_cast<A>(mean);
  if (out.max) static_cast<T*>(out.max)[bc] = put<T>(st.max);
  if (out.argmax) out.argmax[bc] = st.idx;
  if (out.std || out.std_acc) {
    const double sd = std::sqrt(st.m2 / static_cast<double>(HW - 1) + eps);
    if (out.std) static_cast<T*>(out.std)[bc] = from_double<T>(sd);
    if (out.std_acc) static_cast<A*>(out.std_acc)[bc] = static_cast<A>(sd);
  }
}

// NCHW: jobs of (plane, segment); a plane is split only when B * C is small and the plane big.
template <typename T, bool kMax, bool kStd>
void pool_plane(const T* x, int64_t B, int64_t C, int64_t HW, Strides4 sx, double eps, const PoolOutputs& out) {
  using A = acc_t<T>;
  const int64_t BC = B * C;
  const int64_t S = pixel_segments(BC, HW, kMinSeg);
  const int64_t seg = ceil_div(ceil_div(HW, S), kChunk) * kChunk;
  const int64_t nseg = ceil_div(HW, seg);
  if constexpr (!kMax && !kStd) {
    if (nseg == 1) {   // mean alone (SE, ECA): a plain sum per plane, no statistics to merge
#pragma omp parallel for schedule(static)
      for (int64_t bc = 0; bc < BC; ++bc) {
        const T* p = x + (bc / C) * sx.b + (bc % C) * sx.c;
        double total = 0;
        for (int64_t i0 = 0; i0 < HW; i0 += kChunk) {
          const int64_t n = std::min(HW, i0 + kChunk) - i0;
          total += static_cast<double>(lane_sum<A>(i0, i0 + n, [&](int64_t i) { return ld(p[i]); }));
        }
        const double mean = total / static_cast<double>(HW);
        if (out.mean) static_cast<T*>(out.mean)[bc] = from_double<T>(mean);
        if (out.mean_acc) static_cast<A*>(out.mean_acc)[bc] = static_cast<A>(mean);
      }
      return;
    }
  }
  std::vector<Stat<A>> partial(nseg > 1 ? static_cast<size_t>(BC * nseg) : 0);
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < BC * nseg; ++job) {
    const int64_t bc = job / nseg, s = job % nseg;
    const int64_t b = bc / C, c = bc % C;
    const T* p = x + b * sx.b + c * sx.c;
    const A K = kStd ? shift_of(p[0]) : A(0);
    const int64_t p0 = s * seg, p1 = std::min(HW, p0 + seg);
    prefetch_ahead(p + p0, p1 - p0);   // (channel_pool mean, max at 32x1024x14x14: 2.65 -> 1.92 ms)
    Stat<A> st;
    for (int64_t i0 = p0; i0 < p1; i0 += kChunk)
      fold_run<T, kMax, kStd, true>(p + i0, std::min(p1, i0 + kChunk) - i0, 1, i0, K, st);
    if (nseg == 1) finalize<T>(st, bc, HW, eps, K, out);
    else partial[job] = st;
  }
  if (nseg > 1) {
#pragma omp parallel for schedule(static)
    for (int64_t bc = 0; bc < BC; ++bc) {
      Stat<A> st;
      for (int64_t s = 0; s < nseg; ++s) merge(st, partial[bc * nseg + s]);
      const A K = kStd ? shift_of(x[(bc / C) * sx.b + (bc % C) * sx.c]) : A(0);
      finalize<T>(st, bc, HW, eps, K, out);
    }
  }
}

// Per-thread scratch of the channels-contiguous pool: one entry per channel of a block; the chunk's
// statistics (s, mx, q, ix, nan) and the running ones (rsum, rm2, rmx, ridx) as arrays, so that the
// per-chunk merge is a vector loop (every channel of a chunk has the same count).
template <typename A>
struct ChannelScratch {
  std::vector<A> s, mx, q, cm, k, rmx;
  std::vector<int32_t> ix, nan;
  std::vector<double> rsum, rm2;
  std::vector<int64_t> ridx;
  explicit ChannelScratch(int64_t n)
      : s(n), mx(n), q(n), cm(n), k(n), rmx(n), ix(n), nan(n), rsum(n), rm2(n), ridx(n) {}
};

// channels_last: jobs of (sample, channel block, pixel segment); the inner loops run over the
// block's channels (unit stride). Pixels are taken in chunks that stay in cache for the deviation
// pass; the max keeps a per-channel in-chunk index (a vectorised blend), NaNs are located after.
template <typename T, bool kMax, bool kStd>
void pool_channels(const T* x, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, double eps,
                   const PoolOutputs& out) {
  using A = acc_t<T>;
  const int64_t HW = H * W;
  int64_t nC;
  const int64_t kBlock = block_width(C, &nC);
  const int64_t S = pixel_segments(B * nC, HW, kMinPixels);
  const int64_t seg = ceil_div(HW, S);
  const int64_t P = std::max<int64_t>(1, kBlockWork / kBlock);  // pixels per chunk
  std::vector<Stat<A>> partial(S > 1 ? static_cast<size_t>(B * S * C) : 0);
#pragma omp parallel
  {
    ChannelScratch<A> sc(kBlock);
#pragma omp for schedule(static)
    for (int64_t job = 0; job < B * nC * S; ++job) {
      const int64_t s = job % S, bcb = job / S;
      const int64_t b = bcb / nC, c0 = (bcb % nC) * kBlock;
      const int64_t n = std::min(kBlock, C - c0);
      const int64_t p0 = s * seg, p1 = std::min(HW, p0 + seg);
      const T* xb = x + b * sx.b + c0;
      A* __restrict__ cs = sc.s.data();
      A* __restrict__ cmx = sc.mx.data();
      A* __restrict__ cq = sc.q.data();
      A* __restrict__ cm = sc.cm.data();
      int32_t* __restrict__ cix = sc.ix.data();
      int32_t* __restrict__ cnan = sc.nan.data();
      A* __restrict__ ck = sc.k.data();
      double* __restrict__ rsum = sc.rsum.data();
      double* __restrict__ rm2 = sc.rm2.data();
      A* __restrict__ rmx = sc.rmx.data();
      int64_t* __restrict__ ridx = sc.ridx.data();
      double rn = 0;                                 // positions merged so far (every channel)
      for (int64_t c = 0; c < n; ++c) {
        ck[c] = kStd ? shift_of(xb[c]) : A(0);       // (h, w) = (0, 0)
        rsum[c] = rm2[c] = 0;
        rmx[c] = -std::numeric_limits<A>::infinity();
        ridx[c] = -1;
      }
      for (int64_t i0 = p0; i0 < p1; i0 += P) {
        const int64_t i1 = std::min(p1, i0 + P);
        const int64_t h0 = i0 / W, w0 = i0 % W;
        for (int64_t c = 0; c < n; ++c) {
          cs[c] = 0;
          cmx[c] = -std::numeric_limits<A>::infinity();
          cix[c] = -1;
          cnan[c] = 0;
        }
        int64_t h = h0, w = w0;
        for (int64_t i = i0; i < i1; ++i) {
          const T* __restrict__ px = xb + h * sx.h + w * sx.w;
          const int32_t rel = static_cast<int32_t>(i - i0);
          if (kMax) {
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) {
              const A v = ld(px[c]);
              cs[c] += kStd ? v - ck[c] : v;
              const bool gt = v > cmx[c];
              cmx[c] = gt ? v : cmx[c];
              cix[c] = gt ? rel : cix[c];
              cnan[c] |= (v != v);
            }
          } else {
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) cs[c] += kStd ? ld(px[c]) - ck[c] : ld(px[c]);
          }
          if (++w == W) { w = 0; ++h; }
        }
        const A cnt = static_cast<A>(i1 - i0);
        if (kStd) {
          for (int64_t c = 0; c < n; ++c) {
            cm[c] = cs[c] / cnt;
            cq[c] = 0;
          }
          h = h0, w = w0;
          for (int64_t i = i0; i < i1; ++i) {
            const T* __restrict__ px = xb + h * sx.h + w * sx.w;
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) {
              const A d = (ld(px[c]) - ck[c]) - cm[c];
              cq[c] += d * d;
            }
            if (++w == W) { w = 0; ++h; }
          }
        }
        // merge the chunk into the running statistics (Chan et al., as merge(), vectorised)
        const double cn = static_cast<double>(i1 - i0);
        if (kStd) {
          if (rn == 0) {
            for (int64_t c = 0; c < n; ++c) rm2[c] = static_cast<double>(cq[c]);
          } else {
            const double icn = 1.0 / cn, irn = 1.0 / rn, f = rn * cn / (rn + cn);
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) {
              const double d = static_cast<double>(cs[c]) * icn - rsum[c] * irn;
              rm2[c] += static_cast<double>(cq[c]) + d * d * f;
            }
          }
        }
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) rsum[c] += static_cast<double>(cs[c]);
        rn += cn;
        if (kMax) {
          for (int64_t c = 0; c < n; ++c) {
            if (ridx[c] >= 0 && is_nan(rmx[c])) continue;   // a NaN already seen wins
            if (cnan[c]) {                         // rare: find the chunk's first NaN of channel c
              int64_t hh = h0, ww = w0, i = i0;
              while (!is_nan(ld(xb[hh * sx.h + ww * sx.w + c]))) {
                ++i;
                if (++ww == W) { ww = 0; ++hh; }
              }
              rmx[c] = std::numeric_limits<A>::quiet_NaN();
              ridx[c] = i;
            } else if (cix[c] >= 0) {
              if (ridx[c] < 0 || cmx[c] > rmx[c]) rmx[c] = cmx[c], ridx[c] = i0 + cix[c];
            } else if (ridx[c] < 0) {              // every value so far -inf: the first one
              ridx[c] = i0;
            }
          }
        }
      }
      auto stat = [&](int64_t c) {
        Stat<A> st;
        st.n = rn, st.sum = rsum[c], st.m2 = rm2[c], st.max = rmx[c], st.idx = ridx[c];
        return st;
      };
      if (S == 1) {
        for (int64_t c = 0; c < n; ++c) finalize<T>(stat(c), b * C + c0 + c, HW, eps, ck[c], out);
      } else {
        Stat<A>* pp = partial.data() + (b * S + s) * C + c0;
        for (int64_t c = 0; c < n; ++c) pp[c] = stat(c);
      }
    }
  }
  if (S > 1) {
#pragma omp parallel for schedule(static)
    for (int64_t bc = 0; bc < B * C; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      Stat<A> st;
      for (int64_t s = 0; s < S; ++s) merge(st, partial[(b * S + s) * C + c]);
      const A K = kStd ? shift_of(x[b * sx.b + c * sx.c]) : A(0);
      finalize<T>(st, bc, HW, eps, K, out);
    }
  }
}

// Any other strides: one plane per job, row by row (runs of W strided positions).
template <typename T, bool kMax, bool kStd>
void pool_generic(const T* x, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, double eps,
                  const PoolOutputs& out) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    Stat<A> st;
    const A K = kStd ? shift_of(x[b * sx.b + c * sx.c]) : A(0);
    for (int64_t h = 0; h < H; ++h) {
      const T* row = x + b * sx.b + c * sx.c + h * sx.h;
      for (int64_t w0 = 0; w0 < W; w0 += kChunk)
        fold_run<T, kMax, kStd, false>(row + w0 * sx.w, std::min(W, w0 + kChunk) - w0, sx.w, h * W + w0, K, st);
    }
    finalize<T>(st, bc, H * W, eps, K, out);
  }
}

template <typename T, bool kMax, bool kStd>
void pool_layout(const T* x, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, double eps,
                 const PoolOutputs& out) {
  if (plane_contiguous(sx, H, W)) return pool_plane<T, kMax, kStd>(x, B, C, H * W, sx, eps, out);
  if (channels_contiguous(sx, C)) return pool_channels<T, kMax, kStd>(x, B, C, H, W, sx, eps, out);
  pool_generic<T, kMax, kStd>(x, B, C, H, W, sx, eps, out);
}

template <typename T>
void pool_typed(const T* x, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, double eps,
                const PoolOutputs& out) {
  if (B * C == 0) return;
  if (H * W == 0) {                         // mean of nothing: NaN, as torch
    Stat<acc_t<T>> none;
    for (int64_t bc = 0; bc < B * C; ++bc) finalize<T>(none, bc, 0, eps, acc_t<T>(0), out);
    return;
  }
  const bool mx = out.max || out.argmax;
  const bool sd = out.std || out.std_acc;
  if (mx && sd) return pool_layout<T, true, true>(x, B, C, H, W, sx, eps, out);
  if (mx) return pool_layout<T, true, false>(x, B, C, H, W, sx, eps, out);
  if (sd) return pool_layout<T, false, true>(x, B, C, H, W, sx, eps, out);
  pool_layout<T, false, false>(x, B, C, H, W, sx, eps, out);
}

// ---------------------------------------------------------------------------------------------
// channel_pool backward
// ---------------------------------------------------------------------------------------------

// Per (b, c): dx = a + k * (x - m), plus dmax at the argmax. a = dmean / HW, k = dstd / ((HW - 1) std).
template <typename A>
struct PlaneGrad {
  A a = 0, k = 0, m = 0, g = 0;
  int64_t idx = -1;
};

template <typename A>
inline PlaneGrad<A> plane_grad(const PoolGrads& gr, int64_t bc, int64_t HW) {
  PlaneGrad<A> r;
  if (gr.dmean) r.a = static_cast<A>(static_cast<double>(static_cast<const A*>(gr.dmean)[bc]) / HW);
  if (gr.dstd) {
    const double sd = static_cast<const A*>(gr.std)[bc];
    r.k = static_cast<A>(static_cast<double>(static_cast<const A*>(gr.dstd)[bc]) / ((HW - 1) * sd));
    r.m = static_cast<const A*>(gr.mean)[bc];
  }
  if (gr.dmax) {
    r.g = static_cast<const A*>(gr.dmax)[bc];
    r.idx = gr.argmax[bc];
  }
  return r;
}

template <typename T, bool kStd>
inline acc_t<T> grad_at(const PlaneGrad<acc_t<T>>& q, const T* px) {
  if (kStd) return q.a + q.k * (ld(*px) - q.m);
  return q.a;
}

// NCHW (dx plane contiguous, x too when read): jobs of (plane, segment), elementwise.
template <typename T, bool kStd>
void pool_bwd_plane(const T* x, T* dx, int64_t B, int64_t C, int64_t HW, Strides4 sx, Strides4 sdx,
                    const PoolGrads& gr) {
  using A = acc_t<T>;
  const int64_t BC = B * C;
  const int64_t S = pixel_segments(BC, HW, kMinSeg);
  const int64_t seg = ceil_div(HW, S);
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < BC * S; ++job) {
    const int64_t bc = job / S, s = job % S;
    const int64_t b = bc / C, c = bc % C;
    const int64_t p0 = s * seg, p1 = std::min(HW, p0 + seg);
    const PlaneGrad<A> q = plane_grad<A>(gr, bc, HW);
    const T* __restrict__ px = kStd ? x + b * sx.b + c * sx.c : nullptr;
    T* __restrict__ pd = dx + b * sdx.b + c * sdx.c;
    if (kStd) {
#pragma omp simd
      for (int64_t i = p0; i < p1; ++i) pd[i] = put<T>(q.a + q.k * (ld(px[i]) - q.m));
    } else {
      const T v = put<T>(q.a);
#pragma omp simd
      for (int64_t i = p0; i < p1; ++i) pd[i] = v;
    }
    if (q.idx >= p0 && q.idx < p1) pd[q.idx] = put<T>(grad_at<T, kStd>(q, kStd ? px + q.idx : nullptr) + q.g);
  }
}

// channels_last (dx channels contiguous, x too when read): jobs of (sample, channel block, pixel
// segment); the max gradient is added to the pixels of the job's segment afterwards.
template <typename T, bool kStd>
void pool_bwd_channels(const T* x, T* dx, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sdx,
                       const PoolGrads& gr) {
  using A = acc_t<T>;
  const int64_t HW = H * W;
  int64_t nC;
  const int64_t kBlock = block_width(C, &nC);
  const int64_t S = pixel_segments(B * nC, HW, kMinPixels);
  const int64_t seg = ceil_div(HW, S);
#pragma omp parallel
  {
    std::vector<A> va(kBlock), vk(kBlock), vm(kBlock);
    std::vector<PlaneGrad<A>> qs(kBlock);
#pragma omp for schedule(static)
    for (int64_t job = 0; job < B * nC * S; ++job) {
      const int64_t s = job % S, bcb = job / S;
      const int64_t b = bcb / nC, c0 = (bcb % nC) * kBlock;
      const int64_t n = std::min(kBlock, C - c0);
      const int64_t p0 = s * seg, p1 = std::min(HW, p0 + seg);
      A* __restrict__ a = va.data();
      A* __restrict__ k = vk.data();
      A* __restrict__ m = vm.data();
      for (int64_t c = 0; c < n; ++c) {
        qs[c] = plane_grad<A>(gr, b * C + c0 + c, HW);
        a[c] = qs[c].a, k[c] = qs[c].k, m[c] = qs[c].m;
      }
      int64_t h = p0 / W, w = p0 % W;
      for (int64_t i = p0; i < p1; ++i) {
        T* __restrict__ pd = dx + b * sdx.b + h * sdx.h + w * sdx.w + c0;
        if (kStd) {
          const T* __restrict__ px = x + b * sx.b + h * sx.h + w * sx.w + c0;
#pragma omp simd
          for (int64_t c = 0; c < n; ++c) pd[c] = put<T>(a[c] + k[c] * (ld(px[c]) - m[c]));
        } else {
#pragma omp simd
          for (int64_t c = 0; c < n; ++c) pd[c] = put<T>(a[c]);
        }
        if (++w == W) { w = 0; ++h; }
      }
      if (gr.dmax) {
        for (int64_t c = 0; c < n; ++c) {
          const int64_t idx = qs[c].idx;
          if (idx < p0 || idx >= p1) continue;
          const int64_t hh = idx / W, ww = idx % W;
          const T* px = kStd ? x + b * sx.b + (c0 + c) * sx.c + hh * sx.h + ww * sx.w : nullptr;
          dx[b * sdx.b + (c0 + c) * sdx.c + hh * sdx.h + ww * sdx.w] = put<T>(grad_at<T, kStd>(qs[c], px) + qs[c].g);
        }
      }
    }
  }
}

template <typename T, bool kStd>
void pool_bwd_generic(const T* x, T* dx, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sdx,
                      const PoolGrads& gr) {
  using A = acc_t<T>;
  const int64_t HW = H * W;
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    const PlaneGrad<A> q = plane_grad<A>(gr, bc, HW);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const T* px = kStd ? x + b * sx.b + c * sx.c + h * sx.h + w * sx.w : nullptr;
        A v = grad_at<T, kStd>(q, px);
        if (h * W + w == q.idx) v += q.g;
        dx[b * sdx.b + c * sdx.c + h * sdx.h + w * sdx.w] = put<T>(v);
      }
  }
}

template <typename T, bool kStd>
void pool_bwd_layout(const T* x, T* dx, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sdx,
                     const PoolGrads& gr) {
  if (plane_contiguous(sdx, H, W) && (!kStd || plane_contiguous(sx, H, W)))
    return pool_bwd_plane<T, kStd>(x, dx, B, C, H * W, sx, sdx, gr);
  if (channels_contiguous(sdx, C) && (!kStd || channels_contiguous(sx, C)))
    return pool_bwd_channels<T, kStd>(x, dx, B, C, H, W, sx, sdx, gr);
  pool_bwd_generic<T, kStd>(x, dx, B, C, H, W, sx, sdx, gr);
}

template <typename T>
void pool_bwd_typed(const T* x, T* dx, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sdx,
                    const PoolGrads& gr) {
  if (B * C * H * W == 0) return;
  if (gr.dstd) return pool_bwd_layout<T, true>(x, dx, B, C, H, W, sx, sdx, gr);
  pool_bwd_layout<T, false>(x, dx, B, C, H, W, sx, sdx, gr);
}

// ---------------------------------------------------------------------------------------------
// dct_pool forward: y[b, c] = sum_p x[b, c, p] * w[c, p]
// ---------------------------------------------------------------------------------------------

template <typename T>
void dct_fwd_plane(const T* x, const acc_t<T>* wt, T* y, int64_t B, int64_t C, int64_t HW, Strides4 sx,
                   Strides4 sw) {
  using A = acc_t<T>;
  const int64_t BC = B * C;
  const int64_t S = pixel_segments(BC, HW, kMinSeg);
  const int64_t seg = ceil_div(HW, S);
  std::vector<double> partial(S > 1 ? static_cast<size_t>(BC * S) : 0);
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < BC * S; ++job) {
    const int64_t bc = job / S, s = job % S;
    const int64_t b = bc / C, c = bc % C;
    const T* __restrict__ px = x + b * sx.b + c * sx.c;
    const A* __restrict__ pw = wt + c * sw.c;
    const int64_t p0 = s * seg, p1 = std::min(HW, p0 + seg);
    double total = 0;
    for (int64_t i0 = p0; i0 < p1; i0 += kChunk) {
      const int64_t i1 = std::min(p1, i0 + kChunk);
      A acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = i0; i < i1; ++i) acc += ld(px[i]) * pw[i];
      total += static_cast<double>(acc);
    }
    if (S == 1) y[bc] = from_double<T>(total);
    else partial[job] = total;
  }
  if (S > 1) {
#pragma omp parallel for schedule(static)
    for (int64_t bc = 0; bc < BC; ++bc) {
      double t = 0;
      for (int64_t s = 0; s < S; ++s) t += partial[bc * S + s];
      y[bc] = from_double<T>(t);
    }
  }
}

template <typename T>
void dct_fwd_channels(const T* x, const acc_t<T>* wt, T* y, int64_t B, int64_t C, int64_t H, int64_t W,
                      Strides4 sx, Strides4 sw) {
  using A = acc_t<T>;
  const int64_t HW = H * W;
  int64_t nC;
  const int64_t kBlock = block_width(C, &nC);
  const int64_t S = pixel_segments(B * nC, HW, kMinPixels);
  const int64_t seg = ceil_div(HW, S);
  std::vector<double> partial(S > 1 ? static_cast<size_t>(B * S * C) : 0);
#pragma omp parallel
  {
    std::vector<A> vacc(kBlock);
    std::vector<double> vtot(kBlock);
#pragma omp for schedule(static)
    for (int64_t job = 0; job < B * nC * S; ++job) {
      const int64_t s = job % S, bcb = job / S;
      const int64_t b = bcb / nC, c0 = (bcb % nC) * kBlock;
      const int64_t n = std::min(kBlock, C - c0);
      const int64_t p0 = s * seg, p1 = std::min(HW, p0 + seg);
      A* __restrict__ acc = vacc.data();
      double* __restrict__ tot = vtot.data();
      for (int64_t c = 0; c < n; ++c) tot[c] = 0;
      for (int64_t i0 = p0; i0 < p1; i0 += kChunk) {
        const int64_t i1 = std::min(p1, i0 + kChunk);
        for (int64_t c = 0; c < n; ++c) acc[c] = 0;
        int64_t h = i0 / W, w = i0 % W;
        for (int64_t i = i0; i < i1; ++i) {
          const T* __restrict__ px = x + b * sx.b + h * sx.h + w * sx.w + c0;
          const A* __restrict__ pw = wt + h * sw.h + w * sw.w + c0;
#pragma omp simd
          for (int64_t c = 0; c < n; ++c) acc[c] += ld(px[c]) * pw[c];
          if (++w == W) { w = 0; ++h; }
        }
        for (int64_t c = 0; c < n; ++c) tot[c] += static_cast<double>(acc[c]);
      }
      if (S == 1) {
        for (int64_t c = 0; c < n; ++c) y[b * C + c0 + c] = from_double<T>(tot[c]);
      } else {
        double* pp = partial.data() + (b * S + s) * C + c0;
        for (int64_t c = 0; c < n; ++c) pp[c] = tot[c];
      }
    }
  }
  if (S > 1) {
#pragma omp parallel for schedule(static)
    for (int64_t bc = 0; bc < B * C; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      double t = 0;
      for (int64_t s = 0; s < S; ++s) t += partial[(b * S + s) * C + c];
      y[bc] = from_double<T>(t);
    }
  }
}

template <typename T>
void dct_fwd_generic(const T* x, const acc_t<T>* wt, T* y, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                     Strides4 sw) {
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    double acc = 0;  // the slow path: plain double accumulation
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w)
        acc += static_cast<double>(ld(x[b * sx.b + c * sx.c + h * sx.h + w * sx.w])) *
               static_cast<double>(wt[c * sw.c + h * sw.h + w * sw.w]);
    y[bc] = from_double<T>(acc);
  }
}

template <typename T>
void dct_fwd_typed(const T* x, const acc_t<T>* wt, T* y, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                   Strides4 sw) {
  if (B * C == 0) return;
  if (H * W == 0) {
    for (int64_t bc = 0; bc < B * C; ++bc) y[bc] = put<T>(0);
    return;
  }
  if (plane_contiguous(sx, H, W) && plane_contiguous(sw, H, W))
    return dct_fwd_plane(x, wt, y, B, C, H * W, sx, sw);
  if (channels_contiguous(sx, C) && channels_contiguous(sw, C)) return dct_fwd_channels(x, wt, y, B, C, H, W, sx, sw);
  dct_fwd_generic(x, wt, y, B, C, H, W, sx, sw);
}

// ---------------------------------------------------------------------------------------------
// dct_pool backward: dx = dy[b, c] * w[c];  dw[c] = sum_b dy[b, c] * x[b, c]
// ---------------------------------------------------------------------------------------------

// Positions per dw accumulator row (NCHW) / elements per (pixels x channels) tile (channels_last).
constexpr int64_t kDwTile = 2048;

// Batch splits: the (c, position) tiles alone may give the threads too little work; each split
// sums its samples in order, the splits are added in order.
inline int64_t batch_splits(int64_t tiles, int64_t B) {
  return std::max<int64_t>(1, std::min(B, ceil_div(kMinJobs, std::max<int64_t>(tiles, 1))));
}

// NCHW: a job owns (channel, run of positions, batch split): it keeps w's run in L1 and walks the
// samples, writing dx and accumulating dw in one pass.
template <typename T, bool kDx, bool kDw>
void dct_bwd_plane(const acc_t<T>* dy, const acc_t<T>* wt, const T* x, T* dx, acc_t<T>* dw, int64_t B, int64_t C,
                   int64_t HW, Strides4 sw, Strides4 sx, Strides4 sdx, Strides4 sdw) {
  using A = acc_t<T>;
  const int64_t nseg = ceil_div(HW, kDwTile);
  const int64_t S = batch_splits(C * nseg, B);
  const int64_t bper = ceil_div(B, S);
  std::vector<A> partial(kDw && S > 1 ? static_cast<size_t>(S * C * HW) : 0);
#pragma omp parallel
  {
    std::vector<A> vacc(kDw ? kDwTile : 0);
#pragma omp for schedule(static)
    for (int64_t job = 0; job < C * nseg * S; ++job) {
      const int64_t s = job % S, cs = job / S;
      const int64_t c = cs / nseg, p0 = (cs % nseg) * kDwTile;
      const int64_t n = std::min(kDwTile, HW - p0);
      const int64_t b0 = s * bper, b1 = std::min(B, b0 + bper);
      A* __restrict__ acc = vacc.data();
      const A* __restrict__ pw = wt + c * sw.c + p0;
      if (kDw)
        for (int64_t i = 0; i < n; ++i) acc[i] = 0;
      for (int64_t b = b0; b < b1; ++b) {
        const A g = dy[b * C + c];
        if (kDx) {
          T* __restrict__ pd = dx + b * sdx.b + c * sdx.c + p0;
          if (kDw) {
            const T* __restrict__ px = x + b * sx.b + c * sx.c + p0;
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) {
              pd[i] = put<T>(g * pw[i]);
              acc[i] += g * ld(px[i]);
            }
          } else {
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) pd[i] = put<T>(g * pw[i]);
          }
        } else {
          const T* __restrict__ px = x + b * sx.b + c * sx.c + p0;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) acc[i] += g * ld(px[i]);
        }
      }
      if (kDw) {
        A* dst = S == 1 ? dw + c * sdw.c + p0 : partial.data() + (s * C + c) * HW + p0;
        for (int64_t i = 0; i < n; ++i) dst[i] = acc[i];
      }
    }
  }
  if (kDw && S > 1) {
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < HW; ++i) {
        double t = 0;
        for (int64_t s = 0; s < S; ++s) t += partial[(s * C + c) * HW + i];
        dw[c * sdw.c + i] = static_cast<A>(t);
      }
  }
}

// channels_last: a job owns (run of pixels, channel block, batch split) with a (pixels x channels)
// accumulator tile; inner loops over the block's channels.
template <typename T, bool kDx, bool kDw>
void dct_bwd_channels(const acc_t<T>* dy, const acc_t<T>* wt, const T* x, T* dx, acc_t<T>* dw, int64_t B, int64_t C,
                      int64_t H, int64_t W, Strides4 sw, Strides4 sx, Strides4 sdx, Strides4 sdw) {
  using A = acc_t<T>;
  const int64_t HW = H * W;
  int64_t nC;
  const int64_t kBlock = block_width(C, &nC);
  const int64_t P = std::max<int64_t>(1, kDwTile / kBlock);   // pixels per job
  const int64_t nseg = ceil_div(HW, P);
  const int64_t S = batch_splits(nseg * nC, B);
  const int64_t bper = ceil_div(B, S);
  std::vector<A> partial(kDw && S > 1 ? static_cast<size_t>(S * HW * C) : 0);
#pragma omp parallel
  {
    std::vector<A> vacc(kDw ? P * kBlock : 0);
#pragma omp for schedule(static)
    for (int64_t job = 0; job < nseg * nC * S; ++job) {
      const int64_t s = job % S, rest = job / S;
      const int64_t p0 = (rest / nC) * P, c0 = (rest % nC) * kBlock;
      const int64_t np = std::min(P, HW - p0), n = std::min(kBlock, C - c0);
      const int64_t b0 = s * bper, b1 = std::min(B, b0 + bper);
      A* __restrict__ acc = vacc.data();
      if (kDw)
        for (int64_t i = 0; i < np * kBlock; ++i) acc[i] = 0;
      for (int64_t b = b0; b < b1; ++b) {
        const A* __restrict__ g = dy + b * C + c0;
        int64_t h = p0 / W, w = p0 % W;
        for (int64_t i = 0; i < np; ++i) {
          const A* __restrict__ pw = wt + h * sw.h + w * sw.w + c0;
          A* __restrict__ pa = acc + i * kBlock;
          if (kDx) {
            T* __restrict__ pd = dx + b * sdx.b + h * sdx.h + w * sdx.w + c0;
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) pd[c] = put<T>(g[c] * pw[c]);
          }
          if (kDw) {
            const T* __restrict__ px = x + b * sx.b + h * sx.h + w * sx.w + c0;
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) pa[c] += g[c] * ld(px[c]);
          }
          if (++w == W) { w = 0; ++h; }
        }
      }
      if (kDw) {
        int64_t h = p0 / W, w = p0 % W;
        for (int64_t i = 0; i < np; ++i) {
          A* dst = S == 1 ? dw + h * sdw.h + w * sdw.w + c0 : partial.data() + (s * HW + p0 + i) * C + c0;
          for (int64_t c = 0; c < n; ++c) dst[c] = acc[i * kBlock + c];
          if (++w == W) { w = 0; ++h; }
        }
      }
    }
  }
  if (kDw && S > 1) {
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < HW; ++p) {
      const int64_t h = p / W, w = p % W;
      for (int64_t c = 0; c < C; ++c) {
        double t = 0;
        for (int64_t s = 0; s < S; ++s) t += partial[(s * HW + p) * C + c];
        dw[h * sdw.h + w * sdw.w + c] = static_cast<A>(t);
      }
    }
  }
}

template <typename T, bool kDx, bool kDw>
void dct_bwd_generic(const acc_t<T>* dy, const acc_t<T>* wt, const T* x, T* dx, acc_t<T>* dw, int64_t B, int64_t C,
                     int64_t H, int64_t W, Strides4 sw, Strides4 sx, Strides4 sdx, Strides4 sdw) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < C; ++c)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const A wv = wt[c * sw.c + h * sw.h + w * sw.w];
        double acc = 0;
        for (int64_t b = 0; b < B; ++b) {
          const A g = dy[b * C + c];
          if (kDx) dx[b * sdx.b + c * sdx.c + h * sdx.h + w * sdx.w] = put<T>(g * wv);
          if (kDw) acc += static_cast<double>(g) * ld(x[b * sx.b + c * sx.c + h * sx.h + w * sx.w]);
        }
        if (kDw) dw[c * sdw.c + h * sdw.h + w * sdw.w] = static_cast<A>(acc);
      }
}

template <typename T, bool kDx, bool kDw>
void dct_bwd_layout(const acc_t<T>* dy, const acc_t<T>* wt, const T* x, T* dx, acc_t<T>* dw, int64_t B, int64_t C,
                    int64_t H, int64_t W, Strides4 sw, Strides4 sx, Strides4 sdx, Strides4 sdw) {
  const bool plane = plane_contiguous(sw, H, W) && (!kDx || plane_contiguous(sdx, H, W)) &&
                     (!kDw || (plane_contiguous(sx, H, W) && plane_contiguous(sdw, H, W)));
  if (plane) return dct_bwd_plane<T, kDx, kDw>(dy, wt, x, dx, dw, B, C, H * W, sw, sx, sdx, sdw);
  const bool chan = channels_contiguous(sw, C) && (!kDx || channels_contiguous(sdx, C)) &&
                    (!kDw || (channels_contiguous(sx, C) && channels_contiguous(sdw, C)));
  if (chan) return dct_bwd_channels<T, kDx, kDw>(dy, wt, x, dx, dw, B, C, H, W, sw, sx, sdx, sdw);
  dct_bwd_generic<T, kDx, kDw>(dy, wt, x, dx, dw, B, C, H, W, sw, sx, sdx, sdw);
}

template <typename T>
void dct_bwd_typed(const acc_t<T>* dy, const acc_t<T>* wt, const T* x, T* dx, acc_t<T>* dw, int64_t B, int64_t C,
                   int64_t H, int64_t W, Strides4 sw, Strides4 sx, Strides4 sdx, Strides4 sdw) {
  using A = acc_t<T>;
  if (C * H * W == 0) return;
  if (B == 0) {                             // an empty batch: dw is zero
    if (dw)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w) dw[c * sdw.c + h * sdw.h + w * sdw.w] = A(0);
    return;
  }
  if (dx && x) return dct_bwd_layout<T, true, true>(dy, wt, x, dx, dw, B, C, H, W, sw, sx, sdx, sdw);
  if (dx) return dct_bwd_layout<T, true, false>(dy, wt, x, dx, dw, B, C, H, W, sw, sx, sdx, sdw);
  if (x) dct_bwd_layout<T, false, true>(dy, wt, x, dx, dw, B, C, H, W, sw, sx, sdx, sdw);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// type dispatch
// ---------------------------------------------------------------------------------------------

#define FA_TYPES(M) M(Float32, float) M(Float64, double) M(Float16, fp16_t) M(BFloat16, bf16_t)

void channel_mean_cpu(const void* x, void* out, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                      int64_t sb, int64_t sc, int64_t sh, int64_t sw) {
  PoolOutputs o;
  o.mean = out;
  channel_pool_forward_cpu(x, dtype, B, C, H, W, Strides4{sb, sc, sh, sw}, 0.0, o);
}

void channel_pool_forward_cpu(const void* x, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                              double eps, const PoolOutputs& out) {
  switch (dtype) {
#define FA_CASE(TAG, T) \
  case DType::TAG: return pool_typed(static_cast<const T*>(x), B, C, H, W, sx, eps, out);
    FA_TYPES(FA_CASE)
#undef FA_CASE
  }
}

void channel_pool_backward_cpu(const void* x, void* dx, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                               Strides4 sx, Strides4 sdx, const PoolGrads& g) {
  switch (dtype) {
#define FA_CASE(TAG, T) \
  case DType::TAG: return pool_bwd_typed(static_cast<const T*>(x), static_cast<T*>(dx), B, C, H, W, sx, sdx, g);
    FA_TYPES(FA_CASE)
#undef FA_CASE
  }
}

void dct_pool_forward_cpu(const void* x, const void* w, void* y, DType dtype, int64_t B, int64_t C, int64_t H,
                          int64_t W, Strides4 sx, Strides4 sw) {
  switch (dtype) {
#define FA_CASE(TAG, T)                                                                                      \
  case DType::TAG:                                                                                           \
    return dct_fwd_typed(static_cast<const T*>(x), static_cast<const acc_t<T>*>(w), static_cast<T*>(y), B, C, \
                         H, W, sx, sw);
    FA_TYPES(FA_CASE)
#undef FA_CASE
  }
}

void dct_pool_backward_cpu(const void* dy, const void* w, const void* x, void* dx, void* dw, DType dtype, int64_t B,
                           int64_t C, int64_t H, int64_t W, Strides4 sw, Strides4 sx, Strides4 sdx, Strides4 sdw) {
  switch (dtype) {
#define FA_CASE(TAG, T)                                                                                      \
  case DType::TAG:                                                                                           \
    return dct_bwd_typed(static_cast<const acc_t<T>*>(dy), static_cast<const acc_t<T>*>(w),                  \
                         static_cast<const T*>(x), static_cast<T*>(dx), static_cast<acc_t<T>*>(dw), B, C, H, W, \
                         sw, sx, sdx, sdw);
    FA_TYPES(FA_CASE)
#undef FA_CASE
  }
}

#undef FA_TYPES

}  // namespace fastattn
