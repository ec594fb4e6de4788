// Spatial attention ops: [max, mean] pooling over one axis and the per-pixel gate x * a * s.
// One pass over x per op and direction (the pool backward without a only writes dx). OpenMP
// across independent jobs; fp32 math for 16/32-bit inputs, fp64 for fp64.
//
// Two loop orders, picked from the strides:
//  - the pixels have unit stride (NCHW; a reduction over C is strided): a job owns a tile of
//    pixels, loops over the reduced axis outside and over the tile inside (unit stride, SIMD),
//    keeping per-pixel accumulators in small arrays;
//  - the reduced axis has unit stride (channels_last): a job owns pixels and reduces each row in
//    SIMD lanes.
// Anything else takes a generic path (correct, not fast). Cross-job sums go through partial
// buffers added in a fixed order, so results do not depend on the thread count.
#include "spatial.h"

#include <algorithm>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <utility>
#include <vector>

namespace fastattn {
namespace {

constexpr int64_t kMinJobs = 64;       // jobs wanted per launch (threads are at most a few dozen)
constexpr int64_t kMaxTile = 1024;     // pixels per tile of the pixel-contiguous paths
constexpr int64_t kMinTile = 64;
constexpr int64_t kPixelWork = 16384;  // elements per job of the row paths
constexpr int64_t kMinSeg = 64;        // pixels per segment of the row backward (no shorter)
constexpr int kLanes = 16;             // running (max, argmax, sum) lanes of a row reduction

// Tile width for `rows` rows of P pixels: the widest power of two in [kMinTile, kMaxTile] that
// still gives kMinJobs jobs (small maps: more, narrower tiles). Depends on the shape only.
int64_t tile_width(int64_t rows, int64_t P) {
  int64_t t = kMaxTile;
  while (t > kMinTile && rows * ((P + t - 1) / t) < kMinJobs) t /= 2;
  return t;
}

// Pixel segments per sample for jobs of (sample, segment) that must add up partial sums:
// enough jobs when B is small, no segment shorter than kMinSeg; no empty segment.
void segments(int64_t B, int64_t P, int64_t& S, int64_t& seg) {
  S = std::max<int64_t>(1, (kMinJobs + B - 1) / B);
  S = std::max<int64_t>(1, std::min(S, P / kMinSeg));
  seg = (P + S - 1) / S;
  S = (P + seg - 1) / seg;
}

// Pixels per job for the row paths that need no cross-job sums.
int64_t pixels_per_job(int64_t B, int64_t P, int64_t row) {
  return std::max<int64_t>(1, std::min(kPixelWork / std::max<int64_t>(row, 1), (B * P) / kMinJobs));
}

// Running-max update that a NaN wins (and keeps: the first NaN stays), as torch.amax / argmax.
template <typename A>
inline bool beats(A v, A m) {
  return v > m || (v != v && m == m);
}

// ---------------------------------------------------------------------------------------------
// pool: the pixel plane of every operand
// ---------------------------------------------------------------------------------------------

// The (P1, P2) pixel plane as the kernels walk it, and the strides of idx on it.
struct Pix {
  int64_t P1, P2, i1, i2;
};

// When the plane of every operand flattens, make it one row of P1 * P2 pixels (stride in .w).
// Otherwise keep two axes, the smaller stride of `lead` last, so that the kernels walk its pixels
// in memory order (a transposed plane is swapped on every operand and on idx; the W-pool of an
// NCHW map, whose (H, C) plane has strides (W, H W), took 8 ms at 8x256x56x56 walked the other
// way: a page per row). `lead` must be one of `ops`.
Pix normalize_pixels(int64_t P1, int64_t P2, std::initializer_list<Strides4*> ops, const Strides4* lead) {
  bool flat = true;
  for (const Strides4* s : ops) flat = flat && (P1 == 1 || P2 == 1 || s->h == P2 * s->w);
  if (flat) {
    for (Strides4* s : ops) {
      if (P2 == 1) s->w = s->h;
      s->h = 0;
    }
    return {1, P1 * P2, 0, 1};
  }
  if (lead->w != 1 && (lead->h == 1 || std::abs(lead->h) < std::abs(lead->w))) {
    for (Strides4* s : ops) std::swap(s->h, s->w);
    return {P2, P1, 1, P2};
  }
  return {P1, P2, P2, 1};
}

// ---------------------------------------------------------------------------------------------
// pool forward
// ---------------------------------------------------------------------------------------------

// Pixels unit-stride (sx.w == 1): a job owns (b, p1, a tile of p2) and loops over n outside.
template <typename T, bool kA>
void pool_fwd_tiles(const T* x, const acc_t<T>* a, T* y, int32_t* idx, int64_t B, int64_t N, Pix px, Strides4 sx,
                    Strides4 sy) {
  using A = acc_t<T>;
  const int64_t P1 = px.P1, P2 = px.P2, P = P1 * P2;
  const int64_t TP = tile_width(B * P1, P2);
  const int64_t nT = (P2 + TP - 1) / TP;
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < B * P1 * nT; ++job) {
    A mx[kMaxTile], sm[kMaxTile];
    int32_t id[kMaxTile];
    double tot[kMaxTile];
    const int64_t t = job % nT, r = job / nT, p1 = r % P1, b = r / P1;
    const int64_t i0 = t * TP, n = std::min(TP, P2 - i0);
    for (int64_t i = 0; i < std::max<int64_t>(n, kLanes); ++i) {
      mx[i] = -std::numeric_limits<A>::infinity();
      id[i] = 0;
      tot[i] = 0.0;
    }
    const T* base = x + b * sx.b + p1 * sx.h + i0;
    // the row `ahead` channels on is prefetched: a tile of a 14 x 14 plane is a few cache lines
    // per channel (spatial_pool at 32x1024x14x14: 2.2 -> 1.5-1.6 ms on the Xeon VM)
    const int64_t ahead = rows_ahead<T>(sx.c);
    for (int64_t c0 = 0; c0 < N; c0 += kChunk) {   // fp32 sums over kChunk rows, folded into double
      const int64_t c1 = std::min(N, c0 + kChunk);
      for (int64_t i = 0; i < std::max<int64_t>(n, kLanes); ++i) sm[i] = A(0);
      for (int64_t c = c0; c < c1 && n < kLanes; ++c) {
        // A tile narrower than the SIMD width (Triplet's H-pool of a 14 x 14 map): a fixed
        // kLanes-wide loop with masked loads; a loop of n < width ran scalar.
        const T* __restrict__ row = base + c * sx.c;
        const A ac = kA ? a[b * N + c] : A(1);
        const int32_t cc = static_cast<int32_t>(c);
#pragma omp simd
        for (int i = 0; i < kLanes; ++i) {
          A v = i < n ? static_cast<A>(to_float(row[i])) : A(0);
          if (kA) v *= ac;
          sm[i] += v;
          const bool gt = beats(v, mx[i]);
          mx[i] = gt ? v : mx[i];
          id[i] = gt ? cc : id[i];
        }
      }
      for (int64_t c = c0; c < c1 && n >= kLanes; ++c) {
        const T* __restrict__ row = base + c * sx.c;
        prefetch_span(row, ahead * sx.c, n);
        const A ac = kA ? a[b * N + c] : A(1);
        const int32_t cc = static_cast<int32_t>(c);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          A v = static_cast<A>(to_float(row[i]));
          if (kA) v *= ac;
          sm[i] += v;
          const bool gt = beats(v, mx[i]);
          mx[i] = gt ? v : mx[i];
          id[i] = gt ? cc : id[i];
        }
      }
      for (int64_t i = 0; i < n; ++i) tot[i] += static_cast<double>(sm[i]);
    }
    T* py = y + b * sy.b + p1 * sy.h + i0 * sy.w;
    int32_t* pi = idx + b * P + p1 * px.i1 + i0 * px.i2;
    const double dn = static_cast<double>(N);
    for (int64_t i = 0; i < n; ++i) {
      py[i * sy.w] = store<T>(mx[i]);
      py[sy.c + i * sy.w] = store<T>(static_cast<A>(tot[i] / dn));
      pi[i * px.i2] = id[i];
    }
  }
}

// Max, first argmax and sum of one unit-stride row of N values (times a when kA), in kLanes
// SIMD lanes: each lane keeps its own first maximum; the lanes meet in a fixed order.
template <typename T, bool kA>
inline void reduce_row(const T* __restrict__ row, const acc_t<T>* __restrict__ ar, int64_t N, acc_t<T>& out_max,
                       int32_t& out_idx, double& out_sum) {
  using A = acc_t<T>;
  A lm[kLanes], ls[kLanes];
  int32_t li[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    lm[j] = -std::numeric_limits<A>::infinity();
    li[j] = 0;
  }
  double total = 0.0;
  for (int64_t c0 = 0; c0 < N; c0 += kChunk) {
    const int64_t c1 = std::min(N, c0 + kChunk);
    for (int j = 0; j < kLanes; ++j) ls[j] = A(0);
    int64_t c = c0;
    for (; c + kLanes <= c1; c += kLanes) {
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) {
        A v = static_cast<A>(to_float(row[c + j]));
        if (kA) v *= ar[c + j];
        ls[j] += v;
        const bool gt = beats(v, lm[j]);
        lm[j] = gt ? v : lm[j];
        li[j] = gt ? static_cast<int32_t>(c + j) : li[j];
      }
    }
    for (int j = 0; c + j < c1; ++j) {   // tail: lane j takes element c + j (later than its others)
      A v = static_cast<A>(to_float(row[c + j]));
      if (kA) v *= ar[c + j];
      ls[j] += v;
      if (beats(v, lm[j])) {
        lm[j] = v;
        li[j] = static_cast<int32_t>(c + j);
      }
    }
    for (int j = 0; j < kLanes; ++j) total += static_cast<double>(ls[j]);
  }
  // The lanes' first maxima: the largest value (a NaN first), the lowest index among equals.
  A m = -std::numeric_limits<A>::infinity();
  int32_t best = std::numeric_limits<int32_t>::max();
  for (int j = 0; j < kLanes; ++j) {
    const A v = lm[j];
    const bool same = v == m || (v != v && m != m);
    if (beats(v, m) || (same && li[j] < best)) {
      m = v;
      best = li[j];
    }
  }
  out_max = m;
  out_idx = best;
  out_sum = total;
}

// Reduced axis unit-stride (sx.c == 1): a job owns (b, a run of pixels) and reduces each row.
template <typename T, bool kA>
void pool_fwd_rows(const T* x, const acc_t<T>* a, T* y, int32_t* idx, int64_t B, int64_t N, Pix px, Strides4 sx,
                   Strides4 sy) {
  using A = acc_t<T>;
  const int64_t P1 = px.P1, P2 = px.P2, P = P1 * P2;
  const int64_t per = pixels_per_job(B, P, N);
  const int64_t nseg = (P + per - 1) / per;
  const double dn = static_cast<double>(N);
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < B * nseg; ++job) {
    const int64_t b = job / nseg, q0 = (job % nseg) * per, q1 = std::min(P, q0 + per);
    const A* ar = kA ? a + b * N : nullptr;
    int64_t p1 = q0 / P2, p2 = q0 % P2;
    if (N < kLanes) {
      // Short rows (Triplet's W-pool of a 14 x 14 map): kLanes rows at a time, one SIMD lane per
      // row; per row, the lanes' set-up and merge of reduce_row cost more than the row itself.
      for (int64_t q = q0; q < q1; q += kLanes) {
        const int64_t n = std::min<int64_t>(kLanes, q1 - q);
        int64_t off[kLanes], yoff[kLanes], ioff[kLanes];
        for (int64_t r = 0; r < n; ++r) {
          off[r] = b * sx.b + p1 * sx.h + p2 * sx.w;
          yoff[r] = b * sy.b + p1 * sy.h + p2 * sy.w;
          ioff[r] = b * P + p1 * px.i1 + p2 * px.i2;
          if (++p2 == P2) {
            p2 = 0;
            ++p1;
          }
        }
        for (int64_t r = n; r < kLanes; ++r) off[r] = off[n - 1];  // padding lanes repeat a row
        A m[kLanes], sum[kLanes];
        int32_t best[kLanes];
        for (int r = 0; r < kLanes; ++r) {
          m[r] = -std::numeric_limits<A>::infinity();
          sum[r] = A(0);
          best[r] = 0;
        }
        for (int64_t c = 0; c < N; ++c) {
          const A ac = kA ? ar[c] : A(1);
#pragma omp simd
          for (int r = 0; r < kLanes; ++r) {
            A v = static_cast<A>(to_float(x[off[r] + c]));
            if (kA) v *= ac;
            sum[r] += v;
            const bool gt = beats(v, m[r]);
            m[r] = gt ? v : m[r];
            best[r] = gt ? static_cast<int32_t>(c) : best[r];
          }
        }
        for (int64_t r = 0; r < n; ++r) {
          y[yoff[r]] = store<T>(m[r]);
          y[yoff[r] + sy.c] = store<T>(static_cast<A>(static_cast<double>(sum[r]) / dn));
          idx[ioff[r]] = best[r];
        }
      }
      continue;
    }
    for (int64_t q = q0; q < q1; ++q) {
      A m;
      int32_t i;
      double sum;
      reduce_row<T, kA>(x + b * sx.b + p1 * sx.h + p2 * sx.w, ar, N, m, i, sum);
      T* py = y + b * sy.b + p1 * sy.h + p2 * sy.w;
      py[0] = store<T>(m);
      py[sy.c] = store<T>(static_cast<A>(sum / dn));
      idx[b * P + p1 * px.i1 + p2 * px.i2] = i;
      if (++p2 == P2) {
        p2 = 0;
        ++p1;
      }
    }
  }
}

template <typename T, bool kA>
void pool_fwd_generic(const T* x, const acc_t<T>* a, T* y, int32_t* idx, int64_t B, int64_t N, Pix px, Strides4 sx,
                      Strides4 sy) {
  using A = acc_t<T>;
  const int64_t P1 = px.P1, P2 = px.P2, P = P1 * P2;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < B * P1; ++r) {
    const int64_t b = r / P1, p1 = r % P1;
    for (int64_t p2 = 0; p2 < P2; ++p2) {
      const T* px0 = x + b * sx.b + p1 * sx.h + p2 * sx.w;
      A m = -std::numeric_limits<A>::infinity();
      int32_t best = 0;
      double sum = 0.0;
      for (int64_t c = 0; c < N; ++c) {
        A v = static_cast<A>(to_float(px0[c * sx.c]));
        if (kA) v *= a[b * N + c];
        sum += static_cast<double>(v);
        if (beats(v, m)) {
          m = v;
          best = static_cast<int32_t>(c);
        }
      }
      T* py = y + b * sy.b + p1 * sy.h + p2 * sy.w;
      py[0] = store<T>(m);
      py[sy.c] = store<T>(static_cast<A>(sum / static_cast<double>(N)));
      idx[b * P + p1 * px.i1 + p2 * px.i2] = best;
    }
  }
}

template <typename T, bool kA>
void pool_forward_typed(const T* x, const acc_t<T>* a, T* y, int32_t* idx, int64_t B, int64_t N, int64_t P1,
                        int64_t P2, Strides4 sx, Strides4 sy) {
  const Pix px = normalize_pixels(P1, P2, {&sx, &sy}, &sx);
  if (sx.c == 1 && N > 1) return pool_fwd_rows<T, kA>(x, a, y, idx, B, N, px, sx, sy);
  if (sx.w == 1 || px.P2 == 1) return pool_fwd_tiles<T, kA>(x, a, y, idx, B, N, px, sx, sy);
  pool_fwd_generic<T, kA>(x, a, y, idx, B, N, px, sx, sy);
}

// ---------------------------------------------------------------------------------------------
// pool backward
// ---------------------------------------------------------------------------------------------

// The per-pixel gradient terms, in the kernels' pixel order (q = (b * P1 + p1) * P2 + p2), in the
// accumulation type: d max, d mean / N, and the argmax. 2 + 1 values per pixel: N times smaller
// than x, read from cache by the passes over dx.
template <typename T>
struct PixelGrads {
  std::vector<acc_t<T>> gmax, gmean;
  std::vector<int32_t> arg;
};

template <typename T>
PixelGrads<T> pixel_grads(const T* dy, const int32_t* idx, int64_t B, int64_t N, Pix px, Strides4 sdy) {
  using A = acc_t<T>;
  const int64_t P1 = px.P1, P2 = px.P2, P = P1 * P2;
  PixelGrads<T> g;
  g.gmax.resize(static_cast<size_t>(B * P));
  g.gmean.resize(static_cast<size_t>(B * P));
  g.arg.resize(static_cast<size_t>(B * P));
  const A n = static_cast<A>(N);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < B * P1; ++r) {
    const int64_t b = r / P1, p1 = r % P1;
    const T* d = dy + b * sdy.b + p1 * sdy.h;
    const int32_t* ir = idx + b * P + p1 * px.i1;
    const int64_t q0 = r * P2;
    for (int64_t p2 = 0; p2 < P2; ++p2) {
      g.gmax[q0 + p2] = static_cast<A>(to_float(d[p2 * sdy.w]));
      g.gmean[q0 + p2] = static_cast<A>(to_float(d[sdy.c + p2 * sdy.w])) / n;
      g.arg[q0 + p2] = ir[p2 * px.i2];
    }
  }
  return g;
}

// Pixels unit-stride (sdx.w == 1, and sx.w == 1 when kA): a job owns one (b, n) plane, so da[b, n]
// is complete in it. g = gmean + (n == arg) * gmax is a select in the SIMD loop.
template <typename T, bool kA>
void pool_bwd_planes(const T* x, const acc_t<T>* a, const PixelGrads<T>& g, T* dx, acc_t<T>* da, int64_t B,
                     int64_t N, Pix px, Strides4 sx, Strides4 sdx) {
  using A = acc_t<T>;
  const int64_t P1 = px.P1, P2 = px.P2;
  const A* __restrict__ gmax = g.gmax.data();
  const A* __restrict__ gmean = g.gmean.data();
  const int32_t* __restrict__ arg = g.arg.data();
#pragma omp parallel for schedule(static)
  for (int64_t bn = 0; bn < B * N; ++bn) {
    const int64_t b = bn / N, n = bn % N;
    const int32_t nn = static_cast<int32_t>(n);
    const A an = kA ? a[bn] : A(1);
    double total = 0.0;
    for (int64_t p1 = 0; p1 < P1; ++p1) {
      const int64_t q = (b * P1 + p1) * P2;
      T* __restrict__ dr = dx + b * sdx.b + n * sdx.c + p1 * sdx.h;
      const T* __restrict__ xr = kA ? x + b * sx.b + n * sx.c + p1 * sx.h : nullptr;
      for (int64_t i0 = 0; i0 < P2; i0 += kChunk) {
        const int64_t i1 = std::min(P2, i0 + kChunk);
        A acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = i0; i < i1; ++i) {
          const A gv = gmean[q + i] + (arg[q + i] == nn ? gmax[q + i] : A(0));
          if (kA) {
            dr[i] = store<T>(gv * an);
            acc += gv * static_cast<A>(to_float(xr[i]));
          } else {
            dr[i] = store<T>(gv);
          }
        }
        total += static_cast<double>(acc);
      }
    }
    if (kA) da[bn] = static_cast<A>(total);
  }
}

// Reduced axis unit-stride (sdx.c == 1, and sx.c == 1 when kA): jobs of (b, pixel segment); each
// pixel writes its row of dx = gmean * a, then fixes its argmax entry. da: per-job partial rows
// (fp32 over kChunk pixels, folded into double) added in segment order.
template <typename T, bool kA>
void pool_bwd_rows(const T* x, const acc_t<T>* a, const PixelGrads<T>& g, T* dx, acc_t<T>* da, int64_t B, int64_t N,
                   Pix px, Strides4 sx, Strides4 sdx) {
  using A = acc_t<T>;
  const int64_t P1 = px.P1, P2 = px.P2, P = P1 * P2;
  int64_t S, seg;
  segments(B, P, S, seg);
  std::vector<double> partial(kA && S > 1 ? static_cast<size_t>(B * S * N) : 0);
#pragma omp parallel
  {
    std::vector<A> acc(kA ? static_cast<size_t>(N) : 0);
    std::vector<double> tot(kA ? static_cast<size_t>(N) : 0);
#pragma omp for schedule(static)
    for (int64_t job = 0; job < B * S; ++job) {
      const int64_t b = job / S, s = job % S, q0 = s * seg, q1 = std::min(P, q0 + seg);
      const A* __restrict__ ar = kA ? a + b * N : nullptr;
      A* __restrict__ pa = acc.data();
      if (kA) std::fill(tot.begin(), tot.end(), 0.0);
      int64_t p1 = q0 / P2, p2 = q0 % P2;
      for (int64_t c0 = q0; c0 < q1; c0 += kChunk) {
        const int64_t c1 = std::min(q1, c0 + kChunk);
        if (kA) std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t q = c0; q < c1; ++q) {
          const int64_t k = b * P + q;
          const A g0 = g.gmean[k], gm = g.gmax[k];
          const int32_t i = g.arg[k];
          const bool hit = i >= 0 && i < N;
          T* __restrict__ dr = dx + b * sdx.b + p1 * sdx.h + p2 * sdx.w;
          if (kA) {
            const T* __restrict__ xr = x + b * sx.b + p1 * sx.h + p2 * sx.w;
#pragma omp simd
            for (int64_t n = 0; n < N; ++n) {
              dr[n] = store<T>(g0 * ar[n]);
              pa[n] += g0 * static_cast<A>(to_float(xr[n]));
            }
            if (hit) {
              dr[i] = store<T>((g0 + gm) * ar[i]);
              pa[i] += gm * static_cast<A>(to_float(xr[i]));
            }
          } else {
            const T v = store<T>(g0);
#pragma omp simd
            for (int64_t n = 0; n < N; ++n) dr[n] = v;
            if (hit) dr[i] = store<T>(g0 + gm);
          }
          if (++p2 == P2) {
            p2 = 0;
            ++p1;
          }
        }
        if (kA)
          for (int64_t n = 0; n < N; ++n) tot[n] += static_cast<double>(pa[n]);
      }
      if (kA) {
        if (S == 1) {
          for (int64_t n = 0; n < N; ++n) da[b * N + n] = static_cast<A>(tot[n]);
        } else {
          double* pp = partial.data() + (b * S + s) * N;
          for (int64_t n = 0; n < N; ++n) pp[n] = tot[n];
        }
      }
    }
  }
  if (kA && S > 1) {
#pragma omp parallel for schedule(static)
    for (int64_t bn = 0; bn < B * N; ++bn) {
      const int64_t b = bn / N, n = bn % N;
      double t = 0.0;
      for (int64_t s = 0; s < S; ++s) t += partial[(b * S + s) * N + n];
      da[bn] = static_cast<A>(t);
    }
  }
}

template <typename T, bool kA>
void pool_bwd_generic(const T* x, const acc_t<T>* a, const PixelGrads<T>& g, T* dx, acc_t<T>* da, int64_t B,
                      int64_t N, Pix px, Strides4 sx, Strides4 sdx) {
  using A = acc_t<T>;
  const int64_t P1 = px.P1, P2 = px.P2;
#pragma omp parallel for schedule(static)
  for (int64_t bn = 0; bn < B * N; ++bn) {
    const int64_t b = bn / N, n = bn % N;
    const A an = kA ? a[bn] : A(1);
    double total = 0.0;   // the slow path: plain double accumulation
    for (int64_t p1 = 0; p1 < P1; ++p1)
      for (int64_t p2 = 0; p2 < P2; ++p2) {
        const int64_t k = (b * P1 + p1) * P2 + p2;
        const A gv = g.gmean[k] + (g.arg[k] == n ? g.gmax[k] : A(0));
        T& d = dx[b * sdx.b + n * sdx.c + p1 * sdx.h + p2 * sdx.w];
        if (kA) {
          d = store<T>(gv * an);
          const A xv = static_cast<A>(to_float(x[b * sx.b + n * sx.c + p1 * sx.h + p2 * sx.w]));
          total += static_cast<double>(gv) * static_cast<double>(xv);
        } else {
          d = store<T>(gv);
        }
      }
    if (kA) da[bn] = static_cast<A>(total);
  }
}

template <typename T, bool kA>
void pool_backward_typed(const T* dy, const T* x, const acc_t<T>* a, const int32_t* idx, T* dx, acc_t<T>* da,
                         int64_t B, int64_t N, int64_t P1, int64_t P2, Strides4 sdy, Strides4 sx, Strides4 sdx) {
  Pix px = kA ? normalize_pixels(P1, P2, {&sdy, &sx, &sdx}, &sdx) : normalize_pixels(P1, P2, {&sdy, &sdx}, &sdx);
  const PixelGrads<T> g = pixel_grads(dy, idx, B, N, px, sdy);
  if (sdx.c == 1 && (!kA || sx.c == 1) && N > 1) return pool_bwd_rows<T, kA>(x, a, g, dx, da, B, N, px, sx, sdx);
  if (px.P2 == 1 || (sdx.w == 1 && (!kA || sx.w == 1)))
    return pool_bwd_planes<T, kA>(x, a, g, dx, da, B, N, px, sx, sdx);
  pool_bwd_generic<T, kA>(x, a, g, dx, da, B, N, px, sx, sdx);
}

// ---------------------------------------------------------------------------------------------
// scale forward: y = (x * a) * s
// ---------------------------------------------------------------------------------------------

// H x W planes contiguous (NCHW): jobs of (b, c, pixel segment), the plane whole unless B * C
// alone gives too few jobs; s read as a unit-stride row.
template <typename T, bool kA>
void scale_fwd_planes(const T* x, const acc_t<T>* a, const acc_t<T>* s, T* y, int64_t B, int64_t C, int64_t P,
                      Strides4 sx, Strides4 sy) {
  using A = acc_t<T>;
  const int64_t nseg = std::max<int64_t>(1, std::min((kMinJobs + B * C - 1) / (B * C), P / kPixelWork));
  const int64_t seg = ((P + nseg - 1) / nseg + 15) / 16 * 16;
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < B * C * nseg; ++job) {
    const int64_t bc = job / nseg, p0 = (job % nseg) * seg, p1 = std::min(P, p0 + seg);
    const int64_t b = bc / C, c = bc % C;
    const T* __restrict__ xr = x + b * sx.b + c * sx.c;
    T* __restrict__ yr = y + b * sy.b + c * sy.c;
    const A* __restrict__ sr = s + b * P;
    const A ac = kA ? a[bc] : A(1);
#pragma omp simd
    for (int64_t p = p0; p < p1; ++p) {
      A v = static_cast<A>(to_float(xr[p]));
      if (kA) v *= ac;
      yr[p] = store<T>(v * sr[p]);
    }
  }
}

// Channels contiguous (channels_last): jobs of (b, run of pixels), a unit-stride row per pixel.
template <typename T, bool kA>
void scale_fwd_channels(const T* x, const acc_t<T>* a, const acc_t<T>* s, T* y, int64_t B, int64_t C, int64_t H,
                        int64_t W, Strides4 sx, Strides4 sy) {
  using A = acc_t<T>;
  const int64_t P = H * W;
  const int64_t per = pixels_per_job(B, P, C);
  const int64_t nseg = (P + per - 1) / per;
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < B * nseg; ++job) {
    const int64_t b = job / nseg, q0 = (job % nseg) * per, q1 = std::min(P, q0 + per);
    const A* __restrict__ ar = kA ? a + b * C : nullptr;
    int64_t h = q0 / W, w = q0 % W;
    for (int64_t q = q0; q < q1; ++q) {
      const T* __restrict__ xr = x + b * sx.b + h * sx.h + w * sx.w;
      T* __restrict__ yr = y + b * sy.b + h * sy.h + w * sy.w;
      const A sv = s[b * P + q];
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        A v = static_cast<A>(to_float(xr[c]));
        if (kA) v *= ar[c];
        yr[c] = store<T>(v * sv);
      }
      if (++w == W) {
        w = 0;
        ++h;
      }
    }
  }
}

template <typename T, bool kA>
void scale_fwd_generic(const T* x, const acc_t<T>* a, const acc_t<T>* s, T* y, int64_t B, int64_t C, int64_t H,
                       int64_t W, Strides4 sx, Strides4 sy) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    const A ac = kA ? a[bc] : A(1);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        A v = static_cast<A>(to_float(x[b * sx.b + c * sx.c + h * sx.h + w * sx.w]));
        if (kA) v *= ac;
        y[b * sy.b + c * sy.c + h * sy.h + w * sy.w] = store<T>(v * s[(b * H + h) * W + w]);
      }
  }
}

template <typename T, bool kA>
void scale_forward_typed(const T* x, const acc_t<T>* a, const acc_t<T>* s, T* y, int64_t B, int64_t C, int64_t H,
                         int64_t W, Strides4 sx, Strides4 sy) {
  if (plane_contiguous(sx, H, W) && plane_contiguous(sy, H, W))
    return scale_fwd_planes<T, kA>(x, a, s, y, B, C, H * W, sx, sy);
  if (channels_contiguous(sx, C) && channels_contiguous(sy, C))
    return scale_fwd_channels<T, kA>(x, a, s, y, B, C, H, W, sx, sy);
  scale_fwd_generic<T, kA>(x, a, s, y, B, C, H, W, sx, sy);
}

// ---------------------------------------------------------------------------------------------
// scale backward: dx = dy * a * s, da = sum_hw dy * x * s, ds = sum_c dy * x * a
// ---------------------------------------------------------------------------------------------

// Planes of x and dx contiguous, dy's plane flat with pixel stride dyp (1 when kUnitDy): a job owns
// (b, a tile of pixels) and loops over the channels outside. ds of the tile is complete in the job
// (fp32 per kChunk channels, folded into double); da gets one fp32 partial per (tile, channel),
// added in tile order afterwards.
template <typename T, bool kA, bool kUnitDy>
void scale_bwd_tiles(const T* dy, const T* x, const acc_t<T>* a, const acc_t<T>* s, T* dx, acc_t<T>* da,
                     acc_t<T>* ds, int64_t B, int64_t C, int64_t P, Strides4 sdy, int64_t dyp, Strides4 sx,
                     Strides4 sdx) {
  using A = acc_t<T>;
  const int64_t TP = tile_width(B, P);
  const int64_t nT = (P + TP - 1) / TP;
  const int64_t step = kUnitDy ? 1 : dyp;
  const int64_t ahead = rows_ahead<T>(sx.c);   // as pool_fwd_tiles (3.7 -> 3.1-3.4 ms at 32x1024x14x14)
  std::vector<A> part(kA && nT > 1 ? static_cast<size_t>(B * nT * C) : 0);
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < B * nT; ++job) {
    A dsa[kMaxTile];
    double dst[kMaxTile];
    const int64_t b = job / nT, t = job % nT, i0 = t * TP, n = std::min(TP, P - i0);
    const A* __restrict__ sr = s + b * P + i0;
    for (int64_t i = 0; i < n; ++i) dst[i] = 0.0;
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t c1 = std::min(C, c0 + kChunk);
      for (int64_t i = 0; i < n; ++i) dsa[i] = A(0);
      for (int64_t c = c0; c < c1; ++c) {
        const T* __restrict__ dyr = dy + b * sdy.b + c * sdy.c + i0 * step;
        const T* __restrict__ xr = x + b * sx.b + c * sx.c + i0;
        T* __restrict__ dxr = dx + b * sdx.b + c * sdx.c + i0;
        prefetch_span(xr, ahead * sx.c, n);
        if (kUnitDy) prefetch_span(dyr, ahead * sdy.c, n);
        const A ac = kA ? a[b * C + c] : A(1);
        A dacc = 0;
#pragma omp simd reduction(+ : dacc)
        for (int64_t i = 0; i < n; ++i) {
          const A gv = static_cast<A>(to_float(dyr[i * step]));
          const A tv = gv * static_cast<A>(to_float(xr[i]));
          if (kA) {
            dxr[i] = store<T>(gv * ac * sr[i]);
            dsa[i] += tv * ac;
            dacc += tv * sr[i];
          } else {
            dxr[i] = store<T>(gv * sr[i]);
            dsa[i] += tv;
          }
        }
        if (kA) {
          if (nT == 1) da[b * C + c] = dacc;
          else part[(b * nT + t) * C + c] = dacc;
        }
      }
      for (int64_t i = 0; i < n; ++i) dst[i] += static_cast<double>(dsa[i]);
    }
    for (int64_t i = 0; i < n; ++i) ds[b * P + i0 + i] = static_cast<A>(dst[i]);
  }
  if (kA && nT > 1) {
#pragma omp parallel for schedule(static)
    for (int64_t bc = 0; bc < B * C; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      double tot = 0.0;
      for (int64_t t = 0; t < nT; ++t) tot += static_cast<double>(part[(b * nT + t) * C + c]);
      da[bc] = static_cast<A>(tot);
    }
  }
}

// Channels of x and dx contiguous, dy's channel stride dyc (1 when kUnitDy, e.g. an NCHW dy
// against a channels_last x otherwise): jobs of (b, pixel segment). ds of a pixel is a SIMD row
// reduction; da goes through per-job rows (fp32 over kChunk pixels, folded into double) added in
// segment order.
template <typename T, bool kA, bool kUnitDy>
void scale_bwd_channels(const T* dy, const T* x, const acc_t<T>* a, const acc_t<T>* s, T* dx, acc_t<T>* da,
                        acc_t<T>* ds, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sx,
                        Strides4 sdx) {
  using A = acc_t<T>;
  const int64_t P = H * W;
  const int64_t dyc = kUnitDy ? 1 : sdy.c;
  int64_t S, seg;
  segments(B, P, S, seg);
  std::vector<double> partial(kA && S > 1 ? static_cast<size_t>(B * S * C) : 0);
#pragma omp parallel
  {
    std::vector<A> acc(kA ? static_cast<size_t>(C) : 0);
    std::vector<double> tot(kA ? static_cast<size_t>(C) : 0);
#pragma omp for schedule(static)
    for (int64_t job = 0; job < B * S; ++job) {
      const int64_t b = job / S, sg = job % S, q0 = sg * seg, q1 = std::min(P, q0 + seg);
      const A* __restrict__ ar = kA ? a + b * C : nullptr;
      A* __restrict__ pa = acc.data();
      if (kA) std::fill(tot.begin(), tot.end(), 0.0);
      int64_t h = q0 / W, w = q0 % W;
      for (int64_t c0 = q0; c0 < q1; c0 += kChunk) {
        const int64_t c1 = std::min(q1, c0 + kChunk);
        if (kA) std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t q = c0; q < c1; ++q) {
          const T* __restrict__ dyr = dy + b * sdy.b + h * sdy.h + w * sdy.w;
          const T* __restrict__ xr = x + b * sx.b + h * sx.h + w * sx.w;
          T* __restrict__ dxr = dx + b * sdx.b + h * sdx.h + w * sdx.w;
          const A sv = s[b * P + q];
          A dsum = 0;
          if (kA) {
#pragma omp simd reduction(+ : dsum)
            for (int64_t c = 0; c < C; ++c) {
              const A gv = static_cast<A>(to_float(dyr[c * dyc]));
              const A tv = gv * static_cast<A>(to_float(xr[c]));
              dxr[c] = store<T>(gv * ar[c] * sv);
              dsum += tv * ar[c];
              pa[c] += tv * sv;
            }
          } else {
#pragma omp simd reduction(+ : dsum)
            for (int64_t c = 0; c < C; ++c) {
              const A gv = static_cast<A>(to_float(dyr[c * dyc]));
              dxr[c] = store<T>(gv * sv);
              dsum += gv * static_cast<A>(to_float(xr[c]));
            }
          }
          ds[b * P + q] = dsum;
          if (++w == W) {
            w = 0;
            ++h;
          }
        }
        if (kA)
          for (int64_t c = 0; c < C; ++c) tot[c] += static_cast<double>(pa[c]);
      }
      if (kA) {
        if (S == 1) {
          for (int64_t c = 0; c < C; ++c) da[b * C + c] = static_cast<A>(tot[c]);
        } else {
          double* pp = partial.data() + (b * S + sg) * C;
          for (int64_t c = 0; c < C; ++c) pp[c] = tot[c];
        }
      }
    }
  }
  if (kA && S > 1) {
#pragma omp parallel for schedule(static)
    for (int64_t bc = 0; bc < B * C; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      double t = 0.0;
      for (int64_t sg = 0; sg < S; ++sg) t += partial[(b * S + sg) * C + c];
      da[bc] = static_cast<A>(t);
    }
  }
}

// Any strides: dx and da per (b, c), then ds per pixel (a second read of dy and x; not fast).
template <typename T, bool kA>
void scale_bwd_generic(const T* dy, const T* x, const acc_t<T>* a, const acc_t<T>* s, T* dx, acc_t<T>* da,
                       acc_t<T>* ds, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sx,
                       Strides4 sdx) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    const A ac = kA ? a[bc] : A(1);
    double tot = 0.0;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const A gv = static_cast<A>(to_float(dy[b * sdy.b + c * sdy.c + h * sdy.h + w * sdy.w]));
        const A sv = s[(b * H + h) * W + w];
        dx[b * sdx.b + c * sdx.c + h * sdx.h + w * sdx.w] = store<T>(gv * ac * sv);
        if (kA)
          tot += static_cast<double>(gv * static_cast<A>(to_float(x[b * sx.b + c * sx.c + h * sx.h + w * sx.w]))) *
                 static_cast<double>(sv);
      }
    if (kA) da[bc] = static_cast<A>(tot);
  }
#pragma omp parallel for schedule(static)
  for (int64_t bp = 0; bp < B * H * W; ++bp) {
    const int64_t b = bp / (H * W), p = bp % (H * W), h = p / W, w = p % W;
    double tot = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const A gv = static_cast<A>(to_float(dy[b * sdy.b + c * sdy.c + h * sdy.h + w * sdy.w]));
      const A tv = gv * static_cast<A>(to_float(x[b * sx.b + c * sx.c + h * sx.h + w * sx.w]));
      tot += static_cast<double>(kA ? tv * a[b * C + c] : tv);
    }
    ds[bp] = static_cast<A>(tot);
  }
}

// True when the H x W plane of t flattens into one strided axis; its pixel stride in *sp.
bool plane_flat(const Strides4& t, int64_t H, int64_t W, int64_t* sp) {
  if (H != 1 && W != 1 && t.h != W * t.w) return false;
  *sp = W == 1 ? t.h : t.w;
  return true;
}

template <typename T, bool kA>
void scale_backward_typed(const T* dy, const T* x, const acc_t<T>* a, const acc_t<T>* s, T* dx, acc_t<T>* da,
                          acc_t<T>* ds, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sx,
                          Strides4 sdx) {
  int64_t dyp = 1;
  if (plane_contiguous(sx, H, W) && plane_contiguous(sdx, H, W) && plane_flat(sdy, H, W, &dyp)) {
    if (dyp == 1 || H * W == 1)
      return scale_bwd_tiles<T, kA, true>(dy, x, a, s, dx, da, ds, B, C, H * W, sdy, 1, sx, sdx);
    return scale_bwd_tiles<T, kA, false>(dy, x, a, s, dx, da, ds, B, C, H * W, sdy, dyp, sx, sdx);
  }
  if (channels_contiguous(sx, C) && channels_contiguous(sdx, C)) {
    if (channels_contiguous(sdy, C))
      return scale_bwd_channels<T, kA, true>(dy, x, a, s, dx, da, ds, B, C, H, W, sdy, sx, sdx);
    return scale_bwd_channels<T, kA, false>(dy, x, a, s, dx, da, ds, B, C, H, W, sdy, sx, sdx);
  }
  scale_bwd_generic<T, kA>(dy, x, a, s, dx, da, ds, B, C, H, W, sdy, sx, sdx);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// entry points: dtype and a-or-not dispatch
// ---------------------------------------------------------------------------------------------

#define FA_DTYPES(CASE)      \
  CASE(Float32, float)       \
  CASE(Float64, double)      \
  CASE(Float16, fp16_t)      \
  CASE(BFloat16, bf16_t)

void spatial_pool_forward_cpu(const void* x, const void* a, void* y, int32_t* idx, DType dtype, int64_t B, int64_t N,
                              int64_t P1, int64_t P2, Strides4 sx, Strides4 sy) {
  switch (dtype) {
#define FA_CASE(TAG, T)                                                                                        \
  case DType::TAG: {                                                                                           \
    const T* xt = static_cast<const T*>(x);                                                                    \
    const acc_t<T>* at = static_cast<const acc_t<T>*>(a);                                                      \
    if (a) return pool_forward_typed<T, true>(xt, at, static_cast<T*>(y), idx, B, N, P1, P2, sx, sy);          \
    return pool_forward_typed<T, false>(xt, at, static_cast<T*>(y), idx, B, N, P1, P2, sx, sy);                \
  }
    FA_DTYPES(FA_CASE)
#undef FA_CASE
  }
}

void spatial_pool_backward_cpu(const void* dy, const void* x, const void* a, const int32_t* idx, void* dx, void* da,
                               DType dtype, int64_t B, int64_t N, int64_t P1, int64_t P2, Strides4 sdy, Strides4 sx,
                               Strides4 sdx) {
  switch (dtype) {
#define FA_CASE(TAG, T)                                                                                        \
  case DType::TAG: {                                                                                           \
    const T* dyt = static_cast<const T*>(dy);                                                                  \
    const T* xt = static_cast<const T*>(x);                                                                    \
    const acc_t<T>* at = static_cast<const acc_t<T>*>(a);                                                      \
    acc_t<T>* dat = static_cast<acc_t<T>*>(da);                                                                \
    T* dxt = static_cast<T*>(dx);                                                                              \
    if (a) return pool_backward_typed<T, true>(dyt, xt, at, idx, dxt, dat, B, N, P1, P2, sdy, sx, sdx);        \
    return pool_backward_typed<T, false>(dyt, xt, at, idx, dxt, dat, B, N, P1, P2, sdy, sx, sdx);              \
  }
    FA_DTYPES(FA_CASE)
#undef FA_CASE
  }
}

void spatial_scale_forward_cpu(const void* x, const void* a, const void* s, void* y, DType dtype, int64_t B,
                               int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sy) {
  switch (dtype) {
#define FA_CASE(TAG, T)                                                                                        \
  case DType::TAG: {                                                                                           \
    const T* xt = static_cast<const T*>(x);                                                                    \
    const acc_t<T>* at = static_cast<const acc_t<T>*>(a);                                                      \
    const acc_t<T>* st = static_cast<const acc_t<T>*>(s);                                                      \
    if (a) return scale_forward_typed<T, true>(xt, at, st, static_cast<T*>(y), B, C, H, W, sx, sy);            \
    return scale_forward_typed<T, false>(xt, at, st, static_cast<T*>(y), B, C, H, W, sx, sy);                  \
  }
    FA_DTYPES(FA_CASE)
#undef FA_CASE
  }
}

void spatial_scale_backward_cpu(const void* dy, const void* x, const void* a, const void* s, void* dx, void* da,
                                void* ds, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy,
                                Strides4 sx, Strides4 sdx) {
  switch (dtype) {
#define FA_CASE(TAG, T)                                                                                        \
  case DType::TAG: {                                                                                           \
    const T* dyt = static_cast<const T*>(dy);                                                                  \
    const T* xt = static_cast<const T*>(x);                                                                    \
    const acc_t<T>* at = static_cast<const acc_t<T>*>(a);                                                      \
    const acc_t<T>* st = static_cast<const acc_t<T>*>(s);                                                      \
    acc_t<T>* dat = static_cast<acc_t<T>*>(da);                                                                \
    acc_t<T>* dst = static_cast<acc_t<T>*>(ds);                                                                \
    if (a)                                                                                                     \
      return scale_backward_typed<T, true>(dyt, xt, at, st, static_cast<T*>(dx), dat, dst, B, C, H, W, sdy, sx, sdx); \
    return scale_backward_typed<T, false>(dyt, xt, at, st, static_cast<T*>(dx), dat, dst, B, C, H, W, sdy, sx, sdx);  \
  }
    FA_DTYPES(FA_CASE)
#undef FA_CASE
  }
}

#undef FA_DTYPES

}  // namespace fastattn
