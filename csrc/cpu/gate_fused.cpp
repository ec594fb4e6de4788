// The fused channel gates on the CPU, forward and backward, each in one pass over the feature map:
//   channel x spatial   y = x * f(a[b, c], s[b, h, w])            (scSE, BAM; see CombineMode)
//   channel affine      y = x * sigmoid(alpha[b, c] x + beta[b, c])  (NAM, SA-Net)
// Both are an elementwise op with per-(b, c) parameters and, for the first, a per-(b, h, w) one; the
// backward adds reductions over (h, w) for the channel parameters and over c for the pixel one.
// One template per layout runs any such op (a functor below):
//   plane    each H x W plane contiguous (NCHW and its channel slices): jobs of (sample, channel block,
//            pixel segment), inner loops along the pixels;
//   channels channels contiguous (channels_last): jobs of (sample, channel block, pixel segment),
//            inner loops along the channels;
//   generic  anything else (correct, not fast).
// fp32 math for 16/32-bit inputs, fp64 for fp64; every reduction in an order fixed by the shape.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "gate.h"
#include "stream.h"

namespace fastattn {
namespace {

// ---------------------------------------------------------------------------------------------
// math
// ---------------------------------------------------------------------------------------------

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// exp in fp32 written so that `omp simd` loops vectorise it (libm's expf does not vectorise without
// -ffast-math). Cephes' range reduction and polynomial: within 2 ulp of expf over the clamped range
// [-87, 88], where the result stays a normal float; NaN stays NaN.
inline float exp_f32(float t) {
  t = t < -87.0f ? -87.0f : t;
  t = t > 88.0f ? 88.0f : t;
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float kn = t * 1.44269504088896341f + kShift;
  const float n = kn - kShift;
  float r = t - n * 0.693359375f;        // ln 2 in two parts: r exact to fp32
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n from the integer in kn's low mantissa bits (unsigned arithmetic: no overflow for NaN)
  return p * float_of((bits_of(kn) - bits_of(kShift) + 127u) << 23);
}

inline float sigmoid(float t) { return 1.0f / (1.0f + exp_f32(-t)); }
inline double sigmoid(double t) { return 1.0 / (1.0 + std::exp(-t)); }

// The ops: fwd(x, c0, c1, q) and bwd(dy, x, c0, c1, q) -> (dx, g0, g1, gq), where c0, c1 are the
// per-(b, c) parameters (kChan of them), q the per-(b, h, w) one (when kPix), and g0, g1, gq the
// elementwise terms of their gradients (summed over (h, w) resp. c by the kernels).
template <int kMode>
struct SpatialOp {
  static constexpr int kChan = 1;
  static constexpr bool kPix = true;

  template <typename A>
  static A fwd(A x, A a, A, A s) {
    if constexpr (kMode == 1) {
      const A xa = x * a, xs = x * s;
      return (xa >= xs || xa != xa) ? xa : xs;  // NaN propagates as in torch.maximum
    } else if constexpr (kMode == 2) {
      return x * (a + s);
    } else if constexpr (kMode == 3) {
      return x * (A(1) + sigmoid(a * s));
    } else {
      return x * (A(1) + sigmoid(a + s));
    }
  }

  template <typename A>
  static void bwd(A dy, A x, A a, A, A s, A& dx, A& g0, A& g1, A& gq) {
    g1 = A(0);
    if constexpr (kMode == 1) {
      const A g = dy * x;
      A wa, ws;
      max_grad_weights(x * a, x * s, wa, ws);   // torch.maximum's split (common.h)
      dx = dy * (wa * a + ws * s);
      g0 = wa * g;
      gq = ws * g;
    } else if constexpr (kMode == 2) {
      dx = dy * (a + s);
      g0 = dy * x;
      gq = g0;
    } else {
      const A sg = sigmoid(kMode == 3 ? a * s : a + s);
      dx = dy * (A(1) + sg);
      const A dt = dy * x * sg * (A(1) - sg);
      g0 = kMode == 3 ? dt * s : dt;
      gq = kMode == 3 ? dt * a : dt;
    }
  }
};

struct AffineOp {
  static constexpr int kChan = 2;
  static constexpr bool kPix = false;

  template <typename A>
  static A fwd(A x, A al, A be, A) {
    return x * sigmoid(al * x + be);
  }

  template <typename A>
  static void bwd(A dy, A x, A al, A be, A, A& dx, A& g0, A& g1, A& gq) {
    const A sg = sigmoid(al * x + be);
    const A u = dy * x * sg * (A(1) - sg);
    dx = dy * sg + u * al;
    g0 = u * x;
    g1 = u;
    gq = A(0);
  }
};

// ---------------------------------------------------------------------------------------------
// layouts and work splits
// ---------------------------------------------------------------------------------------------

// Element strides of the (B, C, P = H * W) view of a tensor whose H and W flatten into one axis.
struct Flat {
  int64_t b, c, p;
};

bool flatten(const Strides4& s, int64_t C, int64_t H, int64_t W, Flat& f) {
  if (!(H == 1 || W == 1 || s.h == W * s.w)) return false;
  f.b = s.b;
  f.c = C == 1 ? 1 : s.c;                                  // a size-1 axis has any stride
  f.p = H * W == 1 ? 1 : (W == 1 ? s.h : s.w);
  return true;
}

enum class Path { Plane, Channels, Generic };

// The path for x and its same-shaped output (y or dx); dy (backward) is read through its own strides.
Path choose_path(const Strides4& sx, const Strides4& so, const Strides4* sdy, int64_t C, int64_t H, int64_t W,
                 Flat& fx, Flat& fo, Flat& fdy) {
  if (!flatten(sx, C, H, W, fx) || !flatten(so, C, H, W, fo)) return Path::Generic;
  if (sdy && !flatten(*sdy, C, H, W, fdy)) return Path::Generic;
  const bool chan = fx.c == 1 && fo.c == 1, plane = fx.p == 1 && fo.p == 1;
  if (chan && (H * W == 1 || !plane)) return Path::Channels;  // 1 x 1 maps: rows of C, not planes of 1
  if (plane) return Path::Plane;
  return Path::Generic;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Segments per unit of work: enough jobs for the threads when there are few units, none shorter
// than min_len. Depends on the shape only (never on the thread count), so the sums do not either.
constexpr int64_t kMinJobs = 64;
inline int64_t segments(int64_t units, int64_t len, int64_t min_len) {
  return std::max<int64_t>(1, std::min(ceil_div(kMinJobs, std::max<int64_t>(units, 1)), len / min_len));
}

// Loads and stores through the math type. fp16 gets branch-free conversions here (bit-exact with
// common.h's, round to nearest even) because the vectoriser gives up on common.h's branches.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t o = static_cast<uint32_t>(h & 0x7FFFu) << 13;
  const uint32_t e = o & 0x0F800000u;
  o += 0x38000000u;                                       // rebias 15 -> 127
  o = e == 0x0F800000u ? o + 0x38000000u : o;             // inf / nan: exponent 255
  const float sub = float_of(o + 0x00800000u) - float_of(0x38800000u);  // subnormal: renormalise
  return float_of((e == 0 ? bits_of(sub) : o) | sign);
}

inline uint16_t float_to_half(float v) {
  uint32_t f = bits_of(v);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  const uint32_t big = f > 0x7F800000u ? 0x7E00u : 0x7C00u;           // nan -> quiet nan; overflow -> inf
  const uint32_t sub = bits_of(float_of(f) + 0.5f) - 0x3F000000u;     // subnormal: the FPU rounds
  const uint32_t nrm = (f + 0xC8000FFFu + ((f >> 13) & 1u)) >> 13;     // rebias, round to nearest even
  const uint32_t o = f >= 0x47800000u ? big : (f < 0x38800000u ? sub : nrm);
  return static_cast<uint16_t>(o | (sign >> 16));
}

template <typename T>
inline acc_t<T> ld(const T* p) {
  return static_cast<acc_t<T>>(to_float(*p));
}
template <>
inline float ld<fp16_t>(const fp16_t* p) {
  return half_to_float(p->bits);
}

template <typename T>
inline T st(acc_t<T> v) {
  return store<T>(v);
}
template <>
inline fp16_t st<fp16_t>(float v) {
  return fp16_t{float_to_half(v)};
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

template <class Op, typename T>
void fwd_plane(const T* x, const acc_t<T>* c0, const acc_t<T>* c1, const acc_t<T>* q, T* y, int64_t B, int64_t C,
               int64_t P, Flat fx, Flat fy) {
  using A = acc_t<T>;
  const int64_t S = segments(B * C, P, 4096);
  const int64_t seg = ceil_div(P, S);
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < B * C * S; ++job) {
    const int64_t bc = job / S, i0 = (job % S) * seg, i1 = std::min(P, i0 + seg);
    const int64_t b = bc / C, c = bc % C;
    const T* __restrict__ px = x + b * fx.b + c * fx.c;
    T* __restrict__ py = y + b * fy.b + c * fy.c;
    const A k0 = c0[bc], k1 = Op::kChan > 1 ? c1[bc] : A(0);
    const A* __restrict__ qb = Op::kPix ? q + b * P : nullptr;
    // The next channel's segment, prefetched: the sigmoid modes' arithmetic leaves too few loads
    // in flight for the hardware prefetcher to keep up with x (BAM's gate at 32x1024x14x14 on the
    // dev VM: 1.86 -> 1.14 ms; no gain measured for the backward or SimAM's stats sweep).
    for (int64_t i = i0; i < i1; i += 64 / sizeof(T)) __builtin_prefetch(px + fx.c + i);
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) py[i] = st<T>(Op::fwd(ld(px + i), k0, k1, Op::kPix ? qb[i] : A(0)));
  }
}

// Elements of one job of the channels-contiguous forward (pixels x C).
constexpr int64_t kPixelWork = 16384;

template <class Op, typename T>
void fwd_channels(const T* x, const acc_t<T>* c0, const acc_t<T>* c1, const acc_t<T>* q, T* y, int64_t B,
                  int64_t C, int64_t P, Flat fx, Flat fy) {
  using A = acc_t<T>;
  const int64_t per = std::max<int64_t>(1, kPixelWork / std::max<int64_t>(C, 1));
  const int64_t nblk = ceil_div(P, per);
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < B * nblk; ++job) {
    const int64_t b = job / nblk, i0 = (job % nblk) * per, i1 = std::min(P, i0 + per);
    const A* __restrict__ k0 = c0 + b * C;
    const A* __restrict__ k1 = Op::kChan > 1 ? c1 + b * C : nullptr;
    for (int64_t i = i0; i < i1; ++i) {
      const T* __restrict__ px = x + b * fx.b + i * fx.p;
      T* __restrict__ py = y + b * fy.b + i * fy.p;
      const A qv = Op::kPix ? q[b * P + i] : A(0);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c)
        py[c] = st<T>(Op::fwd(ld(px + c), k0[c], Op::kChan > 1 ? k1[c] : A(0), qv));
    }
  }
}

template <class Op, typename T>
void fwd_generic(const T* x, const acc_t<T>* c0, const acc_t<T>* c1, const acc_t<T>* q, T* y, int64_t B, int64_t C,
                 int64_t H, int64_t W, Strides4 sx, Strides4 sy) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    const A k0 = c0[bc], k1 = Op::kChan > 1 ? c1[bc] : A(0);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const A qv = Op::kPix ? q[b * H * W + h * W + w] : A(0);
        y[b * sy.b + c * sy.c + h * sy.h + w * sy.w] =
            st<T>(Op::fwd(ld(x + b * sx.b + c * sx.c + h * sx.h + w * sx.w), k0, k1, qv));
      }
  }
}

template <class Op, typename T>
void forward_typed(const T* x, const acc_t<T>* c0, const acc_t<T>* c1, const acc_t<T>* q, T* y, int64_t B,
                   int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sy) {
  Flat fx, fy, unused;
  switch (choose_path(sx, sy, nullptr, C, H, W, fx, fy, unused)) {
    case Path::Plane: return fwd_plane<Op>(x, c0, c1, q, y, B, C, H * W, fx, fy);
    case Path::Channels: return fwd_channels<Op>(x, c0, c1, q, y, B, C, H * W, fx, fy);
    case Path::Generic: return fwd_generic<Op>(x, c0, c1, q, y, B, C, H, W, sx, sy);
  }
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

// Outputs of a backward: dx, the channel gradients g0, g1 (B, C) and the pixel gradient gq (B, P).
template <typename T>
struct Grads {
  T* dx;
  acc_t<T>* g0;
  acc_t<T>* g1;
  acc_t<T>* gq;
};

// Adds the partial sums part[b][t][n] (t < T) in t order into out[b * N + n], in double.
template <typename P, typename A>
void sum_partials(const P* part, A* out, int64_t B, int64_t T, int64_t N) {
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t n0 = 0; n0 < N; n0 += 512) {
      const int64_t n1 = std::min(N, n0 + 512);
      double acc[512];
      for (int64_t n = n0; n < n1; ++n) acc[n - n0] = 0.0;
      for (int64_t t = 0; t < T; ++t) {
        const P* p = part + (b * T + t) * N;
        for (int64_t n = n0; n < n1; ++n) acc[n - n0] += static_cast<double>(p[n]);
      }
      for (int64_t n = n0; n < n1; ++n) out[b * N + n] = static_cast<A>(acc[n - n0]);
    }
  }
}

// Plane layout (x and dx have unit pixel stride; dy too when kUnitDy). A job is (sample, block of
// channels, segment of pixels): it walks its channels plane by plane, summing the channel gradients
// along the pixels and adding the pixel gradient into a row of the segment's length (L1-resident).
// Channel sums: fp32 over a segment (at most kChunk pixels), then the segments in double. Pixel
// sums: fp32 over the block's channels, then the blocks in double.
template <class Op, typename T, bool kUnitDy>
void bwd_plane(const T* dy, const T* x, const acc_t<T>* c0, const acc_t<T>* c1, const acc_t<T>* q, Grads<T> g,
               int64_t B, int64_t C, int64_t P, Flat fdy, Flat fx, Flat fdx) {
  using A = acc_t<T>;
  constexpr int64_t kSegMax = 2048;  // pixels of one pixel-gradient row
  constexpr int64_t kBlockC = 64;    // channels summed in fp32 into one pixel-gradient row
  static_assert(kSegMax <= kChunk, "with a pixel gradient, a segment is one fp32 chunk");
  const int64_t nCB = Op::kPix ? ceil_div(C, kBlockC) : C;  // with no pixel gradient: one channel per job
  const int64_t CB = ceil_div(C, nCB);
  int64_t S = segments(B * nCB, P, 1024);
  if (Op::kPix) S = std::max(S, ceil_div(P, kSegMax));
  const int64_t seg = ceil_div(P, S);
  S = ceil_div(P, seg);
  const int64_t dys = kUnitDy ? 1 : fdy.p;
  std::vector<double> pc(S > 1 ? static_cast<size_t>(Op::kChan * B * S * C) : 0);       // [g][b][s][c]
  std::vector<A> pq(Op::kPix && nCB > 1 ? static_cast<size_t>(B * nCB * P) : 0);       // [b][cb][p]
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < B * nCB * S; ++job) {
    const int64_t s = job % S, bcb = job / S, b = bcb / nCB, cb = bcb % nCB;
    const int64_t cbeg = cb * CB, cend = std::min(C, cbeg + CB);
    const int64_t i0 = s * seg, n = std::min(P, i0 + seg) - i0;
    A qrow[Op::kPix ? kSegMax : 1];
    if constexpr (Op::kPix)
      for (int64_t i = 0; i < n; ++i) qrow[i] = A(0);
    const A* __restrict__ qb = Op::kPix ? q + b * P + i0 : nullptr;
    for (int64_t c = cbeg; c < cend; ++c) {
      const T* __restrict__ pdy = dy + b * fdy.b + c * fdy.c + i0 * dys;
      const T* __restrict__ px = x + b * fx.b + c * fx.c + i0;
      T* __restrict__ pdx = g.dx + b * fdx.b + c * fdx.c + i0;
      const A k0 = c0[b * C + c], k1 = Op::kChan > 1 ? c1[b * C + c] : A(0);
      double t0 = 0, t1 = 0;
      for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
        const int64_t j1 = std::min(n, j0 + kChunk);
        // element i: dx written, its pixel term added, its channel terms returned
        auto elem = [&](int64_t i, A& e0, A& e1) {
          A d, eq;
          Op::bwd(ld(pdy + i * dys), ld(px + i), k0, k1, Op::kPix ? qb[i] : A(0), d, e0, e1, eq);
          pdx[i] = st<T>(d);
          if constexpr (Op::kPix) qrow[i] += eq;
        };
        A a0, a1;
        lane_sum2<A>(j0, j1, elem, a0, a1);  // explicit lanes (see lane_sum in common.h)
        t0 += static_cast<double>(a0);
        t1 += static_cast<double>(a1);
      }
      if (S == 1) {
        g.g0[b * C + c] = static_cast<A>(t0);
        if constexpr (Op::kChan > 1) g.g1[b * C + c] = static_cast<A>(t1);
      } else {
        pc[(b * S + s) * C + c] = t0;
        if constexpr (Op::kChan > 1) pc[((B + b) * S + s) * C + c] = t1;
      }
    }
    if constexpr (Op::kPix) {
      A* out = nCB == 1 ? g.gq + b * P + i0 : pq.data() + (b * nCB + cb) * P + i0;
      for (int64_t i = 0; i < n; ++i) out[i] = qrow[i];
    }
  }
  if (S > 1) {
    sum_partials(pc.data(), g.g0, B, S, C);
    if constexpr (Op::kChan > 1) sum_partials(pc.data() + B * S * C, g.g1, B, S, C);
  }
  if constexpr (Op::kPix)
    if (nCB > 1) sum_partials(pq.data(), g.gq, B, nCB, P);
}

// Channels layout (x and dx have unit channel stride; dy too when kUnitDy, else it is read through
// its channel stride, e.g. an NCHW dy against a channels_last x). A job is (sample, block of
// channels, segment of pixels), its inner loop along the block's channels: per-channel fp32
// accumulators over chunks of kChunk pixels, folded in double; the pixel gradient of a pixel is
// summed over the block in one fp32 reduction, then the blocks in double.
template <class Op, typename T, bool kUnitDy>
void bwd_channels(const T* dy, const T* x, const acc_t<T>* c0, const acc_t<T>* c1, const acc_t<T>* q, Grads<T> g,
                  int64_t B, int64_t C, int64_t P, Flat fdy, Flat fx, Flat fdx) {
  using A = acc_t<T>;
  constexpr int64_t kMaxBlock = 1024;
  const int64_t nC0 = ceil_div(C, kMaxBlock);
  const int64_t CB = ceil_div(ceil_div(C, nC0), 16) * 16;  // equal blocks, whole cache lines
  const int64_t nC = ceil_div(C, CB);
  int64_t S = segments(B * nC, P, 64);
  const int64_t seg = ceil_div(P, S);
  S = ceil_div(P, seg);
  const int64_t dyc = kUnitDy ? 1 : fdy.c;
  std::vector<double> pc(S > 1 ? static_cast<size_t>(Op::kChan * B * S * C) : 0);       // [g][b][s][c]
  std::vector<A> pq(Op::kPix && nC > 1 ? static_cast<size_t>(B * nC * P) : 0);         // [b][cb][p]
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < B * nC * S; ++job) {
    A acc0[kMaxBlock], acc1[Op::kChan > 1 ? kMaxBlock : 1];
    double tot0[kMaxBlock], tot1[Op::kChan > 1 ? kMaxBlock : 1];
    const int64_t s = job % S, bcb = job / S, b = bcb / nC, cb = bcb % nC;
    const int64_t cbeg = cb * CB, n = std::min(C, cbeg + CB) - cbeg;
    const int64_t p0 = s * seg, p1 = std::min(P, p0 + seg);
    const A* __restrict__ k0 = c0 + b * C + cbeg;
    const A* __restrict__ k1 = Op::kChan > 1 ? c1 + b * C + cbeg : nullptr;
    A* qout = !Op::kPix ? nullptr : nC == 1 ? g.gq + b * P : pq.data() + (b * nC + cb) * P;
    for (int64_t c = 0; c < n; ++c) tot0[c] = 0.0;
    if constexpr (Op::kChan > 1)
      for (int64_t c = 0; c < n; ++c) tot1[c] = 0.0;
    for (int64_t j0 = p0; j0 < p1; j0 += kChunk) {
      const int64_t j1 = std::min(p1, j0 + kChunk);
      for (int64_t c = 0; c < n; ++c) acc0[c] = A(0);
      if constexpr (Op::kChan > 1)
        for (int64_t c = 0; c < n; ++c) acc1[c] = A(0);
      for (int64_t i = j0; i < j1; ++i) {
        const T* __restrict__ pdy = dy + b * fdy.b + i * fdy.p + cbeg * dyc;
        const T* __restrict__ px = x + b * fx.b + i * fx.p + cbeg;
        T* __restrict__ pdx = g.dx + b * fdx.b + i * fdx.p + cbeg;
        const A qv = Op::kPix ? q[b * P + i] : A(0);
        A qsum = 0;
#pragma omp simd reduction(+ : qsum)
        for (int64_t c = 0; c < n; ++c) {
          A d, e0, e1, eq;
          Op::bwd(ld(pdy + c * dyc), ld(px + c), k0[c], Op::kChan > 1 ? k1[c] : A(0), qv, d, e0, e1, eq);
          pdx[c] = st<T>(d);
          acc0[c] += e0;
          if constexpr (Op::kChan > 1) acc1[c] += e1;
          if constexpr (Op::kPix) qsum += eq;
        }
        if constexpr (Op::kPix) qout[i] = qsum;
      }
      for (int64_t c = 0; c < n; ++c) tot0[c] += static_cast<double>(acc0[c]);
      if constexpr (Op::kChan > 1)
        for (int64_t c = 0; c < n; ++c) tot1[c] += static_cast<double>(acc1[c]);
    }
    if (S == 1) {
      for (int64_t c = 0; c < n; ++c) g.g0[b * C + cbeg + c] = static_cast<A>(tot0[c]);
      if constexpr (Op::kChan > 1)
        for (int64_t c = 0; c < n; ++c) g.g1[b * C + cbeg + c] = static_cast<A>(tot1[c]);
    } else {
      for (int64_t c = 0; c < n; ++c) pc[(b * S + s) * C + cbeg + c] = tot0[c];
      if constexpr (Op::kChan > 1)
        for (int64_t c = 0; c < n; ++c) pc[((B + b) * S + s) * C + cbeg + c] = tot1[c];
    }
  }
  if (S > 1) {
    sum_partials(pc.data(), g.g0, B, S, C);
    if constexpr (Op::kChan > 1) sum_partials(pc.data() + B * S * C, g.g1, B, S, C);
  }
  if constexpr (Op::kPix)
    if (nC > 1) sum_partials(pq.data(), g.gq, B, nC, P);
}

// Any strides: the channel gradients per (b, c), then (with a pixel gradient) a second read for the
// sums over c per (b, h, w). Plain double accumulation.
template <class Op, typename T>
void bwd_generic(const T* dy, const T* x, const acc_t<T>* c0, const acc_t<T>* c1, const acc_t<T>* q, Grads<T> g,
                 int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx) {
  using A = acc_t<T>;
  const int64_t P = H * W;
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    const A k0 = c0[bc], k1 = Op::kChan > 1 ? c1[bc] : A(0);
    double t0 = 0, t1 = 0;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        A d, e0, e1, eq;
        Op::bwd(ld(dy + b * sdy.b + c * sdy.c + h * sdy.h + w * sdy.w), ld(x + b * sx.b + c * sx.c + h * sx.h + w * sx.w),
                k0, k1, Op::kPix ? q[b * P + h * W + w] : A(0), d, e0, e1, eq);
        g.dx[b * sdx.b + c * sdx.c + h * sdx.h + w * sdx.w] = st<T>(d);
        t0 += static_cast<double>(e0);
        t1 += static_cast<double>(e1);
      }
    g.g0[bc] = static_cast<A>(t0);
    if constexpr (Op::kChan > 1) g.g1[bc] = static_cast<A>(t1);
  }
  if constexpr (Op::kPix) {
#pragma omp parallel for schedule(static)
    for (int64_t bp = 0; bp < B * P; ++bp) {
      const int64_t b = bp / P, h = (bp % P) / W, w = bp % W;
      const A qv = q[bp];
      double t = 0;
      for (int64_t c = 0; c < C; ++c) {
        A d, e0, e1, eq;
        Op::bwd(ld(dy + b * sdy.b + c * sdy.c + h * sdy.h + w * sdy.w), ld(x + b * sx.b + c * sx.c + h * sx.h + w * sx.w),
                c0[b * C + c], Op::kChan > 1 ? c1[b * C + c] : A(0), qv, d, e0, e1, eq);
        t += static_cast<double>(eq);
      }
      g.gq[bp] = static_cast<A>(t);
    }
  }
}

template <class Op, typename T>
void backward_typed(const T* dy, const T* x, const acc_t<T>* c0, const acc_t<T>* c1, const acc_t<T>* q, Grads<T> g,
                    int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx) {
  Flat fdy, fx, fdx;
  const int64_t P = H * W;
  switch (choose_path(sx, sdx, &sdy, C, H, W, fx, fdx, fdy)) {
    case Path::Plane:
      if (fdy.p == 1) return bwd_plane<Op, T, true>(dy, x, c0, c1, q, g, B, C, P, fdy, fx, fdx);
      return bwd_plane<Op, T, false>(dy, x, c0, c1, q, g, B, C, P, fdy, fx, fdx);
    case Path::Channels:
      if (fdy.c == 1) return bwd_channels<Op, T, true>(dy, x, c0, c1, q, g, B, C, P, fdy, fx, fdx);
      return bwd_channels<Op, T, false>(dy, x, c0, c1, q, g, B, C, P, fdy, fx, fdx);
    case Path::Generic:
      return bwd_generic<Op>(dy, x, c0, c1, q, g, B, C, H, W, sdy, sx, sdx);
  }
}

// dtype x op dispatch. `Run` is called with a null pointer of the storage type T and the op.
template <class Run>
void dispatch_dtype(DType dtype, Run&& run) {
  switch (dtype) {
    case DType::Float32: return run(static_cast<float*>(nullptr));
    case DType::Float64: return run(static_cast<double*>(nullptr));
    case DType::Float16: return run(static_cast<fp16_t*>(nullptr));
    case DType::BFloat16: return run(static_cast<bf16_t*>(nullptr));
  }
}

template <class Run>
void dispatch_mode(CombineMode mode, Run&& run) {
  switch (mode) {
    case CombineMode::Max: return run(SpatialOp<1>{});
    case CombineMode::Add: return run(SpatialOp<2>{});
    case CombineMode::Bam: return run(SpatialOp<3>{});
    case CombineMode::BamSum: return run(SpatialOp<4>{});
  }
}

}  // namespace

void channel_spatial_gate_forward_cpu(const void* x, const void* a, const void* s, void* y, CombineMode mode,
                                      DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                                      Strides4 sy) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    dispatch_mode(mode, [&](auto op) {
      forward_typed<decltype(op)>(static_cast<const T*>(x), static_cast<const A*>(a), nullptr,
                                  static_cast<const A*>(s), static_cast<T*>(y), B, C, H, W, sx, sy);
    });
  });
}

void channel_spatial_gate_backward_cpu(const void* dy, const void* x, const void* a, const void* s, void* dx,
                                       void* da, void* ds, CombineMode mode, DType dtype, int64_t B, int64_t C,
                                       int64_t H, int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    const Grads<T> g{static_cast<T*>(dx), static_cast<A*>(da), nullptr, static_cast<A*>(ds)};
    dispatch_mode(mode, [&](auto op) {
      backward_typed<decltype(op)>(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const A*>(a),
                                   nullptr, static_cast<const A*>(s), g, B, C, H, W, sdy, sx, sdx);
    });
  });
}

void channel_affine_gate_forward_cpu(const void* x, const void* alpha, const void* beta, void* y, DType dtype,
                                     int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sy) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    forward_typed<AffineOp>(static_cast<const T*>(x), static_cast<const A*>(alpha), static_cast<const A*>(beta),
                            nullptr, static_cast<T*>(y), B, C, H, W, sx, sy);
  });
}

// ---------------------------------------------------------------------------------------------
// ShuffleAttention's gate: the affine gate written through the channel shuffle, and its training
// backward in one read
// ---------------------------------------------------------------------------------------------

namespace {

// The channel of x whose gate goes to channel cs of the shuffled output: cs = k groups + j holds
// x's channel j n + k.
inline int64_t unshuffled(int64_t cs, int64_t groups, int64_t n) { return (cs % groups) * n + cs / groups; }

// Jobs: the planes in the shuffled map's order (y forward, dy backward), so that it is one stream
// and x (dx) `groups` streams; each prefetches its planes 4 KiB on (14 x 14 planes are 12 cache lines).
template <typename T>
void shuffle_fwd_typed(const T* x, const acc_t<T>* alpha, const acc_t<T>* beta, T* y, int64_t B, int64_t C,
                       int64_t P, int64_t groups) {
  const int64_t n = C / groups;
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < B * C; ++job) {
    const int64_t b = job / C, bc = b * C + unshuffled(job % C, groups, n);
    const T* __restrict__ px = x + bc * P;
    T* __restrict__ py = y + job * P;
    const acc_t<T> k0 = alpha[bc], k1 = beta[bc];
    prefetch_ahead(px, P);
#pragma omp simd
    for (int64_t i = 0; i < P; ++i) py[i] = st<T>(AffineOp::fwd(ld(px + i), k0, k1, acc_t<T>(0)));
  }
}

template <typename T>
void shuffle_train_bwd_typed(const T* dy, const T* x, const acc_t<T>* alpha, const acc_t<T>* beta,
                             const acc_t<T>* mean, const acc_t<T>* coef, T* dx, acc_t<T>* dalpha, acc_t<T>* dbeta,
                             int64_t B, int64_t C, int64_t P, int64_t groups) {
  using A = acc_t<T>;
  const int64_t n = C / groups;
#pragma omp parallel
  {
    std::vector<A> direct(static_cast<size_t>(P));   // dy g + u alpha of the plane
#pragma omp for schedule(static)
    for (int64_t job = 0; job < B * C; ++job) {
      const int64_t b = job / C, bc = b * C + unshuffled(job % C, groups, n);
      const T* __restrict__ pdy = dy + job * P;
      const T* __restrict__ px = x + bc * P;
      T* __restrict__ pdx = dx + bc * P;
      A* __restrict__ t = direct.data();
      const A k0 = alpha[bc], k1 = beta[bc];
      prefetch_ahead(pdy, P);
      prefetch_ahead(px, P);
      double s0 = 0, s1 = 0;
      for (int64_t j0 = 0; j0 < P; j0 += kChunk) {
        auto elem = [&](int64_t i, A& e0, A& e1) {
          A d, eq;
          AffineOp::bwd(ld(pdy + i), ld(px + i), k0, k1, A(0), d, e0, e1, eq);
          t[i] = d;
        };
        A a0, a1;
        lane_sum2<A>(j0, std::min(P, j0 + kChunk), elem, a0, a1);
        s0 += static_cast<double>(a0);
        s1 += static_cast<double>(a1);
      }
      dalpha[bc] = static_cast<A>(s0);
      dbeta[bc] = static_cast<A>(s1);
      const A* cf = coef + 4 * bc;
      const A k = static_cast<A>(cf[0] * s0 + cf[1] * s1), a = static_cast<A>(cf[2] * s0 + cf[3] * s1);
      const A mu = mean[bc];
#pragma omp simd
      for (int64_t i = 0; i < P; ++i) pdx[i] = st<T>(t[i] + k * (ld(px + i) - mu) + a);
    }
  }
}

}  // namespace

void shuffle_gate_forward_cpu(const void* x, const void* alpha, const void* beta, void* y, DType dtype, int64_t B,
                              int64_t C, int64_t H, int64_t W, int64_t groups) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    shuffle_fwd_typed(static_cast<const T*>(x), static_cast<const A*>(alpha), static_cast<const A*>(beta),
                      static_cast<T*>(y), B, C, H * W, groups);
  });
}

void shuffle_gate_train_backward_cpu(const void* dy, const void* x, const void* alpha, const void* beta,
                                     const void* mean, const void* coef, void* dx, void* dalpha, void* dbeta,
                                     DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, int64_t groups) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    shuffle_train_bwd_typed(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const A*>(alpha),
                            static_cast<const A*>(beta), static_cast<const A*>(mean), static_cast<const A*>(coef),
                            static_cast<T*>(dx), static_cast<A*>(dalpha), static_cast<A*>(dbeta), B, C, H * W,
                            groups);
  });
}

// ---------------------------------------------------------------------------------------------
// NAM's training gate: y = x * sigmoid(w[c] * batchnorm(x)[c]), channel by channel
// ---------------------------------------------------------------------------------------------

namespace {

// Sum of f(i) over [0, n) in fp32 lanes per chunk of kChunk, folded into double.
template <typename F>
double chunked_sum(int64_t n, F f) {
  double total = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) total += lane_sum<float>(i0, std::min(n, i0 + kChunk), f);
  return total;
}

// The gate's per-channel coefficients:
// sigmoid(alpha x + beta) = sigmoid(w (gamma (x - mean) inv + bias)), inv = 1 / sqrt(var + eps).
struct BnGate {
  float alpha, beta, inv;
};
inline BnGate bn_gate(float gamma, float bias, float w, double mean, double var, float eps) {
  const double inv = 1.0 / std::sqrt(var + eps);
  return {static_cast<float>(w * gamma * inv), static_cast<float>(w * (bias - mean * gamma * inv)),
          static_cast<float>(inv)};
}

// Channels per job: a block of K channels is B runs of K * HW contiguous elements (NCHW), longer
// runs for the hardware prefetcher on small planes (one 14 x 14 plane is 12 cache lines), whose
// bytes (bytes_per_element: of x, or of dy and x) fit in 256 KiB, a quarter of a 1 MiB L2, so
// that its second and third passes find it there; at least two blocks per thread.
int64_t channel_block(int64_t B, int64_t C, int64_t HW, int64_t bytes_per_element) {
  const int64_t slab = std::max<int64_t>(1, B * HW * bytes_per_element);
  const int64_t threads = std::max(1, omp_get_max_threads());
  const int64_t k = std::max<int64_t>(1, (256 << 10) / slab);
  return std::max<int64_t>(1, std::min(k, C / (2 * threads)));
}

}  // namespace

void bn_affine_gate_train_forward_cpu(const void* x, const float* gamma, const float* bias, const float* w, float eps,
                                      void* y, float* mean, float* var, DType dtype, int64_t B, int64_t C,
                                      int64_t HW) {
  for_dtype_16_32(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    T* yp = static_cast<T*>(y);
    const double n = static_cast<double>(B) * static_cast<double>(HW);
    const int64_t K = channel_block(B, C, HW, sizeof(T));
#pragma omp parallel
    {
      std::vector<double> sums(static_cast<size_t>(K));
      std::vector<BnGate> gates(static_cast<size_t>(K));
#pragma omp for schedule(static)
      for (int64_t c0 = 0; c0 < C; c0 += K) {
        const int64_t kn = std::min(K, C - c0);
        // the block's planes are read from memory once; the variance's and the gate's passes find
        // them in this core's cache
        std::fill(sums.begin(), sums.end(), 0.0);
        for (int64_t b = 0; b < B; ++b)
          for (int64_t k = 0; k < kn; ++k) {
            const T* p = xp + (b * C + c0 + k) * HW;
            prefetch_ahead(p, HW);   // (NAM training at 32x1024x14x14: 12.0 -> 9.4 ms with the backward's)
            sums[k] += chunked_sum(HW, [&](int64_t i) { return to_float(p[i]); });
          }
        for (int64_t k = 0; k < kn; ++k) mean[c0 + k] = static_cast<float>(sums[k] / n);
        std::fill(sums.begin(), sums.end(), 0.0);
        for (int64_t b = 0; b < B; ++b)
          for (int64_t k = 0; k < kn; ++k) {
            const T* p = xp + (b * C + c0 + k) * HW;
            const float m = mean[c0 + k];
            sums[k] += chunked_sum(HW, [&](int64_t i) {
              const float d = to_float(p[i]) - m;
              return d * d;
            });
          }
        for (int64_t k = 0; k < kn; ++k) {
          const int64_t c = c0 + k;
          var[c] = static_cast<float>(sums[k] / n);
          gates[k] = bn_gate(gamma[c], bias[c], w[c], mean[c], var[c], eps);   // as the backward will
        }
        for (int64_t b = 0; b < B; ++b)
          for (int64_t k = 0; k < kn; ++k) {
            const T* px = xp + (b * C + c0 + k) * HW;
            const BnGate g = gates[k];
            T* py = yp + (b * C + c0 + k) * HW;
            // (streaming stores through an L1 buffer were slower: 2.05 -> 2.2 ms at 32x1024x14x14)
#pragma omp simd
            for (int64_t i = 0; i < HW; ++i) {
              const float xv = to_float(px[i]);
              py[i] = store<T>(xv * sigmoid(g.alpha * xv + g.beta));
            }
          }
      }
    }
  });
}

void bn_affine_gate_train_backward_cpu(const void* dy, const void* x, const float* gamma, const float* bias,
                                       const float* w, float eps, const float* mean, const float* var, void* dx,
                                       float* dgamma, float* dbias, DType dtype, int64_t B, int64_t C, int64_t HW) {
  for_dtype_16_32(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* dyp = static_cast<const T*>(dy);
    const T* xp = static_cast<const T*>(x);
    T* dxp = static_cast<T*>(dx);
    const double n = static_cast<double>(B) * static_cast<double>(HW);
    const int64_t K = channel_block(B, C, HW, 2 * sizeof(T));   // dy and x
    // dx from the kept gates with streaming stores (4.0 -> 3.6 ms at 32x1024x14x14)
    const bool stream = std::is_same<T, float>::value && stream_output(B * C * HW * static_cast<int64_t>(sizeof(T)));
#pragma omp parallel
    {
      std::vector<double> se(static_cast<size_t>(K)), sex(static_cast<size_t>(K));
      std::vector<BnGate> gates(static_cast<size_t>(K));
      // the block's gate values, kept for the dx pass (one exp per element) where they fit in
      // 512 KiB (a block of one channel can be larger than the L2 budget: then recomputed)
      const bool keep = dxp && K * B * HW * static_cast<int64_t>(sizeof(float)) <= (512 << 10);
      std::vector<float> sg(keep ? static_cast<size_t>(K * B * HW) : 0);
#pragma omp for schedule(static)
      for (int64_t c0 = 0; c0 < C; c0 += K) {
        const int64_t kn = std::min(K, C - c0);
        for (int64_t k = 0; k < kn; ++k) {
          const int64_t c = c0 + k;
          gates[k] = bn_gate(gamma[c], bias[c], w[c], mean[c], var[c], eps);
          se[k] = sex[k] = 0;
        }
        // e = dy x s (1 - s), the gradient of the sigmoid's argument; x_hat = (x - mean) inv
        for (int64_t b = 0; b < B; ++b)
          for (int64_t k = 0; k < kn; ++k) {
            const int64_t o = (b * C + c0 + k) * HW;
            const BnGate g = gates[k];
            const float mc = mean[c0 + k];
            float* sk = keep ? sg.data() + (b * kn + k) * HW : nullptr;
            prefetch_ahead(xp + o, HW);
            prefetch_ahead(dyp + o, HW);
            for (int64_t i0 = 0; i0 < HW; i0 += kChunk) {
              float a, e2;
              lane_sum2<float>(
                  i0, std::min(HW, i0 + kChunk),
                  [&](int64_t i, float& e, float& ex) {
                    const float xv = to_float(xp[o + i]), s = sigmoid(g.alpha * xv + g.beta);
                    if (sk) sk[i] = s;
                    e = to_float(dyp[o + i]) * xv * s * (1.0f - s);
                    ex = e * (xv - mc) * g.inv;
                  },
                  a, e2);
              se[k] += a;
              sex[k] += e2;
            }
          }
        // through the BatchNorm (z = gamma x_hat + bias; the argument is w z, w a constant)
        for (int64_t k = 0; k < kn; ++k) {
          const int64_t c = c0 + k;
          dbias[c] = static_cast<float>(w[c] * se[k]);
          dgamma[c] = static_cast<float>(w[c] * sex[k]);
        }
        if (!dxp) continue;
        // dx = dy s + alpha (e - mean(e) - x_hat mean(e x_hat)), dy and x from this core's cache
        for (int64_t b = 0; b < B; ++b)
          for (int64_t k = 0; k < kn; ++k) {
            const int64_t o = (b * C + c0 + k) * HW;
            const BnGate g = gates[k];
            const float mc = mean[c0 + k], me = static_cast<float>(se[k] / n), mex = static_cast<float>(sex[k] / n);
            const float* sk = keep ? sg.data() + (b * kn + k) * HW : nullptr;
            const T* px = xp + o;
            const T* pdy = dyp + o;
            T* pdx = dxp + o;
            if constexpr (std::is_same<T, float>::value) {
              if (stream && sk) {   // the kept gates: dx is a few products, streamed
                // alpha (e - me - (x - mc) inv mex) = alpha e + (x k1 + k0)
                const float k1 = -g.alpha * g.inv * mex, k0 = g.alpha * (mc * g.inv * mex - me);
                const vfloat one = vbroadcast(1.0f), neg = vbroadcast(-1.0f), va = vbroadcast(g.alpha),
                             vk1 = vbroadcast(k1), vk0 = vbroadcast(k0);
                stream_row_f32(
                    pdx, HW,
                    [&](int64_t i) {
                      const vfloat xv = vload(px + i), d = vload(pdy + i), s = vload(sk + i);
                      const vfloat e = vmul(vmul(d, xv), vmul(s, vfma(s, neg, one)));
                      return vfma(d, s, vfma(va, e, vfma(xv, vk1, vk0)));
                    },
                    [&](int64_t i) {
                      const float e = pdy[i] * px[i] * sk[i] * (1.0f - sk[i]);
                      return pdy[i] * sk[i] + g.alpha * e + (px[i] * k1 + k0);
                    });
                continue;
              }
            }
            auto dx_of = [&](float xv, float d, float s) {
              const float e = d * xv * s * (1.0f - s);
              return store<T>(d * s + g.alpha * (e - me - (xv - mc) * g.inv * mex));
            };
            // two loops: with `sk ? sk[i] : sigmoid(..)` in one, the vectorised loop computed the sigmoid
            // for every element (backward 6.0 -> 4.0 ms at 32x1024x14x14, 5.0 -> 3.0 ms at 8x256x56x56)
            if (sk) {
#pragma omp simd
              for (int64_t i = 0; i < HW; ++i) pdx[i] = dx_of(to_float(px[i]), to_float(pdy[i]), sk[i]);
            } else {
#pragma omp simd
              for (int64_t i = 0; i < HW; ++i) {
                const float xv = to_float(px[i]);
                pdx[i] = dx_of(xv, to_float(pdy[i]), sigmoid(g.alpha * xv + g.beta));
              }
            }
          }
      }
      if (stream) stream_fence();
    }
  });
}

// SRM's training gate: g[b, c] = sigmoid(batchnorm over b of z[b, c]), z = cfc[c, 0] mean[b, c] +
// cfc[c, 1] std[b, c], the plane statistics over H x W; per channel block as NAM's.
void srm_train_forward_cpu(const void* x, const float* cfc, const float* gamma, const float* beta, float bn_eps,
                           float std_eps, void* y, float* mean, float* stdv, float* g, float* zmean, float* zvar,
                           DType dtype, int64_t B, int64_t C, int64_t HW) {
  for_dtype_16_32(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    T* yp = static_cast<T*>(y);
    const int64_t K = channel_block(B, C, HW, sizeof(T));
    // y with streaming stores (fp32, an output of at least half the LLC): 2.30 -> 2.04 ms at 32x1024x14x14
    const bool stream = std::is_same<T, float>::value && stream_output(B * C * HW * static_cast<int64_t>(sizeof(T)));
#pragma omp parallel
    {
#pragma omp for schedule(static)
    for (int64_t c0 = 0; c0 < C; c0 += K) {
      const int64_t kn = std::min(K, C - c0);
      // the planes' statistics: x from memory (the variance's pass from the cache)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t k = 0; k < kn; ++k) {
          const int64_t bc = b * C + c0 + k;
          const T* p = xp + bc * HW;
          const float m = static_cast<float>(chunked_sum(HW, [&](int64_t i) { return to_float(p[i]); }) / HW);
          const double sq = chunked_sum(HW, [&](int64_t i) {
            const float d = to_float(p[i]) - m;
            return d * d;
          });
          mean[bc] = m;
          stdv[bc] = std::sqrt(static_cast<float>(sq / static_cast<double>(HW - 1)) + std_eps);
        }
      // each channel's gates: the style integration, the BatchNorm over the batch, the sigmoid
      for (int64_t c = c0; c < c0 + kn; ++c) {
        double zs = 0;
        for (int64_t b = 0; b < B; ++b) zs += cfc[2 * c] * mean[b * C + c] + cfc[2 * c + 1] * stdv[b * C + c];
        const float zm = static_cast<float>(zs / B);
        double zq = 0;
        for (int64_t b = 0; b < B; ++b) {
          const float d = cfc[2 * c] * mean[b * C + c] + cfc[2 * c + 1] * stdv[b * C + c] - zm;
          zq += static_cast<double>(d) * d;
        }
        zmean[c] = zm;
        zvar[c] = static_cast<float>(zq / B);
        // from the stored (float) variance, as the backward will
        const float inv = static_cast<float>(1.0 / std::sqrt(static_cast<double>(zvar[c]) + bn_eps));
        for (int64_t b = 0; b < B; ++b) {
          const float z = cfc[2 * c] * mean[b * C + c] + cfc[2 * c + 1] * stdv[b * C + c];
          g[b * C + c] = sigmoid(gamma[c] * (z - zm) * inv + beta[c]);
        }
      }
      // y = x g, x from the cache
      for (int64_t b = 0; b < B; ++b)
        for (int64_t k = 0; k < kn; ++k) {
          const int64_t bc = b * C + c0 + k;
          const T* p = xp + bc * HW;
          T* q = yp + bc * HW;
          const float gg = g[bc];
          if constexpr (std::is_same<T, float>::value) {
            if (stream) {
              const vfloat vg = vbroadcast(gg);
              stream_row_f32(q, HW, [&](int64_t i) { return vmul(vload(p + i), vg); },
                             [&](int64_t i) { return p[i] * gg; });
              continue;
            }
          }
#pragma omp simd
          for (int64_t i = 0; i < HW; ++i) q[i] = store<T>(to_float(p[i]) * gg);
        }
    }
    if (stream) stream_fence();
    }
  });
}

void srm_train_backward_cpu(const void* dy, const void* x, const float* cfc, const float* gamma, float bn_eps,
                            const float* mean, const float* stdv, const float* g, const float* zmean,
                            const float* zvar, void* dx, float* dcfc, float* dgamma, float* dbeta, DType dtype,
                            int64_t B, int64_t C, int64_t HW) {
  for_dtype_16_32(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* dyp = static_cast<const T*>(dy);
    const T* xp = static_cast<const T*>(x);
    T* dxp = static_cast<T*>(dx);
    const int64_t K = channel_block(B, C, HW, 2 * sizeof(T));   // dy and x
    // dx with streaming stores, as the forward's y (2.27 -> 2.00 ms at 32x1024x14x14)
    const bool stream = std::is_same<T, float>::value && stream_output(B * C * HW * static_cast<int64_t>(sizeof(T)));
#pragma omp parallel
    {
      // per (b, channel of the block): the gate's gradient, then the statistics' gradients
      std::vector<float> dgate(static_cast<size_t>(B * K)), dm(static_cast<size_t>(B * K)),
          ds(static_cast<size_t>(B * K));
#pragma omp for schedule(static)
      for (int64_t c0 = 0; c0 < C; c0 += K) {
        const int64_t kn = std::min(K, C - c0);
        // dg = sum over the plane of dy x: dy and x from memory
        for (int64_t b = 0; b < B; ++b)
          for (int64_t k = 0; k < kn; ++k) {
            const int64_t o = (b * C + c0 + k) * HW;
            dgate[b * kn + k] = static_cast<float>(
                chunked_sum(HW, [&](int64_t i) { return to_float(dyp[o + i]) * to_float(xp[o + i]); }));
          }
        // through the sigmoid, the BatchNorm over the batch (z_hat = (z - zmean) inv) and the style
        // integration, channel by channel
        for (int64_t k = 0; k < kn; ++k) {
          const int64_t c = c0 + k;
          const float inv = static_cast<float>(1.0 / std::sqrt(static_cast<double>(zvar[c]) + bn_eps));
          double sp = 0, spz = 0;   // sums of dpre and dpre z_hat over the batch
          for (int64_t b = 0; b < B; ++b) {
            const int64_t bc = b * C + c;
            const float dpre = dgate[b * kn + k] * g[bc] * (1.0f - g[bc]);
            const float zh = (cfc[2 * c] * mean[bc] + cfc[2 * c + 1] * stdv[bc] - zmean[c]) * inv;
            dgate[b * kn + k] = dpre;
            sp += dpre;
            spz += static_cast<double>(dpre) * zh;
          }
          dbeta[c] = static_cast<float>(sp);
          dgamma[c] = static_cast<float>(spz);
          const float mp = static_cast<float>(sp / B), mpz = static_cast<float>(spz / B);
          double dc0 = 0, dc1 = 0;
          for (int64_t b = 0; b < B; ++b) {
            const int64_t bc = b * C + c;
            const float zh = (cfc[2 * c] * mean[bc] + cfc[2 * c + 1] * stdv[bc] - zmean[c]) * inv;
            const float dz = gamma[c] * inv * (dgate[b * kn + k] - mp - zh * mpz);
            dc0 += static_cast<double>(dz) * mean[bc];
            dc1 += static_cast<double>(dz) * stdv[bc];
            dm[b * kn + k] = dz * cfc[2 * c] / static_cast<float>(HW);                         // d mean / dx = 1 / HW
            ds[b * kn + k] = dz * cfc[2 * c + 1] / (static_cast<float>(HW - 1) * stdv[bc]);   // d std / dx
          }
          dcfc[2 * c] = static_cast<float>(dc0);
          dcfc[2 * c + 1] = static_cast<float>(dc1);
        }
        if (!dxp) continue;
        // dx = dy g + dmean / HW + dstd (x - mean) / ((HW - 1) std): dy and x from the cache
        for (int64_t b = 0; b < B; ++b)
          for (int64_t k = 0; k < kn; ++k) {
            const int64_t bc = b * C + c0 + k, o = bc * HW;
            const float gg = g[bc], a = dm[b * kn + k], kk = ds[b * kn + k], mc = mean[bc];
            const T* px = xp + o;
            const T* pdy = dyp + o;
            T* pdx = dxp + o;
            if constexpr (std::is_same<T, float>::value) {
              if (stream) {
                const vfloat vg = vbroadcast(gg), vk = vbroadcast(kk), vc = vbroadcast(a - kk * mc);
                stream_row_f32(
                    pdx, HW, [&](int64_t i) { return vfma(vload(pdy + i), vg, vfma(vload(px + i), vk, vc)); },
                    [&](int64_t i) { return pdy[i] * gg + a + kk * (px[i] - mc); });
                continue;
              }
            }
#pragma omp simd
            for (int64_t i = 0; i < HW; ++i)
              pdx[i] = store<T>(to_float(pdy[i]) * gg + a + kk * (to_float(px[i]) - mc));
          }
      }
      if (stream) stream_fence();
    }
  });
}

void channel_affine_gate_backward_cpu(const void* dy, const void* x, const void* alpha, const void* beta, void* dx,
                                      void* dalpha, void* dbeta, DType dtype, int64_t B, int64_t C, int64_t H,
                                      int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    const Grads<T> g{static_cast<T*>(dx), static_cast<A*>(dalpha), static_cast<A*>(dbeta), nullptr};
    backward_typed<AffineOp>(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const A*>(alpha),
                             static_cast<const A*>(beta), nullptr, g, B, C, H, W, sdy, sx, sdx);
  });
}

}  // namespace fastattn
