// The channel gates on CUDA, forward and backward, each in one pass over the feature map.
//
// A (B, C, H, W) map whose H x W flattens is seen as B samples of rows x columns, the columns on the
// unit-stride axis: NCHW ("plane"): rows = channels, columns = pixels; channels_last: rows = pixels,
// columns = channels. One tile kernel per direction runs every op (the functors below): a block of
// (TX, TY) threads owns one sample's tile of rows x (TX * E) columns; a thread owns E columns, read
// VEC at a time (16 bytes when aligned) interleaved across the TX lanes so that a warp reads
// contiguous bytes, and walks the tile's rows ty, ty + TY, ...
// Backward reductions, in fixed orders (no atomics, deterministic):
//  - along a row (plane: the channel gradients; channels_last: the pixel gradient): a thread's E
//    elements, then the TX lanes of the row with shuffles;
//  - along the columns (plane: the pixel gradient; channels_last: the channel gradients): a thread
//    over its rows, then the TY threads of a column in shared memory;
// a tile writes its partial sums to its own slot; when a reduction spans several tiles, a small
// second kernel adds the slots in tile order. Maps whose H x W does not flatten take slow generic
// kernels (one thread per element, one warp per (b, c), one thread per (b, h, w)).
#include "gate.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <type_traits>

namespace fastattn {
namespace {

constexpr int kThreads = 256;                 // threads per tile block: TX * TY
constexpr int64_t kMaxGrid = 2147483647;      // grid axis x

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_of = typename AccOf<T>::type;

// Elements a thread owns along a row: 64 bytes of math state (16 floats, 8 doubles).
template <typename T> constexpr int kElems = sizeof(acc_of<T>) == 8 ? 8 : 16;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(acc_of<T> v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <int kBytes> struct Raw;
template <> struct Raw<2> { using type = unsigned short; };
template <> struct Raw<4> { using type = unsigned int; };
template <> struct Raw<8> { using type = uint2; };
template <> struct Raw<16> { using type = uint4; };

// VEC consecutive elements at p (aligned to VEC * sizeof(T)), through the read-only cache.
template <int VEC, typename T>
__device__ __forceinline__ void load_vec(const T* p, acc_of<T> (&out)[VEC]) {
  using R = typename Raw<VEC * sizeof(T)>::type;
  const R raw = __ldg(reinterpret_cast<const R*>(p));
  T v[VEC];
  memcpy(v, &raw, sizeof raw);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_acc(v[i]);
}

template <int VEC, typename T>
__device__ __forceinline__ void store_vec(T* p, const acc_of<T> (&in)[VEC]) {
  using R = typename Raw<VEC * sizeof(T)>::type;
  T v[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) v[i] = from_acc<T>(in[i]);
  R raw;
  memcpy(&raw, v, sizeof raw);
  *reinterpret_cast<R*>(p) = raw;
}

// __expf explicitly: the same code with or without --use_fast_math (2 ulp + a term growing with |t|).
__device__ __forceinline__ float sigmoid(float t) { return 1.0f / (1.0f + __expf(-t)); }
__device__ __forceinline__ double sigmoid(double t) { return 1.0 / (1.0 + exp(-t)); }

// ---------------------------------------------------------------------------------------------
// The ops: fwd(x, c0, c1, q) and bwd(dy, x, c0, c1, q) -> (dx, g0, g1, gq), c0 and c1 the per-(b, c)
// parameters (kChan of them), q the per-(b, h, w) one (kPix), g0, g1, gq the elementwise terms of
// their gradients (the kernels sum them over (h, w), resp. c). Same math as csrc/cpu/gate_fused.cpp.
// ---------------------------------------------------------------------------------------------

struct ScaleOp {
  static constexpr int kChan = 1;
  static constexpr bool kPix = false;
  template <typename A>
  __device__ static A fwd(A x, A a, A, A) {
    return x * a;
  }
  template <typename A>
  __device__ static void bwd(A dy, A x, A a, A, A, A& dx, A& g0, A& g1, A& gq) {
    dx = dy * a;
    g0 = dy * x;
    g1 = A(0);
    gq = A(0);
  }
};

template <int kMode>
struct SpatialOp {
  static constexpr int kChan = 1;
  static constexpr bool kPix = true;
  template <typename A>
  __device__ static A fwd(A x, A a, A, A s) {
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
  __device__ static void bwd(A dy, A x, A a, A, A s, A& dx, A& g0, A& g1, A& gq) {
    g1 = A(0);
    if constexpr (kMode == 1) {
      // torch.maximum's gradient: all to the larger side, half to each on a tie (x = 0 after a
      // ReLU ties every pixel), all to both when one is NaN (neither comparison holds)
      const A xa = x * a, xs = x * s, g = dy * x;
      const A wa = xa == xs ? A(0.5) : (xa < xs ? A(0) : A(1));
      const A ws = xa == xs ? A(0.5) : (xa > xs ? A(0) : A(1));
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
  __device__ static A fwd(A x, A al, A be, A) {
    return x * sigmoid(al * x + be);
  }
  template <typename A>
  __device__ static void bwd(A dy, A x, A al, A be, A, A& dx, A& g0, A& g1, A& gq) {
    const A sg = sigmoid(al * x + be);
    const A u = dy * x * sg * (A(1) - sg);
    dx = dy * sg + u * al;
    g0 = u * x;
    g1 = u;
    gq = A(0);
  }
};

// Parameters (and gradients) per row and per column: plane rows are channels (the kChan channel
// parameters), channels_last rows are pixels (the pixel parameter, when kPix); columns the others.
template <class Op, bool kPlane> constexpr int kRowN = kPlane ? Op::kChan : (Op::kPix ? 1 : 0);
template <class Op, bool kPlane> constexpr int kColN = kPlane ? (Op::kPix ? 1 : 0) : Op::kChan;

// ---------------------------------------------------------------------------------------------
// tile kernels
// ---------------------------------------------------------------------------------------------

// Element strides of the (B, rows, columns) view of one tensor.
struct View {
  int64_t b, r, c;
};

template <typename T>
struct TileArgs {
  const T* x;
  const T* dy;             // backward
  const T* r;              // forward residual, or null
  T* out;                  // y or dx
  const acc_of<T>* rp0;    // per-row parameters [B][NR]
  const acc_of<T>* rp1;
  const acc_of<T>* cp0;    // per-column parameters [B][NC]
  const acc_of<T>* cp1;
  acc_of<T>* ro0;          // row sums [B][nCT][NR]: final when nCT == 1, else partials
  acc_of<T>* ro1;
  acc_of<T>* co0;          // column sums [B][nRT][NC]: final when nRT == 1, else partials
  acc_of<T>* co1;
  View vx, vdy, vr, vo;
  int64_t NR, NC;          // rows and columns per sample
  int64_t nRT, nCT;        // tiles along rows and columns
  int64_t iters;           // rows per thread in a tile: a tile has iters * TY rows
};

// The block's tile (b, row tile, column tile) and a thread's columns: col[j] + v, j < E / VEC, v < VEC.
template <int E, int VEC>
struct TileIndex {
  int64_t b, rt, ct, row0;
  int64_t col[E / VEC];

  __device__ TileIndex(int64_t nRT, int64_t nCT, int64_t iters) {
    int64_t t = blockIdx.x;
    ct = t % nCT;
    t /= nCT;
    rt = t % nRT;
    b = t / nRT;
    row0 = rt * iters * blockDim.y + threadIdx.y;
#pragma unroll
    for (int j = 0; j < E / VEC; ++j)
      col[j] = ct * blockDim.x * E + (static_cast<int64_t>(j) * blockDim.x + threadIdx.x) * VEC;
  }
};

// A thread's column parameters, loaded once per tile (zero where unused or out of range).
template <int N, int E, int VEC, typename A>
__device__ __forceinline__ void load_col_params(const A* cp0, const A* cp1, int64_t b, int64_t NC,
                                                const int64_t (&col)[E / VEC], A (&cpar)[2][E]) {
#pragma unroll
  for (int j = 0; j < E / VEC; ++j)
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const bool ok = col[j] + v < NC;
      cpar[0][j * VEC + v] = N > 0 && ok ? cp0[b * NC + col[j] + v] : A(0);
      cpar[1][j * VEC + v] = N > 1 && ok ? cp1[b * NC + col[j] + v] : A(0);
    }
}

template <class Op, bool kPlane, bool kRes, typename T, int VEC>
__global__ void __launch_bounds__(kThreads) gate_fwd_tile(const TileArgs<T> p) {
  using A = acc_of<T>;
  constexpr int E = kElems<T>, J = E / VEC;
  constexpr int kRN = kRowN<Op, kPlane>, kCN = kColN<Op, kPlane>;
  const TileIndex<E, VEC> ti(p.nRT, p.nCT, p.iters);
  A cpar[2][E];
  load_col_params<kCN, E, VEC>(p.cp0, p.cp1, ti.b, p.NC, ti.col, cpar);
  const int64_t xc = VEC == 1 ? p.vx.c : 1, rc = VEC == 1 ? p.vr.c : 1, oc = VEC == 1 ? p.vo.c : 1;
  for (int64_t it = 0; it < p.iters; ++it) {
    const int64_t row = ti.row0 + it * blockDim.y;
    if (row >= p.NR) break;
    const A r0 = kRN > 0 ? p.rp0[ti.b * p.NR + row] : A(0);
    const A r1 = kRN > 1 ? p.rp1[ti.b * p.NR + row] : A(0);
    const T* xr = p.x + ti.b * p.vx.b + row * p.vx.r;
    const T* rr = kRes ? p.r + ti.b * p.vr.b + row * p.vr.r : nullptr;
    T* orow = p.out + ti.b * p.vo.b + row * p.vo.r;
    A xv[J][VEC], rv[J][VEC];
#pragma unroll
    for (int j = 0; j < J; ++j)  // all loads first: J * (1 + kRes) requests in flight per thread
      if (ti.col[j] < p.NC) {
        load_vec<VEC>(xr + ti.col[j] * xc, xv[j]);
        if constexpr (kRes) load_vec<VEC>(rr + ti.col[j] * rc, rv[j]);
      }
#pragma unroll
    for (int j = 0; j < J; ++j)
      if (ti.col[j] < p.NC) {
        A yv[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const int e = j * VEC + v;
          yv[v] = kPlane ? Op::fwd(xv[j][v], r0, r1, cpar[0][e]) : Op::fwd(xv[j][v], cpar[0][e], cpar[1][e], r0);
          if constexpr (kRes) yv[v] += rv[j][v];
        }
        store_vec<VEC>(orow + ti.col[j] * oc, yv);
      }
  }
}

template <class Op, bool kPlane, typename T, int VEC>
__global__ void __launch_bounds__(kThreads, 2) gate_bwd_tile(const TileArgs<T> p) {
  using A = acc_of<T>;
  constexpr int E = kElems<T>, J = E / VEC;
  constexpr int kRN = kRowN<Op, kPlane>, kCN = kColN<Op, kPlane>;
  const int TX = blockDim.x, TY = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const TileIndex<E, VEC> ti(p.nRT, p.nCT, p.iters);
  A cpar[2][E];
  load_col_params<kCN, E, VEC>(p.cp0, p.cp1, ti.b, p.NC, ti.col, cpar);
  A cacc[2][E];
#pragma unroll
  for (int e = 0; e < E; ++e) cacc[0][e] = cacc[1][e] = A(0);
  const int64_t dyc = VEC == 1 ? p.vdy.c : 1, xc = VEC == 1 ? p.vx.c : 1, oc = VEC == 1 ? p.vo.c : 1;
  // Every thread runs every iteration (no early exit): the row shuffles need the whole warp.
  for (int64_t it = 0; it < p.iters; ++it) {
    const int64_t row = ti.row0 + it * TY;
    const bool row_ok = row < p.NR;
    A racc0 = 0, racc1 = 0;
    if (row_ok) {
      const A r0 = kRN > 0 ? p.rp0[ti.b * p.NR + row] : A(0);
      const A r1 = kRN > 1 ? p.rp1[ti.b * p.NR + row] : A(0);
      const T* dyr = p.dy + ti.b * p.vdy.b + row * p.vdy.r;
      const T* xr = p.x + ti.b * p.vx.b + row * p.vx.r;
      T* orow = p.out + ti.b * p.vo.b + row * p.vo.r;
      A dyv[J][VEC], xv[J][VEC];
#pragma unroll
      for (int j = 0; j < J; ++j)
        if (ti.col[j] < p.NC) {
          load_vec<VEC>(dyr + ti.col[j] * dyc, dyv[j]);
          load_vec<VEC>(xr + ti.col[j] * xc, xv[j]);
        }
#pragma unroll
      for (int j = 0; j < J; ++j)
        if (ti.col[j] < p.NC) {
          A dxv[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const int e = j * VEC + v;
            A g0, g1, gq;
            if constexpr (kPlane) {
              Op::bwd(dyv[j][v], xv[j][v], r0, r1, cpar[0][e], dxv[v], g0, g1, gq);
              racc0 += g0;
              racc1 += g1;
              cacc[0][e] += gq;
            } else {
              Op::bwd(dyv[j][v], xv[j][v], cpar[0][e], cpar[1][e], r0, dxv[v], g0, g1, gq);
              racc0 += gq;
              cacc[0][e] += g0;
              cacc[1][e] += g1;
            }
          }
          store_vec<VEC>(orow + ti.col[j] * oc, dxv);
        }
    }
    if constexpr (kRN > 0) {
      // the row's TX lanes are one aligned segment of a warp (TX divides 32)
      for (int off = TX / 2; off > 0; off >>= 1) {
        racc0 += __shfl_down_sync(0xffffffffu, racc0, off, TX);
        if constexpr (kRN > 1) racc1 += __shfl_down_sync(0xffffffffu, racc1, off, TX);
      }
      if (tx == 0 && row_ok) {
        const int64_t o = (ti.b * p.nCT + ti.ct) * p.NR + row;
        p.ro0[o] = racc0;
        if constexpr (kRN > 1) p.ro1[o] = racc1;
      }
    }
  }
  if constexpr (kCN > 0) {
    // TY partial sums per column of the tile, added in ty order
    __shared__ A sm[kCN][kThreads * E];
    const int CT = TX * E;
#pragma unroll
    for (int j = 0; j < J; ++j)
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const int cc = (j * TX + tx) * VEC + v;
        sm[0][ty * CT + cc] = cacc[0][j * VEC + v];
        if constexpr (kCN > 1) sm[1][ty * CT + cc] = cacc[1][j * VEC + v];
      }
    __syncthreads();
    for (int i = ty * TX + tx; i < kCN * CT; i += kThreads) {
      const int g = i / CT, cc = i % CT;
      const int64_t c = ti.ct * CT + cc;
      if (c < p.NC) {
        A s = 0;
        for (int y = 0; y < TY; ++y) s += sm[g][y * CT + cc];
        (g == 0 ? p.co0 : p.co1)[(ti.b * p.nRT + ti.rt) * p.NC + c] = s;
      }
    }
  }
}

// out[b * N + n] = sum over t < T, in t order, of part[(b * T + t) * N + n].
template <typename A>
__global__ void sum_partials_kernel(const A* __restrict__ part, A* __restrict__ out, int64_t B, int64_t T,
                                    int64_t N) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * N) return;
  const int64_t b = i / N, n = i % N;
  A s = 0;
  for (int64_t t = 0; t < T; ++t) s += part[(b * T + t) * N + n];
  out[i] = s;
}

// ---------------------------------------------------------------------------------------------
// generic kernels: any strides
// ---------------------------------------------------------------------------------------------

template <typename T>
struct GenArgs {
  const T* x;
  const T* dy;
  const T* r;
  T* out;
  const acc_of<T>* c0;     // (B, C) channel parameters
  const acc_of<T>* c1;
  const acc_of<T>* q;      // (B, H * W) pixel parameter
  acc_of<T>* g0;           // their gradients
  acc_of<T>* g1;
  acc_of<T>* gq;
  Strides4 sx, sdy, sr, so;
  int64_t B, C, H, W;
};

__device__ __forceinline__ int64_t offset(const Strides4& s, int64_t b, int64_t c, int64_t h, int64_t w) {
  return b * s.b + c * s.c + h * s.h + w * s.w;
}

template <class Op, bool kRes, typename T>
__global__ void gate_fwd_generic(const GenArgs<T> p) {
  using A = acc_of<T>;
  const int64_t n = p.B * p.C * p.H * p.W;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t t = i;
    const int64_t w = t % p.W;
    t /= p.W;
    const int64_t h = t % p.H;
    t /= p.H;
    const int64_t c = t % p.C, b = t / p.C, bc = b * p.C + c;
    A y = Op::fwd(to_acc(p.x[offset(p.sx, b, c, h, w)]), p.c0[bc], Op::kChan > 1 ? p.c1[bc] : A(0),
                  Op::kPix ? p.q[(b * p.H + h) * p.W + w] : A(0));
    if constexpr (kRes) y += to_acc(p.r[offset(p.sr, b, c, h, w)]);
    p.out[offset(p.so, b, c, h, w)] = from_acc<T>(y);
  }
}

// One warp per (b, c): dx and the channel gradients.
template <class Op, typename T>
__global__ void gate_bwd_generic_channels(const GenArgs<T> p) {
  using A = acc_of<T>;
  const int64_t bc = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (bc >= p.B * p.C) return;  // the whole warp
  const int64_t b = bc / p.C, c = bc % p.C, P = p.H * p.W;
  const A k0 = p.c0[bc], k1 = Op::kChan > 1 ? p.c1[bc] : A(0);
  A a0 = 0, a1 = 0;
  for (int64_t i = lane; i < P; i += 32) {
    const int64_t h = i / p.W, w = i % p.W;
    A d, g0, g1, gq;
    Op::bwd(to_acc(p.dy[offset(p.sdy, b, c, h, w)]), to_acc(p.x[offset(p.sx, b, c, h, w)]), k0, k1,
            Op::kPix ? p.q[b * P + i] : A(0), d, g0, g1, gq);
    p.out[offset(p.so, b, c, h, w)] = from_acc<T>(d);
    a0 += g0;
    a1 += g1;
  }
  for (int off = 16; off > 0; off >>= 1) {
    a0 += __shfl_down_sync(0xffffffffu, a0, off);
    a1 += __shfl_down_sync(0xffffffffu, a1, off);
  }
  if (lane == 0) {
    p.g0[bc] = a0;
    if constexpr (Op::kChan > 1) p.g1[bc] = a1;
  }
}

// One thread per (b, h, w): the pixel gradient, summed over c in order.
template <class Op, typename T>
__global__ void gate_bwd_generic_pixels(const GenArgs<T> p) {
  using A = acc_of<T>;
  const int64_t P = p.H * p.W;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.B * P) return;
  const int64_t b = i / P, h = (i % P) / p.W, w = i % p.W;
  const A qv = p.q[i];
  A s = 0;
  for (int64_t c = 0; c < p.C; ++c) {
    A d, g0, g1, gq;
    Op::bwd(to_acc(p.dy[offset(p.sdy, b, c, h, w)]), to_acc(p.x[offset(p.sx, b, c, h, w)]), p.c0[b * p.C + c],
            Op::kChan > 1 ? p.c1[b * p.C + c] : A(0), qv, d, g0, g1, gq);
    s += gq;
  }
  p.gq[i] = s;
}

// ---------------------------------------------------------------------------------------------
// host side: layout, plan, launch
// ---------------------------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Strides of the (B, C, P = H * W) view of a map whose H x W flattens (false if it does not); size-1
// axes get the stride that makes every layout test pass (batch 0, channel and pixel 1).
struct Flat3 {
  int64_t b, c, p;
};

bool flat3(const Strides4& s, int64_t B, int64_t C, int64_t H, int64_t W, Flat3& f) {
  if (!(H == 1 || W == 1 || s.h == W * s.w)) return false;
  f.b = B == 1 ? 0 : s.b;
  f.c = C == 1 ? 1 : s.c;
  f.p = H * W == 1 ? 1 : (W == 1 ? s.h : s.w);
  return true;
}

inline View view_of(const Flat3& f, bool plane) { return plane ? View{f.b, f.c, f.p} : View{f.b, f.p, f.c}; }

// Plane (rows = channels) when x and the output have unit pixel stride, channels_last (rows =
// pixels) when they have unit channel stride (preferred for 1 x 1 maps), else plane with strided
// columns (correct, not fast).
inline bool choose_plane(const Flat3& fx, const Flat3& fo, int64_t P) {
  const bool chan = fx.c == 1 && fo.c == 1, plane = fx.p == 1 && fo.p == 1;
  return !(chan && (P == 1 || !plane));
}

struct Plan {
  int tx, ty;
  int64_t NR, NC, nRT, nCT, iters;
};

// Threads along a row: enough lanes to cover the row with E elements each, at most a warp (so the
// row sums are warp shuffles). Row tiles: about target_blocks blocks in all, tiles of at least
// min_rows rows (the column partial sums then stay a small fraction of x).
Plan make_plan(int64_t B, int64_t NR, int64_t NC, int E, int64_t target_blocks, int64_t min_rows) {
  Plan q;
  q.tx = 1;
  while (q.tx < 32 && static_cast<int64_t>(q.tx) * E < NC) q.tx *= 2;
  q.ty = kThreads / q.tx;
  q.NR = NR;
  q.NC = NC;
  q.nCT = ceil_div(NC, static_cast<int64_t>(q.tx) * E);
  const int64_t groups = ceil_div(NR, q.ty);
  int64_t want = ceil_div(target_blocks, B * q.nCT);
  want = std::min(want, std::max<int64_t>(1, NR / min_rows));
  want = std::max<int64_t>(1, std::min(want, groups));
  q.iters = ceil_div(groups, want);
  q.nRT = ceil_div(groups, q.iters);
  return q;
}

constexpr int64_t kFwdTargetBlocks = 2048;
constexpr int64_t kBwdTargetBlocks = 1024;
constexpr int64_t kBwdMinTileRows = 16;

struct Operand {
  const void* ptr;
  View v;
};

// The widest load (16 or 8 bytes, else one element) that every operand allows: aligned base, unit
// column stride, row and batch strides multiple of it, whole vectors per row.
template <typename T>
int pick_vec(int64_t B, int64_t NR, int64_t NC, std::initializer_list<Operand> ops) {
  for (int v = 16 / static_cast<int>(sizeof(T)); v >= 2 && v * static_cast<int>(sizeof(T)) >= 8; v /= 2) {
    bool ok = NC % v == 0;
    for (const Operand& o : ops)
      ok = ok && reinterpret_cast<uintptr_t>(o.ptr) % (v * sizeof(T)) == 0 && o.v.c == 1 &&
           (B == 1 || o.v.b % v == 0) && (NR == 1 || o.v.r % v == 0);
    if (ok) return v;
  }
  return 1;
}

// Runs f(std::integral_constant<int, VEC>) for the VEC that pick_vec chose (instantiated: 16 bytes,
// 8 bytes when that is at least 2 elements, 1 element).
template <typename T, class F>
cudaError_t with_vec(int v, F&& f) {
  constexpr int k16 = 16 / sizeof(T), k8 = 8 / sizeof(T);
  if (v == k16) return f(std::integral_constant<int, k16>{});
  if constexpr (k8 >= 2) {
    if (v == k8) return f(std::integral_constant<int, k8>{});
  }
  return f(std::integral_constant<int, 1>{});
}

inline unsigned generic_blocks(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kThreads), 1 << 20)));
}

template <class Op, bool kRes, typename T>
cudaError_t launch_forward(const T* x, const T* r, const acc_of<T>* c0, const acc_of<T>* c1, const acc_of<T>* q,
                           T* y, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sr, Strides4 sy,
                           cudaStream_t stream) {
  const int64_t P = H * W;
  if (B * C * P == 0) return cudaSuccess;
  Flat3 fx, fy, fr{0, 0, 0};
  if (!flat3(sx, B, C, H, W, fx) || !flat3(sy, B, C, H, W, fy) || (kRes && !flat3(sr, B, C, H, W, fr))) {
    const GenArgs<T> g{x, nullptr, r, y, c0, c1, q, nullptr, nullptr, nullptr, sx, sx, sr, sy, B, C, H, W};
    gate_fwd_generic<Op, kRes, T><<<generic_blocks(B * C * P), kThreads, 0, stream>>>(g);
    return cudaGetLastError();
  }
  const bool plane = choose_plane(fx, fy, P);
  const Plan pl = make_plan(B, plane ? C : P, plane ? P : C, kElems<T>, kFwdTargetBlocks, 1);
  const int64_t blocks = B * pl.nRT * pl.nCT;
  if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
  TileArgs<T> a{};
  a.x = x;
  a.r = r;
  a.out = y;
  if (plane) {
    a.rp0 = c0;
    a.rp1 = c1;
    a.cp0 = q;
  } else {
    a.rp0 = q;
    a.cp0 = c0;
    a.cp1 = c1;
  }
  a.vx = view_of(fx, plane);
  a.vr = view_of(fr, plane);
  a.vo = view_of(fy, plane);
  a.NR = pl.NR;
  a.NC = pl.NC;
  a.nRT = pl.nRT;
  a.nCT = pl.nCT;
  a.iters = pl.iters;
  const int vec = kRes ? pick_vec<T>(B, pl.NR, pl.NC, {{x, a.vx}, {r, a.vr}, {y, a.vo}})
                       : pick_vec<T>(B, pl.NR, pl.NC, {{x, a.vx}, {y, a.vo}});
  const dim3 block(pl.tx, pl.ty);
  return with_vec<T>(vec, [&](auto v) {
    constexpr int V = decltype(v)::value;
    if (plane)
      gate_fwd_tile<Op, true, kRes, T, V><<<static_cast<unsigned>(blocks), block, 0, stream>>>(a);
    else
      gate_fwd_tile<Op, false, kRes, T, V><<<static_cast<unsigned>(blocks), block, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

// Everything a backward launch needs to know before it has pointers: the path, the plan, the views
// and the workspace (row partials, then column partials at a 256-byte boundary).
struct BwdSetup {
  bool generic = false, plane = true;
  Plan plan{};
  View vdy{}, vx{}, vdx{};
  size_t row_bytes = 0, col_offset = 0, total = 0;
};

inline size_t align256(size_t n) { return (n + 255) / 256 * 256; }

template <class Op, typename T>
BwdSetup setup_backward(int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx) {
  BwdSetup s;
  const int64_t P = H * W;
  Flat3 fdy, fx, fdx;
  if (!flat3(sdy, B, C, H, W, fdy) || !flat3(sx, B, C, H, W, fx) || !flat3(sdx, B, C, H, W, fdx)) {
    s.generic = true;
    return s;
  }
  s.plane = choose_plane(fx, fdx, P);
  s.plan = make_plan(B, s.plane ? C : P, s.plane ? P : C, kElems<T>, kBwdTargetBlocks, kBwdMinTileRows);
  s.vdy = view_of(fdy, s.plane);
  s.vx = view_of(fx, s.plane);
  s.vdx = view_of(fdx, s.plane);
  const int rn = s.plane ? kRowN<Op, true> : kRowN<Op, false>;
  const int cn = s.plane ? kColN<Op, true> : kColN<Op, false>;
  const size_t A = sizeof(acc_of<T>);
  s.row_bytes = s.plan.nCT > 1 ? rn * B * s.plan.nCT * s.plan.NR * A : 0;
  s.col_offset = align256(s.row_bytes);
  const size_t col_bytes = s.plan.nRT > 1 ? cn * B * s.plan.nRT * s.plan.NC * A : 0;
  s.total = col_bytes ? s.col_offset + col_bytes : s.row_bytes;
  return s;
}

template <typename A>
cudaError_t sum_partials(const A* part, A* out, int64_t B, int64_t T, int64_t N, cudaStream_t stream) {
  const int64_t blocks = ceil_div(B * N, kThreads);
  if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
  sum_partials_kernel<A><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(part, out, B, T, N);
  return cudaGetLastError();
}

// g0, g1: (B, C) channel gradients (g1 only when kChan == 2); gq: (B, P) pixel gradient (kPix).
template <class Op, typename T>
cudaError_t launch_backward(const T* dy, const T* x, const acc_of<T>* c0, const acc_of<T>* c1, const acc_of<T>* q,
                            T* dx, acc_of<T>* g0, acc_of<T>* g1, acc_of<T>* gq, void* workspace,
                            size_t workspace_bytes, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy,
                            Strides4 sx, Strides4 sdx, cudaStream_t stream) {
  using A = acc_of<T>;
  const int64_t P = H * W;
  if (B * C * P == 0) return cudaSuccess;
  const BwdSetup s = setup_backward<Op, T>(B, C, H, W, sdy, sx, sdx);
  if (s.generic) {
    const GenArgs<T> g{x, dy, nullptr, dx, c0, c1, q, g0, g1, gq, sx, sdy, sx, sdx, B, C, H, W};
    const int64_t blocks = ceil_div(B * C * 32, kThreads);
    if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
    gate_bwd_generic_channels<Op, T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(g);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || !Op::kPix) return err;
    const int64_t pblocks = ceil_div(B * P, kThreads);
    if (pblocks > kMaxGrid) return cudaErrorInvalidConfiguration;
    gate_bwd_generic_pixels<Op, T><<<static_cast<unsigned>(pblocks), kThreads, 0, stream>>>(g);
    return cudaGetLastError();
  }
  if (workspace_bytes < s.total || (s.total > 0 && workspace == nullptr)) return cudaErrorInvalidValue;
  const Plan& pl = s.plan;
  const int64_t blocks = B * pl.nRT * pl.nCT;
  if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
  // final outputs per row and per column of the view
  A* row_out[2] = {s.plane ? g0 : gq, s.plane ? g1 : nullptr};
  A* col_out[2] = {s.plane ? gq : g0, s.plane ? nullptr : g1};
  A* row_part = static_cast<A*>(workspace);
  A* col_part = reinterpret_cast<A*>(static_cast<char*>(workspace) + s.col_offset);
  TileArgs<T> a{};
  a.x = x;
  a.dy = dy;
  a.out = dx;
  if (s.plane) {
    a.rp0 = c0;
    a.rp1 = c1;
    a.cp0 = q;
  } else {
    a.rp0 = q;
    a.cp0 = c0;
    a.cp1 = c1;
  }
  const int64_t row_n = B * pl.NR, col_n = B * pl.NC;
  a.ro0 = pl.nCT > 1 ? row_part : row_out[0];
  a.ro1 = pl.nCT > 1 ? row_part + row_n * pl.nCT : row_out[1];
  a.co0 = pl.nRT > 1 ? col_part : col_out[0];
  a.co1 = pl.nRT > 1 ? col_part + col_n * pl.nRT : col_out[1];
  a.vdy = s.vdy;
  a.vx = s.vx;
  a.vo = s.vdx;
  a.NR = pl.NR;
  a.NC = pl.NC;
  a.nRT = pl.nRT;
  a.nCT = pl.nCT;
  a.iters = pl.iters;
  const int vec = pick_vec<T>(B, pl.NR, pl.NC, {{dy, a.vdy}, {x, a.vx}, {dx, a.vo}});
  const dim3 block(pl.tx, pl.ty);
  cudaError_t err = with_vec<T>(vec, [&](auto v) {
    constexpr int V = decltype(v)::value;
    if (s.plane)
      gate_bwd_tile<Op, true, T, V><<<static_cast<unsigned>(blocks), block, 0, stream>>>(a);
    else
      gate_bwd_tile<Op, false, T, V><<<static_cast<unsigned>(blocks), block, 0, stream>>>(a);
    return cudaGetLastError();
  });
  const int rn = s.plane ? kRowN<Op, true> : kRowN<Op, false>;
  const int cn = s.plane ? kColN<Op, true> : kColN<Op, false>;
  if (pl.nCT > 1)
    for (int g = 0; g < rn && err == cudaSuccess; ++g)
      err = sum_partials(row_part + g * row_n * pl.nCT, row_out[g], B, pl.nCT, pl.NR, stream);
  if (pl.nRT > 1)
    for (int g = 0; g < cn && err == cudaSuccess; ++g)
      err = sum_partials(col_part + g * col_n * pl.nRT, col_out[g], B, pl.nRT, pl.NC, stream);
  return err;
}

template <class F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(static_cast<float*>(nullptr));
    case DType::Float64: return f(static_cast<double*>(nullptr));
    case DType::Float16: return f(static_cast<__half*>(nullptr));
    case DType::BFloat16: return f(static_cast<__nv_bfloat16*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

template <class F>
cudaError_t dispatch_mode(CombineMode mode, F&& f) {
  switch (mode) {
    case CombineMode::Max: return f(SpatialOp<1>{});
    case CombineMode::Add: return f(SpatialOp<2>{});
    case CombineMode::Bam: return f(SpatialOp<3>{});
    case CombineMode::BamSum: return f(SpatialOp<4>{});
  }
  return cudaErrorInvalidValue;
}

template <class Op>
size_t workspace_bytes(DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sx,
                       Strides4 sdx) {
  if (B * C * H * W == 0) return 0;
  size_t n = 0;
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    n = setup_backward<Op, T>(B, C, H, W, sdy, sx, sdx).total;
    return cudaSuccess;
  });
  return n;
}

}  // namespace

cudaError_t channel_scale_forward_cuda(const void* x, const void* a, const void* r, void* y, DType dtype, int64_t B,
                                       int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sr, Strides4 sy,
                                       cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_of<T>;
    if (r)
      return launch_forward<ScaleOp, true>(static_cast<const T*>(x), static_cast<const T*>(r),
                                           static_cast<const A*>(a), nullptr, nullptr, static_cast<T*>(y), B, C, H,
                                           W, sx, sr, sy, stream);
    return launch_forward<ScaleOp, false>(static_cast<const T*>(x), static_cast<const T*>(nullptr),
                                          static_cast<const A*>(a), nullptr, nullptr, static_cast<T*>(y), B, C, H, W,
                                          sx, sx, sy, stream);
  });
}

size_t channel_scale_backward_cuda_workspace(DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy,
                                             Strides4 sx, Strides4 sdx) {
  return workspace_bytes<ScaleOp>(dtype, B, C, H, W, sdy, sx, sdx);
}

cudaError_t channel_scale_backward_cuda(const void* dy, const void* x, const void* a, void* dx, void* da,
                                        void* workspace, size_t workspace_bytes, DType dtype, int64_t B, int64_t C,
                                        int64_t H, int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx,
                                        cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_of<T>;
    return launch_backward<ScaleOp>(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const A*>(a),
                                    nullptr, nullptr, static_cast<T*>(dx), static_cast<A*>(da), nullptr, nullptr,
                                    workspace, workspace_bytes, B, C, H, W, sdy, sx, sdx, stream);
  });
}

cudaError_t channel_spatial_gate_forward_cuda(const void* x, const void* a, const void* s, void* y, CombineMode mode,
                                              DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                                              Strides4 sy, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_of<T>;
    return dispatch_mode(mode, [&](auto op) {
      return launch_forward<decltype(op), false>(static_cast<const T*>(x), static_cast<const T*>(nullptr),
                                                 static_cast<const A*>(a), nullptr, static_cast<const A*>(s),
                                                 static_cast<T*>(y), B, C, H, W, sx, sx, sy, stream);
    });
  });
}

size_t channel_spatial_gate_backward_cuda_workspace(DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                                                    Strides4 sdy, Strides4 sx, Strides4 sdx) {
  return workspace_bytes<SpatialOp<1>>(dtype, B, C, H, W, sdy, sx, sdx);  // the same for every mode
}

cudaError_t channel_spatial_gate_backward_cuda(const void* dy, const void* x, const void* a, const void* s, void* dx,
                                               void* da, void* ds, void* workspace, size_t workspace_bytes,
                                               CombineMode mode, DType dtype, int64_t B, int64_t C, int64_t H,
                                               int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx,
                                               cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_of<T>;
    return dispatch_mode(mode, [&](auto op) {
      return launch_backward<decltype(op)>(static_cast<const T*>(dy), static_cast<const T*>(x),
                                           static_cast<const A*>(a), nullptr, static_cast<const A*>(s),
                                           static_cast<T*>(dx), static_cast<A*>(da), nullptr, static_cast<A*>(ds),
                                           workspace, workspace_bytes, B, C, H, W, sdy, sx, sdx, stream);
    });
  });
}

cudaError_t channel_affine_gate_forward_cuda(const void* x, const void* alpha, const void* beta, void* y, DType dtype,
                                             int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sy,
                                             cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_of<T>;
    return launch_forward<AffineOp, false>(static_cast<const T*>(x), static_cast<const T*>(nullptr),
                                           static_cast<const A*>(alpha), static_cast<const A*>(beta), nullptr,
                                           static_cast<T*>(y), B, C, H, W, sx, sx, sy, stream);
  });
}

size_t channel_affine_gate_backward_cuda_workspace(DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                                                   Strides4 sdy, Strides4 sx, Strides4 sdx) {
  return workspace_bytes<AffineOp>(dtype, B, C, H, W, sdy, sx, sdx);
}

cudaError_t channel_affine_gate_backward_cuda(const void* dy, const void* x, const void* alpha, const void* beta,
                                              void* dx, void* dalpha, void* dbeta, void* workspace,
                                              size_t workspace_bytes, DType dtype, int64_t B, int64_t C, int64_t H,
                                              int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx,
                                              cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_of<T>;
    return launch_backward<AffineOp>(static_cast<const T*>(dy), static_cast<const T*>(x),
                                     static_cast<const A*>(alpha), static_cast<const A*>(beta), nullptr,
                                     static_cast<T*>(dx), static_cast<A*>(dalpha), static_cast<A*>(dbeta), nullptr,
                                     workspace, workspace_bytes, B, C, H, W, sdy, sx, sdx, stream);
  });
}

}  // namespace fastattn
