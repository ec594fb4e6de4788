// Coordinate attention on CUDA: directional means (coord_pool) and the two-axis scale
// (coord_scale), forward and backward. One pass over the map per op.
//
// Reductions (pool forward, scale backward) walk planes with one of two kernels:
// - rows walker (W unit stride: NCHW, its channel slices and crops; also any other strides, then
//   uncoalesced): a block owns (b, c, a segment of rows); its threads tile [rows x W-lanes], with
//   16-byte loads along W when aligned. Row sums meet by warp shuffles, column sums in shared
//   memory.
// - channels walker (C unit stride: channels_last): a block owns (b, 32 channels, a segment of
//   rows); lanes are channels (a warp reads 32 consecutive channels of one pixel), each warp walks
//   whole rows (so its row sums are complete) and keeps its column sums in shared memory.
// When (b, c) or (b, channel block) alone gives too few blocks, H is split into segments whose
// column partial sums go to a workspace and are added in segment order by a second kernel: no
// atomics, results independent of scheduling.
// Element-wise ops (pool backward, scale forward) are one thread per 16-byte vector.
#include "coord.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

namespace fastattn {
namespace {

// ---------------------------------------------------------------------------------------------
// types and vector access
// ---------------------------------------------------------------------------------------------

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

template <typename T> constexpr int kVec = 16 / static_cast<int>(sizeof(T));   // elements per 16 bytes

template <typename T, int V> struct alignas(16) Pack { T v[V]; };

// V consecutive elements at p (16-byte aligned when V > 1) in the accumulation type.
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* p, acc_of<T> (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = to_acc(p[0]);
  } else {
    const Pack<T, V> k = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = to_acc(k.v[j]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const acc_of<T> (&in)[V]) {
  if constexpr (V == 1) {
    p[0] = from_acc<T>(in[0]);
  } else {
    Pack<T, V> k;
#pragma unroll
    for (int j = 0; j < V; ++j) k.v[j] = from_acc<T>(in[j]);
    *reinterpret_cast<Pack<T, V>*>(p) = k;
  }
}

template <typename Out, typename A>
__device__ __forceinline__ void put(void* base, int64_t i, A v) {
  static_cast<Out*>(base)[i] = from_acc<Out>(v);
}

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline bool al16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
template <typename T> inline bool al16(int64_t stride) { return (stride * static_cast<int64_t>(sizeof(T))) % 16 == 0; }

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 2147483647;

// ---------------------------------------------------------------------------------------------
// plans: how H is split, which walker
// ---------------------------------------------------------------------------------------------

constexpr int64_t kTargetBlocks = 1024;    // blocks wanted before H is split (several waves of SMs)
constexpr int64_t kMinRowsPerSplit = 16;   // no shorter segment: partial sums cost splits / H of a pass
constexpr int64_t kMaxRowsPerBlock = 2048; // rows walker: the rows' sums are kept in shared memory
constexpr int kClWarpsMax = 4;             // channels walker: warps per block
constexpr int64_t kClSmem = 48 * 1024;     // channels walker: shared column sums (no opt-in needed)

struct Split {
  int64_t n, rows;   // n segments of `rows` rows (the last may be shorter)
};

inline Split split_rows(int64_t base_blocks, int64_t H, int64_t max_rows) {
  int64_t n = base_blocks >= kTargetBlocks ? 1 : ceil_div(kTargetBlocks, std::max<int64_t>(base_blocks, 1));
  n = std::min(n, std::max<int64_t>(1, H / kMinRowsPerSplit));
  n = std::max(n, ceil_div(H, max_rows));
  n = std::max<int64_t>(1, std::min(n, H));
  const int64_t rows = ceil_div(H, n);
  return {ceil_div(H, rows), rows};
}

inline Split rows_plan(int64_t B, int64_t C, int64_t H) { return split_rows(B * C, H, kMaxRowsPerBlock); }
inline Split cl_plan(int64_t B, int64_t C, int64_t H) { return split_rows(B * ceil_div(C, 32), H, H); }

// Warps of the channels walker whose column sums (W x 32 per warp) fit in kClSmem; 0: none fits.
inline int cl_warps(int64_t W, size_t acc_bytes) {
  const int64_t per_warp = W * 32 * static_cast<int64_t>(acc_bytes);
  return static_cast<int>(std::min<int64_t>(kClWarpsMax, kClSmem / std::max<int64_t>(per_warp, 1)));
}

// ---------------------------------------------------------------------------------------------
// reductions: coord_pool forward (sums of x) and coord_scale backward (sums of dy x a, and dx)
// ---------------------------------------------------------------------------------------------

template <typename T>
struct ReduceArgs {
  const T* x;
  const T* dy;                      // scale backward only
  T* dx;                            // scale backward only
  const acc_of<T>* ah;              // scale backward only: (B, C, H) with strides sah
  const acc_of<T>* aw;              // scale backward only: (B, C, W) with strides saw
  Strides3 sah, saw;
  void* rows_out;                   // (B, C, H) contiguous: x's dtype (pool, means) or acc (scale, sums)
  void* cols_out;                   // (B, C, W) contiguous, as rows_out
  acc_of<T>* ws;                    // [splits][B * C * W] partial column sums when splits > 1
  int64_t B, C, H, W;
  Strides4 sx, sdy, sdx;
  int64_t splits, rows;             // H cut into `splits` segments of `rows` rows
  int tw;                           // rows walker: threads along W per row (a power of two <= 32)
  int thp;                          // rows walker: rows per pass per plane (tw * thp divides kThreads)
};

// Rows walker. Block: P planes (b, c) x a segment of rows; per plane, threads [thp rows][tw lanes
// along W], each lane V consecutive columns (small planes share a block: a 7 x 7 plane takes 8 x 8
// threads). Per W tile of tw * V columns the rows are walked; a row's partial sum over the tile is
// reduced across its tw lanes by shuffles and added (by lane 0, always the same thread for that
// row) to rowacc; column sums are reduced across the rows through colred.
template <typename T, typename Out, int V, bool kScale>
__global__ void __launch_bounds__(kThreads) rows_reduce_kernel(const ReduceArgs<T> a) {
  using A = acc_of<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = static_cast<int>(threadIdx.x);
  const int tw = a.tw, thp = a.thp, per_plane = tw * thp, P = kThreads / per_plane;
  const int pl = tid / per_plane, t2 = tid % per_plane, tx = t2 % tw, ty = t2 / tw;
  const int tile = tw * V;
  A* rowacc = reinterpret_cast<A*>(smem_raw) + static_cast<int64_t>(pl) * a.rows;   // [P][rows]
  A* colred = reinterpret_cast<A*>(smem_raw) + P * a.rows + pl * per_plane * V;     // [P][thp * tile]
  const int64_t pg = static_cast<int64_t>(blockIdx.x) / a.splits, seg = static_cast<int64_t>(blockIdx.x) % a.splits;
  const int64_t bc = pg * P + pl;
  const bool valid = bc < a.B * a.C;   // the last block may hold fewer planes: no early return (syncs)
  const int64_t b = valid ? bc / a.C : 0, c = valid ? bc % a.C : 0;
  const int64_t h0 = seg * a.rows, h1 = imin(a.H, h0 + a.rows);
  const int nr = static_cast<int>(h1 - h0);
  for (int i = t2; i < nr; i += per_plane) rowacc[i] = A(0);
  __syncthreads();
  const T* px = a.x + b * a.sx.b + c * a.sx.c;
  const T* pdy = kScale ? a.dy + b * a.sdy.b + c * a.sdy.c : nullptr;
  T* pdx = kScale ? a.dx + b * a.sdx.b + c * a.sdx.c : nullptr;
  for (int64_t w0 = 0; w0 < a.W; w0 += tile) {
    const int64_t w = w0 + static_cast<int64_t>(tx) * V;
    const bool wok = valid && w < a.W;   // V > 1 only when V divides W: then all V columns are in range
    A col[V], awv[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      col[j] = A(0);
      awv[j] = (kScale && wok) ? a.aw[b * a.saw.b + c * a.saw.c + (w + j) * a.saw.l] : A(0);
    }
#pragma unroll 2
    for (int64_t hh = h0; hh < h1; hh += thp) {   // uniform trip count: every lane reaches the shuffles
      const int64_t h = hh + ty;
      A rowpart = A(0);
      if (wok && h < h1) {
        A xv[V];
        load_vec<T, V>(px + h * a.sx.h + w * a.sx.w, xv);
        if constexpr (!kScale) {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            rowpart += xv[j];
            col[j] += xv[j];
          }
        } else {
          const A s = a.ah[b * a.sah.b + c * a.sah.c + h * a.sah.l];
          A g[V], o[V];
          load_vec<T, V>(pdy + h * a.sdy.h + w * a.sdy.w, g);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            o[j] = g[j] * awv[j] * s;
            const A gx = g[j] * xv[j];
            rowpart += gx * awv[j];
            col[j] += gx * s;
          }
          store_vec<T, V>(pdx + h * a.sdx.h + w * a.sdx.w, o);
        }
      }
      for (int o = tw >> 1; o > 0; o >>= 1) rowpart += __shfl_xor_sync(0xffffffffu, rowpart, o);
      if (tx == 0 && h < h1) rowacc[h - h0] += rowpart;
    }
#pragma unroll
    for (int j = 0; j < V; ++j) colred[ty * tile + tx * V + j] = col[j];
    __syncthreads();
    for (int t = t2; t < tile && valid; t += per_plane) {
      const int64_t wc = w0 + t;
      if (wc < a.W) {
        A sum = A(0);
        for (int k = 0; k < thp; ++k) sum += colred[k * tile + t];
        if (a.splits == 1)
          put<Out>(a.cols_out, bc * a.W + wc, kScale ? sum : sum / static_cast<A>(a.H));
        else
          a.ws[(seg * a.B * a.C + bc) * a.W + wc] = sum;
      }
    }
    __syncthreads();
  }
  if (!valid) return;
  for (int i = t2; i < nr; i += per_plane)
    put<Out>(a.rows_out, bc * a.H + h0 + i, kScale ? rowacc[i] : rowacc[i] / static_cast<A>(a.W));
}

// Channels walker. Block: (b, 32 channels, segment), nw warps; lane = channel. Warp k walks rows
// h0 + k, h0 + k + nw, ... whole (its row sums are complete); its column sums live in its own
// slice of shared memory ([warp][W][32]: each slot touched by one thread until the final sum).
template <typename T, typename Out, bool kScale>
__global__ void __launch_bounds__(32 * kClWarpsMax) cl_reduce_kernel(const ReduceArgs<T> a, int64_t nblk_c) {
  using A = acc_of<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* colacc = reinterpret_cast<A*>(smem_raw);   // [nw][W][32]
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int nw = static_cast<int>(blockDim.x) >> 5;
  const int64_t per_b = nblk_c * a.splits;
  const int64_t b = static_cast<int64_t>(blockIdx.x) / per_b, rest = static_cast<int64_t>(blockIdx.x) % per_b;
  const int64_t cb = rest / a.splits, seg = rest % a.splits;
  const int64_t c = cb * 32 + lane;
  const int64_t h0 = seg * a.rows, h1 = imin(a.H, h0 + a.rows);
  A* my = colacc + static_cast<int64_t>(warp) * a.W * 32 + lane;
  for (int64_t w = 0; w < a.W; ++w) my[w * 32] = A(0);
  if (c < a.C) {
    const T* px = a.x + b * a.sx.b + c * a.sx.c;
    for (int64_t h = h0 + warp; h < h1; h += nw) {
      const T* pxr = px + h * a.sx.h;
      A rowsum = A(0);
      if constexpr (!kScale) {
#pragma unroll 4
        for (int64_t w = 0; w < a.W; ++w) {
          const A v = to_acc(pxr[w * a.sx.w]);
          rowsum += v;
          my[w * 32] += v;
        }
        put<Out>(a.rows_out, (b * a.C + c) * a.H + h, rowsum / static_cast<A>(a.W));
      } else {
        const A s = a.ah[b * a.sah.b + c * a.sah.c + h * a.sah.l];
        const T* pdyr = a.dy + b * a.sdy.b + c * a.sdy.c + h * a.sdy.h;
        T* pdxr = a.dx + b * a.sdx.b + c * a.sdx.c + h * a.sdx.h;
        const A* pawr = a.aw + b * a.saw.b + c * a.saw.c;
#pragma unroll 4
        for (int64_t w = 0; w < a.W; ++w) {
          const A g = to_acc(pdyr[w * a.sdy.w]);
          const A aw = pawr[w * a.saw.l];
          pdxr[w * a.sdx.w] = from_acc<T>(g * aw * s);
          const A gx = g * to_acc(pxr[w * a.sx.w]);
          rowsum += gx * aw;
          my[w * 32] += gx * s;
        }
        put<Out>(a.rows_out, (b * a.C + c) * a.H + h, rowsum);
      }
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < a.W * 32; i += blockDim.x) {
    const int64_t w = i >> 5;
    const int l = static_cast<int>(i & 31);
    const int64_t cc = cb * 32 + l;
    if (cc < a.C) {
      A sum = A(0);
      for (int k = 0; k < nw; ++k) sum += colacc[(static_cast<int64_t>(k) * a.W + w) * 32 + l];
      if (a.splits == 1)
        put<Out>(a.cols_out, (b * a.C + cc) * a.W + w, kScale ? sum : sum / static_cast<A>(a.H));
      else
        a.ws[(seg * a.B * a.C + b * a.C + cc) * a.W + w] = sum;
    }
  }
}

// out[i] = (sum over segments s of ws[s * n + i]) / div, segments in order.
template <typename A, typename Out>
__global__ void __launch_bounds__(kThreads) combine_kernel(const A* __restrict__ ws, Out* __restrict__ out, int64_t n,
                                                          int64_t splits, A div) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  A t = A(0);
  for (int64_t s = 0; s < splits; ++s) t += ws[s * n + i];
  out[i] = from_acc<Out>(t / div);
}

inline bool rows_unit(const Strides4& s, int64_t W) { return s.w == 1 && W > 1; }
inline bool chans_unit(const Strides4& s, int64_t C) { return s.c == 1 || C == 1; }

template <typename T, typename Out, bool kScale>
cudaError_t launch_reduce(ReduceArgs<T> a, cudaStream_t stream) {
  using A = acc_of<T>;
  const int64_t B = a.B, C = a.C, H = a.H, W = a.W;
  if (B * C * H * W == 0) return cudaSuccess;
  const bool rows = rows_unit(a.sx, W) && (!kScale || (rows_unit(a.sdy, W) && rows_unit(a.sdx, W)));
  const bool chans = chans_unit(a.sx, C) && (!kScale || (chans_unit(a.sdy, C) && chans_unit(a.sdx, C)));
  const int nw = cl_warps(W, sizeof(A));
  if (!rows && chans && nw > 0) {
    const Split sp = cl_plan(B, C, H);
    a.splits = sp.n;
    a.rows = sp.rows;
    const int64_t nblk_c = ceil_div(C, 32);
    const int64_t blocks = B * nblk_c * sp.n;
    if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
    if (sp.n > 1 && a.ws == nullptr) return cudaErrorInvalidValue;
    const size_t smem = static_cast<size_t>(nw) * static_cast<size_t>(W) * 32 * sizeof(A);
    cl_reduce_kernel<T, Out, kScale><<<static_cast<unsigned>(blocks), 32 * nw, smem, stream>>>(a, nblk_c);
  } else {
    const Split sp = rows_plan(B, C, H);
    a.splits = sp.n;
    a.rows = sp.rows;
    if (sp.n > 1 && a.ws == nullptr) return cudaErrorInvalidValue;
    constexpr int VV = kVec<T>;
    bool vec = rows && W % VV == 0 && al16(a.x) && al16<T>(a.sx.b) && al16<T>(a.sx.c) && al16<T>(a.sx.h);
    if (kScale)
      vec = vec && al16(a.dy) && al16<T>(a.sdy.b) && al16<T>(a.sdy.c) && al16<T>(a.sdy.h) && al16(a.dx) &&
            al16<T>(a.sdx.b) && al16<T>(a.sdx.c) && al16<T>(a.sdx.h);
    const int64_t lanes = vec ? W / VV : W;
    int tw = 1;
    while (tw < lanes && tw < 32) tw <<= 1;
    // rows per pass: all of a short segment, so that small planes share a block (not when H is split)
    int thp = kThreads / tw;
    if (sp.n == 1)
      while (thp > 1 && thp / 2 >= sp.rows) thp >>= 1;
    a.tw = tw;
    a.thp = thp;
    const int64_t planes_per_block = kThreads / (tw * thp);
    const int64_t blocks = ceil_div(B * C, planes_per_block) * sp.n;
    if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
    const size_t smem = static_cast<size_t>(planes_per_block * sp.rows + kThreads * (vec ? VV : 1)) * sizeof(A);
    if (vec)
      rows_reduce_kernel<T, Out, VV, kScale><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(a);
    else
      rows_reduce_kernel<T, Out, 1, kScale><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(a);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || a.splits == 1) return err;
  const int64_t n = B * C * W;
  combine_kernel<A, Out><<<static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0, stream>>>(
      a.ws, static_cast<Out*>(a.cols_out), n, a.splits, kScale ? A(1) : static_cast<A>(H));
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// element-wise: coord_pool backward (dx = gh / W + gw / H) and coord_scale forward (y = x aw ah)
// ---------------------------------------------------------------------------------------------

enum class Ew { kPlanes, kChannels, kStrided };

template <typename T, typename G>
struct EwArgs {
  const T* x;                       // scale forward only
  const G* gh;                      // (B, C, H) with strides sgh: pool gradient (T) or gate (acc)
  const G* gw;                      // (B, C, W) with strides sgw
  Strides3 sgh, sgw;
  T* out;
  int64_t B, C, H, W;
  Strides4 sx, so;
  int64_t px, po;                   // kChannels: pixel strides of x and out (H x W flattens)
};

// One thread per vector of V elements; I: the index type (int32 when the map has < 2^31 elements).
// kPlanes: H x W planes unit stride, V divides H * W (a vector may wrap rows, not planes).
// kChannels: channels unit stride and flat pixels, V divides C. kStrided: anything, V == 1.
template <typename T, typename G, int V, Ew L, bool kScale, typename I>
__global__ void __launch_bounds__(kThreads) ew_kernel(const EwArgs<T, G> a, I total_vec) {
  using A = acc_of<T>;
  const I vi = static_cast<I>(blockIdx.x) * kThreads + static_cast<I>(threadIdx.x);
  if (vi >= total_vec) return;
  const I e = vi * V;
  const I C = static_cast<I>(a.C), H = static_cast<I>(a.H), W = static_cast<I>(a.W);
  I b, c, h, w;
  int64_t ox, oo;
  if constexpr (L == Ew::kPlanes) {
    const I HW = H * W;
    const I bc = e / HW, hw = e - bc * HW;
    b = bc / C;
    c = bc - b * C;
    h = hw / W;
    w = hw - h * W;
    ox = b * a.sx.b + c * a.sx.c + hw;
    oo = b * a.so.b + c * a.so.c + hw;
  } else if constexpr (L == Ew::kChannels) {
    const I HWC = H * W * C;
    b = e / HWC;
    const I rem = e - b * HWC, p = rem / C;
    c = rem - p * C;
    h = p / W;
    w = p - h * W;
    ox = b * a.sx.b + p * a.px + c;
    oo = b * a.so.b + p * a.po + c;
  } else {
    I t = e / W;
    w = e - t * W;
    const I t2 = t / H;
    h = t - t2 * H;
    b = t2 / C;
    c = t2 - b * C;
    ox = b * a.sx.b + c * a.sx.c + h * a.sx.h + w * a.sx.w;
    oo = b * a.so.b + c * a.so.c + h * a.so.h + w * a.so.w;
  }
  A xv[V], o[V];
  if constexpr (kScale) load_vec<T, V>(a.x + ox, xv);
  I hj = h, wj = w, cj = c;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const A gh = to_acc(a.gh[b * a.sgh.b + cj * a.sgh.c + hj * a.sgh.l]);
    const A gw = to_acc(a.gw[b * a.sgw.b + cj * a.sgw.c + wj * a.sgw.l]);
    if constexpr (kScale)
      o[j] = xv[j] * gw * gh;                       // the reference module's order: x * a_w * a_h
    else
      o[j] = gh / static_cast<A>(a.W) + gw / static_cast<A>(a.H);
    if constexpr (L == Ew::kChannels) {
      ++cj;
    } else if (++wj == W) {
      wj = 0;
      ++hj;
    }
  }
  store_vec<T, V>(a.out + oo, o);
}

template <typename T, typename G, int V, Ew L, bool kScale>
cudaError_t launch_ew_typed(const EwArgs<T, G>& a, int64_t total_vec, cudaStream_t stream) {
  const int64_t blocks = ceil_div(total_vec, kThreads);
  if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
  if (a.B * a.C * a.H * a.W < (int64_t(1) << 31))
    ew_kernel<T, G, V, L, kScale, int32_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        a, static_cast<int32_t>(total_vec));
  else
    ew_kernel<T, G, V, L, kScale, int64_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, total_vec);
  return cudaGetLastError();
}

inline bool plane_unit(const Strides4& s, int64_t H, int64_t W) {
  return (s.w == 1 || W == 1) && (s.h == W || H == 1);
}

// The pixel stride of a tensor whose H x W flattens into one axis, or -1.
inline int64_t flat_pixel_stride(const Strides4& s, int64_t H, int64_t W) {
  if (W == 1) return s.h;
  if (H == 1 || s.h == W * s.w) return s.w;
  return -1;
}

template <typename T, typename G, bool kScale>
cudaError_t launch_ew(EwArgs<T, G> a, cudaStream_t stream) {
  const int64_t B = a.B, C = a.C, H = a.H, W = a.W, N = B * C * H * W;
  if (N == 0) return cudaSuccess;
  constexpr int VV = kVec<T>;
  if (plane_unit(a.so, H, W) && (!kScale || plane_unit(a.sx, H, W))) {
    const bool vec = (H * W) % VV == 0 && al16(a.out) && al16<T>(a.so.b) && al16<T>(a.so.c) &&
                     (!kScale || (al16(a.x) && al16<T>(a.sx.b) && al16<T>(a.sx.c)));
    if (vec) return launch_ew_typed<T, G, VV, Ew::kPlanes, kScale>(a, N / VV, stream);
    return launch_ew_typed<T, G, 1, Ew::kPlanes, kScale>(a, N, stream);
  }
  const int64_t po = flat_pixel_stride(a.so, H, W), px = kScale ? flat_pixel_stride(a.sx, H, W) : 0;
  if (chans_unit(a.so, C) && po >= 0 && (!kScale || (chans_unit(a.sx, C) && px >= 0))) {
    a.po = po;
    a.px = px;
    const bool vec = C % VV == 0 && al16(a.out) && al16<T>(a.so.b) && al16<T>(po) &&
                     (!kScale || (al16(a.x) && al16<T>(a.sx.b) && al16<T>(px)));
    if (vec) return launch_ew_typed<T, G, VV, Ew::kChannels, kScale>(a, N / VV, stream);
    return launch_ew_typed<T, G, 1, Ew::kChannels, kScale>(a, N, stream);
  }
  return launch_ew_typed<T, G, 1, Ew::kStrided, kScale>(a, N, stream);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// entry points
// ---------------------------------------------------------------------------------------------

int64_t coord_reduce_workspace_cuda(DType dtype, int64_t B, int64_t C, int64_t H, int64_t W) {
  (void)dtype;
  if (B * C * H * W == 0) return 0;
  const int64_t n = std::max(rows_plan(B, C, H).n, cl_plan(B, C, H).n);
  return n > 1 ? n * B * C * W : 0;
}

#define FA_CUDA_DISPATCH(CALL)          \
  switch (dtype) {                      \
    case DType::Float32: {              \
      using T = float;                  \
      return CALL;                      \
    }                                   \
    case DType::Float64: {              \
      using T = double;                 \
      return CALL;                      \
    }                                   \
    case DType::Float16: {              \
      using T = __half;                 \
      return CALL;                      \
    }                                   \
    case DType::BFloat16: {             \
      using T = __nv_bfloat16;          \
      return CALL;                      \
    }                                   \
  }                                     \
  return cudaErrorInvalidValue;

namespace {

template <typename T>
cudaError_t pool_forward_typed(const void* x, void* xh, void* xw, void* ws, int64_t B, int64_t C, int64_t H, int64_t W,
                               Strides4 sx, cudaStream_t stream) {
  ReduceArgs<T> a{};
  a.x = static_cast<const T*>(x);
  a.rows_out = xh;
  a.cols_out = xw;
  a.ws = static_cast<acc_of<T>*>(ws);
  a.B = B;
  a.C = C;
  a.H = H;
  a.W = W;
  a.sx = sx;
  a.sdy = sx;
  a.sdx = sx;
  return launch_reduce<T, T, false>(a, stream);
}

template <typename T>
cudaError_t pool_backward_typed(const void* gh, Strides3 sgh, const void* gw, Strides3 sgw, void* dx, int64_t B,
                                int64_t C, int64_t H, int64_t W, Strides4 sdx, cudaStream_t stream) {
  EwArgs<T, T> a{};
  a.gh = static_cast<const T*>(gh);
  a.gw = static_cast<const T*>(gw);
  a.sgh = sgh;
  a.sgw = sgw;
  a.out = static_cast<T*>(dx);
  a.B = B;
  a.C = C;
  a.H = H;
  a.W = W;
  a.sx = sdx;
  a.so = sdx;
  return launch_ew<T, T, false>(a, stream);
}

template <typename T>
cudaError_t scale_forward_typed(const void* x, const void* ah, Strides3 sah, const void* aw, Strides3 saw, void* y,
                                int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sy,
                                cudaStream_t stream) {
  EwArgs<T, acc_of<T>> a{};
  a.x = static_cast<const T*>(x);
  a.gh = static_cast<const acc_of<T>*>(ah);
  a.gw = static_cast<const acc_of<T>*>(aw);
  a.sgh = sah;
  a.sgw = saw;
  a.out = static_cast<T*>(y);
  a.B = B;
  a.C = C;
  a.H = H;
  a.W = W;
  a.sx = sx;
  a.so = sy;
  return launch_ew<T, acc_of<T>, true>(a, stream);
}

template <typename T>
cudaError_t scale_backward_typed(const void* dy, const void* x, const void* ah, Strides3 sah, const void* aw,
                                 Strides3 saw, void* dx, void* dah, void* daw, void* ws, int64_t B, int64_t C,
                                 int64_t H, int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx, cudaStream_t stream) {
  ReduceArgs<T> a{};
  a.x = static_cast<const T*>(x);
  a.dy = static_cast<const T*>(dy);
  a.dx = static_cast<T*>(dx);
  a.ah = static_cast<const acc_of<T>*>(ah);
  a.aw = static_cast<const acc_of<T>*>(aw);
  a.sah = sah;
  a.saw = saw;
  a.rows_out = dah;
  a.cols_out = daw;
  a.ws = static_cast<acc_of<T>*>(ws);
  a.B = B;
  a.C = C;
  a.H = H;
  a.W = W;
  a.sx = sx;
  a.sdy = sdy;
  a.sdx = sdx;
  return launch_reduce<T, acc_of<T>, true>(a, stream);
}

}  // namespace

cudaError_t coord_pool_forward_cuda(const void* x, void* xh, void* xw, void* ws, DType dtype, int64_t B, int64_t C,
                                    int64_t H, int64_t W, Strides4 sx, cudaStream_t stream) {
  FA_CUDA_DISPATCH(pool_forward_typed<T>(x, xh, xw, ws, B, C, H, W, sx, stream))
}

cudaError_t coord_pool_backward_cuda(const void* gh, Strides3 sgh, const void* gw, Strides3 sgw, void* dx,
                                     DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdx,
                                     cudaStream_t stream) {
  FA_CUDA_DISPATCH(pool_backward_typed<T>(gh, sgh, gw, sgw, dx, B, C, H, W, sdx, stream))
}

cudaError_t coord_scale_forward_cuda(const void* x, const void* ah, Strides3 sah, const void* aw, Strides3 saw,
                                     void* y, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                                     Strides4 sy, cudaStream_t stream) {
  FA_CUDA_DISPATCH(scale_forward_typed<T>(x, ah, sah, aw, saw, y, B, C, H, W, sx, sy, stream))
}

cudaError_t coord_scale_backward_cuda(const void* dy, const void* x, const void* ah, Strides3 sah, const void* aw,
                                      Strides3 saw, void* dx, void* dah, void* daw, void* ws, DType dtype, int64_t B,
                                      int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx,
                                      cudaStream_t stream) {
  FA_CUDA_DISPATCH(scale_backward_typed<T>(dy, x, ah, sah, aw, saw, dx, dah, daw, ws, B, C, H, W, sdy, sx, sdx,
                                           stream))
}

#undef FA_CUDA_DISPATCH

}  // namespace fastattn
