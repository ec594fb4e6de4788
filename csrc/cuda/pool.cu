// Channel pooling on CUDA: mean / max / std of every (b, c) plane in one read of x (and channel_mean
// through the same kernels), FcaNet's weighted (DCT) pool, and their backward passes.
//
// Layouts: H x W plane contiguous (NCHW and its channel slices): a warp per plane segment, 16-byte
// loads after a scalar head that reaches a 16-byte boundary; channels contiguous (channels_last): a
// block per (sample, 32 channels, pixel segment), lanes over channels (128-byte rows per warp), 8
// warps over pixels merged in shared memory; anything else: a thread per plane (correct, slow).
// Statistics are Welford / Chan merges in fp32 (fp64 for fp64) so that a plane of mean 100 and std
// 1 keeps its precision; merges follow fixed shuffle / shared-memory orders, and plane segments
// (added when B * C alone cannot fill the device) are merged in segment order by a second kernel:
// deterministic on a given device, no atomics. Offsets are int64.
#include "pool.h"

#include <algorithm>

#include "pool_device.cuh"

namespace fastattn {
namespace {

using namespace pooldev;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// running statistics
// ---------------------------------------------------------------------------------------------

// n positions: their sum, mean and sum of squared deviations (kStd), max and its flat index (kMax;
// idx -1: none yet). With kStd the sums are of x - K, K the plane's first value (0 if not finite):
// a plane far from zero (mean 1e4, std 1) keeps its digits in fp32.
template <typename A>
struct Stat {
  int64_t n;
  A sum, mean, m2, mx;
  int64_t idx;
};

template <typename A>
__device__ __forceinline__ Stat<A> stat_empty() {
  Stat<A> s;
  s.n = 0;
  s.sum = s.mean = s.m2 = A(0);
  s.mx = minus_inf<A>();
  s.idx = -1;
  return s;
}

// Does v at position i replace the current max m at idx? NaN beats any number, then the larger
// value, then the lower index (the first occurrence, whatever order the positions come in).
template <typename A>
__device__ __forceinline__ bool beats(A v, int64_t i, A m, int64_t idx) {
  if (idx < 0) return true;
  const bool vn = v != v, mn = m != m;
  if (vn != mn) return vn;
  if (!vn && v != m) return v > m;
  return i < idx;
}

// a <- a and b (Chan et al.'s pairwise update of the deviations).
template <typename A, bool kMax, bool kStd>
__device__ __forceinline__ void merge(Stat<A>& a, const Stat<A>& b) {
  if (kStd && b.n > 0) {
    if (a.n == 0) {
      a.mean = b.mean;
      a.m2 = b.m2;
    } else {
      const A f = static_cast<A>(b.n) / static_cast<A>(a.n + b.n);
      const A d = b.mean - a.mean;
      a.mean += d * f;
      a.m2 += b.m2 + d * d * static_cast<A>(a.n) * f;
    }
  }
  a.n += b.n;
  a.sum += b.sum;
  if (kMax && b.idx >= 0 && beats(b.mx, b.idx, a.mx, a.idx)) {
    a.mx = b.mx;
    a.idx = b.idx;
  }
}

template <typename A>
__device__ __forceinline__ A shift_of(A first) {
  return isfinite(first) ? first : A(0);
}

// Add V consecutive positions i0, i0 + 1, ...: their own mean and deviations first, then one merge.
template <typename A, bool kMax, bool kStd, int V>
__device__ __forceinline__ void push(Stat<A>& s, const A (&v)[V], A K, int64_t i0) {
  A t = 0;
#pragma unroll
  for (int k = 0; k < V; ++k) t += kStd ? v[k] - K : v[k];
  if (kStd) {
    const A mb = t * (A(1) / A(V));
    A q = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A d = (v[k] - K) - mb;
      q += d * d;
    }
    const A f = A(V) / static_cast<A>(s.n + V);
    const A d = mb - s.mean;
    s.mean += d * f;
    s.m2 += q + d * d * static_cast<A>(s.n) * f;
  }
  s.n += V;
  s.sum += t;
  if (kMax) {
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (beats(v[k], i0 + k, s.mx, s.idx)) {
        s.mx = v[k];
        s.idx = i0 + k;
      }
  }
}

template <typename A, bool kMax, bool kStd>
__device__ __forceinline__ void push1(Stat<A>& s, A v, A K, int64_t i) {
  const A one[1] = {v};
  push<A, kMax, kStd, 1>(s, one, K, i);
}

// Lane 0 gets the merge of the warp's 32 statistics (a fixed tree: deterministic).
template <typename A, bool kMax, bool kStd>
__device__ __forceinline__ Stat<A> warp_merge(Stat<A> s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Stat<A> t;
    t.n = __shfl_down_sync(kFull, static_cast<long long>(s.n), o);
    t.sum = __shfl_down_sync(kFull, s.sum, o);
    t.mean = kStd ? __shfl_down_sync(kFull, s.mean, o) : A(0);
    t.m2 = kStd ? __shfl_down_sync(kFull, s.m2, o) : A(0);
    t.mx = kMax ? __shfl_down_sync(kFull, s.mx, o) : A(0);
    t.idx = kMax ? static_cast<int64_t>(__shfl_down_sync(kFull, static_cast<long long>(s.idx), o)) : int64_t(-1);
    merge<A, kMax, kStd>(s, t);
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// forward: arguments and outputs
// ---------------------------------------------------------------------------------------------

template <typename T>
struct FwdArgs {
  using A = acc<T>;
  const T* x;
  const A* w;                                  // dct_pool's weight (kW), else null
  int64_t B, C, H, W, HW, BC;
  int64_t sxb, sxc, sxh, sxw;
  int64_t swc, swh, sww;
  int64_t seg, S, n_cblk;                      // positions per segment, segments, 32-channel blocks
  double eps;
  T *mean, *max, *std, *y;                     // outputs in x's dtype (y: dct_pool), each may be null
  int64_t* argmax;
  A *mean_acc, *std_acc;
  int64_t *pn, *pidx;                          // (S, B * C) segment partials when S > 1
  A *psum, *pmean, *pm2, *pmx;
};

template <typename T, bool kMax, bool kStd, bool kW>
__device__ __forceinline__ void finish(const Stat<acc<T>>& st, int64_t bc, acc<T> K, const FwdArgs<T>& p) {
  using A = acc<T>;
  if (kW) {
    p.y[bc] = from_acc<T>(st.sum);
    return;
  }
  const double mean = static_cast<double>(K) + static_cast<double>(st.sum) / static_cast<double>(p.HW);
  if (p.mean) p.mean[bc] = dev_from_double<T>(mean);
  if (p.mean_acc) p.mean_acc[bc] = static_cast<A>(mean);
  if (kMax) {
    if (p.max) p.max[bc] = from_acc<T>(st.mx);
    if (p.argmax) p.argmax[bc] = st.idx;
  }
  if (kStd) {
    const double sd = sqrt(static_cast<double>(st.m2) / static_cast<double>(p.HW - 1) + p.eps);
    if (p.std) p.std[bc] = dev_from_double<T>(sd);
    if (p.std_acc) p.std_acc[bc] = static_cast<A>(sd);
  }
}

// The statistic of plane bc is complete (S == 1), or segment s of it is (S > 1: a partial).
template <typename T, bool kMax, bool kStd, bool kW>
__device__ __forceinline__ void emit(const Stat<acc<T>>& st, int64_t bc, int64_t s, acc<T> K, const FwdArgs<T>& p) {
  if (p.S == 1) return finish<T, kMax, kStd, kW>(st, bc, K, p);
  const int64_t k = s * p.BC + bc;
  p.pn[k] = st.n;
  p.psum[k] = st.sum;
  if (kStd) p.pmean[k] = st.mean, p.pm2[k] = st.m2;
  if (kMax) p.pmx[k] = st.mx, p.pidx[k] = st.idx;
}

// ---------------------------------------------------------------------------------------------
// forward kernels
// ---------------------------------------------------------------------------------------------

// NCHW: warp `threadIdx.x / 32` of block x takes plane bc = 8 x + warp; block y is the segment.
template <typename T, bool kMax, bool kStd, bool kW>
__global__ void __launch_bounds__(kThreads) fwd_plane_kernel(FwdArgs<T> p) {
  using A = acc<T>;
  constexpr int V = kVec16<T>;
  const int lane = threadIdx.x & 31;
  const int64_t bc = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (bc >= p.BC) return;                      // a whole warp: no block-wide barrier below
  const int64_t s = blockIdx.y;
  const int64_t p0 = s * p.seg, p1 = lmin(p.HW, p0 + p.seg);
  const int64_t b = bc / p.C, c = bc % p.C;
  const T* __restrict__ px = p.x + b * p.sxb + c * p.sxc;
  const A* __restrict__ pw = kW ? p.w + c * p.swc : nullptr;
  const A K = kStd ? shift_of(to_acc(px[0])) : A(0);
  Stat<A> st = stat_empty<A>();
  // scalar head up to the first 16-byte boundary, 16-byte packs, scalar tail
  const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(px + p0) & 15) / sizeof(T));
  const int64_t head = mis ? lmin((V - mis) % V, p1 - p0) : 0;
  if (lane < head) {
    const int64_t i = p0 + lane;
    push1<A, kMax, kStd>(st, to_acc(px[i]) * (kW ? pw[i] : A(1)), K, i);
  }
  const int64_t q0 = p0 + head;
  const int64_t nvec = (p1 - q0) / V;
  for (int64_t k = lane; k < nvec; k += 32) {
    const int64_t i = q0 + k * V;
    const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(px + i);
    A v[V];
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = to_acc(pk.v[j]) * (kW ? pw[i + j] : A(1));
    push<A, kMax, kStd, V>(st, v, K, i);
  }
  for (int64_t i = q0 + nvec * V + lane; i < p1; i += 32)
    push1<A, kMax, kStd>(st, to_acc(px[i]) * (kW ? pw[i] : A(1)), K, i);
  st = warp_merge<A, kMax, kStd>(st);
  if (lane == 0) emit<T, kMax, kStd, kW>(st, bc, s, K, p);
}

// channels_last: block x = (sample, 32-channel block), block y = pixel segment. Lane = channel,
// warp = every 8th pixel of the segment; the 8 warps merge in shared memory in order.
template <typename T, bool kMax, bool kStd, bool kW>
__global__ void __launch_bounds__(kThreads) fwd_channels_kernel(FwdArgs<T> p) {
  using A = acc<T>;
  __shared__ Stat<A> part[kWarps][32];
  const int lane = threadIdx.x & 31, row = threadIdx.x >> 5;
  const int64_t b = blockIdx.x / p.n_cblk;
  const int64_t c = (blockIdx.x % p.n_cblk) * 32 + lane;
  const int64_t s = blockIdx.y;
  const int64_t p0 = s * p.seg, p1 = lmin(p.HW, p0 + p.seg);
  Stat<A> st = stat_empty<A>();
  A K = A(0);
  if (c < p.C) {
    const T* __restrict__ px = p.x + b * p.sxb + c * p.sxc;
    const A* __restrict__ pw = kW ? p.w + c * p.swc : nullptr;
    if (kStd) K = shift_of(to_acc(px[0]));
    int64_t i = p0 + row;
    int64_t h = i / p.W, w = i % p.W;
    const int64_t dh = kWarps / p.W, dw = kWarps % p.W;
    for (; i < p1; i += kWarps) {
      A v = to_acc(px[h * p.sxh + w * p.sxw]);
      if (kW) v *= pw[h * p.swh + w * p.sww];
      push1<A, kMax, kStd>(st, v, K, i);
      h += dh;
      w += dw;
      if (w >= p.W) w -= p.W, ++h;
    }
  }
  part[row][lane] = st;
  __syncthreads();
  if (row == 0 && c < p.C) {
    for (int r = 1; r < kWarps; ++r) merge<A, kMax, kStd>(st, part[r][lane]);
    emit<T, kMax, kStd, kW>(st, b * p.C + c, s, K, p);
  }
}

// Any other strides: a thread per plane.
template <typename T, bool kMax, bool kStd, bool kW>
__global__ void __launch_bounds__(kThreads) fwd_generic_kernel(FwdArgs<T> p) {
  using A = acc<T>;
  const int64_t bc = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (bc >= p.BC) return;
  const int64_t b = bc / p.C, c = bc % p.C;
  const A K = kStd ? shift_of(to_acc(p.x[b * p.sxb + c * p.sxc])) : A(0);
  Stat<A> st = stat_empty<A>();
  for (int64_t h = 0; h < p.H; ++h)
    for (int64_t w = 0; w < p.W; ++w) {
      A v = to_acc(p.x[b * p.sxb + c * p.sxc + h * p.sxh + w * p.sxw]);
      if (kW) v *= p.w[c * p.swc + h * p.swh + w * p.sww];
      push1<A, kMax, kStd>(st, v, K, h * p.W + w);
    }
  finish<T, kMax, kStd, kW>(st, bc, K, p);
}

// Segment partials -> results: a thread per plane merges its S segments in order.
template <typename T, bool kMax, bool kStd, bool kW>
__global__ void __launch_bounds__(kThreads) fwd_finish_kernel(FwdArgs<T> p) {
  using A = acc<T>;
  const int64_t bc = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (bc >= p.BC) return;
  Stat<A> st = stat_empty<A>();
  for (int64_t s = 0; s < p.S; ++s) {
    const int64_t k = s * p.BC + bc;
    Stat<A> t = stat_empty<A>();
    t.n = p.pn[k];
    t.sum = p.psum[k];
    if (kStd) t.mean = p.pmean[k], t.m2 = p.pm2[k];
    if (kMax) t.mx = p.pmx[k], t.idx = p.pidx[k];
    merge<A, kMax, kStd>(st, t);
  }
  const A K = kStd ? shift_of(to_acc(p.x[(bc / p.C) * p.sxb + (bc % p.C) * p.sxc])) : A(0);
  finish<T, kMax, kStd, kW>(st, bc, K, p);
}

// ---------------------------------------------------------------------------------------------
// forward planning and launch
// ---------------------------------------------------------------------------------------------

enum class Layout { Plane, Channels, Generic };

struct FwdPlan {
  Layout layout;
  int64_t seg, S, n_cblk;
  size_t ws_bytes;
};

// Layout, segments and workspace. Plane: a warp per segment of >= 2048 positions, segments only
// while the warps do not fill the device (64 per SM); channels: blocks of 32 channels and >= 64
// pixels, segments while the blocks do not fill it (8 per SM).
FwdPlan plan_fwd(int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, const Strides4* sw, size_t acc_bytes) {
  FwdPlan pl{Layout::Generic, H * W, 1, 1, 0};
  const int64_t HW = H * W, BC = B * C;
  if (BC == 0 || HW == 0) return pl;
  const int64_t sm = sm_count();
  if (plane_contiguous(sx, H, W) && (!sw || plane_contiguous(*sw, H, W))) {
    pl.layout = Layout::Plane;
    const int64_t want = ceil_div(sm * 64, BC);
    pl.S = std::max<int64_t>(1, std::min({want, ceil_div(HW, 2048), kMaxGridYZ}));
  } else if (channels_contiguous(sx, C) && (!sw || channels_contiguous(*sw, C))) {
    pl.layout = Layout::Channels;
    pl.n_cblk = ceil_div(C, 32);
    const int64_t want = ceil_div(sm * 8, B * pl.n_cblk);
    pl.S = std::max<int64_t>(1, std::min({want, ceil_div(HW, 64), kMaxGridYZ}));
  }
  pl.seg = ceil_div(HW, pl.S);
  pl.S = ceil_div(HW, pl.seg);
  if (pl.S > 1) pl.ws_bytes = static_cast<size_t>(pl.S * BC) * (2 * sizeof(int64_t) + 4 * acc_bytes);
  return pl;
}

template <typename T, bool kMax, bool kStd, bool kW>
cudaError_t launch_fwd(FwdArgs<T> p, const FwdPlan& pl, cudaStream_t stream) {
  if (pl.layout == Layout::Plane) {
    const int64_t blocks = ceil_div(p.BC, kWarps);
    if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
    fwd_plane_kernel<T, kMax, kStd, kW>
        <<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(pl.S)), kThreads, 0, stream>>>(p);
  } else if (pl.layout == Layout::Channels) {
    const int64_t blocks = p.B * pl.n_cblk;
    if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
    fwd_channels_kernel<T, kMax, kStd, kW>
        <<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(pl.S)), kThreads, 0, stream>>>(p);
  } else {
    const int64_t blocks = ceil_div(p.BC, kThreads);
    if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
    fwd_generic_kernel<T, kMax, kStd, kW><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || pl.S == 1) return err;
  const int64_t blocks = ceil_div(p.BC, kThreads);
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  fwd_finish_kernel<T, kMax, kStd, kW><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// Point the partial arrays into the workspace (int64 arrays first: 8-byte aligned throughout).
template <typename T>
bool carve(FwdArgs<T>& p, const FwdPlan& pl, void* ws, size_t ws_bytes) {
  using A = acc<T>;
  if (pl.S == 1) return true;
  if (!ws || ws_bytes < pl.ws_bytes || !aligned(ws, 16)) return false;
  const size_t n = static_cast<size_t>(pl.S * p.BC);
  char* c = static_cast<char*>(ws);
  p.pn = reinterpret_cast<int64_t*>(c), c += n * sizeof(int64_t);
  p.pidx = reinterpret_cast<int64_t*>(c), c += n * sizeof(int64_t);
  p.psum = reinterpret_cast<A*>(c), c += n * sizeof(A);
  p.pmean = reinterpret_cast<A*>(c), c += n * sizeof(A);
  p.pm2 = reinterpret_cast<A*>(c), c += n * sizeof(A);
  p.pmx = reinterpret_cast<A*>(c);
  return true;
}

template <typename T>
FwdArgs<T> fwd_args(const void* x, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx) {
  FwdArgs<T> p{};
  p.x = static_cast<const T*>(x);
  p.B = B, p.C = C, p.H = H, p.W = W, p.HW = H * W, p.BC = B * C;
  p.sxb = sx.b, p.sxc = sx.c, p.sxh = sx.h, p.sxw = sx.w;
  return p;
}

template <typename T>
cudaError_t pool_fwd_typed(const void* x, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, double eps,
                           const PoolOutputs& o, void* ws, size_t ws_bytes, cudaStream_t stream) {
  using A = acc<T>;
  if (B * C == 0 || H * W == 0) return cudaSuccess;   // (the glue fills the H * W == 0 results)
  FwdArgs<T> p = fwd_args<T>(x, B, C, H, W, sx);
  p.eps = eps;
  p.mean = static_cast<T*>(o.mean), p.max = static_cast<T*>(o.max), p.std = static_cast<T*>(o.std);
  p.argmax = o.argmax;
  p.mean_acc = static_cast<A*>(o.mean_acc), p.std_acc = static_cast<A*>(o.std_acc);
  const FwdPlan pl = plan_fwd(B, C, H, W, sx, nullptr, sizeof(A));
  p.seg = pl.seg, p.S = pl.S, p.n_cblk = pl.n_cblk;
  if (!carve(p, pl, ws, ws_bytes)) return cudaErrorInvalidValue;
  const bool mx = o.max || o.argmax, sd = o.std || o.std_acc;
  if (mx && sd) return launch_fwd<T, true, true, false>(p, pl, stream);
  if (mx) return launch_fwd<T, true, false, false>(p, pl, stream);
  if (sd) return launch_fwd<T, false, true, false>(p, pl, stream);
  return launch_fwd<T, false, false, false>(p, pl, stream);
}

template <typename T>
cudaError_t dct_fwd_typed(const void* x, const void* w, void* y, int64_t B, int64_t C, int64_t H, int64_t W,
                          Strides4 sx, Strides4 sw, void* ws, size_t ws_bytes, cudaStream_t stream) {
  using A = acc<T>;
  if (B * C == 0 || H * W == 0) return cudaSuccess;   // (the glue zero-fills y when H * W == 0)
  FwdArgs<T> p = fwd_args<T>(x, B, C, H, W, sx);
  p.w = static_cast<const A*>(w);
  p.swc = sw.c, p.swh = sw.h, p.sww = sw.w;
  p.y = static_cast<T*>(y);
  const FwdPlan pl = plan_fwd(B, C, H, W, sx, &sw, sizeof(A));
  p.seg = pl.seg, p.S = pl.S, p.n_cblk = pl.n_cblk;
  if (!carve(p, pl, ws, ws_bytes)) return cudaErrorInvalidValue;
  return launch_fwd<T, false, false, true>(p, pl, stream);
}

// ---------------------------------------------------------------------------------------------
// channel_pool backward: dx = a + k (x - m) + [p == idx] g, elementwise
// ---------------------------------------------------------------------------------------------

template <typename T>
struct BwdArgs {
  using A = acc<T>;
  const T* x;
  T* dx;
  int64_t C, H, W, HW, BC;
  int64_t sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw;
  const A *dmean, *dmax, *dstd, *mean, *std;
  const int64_t* argmax;
  int64_t seg, n_cblk;
};

template <typename A>
struct PlaneGrad {
  A a, k, m, g;
  int64_t idx;
};

template <typename T>
__device__ __forceinline__ PlaneGrad<acc<T>> plane_grad(const BwdArgs<T>& p, int64_t bc) {
  using A = acc<T>;
  PlaneGrad<A> q{A(0), A(0), A(0), A(0), -1};
  if (p.dmean) q.a = static_cast<A>(static_cast<double>(p.dmean[bc]) / static_cast<double>(p.HW));
  if (p.dstd) {
    q.k = static_cast<A>(static_cast<double>(p.dstd[bc]) /
                         (static_cast<double>(p.HW - 1) * static_cast<double>(p.std[bc])));
    q.m = p.mean[bc];
  }
  if (p.dmax) q.g = p.dmax[bc], q.idx = p.argmax[bc];
  return q;
}

template <typename A, bool kStd>
__device__ __forceinline__ A grad_at(const PlaneGrad<A>& q, A xv, int64_t i) {
  A v = kStd ? q.a + q.k * (xv - q.m) : q.a;
  return i == q.idx ? v + q.g : v;
}

// NCHW: warp per (plane, segment) as in the forward; 16-byte stores of dx after a scalar head,
// 16-byte loads of x when it shares dx's alignment within the plane (kVecX).
template <typename T, bool kStd, bool kVecX>
__global__ void __launch_bounds__(kThreads) bwd_plane_kernel(BwdArgs<T> p) {
  using A = acc<T>;
  constexpr int V = kVec16<T>;
  const int lane = threadIdx.x & 31;
  const int64_t bc = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (bc >= p.BC) return;
  const int64_t b = bc / p.C, c = bc % p.C;
  const PlaneGrad<A> q = plane_grad(p, bc);
  T* __restrict__ pd = p.dx + b * p.sdb + c * p.sdc;
  const T* __restrict__ px = kStd ? p.x + b * p.sxb + c * p.sxc : nullptr;
  for (int64_t s = blockIdx.y; s * p.seg < p.HW; s += gridDim.y) {
    const int64_t p0 = s * p.seg, p1 = lmin(p.HW, p0 + p.seg);
    const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(pd + p0) & 15) / sizeof(T));
    const int64_t head = mis ? lmin((V - mis) % V, p1 - p0) : 0;
    if (lane < head) {
      const int64_t i = p0 + lane;
      pd[i] = from_acc<T>(grad_at<A, kStd>(q, kStd ? to_acc(px[i]) : A(0), i));
    }
    const int64_t q0 = p0 + head;
    const int64_t nvec = (p1 - q0) / V;
    for (int64_t k = lane; k < nvec; k += 32) {
      const int64_t i = q0 + k * V;
      A xv[V];
      if (kStd && kVecX) {
        const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(px + i);
#pragma unroll
        for (int j = 0; j < V; ++j) xv[j] = to_acc(pk.v[j]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) xv[j] = kStd ? to_acc(px[i + j]) : A(0);
      }
      Pack<T, V> out;
#pragma unroll
      for (int j = 0; j < V; ++j) out.v[j] = from_acc<T>(grad_at<A, kStd>(q, xv[j], i + j));
      *reinterpret_cast<Pack<T, V>*>(pd + i) = out;
    }
    for (int64_t i = q0 + nvec * V + lane; i < p1; i += 32)
      pd[i] = from_acc<T>(grad_at<A, kStd>(q, kStd ? to_acc(px[i]) : A(0), i));
  }
}

// channels_last: block x = (sample, 32-channel block), block y = pixel segment; lane = channel.
template <typename T, bool kStd>
__global__ void __launch_bounds__(kThreads) bwd_channels_kernel(BwdArgs<T> p) {
  using A = acc<T>;
  const int lane = threadIdx.x & 31, row = threadIdx.x >> 5;
  const int64_t b = blockIdx.x / p.n_cblk;
  const int64_t c = (blockIdx.x % p.n_cblk) * 32 + lane;
  if (c >= p.C) return;                        // no barrier in this kernel
  const PlaneGrad<A> q = plane_grad(p, b * p.C + c);
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * p.seg, p1 = lmin(p.HW, p0 + p.seg);
  T* __restrict__ pd = p.dx + b * p.sdb + c * p.sdc;
  const T* __restrict__ px = kStd ? p.x + b * p.sxb + c * p.sxc : nullptr;
  int64_t i = p0 + row;
  int64_t h = i / p.W, w = i % p.W;
  const int64_t dh = kWarps / p.W, dw = kWarps % p.W;
  for (; i < p1; i += kWarps) {
    const A xv = kStd ? to_acc(px[h * p.sxh + w * p.sxw]) : A(0);
    pd[h * p.sdh + w * p.sdw] = from_acc<T>(grad_at<A, kStd>(q, xv, i));
    h += dh;
    w += dw;
    if (w >= p.W) w -= p.W, ++h;
  }
}

// Any other strides: a thread per element (grid-stride).
template <typename T, bool kStd>
__global__ void __launch_bounds__(kThreads) bwd_generic_kernel(BwdArgs<T> p) {
  using A = acc<T>;
  const int64_t n = p.BC * p.HW;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t bc = e / p.HW, i = e % p.HW;
    const int64_t b = bc / p.C, c = bc % p.C, h = i / p.W, w = i % p.W;
    const PlaneGrad<A> q = plane_grad(p, bc);
    const A xv = kStd ? to_acc(p.x[b * p.sxb + c * p.sxc + h * p.sxh + w * p.sxw]) : A(0);
    p.dx[b * p.sdb + c * p.sdc + h * p.sdh + w * p.sdw] = from_acc<T>(grad_at<A, kStd>(q, xv, i));
  }
}

template <typename T, bool kStd>
cudaError_t launch_bwd(BwdArgs<T> p, Strides4 sx, Strides4 sdx, cudaStream_t stream) {
  using A = acc<T>;
  (void)sizeof(A);
  const int64_t B = p.BC / p.C;
  if (plane_contiguous(sdx, p.H, p.W) && (!kStd || plane_contiguous(sx, p.H, p.W))) {
    p.seg = std::max<int64_t>(4096, ceil_div(p.HW, kMaxGridYZ));
    const int64_t S = std::min(ceil_div(p.HW, p.seg), kMaxGridYZ);
    const int64_t blocks = ceil_div(p.BC, kWarps);
    if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(S));
    // x shares dx's offset within 16 bytes in every plane when the pointers and the (b, c) steps agree
    const size_t e = sizeof(T);
    const bool vec_x = kStd && (reinterpret_cast<uintptr_t>(p.x) - reinterpret_cast<uintptr_t>(p.dx)) % 16 == 0 &&
                       ((p.sxb - p.sdb) * static_cast<int64_t>(e)) % 16 == 0 &&
                       ((p.sxc - p.sdc) * static_cast<int64_t>(e)) % 16 == 0;
    if (vec_x) bwd_plane_kernel<T, kStd, true><<<grid, kThreads, 0, stream>>>(p);
    else bwd_plane_kernel<T, kStd, false><<<grid, kThreads, 0, stream>>>(p);
  } else if (channels_contiguous(sdx, p.C) && (!kStd || channels_contiguous(sx, p.C))) {
    p.n_cblk = ceil_div(p.C, 32);
    const int64_t want = ceil_div(static_cast<int64_t>(sm_count()) * 8, B * p.n_cblk);
    int64_t S = std::max<int64_t>(1, std::min({want, ceil_div(p.HW, 64), kMaxGridYZ}));
    p.seg = ceil_div(p.HW, S);
    S = ceil_div(p.HW, p.seg);
    const int64_t blocks = B * p.n_cblk;
    if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
    bwd_channels_kernel<T, kStd>
        <<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(S)), kThreads, 0, stream>>>(p);
  } else {
    const int64_t blocks = lmin(ceil_div(p.BC * p.HW, kThreads), int64_t(1) << 20);
    bwd_generic_kernel<T, kStd><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t pool_bwd_typed(const void* x, void* dx, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                           Strides4 sdx, const PoolGrads& g, cudaStream_t stream) {
  using A = acc<T>;
  if (B * C * H * W == 0) return cudaSuccess;
  BwdArgs<T> p{};
  p.x = static_cast<const T*>(x);
  p.dx = static_cast<T*>(dx);
  p.C = C, p.H = H, p.W = W, p.HW = H * W, p.BC = B * C;
  p.sxb = sx.b, p.sxc = sx.c, p.sxh = sx.h, p.sxw = sx.w;
  p.sdb = sdx.b, p.sdc = sdx.c, p.sdh = sdx.h, p.sdw = sdx.w;
  p.dmean = static_cast<const A*>(g.dmean), p.dmax = static_cast<const A*>(g.dmax);
  p.dstd = static_cast<const A*>(g.dstd), p.mean = static_cast<const A*>(g.mean), p.std = static_cast<const A*>(g.std);
  p.argmax = g.argmax;
  if (g.dstd) return launch_bwd<T, true>(p, sx, sdx, stream);
  return launch_bwd<T, false>(p, sx, sdx, stream);
}

// ---------------------------------------------------------------------------------------------
// dct_pool backward: dx = dy[b, c] * w[c];  dw[c] = sum_b dy[b, c] * x[b, c]
// ---------------------------------------------------------------------------------------------

// The (C, H, W) elements of w / dw are walked as (outer, inner) with a unit inner stride: NCHW
// order (outer = c, inner = h * W + w) or channels_last order (outer = h * W + w, inner = c). A
// thread owns V consecutive inner elements and loops over the samples of its batch split (block
// y), so dw needs no atomics: splits write partial slabs added in order by a second kernel.
template <typename T>
struct DctBwdArgs {
  using A = acc<T>;
  const A* dy;
  const A* w;
  const T* x;
  T* dx;
  A* dw;                                      // final dw (S == 1) or the partial slabs (S > 1)
  int64_t B, C, n_out, n_in, bper;
  int64_t swo, sxb, sxo, sdb, sdo, sdwo;      // outer / batch strides (inner stride 1)
  int64_t swi, sxi, sdi, sdwi;                // inner strides (1 on the vector path)
};

template <typename T, bool kDx, bool kDw, bool kCL, int V>
__global__ void __launch_bounds__(kThreads) dct_bwd_kernel(DctBwdArgs<T> p) {
  using A = acc<T>;
  const int64_t groups = p.n_in / V;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= p.n_out * groups) return;
  const int64_t o = t / groups, i = (t % groups) * V;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * p.bper, b1 = lmin(p.B, b0 + p.bper);
  A wv[V], accv[V];
#pragma unroll
  for (int j = 0; j < V; ++j) accv[j] = A(0);
  if (kDx) {
    if (V > 1) {
      const Pack<A, V> pk = *reinterpret_cast<const Pack<A, V>*>(p.w + o * p.swo + i);
#pragma unroll
      for (int j = 0; j < V; ++j) wv[j] = pk.v[j];
    } else {
      wv[0] = p.w[o * p.swo + i * p.swi];
    }
  }
  for (int64_t b = b0; b < b1; ++b) {
    A g[V];
#pragma unroll
    for (int j = 0; j < V; ++j) g[j] = kCL ? p.dy[b * p.C + i + j] : p.dy[b * p.C + o];
    if (kDx) {
      Pack<T, V> out;
#pragma unroll
      for (int j = 0; j < V; ++j) out.v[j] = from_acc<T>(g[j] * wv[j]);
      if (V > 1) *reinterpret_cast<Pack<T, V>*>(p.dx + b * p.sdb + o * p.sdo + i) = out;
      else p.dx[b * p.sdb + o * p.sdo + i * p.sdi] = out.v[0];
    }
    if (kDw) {
      A xv[V];
      if (V > 1) {
        const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p.x + b * p.sxb + o * p.sxo + i);
#pragma unroll
        for (int j = 0; j < V; ++j) xv[j] = to_acc(pk.v[j]);
      } else {
        xv[0] = to_acc(p.x[b * p.sxb + o * p.sxo + i * p.sxi]);
      }
#pragma unroll
      for (int j = 0; j < V; ++j) accv[j] += g[j] * xv[j];
    }
  }
  if (kDw) {
    if (gridDim.y == 1) {
#pragma unroll
      for (int j = 0; j < V; ++j) p.dw[o * p.sdwo + (i + j) * p.sdwi] = accv[j];
    } else {
      A* slab = p.dw + static_cast<int64_t>(blockIdx.y) * p.n_out * p.n_in + o * p.n_in + i;
#pragma unroll
      for (int j = 0; j < V; ++j) slab[j] = accv[j];
    }
  }
}

// dw[o, i] = sum over the S slabs in order (double), a thread per element.
template <typename A>
__global__ void __launch_bounds__(kThreads) dct_dw_sum_kernel(const A* __restrict__ slabs, A* __restrict__ dw,
                                                              int64_t S, int64_t n_out, int64_t n_in, int64_t sdwo,
                                                              int64_t sdwi) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= n_out * n_in) return;
  double t = 0;
  for (int64_t s = 0; s < S; ++s) t += static_cast<double>(slabs[s * n_out * n_in + e]);
  dw[(e / n_in) * sdwo + (e % n_in) * sdwi] = static_cast<A>(t);
}

// Layouts that match neither order: a thread per (c, h, w) over all samples.
template <typename T, bool kDx, bool kDw>
__global__ void __launch_bounds__(kThreads) dct_bwd_generic_kernel(const acc<T>* __restrict__ dy,
                                                                   const acc<T>* __restrict__ w,
                                                                   const T* __restrict__ x, T* __restrict__ dx,
                                                                   acc<T>* __restrict__ dw, int64_t B, int64_t C,
                                                                   int64_t H, int64_t W, Strides4 sw, Strides4 sx,
                                                                   Strides4 sdx, Strides4 sdw) {
  using A = acc<T>;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= C * H * W) return;
  const int64_t c = e / (H * W), hw = e % (H * W), h = hw / W, ww = hw % W;
  const A wv = kDx ? w[c * sw.c + h * sw.h + ww * sw.w] : A(0);
  A a = 0;
  for (int64_t b = 0; b < B; ++b) {
    const A g = dy[b * C + c];
    if (kDx) dx[b * sdx.b + c * sdx.c + h * sdx.h + ww * sdx.w] = from_acc<T>(g * wv);
    if (kDw) a += g * to_acc(x[b * sx.b + c * sx.c + h * sx.h + ww * sx.w]);
  }
  if (kDw) dw[c * sdw.c + h * sdw.h + ww * sdw.w] = a;
}

// How a dct backward runs: order (NCHW / channels_last / generic), batch splits, and (at launch,
// from the pointers) the vector width. The splits depend on the shape alone, so the workspace
// size is known before the pointers are.
struct DctBwdPlan {
  int order;                                  // 0 NCHW, 1 channels_last, 2 generic
  int64_t n_out, n_in, S, bper;
  size_t ws_bytes;
};

// Flat pixel stride of a tensor whose H x W flattens (NCHW-like or channels_last-like).
inline int64_t pixel_stride(const Strides4& s, int64_t H, int64_t W) { return (H == 1 || W != 1) ? s.w : s.h; }
inline bool flattens(const Strides4& s, int64_t H, int64_t W) { return H == 1 || W == 1 || s.h == W * s.w; }

template <typename T> constexpr int kDctVec = sizeof(T) == 8 ? 2 : 4;   // 16 bytes of w per thread

template <typename T>
DctBwdPlan plan_dct_bwd(bool kdx, bool kdw, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sw, Strides4 sx,
                        Strides4 sdx, Strides4 sdw) {
  using A = acc<T>;
  DctBwdPlan pl{2, C, H * W, 1, B, 0};
  const bool plane = plane_contiguous(sw, H, W) && (!kdx || plane_contiguous(sdx, H, W)) &&
                     (!kdw || (plane_contiguous(sx, H, W) && plane_contiguous(sdw, H, W)));
  const bool chan = !plane && channels_contiguous(sw, C) && (!kdx || channels_contiguous(sdx, C)) &&
                    (!kdw || (channels_contiguous(sx, C) && channels_contiguous(sdw, C))) && flattens(sw, H, W) &&
                    (!kdx || flattens(sdx, H, W)) && (!kdw || (flattens(sx, H, W) && flattens(sdw, H, W)));
  if (plane) pl.order = 0, pl.n_out = C, pl.n_in = H * W;
  if (chan) pl.order = 1, pl.n_out = H * W, pl.n_in = C;
  if (pl.order == 2 || B == 0) return pl;     // generic: one pass over all samples, no split
  // split the batch while the (outer, inner / V) threads do not fill the device (2048 per SM)
  const int64_t threads = lmax(1, pl.n_out * ceil_div(pl.n_in, kDctVec<T>));
  const int64_t want = ceil_div(static_cast<int64_t>(sm_count()) * 2048, threads);
  pl.S = std::max<int64_t>(1, std::min({want, B, kMaxGridYZ}));
  pl.bper = ceil_div(B, pl.S);
  pl.S = ceil_div(B, pl.bper);
  if (kdw && pl.S > 1) pl.ws_bytes = static_cast<size_t>(pl.S * pl.n_out * pl.n_in) * sizeof(A);
  return pl;
}

// 16-byte accesses (8 for 16-bit x) when the inner length, every outer / batch step and every
// pointer allow them.
template <typename T>
bool dct_vectors_fit(const DctBwdPlan& pl, const void* w, const void* x, const void* dx, const void* dw, bool to_ws,
                     int64_t swo, int64_t sxb, int64_t sxo, int64_t sdb, int64_t sdo, int64_t sdwo) {
  using A = acc<T>;
  constexpr int V = kDctVec<T>;
  bool ok = pl.n_in % V == 0 && aligned(w, sizeof(A) * V) && swo % V == 0;
  if (dx) ok = ok && aligned(dx, sizeof(T) * V) && sdo % V == 0 && sdb % V == 0;
  if (x) ok = ok && aligned(x, sizeof(T) * V) && sxo % V == 0 && sxb % V == 0 && (to_ws || (aligned(dw, sizeof(A) * V) &&
                                                                                              sdwo % V == 0));
  return ok;
}

template <typename T, bool kDx, bool kDw, bool kCL, int V>
cudaError_t launch_dct_bwd_v(const DctBwdArgs<T>& p, const DctBwdPlan& pl, cudaStream_t stream) {
  const int64_t blocks = ceil_div(pl.n_out * (pl.n_in / V), kThreads);
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  dct_bwd_kernel<T, kDx, kDw, kCL, V>
      <<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(pl.S)), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, bool kDx, bool kDw>
cudaError_t launch_dct_bwd(const DctBwdArgs<T>& p, const DctBwdPlan& pl, bool vec, cudaStream_t stream) {
  constexpr int V = kDctVec<T>;
  if (pl.order == 1)
    return vec ? launch_dct_bwd_v<T, kDx, kDw, true, V>(p, pl, stream)
               : launch_dct_bwd_v<T, kDx, kDw, true, 1>(p, pl, stream);
  return vec ? launch_dct_bwd_v<T, kDx, kDw, false, V>(p, pl, stream)
             : launch_dct_bwd_v<T, kDx, kDw, false, 1>(p, pl, stream);
}

template <typename T>
cudaError_t dct_bwd_typed(const void* dy, const void* w, const void* x, void* dx, void* dw, int64_t B, int64_t C,
                          int64_t H, int64_t W, Strides4 sw, Strides4 sx, Strides4 sdx, Strides4 sdw, void* ws,
                          size_t ws_bytes, cudaStream_t stream) {
  using A = acc<T>;
  const bool kdx = dx != nullptr, kdw = x != nullptr;
  if ((!kdx && !kdw) || C * H * W == 0) return cudaSuccess;
  if (B == 0) return cudaSuccess;             // an empty batch: dw is zero (the glue fills it)
  const DctBwdPlan pl = plan_dct_bwd<T>(kdx, kdw, B, C, H, W, sw, sx, sdx, sdw);
  if (pl.order == 2) {
    const int64_t blocks = ceil_div(C * H * W, kThreads);
    if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
    const auto* g = static_cast<const A*>(dy);
    const auto* wp = static_cast<const A*>(w);
    const auto* xp = static_cast<const T*>(x);
    auto* dxp = static_cast<T*>(dx);
    auto* dwp = static_cast<A*>(dw);
    if (kdx && kdw)
      dct_bwd_generic_kernel<T, true, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          g, wp, xp, dxp, dwp, B, C, H, W, sw, sx, sdx, sdw);
    else if (kdx)
      dct_bwd_generic_kernel<T, true, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          g, wp, xp, dxp, dwp, B, C, H, W, sw, sx, sdx, sdw);
    else
      dct_bwd_generic_kernel<T, false, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          g, wp, xp, dxp, dwp, B, C, H, W, sw, sx, sdx, sdw);
    return cudaGetLastError();
  }
  if (kdw && pl.S > 1 && (!ws || ws_bytes < pl.ws_bytes || !aligned(ws, 16))) return cudaErrorInvalidValue;
  DctBwdArgs<T> p{};
  p.dy = static_cast<const A*>(dy);
  p.w = static_cast<const A*>(w);
  p.x = static_cast<const T*>(x);
  p.dx = static_cast<T*>(dx);
  p.dw = kdw ? (pl.S > 1 ? static_cast<A*>(ws) : static_cast<A*>(dw)) : nullptr;
  p.B = B, p.C = C, p.n_out = pl.n_out, p.n_in = pl.n_in, p.bper = pl.bper;
  const bool nchw = pl.order == 0;
  auto outer = [&](const Strides4& s) { return nchw ? s.c : pixel_stride(s, H, W); };
  auto inner = [&](const Strides4& s) { return nchw ? pixel_stride(s, H, W) : s.c; };
  p.swo = outer(sw), p.swi = inner(sw);
  if (kdx) p.sdb = sdx.b, p.sdo = outer(sdx), p.sdi = inner(sdx);
  if (kdw) p.sxb = sx.b, p.sxo = outer(sx), p.sxi = inner(sx), p.sdwo = outer(sdw), p.sdwi = inner(sdw);
  const bool vec = dct_vectors_fit<T>(pl, w, x, dx, dw, pl.S > 1, p.swo, p.sxb, p.sxo, p.sdb, p.sdo, p.sdwo);
  cudaError_t err;
  if (kdx && kdw) err = launch_dct_bwd<T, true, true>(p, pl, vec, stream);
  else if (kdx) err = launch_dct_bwd<T, true, false>(p, pl, vec, stream);
  else err = launch_dct_bwd<T, false, true>(p, pl, vec, stream);
  if (err != cudaSuccess || !kdw || pl.S == 1) return err;
  const int64_t blocks = ceil_div(pl.n_out * pl.n_in, kThreads);
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  dct_dw_sum_kernel<A><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const A*>(ws), static_cast<A*>(dw), pl.S, pl.n_out, pl.n_in, outer(sdw), inner(sdw));
  return cudaGetLastError();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// type dispatch
// ---------------------------------------------------------------------------------------------

#define FA_TYPES(M) \
  M(Float32, float) M(Float64, double) M(Float16, __half) M(BFloat16, __nv_bfloat16)

size_t channel_pool_workspace_bytes(DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                                    bool with_max, bool with_std) {
  (void)with_max, (void)with_std;
  const size_t acc_bytes = dtype == DType::Float64 ? sizeof(double) : sizeof(float);
  return plan_fwd(B, C, H, W, sx, nullptr, acc_bytes).ws_bytes;
}

cudaError_t channel_pool_forward_cuda(const void* x, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                                      Strides4 sx, double eps, const PoolOutputs& out, void* workspace,
                                      size_t workspace_bytes, cudaStream_t stream) {
  switch (dtype) {
#define FA_CASE(TAG, T) \
  case DType::TAG: return pool_fwd_typed<T>(x, B, C, H, W, sx, eps, out, workspace, workspace_bytes, stream);
    FA_TYPES(FA_CASE)
#undef FA_CASE
  }
  return cudaErrorInvalidValue;
}

cudaError_t channel_pool_backward_cuda(const void* x, void* dx, DType dtype, int64_t B, int64_t C, int64_t H,
                                       int64_t W, Strides4 sx, Strides4 sdx, const PoolGrads& g, cudaStream_t stream) {
  switch (dtype) {
#define FA_CASE(TAG, T) \
  case DType::TAG: return pool_bwd_typed<T>(x, dx, B, C, H, W, sx, sdx, g, stream);
    FA_TYPES(FA_CASE)
#undef FA_CASE
  }
  return cudaErrorInvalidValue;
}

size_t dct_pool_forward_workspace_bytes(DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                                        Strides4 sw) {
  const size_t acc_bytes = dtype == DType::Float64 ? sizeof(double) : sizeof(float);
  return plan_fwd(B, C, H, W, sx, &sw, acc_bytes).ws_bytes;
}

cudaError_t dct_pool_forward_cuda(const void* x, const void* w, void* y, DType dtype, int64_t B, int64_t C, int64_t H,
                                  int64_t W, Strides4 sx, Strides4 sw, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream) {
  switch (dtype) {
#define FA_CASE(TAG, T) \
  case DType::TAG: return dct_fwd_typed<T>(x, w, y, B, C, H, W, sx, sw, workspace, workspace_bytes, stream);
    FA_TYPES(FA_CASE)
#undef FA_CASE
  }
  return cudaErrorInvalidValue;
}

size_t dct_pool_backward_workspace_bytes(DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sw,
                                         Strides4 sx, Strides4 sdx, Strides4 sdw, bool need_dx, bool need_dw) {
  if ((!need_dx && !need_dw) || B * C * H * W == 0) return 0;
  switch (dtype) {
#define FA_CASE(TAG, T) \
  case DType::TAG: return plan_dct_bwd<T>(need_dx, need_dw, B, C, H, W, sw, sx, sdx, sdw).ws_bytes;
    FA_TYPES(FA_CASE)
#undef FA_CASE
  }
  return 0;
}

cudaError_t dct_pool_backward_cuda(const void* dy, const void* w, const void* x, void* dx, void* dw, DType dtype,
                                   int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sw, Strides4 sx, Strides4 sdx,
                                   Strides4 sdw, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  switch (dtype) {
#define FA_CASE(TAG, T)                                                                                      \
  case DType::TAG:                                                                                           \
    return dct_bwd_typed<T>(dy, w, x, dx, dw, B, C, H, W, sw, sx, sdx, sdw, workspace, workspace_bytes, stream);
    FA_TYPES(FA_CASE)
#undef FA_CASE
  }
  return cudaErrorInvalidValue;
}

#undef FA_TYPES

}  // namespace fastattn
