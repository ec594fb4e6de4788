// SGE gate on the CPU. Work unit: one (sample, group) slab of Cg x N elements, or a segment of its
// positions when there are too few slabs for the threads (the segment count depends on the shape
// only, and partial sums are added in segment order: results do not depend on the thread count).
//
// Forward, per slab: (1) channel sums -> m and mu0 = sum_c m[c] mean_p x[c] (the exact mean of xn);
// (2) sums of d = xn - mu0 and d^2 -> mu, sd (shifted sums: no cancellation); (3) y = x * s.
// Backward: (A) per-position dt0 and d, the group sums and, per channel, sum_p dt0 (x - m),
// sum_p d (x - m), sum_p (x - m) -> dm exactly; (B) dx. One slab (a few hundred KB at most for
// SGE-ResNet shapes) stays in the core's cache between the steps, so x (and dy) come from DRAM once.
//
// Layouts: kPlane (H x W flattens with unit stride: NCHW and its channel slices; vectorised over
// positions), kChan (channels contiguous: channels_last; vectorised over the group's channels),
// kAny (anything else: correct, not fast).
#include "group.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace fastattn {
namespace {

constexpr int64_t kTile = 256;          // positions per tile of the per-position buffers (L1)
constexpr int64_t kMinJobs = 64;        // fewer slabs than this get their positions split
constexpr int64_t kMinSegElems = 32768; // no segment smaller than this (elements)
constexpr int64_t kCBlock = 16;         // channels per partial sum of the per-position dot products

enum Kind : int { kPlane = 0, kChan = 1, kAny = 2 };

// Strides of a (B, C, H, W) tensor and, when H and W flatten into one axis, that axis' stride p.
struct Map {
  int64_t b, c, h, w, p;
  bool flat;
};

Map make_map(const Strides4& s, int64_t H, int64_t W) {
  Map m{s.b, s.c, s.h, s.w, 1, true};
  if (H * W <= 1) m.p = 1;
  else if (H == 1) m.p = s.w;
  else if (W == 1) m.p = s.h;
  else if (s.h == W * s.w) m.p = s.w;
  else m.flat = false;
  return m;
}

// Offset of position p (= h * W + w) for the kAny layout.
inline int64_t pix(const Map& m, int64_t p, int64_t W) { return (p / W) * m.h + (p % W) * m.w; }

// exp for float without a libm call, so that `omp simd` loops vectorise: Cody-Waite reduction by
// ln 2 and a degree-7 Taylor polynomial on |r| <= ln2 / 2 (~1 ulp). Inputs clamped to the range
// where 2^n stays a normal float (the sigmoid saturates long before).
inline float exp_approx(float v) {
  v = v < -87.0f ? -87.0f : (v > 88.0f ? 88.0f : v);
  const float n = std::floor(v * 1.44269504088896341f + 0.5f);
  const float r = (v - n * 0.693145751953125f) - n * 1.42860676533018705e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float sigmoid(float t) { return 1.0f / (1.0f + exp_approx(-t)); }
inline double sigmoid(double t) { return 1.0 / (1.0 + std::exp(-t)); }

// ---------------------------------------------------------------------------------------------
// Layout primitives on one group: x points at the group's first channel of sample b; positions
// [p0, p0 + n) with n <= kTile for the tile functions.
// ---------------------------------------------------------------------------------------------

// out[c] = sum over p in [p0, p1) of x[c, p]. acc: Cg scratch values.
template <typename T, int K>
void chan_sums(const T* x, const Map& mx, int64_t W, int64_t Cg, int64_t p0, int64_t p1, double* out,
               acc_t<T>* acc) {
  using A = acc_t<T>;
  if constexpr (K == kPlane) {
    for (int64_t c = 0; c < Cg; ++c) {
      const T* px = x + c * mx.c;
      double total = 0;
      for (int64_t i0 = p0; i0 < p1; i0 += kChunk) {
        const int64_t i1 = std::min(p1, i0 + kChunk);
        A a = 0;
#pragma omp simd reduction(+ : a)
        for (int64_t i = i0; i < i1; ++i) a += static_cast<A>(to_float(px[i]));
        total += static_cast<double>(a);
      }
      out[c] = total;
    }
  } else {
    std::fill(out, out + Cg, 0.0);
    for (int64_t i0 = p0; i0 < p1; i0 += kChunk) {
      const int64_t i1 = std::min(p1, i0 + kChunk);
      std::fill(acc, acc + Cg, A(0));
      for (int64_t i = i0; i < i1; ++i) {
        if constexpr (K == kChan) {
          const T* px = x + i * mx.p;
#pragma omp simd
          for (int64_t c = 0; c < Cg; ++c) acc[c] += static_cast<A>(to_float(px[c]));
        } else {
          const T* px = x + pix(mx, i, W);
          for (int64_t c = 0; c < Cg; ++c) acc[c] += static_cast<A>(to_float(px[c * mx.c]));
        }
      }
      for (int64_t c = 0; c < Cg; ++c) out[c] += static_cast<double>(acc[c]);
    }
  }
}

// xn[i] = sum_c x[c, p0 + i] m[c].
template <typename T, int K>
void xn_tile(const T* x, const Map& mx, int64_t W, int64_t Cg, const acc_t<T>* m, int64_t p0, int64_t n,
             acc_t<T>* xn) {
  using A = acc_t<T>;
  if constexpr (K == kPlane) {
    // Sums over blocks of kCBlock channels added into xn: error growth ~ kCBlock + Cg / kCBlock
    // roundings instead of Cg (a 2048-channel group measured 4x the torch path's error otherwise).
    A part[kTile];
    std::fill(xn, xn + n, A(0));
    for (int64_t c0 = 0; c0 < Cg; c0 += kCBlock) {
      const int64_t c1 = std::min(Cg, c0 + kCBlock);
      A* acc = Cg <= kCBlock ? xn : part;
      if (acc == part) std::fill(part, part + n, A(0));
      for (int64_t c = c0; c < c1; ++c) {
        const T* px = x + c * mx.c + p0;
        const A mc = m[c];
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<A>(to_float(px[i])) * mc;
      }
      if (acc == part) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) xn[i] += part[i];
      }
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      A a = 0;
      if constexpr (K == kChan) {
        const T* px = x + (p0 + i) * mx.p;
#pragma omp simd reduction(+ : a)
        for (int64_t c = 0; c < Cg; ++c) a += static_cast<A>(to_float(px[c])) * m[c];
      } else {   // the slow path: plain double accumulation
        const T* px = x + pix(mx, p0 + i, W);
        double t = 0;
        for (int64_t c = 0; c < Cg; ++c) t += static_cast<double>(to_float(px[c * mx.c])) * m[c];
        a = static_cast<A>(t);
      }
      xn[i] = a;
    }
  }
}

// xn[i] as above and ds[i] = sum_c dy[c, p0 + i] x[c, p0 + i]. kUnitDy: dy's stride along the
// vectorised axis is 1 (positions for kPlane, channels for kChan); else its own stride.
template <typename T, int K, bool kUnitDy>
void xn_ds_tile(const T* dy, const Map& mdy, const T* x, const Map& mx, int64_t W, int64_t Cg, const acc_t<T>* m,
                int64_t p0, int64_t n, acc_t<T>* xn, acc_t<T>* ds) {
  using A = acc_t<T>;
  if constexpr (K == kPlane) {
    const int64_t sp = kUnitDy ? 1 : mdy.p;
    A part_xn[kTile], part_ds[kTile];   // blocked sums, as in xn_tile
    std::fill(xn, xn + n, A(0));
    std::fill(ds, ds + n, A(0));
    for (int64_t c0 = 0; c0 < Cg; c0 += kCBlock) {
      const int64_t c1 = std::min(Cg, c0 + kCBlock);
      const bool direct = Cg <= kCBlock;
      A* ax = direct ? xn : part_xn;
      A* ad = direct ? ds : part_ds;
      if (!direct) {
        std::fill(part_xn, part_xn + n, A(0));
        std::fill(part_ds, part_ds + n, A(0));
      }
      for (int64_t c = c0; c < c1; ++c) {
        const T* px = x + c * mx.c + p0;
        const T* pdy = dy + c * mdy.c + p0 * sp;
        const A mc = m[c];
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const A xv = static_cast<A>(to_float(px[i]));
          ax[i] += xv * mc;
          ad[i] += static_cast<A>(to_float(pdy[i * sp])) * xv;
        }
      }
      if (!direct) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          xn[i] += part_xn[i];
          ds[i] += part_ds[i];
        }
      }
    }
  } else if constexpr (K == kChan) {
    const int64_t sc = kUnitDy ? 1 : mdy.c;
    for (int64_t i = 0; i < n; ++i) {
      const T* px = x + (p0 + i) * mx.p;
      const T* pdy = dy + (p0 + i) * mdy.p;
      A a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
      for (int64_t c = 0; c < Cg; ++c) {
        const A xv = static_cast<A>(to_float(px[c]));
        a += xv * m[c];
        b += static_cast<A>(to_float(pdy[c * sc])) * xv;
      }
      xn[i] = a;
      ds[i] = b;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const T* px = x + pix(mx, p0 + i, W);
      const T* pdy = dy + pix(mdy, p0 + i, W);
      double a = 0, b = 0;   // the slow path: plain double accumulation
      for (int64_t c = 0; c < Cg; ++c) {
        const double xv = static_cast<double>(to_float(px[c * mx.c]));
        a += xv * m[c];
        b += static_cast<double>(to_float(pdy[c * mdy.c])) * xv;
      }
      xn[i] = static_cast<A>(a);
      ds[i] = static_cast<A>(b);
    }
  }
}

// y[c, p0 + i] = x[c, p0 + i] * s[i].
template <typename T, int K>
void gate_tile(const T* x, const Map& mx, T* y, const Map& my, int64_t W, int64_t Cg, int64_t p0, int64_t n,
               const acc_t<T>* s) {
  using A = acc_t<T>;
  if constexpr (K == kPlane) {
    for (int64_t c = 0; c < Cg; ++c) {
      const T* px = x + c * mx.c + p0;
      T* py = y + c * my.c + p0;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) py[i] = store<T>(static_cast<A>(to_float(px[i])) * s[i]);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const A si = s[i];
      if constexpr (K == kChan) {
        const T* px = x + (p0 + i) * mx.p;
        T* py = y + (p0 + i) * my.p;
#pragma omp simd
        for (int64_t c = 0; c < Cg; ++c) py[c] = store<T>(static_cast<A>(to_float(px[c])) * si);
      } else {
        const T* px = x + pix(mx, p0 + i, W);
        T* py = y + pix(my, p0 + i, W);
        for (int64_t c = 0; c < Cg; ++c) py[c * my.c] = store<T>(static_cast<A>(to_float(px[c * mx.c])) * si);
      }
    }
  }
}

// Per channel, over the tile: P[c] += sum_i w1[i] (x - m[c]); Q[c] += sum_i w2[i] (x - m[c]);
// R[c] += sum_i (x - m[c]). acc: 3 * Cg scratch values.
template <typename T, int K>
void pqr_tile(const T* x, const Map& mx, int64_t W, int64_t Cg, const acc_t<T>* m, int64_t p0, int64_t n,
              const acc_t<T>* w1, const acc_t<T>* w2, double* P, double* Q, double* R, acc_t<T>* acc) {
  using A = acc_t<T>;
  if constexpr (K == kPlane) {
    for (int64_t c = 0; c < Cg; ++c) {
      const T* px = x + c * mx.c + p0;
      const A mc = m[c];
      A ap = 0, aq = 0, ar = 0;
#pragma omp simd reduction(+ : ap, aq, ar)
      for (int64_t i = 0; i < n; ++i) {
        const A xc = static_cast<A>(to_float(px[i])) - mc;
        ap += w1[i] * xc;
        aq += w2[i] * xc;
        ar += xc;
      }
      P[c] += static_cast<double>(ap);
      Q[c] += static_cast<double>(aq);
      R[c] += static_cast<double>(ar);
    }
  } else {
    A* ap = acc;
    A* aq = acc + Cg;
    A* ar = acc + 2 * Cg;
    std::fill(acc, acc + 3 * Cg, A(0));
    for (int64_t i = 0; i < n; ++i) {
      const A u = w1[i], v = w2[i];
      if constexpr (K == kChan) {
        const T* px = x + (p0 + i) * mx.p;
#pragma omp simd
        for (int64_t c = 0; c < Cg; ++c) {
          const A xc = static_cast<A>(to_float(px[c])) - m[c];
          ap[c] += u * xc;
          aq[c] += v * xc;
          ar[c] += xc;
        }
      } else {
        const T* px = x + pix(mx, p0 + i, W);
        for (int64_t c = 0; c < Cg; ++c) {
          const A xc = static_cast<A>(to_float(px[c * mx.c])) - m[c];
          ap[c] += u * xc;
          aq[c] += v * xc;
          ar[c] += xc;
        }
      }
    }
    for (int64_t c = 0; c < Cg; ++c) {
      P[c] += static_cast<double>(ap[c]);
      Q[c] += static_cast<double>(aq[c]);
      R[c] += static_cast<double>(ar[c]);
    }
  }
}

// dx[c, p] = dy[c, p] s[i] + dxn[i] m[c] + dmn[c] (p = p0 + i).
template <typename T, int K, bool kUnitDy>
void dx_tile(const T* dy, const Map& mdy, const T* x, const Map& mx, T* dx, const Map& mdx, int64_t W, int64_t Cg,
             const acc_t<T>* m, const acc_t<T>* dmn, int64_t p0, int64_t n, const acc_t<T>* s,
             const acc_t<T>* dxn) {
  using A = acc_t<T>;
  (void)x;
  (void)mx;
  if constexpr (K == kPlane) {
    const int64_t sp = kUnitDy ? 1 : mdy.p;
    for (int64_t c = 0; c < Cg; ++c) {
      const T* pdy = dy + c * mdy.c + p0 * sp;
      T* pdx = dx + c * mdx.c + p0;
      const A mc = m[c], dc = dmn[c];
#pragma omp simd
      for (int64_t i = 0; i < n; ++i)
        pdx[i] = store<T>(static_cast<A>(to_float(pdy[i * sp])) * s[i] + dxn[i] * mc + dc);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const A si = s[i], ei = dxn[i];
      if constexpr (K == kChan) {
        const int64_t sc = kUnitDy ? 1 : mdy.c;
        const T* pdy = dy + (p0 + i) * mdy.p;
        T* pdx = dx + (p0 + i) * mdx.p;
#pragma omp simd
        for (int64_t c = 0; c < Cg; ++c)
          pdx[c] = store<T>(static_cast<A>(to_float(pdy[c * sc])) * si + ei * m[c] + dmn[c]);
      } else {
        const T* pdy = dy + pix(mdy, p0 + i, W);
        T* pdx = dx + pix(mdx, p0 + i, W);
        for (int64_t c = 0; c < Cg; ++c)
          pdx[c * mdx.c] = store<T>(static_cast<A>(to_float(pdy[c * mdy.c])) * si + ei * m[c] + dmn[c]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Segments and the finishing steps shared by both drivers
// ---------------------------------------------------------------------------------------------

// Segments per slab: 1 when the slabs alone give the threads enough jobs, else enough to reach
// kMinJobs, each at least kMinSegElems elements. A function of the shape only.
int64_t num_segments(int64_t slabs, int64_t N, int64_t Cg) {
  if (slabs >= kMinJobs) return 1;
  const int64_t want = (kMinJobs + slabs - 1) / slabs;
  const int64_t min_pix = std::max<int64_t>(kTile, kMinSegElems / std::max<int64_t>(Cg, 1));
  const int64_t S = std::max<int64_t>(1, std::min(want, N / min_pix));
  return (N + (N + S - 1) / S - 1) / ((N + S - 1) / S);   // no empty segment
}

// m[c] from S segments' channel sums (parts[s * Cg + c]); returns the shift c0 = sum_c m[c] mean_p x[c]
// (the exact mean of xn computed with the stored m), rounded to the accumulation type.
template <typename A>
A finish_means(const double* parts, int64_t S, int64_t Cg, int64_t N, A* m) {
  double mu0 = 0;
  for (int64_t c = 0; c < Cg; ++c) {
    double t = 0;
    for (int64_t s = 0; s < S; ++s) t += parts[s * Cg + c];
    const double mean = t / static_cast<double>(N);
    m[c] = static_cast<A>(mean);
    mu0 += static_cast<double>(m[c]) * mean;
  }
  return static_cast<A>(mu0);
}

// mu and the unbiased sd of xn from S segments' {sum d, sum d^2}, d = xn - c0.
template <typename A>
void finish_stats(const double* parts, int64_t S, int64_t N, A c0, A* mu, A* sd) {
  double s1 = 0, s2 = 0;
  for (int64_t s = 0; s < S; ++s) {
    s1 += parts[2 * s];
    s2 += parts[2 * s + 1];
  }
  const double md = s1 / static_cast<double>(N);
  *mu = static_cast<A>(static_cast<double>(c0) + md);
  *sd = static_cast<A>(std::sqrt(std::max(0.0, (s2 - s1 * md) / static_cast<double>(N - 1))));
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename T>
struct Fwd {
  using A = acc_t<T>;
  const T* x;
  T* y;
  Map mx, my;
  const A *w, *bias;
  A *m, *mu, *sd;
  int64_t C, G, Cg, N, W;
  A eps;
  const T* xg(int64_t b, int64_t g) const { return x + b * mx.b + g * Cg * mx.c; }
  T* yg(int64_t b, int64_t g) const { return y + b * my.b + g * Cg * my.c; }
};

template <typename T, int K>
void fwd_stats(const Fwd<T>& f, int64_t b, int64_t g, int64_t p0, int64_t p1, acc_t<T> c0, double* out) {
  using A = acc_t<T>;
  A xn[kTile];
  const T* xb = f.xg(b, g);
  const A* mg = f.m + b * f.C + g * f.Cg;
  double s1 = 0, s2 = 0;
  for (int64_t p = p0; p < p1; p += kTile) {
    const int64_t n = std::min(kTile, p1 - p);
    xn_tile<T, K>(xb, f.mx, f.W, f.Cg, mg, p, n, xn);
    A a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
    for (int64_t i = 0; i < n; ++i) {
      const A d = xn[i] - c0;
      a1 += d;
      a2 += d * d;
    }
    s1 += static_cast<double>(a1);
    s2 += static_cast<double>(a2);
  }
  out[0] = s1;
  out[1] = s2;
}

template <typename T, int K>
void fwd_gate(const Fwd<T>& f, int64_t b, int64_t g, int64_t p0, int64_t p1) {
  using A = acc_t<T>;
  A buf[kTile];
  const int64_t bg = b * f.G + g;
  const T* xb = f.xg(b, g);
  T* yb = f.yg(b, g);
  const A* mg = f.m + b * f.C + g * f.Cg;
  const A mu = f.mu[bg], r = A(1) / (f.sd[bg] + f.eps), w = f.w[g], bias = f.bias[g];
  for (int64_t p = p0; p < p1; p += kTile) {
    const int64_t n = std::min(kTile, p1 - p);
    xn_tile<T, K>(xb, f.mx, f.W, f.Cg, mg, p, n, buf);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = sigmoid(w * ((buf[i] - mu) * r) + bias);
    gate_tile<T, K>(xb, f.mx, yb, f.my, f.W, f.Cg, p, n, buf);
  }
}

template <typename T, int K>
void fwd_run(const Fwd<T>& f, int64_t B) {
  using A = acc_t<T>;
  const int64_t G = f.G, Cg = f.Cg, N = f.N, BG = B * G;
  const int64_t S = num_segments(BG, N, Cg);
  if (S == 1) {
#pragma omp parallel
    {
      std::vector<double> sums(static_cast<size_t>(Cg));
      std::vector<A> scratch(static_cast<size_t>(Cg));
#pragma omp for schedule(static)
      for (int64_t bg = 0; bg < BG; ++bg) {
        const int64_t b = bg / G, g = bg % G;
        chan_sums<T, K>(f.xg(b, g), f.mx, f.W, Cg, 0, N, sums.data(), scratch.data());
        const A c0 = finish_means(sums.data(), 1, Cg, N, f.m + b * f.C + g * Cg);
        double st[2];
        fwd_stats<T, K>(f, b, g, 0, N, c0, st);
        finish_stats(st, 1, N, c0, f.mu + bg, f.sd + bg);
        fwd_gate<T, K>(f, b, g, 0, N);
      }
    }
    return;
  }
  // Split slabs: each step over all (slab, segment) jobs, then the fixed-order combination.
  const int64_t seg = (N + S - 1) / S, J = BG * S;
  std::vector<double> part(static_cast<size_t>(J * Cg));
  std::vector<A> c0(static_cast<size_t>(BG));
  std::vector<double> st(static_cast<size_t>(J * 2));
#pragma omp parallel
  {
    std::vector<A> scratch(static_cast<size_t>(Cg));
#pragma omp for schedule(static)
    for (int64_t j = 0; j < J; ++j) {
      const int64_t bg = j / S, s = j % S, p0 = s * seg;
      chan_sums<T, K>(f.xg(bg / G, bg % G), f.mx, f.W, Cg, p0, std::min(N, p0 + seg), part.data() + j * Cg,
                      scratch.data());
    }
#pragma omp for schedule(static)
    for (int64_t bg = 0; bg < BG; ++bg)
      c0[bg] = finish_means(part.data() + bg * S * Cg, S, Cg, N, f.m + (bg / G) * f.C + (bg % G) * Cg);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < J; ++j) {
      const int64_t bg = j / S, s = j % S, p0 = s * seg;
      fwd_stats<T, K>(f, bg / G, bg % G, p0, std::min(N, p0 + seg), c0[bg], st.data() + 2 * j);
    }
#pragma omp for schedule(static)
    for (int64_t bg = 0; bg < BG; ++bg) finish_stats(st.data() + 2 * bg * S, S, N, c0[bg], f.mu + bg, f.sd + bg);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < J; ++j) {
      const int64_t bg = j / S, s = j % S, p0 = s * seg;
      fwd_gate<T, K>(f, bg / G, bg % G, p0, std::min(N, p0 + seg));
    }
  }
}

template <typename T>
void forward_typed(const T* x, const acc_t<T>* w, const acc_t<T>* bias, T* y, acc_t<T>* m, acc_t<T>* mu,
                   acc_t<T>* sd, int64_t B, int64_t C, int64_t H, int64_t W, int64_t G, double eps, Strides4 sx,
                   Strides4 sy) {
  using A = acc_t<T>;
  const int64_t Cg = C / G;
  Fwd<T> f{x, y, make_map(sx, H, W), make_map(sy, H, W), w, bias, m, mu, sd, C, G, Cg, H * W, W,
           static_cast<A>(eps)};
  const bool flat = f.mx.flat && f.my.flat;
  if (flat && f.mx.p == 1 && f.my.p == 1) return fwd_run<T, kPlane>(f, B);
  if (flat && ((f.mx.c == 1 && f.my.c == 1) || Cg == 1)) return fwd_run<T, kChan>(f, B);
  fwd_run<T, kAny>(f, B);
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

template <typename T>
struct Bwd {
  using A = acc_t<T>;
  const T *dy, *x;
  T* dx;
  Map mdy, mx, mdx;
  const A *w, *bias, *m, *mu, *sd;
  int64_t C, G, Cg, N, W;
  A eps;
  const T* dyg(int64_t b, int64_t g) const { return dy + b * mdy.b + g * Cg * mdy.c; }
  const T* xg(int64_t b, int64_t g) const { return x + b * mx.b + g * Cg * mx.c; }
  T* dxg(int64_t b, int64_t g) const { return dx + b * mdx.b + g * Cg * mdx.c; }
};

// Step A over positions [p0, p1): g5 = {sum dt0, sum dt0 d, sum dt t0, sum dt, sum d} and
// pqr = {P, Q, R} (3 x Cg): P[c] = sum dt0 (x - m[c]), Q[c] = sum d (x - m[c]), R[c] = sum (x - m[c]).
template <typename T, int K, bool U>
void bwd_sums(const Bwd<T>& f, int64_t b, int64_t g, int64_t p0, int64_t p1, double* g5, double* pqr,
              acc_t<T>* scratch) {
  using A = acc_t<T>;
  A e[kTile], h[kTile];
  const int64_t bg = b * f.G + g, Cg = f.Cg;
  const T* xb = f.xg(b, g);
  const T* dyb = f.dyg(b, g);
  const A* mg = f.m + b * f.C + g * Cg;
  const A mu = f.mu[bg], r = A(1) / (f.sd[bg] + f.eps), w = f.w[g], bias = f.bias[g];
  std::fill(g5, g5 + 5, 0.0);
  std::fill(pqr, pqr + 3 * Cg, 0.0);
  for (int64_t p = p0; p < p1; p += kTile) {
    const int64_t n = std::min(kTile, p1 - p);
    xn_ds_tile<T, K, U>(dyb, f.mdy, xb, f.mx, f.W, Cg, mg, p, n, e, h);
    A a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4)
    for (int64_t i = 0; i < n; ++i) {
      const A d = e[i] - mu;
      const A t0 = d * r;
      const A s = sigmoid(w * t0 + bias);
      const A dt = h[i] * s * (A(1) - s);
      const A dt0 = w * dt;
      a0 += dt0;
      a1 += dt0 * d;
      a2 += dt * t0;
      a3 += dt;
      a4 += d;
      e[i] = d;
      h[i] = dt0;
    }
    g5[0] += static_cast<double>(a0);
    g5[1] += static_cast<double>(a1);
    g5[2] += static_cast<double>(a2);
    g5[3] += static_cast<double>(a3);
    g5[4] += static_cast<double>(a4);
    pqr_tile<T, K>(xb, f.mx, f.W, Cg, mg, p, n, h, e, pqr, pqr + Cg, pqr + 2 * Cg, scratch);
  }
}

// From S segments' sums of slab (b, g): coef = {mean_p dt0, k}, dmn[c] = dm[c] / N and this slab's
// {dweight, dbias}. dm[c] = sum_p dxn x[c] with dxn = r (dt0 - mean dt0) - k d, written with the
// centred sums: r (P - mean dt0 R) - k (Q + m[c] sum d) (exact; sum_p (x - m) and sum_p d vanish up
// to rounding only).
template <typename A>
void bwd_finish(const double* g5parts, const double* pqrparts, int64_t S, int64_t Cg, int64_t N, A sd, A eps,
                const A* m, A* dmn, A* coef, double* dwb) {
  double g5[5] = {0, 0, 0, 0, 0};
  for (int64_t s = 0; s < S; ++s)
    for (int j = 0; j < 5; ++j) g5[j] += g5parts[5 * s + j];
  const double r = static_cast<double>(A(1) / (sd + eps));
  const double mdt0 = g5[0] / static_cast<double>(N);
  const double k = sd > A(0) ? r * r * g5[1] / (static_cast<double>(N - 1) * static_cast<double>(sd)) : 0.0;
  for (int64_t c = 0; c < Cg; ++c) {
    double P = 0, Q = 0, R = 0;
    for (int64_t s = 0; s < S; ++s) {
      const double* q = pqrparts + 3 * Cg * s;
      P += q[c];
      Q += q[Cg + c];
      R += q[2 * Cg + c];
    }
    const double dm = r * (P - mdt0 * R) - k * (Q + static_cast<double>(m[c]) * g5[4]);
    dmn[c] = static_cast<A>(dm / static_cast<double>(N));
  }
  coef[0] = static_cast<A>(mdt0);
  coef[1] = static_cast<A>(k);
  dwb[0] = g5[2];
  dwb[1] = g5[3];
}

// Step B over positions [p0, p1): dx = dy s + dxn m[c] + dm[c] / N.
template <typename T, int K, bool U>
void bwd_dx(const Bwd<T>& f, int64_t b, int64_t g, int64_t p0, int64_t p1, const acc_t<T>* coef,
            const acc_t<T>* dmn) {
  using A = acc_t<T>;
  A e[kTile], h[kTile];
  const int64_t bg = b * f.G + g, Cg = f.Cg;
  const T* xb = f.xg(b, g);
  const T* dyb = f.dyg(b, g);
  T* dxb = f.dxg(b, g);
  const A* mg = f.m + b * f.C + g * Cg;
  const A mu = f.mu[bg], r = A(1) / (f.sd[bg] + f.eps), w = f.w[g], bias = f.bias[g];
  const A mdt0 = coef[0], k = coef[1];
  for (int64_t p = p0; p < p1; p += kTile) {
    const int64_t n = std::min(kTile, p1 - p);
    xn_ds_tile<T, K, U>(dyb, f.mdy, xb, f.mx, f.W, Cg, mg, p, n, e, h);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const A d = e[i] - mu;
      const A s = sigmoid(w * (d * r) + bias);
      const A dt0 = w * (h[i] * s * (A(1) - s));
      e[i] = s;
      h[i] = r * (dt0 - mdt0) - k * d;
    }
    dx_tile<T, K, U>(dyb, f.mdy, xb, f.mx, dxb, f.mdx, f.W, Cg, mg, dmn, p, n, e, h);
  }
}

template <typename T, int K, bool U>
void bwd_run(const Bwd<T>& f, int64_t B, acc_t<T>* dweight, acc_t<T>* dbias) {
  using A = acc_t<T>;
  const int64_t G = f.G, Cg = f.Cg, N = f.N, BG = B * G;
  const int64_t S = num_segments(BG, N, Cg);
  std::vector<double> dwb(static_cast<size_t>(2 * BG));
  if (S == 1) {
#pragma omp parallel
    {
      std::vector<double> pqr(static_cast<size_t>(3 * Cg));
      std::vector<A> scratch(static_cast<size_t>(3 * Cg)), dmn(static_cast<size_t>(Cg));
#pragma omp for schedule(static)
      for (int64_t bg = 0; bg < BG; ++bg) {
        const int64_t b = bg / G, g = bg % G;
        double g5[5];
        A coef[2];
        bwd_sums<T, K, U>(f, b, g, 0, N, g5, pqr.data(), scratch.data());
        bwd_finish(g5, pqr.data(), 1, Cg, N, f.sd[bg], f.eps, f.m + b * f.C + g * Cg, dmn.data(), coef,
                   dwb.data() + 2 * bg);
        bwd_dx<T, K, U>(f, b, g, 0, N, coef, dmn.data());
      }
    }
  } else {
    const int64_t seg = (N + S - 1) / S, J = BG * S;
    std::vector<double> g5(static_cast<size_t>(5 * J)), pqr(static_cast<size_t>(3 * Cg * J));
    std::vector<A> coef(static_cast<size_t>(2 * BG)), dmn(static_cast<size_t>(Cg * BG));
#pragma omp parallel
    {
      std::vector<A> scratch(static_cast<size_t>(3 * Cg));
#pragma omp for schedule(static)
      for (int64_t j = 0; j < J; ++j) {
        const int64_t bg = j / S, s = j % S, p0 = s * seg;
        bwd_sums<T, K, U>(f, bg / G, bg % G, p0, std::min(N, p0 + seg), g5.data() + 5 * j,
                          pqr.data() + 3 * Cg * j, scratch.data());
      }
#pragma omp for schedule(static)
      for (int64_t bg = 0; bg < BG; ++bg)
        bwd_finish(g5.data() + 5 * S * bg, pqr.data() + 3 * Cg * S * bg, S, Cg, N, f.sd[bg], f.eps,
                   f.m + (bg / G) * f.C + (bg % G) * Cg, dmn.data() + Cg * bg, coef.data() + 2 * bg,
                   dwb.data() + 2 * bg);
#pragma omp for schedule(static)
      for (int64_t j = 0; j < J; ++j) {
        const int64_t bg = j / S, s = j % S, p0 = s * seg;
        bwd_dx<T, K, U>(f, bg / G, bg % G, p0, std::min(N, p0 + seg), coef.data() + 2 * bg,
                        dmn.data() + Cg * bg);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {   // over the batch in order
    double tw = 0, tb = 0;
    for (int64_t b = 0; b < B; ++b) {
      tw += dwb[2 * (b * G + g)];
      tb += dwb[2 * (b * G + g) + 1];
    }
    dweight[g] = static_cast<A>(tw);
    dbias[g] = static_cast<A>(tb);
  }
}

template <typename T>
void backward_typed(const T* dy, const T* x, const acc_t<T>* w, const acc_t<T>* bias, const acc_t<T>* m,
                    const acc_t<T>* mu, const acc_t<T>* sd, T* dx, acc_t<T>* dweight, acc_t<T>* dbias, int64_t B,
                    int64_t C, int64_t H, int64_t W, int64_t G, double eps, Strides4 sdy, Strides4 sx,
                    Strides4 sdx) {
  using A = acc_t<T>;
  const int64_t Cg = C / G;
  Bwd<T> f{dy, x, dx, make_map(sdy, H, W), make_map(sx, H, W), make_map(sdx, H, W), w, bias, m, mu, sd, C, G, Cg,
           H * W, W, static_cast<A>(eps)};
  const bool flat = f.mx.flat && f.mdx.flat && f.mdy.flat;
  if (flat && f.mx.p == 1 && f.mdx.p == 1) {
    if (f.mdy.p == 1) return bwd_run<T, kPlane, true>(f, B, dweight, dbias);
    return bwd_run<T, kPlane, false>(f, B, dweight, dbias);
  }
  if (flat && ((f.mx.c == 1 && f.mdx.c == 1) || Cg == 1)) {
    if (f.mdy.c == 1 || Cg == 1) return bwd_run<T, kChan, true>(f, B, dweight, dbias);
    return bwd_run<T, kChan, false>(f, B, dweight, dbias);
  }
  bwd_run<T, kAny, false>(f, B, dweight, dbias);
}

}  // namespace

void sge_forward_cpu(const void* x, const void* weight, const void* bias, void* y, void* m, void* mu, void* sd,
                     DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, int64_t G, double eps, Strides4 sx,
                     Strides4 sy) {
  switch (dtype) {
#define FA_CASE(TAG, T)                                                                                       \
  case DType::TAG:                                                                                            \
    return forward_typed(static_cast<const T*>(x), static_cast<const acc_t<T>*>(weight),                     \
                         static_cast<const acc_t<T>*>(bias), static_cast<T*>(y), static_cast<acc_t<T>*>(m),  \
                         static_cast<acc_t<T>*>(mu), static_cast<acc_t<T>*>(sd), B, C, H, W, G, eps, sx, sy);
    FA_CASE(Float32, float)
    FA_CASE(Float64, double)
    FA_CASE(Float16, fp16_t)
    FA_CASE(BFloat16, bf16_t)
#undef FA_CASE
  }
}

void sge_backward_cpu(const void* dy, const void* x, const void* weight, const void* bias, const void* m,
                      const void* mu, const void* sd, void* dx, void* dweight, void* dbias, DType dtype, int64_t B,
                      int64_t C, int64_t H, int64_t W, int64_t G, double eps, Strides4 sdy, Strides4 sx,
                      Strides4 sdx) {
  switch (dtype) {
#define FA_CASE(TAG, T)                                                                                        \
  case DType::TAG:                                                                                             \
    return backward_typed(static_cast<const T*>(dy), static_cast<const T*>(x),                                \
                          static_cast<const acc_t<T>*>(weight), static_cast<const acc_t<T>*>(bias),           \
                          static_cast<const acc_t<T>*>(m), static_cast<const acc_t<T>*>(mu),                  \
                          static_cast<const acc_t<T>*>(sd), static_cast<T*>(dx), static_cast<acc_t<T>*>(dweight), \
                          static_cast<acc_t<T>*>(dbias), B, C, H, W, G, eps, sdy, sx, sdx);
    FA_CASE(Float32, float)
    FA_CASE(Float64, double)
    FA_CASE(Float16, fp16_t)
    FA_CASE(BFloat16, bf16_t)
#undef FA_CASE
  }
}

}  // namespace fastattn
