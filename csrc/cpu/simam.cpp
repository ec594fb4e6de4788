// SimAM fused: per (b, c) plane the statistics (mean, sum of squared deviations), then the gate.
//
// A job owns whole planes (NCHW: one plane; channels_last: a block of channels of one sample, its
// size capped so that it stays in L2), so its later sweeps re-read what its first sweep has just
// brought in: one read of x from memory forward and one of x and dy backward. Planes are cut into
// pixel segments only when the planes alone give too few jobs; the segments' partial statistics
// are then merged in segment order (results never depend on the thread count).
//
// Numerics: fp32 math for 16/32-bit types (fp64 for fp64). The moments are computed per chunk of
// kChunk elements in two sweeps (chunk mean, then squared deviations from it: no cancellation of
// sum(x^2) - n mu^2 when |mu| >> std), about a shift (the segment's first value), and chunks are
// merged in double (Chan et al.). The gate subtracts mu as fp32 hi + lo.
#include "simam.h"
#include "stream.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace fastattn {
namespace {

constexpr int64_t kMinJobs = 64;                  // jobs wanted before planes are cut into segments
constexpr int64_t kMinSegment = 4096;             // elements: no segment smaller than this
constexpr int64_t kTileBytes = int64_t(1) << 20;  // a channels_last job's share of x (and dy): L2-sized
constexpr int64_t kMinBlock = 16;                 // channels: the narrowest channels_last block

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Split {
  int64_t n, len_per;  // n pieces of len_per items (the last may be shorter)
};

// Cut an axis of len items into pieces of at least min_len so that jobs * pieces reaches kMinJobs.
inline Split split_axis(int64_t jobs, int64_t len, int64_t min_len) {
  int64_t n = jobs >= kMinJobs ? 1 : ceil_div(kMinJobs, std::max<int64_t>(jobs, 1));
  n = std::max<int64_t>(1, std::min(n, len / std::max<int64_t>(1, min_len)));
  const int64_t per = ceil_div(len, n);
  return {ceil_div(len, per), per};
}

// exp(v) for v <= 0 in fp32 without a library call, so that `omp simd` loops vectorise: v = k ln2 + f
// (Cody-Waite), exp(f) by its degree-7 Taylor polynomial (|f| <= ln2 / 2: error below 1e-8
// relative), 2^k from the exponent bits. v is clamped at -87 (2^k stays normal; the result is
// ~1e-38, which only ever adds to 1); a NaN passes through.
inline float exp_nonpos(float v) {
  v = v < -87.0f ? -87.0f : v;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float kf = (v * 1.44269504088896341f + kRound) - kRound;
  const float f = (v - kf * 0.693359375f) + kf * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const uint32_t bits = (static_cast<uint32_t>(static_cast<int32_t>(kf)) + 127u) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// exp(-z) for the gate's argument z = d r + 1/2 >= 1/2.
inline float exp_neg(float z) { return exp_nonpos(-z); }
inline double exp_neg(double z) { return std::exp(-z); }

// Count, mean and sum of squared deviations of a set of values.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
};

inline void merge(Moments& a, double n, double mean, double m2) {
  const double tot = a.n + n;
  const double delta = mean - a.mean;
  a.mean += delta * (n / tot);
  a.m2 += m2 + delta * delta * (a.n * n / tot);
  a.n = tot;
}

// The gate's constants from a plane's moments: mu and r = 1 / (4 (v + lambda)).
struct GateConst {
  double mu, r;
};

inline GateConst gate_const(const Moments& m, double lambda) {
  return {m.mean, 1.0 / (4.0 * (m.m2 / (m.n - 1.0) + lambda))};
}

// The training kernels' saved constants: (mu, r) of plane bc = b C + c at save[2 bc], from the forward, so that
// the backward skips the moments (a fifth of its arithmetic at 14 x 14) and computes the same dx.
inline void save_const(double* save, int64_t bc, const GateConst& g) {
  if (save) {
    save[2 * bc] = g.mu;
    save[2 * bc + 1] = g.r;
  }
}
inline GateConst saved_const(const double* saved, int64_t bc) { return {saved[2 * bc], saved[2 * bc + 1]}; }

// The backward's constants from a plane's sums A = sum(e xc), Bs = sum(e d):
// dS = -4 r^2 Bs / (n - 1) and shift = 2 r A / n, so that dx = g s + 2 xc (e r + dS) - shift.
inline void bwd_const(double A, double Bs, double r, double n, double& dS, double& shift) {
  dS = -4.0 * r * r * Bs / (n - 1.0);
  shift = 2.0 * r * A / n;
}

// A plane's constants in the math type. mu is carried as hi + lo and xc = (x - hi) - lo: rounding
// mu to fp32 alone would cost y up to |x| s'(.) 2 xc r ulp(mu), large when |mu| >> std.
template <typename A>
struct Consts {
  A mh, ml, r, dS, shift;
};

template <typename A>
inline Consts<A> consts_of(const GateConst& g) {
  const A hi = static_cast<A>(g.mu);
  return {hi, static_cast<A>(g.mu - static_cast<double>(hi)), static_cast<A>(g.r), A(0), A(0)};
}

template <typename A>
inline void set_bwd_consts(Consts<A>& k, double ta, double tb, double r, double n) {
  double dS, shift;
  bwd_const(ta, tb, r, n, dS, shift);
  k.dS = static_cast<A>(dS);
  k.shift = static_cast<A>(shift);
}

// The moments of `count` consecutive segments, merged in order.
inline Moments merged(const Moments* parts, int64_t count) {
  Moments m = parts[0];
  for (int64_t s = 1; s < count; ++s) merge(m, parts[s].n, parts[s].mean, parts[s].m2);
  return m;
}

// ---------------------------------------------------------------------------------------------
// Plane-contiguous sweeps (NCHW): a plane is a unit-stride run of n elements
// ---------------------------------------------------------------------------------------------

// Moments of p[i0, i1) about a shift K = p[i0] (x - K is exact for x near K, so a chunk's mean
// keeps the bits an fp32 sum of values ~|mu| would lose), chunk by chunk, merged in double.
template <typename T>
Moments moments_run(const T* __restrict__ p, int64_t i0, int64_t i1) {
  using A = acc_t<T>;
  const A K = static_cast<A>(to_float(p[i0]));
  Moments m;
  for (int64_t j0 = i0; j0 < i1; j0 += kChunk) {
    const int64_t j1 = std::min(i1, j0 + kChunk);
    auto v = [p](int64_t i) { return static_cast<A>(to_float(p[i])); };
    const A cm = lane_sum_x4<A>(j0, j1, [&](int64_t i) { return v(i) - K; }) / static_cast<A>(j1 - j0);  // mean - K
    const A q = lane_sum_x4<A>(j0, j1, [&](int64_t i) {
      const A d = (v(i) - K) - cm;
      return d * d;
    });
    merge(m, static_cast<double>(j1 - j0), static_cast<double>(K) + static_cast<double>(cm), static_cast<double>(q));
  }
  return m;
}

template <typename T>
void gate_run(const T* __restrict__ px, T* __restrict__ py, int64_t i0, int64_t i1, acc_t<T> mh, acc_t<T> ml,
              acc_t<T> r) {
  using A = acc_t<T>;
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const A v = static_cast<A>(to_float(px[i]));
    const A xc = (v - mh) - ml;
    const A s = A(1) / (A(1) + exp_neg(xc * xc * r + A(0.5)));
    py[i] = store<T>(v * s);
  }
}

// (A, Bs) of the elements [i0, i1): fp32 per chunk, folded into double. kKeep: also keeps each
// element's gate s and e = dy x s (1 - s) in keep_s[i - i0], keep_e[i - i0] for dx_kept (the exp
// and the division are most of the backward's arithmetic).
template <bool kKeep = false, typename T>
void sums_run(const T* __restrict__ pdy, const T* __restrict__ px, int64_t i0, int64_t i1, acc_t<T> mh, acc_t<T> ml,
              acc_t<T> r, double& ta, double& tb, acc_t<T>* __restrict__ keep_s = nullptr,
              acc_t<T>* __restrict__ keep_e = nullptr) {
  using A = acc_t<T>;
  // element i's terms e xc and e d of the two sums (and its kept gate and e)
  auto terms = [&](int64_t i, A& exc, A& ed) {
    const A v = static_cast<A>(to_float(px[i]));
    const A g = static_cast<A>(to_float(pdy[i]));
    const A xc = (v - mh) - ml;
    const A d = xc * xc;
    const A t = exp_neg(d * r + A(0.5));
    const A s = A(1) / (A(1) + t);
    const A e = g * v * s * (t * s);  // 1 - s = t s
    if constexpr (kKeep) {
      keep_s[i - i0] = s;
      keep_e[i - i0] = e;
    }
    exc = e * xc;
    ed = e * d;
  };
  ta = 0;
  tb = 0;
  for (int64_t j0 = i0; j0 < i1; j0 += kChunk) {
    const int64_t j1 = std::min(i1, j0 + kChunk);
    A sa, sb;
    lane_sum2<A>(j0, j1, terms, sa, sb);  // explicit lanes (see lane_sum in common.h)
    ta += static_cast<double>(sa);
    tb += static_cast<double>(sb);
  }
}

// dx_run with the gates kept by sums_run<true> (the same values, so the same dx).
template <typename T>
void dx_kept(const T* __restrict__ pdy, const T* __restrict__ px, const acc_t<T>* __restrict__ keep_s,
             const acc_t<T>* __restrict__ keep_e, T* __restrict__ pdx, int64_t n, acc_t<T> mh, acc_t<T> ml,
             acc_t<T> r, acc_t<T> dS, acc_t<T> shift, bool stream) {
  using A = acc_t<T>;
  if constexpr (std::is_same<T, float>::value) {
    if (stream) {
      const vfloat nmh = vbroadcast(-mh), nml = vbroadcast(-ml), vr = vbroadcast(r), vdS = vbroadcast(dS),
                   nsh = vbroadcast(-shift), two = vbroadcast(2.0f);
      stream_row_f32(
          pdx, n,
          [&](int64_t i) {
            const vfloat xc = vadd(vadd(vload(px + i), nmh), nml);
            const vfloat t = vmul(vmul(two, xc), vfma(vload(keep_e + i), vr, vdS));
            return vfma(vload(pdy + i), vload(keep_s + i), vadd(t, nsh));
          },
          [&](int64_t i) {
            const A xc = (px[i] - mh) - ml;
            return pdy[i] * keep_s[i] + A(2) * xc * (keep_e[i] * r + dS) - shift;
          });
      return;
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const A xc = (static_cast<A>(to_float(px[i])) - mh) - ml;
    pdx[i] = store<T>(static_cast<A>(to_float(pdy[i])) * keep_s[i] + A(2) * xc * (keep_e[i] * r + dS) - shift);
  }
}

// Planes up to this many elements keep their gates for dx (two buffers of it per thread: L2).
constexpr int64_t kKeepMax = 16384;

template <typename T>
void dx_run(const T* __restrict__ pdy, const T* __restrict__ px, T* __restrict__ pdx, int64_t i0, int64_t i1,
            acc_t<T> mh, acc_t<T> ml, acc_t<T> r, acc_t<T> dS, acc_t<T> shift) {
  using A = acc_t<T>;
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const A v = static_cast<A>(to_float(px[i]));
    const A g = static_cast<A>(to_float(pdy[i]));
    const A xc = (v - mh) - ml;
    const A d = xc * xc;
    const A t = exp_neg(d * r + A(0.5));
    const A s = A(1) / (A(1) + t);
    const A e = g * v * s * (t * s);
    pdx[i] = store<T>(g * s + A(2) * xc * (e * r + dS) - shift);
  }
}

template <typename T>
void fwd_plane(const T* x, T* y, int64_t B, int64_t C, int64_t n, double lambda, Strides4 sx, Strides4 sy,
               double* save) {
  using A = acc_t<T>;
  const int64_t BC = B * C;
  const Split sp = split_axis(BC, n, kMinSegment);
  if (sp.n == 1) {
#pragma omp parallel for schedule(static)
    for (int64_t bc = 0; bc < BC; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      const T* px = x + b * sx.b + c * sx.c;
      if (sx.c == n) prefetch_ahead(px, n);   // consecutive planes (see the backward)
      const GateConst g = gate_const(moments_run(px, 0, n), lambda);
      save_const(save, bc, g);
      const Consts<A> k = consts_of<A>(g);
      gate_run(px, y + b * sy.b + c * sy.c, 0, n, k.mh, k.ml, k.r);
    }
    return;
  }
  std::vector<Moments> parts(static_cast<size_t>(BC * sp.n));
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < BC * sp.n; ++job) {
    const int64_t bc = job / sp.n, i0 = (job % sp.n) * sp.len_per;
    parts[job] = moments_run(x + (bc / C) * sx.b + (bc % C) * sx.c, i0, std::min(n, i0 + sp.len_per));
  }
  std::vector<Consts<A>> k(static_cast<size_t>(BC));
  for (int64_t bc = 0; bc < BC; ++bc) {
    const GateConst g = gate_const(merged(parts.data() + bc * sp.n, sp.n), lambda);
    save_const(save, bc, g);
    k[bc] = consts_of<A>(g);
  }
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < BC * sp.n; ++job) {
    const int64_t bc = job / sp.n, i0 = (job % sp.n) * sp.len_per;
    const int64_t b = bc / C, c = bc % C;
    gate_run(x + b * sx.b + c * sx.c, y + b * sy.b + c * sy.c, i0, std::min(n, i0 + sp.len_per), k[bc].mh, k[bc].ml,
             k[bc].r);
  }
}

template <typename T>
void bwd_plane(const T* dy, const T* x, T* dx, int64_t B, int64_t C, int64_t n, double lambda, Strides4 sdy,
               Strides4 sx, Strides4 sdx, const double* saved) {
  using A = acc_t<T>;
  const int64_t BC = B * C;
  const Split sp = split_axis(BC, n, kMinSegment);
  const double nd = static_cast<double>(n);
  if (sp.n == 1) {
    const bool keep = n <= kKeepMax;
    // dx_kept streams fp32 dx (backward at 8x256x56x56: 2.37 -> 2.05 ms; the forward's gate through an L1
    // buffer and streamed was slower, as NAM's)
    const bool stream = std::is_same<T, float>::value && stream_output(BC * n * static_cast<int64_t>(sizeof(T)));
#pragma omp parallel
    {
      std::vector<A> keep_s(keep ? static_cast<size_t>(n) : 0), keep_e(keep ? static_cast<size_t>(n) : 0);
#pragma omp for schedule(static)
      for (int64_t bc = 0; bc < BC; ++bc) {
        const int64_t b = bc / C, c = bc % C;
        const T* px = x + b * sx.b + c * sx.c;
        const T* pdy = dy + b * sdy.b + c * sdy.c;
        T* pdx = dx + b * sdx.b + c * sdx.c;
        if (sx.c == n && sdy.c == n) {   // consecutive planes: training at 32x1024x14x14 10.1 -> 7.2 ms
          prefetch_ahead(px, n);
          prefetch_ahead(pdy, n);
        }
        const GateConst g = saved ? saved_const(saved, bc) : gate_const(moments_run(px, 0, n), lambda);
        Consts<A> k = consts_of<A>(g);
        double ta, tb;
        if (keep) {
          sums_run<true>(pdy, px, 0, n, k.mh, k.ml, k.r, ta, tb, keep_s.data(), keep_e.data());
          set_bwd_consts(k, ta, tb, g.r, nd);
          dx_kept(pdy, px, keep_s.data(), keep_e.data(), pdx, n, k.mh, k.ml, k.r, k.dS, k.shift, stream);
        } else {
          sums_run(pdy, px, 0, n, k.mh, k.ml, k.r, ta, tb);
          set_bwd_consts(k, ta, tb, g.r, nd);
          dx_run(pdy, px, pdx, 0, n, k.mh, k.ml, k.r, k.dS, k.shift);
        }
      }
      if (stream) stream_fence();
    }
    return;
  }
  const int64_t jobs = BC * sp.n;
  std::vector<Moments> parts(saved ? 0 : static_cast<size_t>(jobs));
  if (!saved) {
#pragma omp parallel for schedule(static)
    for (int64_t job = 0; job < jobs; ++job) {
      const int64_t bc = job / sp.n, i0 = (job % sp.n) * sp.len_per;
      parts[job] = moments_run(x + (bc / C) * sx.b + (bc % C) * sx.c, i0, std::min(n, i0 + sp.len_per));
    }
  }
  std::vector<GateConst> g(static_cast<size_t>(BC));
  std::vector<Consts<A>> k(static_cast<size_t>(BC));
  for (int64_t bc = 0; bc < BC; ++bc) {
    g[bc] = saved ? saved_const(saved, bc) : gate_const(merged(parts.data() + bc * sp.n, sp.n), lambda);
    k[bc] = consts_of<A>(g[bc]);
  }
  std::vector<double> sa(static_cast<size_t>(jobs)), sb(static_cast<size_t>(jobs));
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < jobs; ++job) {
    const int64_t bc = job / sp.n, i0 = (job % sp.n) * sp.len_per;
    const int64_t b = bc / C, c = bc % C;
    sums_run(dy + b * sdy.b + c * sdy.c, x + b * sx.b + c * sx.c, i0, std::min(n, i0 + sp.len_per), k[bc].mh,
             k[bc].ml, k[bc].r, sa[job], sb[job]);
  }
  for (int64_t bc = 0; bc < BC; ++bc) {
    double ta = 0, tb = 0;
    for (int64_t s = 0; s < sp.n; ++s) {
      ta += sa[bc * sp.n + s];
      tb += sb[bc * sp.n + s];
    }
    set_bwd_consts(k[bc], ta, tb, g[bc].r, nd);
  }
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < jobs; ++job) {
    const int64_t bc = job / sp.n, i0 = (job % sp.n) * sp.len_per;
    const int64_t b = bc / C, c = bc % C;
    const Consts<A>& q = k[bc];
    dx_run(dy + b * sdy.b + c * sdy.c, x + b * sx.b + c * sx.c, dx + b * sdx.b + c * sdx.c, i0,
           std::min(n, i0 + sp.len_per), q.mh, q.ml, q.r, q.dS, q.shift);
  }
}

// ---------------------------------------------------------------------------------------------
// Channels-contiguous sweeps (channels_last): a unit is (sample, block of nb channels); pixel p of
// it is at base + p * pixel_stride, its channels unit stride. Inner loops run over the channels.
// ---------------------------------------------------------------------------------------------

// Channel blocks of equal width (a multiple of kMinBlock): enough units for the threads, and a
// unit's share of the map (bytes per element summed over the tensors swept) within kTileBytes.
struct Blocks {
  int64_t n, width;
};

inline Blocks channel_blocks(int64_t B, int64_t C, int64_t HW, int64_t elem_bytes) {
  int64_t n = B >= kMinJobs ? 1 : ceil_div(kMinJobs, B);
  n = std::max(n, ceil_div(HW * C * elem_bytes, kTileBytes));
  n = std::max<int64_t>(1, std::min(n, ceil_div(C, kMinBlock)));
  const int64_t width = std::min(C, ceil_div(ceil_div(C, n), kMinBlock) * kMinBlock);
  return {ceil_div(C, width), width};
}

// Per-channel moments of pixels [p0, p1) about the shift K = pixel p0 (as moments_run): chunks of
// P pixels (P nb <= kChunk elements) swept twice, merged in double. cs, cq: scratch of nb.
template <typename T>
void moments_channels(const T* base, int64_t ps, int64_t nb, int64_t p0, int64_t p1, acc_t<T>* __restrict__ cs,
                      acc_t<T>* __restrict__ cq, Moments* mom) {
  using A = acc_t<T>;
  const int64_t P = std::max<int64_t>(1, kChunk / nb);
  const T* __restrict__ k0 = base + p0 * ps;
  for (int64_t c = 0; c < nb; ++c) mom[c] = Moments{};
  for (int64_t j0 = p0; j0 < p1; j0 += P) {
    const int64_t j1 = std::min(p1, j0 + P);
    const A cnt = static_cast<A>(j1 - j0);
    std::fill(cs, cs + nb, A(0));
    for (int64_t j = j0; j < j1; ++j) {
      const T* __restrict__ px = base + j * ps;
#pragma omp simd
      for (int64_t c = 0; c < nb; ++c) cs[c] += static_cast<A>(to_float(px[c])) - static_cast<A>(to_float(k0[c]));
    }
#pragma omp simd
    for (int64_t c = 0; c < nb; ++c) cs[c] /= cnt;
    std::fill(cq, cq + nb, A(0));
    for (int64_t j = j0; j < j1; ++j) {
      const T* __restrict__ px = base + j * ps;
#pragma omp simd
      for (int64_t c = 0; c < nb; ++c) {
        const A d = (static_cast<A>(to_float(px[c])) - static_cast<A>(to_float(k0[c]))) - cs[c];
        cq[c] += d * d;
      }
    }
    for (int64_t c = 0; c < nb; ++c)
      merge(mom[c], static_cast<double>(j1 - j0),
            static_cast<double>(to_float(k0[c])) + static_cast<double>(cs[c]), static_cast<double>(cq[c]));
  }
}

template <typename T>
void gate_channels(const T* xb, int64_t xps, T* yb, int64_t yps, int64_t nb, int64_t p0, int64_t p1,
                   const acc_t<T>* __restrict__ mh, const acc_t<T>* __restrict__ ml, const acc_t<T>* __restrict__ r) {
  using A = acc_t<T>;
  for (int64_t j = p0; j < p1; ++j) {
    const T* __restrict__ px = xb + j * xps;
    T* __restrict__ py = yb + j * yps;
#pragma omp simd
    for (int64_t c = 0; c < nb; ++c) {
      const A v = static_cast<A>(to_float(px[c]));
      const A xc = (v - mh[c]) - ml[c];
      const A s = A(1) / (A(1) + exp_neg(xc * xc * r[c] + A(0.5)));
      py[c] = store<T>(v * s);
    }
  }
}

// Per-channel (A, Bs) of pixels [p0, p1) into ta, tb: fp32 per chunk (sa, sb), folded into double.
template <typename T>
void sums_channels(const T* dyb, int64_t dyps, const T* xb, int64_t xps, int64_t nb, int64_t p0, int64_t p1,
                   const acc_t<T>* __restrict__ mh, const acc_t<T>* __restrict__ ml, const acc_t<T>* __restrict__ r, acc_t<T>* __restrict__ sa,
                   acc_t<T>* __restrict__ sb, double* ta, double* tb) {
  using A = acc_t<T>;
  const int64_t P = std::max<int64_t>(1, kChunk / nb);
  std::fill(ta, ta + nb, 0.0);
  std::fill(tb, tb + nb, 0.0);
  for (int64_t j0 = p0; j0 < p1; j0 += P) {
    const int64_t j1 = std::min(p1, j0 + P);
    std::fill(sa, sa + nb, A(0));
    std::fill(sb, sb + nb, A(0));
    for (int64_t j = j0; j < j1; ++j) {
      const T* __restrict__ px = xb + j * xps;
      const T* __restrict__ pdy = dyb + j * dyps;
#pragma omp simd
      for (int64_t c = 0; c < nb; ++c) {
        const A v = static_cast<A>(to_float(px[c]));
        const A g = static_cast<A>(to_float(pdy[c]));
        const A xc = (v - mh[c]) - ml[c];
        const A d = xc * xc;
        const A t = exp_neg(d * r[c] + A(0.5));
        const A s = A(1) / (A(1) + t);
        const A e = g * v * s * (t * s);
        sa[c] += e * xc;
        sb[c] += e * d;
      }
    }
    for (int64_t c = 0; c < nb; ++c) {
      ta[c] += static_cast<double>(sa[c]);
      tb[c] += static_cast<double>(sb[c]);
    }
  }
}

template <typename T>
void dx_channels(const T* dyb, int64_t dyps, const T* xb, int64_t xps, T* dxb, int64_t dxps, int64_t nb, int64_t p0,
                 int64_t p1, const acc_t<T>* __restrict__ mh, const acc_t<T>* __restrict__ ml, const acc_t<T>* __restrict__ r,
                 const acc_t<T>* __restrict__ dS, const acc_t<T>* __restrict__ shift) {
  using A = acc_t<T>;
  for (int64_t j = p0; j < p1; ++j) {
    const T* __restrict__ px = xb + j * xps;
    const T* __restrict__ pdy = dyb + j * dyps;
    T* __restrict__ pdx = dxb + j * dxps;
#pragma omp simd
    for (int64_t c = 0; c < nb; ++c) {
      const A v = static_cast<A>(to_float(px[c]));
      const A g = static_cast<A>(to_float(pdy[c]));
      const A xc = (v - mh[c]) - ml[c];
      const A d = xc * xc;
      const A t = exp_neg(d * r[c] + A(0.5));
      const A s = A(1) / (A(1) + t);
      const A e = g * v * s * (t * s);
      pdx[c] = store<T>(g * s + A(2) * xc * (e * r[c] + dS[c]) - shift[c]);
    }
  }
}

// Element strides of the flattened (B, HW, C) view: sample, pixel (channels are unit stride).
struct FlatStrides {
  int64_t b, p;
};

// Per-channel constants of units of CB channels, structure of arrays (unit-stride inner loops).
template <typename A>
struct ConstRows {
  std::vector<A> mh, ml, r, dS, shift;
  explicit ConstRows(size_t n) : mh(n), ml(n), r(n), dS(n), shift(n) {}
  void set(int64_t i, const Consts<A>& k) {
    mh[i] = k.mh;
    ml[i] = k.ml;
    r[i] = k.r;
  }
};

template <typename T>
void fwd_channels(const T* x, T* y, int64_t B, int64_t C, int64_t HW, double lambda, FlatStrides sx,
                  FlatStrides sy, double* save) {
  using A = acc_t<T>;
  const Blocks blk = channel_blocks(B, C, HW, static_cast<int64_t>(sizeof(T)));
  const int64_t units = B * blk.n, CB = blk.width;
  const Split sp = split_axis(units, HW, ceil_div(kMinSegment, CB));
  const int64_t jobs = units * sp.n;
  // One segment: a job's moments stay local. Several: the segments' moments are merged first.
  ConstRows<A> k(sp.n > 1 ? static_cast<size_t>(units * CB) : 0);
  if (sp.n > 1) {
    std::vector<Moments> parts(static_cast<size_t>(jobs * CB));
#pragma omp parallel
    {
      std::vector<A> cs(static_cast<size_t>(CB)), cq(static_cast<size_t>(CB));
#pragma omp for schedule(static)
      for (int64_t job = 0; job < jobs; ++job) {
        const int64_t u = job / sp.n, p0 = (job % sp.n) * sp.len_per;
        const int64_t b = u / blk.n, c0 = (u % blk.n) * CB, nb = std::min(CB, C - c0);
        moments_channels(x + b * sx.b + c0, sx.p, nb, p0, std::min(HW, p0 + sp.len_per), cs.data(), cq.data(),
                         parts.data() + job * CB);
      }
    }
    std::vector<Moments> seg(static_cast<size_t>(sp.n));
    for (int64_t u = 0; u < units; ++u)
      for (int64_t c = 0; c < std::min(CB, C - (u % blk.n) * CB); ++c) {
        for (int64_t s = 0; s < sp.n; ++s) seg[s] = parts[(u * sp.n + s) * CB + c];
        const GateConst g = gate_const(merged(seg.data(), sp.n), lambda);
        save_const(save, (u / blk.n) * C + (u % blk.n) * CB + c, g);
        k.set(u * CB + c, consts_of<A>(g));
      }
  }
#pragma omp parallel
  {
    std::vector<A> cs(static_cast<size_t>(CB)), cq(static_cast<size_t>(CB));
    std::vector<Moments> mom(static_cast<size_t>(CB));
    ConstRows<A> local(sp.n == 1 ? static_cast<size_t>(CB) : 0);
#pragma omp for schedule(static)
    for (int64_t job = 0; job < jobs; ++job) {
      const int64_t u = job / sp.n, p0 = (job % sp.n) * sp.len_per, p1 = std::min(HW, p0 + sp.len_per);
      const int64_t b = u / blk.n, c0 = (u % blk.n) * CB, nb = std::min(CB, C - c0);
      const T* xb = x + b * sx.b + c0;
      ConstRows<A>& q = sp.n == 1 ? local : k;
      const int64_t off = sp.n == 1 ? 0 : u * CB;
      if (sp.n == 1) {
        moments_channels(xb, sx.p, nb, p0, p1, cs.data(), cq.data(), mom.data());
        for (int64_t c = 0; c < nb; ++c) {
          const GateConst g = gate_const(mom[c], lambda);
          save_const(save, b * C + c0 + c, g);
          local.set(c, consts_of<A>(g));
        }
      }
      gate_channels(xb, sx.p, y + b * sy.b + c0, sy.p, nb, p0, p1, q.mh.data() + off, q.ml.data() + off,
                    q.r.data() + off);
    }
  }
}

template <typename T>
void bwd_channels(const T* dy, const T* x, T* dx, int64_t B, int64_t C, int64_t HW, double lambda, FlatStrides sdy,
                  FlatStrides sx, FlatStrides sdx, const double* saved) {
  using A = acc_t<T>;
  const Blocks blk = channel_blocks(B, C, HW, 2 * static_cast<int64_t>(sizeof(T)));
  const int64_t units = B * blk.n, CB = blk.width;
  const Split sp = split_axis(units, HW, ceil_div(kMinSegment, CB));
  const int64_t jobs = units * sp.n;
  const double n = static_cast<double>(HW);
  if (sp.n == 1) {
#pragma omp parallel
    {
      std::vector<A> s1(static_cast<size_t>(CB)), s2(static_cast<size_t>(CB));
      std::vector<double> ta(static_cast<size_t>(CB)), tb(static_cast<size_t>(CB));
      std::vector<Moments> mom(static_cast<size_t>(CB));
      std::vector<Consts<A>> kc(static_cast<size_t>(CB));
      std::vector<double> rd(static_cast<size_t>(CB));
      ConstRows<A> q(static_cast<size_t>(CB));
#pragma omp for schedule(static)
      for (int64_t u = 0; u < units; ++u) {
        const int64_t b = u / blk.n, c0 = (u % blk.n) * CB, nb = std::min(CB, C - c0);
        const T* xb = x + b * sx.b + c0;
        const T* dyb = dy + b * sdy.b + c0;
        if (!saved) moments_channels(xb, sx.p, nb, 0, HW, s1.data(), s2.data(), mom.data());
        for (int64_t c = 0; c < nb; ++c) {
          const GateConst g = saved ? saved_const(saved, b * C + c0 + c) : gate_const(mom[c], lambda);
          kc[c] = consts_of<A>(g);
          rd[c] = g.r;
          q.set(c, kc[c]);
        }
        sums_channels(dyb, sdy.p, xb, sx.p, nb, 0, HW, q.mh.data(), q.ml.data(), q.r.data(), s1.data(), s2.data(),
                      ta.data(), tb.data());
        for (int64_t c = 0; c < nb; ++c) {
          set_bwd_consts(kc[c], ta[c], tb[c], rd[c], n);
          q.dS[c] = kc[c].dS;
          q.shift[c] = kc[c].shift;
        }
        dx_channels(dyb, sdy.p, xb, sx.p, dx + b * sdx.b + c0, sdx.p, nb, 0, HW, q.mh.data(), q.ml.data(),
                    q.r.data(), q.dS.data(), q.shift.data());
      }
    }
    return;
  }
  // Segments: moments per job, merged in order; sums per job, added in order; then dx.
  std::vector<Moments> parts(saved ? 0 : static_cast<size_t>(jobs * CB));
  std::vector<double> pa(static_cast<size_t>(jobs * CB)), pb(static_cast<size_t>(jobs * CB));
  ConstRows<A> q(static_cast<size_t>(units * CB));
  std::vector<double> rd(static_cast<size_t>(units * CB));
  if (!saved) {
#pragma omp parallel
    {
      std::vector<A> s1(static_cast<size_t>(CB)), s2(static_cast<size_t>(CB));
#pragma omp for schedule(static)
      for (int64_t job = 0; job < jobs; ++job) {
        const int64_t u = job / sp.n, p0 = (job % sp.n) * sp.len_per;
        const int64_t b = u / blk.n, c0 = (u % blk.n) * CB, nb = std::min(CB, C - c0);
        moments_channels(x + b * sx.b + c0, sx.p, nb, p0, std::min(HW, p0 + sp.len_per), s1.data(), s2.data(),
                         parts.data() + job * CB);
      }
    }
  }
  std::vector<Moments> seg(static_cast<size_t>(sp.n));
  for (int64_t u = 0; u < units; ++u)
    for (int64_t c = 0; c < std::min(CB, C - (u % blk.n) * CB); ++c) {
      GateConst g;
      if (saved) {
        g = saved_const(saved, (u / blk.n) * C + (u % blk.n) * CB + c);
      } else {
        for (int64_t s = 0; s < sp.n; ++s) seg[s] = parts[(u * sp.n + s) * CB + c];
        g = gate_const(merged(seg.data(), sp.n), lambda);
      }
      q.set(u * CB + c, consts_of<A>(g));
      rd[u * CB + c] = g.r;
    }
#pragma omp parallel
  {
    std::vector<A> s1(static_cast<size_t>(CB)), s2(static_cast<size_t>(CB));
#pragma omp for schedule(static)
    for (int64_t job = 0; job < jobs; ++job) {
      const int64_t u = job / sp.n, p0 = (job % sp.n) * sp.len_per;
      const int64_t b = u / blk.n, c0 = (u % blk.n) * CB, nb = std::min(CB, C - c0);
      const int64_t off = u * CB;
      sums_channels(dy + b * sdy.b + c0, sdy.p, x + b * sx.b + c0, sx.p, nb, p0, std::min(HW, p0 + sp.len_per),
                    q.mh.data() + off, q.ml.data() + off, q.r.data() + off, s1.data(), s2.data(),
                    pa.data() + job * CB, pb.data() + job * CB);
    }
  }
  for (int64_t u = 0; u < units; ++u)
    for (int64_t c = 0; c < std::min(CB, C - (u % blk.n) * CB); ++c) {
      double ta = 0, tb = 0;
      for (int64_t s = 0; s < sp.n; ++s) {
        ta += pa[(u * sp.n + s) * CB + c];
        tb += pb[(u * sp.n + s) * CB + c];
      }
      Consts<A> kc{};
      set_bwd_consts(kc, ta, tb, rd[u * CB + c], n);
      q.dS[u * CB + c] = kc.dS;
      q.shift[u * CB + c] = kc.shift;
    }
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < jobs; ++job) {
    const int64_t u = job / sp.n, p0 = (job % sp.n) * sp.len_per;
    const int64_t b = u / blk.n, c0 = (u % blk.n) * CB, nb = std::min(CB, C - c0);
    const int64_t off = u * CB;
    dx_channels(dy + b * sdy.b + c0, sdy.p, x + b * sx.b + c0, sx.p, dx + b * sdx.b + c0, sdx.p, nb, p0,
                std::min(HW, p0 + sp.len_per), q.mh.data() + off, q.ml.data() + off, q.r.data() + off,
                q.dS.data() + off, q.shift.data() + off);
  }
}

// ---------------------------------------------------------------------------------------------
// Any strides: one plane per job, double statistics. Correct, not fast.
// ---------------------------------------------------------------------------------------------

template <typename T>
GateConst generic_stats(const T* p, int64_t H, int64_t W, Strides4 s, double lambda) {
  double sum = 0;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; ++w) sum += static_cast<double>(to_float(p[h * s.h + w * s.w]));
  const double mu = sum / static_cast<double>(H * W);
  Moments m;
  m.n = static_cast<double>(H * W);
  m.mean = mu;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; ++w) {
      const double d = static_cast<double>(to_float(p[h * s.h + w * s.w])) - mu;
      m.m2 += d * d;
    }
  return gate_const(m, lambda);
}

template <typename T>
void fwd_generic(const T* x, T* y, int64_t B, int64_t C, int64_t H, int64_t W, double lambda, Strides4 sx,
                 Strides4 sy, double* save) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    const T* px = x + b * sx.b + c * sx.c;
    T* py = y + b * sy.b + c * sy.c;
    const GateConst g = generic_stats(px, H, W, sx, lambda);
    save_const(save, bc, g);
    const Consts<A> k = consts_of<A>(g);
    const A mh = k.mh, ml = k.ml, r = k.r;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const A v = static_cast<A>(to_float(px[h * sx.h + w * sx.w]));
        const A xc = (v - mh) - ml;
        const A s = A(1) / (A(1) + exp_neg(xc * xc * r + A(0.5)));
        py[h * sy.h + w * sy.w] = store<T>(v * s);
      }
  }
}

template <typename T>
void bwd_generic(const T* dy, const T* x, T* dx, int64_t B, int64_t C, int64_t H, int64_t W, double lambda,
                 Strides4 sdy, Strides4 sx, Strides4 sdx, const double* saved) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    const T* px = x + b * sx.b + c * sx.c;
    const T* pdy = dy + b * sdy.b + c * sdy.c;
    T* pdx = dx + b * sdx.b + c * sdx.c;
    const GateConst kg = saved ? saved_const(saved, bc) : generic_stats(px, H, W, sx, lambda);
    const Consts<A> k = consts_of<A>(kg);
    const A mh = k.mh, ml = k.ml, r = k.r;
    double ta = 0, tb = 0, dS, shift;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const A v = static_cast<A>(to_float(px[h * sx.h + w * sx.w]));
        const A g = static_cast<A>(to_float(pdy[h * sdy.h + w * sdy.w]));
        const A xc = (v - mh) - ml;
        const A d = xc * xc;
        const A t = exp_neg(d * r + A(0.5));
        const A s = A(1) / (A(1) + t);
        const A e = g * v * s * (t * s);
        ta += static_cast<double>(e * xc);
        tb += static_cast<double>(e * d);
      }
    bwd_const(ta, tb, kg.r, static_cast<double>(H * W), dS, shift);
    const A dSa = static_cast<A>(dS), sha = static_cast<A>(shift);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const A v = static_cast<A>(to_float(px[h * sx.h + w * sx.w]));
        const A g = static_cast<A>(to_float(pdy[h * sdy.h + w * sdy.w]));
        const A xc = (v - mh) - ml;
        const A d = xc * xc;
        const A t = exp_neg(d * r + A(0.5));
        const A s = A(1) / (A(1) + t);
        const A e = g * v * s * (t * s);
        pdx[h * sdx.h + w * sdx.w] = store<T>(g * s + A(2) * xc * (e * r + dSa) - sha);
      }
  }
}

// ---------------------------------------------------------------------------------------------
// layout dispatch
// ---------------------------------------------------------------------------------------------

// The (sample, pixel) strides of a tensor whose H x W flattens into one axis, or false.
inline bool flat_pixels(const Strides4& s, int64_t H, int64_t W, FlatStrides& f) {
  f.b = s.b;
  if (W == 1) f.p = s.h;
  else if (H == 1 || s.h == W * s.w) f.p = s.w;
  else return false;
  return true;
}

template <typename T>
void forward_typed(const T* x, T* y, int64_t B, int64_t C, int64_t H, int64_t W, double lambda, Strides4 sx,
                   Strides4 sy, double* save) {
  if (plane_contiguous(sx, H, W) && plane_contiguous(sy, H, W))
    return fwd_plane(x, y, B, C, H * W, lambda, sx, sy, save);
  FlatStrides fx, fy;
  if (channels_contiguous(sx, C) && channels_contiguous(sy, C) && flat_pixels(sx, H, W, fx) && flat_pixels(sy, H, W, fy))
    return fwd_channels(x, y, B, C, H * W, lambda, fx, fy, save);
  fwd_generic(x, y, B, C, H, W, lambda, sx, sy, save);
}

template <typename T>
void backward_typed(const T* dy, const T* x, T* dx, int64_t B, int64_t C, int64_t H, int64_t W, double lambda,
                    Strides4 sdy, Strides4 sx, Strides4 sdx, const double* saved) {
  if (plane_contiguous(sdy, H, W) && plane_contiguous(sx, H, W) && plane_contiguous(sdx, H, W))
    return bwd_plane(dy, x, dx, B, C, H * W, lambda, sdy, sx, sdx, saved);
  FlatStrides fdy, fx, fdx;
  if (channels_contiguous(sdy, C) && channels_contiguous(sx, C) && channels_contiguous(sdx, C) &&
      flat_pixels(sdy, H, W, fdy) && flat_pixels(sx, H, W, fx) && flat_pixels(sdx, H, W, fdx))
    return bwd_channels(dy, x, dx, B, C, H * W, lambda, fdy, fx, fdx, saved);
  bwd_generic(dy, x, dx, B, C, H, W, lambda, sdy, sx, sdx, saved);
}

}  // namespace

void simam_forward_cpu(const void* x, void* y, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                       double e_lambda, Strides4 sx, Strides4 sy, double* save) {
  if (B * C * H * W == 0) return;
  switch (dtype) {
#define FA_CASE(TAG, T)                                                                                        \
  case DType::TAG:                                                                                             \
    return forward_typed(static_cast<const T*>(x), static_cast<T*>(y), B, C, H, W, e_lambda, sx, sy, save);
    FA_CASE(Float32, float)
    FA_CASE(Float64, double)
    FA_CASE(Float16, fp16_t)
    FA_CASE(BFloat16, bf16_t)
#undef FA_CASE
  }
}

void simam_backward_cpu(const void* dy, const void* x, void* dx, DType dtype, int64_t B, int64_t C, int64_t H,
                        int64_t W, double e_lambda, Strides4 sdy, Strides4 sx, Strides4 sdx, const double* saved) {
  if (B * C * H * W == 0) return;
  switch (dtype) {
#define FA_CASE(TAG, T)                                                                                        \
  case DType::TAG:                                                                                             \
    return backward_typed(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(dx), B, C, H, W, \
                          e_lambda, sdy, sx, sdx, saved);
    FA_CASE(Float32, float)
    FA_CASE(Float64, double)
    FA_CASE(Float16, fp16_t)
    FA_CASE(BFloat16, bf16_t)
#undef FA_CASE
  }
}

}  // namespace fastattn
