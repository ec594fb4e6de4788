// SGE gate on CUDA (math in kernels/group.py; the CPU twin is csrc/cpu/group.cpp).
//
// Fused path (enough (b, g) slabs for the device): one block per slab runs every step, re-reading
// the slab (tens of KB at SGE-ResNet shapes) from L1/L2, so x (and dy) leave DRAM once:
//   forward  (1) channel sums -> m, mu0 = sum m^2 (= mean_p xn); (2) sums of xn - mu0 and its square
//            -> mu, sd; (3) y = x * sigmoid(w (xn - mu) / (sd + eps) + b).
//   backward (A) per tile of positions: dt0 and d per position (shared memory), the group sums and
//            per channel P = sum dt0 (x - m), Q = sum d (x - m), R = sum (x - m); then
//            dm = r (P - mean(dt0) R) - k (Q + m sum d); (B) dx = dy s + dxn m + dm / N.
// Split path (few slabs): the same steps as separate launches over (slab, segment of positions)
// blocks, partial sums in a workspace added in segment order by small finishing kernels.
// Every reduction has a fixed order: warp shuffles, then the warps' values in warp order. No atomics.
//
// Thread mappings: kPlane (H x W flattens with unit stride, NCHW): a thread owns VEC consecutive
// positions (16-byte loads when aligned); channel sums: one warp per channel. kChan (channels
// contiguous, channels_last): a thread owns one position and walks the group's channels VEC at a
// time; channel sums: threads in (row, column) = (position, channel vector). kAny: any strides,
// scalar loads, positions split into (h, w) per load (correct, not fast).
#include "group.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

namespace fastattn {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMinBlocks = 256;        // fewer (b, g) slabs than this get their positions split
constexpr int64_t kMinSegElems = 16384;    // no segment of a split slab smaller than this (elements)
constexpr int64_t kMaxGridX = 2147483647;
constexpr int kFoldChannels = 16;          // channels per partial sum of the per-position dot products

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

__device__ __forceinline__ float sigmoid_acc(float t) { return 1.0f / (1.0f + __expf(-t)); }
__device__ __forceinline__ double sigmoid_acc(double t) { return 1.0 / (1.0 + exp(-t)); }

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// N consecutive elements in one access (16 bytes for N = 16 / sizeof(T)); the caller guarantees
// the alignment.
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

// Element strides of a (B, C, H, W) tensor; p: the stride of the flattened H x W axis (flat kinds).
struct L4 {
  int64_t b, c, h, w, p;
};

// Offset of (channel c, position p) from the sample's base.
template <int K>
__device__ __forceinline__ int64_t offs(const L4& l, int64_t c, int64_t p, int64_t W) {
  if constexpr (K == kPlane) return c * l.c + p;
  else if constexpr (K == kChan) return c + p * l.p;
  else return c * l.c + (p / W) * l.h + (p % W) * l.w;
}

// Positions per thread unit (PP) and channels per load (CV) of each kind.
template <int K, int VEC> struct Geo {
  static constexpr int PP = K == kPlane ? VEC : 1;
  static constexpr int CV = K == kChan ? VEC : 1;
};

// Sums NV values over the block; every thread gets the totals (same order everywhere).
template <int NV, typename A>
__device__ __forceinline__ void block_sum(A (&v)[NV], A* sm /* kWarps * NV */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < NV; ++j)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[j] += __shfl_down_sync(0xffffffffu, v[j], o);
  __syncthreads();   // sm may still be read by a previous call
  if (lane == 0)
#pragma unroll
    for (int j = 0; j < NV; ++j) sm[j * kWarps + warp] = v[j];
  __syncthreads();
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    A t = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) t += sm[j * kWarps + w];
    v[j] = t;
  }
}

template <typename T>
struct Args {
  using A = typename AccT<T>::type;
  const T* x;
  T* y;          // forward: y; backward: dx
  const T* dy;   // backward only
  L4 lx, ly, ldy;
  const A* w;
  const A* bias;
  A* m;          // (B, C): written by the forward, read by the backward
  A* mu;         // (B, G)
  A* sd;         // (B, G)
  A* ws;         // workspace (layouts in fwd_ws / bwd_ws)
  int64_t B, C, G, Cg, N, W;
  int64_t S, seg;   // segments per slab, positions per segment (a multiple of 8)
  A eps;
};

// ---------------------------------------------------------------------------------------------
// Block-level steps on one slab (b, g): xs/ys/dys point at sample b, c0 = g * Cg
// ---------------------------------------------------------------------------------------------

// xn[v] = sum_j x[c0 + j, p + v] m[j] (and ds[v] = sum_j dy x when kDs) for the PP positions of a unit.
template <bool kDs, int K, int VEC, typename T, typename A>
__device__ __forceinline__ void unit_dots(const T* __restrict__ xs, const L4& lx, const T* __restrict__ dys,
                                          const L4& ldy, int64_t W, int64_t c0, int64_t Cg, const A* m, int64_t p,
                                          A (&xn)[Geo<K, VEC>::PP], A (&ds)[Geo<K, VEC>::PP]) {
  constexpr int PP = Geo<K, VEC>::PP, CV = Geo<K, VEC>::CV, NV = PP * CV;
  constexpr int kFold = kFoldChannels / CV > 0 ? kFoldChannels / CV : 1;
  A bx[PP], bd[PP];
#pragma unroll
  for (int v = 0; v < PP; ++v) xn[v] = ds[v] = bx[v] = bd[v] = A(0);
  int cnt = 0;
  for (int64_t j = 0; j < Cg; j += CV) {
    A xv[NV], dv[NV];
    load_n<NV>(xs + offs<K>(lx, c0 + j, p, W), xv);
    if constexpr (kDs) load_n<NV>(dys + offs<K>(ldy, c0 + j, p, W), dv);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int v = PP == 1 ? 0 : i;
      bx[v] += xv[i] * m[j + (CV == 1 ? 0 : i)];
      if constexpr (kDs) bd[v] += dv[i] * xv[i];
    }
    if (++cnt == kFold) {   // partial sums over ~16 channels: error growth ~16 + Cg / 16 roundings
      cnt = 0;
#pragma unroll
      for (int v = 0; v < PP; ++v) {
        xn[v] += bx[v];
        ds[v] += bd[v];
        bx[v] = bd[v] = A(0);
      }
    }
  }
#pragma unroll
  for (int v = 0; v < PP; ++v) {
    xn[v] += bx[v];
    ds[v] += bd[v];
  }
}

// acc[q * Cg + j] += sum over positions p0 .. p0 + n - 1 of f_q(p) (x[c0 + j, p] - centre_j):
// NQ = 1: f = 1, no centring (channel sums); NQ = 3: f = w1[p - p0], w2[p - p0], 1 and centre m[j].
// Each acc entry is owned by one thread (no races); callers sync before reading it. red: shared
// scratch of kThreads * NQ * CV values (kChan) or kWarps * NQ (the others). Every thread of the
// block must call it (it may hold barriers).
template <int NQ, int K, int VEC, typename T, typename A>
__device__ void chan_reduce(const T* __restrict__ xs, const L4& lx, int64_t W, int64_t c0, int64_t Cg, int64_t p0,
                            int64_t n, const A* w1, const A* w2, const A* m, A* acc, A* red) {
  constexpr int PP = Geo<K, VEC>::PP, CV = Geo<K, VEC>::CV, NV = PP * CV;
  const int tid = threadIdx.x;
  if constexpr (K != kChan) {
    // wpc warps per channel (all warps busy when Cg < kWarps), lanes along positions; the wpc warps'
    // sums of a channel meet in red (kWarps * NQ values) and are added in warp order.
    const int lane = tid & 31, warp = tid >> 5;
    const int wpc = Cg < kWarps ? kWarps / static_cast<int>(Cg) : 1;
    const int sub = warp % wpc, slots = kWarps / wpc;
    for (int64_t jb = 0; jb < Cg; jb += slots) {
      const int64_t j = jb + warp / wpc;
      const bool active = warp / wpc < slots && j < Cg;
      A s[NQ];
#pragma unroll
      for (int q = 0; q < NQ; ++q) s[q] = A(0);
      if (active) {
        const A mc = NQ == 3 ? m[j] : A(0);
#pragma unroll 4
        for (int64_t u = sub * 32 + lane; u < n / PP; u += 32 * wpc) {
          A xv[NV];
          load_n<NV>(xs + offs<K>(lx, c0 + j, p0 + u * PP, W), xv);
#pragma unroll
          for (int i = 0; i < NV; ++i) {
            if constexpr (NQ == 1) {
              s[0] += xv[i];
            } else {
              const A xc = xv[i] - mc;
              s[0] += w1[u * PP + i] * xc;
              s[1] += w2[u * PP + i] * xc;
              s[2] += xc;
            }
          }
        }
      }
#pragma unroll
      for (int q = 0; q < NQ; ++q)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s[q] += __shfl_down_sync(0xffffffffu, s[q], o);
      if (wpc == 1) {
        if (active && lane == 0)
#pragma unroll
          for (int q = 0; q < NQ; ++q) acc[q * Cg + j] += s[q];
      } else {
        __syncthreads();   // red may still be read by the previous round
        if (lane == 0)
#pragma unroll
          for (int q = 0; q < NQ; ++q) red[warp * NQ + q] = s[q];
        __syncthreads();
        if (sub == 0 && active && lane == 0)
#pragma unroll
          for (int q = 0; q < NQ; ++q) {
            A t = 0;
            for (int w = 0; w < wpc; ++w) t += red[(warp + w) * NQ + q];
            acc[q * Cg + j] += t;
          }
      }
    }
  } else {   // threads in (row, column): rows walk the positions, columns the channel vectors
    const int64_t cols = Cg / CV;
    for (int64_t cb = 0; cb < cols; cb += kThreads) {
      const int nc = static_cast<int>(imin(kThreads, cols - cb));
      const int rows = kThreads / nc;
      const int col = tid % nc, row = tid / nc;
      A s[NQ][CV];
#pragma unroll
      for (int q = 0; q < NQ; ++q)
#pragma unroll
        for (int v = 0; v < CV; ++v) s[q][v] = A(0);
      if (row < rows) {
        const int64_t jc = (cb + col) * CV;
        A mc[CV];
#pragma unroll
        for (int v = 0; v < CV; ++v) mc[v] = NQ == 3 ? m[jc + v] : A(0);
        for (int64_t i = row; i < n; i += rows) {
          A xv[CV];
          load_n<CV>(xs + (c0 + jc) + (p0 + i) * lx.p, xv);
#pragma unroll
          for (int v = 0; v < CV; ++v) {
            if constexpr (NQ == 1) {
              s[0][v] += xv[v];
            } else {
              const A xc = xv[v] - mc[v];
              s[0][v] += w1[i] * xc;
              s[1][v] += w2[i] * xc;
              s[2][v] += xc;
            }
          }
        }
      }
      __syncthreads();   // red may still be read by the previous column block
      if (row < rows)
#pragma unroll
        for (int q = 0; q < NQ; ++q)
#pragma unroll
          for (int v = 0; v < CV; ++v) red[(row * nc + col) * (NQ * CV) + q * CV + v] = s[q][v];
      __syncthreads();
      if (tid < nc) {
        const int64_t jc = (cb + tid) * CV;
#pragma unroll
        for (int q = 0; q < NQ; ++q)
#pragma unroll
          for (int v = 0; v < CV; ++v) {
            A t = 0;
            for (int r = 0; r < rows; ++r) t += red[(r * nc + tid) * (NQ * CV) + q * CV + v];
            acc[q * Cg + jc + v] += t;
          }
      }
    }
  }
}

// Forward step (2) over positions [p0, p1): out = {sum d, sum d^2}, d = xn - c0 (block totals).
template <int K, int VEC, typename T, typename A>
__device__ void xn_stats(const Args<T>& a, const T* xs, int64_t c0, const A* m, A shift, int64_t p0, int64_t p1,
                         A (&st)[2], A* sm) {
  constexpr int PP = Geo<K, VEC>::PP;
  st[0] = st[1] = A(0);
  for (int64_t u = p0 / PP + threadIdx.x; u < p1 / PP; u += kThreads) {
    A xn[PP], ds[PP];
    unit_dots<false, K, VEC>(xs, a.lx, xs, a.lx, a.W, c0, a.Cg, m, u * PP, xn, ds);
#pragma unroll
    for (int v = 0; v < PP; ++v) {
      const A d = xn[v] - shift;
      st[0] += d;
      st[1] += d * d;
    }
  }
  block_sum<2>(st, sm);
}

// Forward step (3) over positions [p0, p1): y = x * s.
template <int K, int VEC, typename T, typename A>
__device__ void gate_range(const Args<T>& a, const T* xs, T* ys, int64_t g, int64_t c0, const A* m, A mu, A sd,
                           int64_t p0, int64_t p1) {
  constexpr int PP = Geo<K, VEC>::PP, CV = Geo<K, VEC>::CV, NV = PP * CV;
  const A r = A(1) / (sd + a.eps), w = a.w[g], bias = a.bias[g];
  for (int64_t u = p0 / PP + threadIdx.x; u < p1 / PP; u += kThreads) {
    const int64_t p = u * PP;
    A xn[PP], ds[PP], s[PP];
    unit_dots<false, K, VEC>(xs, a.lx, xs, a.lx, a.W, c0, a.Cg, m, p, xn, ds);
#pragma unroll
    for (int v = 0; v < PP; ++v) s[v] = sigmoid_acc(w * ((xn[v] - mu) * r) + bias);
    for (int64_t j = 0; j < a.Cg; j += CV) {
      A xv[NV];
      load_n<NV>(xs + offs<K>(a.lx, c0 + j, p, a.W), xv);
#pragma unroll
      for (int i = 0; i < NV; ++i) xv[i] *= s[PP == 1 ? 0 : i];
      store_n<NV>(ys + offs<K>(a.ly, c0 + j, p, a.W), xv);
    }
  }
}

// Backward step (A) on the tile [t0, t0 + n): per position dt0 -> w1s, d -> w2s; g5 += the group
// sums {dt0, dt0 d, dt t0, dt, d} (per thread).
template <int K, int VEC, typename T, typename A>
__device__ void bwd_tile(const Args<T>& a, const T* xs, const T* dys, int64_t bg, int64_t g, int64_t c0, const A* m,
                         int64_t t0, int64_t n, A* w1s, A* w2s, A (&g5)[5]) {
  constexpr int PP = Geo<K, VEC>::PP;
  const A mu = a.mu[bg], sd = a.sd[bg], r = A(1) / (sd + a.eps), w = a.w[g], bias = a.bias[g];
  for (int64_t u = threadIdx.x; u < n / PP; u += kThreads) {
    A xn[PP], ds[PP];
    unit_dots<true, K, VEC>(xs, a.lx, dys, a.ldy, a.W, c0, a.Cg, m, t0 + u * PP, xn, ds);
#pragma unroll
    for (int v = 0; v < PP; ++v) {
      const A d = xn[v] - mu;
      const A tn = d * r;
      const A s = sigmoid_acc(w * tn + bias);
      const A dt = ds[v] * s * (A(1) - s);
      const A dt0 = w * dt;
      g5[0] += dt0;
      g5[1] += dt0 * d;
      g5[2] += dt * tn;
      g5[3] += dt;
      g5[4] += d;
      w1s[u * PP + v] = dt0;
      w2s[u * PP + v] = d;
    }
  }
}

// Backward step (B) over positions [p0, p1): dx = dy s + dxn m[j] + dmn[j], dxn = r (dt0 - mdt0) - k d.
template <int K, int VEC, typename T, typename A>
__device__ void dx_range(const Args<T>& a, const T* xs, const T* dys, T* dxs, int64_t bg, int64_t g, int64_t c0,
                         const A* m, const A* dmn, A mdt0, A k, int64_t p0, int64_t p1) {
  constexpr int PP = Geo<K, VEC>::PP, CV = Geo<K, VEC>::CV, NV = PP * CV;
  const A mu = a.mu[bg], sd = a.sd[bg], r = A(1) / (sd + a.eps), w = a.w[g], bias = a.bias[g];
  for (int64_t u = p0 / PP + threadIdx.x; u < p1 / PP; u += kThreads) {
    const int64_t p = u * PP;
    A xn[PP], ds[PP], s[PP], e[PP];
    unit_dots<true, K, VEC>(xs, a.lx, dys, a.ldy, a.W, c0, a.Cg, m, p, xn, ds);
#pragma unroll
    for (int v = 0; v < PP; ++v) {
      const A d = xn[v] - mu;
      s[v] = sigmoid_acc(w * (d * r) + bias);
      const A dt0 = w * (ds[v] * s[v] * (A(1) - s[v]));
      e[v] = r * (dt0 - mdt0) - k * d;
    }
    for (int64_t j = 0; j < a.Cg; j += CV) {
      A gv[NV];
      load_n<NV>(dys + offs<K>(a.ldy, c0 + j, p, a.W), gv);
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int v = PP == 1 ? 0 : i;
        const int64_t jj = j + (CV == 1 ? 0 : i);
        gv[i] = gv[i] * s[v] + e[v] * m[jj] + dmn[jj];
      }
      store_n<NV>(dxs + offs<K>(a.ly, c0 + j, p, a.W), gv);
    }
  }
}

// {mean_p dt0, k} from the slab's group sums g5; k = 0 when sd = 0 (torch's std backward masks it).
template <typename A>
__device__ __forceinline__ void dm_coefs(const A (&g5)[5], A sd, A eps, int64_t N, A& mdt0, A& k) {
  const A r = A(1) / (sd + eps);
  mdt0 = g5[0] / A(N);
  k = sd > A(0) ? r * r * g5[1] / (A(N - 1) * sd) : A(0);
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// Fused forward: one block per slab (b, g).
template <int K, int VEC, typename T>
__global__ void __launch_bounds__(kThreads) sge_fwd_fused(Args<T> a) {
  using A = typename AccT<T>::type;
  constexpr int CV = Geo<K, VEC>::CV;
  __shared__ A sm[kWarps * 2];
  __shared__ A red[K == kChan ? kThreads * CV : kWarps];
  const int64_t bg = blockIdx.x, b = bg / a.G, g = bg % a.G, c0 = g * a.Cg;
  const T* xs = a.x + b * a.lx.b;
  T* ys = a.y + b * a.ly.b;
  A* m = a.m + b * a.C + c0;
  for (int64_t j = threadIdx.x; j < a.Cg; j += kThreads) m[j] = A(0);
  __syncthreads();
  chan_reduce<1, K, VEC>(xs, a.lx, a.W, c0, a.Cg, 0, a.N, static_cast<const A*>(nullptr),
                         static_cast<const A*>(nullptr), static_cast<const A*>(nullptr), m, red);
  __syncthreads();
  A v[1] = {A(0)};
  for (int64_t j = threadIdx.x; j < a.Cg; j += kThreads) {
    const A mean = m[j] / A(a.N);
    m[j] = mean;
    v[0] += mean * mean;
  }
  block_sum<1>(v, sm);   // its barriers publish m to the block
  const A shift = v[0];
  A st[2];
  xn_stats<K, VEC>(a, xs, c0, m, shift, 0, a.N, st, sm);
  const A md = st[0] / A(a.N);
  const A mu = shift + md;
  const A var = (st[1] - st[0] * md) / A(a.N - 1);
  const A sd = sqrt(var > A(0) ? var : A(0));
  if (threadIdx.x == 0) {
    a.mu[bg] = mu;
    a.sd[bg] = sd;
  }
  gate_range<K, VEC>(a, xs, ys, g, c0, m, mu, sd, 0, a.N);
}

// Split forward (1): channel sums of one segment -> ws[(bg * S + s) * Cg + j].
template <int K, int VEC, typename T>
__global__ void __launch_bounds__(kThreads) sge_fwd_sums(Args<T> a) {
  using A = typename AccT<T>::type;
  constexpr int CV = Geo<K, VEC>::CV;
  __shared__ A red[K == kChan ? kThreads * CV : kWarps];
  const int64_t bs = blockIdx.x, bg = bs / a.S, s = bs % a.S;
  const int64_t b = bg / a.G, c0 = (bg % a.G) * a.Cg;
  const int64_t p0 = s * a.seg, p1 = imin(a.N, p0 + a.seg);
  A* acc = a.ws + bs * a.Cg;
  for (int64_t j = threadIdx.x; j < a.Cg; j += kThreads) acc[j] = A(0);
  __syncthreads();
  chan_reduce<1, K, VEC>(a.x + b * a.lx.b, a.lx, a.W, c0, a.Cg, p0, p1 - p0, static_cast<const A*>(nullptr),
                         static_cast<const A*>(nullptr), static_cast<const A*>(nullptr), acc, red);
}

// Split forward: m from the segments' sums, and the shift sum m^2 -> ws_shift[bg]. One block per slab.
template <typename A>
__global__ void __launch_bounds__(kThreads) sge_fwd_means(const A* __restrict__ part, A* __restrict__ m,
                                                          A* __restrict__ shift, int64_t C, int64_t G, int64_t Cg,
                                                          int64_t N, int64_t S) {
  __shared__ A sm[kWarps];
  const int64_t bg = blockIdx.x, b = bg / G, c0 = (bg % G) * Cg;
  A v[1] = {A(0)};
  for (int64_t j = threadIdx.x; j < Cg; j += kThreads) {
    A t = 0;
    for (int64_t s = 0; s < S; ++s) t += part[(bg * S + s) * Cg + j];
    const A mean = t / A(N);
    m[b * C + c0 + j] = mean;
    v[0] += mean * mean;
  }
  block_sum<1>(v, sm);
  if (threadIdx.x == 0) shift[bg] = v[0];
}

// Split forward (2): {sum d, sum d^2} of one segment -> part2[(bg * S + s) * 2 + i].
template <int K, int VEC, typename T>
__global__ void __launch_bounds__(kThreads) sge_fwd_stats(Args<T> a, const typename AccT<T>::type* shift,
                                                          typename AccT<T>::type* part2) {
  using A = typename AccT<T>::type;
  __shared__ A sm[kWarps * 2];
  const int64_t bs = blockIdx.x, bg = bs / a.S, s = bs % a.S;
  const int64_t b = bg / a.G, c0 = (bg % a.G) * a.Cg;
  const int64_t p0 = s * a.seg, p1 = imin(a.N, p0 + a.seg);
  A st[2];
  xn_stats<K, VEC>(a, a.x + b * a.lx.b, c0, a.m + b * a.C + c0, shift[bg], p0, p1, st, sm);
  if (threadIdx.x == 0) {
    part2[bs * 2] = st[0];
    part2[bs * 2 + 1] = st[1];
  }
}

// Split forward: mu and sd from the segments' shifted sums. One thread per slab.
template <typename A>
__global__ void sge_fwd_finish_stats(const A* __restrict__ part2, const A* __restrict__ shift, A* __restrict__ mu,
                                     A* __restrict__ sd, int64_t BG, int64_t N, int64_t S) {
  const int64_t bg = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bg >= BG) return;
  A s1 = 0, s2 = 0;
  for (int64_t s = 0; s < S; ++s) {
    s1 += part2[(bg * S + s) * 2];
    s2 += part2[(bg * S + s) * 2 + 1];
  }
  const A md = s1 / A(N);
  const A var = (s2 - s1 * md) / A(N - 1);
  mu[bg] = shift[bg] + md;
  sd[bg] = sqrt(var > A(0) ? var : A(0));
}

// Split forward (3): the gate on one segment.
template <int K, int VEC, typename T>
__global__ void __launch_bounds__(kThreads) sge_fwd_gate(Args<T> a) {
  const int64_t bs = blockIdx.x, bg = bs / a.S, s = bs % a.S;
  const int64_t b = bg / a.G, g = bg % a.G, c0 = g * a.Cg;
  const int64_t p0 = s * a.seg, p1 = imin(a.N, p0 + a.seg);
  gate_range<K, VEC>(a, a.x + b * a.lx.b, a.y + b * a.ly.b, g, c0, a.m + b * a.C + c0, a.mu[bg], a.sd[bg], p0, p1);
}

// Backward step (A) over the positions [p0, p1) of slab bg: acc3 (3 * Cg, zeroed here) and the block
// totals g5. Shared: the tile's per-position weights and the kChan scratch.
template <int K, int VEC, typename T, typename A>
__device__ void bwd_sums_range(const Args<T>& a, int64_t bg, int64_t p0, int64_t p1, A* acc3, A (&g5)[5], A* w1s,
                               A* w2s, A* red, A* sm) {
  constexpr int TP = kThreads * Geo<K, VEC>::PP;
  const int64_t b = bg / a.G, g = bg % a.G, c0 = g * a.Cg;
  const T* xs = a.x + b * a.lx.b;
  const T* dys = a.dy + b * a.ldy.b;
  const A* m = a.m + b * a.C + c0;
  for (int64_t j = threadIdx.x; j < 3 * a.Cg; j += kThreads) acc3[j] = A(0);
#pragma unroll
  for (int i = 0; i < 5; ++i) g5[i] = A(0);
  __syncthreads();
  for (int64_t t0 = p0; t0 < p1; t0 += TP) {
    const int64_t n = imin(TP, p1 - t0);
    bwd_tile<K, VEC>(a, xs, dys, bg, g, c0, m, t0, n, w1s, w2s, g5);
    __syncthreads();
    chan_reduce<3, K, VEC>(xs, a.lx, a.W, c0, a.Cg, t0, n, w1s, w2s, m, acc3, red);
    __syncthreads();   // the next tile overwrites w1s / w2s
  }
  block_sum<5>(g5, sm);
}

// Fused backward: one block per slab. ws: acc3 (BG x 3 x Cg, then dm / N in its first Cg entries),
// dwb (BG x 2) at ws + BG * 3 * Cg.
template <int K, int VEC, typename T>
__global__ void __launch_bounds__(kThreads) sge_bwd_fused(Args<T> a) {
  using A = typename AccT<T>::type;
  constexpr int PP = Geo<K, VEC>::PP, CV = Geo<K, VEC>::CV, TP = kThreads * PP;
  __shared__ A w1s[TP], w2s[TP];
  __shared__ A red[K == kChan ? kThreads * 3 * CV : kWarps * 3];
  __shared__ A sm[kWarps * 5];
  const int64_t bg = blockIdx.x, BG = static_cast<int64_t>(gridDim.x);
  const int64_t b = bg / a.G, g = bg % a.G, c0 = g * a.Cg;
  A* acc3 = a.ws + bg * 3 * a.Cg;
  A g5[5];
  bwd_sums_range<K, VEC>(a, bg, 0, a.N, acc3, g5, w1s, w2s, red, sm);
  A mdt0, k;
  dm_coefs(g5, a.sd[bg], a.eps, a.N, mdt0, k);
  const A r = A(1) / (a.sd[bg] + a.eps);
  const A* m = a.m + b * a.C + c0;
  for (int64_t j = threadIdx.x; j < a.Cg; j += kThreads) {   // each thread its own entries
    const A dm = r * (acc3[j] - mdt0 * acc3[2 * a.Cg + j]) - k * (acc3[a.Cg + j] + m[j] * g5[4]);
    acc3[j] = dm / A(a.N);
  }
  if (threadIdx.x == 0) {
    A* dwb = a.ws + BG * 3 * a.Cg;
    dwb[bg * 2] = g5[2];
    dwb[bg * 2 + 1] = g5[3];
  }
  __syncthreads();
  dx_range<K, VEC>(a, a.x + b * a.lx.b, a.dy + b * a.ldy.b, a.y + b * a.ly.b, bg, g, c0, m, acc3, mdt0, k, 0, a.N);
}

// Split backward (A): one block per (slab, segment). part3: (BG, S, 3, Cg); partg: (BG, S, 5).
template <int K, int VEC, typename T>
__global__ void __launch_bounds__(kThreads) sge_bwd_sums(Args<T> a, typename AccT<T>::type* part3,
                                                         typename AccT<T>::type* partg) {
  using A = typename AccT<T>::type;
  constexpr int PP = Geo<K, VEC>::PP, CV = Geo<K, VEC>::CV, TP = kThreads * PP;
  __shared__ A w1s[TP], w2s[TP];
  __shared__ A red[K == kChan ? kThreads * 3 * CV : kWarps * 3];
  __shared__ A sm[kWarps * 5];
  const int64_t bs = blockIdx.x, bg = bs / a.S, s = bs % a.S;
  const int64_t p0 = s * a.seg, p1 = imin(a.N, p0 + a.seg);
  A g5[5];
  bwd_sums_range<K, VEC>(a, bg, p0, p1, part3 + bs * 3 * a.Cg, g5, w1s, w2s, red, sm);
  if (threadIdx.x == 0)
#pragma unroll
    for (int i = 0; i < 5; ++i) partg[bs * 5 + i] = g5[i];
}

// Split backward: per slab (one block) the totals over segments -> coef (BG, 2) = {mean dt0, k},
// dmn (BG, Cg) = dm / N, dwb (BG, 2).
template <typename A>
__global__ void __launch_bounds__(kThreads) sge_bwd_finish(const A* __restrict__ part3, const A* __restrict__ partg,
                                                           const A* __restrict__ m, const A* __restrict__ sd,
                                                           A* __restrict__ coef, A* __restrict__ dmn,
                                                           A* __restrict__ dwb, int64_t C, int64_t G, int64_t Cg,
                                                           int64_t N, int64_t S, A eps) {
  const int64_t bg = blockIdx.x, b = bg / G, c0 = (bg % G) * Cg;
  A g5[5] = {A(0), A(0), A(0), A(0), A(0)};
  for (int64_t s = 0; s < S; ++s)
#pragma unroll
    for (int i = 0; i < 5; ++i) g5[i] += partg[(bg * S + s) * 5 + i];
  A mdt0, k;
  dm_coefs(g5, sd[bg], eps, N, mdt0, k);
  const A r = A(1) / (sd[bg] + eps);
  for (int64_t j = threadIdx.x; j < Cg; j += kThreads) {
    A P = 0, Q = 0, R = 0;
    for (int64_t s = 0; s < S; ++s) {
      const A* q = part3 + (bg * S + s) * 3 * Cg;
      P += q[j];
      Q += q[Cg + j];
      R += q[2 * Cg + j];
    }
    dmn[bg * Cg + j] = (r * (P - mdt0 * R) - k * (Q + m[b * C + c0 + j] * g5[4])) / A(N);
  }
  if (threadIdx.x == 0) {
    coef[bg * 2] = mdt0;
    coef[bg * 2 + 1] = k;
    dwb[bg * 2] = g5[2];
    dwb[bg * 2 + 1] = g5[3];
  }
}

// Split backward (B): dx on one segment.
template <int K, int VEC, typename T>
__global__ void __launch_bounds__(kThreads) sge_bwd_dx(Args<T> a, const typename AccT<T>::type* coef,
                                                       const typename AccT<T>::type* dmn) {
  const int64_t bs = blockIdx.x, bg = bs / a.S, s = bs % a.S;
  const int64_t b = bg / a.G, g = bg % a.G, c0 = g * a.Cg;
  const int64_t p0 = s * a.seg, p1 = imin(a.N, p0 + a.seg);
  dx_range<K, VEC>(a, a.x + b * a.lx.b, a.dy + b * a.ldy.b, a.y + b * a.ly.b, bg, g, c0, a.m + b * a.C + c0,
                   dmn + bg * a.Cg, coef[bg * 2], coef[bg * 2 + 1], p0, p1);
}

// dweight[g], dbias[g] = the per-slab values summed over the batch in order.
template <typename A>
__global__ void sge_param_grads(const A* __restrict__ dwb, A* __restrict__ dweight, A* __restrict__ dbias, int64_t B,
                                int64_t G) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= G) return;
  A tw = 0, tb = 0;
  for (int64_t b = 0; b < B; ++b) {
    tw += dwb[(b * G + g) * 2];
    tb += dwb[(b * G + g) * 2 + 1];
  }
  dweight[g] = tw;
  dbias[g] = tb;
}

// ---------------------------------------------------------------------------------------------
// Host side: plan (shape only), layout choice, launches
// ---------------------------------------------------------------------------------------------

struct Plan {
  int64_t S, seg;
};

// Segments per slab: 1 when the slabs fill the device, else enough for ~512 blocks, each at least
// kMinSegElems elements; segment lengths a multiple of 8 positions (any vector width divides them).
Plan make_plan(int64_t B, int64_t G, int64_t Cg, int64_t N) {
  const int64_t BG = B * G;
  int64_t S = 1;
  if (BG > 0 && BG < kMinBlocks) {
    const int64_t want = (512 + BG - 1) / BG;
    const int64_t min_pix = std::max<int64_t>(256, kMinSegElems / std::max<int64_t>(Cg, 1));
    S = std::max<int64_t>(1, std::min(want, N / min_pix));
  }
  if (S == 1) return {1, N};
  int64_t seg = (N + S - 1) / S;
  seg = (seg + 7) / 8 * 8;
  return {(N + seg - 1) / seg, seg};
}

L4 make_l4(const Strides4& s, int64_t H, int64_t W, bool& flat) {
  L4 l{s.b, s.c, s.h, s.w, 1};
  flat = true;
  if (H * W <= 1) l.p = 1;
  else if (H == 1) l.p = s.w;
  else if (W == 1) l.p = s.h;
  else if (s.h == W * s.w) l.p = s.w;
  else flat = false;
  return l;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

size_t fwd_ws_elems(const Plan& pl, int64_t BG, int64_t Cg) {
  return pl.S == 1 ? 0 : static_cast<size_t>(BG * pl.S * Cg + BG + BG * pl.S * 2);
}
size_t bwd_ws_elems(const Plan& pl, int64_t BG, int64_t Cg) {
  if (pl.S == 1) return static_cast<size_t>(BG * 3 * Cg + BG * 2);
  return static_cast<size_t>(BG * pl.S * 3 * Cg + BG * pl.S * 5 + BG * 2 + BG * Cg + BG * 2);
}

template <int K, int VEC, typename T>
cudaError_t launch_fwd(const Args<T>& a, cudaStream_t stream) {
  using A = typename AccT<T>::type;
  const int64_t BG = a.B * a.G;
  if (BG * a.S > kMaxGridX) return cudaErrorInvalidConfiguration;
  if (a.S == 1) {
    sge_fwd_fused<K, VEC, T><<<static_cast<unsigned>(BG), kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  }
  const unsigned blocks = static_cast<unsigned>(BG * a.S);
  A* part1 = a.ws;
  A* shift = part1 + BG * a.S * a.Cg;
  A* part2 = shift + BG;
  Args<T> a1 = a;
  a1.ws = part1;
  sge_fwd_sums<K, VEC, T><<<blocks, kThreads, 0, stream>>>(a1);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  sge_fwd_means<A><<<static_cast<unsigned>(BG), kThreads, 0, stream>>>(part1, a.m, shift, a.C, a.G, a.Cg, a.N, a.S);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  sge_fwd_stats<K, VEC, T><<<blocks, kThreads, 0, stream>>>(a, shift, part2);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  sge_fwd_finish_stats<A><<<static_cast<unsigned>((BG + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      part2, shift, a.mu, a.sd, BG, a.N, a.S);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  sge_fwd_gate<K, VEC, T><<<blocks, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <int K, int VEC, typename T>
cudaError_t launch_bwd(const Args<T>& a, typename AccT<T>::type* dweight, typename AccT<T>::type* dbias,
                       cudaStream_t stream) {
  using A = typename AccT<T>::type;
  const int64_t BG = a.B * a.G;
  if (BG * a.S > kMaxGridX) return cudaErrorInvalidConfiguration;
  cudaError_t err;
  A* dwb;
  if (a.S == 1) {
    sge_bwd_fused<K, VEC, T><<<static_cast<unsigned>(BG), kThreads, 0, stream>>>(a);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    dwb = a.ws + BG * 3 * a.Cg;
  } else {
    const unsigned blocks = static_cast<unsigned>(BG * a.S);
    A* part3 = a.ws;
    A* partg = part3 + BG * a.S * 3 * a.Cg;
    A* coef = partg + BG * a.S * 5;
    A* dmn = coef + BG * 2;
    dwb = dmn + BG * a.Cg;
    sge_bwd_sums<K, VEC, T><<<blocks, kThreads, 0, stream>>>(a, part3, partg);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    sge_bwd_finish<A><<<static_cast<unsigned>(BG), kThreads, 0, stream>>>(part3, partg, a.m, a.sd, coef, dmn, dwb,
                                                                           a.C, a.G, a.Cg, a.N, a.S, a.eps);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    sge_bwd_dx<K, VEC, T><<<blocks, kThreads, 0, stream>>>(a, coef, dmn);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  sge_param_grads<A><<<static_cast<unsigned>((a.G + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      dwb, dweight, dbias, a.B, a.G);
  return cudaGetLastError();
}

// The layout kind of a set of tensors (all must qualify) and whether 16-byte vectors apply.
struct Choice {
  int kind;
  bool vec;
};

Choice choose(const L4* ls, const bool* flats, const void* const* ptrs, int n, int64_t C, int64_t Cg, int64_t N,
              int vec) {
  bool all_flat = true, plane = true, chan = true;
  for (int i = 0; i < n; ++i) {
    all_flat = all_flat && flats[i];
    plane = plane && ls[i].p == 1;
    chan = chan && (ls[i].c == 1 || C == 1);
  }
  if (!all_flat) return {kAny, false};
  if (plane) {
    bool v = N % vec == 0;
    for (int i = 0; i < n; ++i) v = v && aligned16(ptrs[i]) && ls[i].b % vec == 0 && ls[i].c % vec == 0;
    return {kPlane, v};
  }
  if (chan) {
    bool v = Cg % vec == 0;
    for (int i = 0; i < n; ++i) v = v && aligned16(ptrs[i]) && ls[i].b % vec == 0 && ls[i].p % vec == 0;
    return {kChan, v};
  }
  return {kAny, false};
}

template <typename T>
cudaError_t forward_typed(const void* x, const void* weight, const void* bias, void* y, void* m, void* mu, void* sd,
                          int64_t B, int64_t C, int64_t H, int64_t W, int64_t G, double eps, Strides4 sx,
                          Strides4 sy, void* ws, size_t ws_bytes, cudaStream_t stream) {
  using A = typename AccT<T>::type;
  constexpr int V = 16 / sizeof(T);
  const int64_t Cg = C / G, N = H * W;
  const Plan pl = make_plan(B, G, Cg, N);
  if (ws_bytes < fwd_ws_elems(pl, B * G, Cg) * sizeof(A)) return cudaErrorInvalidValue;
  bool fx, fy;
  Args<T> a{};
  a.x = static_cast<const T*>(x);
  a.y = static_cast<T*>(y);
  a.lx = make_l4(sx, H, W, fx);
  a.ly = make_l4(sy, H, W, fy);
  a.ldy = a.lx;
  a.w = static_cast<const A*>(weight);
  a.bias = static_cast<const A*>(bias);
  a.m = static_cast<A*>(m);
  a.mu = static_cast<A*>(mu);
  a.sd = static_cast<A*>(sd);
  a.ws = static_cast<A*>(ws);
  a.B = B, a.C = C, a.G = G, a.Cg = Cg, a.N = N, a.W = W;
  a.S = pl.S, a.seg = pl.seg;
  a.eps = static_cast<A>(eps);
  const L4 ls[2] = {a.lx, a.ly};
  const bool flats[2] = {fx, fy};
  const void* ptrs[2] = {x, y};
  const Choice ch = choose(ls, flats, ptrs, 2, C, Cg, N, V);
  if (ch.kind == kPlane) return ch.vec ? launch_fwd<kPlane, V>(a, stream) : launch_fwd<kPlane, 1>(a, stream);
  if (ch.kind == kChan) return ch.vec ? launch_fwd<kChan, V>(a, stream) : launch_fwd<kChan, 1>(a, stream);
  return launch_fwd<kAny, 1>(a, stream);
}

template <typename T>
cudaError_t backward_typed(const void* dy, const void* x, const void* weight, const void* bias, const void* m,
                           const void* mu, const void* sd, void* dx, void* dweight, void* dbias, int64_t B, int64_t C,
                           int64_t H, int64_t W, int64_t G, double eps, Strides4 sdy, Strides4 sx, Strides4 sdx,
                           void* ws, size_t ws_bytes, cudaStream_t stream) {
  using A = typename AccT<T>::type;
  constexpr int V = 16 / sizeof(T);
  const int64_t Cg = C / G, N = H * W;
  const Plan pl = make_plan(B, G, Cg, N);
  if (ws_bytes < bwd_ws_elems(pl, B * G, Cg) * sizeof(A)) return cudaErrorInvalidValue;
  bool fx, fdx, fdy;
  Args<T> a{};
  a.x = static_cast<const T*>(x);
  a.y = static_cast<T*>(dx);
  a.dy = static_cast<const T*>(dy);
  a.lx = make_l4(sx, H, W, fx);
  a.ly = make_l4(sdx, H, W, fdx);
  a.ldy = make_l4(sdy, H, W, fdy);
  a.w = static_cast<const A*>(weight);
  a.bias = static_cast<const A*>(bias);
  // read only in the backward kernels
  a.m = const_cast<A*>(static_cast<const A*>(m));
  a.mu = const_cast<A*>(static_cast<const A*>(mu));
  a.sd = const_cast<A*>(static_cast<const A*>(sd));
  a.ws = static_cast<A*>(ws);
  a.B = B, a.C = C, a.G = G, a.Cg = Cg, a.N = N, a.W = W;
  a.S = pl.S, a.seg = pl.seg;
  a.eps = static_cast<A>(eps);
  const L4 ls[3] = {a.lx, a.ly, a.ldy};
  const bool flats[3] = {fx, fdx, fdy};
  const void* ptrs[3] = {x, dx, dy};
  const Choice ch = choose(ls, flats, ptrs, 3, C, Cg, N, V);
  A* dw = static_cast<A*>(dweight);
  A* db = static_cast<A*>(dbias);
  if (ch.kind == kPlane) return ch.vec ? launch_bwd<kPlane, V>(a, dw, db, stream) : launch_bwd<kPlane, 1>(a, dw, db, stream);
  if (ch.kind == kChan) return ch.vec ? launch_bwd<kChan, V>(a, dw, db, stream) : launch_bwd<kChan, 1>(a, dw, db, stream);
  return launch_bwd<kAny, 1>(a, dw, db, stream);
}

size_t acc_size(DType dtype) { return dtype == DType::Float64 ? sizeof(double) : sizeof(float); }

}  // namespace

size_t sge_forward_workspace_cuda(DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, int64_t G) {
  const Plan pl = make_plan(B, G, C / G, H * W);
  return fwd_ws_elems(pl, B * G, C / G) * acc_size(dtype);
}

size_t sge_backward_workspace_cuda(DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, int64_t G) {
  const Plan pl = make_plan(B, G, C / G, H * W);
  return bwd_ws_elems(pl, B * G, C / G) * acc_size(dtype);
}

cudaError_t sge_forward_cuda(const void* x, const void* weight, const void* bias, void* y, void* m, void* mu,
                             void* sd, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, int64_t G,
                             double eps, Strides4 sx, Strides4 sy, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream) {
  if (G < 1 || C % G != 0 || H * W < 2) return cudaErrorInvalidValue;
  if (B * C == 0) return cudaSuccess;
  switch (dtype) {
#define FA_CASE(TAG, T)                                                                                           \
  case DType::TAG:                                                                                                \
    return forward_typed<T>(x, weight, bias, y, m, mu, sd, B, C, H, W, G, eps, sx, sy, workspace, workspace_bytes, \
                            stream);
    FA_CASE(Float32, float)
    FA_CASE(Float64, double)
    FA_CASE(Float16, __half)
    FA_CASE(BFloat16, __nv_bfloat16)
#undef FA_CASE
  }
  return cudaErrorInvalidValue;
}

cudaError_t sge_backward_cuda(const void* dy, const void* x, const void* weight, const void* bias, const void* m,
                              const void* mu, const void* sd, void* dx, void* dweight, void* dbias, DType dtype,
                              int64_t B, int64_t C, int64_t H, int64_t W, int64_t G, double eps, Strides4 sdy,
                              Strides4 sx, Strides4 sdx, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream) {
  if (G < 1 || C % G != 0 || H * W < 2) return cudaErrorInvalidValue;
  if (B * C == 0) return cudaSuccess;   // the caller's dweight / dbias are zeros
  switch (dtype) {
#define FA_CASE(TAG, T)                                                                                          \
  case DType::TAG:                                                                                               \
    return backward_typed<T>(dy, x, weight, bias, m, mu, sd, dx, dweight, dbias, B, C, H, W, G, eps, sdy, sx, sdx, \
                             workspace, workspace_bytes, stream);
    FA_CASE(Float32, float)
    FA_CASE(Float64, double)
    FA_CASE(Float16, __half)
    FA_CASE(BFloat16, __nv_bfloat16)
#undef FA_CASE
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastattn
