// Spatial attention ops on CUDA: [max, mean] pooling over one axis (CBAM, Triplet's Z-pool) and
// the per-pixel gate x * a * s, forward and backward. One pass over x per op and direction.
//
// Loop orders mirror the CPU kernels:
//  - pixels unit-stride (NCHW): a block owns a tile of 32 * V pixels (a lane: V consecutive
//    pixels, one 16-byte load when aligned) and its 8 warps split the reduced axis; the warps
//    meet in shared memory in a fixed order. Small maps split the reduced axis over blocks too
//    (partials summed by a second kernel in split order);
//  - reduced axis unit-stride (channels_last): lanes run along the row (16-byte loads) and meet
//    by warp shuffles; per-channel sums over pixels go through per-segment partial rows;
//  - anything else: one thread per output (correct, not fast).
// No float atomics anywhere: every reduction has a fixed order for a given shape and device.
// Offsets are int64; every grid is one-dimensional (axis x, up to 2^31 - 1 blocks).
#include "spatial.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <utility>

namespace fastattn {
namespace {

// ---------------------------------------------------------------------------------------------
// element types
// ---------------------------------------------------------------------------------------------

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using Acc = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(Acc<T> v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T> __device__ __forceinline__ Acc<T> ld(const T* p) { return to_acc(__ldg(p)); }

// Elements per 16-byte vector.
template <typename T> constexpr int kVec = static_cast<int>(16 / sizeof(T));

// V consecutive elements from p (one 16-byte load when V == kVec<T>: p must then be 16-byte aligned).
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* p, Acc<T> (&out)[V]) {
  if constexpr (V == kVec<T> && V > 1) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    T e[V];
    memcpy(e, &raw, sizeof raw);   // not a T* into raw: strict aliasing (the emulator's -O2 host build read zeros)
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = to_acc(e[k]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = ld(p + k);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const Acc<T> (&v)[V]) {
  if constexpr (V == kVec<T> && V > 1) {
    T e[V];
#pragma unroll
    for (int k = 0; k < V; ++k) e[k] = from_acc<T>(v[k]);
    uint4 raw;
    memcpy(&raw, e, sizeof raw);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = from_acc<T>(v[k]);
  }
}

// V elements at p + k * step for k < n (the rest 0): the tails and the strided operands.
template <typename T, int V>
__device__ __forceinline__ void load_some(const T* p, int64_t step, int64_t n, Acc<T> (&out)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = k < n ? ld(p + k * step) : Acc<T>(0);
}

template <typename T, int V>
__device__ __forceinline__ void store_some(T* p, int64_t n, const Acc<T> (&v)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k)
    if (k < n) p[k] = from_acc<T>(v[k]);
}

// ---------------------------------------------------------------------------------------------
// max with the first index, NaN first (as torch.amax / torch.argmax); idx < 0 marks "no value yet"
// ---------------------------------------------------------------------------------------------

template <typename A>
__device__ __forceinline__ bool beats(A v, A m) {
  return v > m || (isnan(v) && !isnan(m));
}

// Running update with increasing indices: strict, so the first maximum stays.
template <typename A>
__device__ __forceinline__ void update_max(A& m, int32_t& i, A v, int32_t n) {
  if (i < 0 || beats(v, m)) {
    m = v;
    i = n;
  }
}

// Merge of two partial results (any order: the larger value, NaN above all, the lower index among
// equals): associative and commutative, so any reduction tree gives the same answer.
template <typename A>
__device__ __forceinline__ void merge_max(A& m, int32_t& i, A m2, int32_t i2) {
  if (i2 < 0) return;
  bool take;
  if (i < 0) {
    take = true;
  } else {
    const bool n1 = isnan(m), n2 = isnan(m2);
    take = (n1 || n2) ? (n2 && (!n1 || i2 < i)) : (m2 > m || (m2 == m && i2 < i));
  }
  if (take) {
    m = m2;
    i = i2;
  }
}

constexpr unsigned kFull = 0xffffffffu;

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); valid in thread 0.
template <typename A>
__device__ A block_sum(A v) {
  __shared__ A warp_sums[32];
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  A t = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < nwarps; ++w) t += warp_sums[w];
  return t;
}

constexpr int kGroups = 8;                       // warps per block of the tile kernels
constexpr int kThreads = 32 * kGroups;           // 256 threads per block
constexpr int64_t kTargetBlocks = 1024;          // about 8 resident blocks per SM on an H100
constexpr int64_t kMaxGrid = std::numeric_limits<int32_t>::max();

// ---------------------------------------------------------------------------------------------
// pool forward
// ---------------------------------------------------------------------------------------------

// Pixels unit-stride: block (b, p1, tile of 32 * V pixels along p2, split of n). Warp g takes
// n = n0 + g, n0 + g + 8, ... ; the warps merge in shared memory in warp order.
template <typename T, int V, bool kA>
__global__ void __launch_bounds__(kThreads)
pool_fwd_tiles_kernel(const T* __restrict__ x, const Acc<T>* __restrict__ a, T* __restrict__ y,
                      int32_t* __restrict__ idx, Acc<T>* __restrict__ pmax, Acc<T>* __restrict__ psum,
                      int32_t* __restrict__ pidx, int64_t B, int64_t N, int64_t P1, int64_t P2, Strides4 sx,
                      Strides4 sy, int64_t i1, int64_t i2, int64_t nT, int64_t CS, int64_t n_per_split) {
  using A = Acc<T>;
  constexpr int TP = 32 * V;
  __shared__ A s_max[kGroups][TP];
  __shared__ A s_sum[kGroups][TP];
  __shared__ int32_t s_idx[kGroups][TP];
  int64_t blk = blockIdx.x;
  const int64_t cs = blk % CS;
  blk /= CS;
  const int64_t t = blk % nT;
  blk /= nT;
  const int64_t p1 = blk % P1, b = blk / P1;
  const int lane = threadIdx.x & 31, g = threadIdx.x >> 5;
  const int64_t p0 = t * TP + lane * V;
  const int64_t valid = P2 - p0;                 // pixels of this lane inside the row (may be <= 0)
  const int64_t n0 = cs * n_per_split, n1 = min(N, n0 + n_per_split);
  A m[V], s[V];
  int32_t id[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    m[k] = A(0);
    s[k] = A(0);
    id[k] = -1;
  }
  if (valid > 0) {
    const T* base = x + b * sx.b + p1 * sx.h + p0;
    const A* ab = kA ? a + b * N : nullptr;
#pragma unroll 4
    for (int64_t n = n0 + g; n < n1; n += kGroups) {
      A v[V];
      if (valid >= V) load_vec<T, V>(base + n * sx.c, v);
      else load_some<T, V>(base + n * sx.c, 1, valid, v);
      const A an = kA ? __ldg(ab + n) : A(1);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A vv = kA ? v[k] * an : v[k];
        s[k] += vv;
        update_max(m[k], id[k], vv, static_cast<int32_t>(n));
      }
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    s_max[g][lane * V + k] = m[k];
    s_sum[g][lane * V + k] = s[k];
    s_idx[g][lane * V + k] = id[k];
  }
  __syncthreads();
  const int64_t P = P1 * P2;
  for (int q = threadIdx.x; q < TP; q += kThreads) {
    const int64_t p2 = t * TP + q;
    if (p2 >= P2) continue;
    A mm = s_max[0][q], ss = s_sum[0][q];
    int32_t ii = s_idx[0][q];
#pragma unroll
    for (int w = 1; w < kGroups; ++w) {
      merge_max(mm, ii, s_max[w][q], s_idx[w][q]);
      ss += s_sum[w][q];
    }
    if (CS == 1) {
      T* py = y + b * sy.b + p1 * sy.h + p2 * sy.w;
      py[0] = from_acc<T>(mm);
      py[sy.c] = from_acc<T>(ss / static_cast<A>(N));
      idx[b * P + p1 * i1 + p2 * i2] = ii;
    } else {
      const int64_t o = (cs * B + b) * P + p1 * P2 + p2;
      pmax[o] = mm;
      psum[o] = ss;
      pidx[o] = ii;
    }
  }
}

// The splits of the tile kernel, merged in split order: one thread per (b, pixel).
template <typename T>
__global__ void pool_fwd_merge_kernel(const Acc<T>* __restrict__ pmax, const Acc<T>* __restrict__ psum,
                                      const int32_t* __restrict__ pidx, T* __restrict__ y, int32_t* __restrict__ idx,
                                      int64_t B, int64_t N, int64_t P1, int64_t P2, Strides4 sy, int64_t i1,
                                      int64_t i2, int64_t CS) {
  using A = Acc<T>;
  const int64_t P = P1 * P2;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= B * P) return;
  A mm = pmax[q], ss = psum[q];
  int32_t ii = pidx[q];
  for (int64_t c = 1; c < CS; ++c) {
    merge_max(mm, ii, pmax[c * B * P + q], pidx[c * B * P + q]);
    ss += psum[c * B * P + q];
  }
  const int64_t b = q / P, r = q - b * P, p1 = r / P2, p2 = r - p1 * P2;
  T* py = y + b * sy.b + p1 * sy.h + p2 * sy.w;
  py[0] = from_acc<T>(mm);
  py[sy.c] = from_acc<T>(ss / static_cast<A>(N));
  idx[b * P + p1 * i1 + p2 * i2] = ii;
}

// Reduced axis unit-stride: LPP lanes per pixel walk its row (V elements per load), then meet by
// shuffles. Every lane of the warp takes part in the shuffles, pixels past the end included.
template <typename T, int V, int LPP, bool kA>
__global__ void __launch_bounds__(kThreads)
pool_fwd_rows_kernel(const T* __restrict__ x, const Acc<T>* __restrict__ a, T* __restrict__ y,
                     int32_t* __restrict__ idx, int64_t B, int64_t N, int64_t P1, int64_t P2, Strides4 sx,
                     Strides4 sy, int64_t i1, int64_t i2) {
  using A = Acc<T>;
  constexpr int kPix = kThreads / LPP;
  const int l = threadIdx.x % LPP;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kPix + threadIdx.x / LPP;
  const int64_t P = P1 * P2;
  const bool live = q < B * P;
  A m = A(0), s = A(0);
  int32_t id = -1;
  int64_t b = 0, p1 = 0, p2 = 0;
  if (live) {
    b = q / P;
    const int64_t r = q - b * P;
    p1 = r / P2;
    p2 = r - p1 * P2;
    const T* row = x + b * sx.b + p1 * sx.h + p2 * sx.w;
    const A* ar = kA ? a + b * N : nullptr;
    const int64_t nv = N / V;
    for (int64_t j = l; j < nv; j += LPP) {
      A v[V];
      load_vec<T, V>(row + j * V, v);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A vv = kA ? v[k] * __ldg(ar + j * V + k) : v[k];
        s += vv;
        update_max(m, id, vv, static_cast<int32_t>(j * V + k));
      }
    }
    for (int64_t n = nv * V + l; n < N; n += LPP) {   // tail: indices above all of this lane's others
      const A vv = kA ? ld(row + n) * __ldg(ar + n) : ld(row + n);
      s += vv;
      update_max(m, id, vv, static_cast<int32_t>(n));
    }
  }
#pragma unroll
  for (int o = LPP / 2; o > 0; o >>= 1) {
    const A m2 = __shfl_xor_sync(kFull, m, o, LPP);
    const int32_t i2s = __shfl_xor_sync(kFull, id, o, LPP);
    s += __shfl_xor_sync(kFull, s, o, LPP);
    merge_max(m, id, m2, i2s);
  }
  if (live && l == 0) {
    T* py = y + b * sy.b + p1 * sy.h + p2 * sy.w;
    py[0] = from_acc<T>(m);
    py[sy.c] = from_acc<T>(s / static_cast<A>(N));
    idx[b * P + p1 * i1 + p2 * i2] = id;
  }
}

template <typename T, bool kA>
__global__ void pool_fwd_generic_kernel(const T* __restrict__ x, const Acc<T>* __restrict__ a, T* __restrict__ y,
                                        int32_t* __restrict__ idx, int64_t B, int64_t N, int64_t P1, int64_t P2,
                                        Strides4 sx, Strides4 sy, int64_t i1, int64_t i2) {
  using A = Acc<T>;
  const int64_t P = P1 * P2;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= B * P) return;
  const int64_t b = q / P, r = q - b * P, p1 = r / P2, p2 = r - p1 * P2;
  const T* px = x + b * sx.b + p1 * sx.h + p2 * sx.w;
  A m = A(0), s = A(0);
  int32_t id = -1;
  for (int64_t n = 0; n < N; ++n) {
    const A v = kA ? ld(px + n * sx.c) * __ldg(a + b * N + n) : ld(px + n * sx.c);
    s += v;
    update_max(m, id, v, static_cast<int32_t>(n));
  }
  T* py = y + b * sy.b + p1 * sy.h + p2 * sy.w;
  py[0] = from_acc<T>(m);
  py[sy.c] = from_acc<T>(s / static_cast<A>(N));
  idx[b * P + p1 * i1 + p2 * i2] = id;
}

// ---------------------------------------------------------------------------------------------
// pool backward
// ---------------------------------------------------------------------------------------------

// Pixels unit-stride: one block per (b, n) plane, so da[b, n] is a block sum. kFlat: the plane is
// one row (pixel q at q * stride; V pixels per thread when aligned); else q = p1 * P2 + p2.
template <typename T, int V, bool kA, bool kFlat>
__global__ void pool_bwd_planes_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                       const Acc<T>* __restrict__ a, const int32_t* __restrict__ idx,
                                       T* __restrict__ dx, Acc<T>* __restrict__ da, int64_t N, int64_t P1,
                                       int64_t P2, Strides4 sdy, Strides4 sx, Strides4 sdx, int64_t i1, int64_t i2) {
  using A = Acc<T>;
  const int64_t bn = blockIdx.x, b = bn / N, n = bn - b * N;
  const int64_t P = P1 * P2;
  const A an = kA ? __ldg(a + bn) : A(1);
  const A inv_n = A(1) / static_cast<A>(N);
  const T* xb = kA ? x + b * sx.b + n * sx.c : nullptr;
  T* db = dx + b * sdx.b + n * sdx.c;
  const T* dyb = dy + b * sdy.b;
  const int32_t* ib = idx + b * P;
  A acc = A(0);
  for (int64_t q0 = static_cast<int64_t>(threadIdx.x) * V; q0 < P; q0 += static_cast<int64_t>(blockDim.x) * V) {
    const int64_t cnt = min(static_cast<int64_t>(V), P - q0);
    A g[V], xv[V], out[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      g[k] = A(0);
      if (k < cnt) {
        const int64_t q = q0 + k;
        int64_t p1 = 0, p2 = q;
        if (!kFlat) {
          p1 = static_cast<int64_t>(static_cast<uint32_t>(q) / static_cast<uint32_t>(P2));
          p2 = q - p1 * P2;
        }
        const T* d = dyb + p1 * sdy.h + p2 * sdy.w;
        const int32_t i = __ldg(ib + p1 * i1 + p2 * i2);
        g[k] = ld(d + sdy.c) * inv_n + (i == n ? ld(d) : A(0));
      }
    }
    if (kFlat) {
      if (kA) {
        if (cnt == V) load_vec<T, V>(xb + q0 * sx.w, xv);
        else load_some<T, V>(xb + q0 * sx.w, sx.w, cnt, xv);
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        out[k] = kA ? g[k] * an : g[k];
        if (kA) acc += g[k] * xv[k];
      }
      if (cnt == V) store_vec<T, V>(db + q0 * sdx.w, out);
      else store_some<T, V>(db + q0 * sdx.w, cnt, out);   // V > 1 only with unit stride
    } else {   // V == 1
      const int64_t p1 = static_cast<int64_t>(static_cast<uint32_t>(q0) / static_cast<uint32_t>(P2));
      const int64_t p2 = q0 - p1 * P2;
      if (kA) acc += g[0] * ld(xb + p1 * sx.h + p2 * sx.w);
      db[p1 * sdx.h + p2 * sdx.w] = from_acc<T>(kA ? g[0] * an : g[0]);
    }
  }
  if (kA) {
    const A total = block_sum(acc);
    if (threadIdx.x == 0) da[bn] = total;
  }
}

// Reduced axis unit-stride: block (b, block of 32 * V channels, segment of pixels); warp w takes
// pixels q0 + w, q0 + w + 8, ...; a lane owns V channels. da: the warps meet in shared memory in
// warp order, then the segments' rows are summed in segment order (or written when S == 1).
template <typename T, int V, bool kA>
__global__ void __launch_bounds__(kThreads)
pool_bwd_rows_kernel(const T* __restrict__ dy, const T* __restrict__ x, const Acc<T>* __restrict__ a,
                     const int32_t* __restrict__ idx, T* __restrict__ dx, Acc<T>* __restrict__ da,
                     Acc<T>* __restrict__ dapart, int64_t B, int64_t N, int64_t P1, int64_t P2, Strides4 sdy,
                     Strides4 sx, Strides4 sdx, int64_t i1, int64_t i2, int64_t nCB, int64_t S, int64_t seg) {
  using A = Acc<T>;
  constexpr int CB = 32 * V;
  __shared__ A s_da[kA ? kGroups : 1][kA ? CB : 1];
  int64_t blk = blockIdx.x;
  const int64_t sg = blk % S;
  blk /= S;
  const int64_t cb = blk % nCB, b = blk / nCB;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t c0 = cb * CB + lane * V;
  const int64_t cnt = min(static_cast<int64_t>(V), N - c0);   // channels of this lane (may be <= 0)
  const int64_t P = P1 * P2;
  const A inv_n = A(1) / static_cast<A>(N);
  A av[V], acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    av[k] = (kA && k < cnt) ? __ldg(a + b * N + c0 + k) : A(1);
    acc[k] = A(0);
  }
  const int64_t q0 = sg * seg, q1 = min(P, q0 + seg);
  if (cnt > 0) {
    for (int64_t q = q0 + w; q < q1; q += kGroups) {
      const int64_t p1 = q / P2, p2 = q - p1 * P2;
      const T* d = dy + b * sdy.b + p1 * sdy.h + p2 * sdy.w;
      const A gmean = ld(d + sdy.c) * inv_n, gmax = ld(d);
      const int64_t i = __ldg(idx + b * P + p1 * i1 + p2 * i2);
      T* dr = dx + b * sdx.b + p1 * sdx.h + p2 * sdx.w + c0;
      A xv[V], out[V];
      if (kA) {
        const T* xr = x + b * sx.b + p1 * sx.h + p2 * sx.w + c0;
        if (cnt == V) load_vec<T, V>(xr, xv);
        else load_some<T, V>(xr, 1, cnt, xv);
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A g = gmean + (c0 + k == i ? gmax : A(0));
        out[k] = kA ? g * av[k] : g;
        if (kA) acc[k] += g * xv[k];
      }
      if (cnt == V) store_vec<T, V>(dr, out);
      else store_some<T, V>(dr, cnt, out);
    }
  }
  if constexpr (kA) {
#pragma unroll
    for (int k = 0; k < V; ++k) s_da[w][lane * V + k] = acc[k];
    __syncthreads();
    for (int t = threadIdx.x; t < CB; t += kThreads) {
      const int64_t c = cb * CB + t;
      if (c >= N) continue;
      A tot = s_da[0][t];
#pragma unroll
      for (int ww = 1; ww < kGroups; ++ww) tot += s_da[ww][t];
      if (S == 1) da[b * N + c] = tot;
      else dapart[(sg * B + b) * N + c] = tot;
    }
  }
}

template <typename T, bool kA>
__global__ void pool_bwd_generic_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                        const Acc<T>* __restrict__ a, const int32_t* __restrict__ idx,
                                        T* __restrict__ dx, Acc<T>* __restrict__ da, int64_t B, int64_t N,
                                        int64_t P1, int64_t P2, Strides4 sdy, Strides4 sx, Strides4 sdx, int64_t i1,
                                        int64_t i2) {
  using A = Acc<T>;
  const int64_t bn = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bn >= B * N) return;
  const int64_t b = bn / N, n = bn - b * N, P = P1 * P2;
  const A an = kA ? __ldg(a + bn) : A(1);
  const A inv_n = A(1) / static_cast<A>(N);
  A acc = A(0);
  for (int64_t p1 = 0; p1 < P1; ++p1)
    for (int64_t p2 = 0; p2 < P2; ++p2) {
      const T* d = dy + b * sdy.b + p1 * sdy.h + p2 * sdy.w;
      const int32_t i = __ldg(idx + b * P + p1 * i1 + p2 * i2);
      const A g = ld(d + sdy.c) * inv_n + (i == n ? ld(d) : A(0));
      dx[b * sdx.b + n * sdx.c + p1 * sdx.h + p2 * sdx.w] = from_acc<T>(kA ? g * an : g);
      if (kA) acc += g * ld(x + b * sx.b + n * sx.c + p1 * sx.h + p2 * sx.w);
    }
  if (kA) da[bn] = acc;
}

// out[i] = sum over r < rows of part[r * M + i], in row order.
template <typename A>
__global__ void sum_rows_kernel(const A* __restrict__ part, A* __restrict__ out, int64_t rows, int64_t M) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M) return;
  A t = A(0);
  for (int64_t r = 0; r < rows; ++r) t += part[r * M + i];
  out[i] = t;
}

// ---------------------------------------------------------------------------------------------
// scale forward: y = (x * a) * s
// ---------------------------------------------------------------------------------------------

// Planes contiguous: block (b * C + c, tile of blockDim.x * V pixels).
template <typename T, int V, bool kA>
__global__ void scale_fwd_planes_kernel(const T* __restrict__ x, const Acc<T>* __restrict__ a,
                                        const Acc<T>* __restrict__ s, T* __restrict__ y, int64_t C, int64_t P,
                                        Strides4 sx, Strides4 sy, int64_t nT) {
  using A = Acc<T>;
  const int64_t blk = blockIdx.x, t = blk % nT, bc = blk / nT, b = bc / C, c = bc - b * C;
  const int64_t p = (t * blockDim.x + threadIdx.x) * V;
  if (p >= P) return;
  const int64_t cnt = min(static_cast<int64_t>(V), P - p);
  const A ac = kA ? __ldg(a + bc) : A(1);
  const T* xp = x + b * sx.b + c * sx.c + p;
  T* yp = y + b * sy.b + c * sy.c + p;
  const A* sp = s + b * P + p;
  A v[V];
  if (cnt == V) load_vec<T, V>(xp, v);
  else load_some<T, V>(xp, 1, cnt, v);
#pragma unroll
  for (int k = 0; k < V; ++k) v[k] = (kA ? v[k] * ac : v[k]) * (k < cnt ? __ldg(sp + k) : A(0));
  if (cnt == V) store_vec<T, V>(yp, v);
  else store_some<T, V>(yp, cnt, v);
}

// Channels contiguous: block of 8 pixels (a warp each), lanes along the channels.
template <typename T, int V, bool kA>
__global__ void __launch_bounds__(kThreads)
scale_fwd_channels_kernel(const T* __restrict__ x, const Acc<T>* __restrict__ a, const Acc<T>* __restrict__ s,
                          T* __restrict__ y, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sy) {
  using A = Acc<T>;
  const int lane = threadIdx.x & 31;
  const int64_t P = H * W;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kGroups + (threadIdx.x >> 5);
  if (q >= B * P) return;
  const int64_t b = q / P, p = q - b * P, h = p / W, w = p - h * W;
  const T* xr = x + b * sx.b + h * sx.h + w * sx.w;
  T* yr = y + b * sy.b + h * sy.h + w * sy.w;
  const A sv = __ldg(s + q);
  const A* ab = kA ? a + b * C : nullptr;
  for (int64_t c = static_cast<int64_t>(lane) * V; c < C; c += 32 * V) {
    const int64_t cnt = min(static_cast<int64_t>(V), C - c);
    A v[V];
    if (cnt == V) load_vec<T, V>(xr + c, v);
    else load_some<T, V>(xr + c, 1, cnt, v);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = (kA ? v[k] * (k < cnt ? __ldg(ab + c + k) : A(0)) : v[k]) * sv;
    if (cnt == V) store_vec<T, V>(yr + c, v);
    else store_some<T, V>(yr + c, cnt, v);
  }
}

template <typename T, bool kA>
__global__ void scale_fwd_generic_kernel(const T* __restrict__ x, const Acc<T>* __restrict__ a,
                                         const Acc<T>* __restrict__ s, T* __restrict__ y, int64_t B, int64_t C,
                                         int64_t H, int64_t W, Strides4 sx, Strides4 sy) {
  using A = Acc<T>;
  const int64_t total = B * C * H * W;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t w = e % W, h = (e / W) % H, c = (e / (W * H)) % C, b = e / (W * H * C);
    const A v = ld(x + b * sx.b + c * sx.c + h * sx.h + w * sx.w);
    const A xa = kA ? v * __ldg(a + b * C + c) : v;
    y[b * sy.b + c * sy.c + h * sy.h + w * sy.w] = from_acc<T>(xa * __ldg(s + (b * H + h) * W + w));
  }
}

// ---------------------------------------------------------------------------------------------
// scale backward: dx = dy * a * s, da = sum_hw dy * x * s, ds = sum_c dy * x * a
// ---------------------------------------------------------------------------------------------

// Planes of x and dx contiguous, dy's plane flat with pixel stride dyp (16-byte loads when
// kVecDy): block (b, tile of 32 * V pixels, split of the channels), warp g takes channels
// c0 + g, c0 + g + 8, ... Per channel, the warp's dot product over the tile is a shuffle sum
// (da partial of this tile, or da itself when there is one tile); ds of the tile: the warps meet
// in shared memory in warp order (ds partial of this split, or ds itself when CS == 1).
template <typename T, int V, bool kA, bool kVecDy>
__global__ void __launch_bounds__(kThreads)
scale_bwd_tiles_kernel(const T* __restrict__ dy, const T* __restrict__ x, const Acc<T>* __restrict__ a,
                       const Acc<T>* __restrict__ s, T* __restrict__ dx, Acc<T>* __restrict__ da,
                       Acc<T>* __restrict__ ds, Acc<T>* __restrict__ dapart, Acc<T>* __restrict__ dspart, int64_t B,
                       int64_t C, int64_t P, Strides4 sdy, int64_t dyp, Strides4 sx, Strides4 sdx, int64_t nT,
                       int64_t CS, int64_t c_per_split) {
  using A = Acc<T>;
  constexpr int TP = 32 * V;
  __shared__ A s_ds[kGroups][TP];
  int64_t blk = blockIdx.x;
  const int64_t cs = blk % CS;
  blk /= CS;
  const int64_t t = blk % nT, b = blk / nT;
  const int lane = threadIdx.x & 31, g = threadIdx.x >> 5;
  const int64_t p0 = t * TP + lane * V;
  const int64_t cnt = max(int64_t(0), min(static_cast<int64_t>(V), P - p0));
  A sv[V], dsa[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    sv[k] = k < cnt ? __ldg(s + b * P + p0 + k) : A(0);
    dsa[k] = A(0);
  }
  const int64_t c0 = cs * c_per_split, c1 = min(C, c0 + c_per_split);
  for (int64_t c = c0 + g; c < c1; c += kGroups) {   // uniform over the warp: the shuffles below are safe
    A gv[V], xv[V], out[V];
    A part = A(0);
    if (cnt > 0) {
      const T* dyr = dy + b * sdy.b + c * sdy.c + p0 * dyp;
      const T* xr = x + b * sx.b + c * sx.c + p0;
      if (kVecDy && cnt == V) load_vec<T, V>(dyr, gv);
      else load_some<T, V>(dyr, dyp, cnt, gv);
      if (cnt == V) load_vec<T, V>(xr, xv);
      else load_some<T, V>(xr, 1, cnt, xv);
      const A ac = kA ? __ldg(a + b * C + c) : A(1);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A tv = gv[k] * xv[k];
        out[k] = kA ? gv[k] * ac * sv[k] : gv[k] * sv[k];
        dsa[k] += kA ? tv * ac : tv;
        part += tv * sv[k];
      }
      T* dxr = dx + b * sdx.b + c * sdx.c + p0;
      if (cnt == V) store_vec<T, V>(dxr, out);
      else store_some<T, V>(dxr, cnt, out);
    }
    if constexpr (kA) {
      part = warp_sum(part);
      if (lane == 0) {
        if (nT == 1) da[b * C + c] = part;
        else dapart[(t * B + b) * C + c] = part;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) s_ds[g][lane * V + k] = dsa[k];
  __syncthreads();
  for (int q = threadIdx.x; q < TP; q += kThreads) {
    const int64_t p = t * TP + q;
    if (p >= P) continue;
    A tot = s_ds[0][q];
#pragma unroll
    for (int w = 1; w < kGroups; ++w) tot += s_ds[w][q];
    if (CS == 1) ds[b * P + p] = tot;
    else dspart[(cs * B + b) * P + p] = tot;
  }
}

// Channels of x and dx contiguous, dy's channel stride dyc (16-byte loads when kVecDy): block
// (b, block of 32 * V channels, segment of pixels); warp w takes pixels q0 + w, q0 + w + 8, ...
// ds of a pixel: a shuffle sum over the warp (partial of this channel block, or ds itself when
// there is one block); da: the warps meet in shared memory in warp order, then segment rows.
template <typename T, int V, bool kA, bool kVecDy>
__global__ void __launch_bounds__(kThreads)
scale_bwd_channels_kernel(const T* __restrict__ dy, const T* __restrict__ x, const Acc<T>* __restrict__ a,
                          const Acc<T>* __restrict__ s, T* __restrict__ dx, Acc<T>* __restrict__ da,
                          Acc<T>* __restrict__ ds, Acc<T>* __restrict__ dapart, Acc<T>* __restrict__ dspart, int64_t B,
                          int64_t C, int64_t H, int64_t W, Strides4 sdy, int64_t dyc, Strides4 sx, Strides4 sdx,
                          int64_t nCB, int64_t S, int64_t seg) {
  using A = Acc<T>;
  constexpr int CB = 32 * V;
  __shared__ A s_da[kA ? kGroups : 1][kA ? CB : 1];
  int64_t blk = blockIdx.x;
  const int64_t sg = blk % S;
  blk /= S;
  const int64_t cb = blk % nCB, b = blk / nCB;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t c0 = cb * CB + lane * V;
  const int64_t cnt = max(int64_t(0), min(static_cast<int64_t>(V), C - c0));
  const int64_t P = H * W;
  A av[V], acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    av[k] = (kA && k < cnt) ? __ldg(a + b * C + c0 + k) : A(1);
    acc[k] = A(0);
  }
  const int64_t q0 = sg * seg, q1 = min(P, q0 + seg);
  for (int64_t q = q0 + w; q < q1; q += kGroups) {   // uniform over the warp: the shuffle below is safe
    const int64_t h = q / W, ww = q - h * W;
    const A sv = __ldg(s + b * P + q);
    A part = A(0);
    if (cnt > 0) {
      const T* dyr = dy + b * sdy.b + h * sdy.h + ww * sdy.w + c0 * dyc;
      const T* xr = x + b * sx.b + h * sx.h + ww * sx.w + c0;
      A gv[V], xv[V], out[V];
      if (kVecDy && cnt == V) load_vec<T, V>(dyr, gv);
      else load_some<T, V>(dyr, dyc, cnt, gv);
      if (cnt == V) load_vec<T, V>(xr, xv);
      else load_some<T, V>(xr, 1, cnt, xv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A tv = gv[k] * xv[k];
        out[k] = kA ? gv[k] * av[k] * sv : gv[k] * sv;
        part += kA ? tv * av[k] : tv;
        if (kA) acc[k] += tv * sv;
      }
      T* dxr = dx + b * sdx.b + h * sdx.h + ww * sdx.w + c0;
      if (cnt == V) store_vec<T, V>(dxr, out);
      else store_some<T, V>(dxr, cnt, out);
    }
    part = warp_sum(part);
    if (lane == 0) {
      if (nCB == 1) ds[b * P + q] = part;
      else dspart[(cb * B + b) * P + q] = part;
    }
  }
  if constexpr (kA) {
#pragma unroll
    for (int k = 0; k < V; ++k) s_da[w][lane * V + k] = acc[k];
    __syncthreads();
    for (int tt = threadIdx.x; tt < CB; tt += kThreads) {
      const int64_t c = cb * CB + tt;
      if (c >= C) continue;
      A tot = s_da[0][tt];
#pragma unroll
      for (int k = 1; k < kGroups; ++k) tot += s_da[k][tt];
      if (S == 1) da[b * C + c] = tot;
      else dapart[(sg * B + b) * C + c] = tot;
    }
  }
}

// Any strides: dx and da per (b, c) thread, then ds per (b, pixel) thread.
template <typename T, bool kA>
__global__ void scale_bwd_generic_bc_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                            const Acc<T>* __restrict__ a, const Acc<T>* __restrict__ s,
                                            T* __restrict__ dx, Acc<T>* __restrict__ da, int64_t B, int64_t C,
                                            int64_t H, int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx) {
  using A = Acc<T>;
  const int64_t bc = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bc >= B * C) return;
  const int64_t b = bc / C, c = bc - b * C;
  const A ac = kA ? __ldg(a + bc) : A(1);
  A acc = A(0);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; ++w) {
      const A gv = ld(dy + b * sdy.b + c * sdy.c + h * sdy.h + w * sdy.w);
      const A sv = __ldg(s + (b * H + h) * W + w);
      dx[b * sdx.b + c * sdx.c + h * sdx.h + w * sdx.w] = from_acc<T>(kA ? gv * ac * sv : gv * sv);
      if (kA) acc += gv * ld(x + b * sx.b + c * sx.c + h * sx.h + w * sx.w) * sv;
    }
  if (kA) da[bc] = acc;
}

template <typename T, bool kA>
__global__ void scale_bwd_generic_p_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                           const Acc<T>* __restrict__ a, Acc<T>* __restrict__ ds, int64_t B,
                                           int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sx) {
  using A = Acc<T>;
  const int64_t bp = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t P = H * W;
  if (bp >= B * P) return;
  const int64_t b = bp / P, p = bp - b * P, h = p / W, w = p - h * W;
  A acc = A(0);
  for (int64_t c = 0; c < C; ++c) {
    const A tv = ld(dy + b * sdy.b + c * sdy.c + h * sdy.h + w * sdy.w) *
                 ld(x + b * sx.b + c * sx.c + h * sx.h + w * sx.w);
    acc += kA ? tv * __ldg(a + b * C + c) : tv;
  }
  ds[bp] = acc;
}

// ---------------------------------------------------------------------------------------------
// host side: plans and launches
// ---------------------------------------------------------------------------------------------

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 16-byte loads of rows starting at p + sum_i k_i * stride_i: p 16-byte aligned and each stride of
// a dimension longer than 1 a multiple of the vector width.
template <typename T>
bool vec_ok(const void* p, std::initializer_list<std::pair<int64_t, int64_t>> stride_size) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  for (const auto& ss : stride_size)
    if (ss.second > 1 && ss.first % kVec<T> != 0) return false;
  return true;
}

// Carves partial buffers out of the caller's workspace (sizes first, then pointers).
struct Carve {
  char* base;
  size_t used = 0;
  template <typename U>
  U* take(int64_t count) {
    if (count <= 0) return nullptr;
    U* p = base ? reinterpret_cast<U*>(base + used) : nullptr;
    used += (static_cast<size_t>(count) * sizeof(U) + 255) / 256 * 256;
    return p;
  }
};

// The pixel plane of the pool operands, as on the CPU (see normalize_pixels there): one flat row
// when every operand allows it, else the unit-stride axis of `lead` last.
struct Pix {
  int64_t P1, P2, i1, i2;
};

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
  if (lead->w != 1 && lead->h == 1) {
    for (Strides4* s : ops) std::swap(s->h, s->w);
    return {P2, P1, 1, P2};
  }
  return {P1, P2, P2, 1};
}

#define FA_LAUNCH_CHECK()                        \
  do {                                           \
    const cudaError_t e_ = cudaGetLastError();   \
    if (e_ != cudaSuccess) return e_;            \
  } while (0)

template <typename T, bool kA>
cudaError_t pool_forward(const T* x, const Acc<T>* a, T* y, int32_t* idx, int64_t B, int64_t N, int64_t P1,
                         int64_t P2, Strides4 sx, Strides4 sy, void* ws, size_t ws_bytes, size_t* query,
                         cudaStream_t stream) {
  using A = Acc<T>;
  constexpr int VV = kVec<T>;
  const Pix px = normalize_pixels(P1, P2, {&sx, &sy}, &sx);
  const int64_t P = px.P1 * px.P2;
  Carve carve{static_cast<char*>(ws)};
  const bool plan_only = query != nullptr;
  if (sx.c == 1 && N > 1) {   // rows
    if (plan_only) return *query = 0, cudaSuccess;
    const bool vec = N >= VV && vec_ok<T>(x, {{sx.b, B}, {sx.h, px.P1}, {sx.w, px.P2}});
    const bool wide = N >= (vec ? 64 * VV : 64);
    const int64_t per_block = kThreads / (wide ? 32 : 8);
    const int64_t blocks = cdiv(B * P, per_block);
    if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
#define FA_ROWS(VX, LX)                                                                                          \
  pool_fwd_rows_kernel<T, VX, LX, kA><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(                  \
      x, a, y, idx, B, N, px.P1, px.P2, sx, sy, px.i1, px.i2)
    if (vec && wide) FA_ROWS(VV, 32);
    else if (vec) FA_ROWS(VV, 8);
    else if (wide) FA_ROWS(1, 32);
    else FA_ROWS(1, 8);
#undef FA_ROWS
    FA_LAUNCH_CHECK();
    return cudaSuccess;
  }
  if (sx.w == 1 || px.P2 == 1) {   // tiles
    const bool vec = px.P2 >= 32 * VV && vec_ok<T>(x, {{sx.b, B}, {sx.c, N}, {sx.h, px.P1}});
    const int V = vec ? VV : 1;
    const int64_t nT = cdiv(px.P2, 32 * V);
    const int64_t blocks0 = B * px.P1 * nT;
    int64_t CS = std::max<int64_t>(1, std::min(cdiv(kTargetBlocks, blocks0), N / (kGroups * 8)));
    const int64_t n_per = cdiv(N, CS);
    CS = cdiv(N, n_per);
    A* pmax = carve.take<A>(CS > 1 ? CS * B * P : 0);
    A* psum = carve.take<A>(CS > 1 ? CS * B * P : 0);
    int32_t* pidx = carve.take<int32_t>(CS > 1 ? CS * B * P : 0);
    if (plan_only) return *query = carve.used, cudaSuccess;
    if (carve.used > ws_bytes) return cudaErrorInvalidValue;
    const int64_t blocks = blocks0 * CS;
    if (blocks > kMaxGrid || cdiv(B * P, kThreads) > kMaxGrid) return cudaErrorInvalidConfiguration;
    if (vec)
      pool_fwd_tiles_kernel<T, VV, kA><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          x, a, y, idx, pmax, psum, pidx, B, N, px.P1, px.P2, sx, sy, px.i1, px.i2, nT, CS, n_per);
    else
      pool_fwd_tiles_kernel<T, 1, kA><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          x, a, y, idx, pmax, psum, pidx, B, N, px.P1, px.P2, sx, sy, px.i1, px.i2, nT, CS, n_per);
    FA_LAUNCH_CHECK();
    if (CS > 1) {
      pool_fwd_merge_kernel<T><<<static_cast<unsigned>(cdiv(B * P, kThreads)), kThreads, 0, stream>>>(
          pmax, psum, pidx, y, idx, B, N, px.P1, px.P2, sy, px.i1, px.i2, CS);
      FA_LAUNCH_CHECK();
    }
    return cudaSuccess;
  }
  if (plan_only) return *query = 0, cudaSuccess;
  const int64_t blocks = cdiv(B * P, kThreads);
  if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
  pool_fwd_generic_kernel<T, kA><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      x, a, y, idx, B, N, px.P1, px.P2, sx, sy, px.i1, px.i2);
  FA_LAUNCH_CHECK();
  return cudaSuccess;
}

template <typename T, bool kA>
cudaError_t pool_backward(const T* dy, const T* x, const Acc<T>* a, const int32_t* idx, T* dx, Acc<T>* da,
                          int64_t B, int64_t N, int64_t P1, int64_t P2, Strides4 sdy, Strides4 sx, Strides4 sdx,
                          void* ws, size_t ws_bytes, size_t* query, cudaStream_t stream) {
  using A = Acc<T>;
  constexpr int VV = kVec<T>;
  const Pix px = kA ? normalize_pixels(P1, P2, {&sdy, &sx, &sdx}, &sdx) : normalize_pixels(P1, P2, {&sdy, &sdx}, &sdx);
  const int64_t P = px.P1 * px.P2;
  Carve carve{static_cast<char*>(ws)};
  const bool plan_only = query != nullptr;
  if (sdx.c == 1 && (!kA || sx.c == 1) && N > 1) {   // rows
    const bool vec = N >= 16 * VV && vec_ok<T>(dx, {{sdx.b, B}, {sdx.h, px.P1}, {sdx.w, px.P2}}) &&
                     (!kA || vec_ok<T>(x, {{sx.b, B}, {sx.h, px.P1}, {sx.w, px.P2}}));
    const int V = vec ? VV : 1;
    const int64_t nCB = cdiv(N, 32 * V);
    int64_t S = std::max<int64_t>(1, std::min(cdiv(kTargetBlocks, B * nCB), P / 32));
    const int64_t seg = cdiv(P, S);
    S = cdiv(P, seg);
    A* dapart = carve.take<A>(kA && S > 1 ? S * B * N : 0);
    if (plan_only) return *query = carve.used, cudaSuccess;
    if (carve.used > ws_bytes) return cudaErrorInvalidValue;
    const int64_t blocks = B * nCB * S;
    if (blocks > kMaxGrid || cdiv(B * N, kThreads) > kMaxGrid) return cudaErrorInvalidConfiguration;
    if (vec)
      pool_bwd_rows_kernel<T, VV, kA><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          dy, x, a, idx, dx, da, dapart, B, N, px.P1, px.P2, sdy, sx, sdx, px.i1, px.i2, nCB, S, seg);
    else
      pool_bwd_rows_kernel<T, 1, kA><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          dy, x, a, idx, dx, da, dapart, B, N, px.P1, px.P2, sdy, sx, sdx, px.i1, px.i2, nCB, S, seg);
    FA_LAUNCH_CHECK();
    if (kA && S > 1) {
      sum_rows_kernel<A><<<static_cast<unsigned>(cdiv(B * N, kThreads)), kThreads, 0, stream>>>(dapart, da, S, B * N);
      FA_LAUNCH_CHECK();
    }
    return cudaSuccess;
  }
  if (plan_only) return *query = 0, cudaSuccess;
  if ((px.P2 == 1 || (sdx.w == 1 && (!kA || sx.w == 1))) && P <= std::numeric_limits<uint32_t>::max()) {   // planes
    if (B * N > kMaxGrid) return cudaErrorInvalidConfiguration;
    const bool flat = px.P1 == 1;
    const bool vec = flat && P >= 32 * VV && vec_ok<T>(dx, {{sdx.b, B}, {sdx.c, N}}) &&
                     (!kA || vec_ok<T>(x, {{sx.b, B}, {sx.c, N}}));
    const int V = vec ? VV : 1;
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, cdiv(cdiv(P, V), 32) * 32)));
    const unsigned blocks = static_cast<unsigned>(B * N);
    if (vec)
      pool_bwd_planes_kernel<T, VV, kA, true><<<blocks, threads, 0, stream>>>(dy, x, a, idx, dx, da, N, px.P1, px.P2,
                                                                             sdy, sx, sdx, px.i1, px.i2);
    else if (flat)
      pool_bwd_planes_kernel<T, 1, kA, true><<<blocks, threads, 0, stream>>>(dy, x, a, idx, dx, da, N, px.P1, px.P2,
                                                                            sdy, sx, sdx, px.i1, px.i2);
    else
      pool_bwd_planes_kernel<T, 1, kA, false><<<blocks, threads, 0, stream>>>(dy, x, a, idx, dx, da, N, px.P1, px.P2,
                                                                             sdy, sx, sdx, px.i1, px.i2);
    FA_LAUNCH_CHECK();
    return cudaSuccess;
  }
  const int64_t blocks = cdiv(B * N, kThreads);
  if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
  pool_bwd_generic_kernel<T, kA><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      dy, x, a, idx, dx, da, B, N, px.P1, px.P2, sdy, sx, sdx, px.i1, px.i2);
  FA_LAUNCH_CHECK();
  return cudaSuccess;
}

template <typename T, bool kA>
cudaError_t scale_forward(const T* x, const Acc<T>* a, const Acc<T>* s, T* y, int64_t B, int64_t C, int64_t H,
                          int64_t W, Strides4 sx, Strides4 sy, cudaStream_t stream) {
  constexpr int VV = kVec<T>;
  const int64_t P = H * W;
  if (plane_contiguous(sx, H, W) && plane_contiguous(sy, H, W)) {
    const bool vec = P >= 32 * VV && vec_ok<T>(x, {{sx.b, B}, {sx.c, C}}) && vec_ok<T>(y, {{sy.b, B}, {sy.c, C}});
    const int V = vec ? VV : 1;
    const int64_t threads = std::min<int64_t>(kThreads, std::max<int64_t>(32, cdiv(cdiv(P, V), 32) * 32));
    const int64_t nT = cdiv(P, threads * V);
    const int64_t blocks = B * C * nT;
    if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
    if (vec)
      scale_fwd_planes_kernel<T, VV, kA><<<static_cast<unsigned>(blocks), static_cast<unsigned>(threads), 0, stream>>>(
          x, a, s, y, C, P, sx, sy, nT);
    else
      scale_fwd_planes_kernel<T, 1, kA><<<static_cast<unsigned>(blocks), static_cast<unsigned>(threads), 0, stream>>>(
          x, a, s, y, C, P, sx, sy, nT);
    FA_LAUNCH_CHECK();
    return cudaSuccess;
  }
  if (channels_contiguous(sx, C) && channels_contiguous(sy, C)) {
    const bool vec = C >= VV && vec_ok<T>(x, {{sx.b, B}, {sx.h, H}, {sx.w, W}}) &&
                     vec_ok<T>(y, {{sy.b, B}, {sy.h, H}, {sy.w, W}});
    const int64_t blocks = cdiv(B * P, kGroups);
    if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
    if (vec)
      scale_fwd_channels_kernel<T, VV, kA><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, a, s, y, B, C, H,
                                                                                                  W, sx, sy);
    else
      scale_fwd_channels_kernel<T, 1, kA><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, a, s, y, B, C, H,
                                                                                                 W, sx, sy);
    FA_LAUNCH_CHECK();
    return cudaSuccess;
  }
  const int64_t blocks = std::min<int64_t>(cdiv(B * C * P, kThreads), 65535LL * 32);   // grid-stride loop
  scale_fwd_generic_kernel<T, kA><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, a, s, y, B, C, H, W, sx,
                                                                                         sy);
  FA_LAUNCH_CHECK();
  return cudaSuccess;
}

template <typename T, bool kA>
cudaError_t scale_backward(const T* dy, const T* x, const Acc<T>* a, const Acc<T>* s, T* dx, Acc<T>* da,
                           Acc<T>* ds, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sx,
                           Strides4 sdx, void* ws, size_t ws_bytes, size_t* query, cudaStream_t stream) {
  using A = Acc<T>;
  constexpr int VV = kVec<T>;
  const int64_t P = H * W;
  Carve carve{static_cast<char*>(ws)};
  const bool plan_only = query != nullptr;
  const bool dy_flat = H == 1 || W == 1 || sdy.h == W * sdy.w;
  if (plane_contiguous(sx, H, W) && plane_contiguous(sdx, H, W) && dy_flat) {   // tiles
    const int64_t dyp = W == 1 ? sdy.h : sdy.w;
    const bool vec = P >= 32 * VV && vec_ok<T>(x, {{sx.b, B}, {sx.c, C}}) && vec_ok<T>(dx, {{sdx.b, B}, {sdx.c, C}});
    const bool vec_dy = vec && dyp == 1 && vec_ok<T>(dy, {{sdy.b, B}, {sdy.c, C}});
    const int V = vec ? VV : 1;
    const int64_t nT = cdiv(P, 32 * V);
    int64_t CS = std::max<int64_t>(1, std::min(cdiv(kTargetBlocks, B * nT), C / (kGroups * 8)));
    const int64_t c_per = cdiv(C, CS);
    CS = cdiv(C, c_per);
    A* dapart = carve.take<A>(kA && nT > 1 ? nT * B * C : 0);
    A* dspart = carve.take<A>(CS > 1 ? CS * B * P : 0);
    if (plan_only) return *query = carve.used, cudaSuccess;
    if (carve.used > ws_bytes) return cudaErrorInvalidValue;
    const int64_t blocks = B * nT * CS;
    if (blocks > kMaxGrid || cdiv(B * P, kThreads) > kMaxGrid || cdiv(B * C, kThreads) > kMaxGrid)
      return cudaErrorInvalidConfiguration;
#define FA_TILES(VX, VD)                                                                                        \
  scale_bwd_tiles_kernel<T, VX, kA, VD><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(               \
      dy, x, a, s, dx, da, ds, dapart, dspart, B, C, P, sdy, dyp, sx, sdx, nT, CS, c_per)
    if (vec_dy) FA_TILES(VV, true);
    else if (vec) FA_TILES(VV, false);
    else FA_TILES(1, false);
#undef FA_TILES
    FA_LAUNCH_CHECK();
    if (kA && nT > 1) {
      sum_rows_kernel<A><<<static_cast<unsigned>(cdiv(B * C, kThreads)), kThreads, 0, stream>>>(dapart, da, nT, B * C);
      FA_LAUNCH_CHECK();
    }
    if (CS > 1) {
      sum_rows_kernel<A><<<static_cast<unsigned>(cdiv(B * P, kThreads)), kThreads, 0, stream>>>(dspart, ds, CS, B * P);
      FA_LAUNCH_CHECK();
    }
    return cudaSuccess;
  }
  if (channels_contiguous(sx, C) && channels_contiguous(sdx, C)) {   // channels
    const int64_t dyc = C == 1 ? 1 : sdy.c;
    const bool vec = C >= 16 * VV && vec_ok<T>(x, {{sx.b, B}, {sx.h, H}, {sx.w, W}}) &&
                     vec_ok<T>(dx, {{sdx.b, B}, {sdx.h, H}, {sdx.w, W}});
    const bool vec_dy = vec && dyc == 1 && vec_ok<T>(dy, {{sdy.b, B}, {sdy.h, H}, {sdy.w, W}});
    const int V = vec ? VV : 1;
    const int64_t nCB = cdiv(C, 32 * V);
    int64_t S = std::max<int64_t>(1, std::min(cdiv(kTargetBlocks, B * nCB), P / 32));
    const int64_t seg = cdiv(P, S);
    S = cdiv(P, seg);
    A* dapart = carve.take<A>(kA && S > 1 ? S * B * C : 0);
    A* dspart = carve.take<A>(nCB > 1 ? nCB * B * P : 0);
    if (plan_only) return *query = carve.used, cudaSuccess;
    if (carve.used > ws_bytes) return cudaErrorInvalidValue;
    const int64_t blocks = B * nCB * S;
    if (blocks > kMaxGrid || cdiv(B * P, kThreads) > kMaxGrid || cdiv(B * C, kThreads) > kMaxGrid)
      return cudaErrorInvalidConfiguration;
#define FA_CHANNELS(VX, VD)                                                                                     \
  scale_bwd_channels_kernel<T, VX, kA, VD><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(            \
      dy, x, a, s, dx, da, ds, dapart, dspart, B, C, H, W, sdy, dyc, sx, sdx, nCB, S, seg)
    if (vec_dy) FA_CHANNELS(VV, true);
    else if (vec) FA_CHANNELS(VV, false);
    else FA_CHANNELS(1, false);
#undef FA_CHANNELS
    FA_LAUNCH_CHECK();
    if (kA && S > 1) {
      sum_rows_kernel<A><<<static_cast<unsigned>(cdiv(B * C, kThreads)), kThreads, 0, stream>>>(dapart, da, S, B * C);
      FA_LAUNCH_CHECK();
    }
    if (nCB > 1) {
      sum_rows_kernel<A><<<static_cast<unsigned>(cdiv(B * P, kThreads)), kThreads, 0, stream>>>(dspart, ds, nCB, B * P);
      FA_LAUNCH_CHECK();
    }
    return cudaSuccess;
  }
  if (plan_only) return *query = 0, cudaSuccess;
  const int64_t blocks_bc = cdiv(B * C, kThreads), blocks_p = cdiv(B * P, kThreads);
  if (blocks_bc > kMaxGrid || blocks_p > kMaxGrid) return cudaErrorInvalidConfiguration;
  scale_bwd_generic_bc_kernel<T, kA><<<static_cast<unsigned>(blocks_bc), kThreads, 0, stream>>>(dy, x, a, s, dx, da, B,
                                                                                               C, H, W, sdy, sx, sdx);
  FA_LAUNCH_CHECK();
  scale_bwd_generic_p_kernel<T, kA><<<static_cast<unsigned>(blocks_p), kThreads, 0, stream>>>(dy, x, a, ds, B, C, H,
                                                                                             W, sdy, sx);
  FA_LAUNCH_CHECK();
  return cudaSuccess;
}

#undef FA_LAUNCH_CHECK

// The storage type of each DType on the device.
template <DType D> struct DevType;
template <> struct DevType<DType::Float32> { using type = float; };
template <> struct DevType<DType::Float64> { using type = double; };
template <> struct DevType<DType::Float16> { using type = __half; };
template <> struct DevType<DType::BFloat16> { using type = __nv_bfloat16; };

// Calls f.template operator()<T>() with the device type of dtype.
template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// Workspace query (query != nullptr: nothing runs, *query gets the bytes) or run.
namespace {

cudaError_t pool_forward_any(const void* x, const void* a, void* y, int32_t* idx, DType dtype, int64_t B, int64_t N,
                             int64_t P1, int64_t P2, Strides4 sx, Strides4 sy, void* ws, size_t ws_bytes,
                             size_t* query, cudaStream_t stream) {
  if (query) *query = 0;
  if (B * P1 * P2 == 0) return cudaSuccess;
  if (N < 1) return cudaErrorInvalidValue;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    const Acc<T>* at = static_cast<const Acc<T>*>(a);
    if (a)
      return pool_forward<T, true>(xt, at, static_cast<T*>(y), idx, B, N, P1, P2, sx, sy, ws, ws_bytes, query, stream);
    return pool_forward<T, false>(xt, at, static_cast<T*>(y), idx, B, N, P1, P2, sx, sy, ws, ws_bytes, query, stream);
  });
}

cudaError_t pool_backward_any(const void* dy, const void* x, const void* a, const int32_t* idx, void* dx, void* da,
                              DType dtype, int64_t B, int64_t N, int64_t P1, int64_t P2, Strides4 sdy, Strides4 sx,
                              Strides4 sdx, void* ws, size_t ws_bytes, size_t* query, cudaStream_t stream) {
  if (query) *query = 0;
  if (B * N * P1 * P2 == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* dyt = static_cast<const T*>(dy);
    const T* xt = static_cast<const T*>(x);
    const Acc<T>* at = static_cast<const Acc<T>*>(a);
    Acc<T>* dat = static_cast<Acc<T>*>(da);
    if (a)
      return pool_backward<T, true>(dyt, xt, at, idx, static_cast<T*>(dx), dat, B, N, P1, P2, sdy, sx, sdx, ws,
                                    ws_bytes, query, stream);
    return pool_backward<T, false>(dyt, xt, at, idx, static_cast<T*>(dx), dat, B, N, P1, P2, sdy, sx, sdx, ws,
                                   ws_bytes, query, stream);
  });
}

cudaError_t scale_backward_any(const void* dy, const void* x, const void* a, const void* s, void* dx, void* da,
                               void* ds, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy,
                               Strides4 sx, Strides4 sdx, void* ws, size_t ws_bytes, size_t* query,
                               cudaStream_t stream) {
  if (query) *query = 0;
  if (B * C * H * W == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* dyt = static_cast<const T*>(dy);
    const T* xt = static_cast<const T*>(x);
    const Acc<T>* at = static_cast<const Acc<T>*>(a);
    const Acc<T>* st = static_cast<const Acc<T>*>(s);
    Acc<T>* dat = static_cast<Acc<T>*>(da);
    Acc<T>* dst = static_cast<Acc<T>*>(ds);
    if (a)
      return scale_backward<T, true>(dyt, xt, at, st, static_cast<T*>(dx), dat, dst, B, C, H, W, sdy, sx, sdx, ws,
                                     ws_bytes, query, stream);
    return scale_backward<T, false>(dyt, xt, at, st, static_cast<T*>(dx), dat, dst, B, C, H, W, sdy, sx, sdx, ws,
                                    ws_bytes, query, stream);
  });
}

}  // namespace

size_t spatial_pool_forward_cuda_workspace(const void* x, const void* a, void* y, int32_t* idx, DType dtype,
                                           int64_t B, int64_t N, int64_t P1, int64_t P2, Strides4 sx, Strides4 sy) {
  size_t bytes = 0;
  pool_forward_any(x, a, y, idx, dtype, B, N, P1, P2, sx, sy, nullptr, 0, &bytes, nullptr);
  return bytes;
}

cudaError_t spatial_pool_forward_cuda(const void* x, const void* a, void* y, int32_t* idx, DType dtype, int64_t B,
                                      int64_t N, int64_t P1, int64_t P2, Strides4 sx, Strides4 sy, void* workspace,
                                      size_t workspace_bytes, cudaStream_t stream) {
  return pool_forward_any(x, a, y, idx, dtype, B, N, P1, P2, sx, sy, workspace, workspace_bytes, nullptr, stream);
}

size_t spatial_pool_backward_cuda_workspace(const void* dy, const void* x, const void* a, const int32_t* idx,
                                            void* dx, void* da, DType dtype, int64_t B, int64_t N, int64_t P1,
                                            int64_t P2, Strides4 sdy, Strides4 sx, Strides4 sdx) {
  size_t bytes = 0;
  pool_backward_any(dy, x, a, idx, dx, da, dtype, B, N, P1, P2, sdy, sx, sdx, nullptr, 0, &bytes, nullptr);
  return bytes;
}

cudaError_t spatial_pool_backward_cuda(const void* dy, const void* x, const void* a, const int32_t* idx, void* dx,
                                       void* da, DType dtype, int64_t B, int64_t N, int64_t P1, int64_t P2,
                                       Strides4 sdy, Strides4 sx, Strides4 sdx, void* workspace,
                                       size_t workspace_bytes, cudaStream_t stream) {
  return pool_backward_any(dy, x, a, idx, dx, da, dtype, B, N, P1, P2, sdy, sx, sdx, workspace, workspace_bytes,
                           nullptr, stream);
}

cudaError_t spatial_scale_forward_cuda(const void* x, const void* a, const void* s, void* y, DType dtype, int64_t B,
                                       int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sy,
                                       cudaStream_t stream) {
  if (B * C * H * W == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    const Acc<T>* at = static_cast<const Acc<T>*>(a);
    const Acc<T>* st = static_cast<const Acc<T>*>(s);
    if (a) return scale_forward<T, true>(xt, at, st, static_cast<T*>(y), B, C, H, W, sx, sy, stream);
    return scale_forward<T, false>(xt, at, st, static_cast<T*>(y), B, C, H, W, sx, sy, stream);
  });
}

size_t spatial_scale_backward_cuda_workspace(const void* dy, const void* x, const void* a, const void* s, void* dx,
                                             void* da, void* ds, DType dtype, int64_t B, int64_t C, int64_t H,
                                             int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx) {
  size_t bytes = 0;
  scale_backward_any(dy, x, a, s, dx, da, ds, dtype, B, C, H, W, sdy, sx, sdx, nullptr, 0, &bytes, nullptr);
  return bytes;
}

cudaError_t spatial_scale_backward_cuda(const void* dy, const void* x, const void* a, const void* s, void* dx,
                                        void* da, void* ds, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                                        Strides4 sdy, Strides4 sx, Strides4 sdx, void* workspace,
                                        size_t workspace_bytes, cudaStream_t stream) {
  return scale_backward_any(dy, x, a, s, dx, da, ds, dtype, B, C, H, W, sdy, sx, sdx, workspace, workspace_bytes,
                            nullptr, stream);
}

}  // namespace fastattn
