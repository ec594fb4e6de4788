// Branch softmax and weighted sum / concatenation on the CPU. The (B, K, C) softmax is computed once
// up front; then one pass reads every branch and writes the output (forward), or reads dy and the
// branches and writes dfeats while summing s = sum_hw dy_k * feats_k (backward), finished into
// dlogits on the small (B, K, C) tensor.
//
// Layouts: kPlane (H x W flattens with unit stride: torch.stack of NCHW maps; vectorised over
// positions, one job per (b, c, segment)), kChan (channels contiguous: torch.stack of channels_last
// maps; vectorised over channels, one job per (b, block of positions)), kAny (anything else).
#include "branch.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastattn {
namespace {

constexpr int64_t kTile = 1024;          // positions (kPlane) or channels (kChan) per buffer tile
constexpr int64_t kSegPix = 4096;        // positions per forward job of the kPlane path
constexpr int64_t kJobElems = 16384;     // elements per forward job of the kChan path
constexpr int64_t kMinJobs = 64;         // backward: fewer jobs than this get their positions split
constexpr int64_t kMinSegElems = 32768;  // backward: no segment smaller than this (elements)

enum Kind : int { kPlane = 0, kChan = 1, kAny = 2 };

// Strides of a (B, [K,] C, H, W) tensor (k = 0 for 4-D ones) and, when H and W flatten into one
// axis, that axis' stride p.
struct Map {
  int64_t b, k, c, h, w, p;
  bool flat;
};

Map make_map(int64_t sb, int64_t sk, int64_t sc, int64_t sh, int64_t sw, int64_t H, int64_t W) {
  Map m{sb, sk, sc, sh, sw, 1, true};
  if (H * W <= 1) m.p = 1;
  else if (H == 1) m.p = sw;
  else if (W == 1) m.p = sh;
  else if (sh == W * sw) m.p = sw;
  else m.flat = false;
  return m;
}
Map make_map(const Strides4& s, int64_t H, int64_t W) { return make_map(s.b, 0, s.c, s.h, s.w, H, W); }
Map make_map(const BranchFeatStrides& s, int64_t H, int64_t W) { return make_map(s.b, s.k, s.c, s.h, s.w, H, W); }

inline int64_t pix(const Map& m, int64_t p, int64_t W) { return (p / W) * m.h + (p % W) * m.w; }

// a[b, k, c] = softmax over k of logits[b, :, c], in double then rounded.
template <typename A>
void softmax_k(const A* logits, int64_t B, int64_t K, int64_t C, A* a) {
#pragma omp parallel for schedule(static) if (B * C * K >= 16384)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    const A* l = logits + b * K * C + c;
    A* ab = a + b * K * C + c;
    double mx = static_cast<double>(l[0]);
    for (int64_t k = 1; k < K; ++k) mx = std::max(mx, static_cast<double>(l[k * C]));
    double sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += std::exp(static_cast<double>(l[k * C]) - mx);
    for (int64_t k = 0; k < K; ++k) ab[k * C] = static_cast<A>(std::exp(static_cast<double>(l[k * C]) - mx) / sum);
  }
}

template <typename T>
struct Ctx {
  using A = acc_t<T>;
  const T* f;      // feats
  Map mf;
  const A* a;      // (B, K, C) softmax weights
  int64_t B, K, C, N, W;
  BranchMode mode;
  // First output (dy) channel of branch k.
  int64_t out_c(int64_t k) const {
    return mode == BranchMode::Sum ? 0 : (mode == BranchMode::Concat ? k : K - 1 - k) * C;
  }
};

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename T>
void fwd_plane(const Ctx<T>& x, T* y, const Map& my) {
  using A = acc_t<T>;
  const int64_t K = x.K, C = x.C, N = x.N;
  const int64_t nseg = (N + kSegPix - 1) / kSegPix;
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < x.B * C * nseg; ++job) {
    const int64_t bc = job / nseg, s = job % nseg, b = bc / C, c = bc % C;
    const int64_t p0 = s * kSegPix, p1 = std::min(N, p0 + kSegPix);
    const A* ab = x.a + b * K * C + c;
    const T* fb = x.f + b * x.mf.b + c * x.mf.c;
    if (x.mode == BranchMode::Sum) {
      A buf[kTile];
      T* yb = y + b * my.b + c * my.c;
      for (int64_t p = p0; p < p1; p += kTile) {
        const int64_t n = std::min(kTile, p1 - p);
        const T* f0 = fb + p;
        const A a0 = ab[0];
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) buf[i] = a0 * static_cast<A>(to_float(f0[i]));
        for (int64_t k = 1; k < K; ++k) {
          const T* fk = fb + k * x.mf.k + p;
          const A ak = ab[k * C];
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) buf[i] += ak * static_cast<A>(to_float(fk[i]));
        }
        T* py = yb + p;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) py[i] = store<T>(buf[i]);
      }
    } else {
      for (int64_t k = 0; k < K; ++k) {
        const T* fk = fb + k * x.mf.k;
        T* yk = y + b * my.b + (x.out_c(k) + c) * my.c;
        const A ak = ab[k * C];
#pragma omp simd
        for (int64_t i = p0; i < p1; ++i) yk[i] = store<T>(ak * static_cast<A>(to_float(fk[i])));
      }
    }
  }
}

template <typename T>
void fwd_chan(const Ctx<T>& x, T* y, const Map& my) {
  using A = acc_t<T>;
  const int64_t K = x.K, C = x.C, N = x.N;
  const int64_t P = std::max<int64_t>(1, kJobElems / (K * C));   // positions per job
  const int64_t nblk = (N + P - 1) / P;
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < x.B * nblk; ++job) {
    const int64_t b = job / nblk, p0 = (job % nblk) * P, p1 = std::min(N, p0 + P);
    const A* ab = x.a + b * K * C;
    for (int64_t p = p0; p < p1; ++p) {
      const T* fp = x.f + b * x.mf.b + p * x.mf.p;
      T* yp = y + b * my.b + p * my.p;
      if (x.mode == BranchMode::Sum) {
        A buf[kTile];
        for (int64_t c0 = 0; c0 < C; c0 += kTile) {
          const int64_t n = std::min(kTile, C - c0);
          const T* f0 = fp + c0;
          const A* a0 = ab + c0;
#pragma omp simd
          for (int64_t c = 0; c < n; ++c) buf[c] = a0[c] * static_cast<A>(to_float(f0[c]));
          for (int64_t k = 1; k < K; ++k) {
            const T* fk = fp + k * x.mf.k + c0;
            const A* ak = ab + k * C + c0;
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) buf[c] += ak[c] * static_cast<A>(to_float(fk[c]));
          }
          T* py = yp + c0;
#pragma omp simd
          for (int64_t c = 0; c < n; ++c) py[c] = store<T>(buf[c]);
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          const T* fk = fp + k * x.mf.k;
          const A* ak = ab + k * C;
          T* yk = yp + x.out_c(k);
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) yk[c] = store<T>(ak[c] * static_cast<A>(to_float(fk[c])));
        }
      }
    }
  }
}

template <typename T>
void fwd_any(const Ctx<T>& x, T* y, const Map& my) {
  using A = acc_t<T>;
  const int64_t K = x.K, C = x.C, N = x.N, W = x.W;
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < x.B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    const A* ab = x.a + b * K * C + c;
    const T* fb = x.f + b * x.mf.b + c * x.mf.c;
    for (int64_t p = 0; p < N; ++p) {
      const int64_t fo = pix(x.mf, p, W), yo = pix(my, p, W);
      if (x.mode == BranchMode::Sum) {
        A acc = 0;
        for (int64_t k = 0; k < K; ++k) acc += ab[k * C] * static_cast<A>(to_float(fb[k * x.mf.k + fo]));
        y[b * my.b + c * my.c + yo] = store<T>(acc);
      } else {
        for (int64_t k = 0; k < K; ++k)
          y[b * my.b + (x.out_c(k) + c) * my.c + yo] = store<T>(ab[k * C] * static_cast<A>(to_float(fb[k * x.mf.k + fo])));
      }
    }
  }
}

template <typename T>
void forward_typed(const T* feats, const acc_t<T>* logits, T* y, int64_t B, int64_t K, int64_t C, int64_t H,
                   int64_t W, BranchFeatStrides sf, Strides4 sy, BranchMode mode) {
  using A = acc_t<T>;
  std::vector<A> a(static_cast<size_t>(B * K * C));
  softmax_k(logits, B, K, C, a.data());
  const Ctx<T> x{feats, make_map(sf, H, W), a.data(), B, K, C, H * W, W, mode};
  const Map my = make_map(sy, H, W);
  const int64_t Cout = mode == BranchMode::Sum ? C : K * C;
  const bool flat = x.mf.flat && my.flat;
  if (flat && x.mf.p == 1 && my.p == 1) return fwd_plane(x, y, my);
  if (flat && (x.mf.c == 1 || C == 1) && (my.c == 1 || Cout == 1)) return fwd_chan(x, y, my);
  fwd_any(x, y, my);
}

// ---------------------------------------------------------------------------------------------
// Backward: dfeats and s (B, K, C) in double, then dlogits
// ---------------------------------------------------------------------------------------------

// Segments per job: 1 when `jobs` alone keep the threads busy, else up to kMinJobs / jobs, each at
// least kMinSegElems elements (`per_pos` elements per position). A function of the shape only.
int64_t num_segments(int64_t jobs, int64_t N, int64_t per_pos, int64_t min_pix) {
  if (jobs >= kMinJobs) return 1;
  const int64_t want = (kMinJobs + jobs - 1) / jobs;
  min_pix = std::max<int64_t>(min_pix, kMinSegElems / std::max<int64_t>(per_pos, 1));
  const int64_t S = std::max<int64_t>(1, std::min(want, N / std::max<int64_t>(min_pix, 1)));
  const int64_t seg = (N + S - 1) / S;
  return (N + seg - 1) / seg;   // no empty segment
}

template <typename T, bool kUnitDy>
void bwd_plane(const Ctx<T>& x, const T* dy, const Map& mdy, T* df, const Map& mdf, double* s_out) {
  using A = acc_t<T>;
  const int64_t K = x.K, C = x.C, N = x.N;
  const int64_t S = num_segments(x.B * C, N, K, kTile), seg = (N + S - 1) / S;
  const int64_t sp = kUnitDy ? 1 : mdy.p;
  std::vector<double> part(static_cast<size_t>(x.B * C * S * K));
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < x.B * C * S; ++job) {
    const int64_t bc = job / S, s = job % S, b = bc / C, c = bc % C;
    const int64_t p0 = s * seg, p1 = std::min(N, p0 + seg);
    double* out = part.data() + job * K;
    for (int64_t k = 0; k < K; ++k) out[k] = 0;
    for (int64_t p = p0; p < p1; p += kTile) {
      const int64_t n = std::min(kTile, p1 - p);
      for (int64_t k = 0; k < K; ++k) {
        const T* g = dy + b * mdy.b + (x.out_c(k) + c) * mdy.c + p * sp;
        const T* fk = x.f + b * x.mf.b + k * x.mf.k + c * x.mf.c + p;
        T* dfk = df + b * mdf.b + k * mdf.k + c * mdf.c + p;
        const A ak = x.a[(b * K + k) * C + c];
        A acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < n; ++i) {
          const A gv = static_cast<A>(to_float(g[i * sp]));
          dfk[i] = store<T>(gv * ak);
          acc += gv * static_cast<A>(to_float(fk[i]));
        }
        out[k] += static_cast<double>(acc);
      }
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < x.B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    for (int64_t k = 0; k < K; ++k) {
      double t = 0;
      for (int64_t s = 0; s < S; ++s) t += part[(bc * S + s) * K + k];
      s_out[(b * K + k) * C + c] = t;
    }
  }
}

template <typename T, bool kUnitDy>
void bwd_chan(const Ctx<T>& x, const T* dy, const Map& mdy, T* df, const Map& mdf, double* s_out) {
  using A = acc_t<T>;
  const int64_t K = x.K, C = x.C, N = x.N, KC = K * C;
  const int64_t S = num_segments(x.B, N, KC, 1), seg = (N + S - 1) / S;
  const int64_t sc = kUnitDy ? 1 : mdy.c;
  std::vector<double> part(static_cast<size_t>(x.B * S * KC));
#pragma omp parallel
  {
    std::vector<A> acc(static_cast<size_t>(KC));
#pragma omp for schedule(static)
    for (int64_t job = 0; job < x.B * S; ++job) {
      const int64_t b = job / S, s = job % S;
      const int64_t p0 = s * seg, p1 = std::min(N, p0 + seg);
      double* tot = part.data() + job * KC;
      for (int64_t j = 0; j < KC; ++j) tot[j] = 0;
      for (int64_t i0 = p0; i0 < p1; i0 += kChunk) {
        const int64_t i1 = std::min(p1, i0 + kChunk);
        std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t p = i0; p < i1; ++p) {
          for (int64_t k = 0; k < K; ++k) {
            const T* g = dy + b * mdy.b + p * mdy.p + x.out_c(k) * sc;
            const T* fk = x.f + b * x.mf.b + k * x.mf.k + p * x.mf.p;
            T* dfk = df + b * mdf.b + k * mdf.k + p * mdf.p;
            const A* ak = x.a + (b * K + k) * C;
            A* ck = acc.data() + k * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const A gv = static_cast<A>(to_float(g[c * sc]));
              dfk[c] = store<T>(gv * ak[c]);
              ck[c] += gv * static_cast<A>(to_float(fk[c]));
            }
          }
        }
        for (int64_t j = 0; j < KC; ++j) tot[j] += static_cast<double>(acc[j]);
      }
    }
  }
#pragma omp parallel for schedule(static) if (x.B * KC * S >= 16384)
  for (int64_t bj = 0; bj < x.B * KC; ++bj) {
    const int64_t b = bj / KC, j = bj % KC;
    double t = 0;
    for (int64_t s = 0; s < S; ++s) t += part[(b * S + s) * KC + j];
    s_out[bj] = t;
  }
}

template <typename T>
void bwd_any(const Ctx<T>& x, const T* dy, const Map& mdy, T* df, const Map& mdf, double* s_out) {
  using A = acc_t<T>;
  const int64_t K = x.K, C = x.C, N = x.N, W = x.W;
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < x.B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    for (int64_t k = 0; k < K; ++k) {
      const T* g = dy + b * mdy.b + (x.out_c(k) + c) * mdy.c;
      const T* fk = x.f + b * x.mf.b + k * x.mf.k + c * x.mf.c;
      T* dfk = df + b * mdf.b + k * mdf.k + c * mdf.c;
      const A ak = x.a[(b * K + k) * C + c];
      double acc = 0;   // the slow path: plain double accumulation
      for (int64_t p = 0; p < N; ++p) {
        const A gv = static_cast<A>(to_float(g[pix(mdy, p, W)]));
        dfk[pix(mdf, p, W)] = store<T>(gv * ak);
        acc += static_cast<double>(gv) * static_cast<double>(to_float(fk[pix(x.mf, p, W)]));
      }
      s_out[(b * K + k) * C + c] = acc;
    }
  }
}

template <typename T>
void backward_typed(const T* dy, const T* feats, const acc_t<T>* logits, T* df, acc_t<T>* dlogits, int64_t B,
                    int64_t K, int64_t C, int64_t H, int64_t W, Strides4 sdy, BranchFeatStrides sf,
                    BranchFeatStrides sdf, BranchMode mode) {
  using A = acc_t<T>;
  const int64_t BKC = B * K * C;
  std::vector<A> a(static_cast<size_t>(BKC));
  softmax_k(logits, B, K, C, a.data());
  const Ctx<T> x{feats, make_map(sf, H, W), a.data(), B, K, C, H * W, W, mode};
  const Map mdy = make_map(sdy, H, W), mdf = make_map(sdf, H, W);
  const int64_t Cout = mode == BranchMode::Sum ? C : K * C;
  std::vector<double> s(static_cast<size_t>(BKC));
  const bool flat = x.mf.flat && mdf.flat && mdy.flat;
  if (flat && x.mf.p == 1 && mdf.p == 1) {
    if (mdy.p == 1) bwd_plane<T, true>(x, dy, mdy, df, mdf, s.data());
    else bwd_plane<T, false>(x, dy, mdy, df, mdf, s.data());
  } else if (flat && (x.mf.c == 1 || C == 1) && (mdf.c == 1 || C == 1)) {
    if (mdy.c == 1 || Cout == 1) bwd_chan<T, true>(x, dy, mdy, df, mdf, s.data());
    else bwd_chan<T, false>(x, dy, mdy, df, mdf, s.data());
  } else {
    bwd_any(x, dy, mdy, df, mdf, s.data());
  }
  // The softmax Jacobian: dlogits = a * (s - sum_k a * s).
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      double as = 0;
      for (int64_t k = 0; k < K; ++k) as += static_cast<double>(a[(b * K + k) * C + c]) * s[(b * K + k) * C + c];
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = (b * K + k) * C + c;
        dlogits[i] = static_cast<A>(static_cast<double>(a[i]) * (s[i] - as));
      }
    }
}

}  // namespace

void branch_forward_cpu(const void* feats, const void* logits, void* y, DType dtype, int64_t B, int64_t K,
                        int64_t C, int64_t H, int64_t W, BranchFeatStrides sf, Strides4 sy, BranchMode mode) {
  switch (dtype) {
#define FA_CASE(TAG, T)                                                                                    \
  case DType::TAG:                                                                                         \
    return forward_typed(static_cast<const T*>(feats), static_cast<const acc_t<T>*>(logits), static_cast<T*>(y), \
                         B, K, C, H, W, sf, sy, mode);
    FA_CASE(Float32, float)
    FA_CASE(Float64, double)
    FA_CASE(Float16, fp16_t)
    FA_CASE(BFloat16, bf16_t)
#undef FA_CASE
  }
}

void branch_backward_cpu(const void* dy, const void* feats, const void* logits, void* dfeats, void* dlogits,
                         DType dtype, int64_t B, int64_t K, int64_t C, int64_t H, int64_t W, Strides4 sdy,
                         BranchFeatStrides sf, BranchFeatStrides sdf, BranchMode mode) {
  switch (dtype) {
#define FA_CASE(TAG, T)                                                                                       \
  case DType::TAG:                                                                                            \
    return backward_typed(static_cast<const T*>(dy), static_cast<const T*>(feats),                           \
                          static_cast<const acc_t<T>*>(logits), static_cast<T*>(dfeats),                     \
                          static_cast<acc_t<T>*>(dlogits), B, K, C, H, W, sdy, sf, sdf, mode);
    FA_CASE(Float32, float)
    FA_CASE(Float64, double)
    FA_CASE(Float16, fp16_t)
    FA_CASE(BFloat16, bf16_t)
#undef FA_CASE
  }
}

}  // namespace fastattn
