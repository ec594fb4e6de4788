// SimAM fused on CUDA. Three kernels, picked by layout and size:
// - plane tile (NCHW planes, n * sizeof * (1 + backward) small enough): a group of GROUP threads
//   owns a plane, copies it (and dy) into shared memory with 16-byte loads, then takes the
//   statistics, sums and gate from there: one read of x (and dy) and one write.
// - channels tile (channels_last): a block owns (b, 32 or 16 bytes of channels) for every pixel,
//   staged in shared memory the same way (sector-sized rows of channels).
// - walker (larger planes, or any other strides): a block owns a plane (or 32 channels of a
//   sample) and re-reads it from global memory for each sweep.
// Statistics: moments about a shift (the plane's first value) so that |mu| >> std loses nothing,
// mu kept as hi + lo for the gate; every reduction has a fixed order (shuffles, shared memory).
#include "simam.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

namespace fastattn {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_of = typename Acc<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(acc_of<T> v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float exp_neg(float z) { return __expf(-z); }
__device__ __forceinline__ double exp_neg(double z) { return exp(-z); }

template <typename T> constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename T, int V> struct alignas(16) Pack { T v[V]; };

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 2147483647;
constexpr size_t kSmemDefault = 48 * 1024;       // without opting in
constexpr size_t kChannelTileMax = 112 * 1024;   // channels tile: two blocks per SM on Hopper

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline bool al16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
template <typename T> inline bool al16(int64_t stride) { return (stride * static_cast<int64_t>(sizeof(T))) % 16 == 0; }
inline size_t round16(size_t v) { return (v + 15) / 16 * 16; }

template <typename T>
struct SimArgs {
  const T* x;
  const T* dy;       // backward only
  T* out;            // y or dx
  int64_t B, C, H, W, n;
  Strides4 sx, sdy, so;
  int64_t px, pdy, po;   // pixel strides when H x W flattens (channels tile, walker kFlat)
  double lambda;
};

// The gate's constants of one plane (or channel): mu = mh + ml, r; backward: dS, shift.
template <typename A>
struct Consts {
  A mh, ml, r, dS, shift;
};

// mu = K + m as hi + lo (TwoSum: exact for any magnitudes), r = 1 / (4 (m2 / (n - 1) + lambda)).
template <typename A>
__device__ __forceinline__ Consts<A> make_consts(A K, A m, A m2, int64_t n, double lambda) {
  Consts<A> k;
  k.mh = K + m;
  const A bb = k.mh - K;
  k.ml = (K - (k.mh - bb)) + (m - bb);
  k.r = A(1) / (A(4) * (m2 / static_cast<A>(n - 1) + static_cast<A>(lambda)));
  k.dS = A(0);
  k.shift = A(0);
  return k;
}

template <typename A>
__device__ __forceinline__ void set_bwd(Consts<A>& k, A sa, A sb, int64_t n) {
  k.dS = A(-4) * k.r * k.r * sb / static_cast<A>(n - 1);
  k.shift = A(2) * k.r * sa / static_cast<A>(n);
}

__device__ __forceinline__ double set_bwd_d(double r, double sb, int64_t n) { return -4.0 * r * r * sb / (n - 1); }

// y of one element.
template <typename A>
__device__ __forceinline__ A gate(A v, const Consts<A>& k) {
  const A xc = (v - k.mh) - k.ml;
  return v / (A(1) + exp_neg(xc * xc * k.r + A(0.5)));
}

// (e xc, e d) of one element, for the sums A and Bs.
template <typename A>
__device__ __forceinline__ void bwd_terms(A v, A g, const Consts<A>& k, A& exc, A& ed) {
  const A xc = (v - k.mh) - k.ml;
  const A d = xc * xc;
  const A t = exp_neg(d * k.r + A(0.5));
  const A s = A(1) / (A(1) + t);
  const A e = g * v * s * (t * s);   // 1 - s = t s
  exc = e * xc;
  ed = e * d;
}

template <typename A>
__device__ __forceinline__ A bwd_dx(A v, A g, const Consts<A>& k) {
  const A xc = (v - k.mh) - k.ml;
  const A d = xc * xc;
  const A t = exp_neg(d * k.r + A(0.5));
  const A s = A(1) / (A(1) + t);
  const A e = g * v * s * (t * s);
  return g * s + A(2) * xc * (e * k.r + k.dS) - k.shift;
}

// Sum over a group of GROUP consecutive threads (a power of two, 32..256), the same value in all
// of them. Butterfly shuffles give every lane the identical sum (a + b == b + a exactly); across
// warps through red[kThreads / 32]. Every thread of the block must call it (it syncs the block).
template <int GROUP, typename A>
__device__ __forceinline__ A group_sum(A v, A* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if constexpr (GROUP <= 32) {
    return v;
  } else {
    constexpr int kW = GROUP / 32;
    const int warp = static_cast<int>(threadIdx.x) >> 5;
    if ((threadIdx.x & 31) == 0) red[warp] = v;
    __syncthreads();
    const int first = warp / kW * kW;
    A t = A(0);
#pragma unroll
    for (int k = 0; k < kW; ++k) t += red[first + k];
    __syncthreads();
    return t;
  }
}

template <int GROUP>
__device__ __forceinline__ void group_sync() {
  if constexpr (GROUP <= 32) __syncwarp();
  else __syncthreads();
}

// Copy n elements at src (16-byte aligned runs when V > 1, V divides n) to shared memory, by the
// GROUP threads of a group.
template <typename T, int V, int GROUP>
__device__ __forceinline__ void stage(const T* __restrict__ src, T* dst, int64_t n, int gt) {
#pragma unroll 4
  for (int64_t i = static_cast<int64_t>(gt) * V; i < n; i += static_cast<int64_t>(GROUP) * V) {
    if constexpr (V == 1) {
      dst[i] = src[i];
    } else {
      const Pack<T, V> k = *reinterpret_cast<const Pack<T, V>*>(src + i);
#pragma unroll
      for (int j = 0; j < V; ++j) dst[i + j] = k.v[j];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// plane tile: NCHW planes in shared memory, GROUP threads per plane
// ---------------------------------------------------------------------------------------------

template <typename T, int GROUP, int V, bool kBwd>
__global__ void __launch_bounds__(kThreads) plane_tile_kernel(const SimArgs<T> a, size_t red_offset) {
  using A = acc_of<T>;
  constexpr int kPlanes = kThreads / GROUP;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t n = a.n;
  const int tid = static_cast<int>(threadIdx.x), g = tid / GROUP, gt = tid % GROUP;
  T* tx = reinterpret_cast<T*>(smem_raw) + static_cast<int64_t>(g) * n;
  T* tdy = reinterpret_cast<T*>(smem_raw) + (kPlanes + static_cast<int64_t>(g)) * n;   // backward only
  A* red = reinterpret_cast<A*>(smem_raw + red_offset);
  const int64_t plane = static_cast<int64_t>(blockIdx.x) * kPlanes + g;
  const bool valid = plane < a.B * a.C;   // the last block may have fewer planes: no early return (syncs)
  const int64_t b = valid ? plane / a.C : 0, c = valid ? plane % a.C : 0;
  if (valid) {
    stage<T, V, GROUP>(a.x + b * a.sx.b + c * a.sx.c, tx, n, gt);
    if constexpr (kBwd) stage<T, V, GROUP>(a.dy + b * a.sdy.b + c * a.sdy.c, tdy, n, gt);
  }
  group_sync<GROUP>();
  const A K = valid ? to_acc(tx[0]) : A(0);
  A s1 = A(0);
  if (valid)
    for (int64_t i = gt; i < n; i += GROUP) s1 += to_acc(tx[i]) - K;
  const A m = group_sum<GROUP>(s1, red) / static_cast<A>(n);
  A s2 = A(0);
  if (valid)
    for (int64_t i = gt; i < n; i += GROUP) {
      const A d = (to_acc(tx[i]) - K) - m;
      s2 += d * d;
    }
  Consts<A> k = make_consts(K, m, group_sum<GROUP>(s2, red), n, a.lambda);
  if constexpr (kBwd) {
    A sa = A(0), sb = A(0);
    if (valid)
      for (int64_t i = gt; i < n; i += GROUP) {
        A exc, ed;
        bwd_terms(to_acc(tx[i]), to_acc(tdy[i]), k, exc, ed);
        sa += exc;
        sb += ed;
      }
    sa = group_sum<GROUP>(sa, red);
    sb = group_sum<GROUP>(sb, red);
    set_bwd(k, sa, sb, n);
  }
  if (!valid) return;   // no block-wide sync below
  T* po = a.out + b * a.so.b + c * a.so.c;
  for (int64_t i = static_cast<int64_t>(gt) * V; i < n; i += static_cast<int64_t>(GROUP) * V) {
    Pack<T, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A v = to_acc(tx[i + j]);
      if constexpr (kBwd) o.v[j] = from_acc<T>(bwd_dx(v, to_acc(tdy[i + j]), k));
      else o.v[j] = from_acc<T>(gate(v, k));
    }
    if constexpr (V == 1) po[i] = o.v[0];
    else *reinterpret_cast<Pack<T, V>*>(po + i) = o;
  }
}

// ---------------------------------------------------------------------------------------------
// channels tile: (b, CW channels) x all pixels in shared memory; threads [RP pixel rows][CW]
// ---------------------------------------------------------------------------------------------

// Column sums of a [RP][CW] block of per-thread values (thread = rp * CW + ch) into out[CW], each
// column added in row order.
template <int RP, int CW, typename A>
__device__ __forceinline__ void column_sum(A v, A* red, A* out) {
  red[threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.x < CW) {
    A t = A(0);
    for (int rp = 0; rp < RP; ++rp) t += red[rp * CW + threadIdx.x];
    out[threadIdx.x] = t;
  }
  __syncthreads();
}

template <typename T, int CW, bool kVecIO, bool kBwd>
__global__ void __launch_bounds__(kThreads) channel_tile_kernel(const SimArgs<T> a, size_t red_offset) {
  using A = acc_of<T>;
  constexpr int RP = kThreads / CW;
  constexpr int V = kVec<T> < CW ? kVec<T> : CW;   // elements per 16-byte access (CW * sizeof(T) >= 16)
  constexpr int VPP = CW / V;                       // accesses per pixel row of the block
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t n = a.n;
  T* tx = reinterpret_cast<T*>(smem_raw);           // [n][CW]
  T* tdy = tx + n * CW;                             // backward: [n][CW]
  A* red = reinterpret_cast<A*>(smem_raw + red_offset);   // [kThreads]
  A* tot = red + kThreads;                           // [CW]
  Consts<A>* kc = reinterpret_cast<Consts<A>*>(tot + CW);  // [CW]
  const int64_t nblk = ceil_div(a.C, CW);
  const int64_t b = static_cast<int64_t>(blockIdx.x) / nblk;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) % nblk) * CW;
  const int tid = static_cast<int>(threadIdx.x);
  const T* xb = a.x + b * a.sx.b + c0;
  const T* dyb = kBwd ? a.dy + b * a.sdy.b + c0 : nullptr;
  T* ob = a.out + b * a.so.b + c0;
  // stage
  if constexpr (kVecIO) {
#pragma unroll 4
    for (int64_t q = tid; q < n * VPP; q += kThreads) {
      const int64_t p = q / VPP;
      const int part = static_cast<int>(q % VPP) * V;
      *reinterpret_cast<Pack<T, V>*>(tx + p * CW + part) = *reinterpret_cast<const Pack<T, V>*>(xb + p * a.px + part);
      if constexpr (kBwd)
        *reinterpret_cast<Pack<T, V>*>(tdy + p * CW + part) =
            *reinterpret_cast<const Pack<T, V>*>(dyb + p * a.pdy + part);
    }
  } else {
    const T zero = from_acc<T>(A(0));
    for (int64_t q = tid; q < n * CW; q += kThreads) {
      const int64_t p = q / CW;
      const int ch = static_cast<int>(q % CW);
      const bool ok = c0 + ch < a.C;
      tx[q] = ok ? xb[p * a.px + ch] : zero;
      if constexpr (kBwd) tdy[q] = ok ? dyb[p * a.pdy + ch] : zero;
    }
  }
  __syncthreads();
  const int rp = tid / CW, ch = tid % CW;
  const A K = to_acc(tx[ch]);
  A s1 = A(0);
  for (int64_t p = rp; p < n; p += RP) s1 += to_acc(tx[p * CW + ch]) - K;
  column_sum<RP, CW>(s1, red, tot);
  const A m = tot[ch] / static_cast<A>(n);
  A s2 = A(0);
  for (int64_t p = rp; p < n; p += RP) {
    const A d = (to_acc(tx[p * CW + ch]) - K) - m;
    s2 += d * d;
  }
  column_sum<RP, CW>(s2, red, tot);
  Consts<A> k = make_consts(K, m, tot[ch], n, a.lambda);
  if constexpr (kBwd) {
    A sa = A(0), sb = A(0);
    for (int64_t p = rp; p < n; p += RP) {
      A exc, ed;
      bwd_terms(to_acc(tx[p * CW + ch]), to_acc(tdy[p * CW + ch]), k, exc, ed);
      sa += exc;
      sb += ed;
    }
    column_sum<RP, CW>(sa, red, tot);
    sa = tot[ch];
    column_sum<RP, CW>(sb, red, tot);
    set_bwd(k, sa, tot[ch], n);
  }
  if (tid < CW) kc[tid] = k;
  __syncthreads();
  if constexpr (kVecIO) {
    for (int64_t q = tid; q < n * VPP; q += kThreads) {
      const int64_t p = q / VPP;
      const int part = static_cast<int>(q % VPP) * V;
      Pack<T, V> o;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A v = to_acc(tx[p * CW + part + j]);
        if constexpr (kBwd) o.v[j] = from_acc<T>(bwd_dx(v, to_acc(tdy[p * CW + part + j]), kc[part + j]));
        else o.v[j] = from_acc<T>(gate(v, kc[part + j]));
      }
      *reinterpret_cast<Pack<T, V>*>(ob + p * a.po + part) = o;
    }
  } else {
    for (int64_t q = tid; q < n * CW; q += kThreads) {
      const int64_t p = q / CW;
      const int cq = static_cast<int>(q % CW);
      if (c0 + cq >= a.C) continue;
      const A v = to_acc(tx[q]);
      if constexpr (kBwd) ob[p * a.po + cq] = from_acc<T>(bwd_dx(v, to_acc(tdy[q]), kc[cq]));
      else ob[p * a.po + cq] = from_acc<T>(gate(v, kc[cq]));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// walker: one unit per block, re-read from global memory for each sweep
// ---------------------------------------------------------------------------------------------

// CL == 1: a unit is a plane (b, c), its pixels over all threads. CL == 32: a unit is (b, 32
// channels), lane = channel, the 8 warps over the pixels. kFlat: pixel p at p * pixel stride, else
// at (p / W) * sh + (p % W) * sw.
template <typename T, int CL, bool kFlat, bool kBwd>
__global__ void __launch_bounds__(kThreads) walker_kernel(const SimArgs<T> a) {
  using A = acc_of<T>;
  constexpr int RP = kThreads / CL;
  __shared__ double red[kThreads];
  __shared__ double tot[CL];
  const int tid = static_cast<int>(threadIdx.x), rp = tid / CL, cl = tid % CL;
  int64_t b, c;
  if constexpr (CL == 1) {
    b = static_cast<int64_t>(blockIdx.x) / a.C;
    c = static_cast<int64_t>(blockIdx.x) % a.C;
  } else {
    const int64_t nblk = ceil_div(a.C, CL);
    b = static_cast<int64_t>(blockIdx.x) / nblk;
    c = (static_cast<int64_t>(blockIdx.x) % nblk) * CL + cl;
  }
  const bool ok = c < a.C;
  const int64_t n = a.n;
  auto off = [&](int64_t p, const Strides4& s, int64_t ps) -> int64_t {
    if constexpr (kFlat) return p * ps;
    else return (p / a.W) * s.h + (p % a.W) * s.w;
  };
  const T* xb = a.x + b * a.sx.b + (ok ? c : 0) * a.sx.c;
  const T* dyb = kBwd ? a.dy + b * a.sdy.b + (ok ? c : 0) * a.sdy.c : nullptr;
  T* ob = a.out + b * a.so.b + (ok ? c : 0) * a.so.c;
  auto colsum = [&](double v) -> double {   // sum over the RP threads of this channel, in order
    red[tid] = v;
    __syncthreads();
    if (tid < CL) {
      double t = 0;
      for (int k = 0; k < RP; ++k) t += red[k * CL + tid];
      tot[tid] = t;
    }
    __syncthreads();
    const double r = tot[cl];
    __syncthreads();
    return r;
  };
  const A K = ok ? to_acc(xb[0]) : A(0);
  A s1 = A(0), s2 = A(0);
  if (ok)
    for (int64_t p = rp; p < n; p += RP) {
      const A d = to_acc(xb[off(p, a.sx, a.px)]) - K;
      s1 += d;
      s2 += d * d;
    }
  const double S1 = colsum(static_cast<double>(s1)), S2 = colsum(static_cast<double>(s2));
  const double m = S1 / static_cast<double>(n);
  Consts<A> k = make_consts(K, static_cast<A>(m), static_cast<A>(fmax(S2 - S1 * m, 0.0)), n, a.lambda);
  if constexpr (kBwd) {
    A sa = A(0), sb = A(0);
    if (ok)
      for (int64_t p = rp; p < n; p += RP) {
        A exc, ed;
        bwd_terms(to_acc(xb[off(p, a.sx, a.px)]), to_acc(dyb[off(p, a.sdy, a.pdy)]), k, exc, ed);
        sa += exc;
        sb += ed;
      }
    const double SA = colsum(static_cast<double>(sa)), SB = colsum(static_cast<double>(sb));
    k.dS = static_cast<A>(set_bwd_d(static_cast<double>(k.r), SB, n));
    k.shift = static_cast<A>(2.0 * static_cast<double>(k.r) * SA / static_cast<double>(n));
  }
  if (!ok) return;
  for (int64_t p = rp; p < n; p += RP) {
    const A v = to_acc(xb[off(p, a.sx, a.px)]);
    if constexpr (kBwd) ob[off(p, a.so, a.po)] = from_acc<T>(bwd_dx(v, to_acc(dyb[off(p, a.sdy, a.pdy)]), k));
    else ob[off(p, a.so, a.po)] = from_acc<T>(gate(v, k));
  }
}

// ---------------------------------------------------------------------------------------------
// dispatch
// ---------------------------------------------------------------------------------------------

inline bool plane_unit(const Strides4& s, int64_t H, int64_t W) {
  return (s.w == 1 || W == 1) && (s.h == W || H == 1);
}
inline bool chans_unit(const Strides4& s, int64_t C) { return s.c == 1 || C == 1; }
inline int64_t flat_pixel_stride(const Strides4& s, int64_t H, int64_t W) {
  if (W == 1) return s.h;
  if (H == 1 || s.h == W * s.w) return s.w;
  return -1;
}

// Opt in to more than 48 KB of dynamic shared memory for `kernel` when `bytes` needs it and the
// device allows it; false when it cannot.
template <typename K>
bool fit_smem(K kernel, size_t bytes) {
  if (bytes <= kSmemDefault) return true;
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return false;
  if (bytes > static_cast<size_t>(optin)) return false;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)) ==
         cudaSuccess;
}

template <typename T, int GROUP, int V, bool kBwd>
cudaError_t launch_plane_tile(const SimArgs<T>& a, size_t tile_bytes, cudaStream_t stream) {
  using A = acc_of<T>;
  constexpr int kPlanes = kThreads / GROUP;
  const size_t red_offset = round16(tile_bytes * kPlanes);
  const size_t smem = red_offset + (kThreads / 32) * sizeof(A);
  const int64_t blocks = ceil_div(a.B * a.C, kPlanes);
  if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
  plane_tile_kernel<T, GROUP, V, kBwd><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(a, red_offset);
  return cudaGetLastError();
}

template <typename T, int V, bool kBwd>
cudaError_t launch_plane_tile_group(const SimArgs<T>& a, int group, size_t tile_bytes, cudaStream_t stream) {
  switch (group) {
    case 32: return launch_plane_tile<T, 32, V, kBwd>(a, tile_bytes, stream);
    case 64: return launch_plane_tile<T, 64, V, kBwd>(a, tile_bytes, stream);
    case 128: return launch_plane_tile<T, 128, V, kBwd>(a, tile_bytes, stream);
    default: return launch_plane_tile<T, 256, V, kBwd>(a, tile_bytes, stream);
  }
}

template <typename T, int CL, bool kFlat, bool kBwd>
cudaError_t launch_walker(const SimArgs<T>& a, cudaStream_t stream) {
  const int64_t blocks = CL == 1 ? a.B * a.C : a.B * ceil_div(a.C, CL);
  if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
  walker_kernel<T, CL, kFlat, kBwd><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, bool kVecIO, bool kBwd>
cudaError_t launch_channel_tile(const SimArgs<T>& a, size_t smem, size_t red_offset, cudaStream_t stream) {
  constexpr int CW = (kBwd ? 16 : 32) / static_cast<int>(sizeof(T));
  const int64_t blocks = a.B * ceil_div(a.C, CW);
  if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
  auto kernel = channel_tile_kernel<T, CW, kVecIO, kBwd>;
  if (!fit_smem(kernel, smem)) return cudaErrorInvalidConfiguration;
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(a, red_offset);
  return cudaGetLastError();
}

template <typename T, bool kBwd>
cudaError_t launch_simam(SimArgs<T> a, cudaStream_t stream) {
  using A = acc_of<T>;
  const int64_t H = a.H, W = a.W, C = a.C, n = H * W;
  a.n = n;
  if (a.B * C * n == 0) return cudaSuccess;
  const size_t copies = kBwd ? 2 : 1;
  // NCHW planes
  if (plane_unit(a.sx, H, W) && plane_unit(a.so, H, W) && (!kBwd || plane_unit(a.sdy, H, W))) {
    const size_t tile_bytes = static_cast<size_t>(n) * sizeof(T) * copies;
    int group = 32;   // about 8 elements per thread, 32..256 threads per plane
    while (group < 256 && group * 8 < n) group *= 2;
    const size_t smem = round16(tile_bytes * (kThreads / group)) + (kThreads / 32) * sizeof(A);
    if (smem <= kSmemDefault) {
      constexpr int VV = kVec<T>;
      const bool vec = n % VV == 0 && al16(a.x) && al16<T>(a.sx.b) && al16<T>(a.sx.c) && al16(a.out) &&
                       al16<T>(a.so.b) && al16<T>(a.so.c) &&
                       (!kBwd || (al16(a.dy) && al16<T>(a.sdy.b) && al16<T>(a.sdy.c)));
      if (vec) return launch_plane_tile_group<T, VV, kBwd>(a, group, tile_bytes, stream);
      return launch_plane_tile_group<T, 1, kBwd>(a, group, tile_bytes, stream);
    }
    a.px = a.pdy = a.po = 1;
    return launch_walker<T, 1, true, kBwd>(a, stream);
  }
  // channels_last (channels unit stride, H x W flattening into pixels)
  const int64_t px = flat_pixel_stride(a.sx, H, W), po = flat_pixel_stride(a.so, H, W);
  const int64_t pdy = kBwd ? flat_pixel_stride(a.sdy, H, W) : 0;
  if (chans_unit(a.sx, C) && chans_unit(a.so, C) && px >= 0 && po >= 0 &&
      (!kBwd || (chans_unit(a.sdy, C) && pdy >= 0))) {
    a.px = px;
    a.po = po;
    a.pdy = pdy;
    constexpr int CW = (kBwd ? 16 : 32) / static_cast<int>(sizeof(T));
    const size_t red_offset = round16(static_cast<size_t>(n) * CW * sizeof(T) * copies);
    const size_t smem = red_offset + (kThreads + CW) * sizeof(A) + CW * sizeof(Consts<A>);
    if (smem <= kChannelTileMax) {
      const bool vec = C % CW == 0 && al16(a.x) && al16<T>(a.sx.b) && al16<T>(px) && al16(a.out) &&
                       al16<T>(a.so.b) && al16<T>(po) && (!kBwd || (al16(a.dy) && al16<T>(a.sdy.b) && al16<T>(pdy)));
      const cudaError_t err = vec ? launch_channel_tile<T, true, kBwd>(a, smem, red_offset, stream)
                                  : launch_channel_tile<T, false, kBwd>(a, smem, red_offset, stream);
      if (err != cudaErrorInvalidConfiguration) return err;
      (void)cudaGetLastError();   // the device cannot give that much shared memory: walk instead
    }
    return launch_walker<T, 32, true, kBwd>(a, stream);
  }
  return launch_walker<T, 1, false, kBwd>(a, stream);
}

template <typename T>
cudaError_t forward_typed(const void* x, void* y, int64_t B, int64_t C, int64_t H, int64_t W, double lambda,
                          Strides4 sx, Strides4 sy, cudaStream_t stream) {
  SimArgs<T> a{};
  a.x = static_cast<const T*>(x);
  a.out = static_cast<T*>(y);
  a.B = B;
  a.C = C;
  a.H = H;
  a.W = W;
  a.sx = sx;
  a.sdy = sx;
  a.so = sy;
  a.lambda = lambda;
  return launch_simam<T, false>(a, stream);
}

template <typename T>
cudaError_t backward_typed(const void* dy, const void* x, void* dx, int64_t B, int64_t C, int64_t H, int64_t W,
                           double lambda, Strides4 sdy, Strides4 sx, Strides4 sdx, cudaStream_t stream) {
  SimArgs<T> a{};
  a.x = static_cast<const T*>(x);
  a.dy = static_cast<const T*>(dy);
  a.out = static_cast<T*>(dx);
  a.B = B;
  a.C = C;
  a.H = H;
  a.W = W;
  a.sx = sx;
  a.sdy = sdy;
  a.so = sdx;
  a.lambda = lambda;
  return launch_simam<T, true>(a, stream);
}

}  // namespace

cudaError_t simam_forward_cuda(const void* x, void* y, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                               double e_lambda, Strides4 sx, Strides4 sy, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return forward_typed<float>(x, y, B, C, H, W, e_lambda, sx, sy, stream);
    case DType::Float64: return forward_typed<double>(x, y, B, C, H, W, e_lambda, sx, sy, stream);
    case DType::Float16: return forward_typed<__half>(x, y, B, C, H, W, e_lambda, sx, sy, stream);
    case DType::BFloat16: return forward_typed<__nv_bfloat16>(x, y, B, C, H, W, e_lambda, sx, sy, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t simam_backward_cuda(const void* dy, const void* x, void* dx, DType dtype, int64_t B, int64_t C, int64_t H,
                                int64_t W, double e_lambda, Strides4 sdy, Strides4 sx, Strides4 sdx,
                                cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return backward_typed<float>(dy, x, dx, B, C, H, W, e_lambda, sdy, sx, sdx, stream);
    case DType::Float64: return backward_typed<double>(dy, x, dx, B, C, H, W, e_lambda, sdy, sx, sdx, stream);
    case DType::Float16: return backward_typed<__half>(dy, x, dx, B, C, H, W, e_lambda, sdy, sx, sdx, stream);
    case DType::BFloat16:
      return backward_typed<__nv_bfloat16>(dy, x, dx, B, C, H, W, e_lambda, sdy, sx, sdx, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastattn
