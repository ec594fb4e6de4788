// Branch softmax and weighted sum / concatenation on CUDA (math in fastattn/ops/branch.py; the CPU
// twin is csrc/cpu/branch.cpp). A small kernel computes the (B, K, C) softmax into the workspace;
// then one pass over the branches: the forward reads every branch once and writes the output; the
// backward reads dy and the branches, writes dfeats and per-warp partial sums of s = sum_hw dy_k
// feats_k, which a finishing kernel adds in a fixed order and turns into dlogits = a (s - sum_k a s).
//
// Work items are warps. kPlane (positions contiguous: a stack of NCHW maps): a warp owns one
// channel c of one sample and a run of positions, lanes along positions (16-byte vectors when
// aligned). kChan (channels contiguous: a stack of channels_last maps): a warp owns a run of
// positions, lanes along channel vectors. kAny: the kPlane mapping with scalar accesses and (h, w)
// split per access. The batch runs on grid axis y (at most 65535 blocks, looping over the rest).
#include "branch.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

namespace fastattn {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kFwdUnits = 512;     // kPlane forward: thread units (vectors) per warp item
constexpr int64_t kFwdElems = 4096;    // kChan forward: positions x channels per warp item
constexpr int64_t kPlaneSeg = 2048;    // kPlane / kAny backward: positions per warp item
constexpr int64_t kChanSeg = 128;      // kChan backward: positions per warp item
constexpr int kKChunk = 4;             // backward: branches per pass (their sums live in registers)

enum Kind : int { kPlane = 0, kChan = 1, kAny = 2 };

template <typename T> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename AccT<T>::type v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };

template <int N, typename T, typename A>
__device__ __forceinline__ void load_n(const T* p, A (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = to_acc(p[0]);
  } else {
    const Pack<T, N> k = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_acc(k.v[i]);
  }
}

template <int N, typename T, typename A>
__device__ __forceinline__ void store_n(T* p, const A (&in)[N]) {
  if constexpr (N == 1) {
    p[0] = from_acc<T>(in[0]);
  } else {
    Pack<T, N> k;
#pragma unroll
    for (int i = 0; i < N; ++i) k.v[i] = from_acc<T>(in[i]);
    *reinterpret_cast<Pack<T, N>*>(p) = k;
  }
}

// Element strides of a (B, K, C, H, W) tensor (k = 0 for the 4-D ones); p: the flattened H x W stride.
struct L5 {
  int64_t b, k, c, h, w, p;
};

template <int KIND>
__device__ __forceinline__ int64_t poff(const L5& l, int64_t p, int64_t W) {
  if constexpr (KIND == kAny) return (p / W) * l.h + (p % W) * l.w;
  else return p * l.p;
}

template <typename T>
struct BArgs {
  using A = typename AccT<T>::type;
  const T* f;     // feats
  T* out;         // forward: y; backward: dfeats
  const T* dy;    // backward only
  L5 lf, lo, ldy;
  const A* a;     // (B, K, C) softmax weights
  A* part;        // backward partial sums of s
  int64_t B, K, C, N, W;
  int64_t items;  // warp items per sample
  int64_t nchunk; // kPlane forward: position chunks per channel; kChan backward: channel chunks
  int64_t seg;    // kChan forward: positions per item
  int64_t Sg;     // backward: position segments
  int mode;       // BranchMode
};

// First output (dy) channel of branch k.
__device__ __forceinline__ int64_t out_c(int mode, int64_t k, int64_t K, int64_t C) {
  return mode == 0 ? 0 : (mode == 1 ? k : K - 1 - k) * C;
}

// a[b, k, c] = softmax over k of logits[b, :, c]. One thread per (b, c).
template <typename A>
__global__ void softmax_k(const A* __restrict__ logits, A* __restrict__ a, int64_t B, int64_t K, int64_t C) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * C) return;
  const int64_t b = i / C, c = i % C;
  const A* l = logits + b * K * C + c;
  A mx = l[0];
  for (int64_t k = 1; k < K; ++k) mx = l[k * C] > mx ? l[k * C] : mx;
  A sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += exp(l[k * C] - mx);
  const A inv = A(1) / sum;
  for (int64_t k = 0; k < K; ++k) a[b * K * C + k * C + c] = exp(l[k * C] - mx) * inv;
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <int KIND, int VEC, typename T>
__global__ void __launch_bounds__(kThreads) branch_fwd_plane(BArgs<T> a) {
  using A = typename AccT<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t it = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (it >= a.items) return;
  const int64_t NU = a.N / VEC;
  const int64_t c = it / a.nchunk, u0 = (it % a.nchunk) * kFwdUnits, u1 = imin(NU, u0 + kFwdUnits);
  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    const T* fb = a.f + b * a.lf.b + c * a.lf.c;
    const A* ab = a.a + b * a.K * a.C + c;
    for (int64_t u = u0 + lane; u < u1; u += 32) {
      const int64_t p = u * VEC;
      const int64_t fo = poff<KIND>(a.lf, p, a.W), yo = poff<KIND>(a.lo, p, a.W);
      if (a.mode == 0) {
        A acc[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] = A(0);
        for (int64_t k = 0; k < a.K; ++k) {
          A fv[VEC];
          load_n<VEC>(fb + k * a.lf.k + fo, fv);
          const A ak = ab[k * a.C];
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[v] += ak * fv[v];
        }
        store_n<VEC>(a.out + b * a.lo.b + c * a.lo.c + yo, acc);
      } else {
        for (int64_t k = 0; k < a.K; ++k) {
          A fv[VEC];
          load_n<VEC>(fb + k * a.lf.k + fo, fv);
          const A ak = ab[k * a.C];
#pragma unroll
          for (int v = 0; v < VEC; ++v) fv[v] *= ak;
          store_n<VEC>(a.out + b * a.lo.b + (out_c(a.mode, k, a.K, a.C) + c) * a.lo.c + yo, fv);
        }
      }
    }
  }
}

template <int VEC, typename T>
__global__ void __launch_bounds__(kThreads) branch_fwd_chan(BArgs<T> a) {
  using A = typename AccT<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t it = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (it >= a.items) return;
  const int64_t NU = a.C / VEC;
  const int cols = static_cast<int>(imin(32, NU)), rows = 32 / cols;
  const int lr = lane / cols, lc = lane % cols;
  if (lr >= rows) return;   // no warp collectives in this kernel
  const int64_t p0 = it * a.seg, p1 = imin(a.N, p0 + a.seg);
  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    const A* ab = a.a + b * a.K * a.C;
    for (int64_t p = p0 + lr; p < p1; p += rows) {
      const T* fp = a.f + b * a.lf.b + p * a.lf.p;
      T* yp = a.out + b * a.lo.b + p * a.lo.p;
      for (int64_t u = lc; u < NU; u += cols) {
        const int64_t c = u * VEC;
        if (a.mode == 0) {
          A acc[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[v] = A(0);
          for (int64_t k = 0; k < a.K; ++k) {
            A fv[VEC];
            load_n<VEC>(fp + k * a.lf.k + c, fv);
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[v] += ab[k * a.C + c + v] * fv[v];
          }
          store_n<VEC>(yp + c, acc);
        } else {
          for (int64_t k = 0; k < a.K; ++k) {
            A fv[VEC];
            load_n<VEC>(fp + k * a.lf.k + c, fv);
#pragma unroll
            for (int v = 0; v < VEC; ++v) fv[v] *= ab[k * a.C + c + v];
            store_n<VEC>(yp + out_c(a.mode, k, a.K, a.C) + c, fv);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// kPlane / kAny: warp item (c, segment); part[((b * C + c) * Sg + seg) * K + k].
template <int KIND, int VEC, typename T>
__global__ void __launch_bounds__(kThreads) branch_bwd_plane(BArgs<T> a) {
  using A = typename AccT<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t it = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (it >= a.items) return;   // warp-uniform: the shuffles below see full warps
  const int64_t NU = a.N / VEC, per = kPlaneSeg / VEC;
  const int64_t c = it / a.Sg, seg = it % a.Sg;
  const int64_t u0 = seg * per, u1 = imin(NU, u0 + per);
  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    const A* ab = a.a + b * a.K * a.C + c;
    for (int64_t kc = 0; kc < a.K; kc += kKChunk) {
      A s[kKChunk];
#pragma unroll
      for (int kk = 0; kk < kKChunk; ++kk) s[kk] = A(0);
      for (int64_t u = u0 + lane; u < u1; u += 32) {
        const int64_t p = u * VEC;
        const int64_t fo = poff<KIND>(a.lf, p, a.W), oo = poff<KIND>(a.lo, p, a.W), go = poff<KIND>(a.ldy, p, a.W);
        A g[VEC];
        if (a.mode == 0) load_n<VEC>(a.dy + b * a.ldy.b + c * a.ldy.c + go, g);
#pragma unroll
        for (int kk = 0; kk < kKChunk; ++kk) {
          const int64_t k = kc + kk;
          if (k < a.K) {
            if (a.mode != 0) load_n<VEC>(a.dy + b * a.ldy.b + (out_c(a.mode, k, a.K, a.C) + c) * a.ldy.c + go, g);
            A fv[VEC], df[VEC];
            load_n<VEC>(a.f + b * a.lf.b + k * a.lf.k + c * a.lf.c + fo, fv);
            const A ak = ab[k * a.C];
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              df[v] = g[v] * ak;
              s[kk] += g[v] * fv[v];
            }
            store_n<VEC>(a.out + b * a.lo.b + k * a.lo.k + c * a.lo.c + oo, df);
          }
        }
      }
#pragma unroll
      for (int kk = 0; kk < kKChunk; ++kk)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s[kk] += __shfl_down_sync(0xffffffffu, s[kk], o);
      if (lane == 0)
#pragma unroll
        for (int kk = 0; kk < kKChunk; ++kk)
          if (kc + kk < a.K) a.part[((b * a.C + c) * a.Sg + seg) * a.K + kc + kk] = s[kk];
    }
  }
}

// kChan: warp item (segment, chunk of 32 channel vectors); lanes in (row, column) with a power-of-
// two column count, rows over positions; part[((b * Sg + seg) * K + k) * C + c].
template <int VEC, typename T>
__global__ void __launch_bounds__(kThreads) branch_bwd_chan(BArgs<T> a) {
  using A = typename AccT<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t it = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (it >= a.items) return;   // warp-uniform
  const int64_t NU = a.C / VEC;
  const int64_t seg = it / a.nchunk, ulo = (it % a.nchunk) * 32;
  const int nu = static_cast<int>(imin(32, NU - ulo));
  int cols = 1;
  while (cols < nu) cols <<= 1;
  const int rows = 32 / cols, lr = lane / cols, lc = lane % cols;
  const bool active = lc < nu;
  const int64_t c = (ulo + lc) * VEC;
  const int64_t p0 = seg * kChanSeg, p1 = imin(a.N, p0 + kChanSeg);
  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    const A* ab = a.a + b * a.K * a.C + c;
    for (int64_t kc = 0; kc < a.K; kc += kKChunk) {
      A s[kKChunk][VEC];
#pragma unroll
      for (int kk = 0; kk < kKChunk; ++kk)
#pragma unroll
        for (int v = 0; v < VEC; ++v) s[kk][v] = A(0);
      if (active) {
        for (int64_t p = p0 + lr; p < p1; p += rows) {
          const T* gp = a.dy + b * a.ldy.b + p * a.ldy.p;
          A g[VEC];
          if (a.mode == 0) load_n<VEC>(gp + c, g);
#pragma unroll
          for (int kk = 0; kk < kKChunk; ++kk) {
            const int64_t k = kc + kk;
            if (k < a.K) {
              if (a.mode != 0) load_n<VEC>(gp + out_c(a.mode, k, a.K, a.C) + c, g);
              A fv[VEC], df[VEC];
              load_n<VEC>(a.f + b * a.lf.b + k * a.lf.k + p * a.lf.p + c, fv);
#pragma unroll
              for (int v = 0; v < VEC; ++v) {
                df[v] = g[v] * ab[k * a.C + v];
                s[kk][v] += g[v] * fv[v];
              }
              store_n<VEC>(a.out + b * a.lo.b + k * a.lo.k + p * a.lo.p + c, df);
            }
          }
        }
      }
#pragma unroll
      for (int kk = 0; kk < kKChunk; ++kk)
#pragma unroll
        for (int v = 0; v < VEC; ++v)
          for (int o = cols; o < 32; o <<= 1) s[kk][v] += __shfl_xor_sync(0xffffffffu, s[kk][v], o);
      if (lr == 0 && active)
#pragma unroll
        for (int kk = 0; kk < kKChunk; ++kk)
          if (kc + kk < a.K)
#pragma unroll
            for (int v = 0; v < VEC; ++v) a.part[((b * a.Sg + seg) * a.K + kc + kk) * a.C + c + v] = s[kk][v];
    }
  }
}

// s from the segments' partial sums (fixed order), then dlogits = a (s - sum_k a s). One thread per (b, c).
template <typename A>
__global__ void branch_finish(const A* __restrict__ part, const A* __restrict__ a, A* __restrict__ dlogits, int64_t B,
                              int64_t K, int64_t C, int64_t Sg, bool chan_layout) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * C) return;
  const int64_t b = i / C, c = i % C;
  A as = 0;
  for (int64_t k = 0; k < K; ++k) {
    A s = 0;
    for (int64_t g = 0; g < Sg; ++g)
      s += chan_layout ? part[((b * Sg + g) * K + k) * C + c] : part[((b * C + c) * Sg + g) * K + k];
    dlogits[(b * K + k) * C + c] = s;
    as += a[(b * K + k) * C + c] * s;
  }
  for (int64_t k = 0; k < K; ++k) {
    const int64_t j = (b * K + k) * C + c;
    dlogits[j] = a[j] * (dlogits[j] - as);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

L5 make_l5(int64_t sb, int64_t sk, int64_t sc, int64_t sh, int64_t sw, int64_t H, int64_t W, bool& flat) {
  L5 l{sb, sk, sc, sh, sw, 1};
  flat = true;
  if (H * W <= 1) l.p = 1;
  else if (H == 1) l.p = sw;
  else if (W == 1) l.p = sh;
  else if (sh == W * sw) l.p = sw;
  else flat = false;
  return l;
}
L5 make_l5(const BranchFeatStrides& s, int64_t H, int64_t W, bool& flat) {
  return make_l5(s.b, s.k, s.c, s.h, s.w, H, W, flat);
}
L5 make_l5(const Strides4& s, int64_t H, int64_t W, bool& flat) { return make_l5(s.b, 0, s.c, s.h, s.w, H, W, flat); }

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

size_t part_elems(int64_t B, int64_t K, int64_t C, int64_t N) {
  const int64_t plane = B * C * cdiv(N, kPlaneSeg) * K, chan = B * cdiv(N, kChanSeg) * K * C;
  return static_cast<size_t>(std::max(plane, chan));
}

// Layout kind and vector use for tensors `ls` (chan_ok[i]: tensor i may have channels contiguous,
// i.e. its channel stride is 1 or it has a single channel).
struct Choice {
  int kind;
  bool vec;
};

Choice choose(const L5* ls, const bool* flats, const bool* chan_ok, const void* const* ptrs, int n, int64_t C,
              int64_t N, int vec) {
  bool all_flat = true, plane = true, chan = true;
  for (int i = 0; i < n; ++i) {
    all_flat = all_flat && flats[i];
    plane = plane && ls[i].p == 1;
    chan = chan && chan_ok[i];
  }
  if (!all_flat) return {kAny, false};
  if (plane) {
    bool v = N % vec == 0;
    for (int i = 0; i < n; ++i)
      v = v && aligned16(ptrs[i]) && ls[i].b % vec == 0 && ls[i].k % vec == 0 && ls[i].c % vec == 0;
    return {kPlane, v};
  }
  if (chan) {
    bool v = C % vec == 0;
    for (int i = 0; i < n; ++i)
      v = v && aligned16(ptrs[i]) && ls[i].b % vec == 0 && ls[i].k % vec == 0 && ls[i].p % vec == 0;
    return {kChan, v};
  }
  return {kAny, false};
}

template <typename T>
cudaError_t launch_softmax(const BArgs<T>& a, const void* logits, cudaStream_t stream) {
  using A = typename AccT<T>::type;
  const int64_t blocks = cdiv(a.B * a.C, kThreads);
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  softmax_k<A><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(static_cast<const A*>(logits),
                                                                       const_cast<A*>(a.a), a.B, a.K, a.C);
  return cudaGetLastError();
}

bool grid_for(int64_t items, int64_t B, dim3& grid) {
  const int64_t x = cdiv(items, kWarps);
  if (x > kMaxGridX || x < 1) return false;
  grid = dim3(static_cast<unsigned>(x), static_cast<unsigned>(std::min(B, kMaxGridY)), 1);
  return true;
}

template <typename T>
cudaError_t forward_typed(const void* feats, const void* logits, void* y, int64_t B, int64_t K, int64_t C, int64_t H,
                          int64_t W, BranchFeatStrides sf, Strides4 sy, BranchMode mode, void* ws, size_t ws_bytes,
                          cudaStream_t stream) {
  using A = typename AccT<T>::type;
  constexpr int V = 16 / sizeof(T);
  if (ws_bytes < static_cast<size_t>(B * K * C) * sizeof(A)) return cudaErrorInvalidValue;
  BArgs<T> a{};
  bool ff, fy;
  a.f = static_cast<const T*>(feats);
  a.out = static_cast<T*>(y);
  a.lf = make_l5(sf, H, W, ff);
  a.lo = make_l5(sy, H, W, fy);
  a.a = static_cast<const A*>(ws);
  a.B = B, a.K = K, a.C = C, a.N = H * W, a.W = W;
  a.mode = static_cast<int>(mode);
  const int64_t Cout = mode == BranchMode::Sum ? C : K * C;
  const L5 ls[2] = {a.lf, a.lo};
  const bool flats[2] = {ff, fy};
  const bool chan_ok[2] = {a.lf.c == 1 || C == 1, a.lo.c == 1 || Cout == 1};
  const void* ptrs[2] = {feats, y};
  const Choice ch = choose(ls, flats, chan_ok, ptrs, 2, C, a.N, V);
  cudaError_t err = launch_softmax(a, logits, stream);
  if (err != cudaSuccess) return err;
  dim3 grid;
  if (ch.kind == kChan) {
    a.seg = std::max<int64_t>(1, kFwdElems / std::max<int64_t>(C, 1));
    a.items = cdiv(a.N, a.seg);
    if (!grid_for(a.items, B, grid)) return cudaErrorInvalidConfiguration;
    if (ch.vec) branch_fwd_chan<V, T><<<grid, kThreads, 0, stream>>>(a);
    else branch_fwd_chan<1, T><<<grid, kThreads, 0, stream>>>(a);
  } else {
    const int vec = ch.vec ? V : 1;
    a.nchunk = cdiv(a.N / vec, kFwdUnits);
    a.items = C * a.nchunk;
    if (!grid_for(a.items, B, grid)) return cudaErrorInvalidConfiguration;
    if (ch.kind == kAny) branch_fwd_plane<kAny, 1, T><<<grid, kThreads, 0, stream>>>(a);
    else if (ch.vec) branch_fwd_plane<kPlane, V, T><<<grid, kThreads, 0, stream>>>(a);
    else branch_fwd_plane<kPlane, 1, T><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const void* dy, const void* feats, const void* logits, void* dfeats, void* dlogits,
                           int64_t B, int64_t K, int64_t C, int64_t H, int64_t W, Strides4 sdy, BranchFeatStrides sf,
                           BranchFeatStrides sdf, BranchMode mode, void* ws, size_t ws_bytes, cudaStream_t stream) {
  using A = typename AccT<T>::type;
  constexpr int V = 16 / sizeof(T);
  const int64_t N = H * W;
  if (ws_bytes < (static_cast<size_t>(B * K * C) + part_elems(B, K, C, N)) * sizeof(A)) return cudaErrorInvalidValue;
  BArgs<T> a{};
  bool ff, fo, fg;
  a.f = static_cast<const T*>(feats);
  a.out = static_cast<T*>(dfeats);
  a.dy = static_cast<const T*>(dy);
  a.lf = make_l5(sf, H, W, ff);
  a.lo = make_l5(sdf, H, W, fo);
  a.ldy = make_l5(sdy, H, W, fg);
  a.a = static_cast<const A*>(ws);
  a.part = static_cast<A*>(ws) + B * K * C;
  a.B = B, a.K = K, a.C = C, a.N = N, a.W = W;
  a.mode = static_cast<int>(mode);
  const int64_t Cout = mode == BranchMode::Sum ? C : K * C;
  const L5 ls[3] = {a.lf, a.lo, a.ldy};
  const bool flats[3] = {ff, fo, fg};
  const bool chan_ok[3] = {a.lf.c == 1 || C == 1, a.lo.c == 1 || C == 1, a.ldy.c == 1 || Cout == 1};
  const void* ptrs[3] = {feats, dfeats, dy};
  const Choice ch = choose(ls, flats, chan_ok, ptrs, 3, C, N, V);
  cudaError_t err = launch_softmax(a, logits, stream);
  if (err != cudaSuccess) return err;
  dim3 grid;
  const bool chan = ch.kind == kChan;
  if (chan) {
    const int vec = ch.vec ? V : 1;
    a.Sg = cdiv(N, kChanSeg);
    a.nchunk = cdiv(C / vec, 32);
    a.items = a.Sg * a.nchunk;
    if (!grid_for(a.items, B, grid)) return cudaErrorInvalidConfiguration;
    if (ch.vec) branch_bwd_chan<V, T><<<grid, kThreads, 0, stream>>>(a);
    else branch_bwd_chan<1, T><<<grid, kThreads, 0, stream>>>(a);
  } else {
    a.Sg = cdiv(N, kPlaneSeg);
    a.items = C * a.Sg;
    if (!grid_for(a.items, B, grid)) return cudaErrorInvalidConfiguration;
    if (ch.kind == kAny) branch_bwd_plane<kAny, 1, T><<<grid, kThreads, 0, stream>>>(a);
    else if (ch.vec) branch_bwd_plane<kPlane, V, T><<<grid, kThreads, 0, stream>>>(a);
    else branch_bwd_plane<kPlane, 1, T><<<grid, kThreads, 0, stream>>>(a);
  }
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  const int64_t blocks = cdiv(B * C, kThreads);
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  branch_finish<A><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a.part, a.a, static_cast<A*>(dlogits), B,
                                                                            K, C, a.Sg, chan);
  return cudaGetLastError();
}

size_t acc_size(DType dtype) { return dtype == DType::Float64 ? sizeof(double) : sizeof(float); }

}  // namespace

size_t branch_workspace_cuda(DType dtype, int64_t B, int64_t K, int64_t C, int64_t H, int64_t W, bool backward) {
  const size_t n = static_cast<size_t>(B * K * C) + (backward ? part_elems(B, K, C, H * W) : 0);
  return n * acc_size(dtype);
}

cudaError_t branch_forward_cuda(const void* feats, const void* logits, void* y, DType dtype, int64_t B, int64_t K,
                                int64_t C, int64_t H, int64_t W, BranchFeatStrides sf, Strides4 sy, BranchMode mode,
                                void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (K < 1) return cudaErrorInvalidValue;
  if (B * C * H * W == 0) return cudaSuccess;
  switch (dtype) {
#define FA_CASE(TAG, T)  \
  case DType::TAG:       \
    return forward_typed<T>(feats, logits, y, B, K, C, H, W, sf, sy, mode, workspace, workspace_bytes, stream);
    FA_CASE(Float32, float)
    FA_CASE(Float64, double)
    FA_CASE(Float16, __half)
    FA_CASE(BFloat16, __nv_bfloat16)
#undef FA_CASE
  }
  return cudaErrorInvalidValue;
}

cudaError_t branch_backward_cuda(const void* dy, const void* feats, const void* logits, void* dfeats, void* dlogits,
                                 DType dtype, int64_t B, int64_t K, int64_t C, int64_t H, int64_t W, Strides4 sdy,
                                 BranchFeatStrides sf, BranchFeatStrides sdf, BranchMode mode, void* workspace,
                                 size_t workspace_bytes, cudaStream_t stream) {
  if (K < 1) return cudaErrorInvalidValue;
  if (B * C * H * W == 0) return cudaSuccess;   // the caller's dlogits are zeros
  switch (dtype) {
#define FA_CASE(TAG, T)                                                                                      \
  case DType::TAG:                                                                                           \
    return backward_typed<T>(dy, feats, logits, dfeats, dlogits, B, K, C, H, W, sdy, sf, sdf, mode, workspace, \
                             workspace_bytes, stream);
    FA_CASE(Float32, float)
    FA_CASE(Float64, double)
    FA_CASE(Float16, __half)
    FA_CASE(BFloat16, __nv_bfloat16)
#undef FA_CASE
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastattn
