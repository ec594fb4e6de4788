// Bin means on CUDA (the cell decomposition of csrc/cpu/bins.h: the bins' distinct edges cut the
// plane into gh x gw cells, each position lies in one cell, every bin is a rectangle of cells).
//
// Forward, NCHW: a block per plane sums each column over each row group (coalesced rows), then the
// columns of each column group (shared memory), then the cells of each bin. channels_last: a block
// per (sample, 32 channels); its warps sum whole cells (or interleaved parts of them), lanes over
// channels (128-byte rows), merged in shared memory in order. Tables too large for shared memory,
// or other strides: a thread per output bin (correct, slow). Backward: every position of a cell
// gets the cell's gradient (the sum of dy / area over the bins holding it, from the cell -> bins
// lists), computed once per block into shared memory; one write of dx, nothing of x read.
// No atomics: every sum has a fixed order. Offsets are int64.
#include "bins.h"

#include <algorithm>

#include "pool_device.cuh"

namespace fastattn {
namespace {

using namespace pooldev;

constexpr int64_t kSmemBytes = 48 * 1024;   // the static / default dynamic shared-memory limit
constexpr int64_t kColBuf = 4096;           // column sums held at once (NCHW forward)
constexpr int kCLWarps = 16;                // warps of a channels_last forward block
constexpr int kBwdThreads = 256;

__device__ __forceinline__ int64_t bin_area(const BinGeometry& g, int64_t n) {
  const int64_t* q = g.bin_cells + 4 * n;
  return (g.row_edge[q[1]] - g.row_edge[q[0]]) * (g.col_edge[q[3]] - g.col_edge[q[2]]);
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

// NCHW (plane contiguous): block x = plane. Row groups are taken gb at a time so that their column
// sums (gb x W) fit in shared memory; cell sums of all groups stay there for the bins.
template <typename T>
__global__ void fwd_plane_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t C, int64_t sxb, int64_t sxc,
                                 BinGeometry g, int64_t gb) {
  using A = acc<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  A* col = reinterpret_cast<A*>(smem);
  A* cell = col + gb * g.W;
  const int64_t bc = blockIdx.x;
  const T* __restrict__ px = x + (bc / C) * sxb + (bc % C) * sxc;
  const int64_t W = g.W, gw = g.gw;
  for (int64_t g0 = 0; g0 < g.gh; g0 += gb) {
    const int64_t g1 = lmin(g.gh, g0 + gb);
    for (int64_t q = threadIdx.x; q < (g1 - g0) * W; q += blockDim.x) {
      const int64_t gl = q / W, w = q - gl * W;
      const int64_t r0 = g.row_edge[g0 + gl], r1 = g.row_edge[g0 + gl + 1];
      A s = 0;
      for (int64_t h = r0; h < r1; ++h) s += to_acc(px[h * W + w]);
      col[q] = s;
    }
    __syncthreads();
    for (int64_t q = threadIdx.x; q < (g1 - g0) * gw; q += blockDim.x) {
      const int64_t gl = q / gw, j = q - gl * gw;
      A s = 0;
      for (int64_t w = g.col_edge[j]; w < g.col_edge[j + 1]; ++w) s += col[gl * W + w];
      cell[(g0 + gl) * gw + j] = s;
    }
    __syncthreads();
  }
  for (int64_t n = threadIdx.x; n < g.N; n += blockDim.x) {
    const int64_t* q = g.bin_cells + 4 * n;
    A s = 0;
    for (int64_t r = q[0]; r < q[1]; ++r)
      for (int64_t c = q[2]; c < q[3]; ++c) s += cell[r * gw + c];
    out[bc * g.N + n] = dev_from_double<T>(static_cast<double>(s) / static_cast<double>(bin_area(g, n)));
  }
}

// channels_last: block x = (sample, 32-channel block). Work items are (cell, part): part p of P
// takes the cell's positions p, p + P, ...; P > 1 only when there are fewer cells than warps.
// Items' sums go to shared memory, cells are their parts added in order, bins their cells.
template <typename T>
__global__ void __launch_bounds__(kCLWarps * 32) fwd_channels_kernel(const T* __restrict__ x, T* __restrict__ out,
                                                                      int64_t C, int64_t n_cblk, Strides4 sx,
                                                                      BinGeometry g, int64_t P) {
  using A = acc<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  A* part = reinterpret_cast<A*>(smem);       // [cells * P][32]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.x / n_cblk, c = (blockIdx.x % n_cblk) * 32 + lane;
  const bool live = c < C;
  const int64_t cells = g.gh * g.gw, items = cells * P;
  const T* __restrict__ px = x + b * sx.b + (live ? c : 0) * sx.c;
  for (int64_t it = warp; it < items; it += kCLWarps) {
    const int64_t k = it / P, pp = it % P;
    const int64_t gi = k / g.gw, gj = k % g.gw;
    const int64_t r0 = g.row_edge[gi], c0 = g.col_edge[gj];
    const int64_t rw = g.col_edge[gj + 1] - c0, area = (g.row_edge[gi + 1] - r0) * rw;
    A s = 0;
    if (live) {
      int64_t h = r0 + pp / rw, w = c0 + pp % rw;
      const int64_t dh = P / rw, dw = P % rw;
      for (int64_t j = pp; j < area; j += P) {
        s += to_acc(px[h * sx.h + w * sx.w]);
        h += dh;
        w += dw;
        if (w >= c0 + rw) w -= rw, ++h;
      }
    }
    part[it * 32 + lane] = s;
  }
  __syncthreads();
  for (int64_t k = warp; k < cells; k += kCLWarps) {
    A s = part[k * P * 32 + lane];
    for (int64_t pp = 1; pp < P; ++pp) s += part[(k * P + pp) * 32 + lane];
    part[k * P * 32 + lane] = s;
  }
  __syncthreads();
  if (!live) return;
  for (int64_t n = warp; n < g.N; n += kCLWarps) {
    const int64_t* q = g.bin_cells + 4 * n;
    A s = 0;
    for (int64_t r = q[0]; r < q[1]; ++r)
      for (int64_t cc = q[2]; cc < q[3]; ++cc) s += part[(r * g.gw + cc) * P * 32 + lane];
    out[(b * C + c) * g.N + n] = dev_from_double<T>(static_cast<double>(s) / static_cast<double>(bin_area(g, n)));
  }
}

// Any strides, any table: a thread per output (b, c, n) sums its bin (grid-stride).
template <typename T>
__global__ void __launch_bounds__(256) fwd_direct_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t B,
                                                         int64_t C, Strides4 sx, BinGeometry g) {
  using A = acc<T>;
  const int64_t total = B * C * g.N;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * 256) {
    const int64_t bc = e / g.N, n = e % g.N;
    const T* __restrict__ px = x + (bc / C) * sx.b + (bc % C) * sx.c;
    const int64_t* q = g.bin_cells + 4 * n;
    const int64_t h0 = g.row_edge[q[0]], h1 = g.row_edge[q[1]], w0 = g.col_edge[q[2]], w1 = g.col_edge[q[3]];
    A s = 0;
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t w = w0; w < w1; ++w) s += to_acc(px[h * sx.h + w * sx.w]);
    out[e] = dev_from_double<T>(static_cast<double>(s) / static_cast<double>((h1 - h0) * (w1 - w0)));
  }
}

template <typename T>
cudaError_t fwd_typed(const void* xv, void* outv, int64_t B, int64_t C, Strides4 sx, const BinGeometry& g,
                      cudaStream_t stream) {
  using A = acc<T>;
  const T* x = static_cast<const T*>(xv);
  T* out = static_cast<T*>(outv);
  const int64_t HW = g.H * g.W, cells = g.gh * g.gw, A_ = sizeof(A);
  if (B * C == 0 || g.N == 0 || HW == 0) return cudaSuccess;
  if (plane_contiguous(sx, g.H, g.W) && g.W <= kColBuf) {
    const int64_t gb = lmax(1, lmin(g.gh, kColBuf / g.W));
    const int64_t smem = (gb * g.W + cells) * A_;
    if (smem <= kSmemBytes && B * C <= kMaxGridX) {
      const int threads = HW <= 512 ? 64 : HW <= 2048 ? 128 : 256;
      fwd_plane_kernel<T><<<static_cast<unsigned>(B * C), threads, static_cast<size_t>(smem), stream>>>(
          x, out, C, sx.b, sx.c, g, gb);
      return cudaGetLastError();
    }
  }
  if (channels_contiguous(sx, C)) {
    const int64_t P = lmax(1, kCLWarps / lmax(cells, 1));
    const int64_t smem = cells * P * 32 * A_;
    const int64_t n_cblk = ceil_div(C, 32);
    if (smem <= kSmemBytes && B * n_cblk <= kMaxGridX) {
      fwd_channels_kernel<T><<<static_cast<unsigned>(B * n_cblk), kCLWarps * 32, static_cast<size_t>(smem), stream>>>(
          x, out, C, n_cblk, sx, g, P);
      return cudaGetLastError();
    }
  }
  const int64_t blocks = lmin(ceil_div(B * C * g.N, 256), int64_t(1) << 20);
  fwd_direct_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(x, out, B, C, sx, g);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

// The gradient of cell k of plane bc: sum over the bins holding it (increasing order) of dy / area.
template <typename A>
__device__ __forceinline__ A cell_grad(const A* __restrict__ dy, int64_t bc, int64_t k, const BinGeometry& g) {
  double v = 0;
  for (int64_t e = g.cell_ptr[k]; e < g.cell_ptr[k + 1]; ++e) {
    const int64_t n = g.cell_bins[e];
    v += static_cast<double>(dy[bc * g.N + n]) / static_cast<double>(bin_area(g, n));
  }
  return static_cast<A>(v);
}

// NCHW (plane contiguous dx): block x = plane, block y = a run of R rows; the plane's cell
// gradients in shared memory, then each position takes its cell's.
template <typename T>
__global__ void __launch_bounds__(kBwdThreads) bwd_plane_kernel(const acc<T>* __restrict__ dy, T* __restrict__ dx,
                                                                int64_t C, int64_t sdb, int64_t sdc, BinGeometry g,
                                                                int64_t R) {
  using A = acc<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  A* cellv = reinterpret_cast<A*>(smem);
  const int64_t bc = blockIdx.x, cells = g.gh * g.gw;
  for (int64_t k = threadIdx.x; k < cells; k += kBwdThreads) cellv[k] = cell_grad(dy, bc, k, g);
  __syncthreads();
  T* __restrict__ pd = dx + (bc / C) * sdb + (bc % C) * sdc;
  const int64_t W = g.W;
  for (int64_t r0 = static_cast<int64_t>(blockIdx.y) * R; r0 < g.H; r0 += static_cast<int64_t>(gridDim.y) * R) {
    const int64_t r1 = lmin(g.H, r0 + R);
    int64_t h = r0 + threadIdx.x / W, w = threadIdx.x % W;
    const int64_t dh = kBwdThreads / W, dw = kBwdThreads % W;
    for (int64_t e = threadIdx.x; e < (r1 - r0) * W; e += kBwdThreads) {
      pd[h * W + w] = from_acc<T>(cellv[g.row_group[h] * g.gw + g.col_group[w]]);
      h += dh;
      w += dw;
      if (w >= W) w -= W, ++h;
    }
  }
}

// channels_last: block x = (sample, 32-channel block), block y = pixel segment; (cells x 32)
// gradients in shared memory, lane = channel, 8 warps over pixels.
template <typename T>
__global__ void __launch_bounds__(kBwdThreads) bwd_channels_kernel(const acc<T>* __restrict__ dy, T* __restrict__ dx,
                                                                   int64_t C, int64_t n_cblk, Strides4 sdx,
                                                                   BinGeometry g, int64_t seg) {
  using A = acc<T>;
  constexpr int kRows = kBwdThreads / 32;
  extern __shared__ __align__(16) unsigned char smem[];
  A* cellv = reinterpret_cast<A*>(smem);       // [cells][32]
  const int lane = threadIdx.x & 31, row = threadIdx.x >> 5;
  const int64_t b = blockIdx.x / n_cblk, c = (blockIdx.x % n_cblk) * 32 + lane;
  const bool live = c < C;
  const int64_t cells = g.gh * g.gw;
  for (int64_t k = row; k < cells; k += kRows) cellv[k * 32 + lane] = live ? cell_grad(dy, b * C + c, k, g) : A(0);
  __syncthreads();
  if (!live) return;
  const int64_t HW = g.H * g.W;
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * seg, p1 = lmin(HW, p0 + seg);
  T* __restrict__ pd = dx + b * sdx.b + c * sdx.c;
  int64_t i = p0 + row;
  int64_t h = i / g.W, w = i % g.W;
  const int64_t dh = kRows / g.W, dw = kRows % g.W;
  for (; i < p1; i += kRows) {
    pd[h * sdx.h + w * sdx.w] = from_acc<T>(cellv[(g.row_group[h] * g.gw + g.col_group[w]) * 32 + lane]);
    h += dh;
    w += dw;
    if (w >= g.W) w -= g.W, ++h;
  }
}

// Any strides, any table: a thread per element (grid-stride).
template <typename T>
__global__ void __launch_bounds__(256) bwd_generic_kernel(const acc<T>* __restrict__ dy, T* __restrict__ dx,
                                                          int64_t B, int64_t C, Strides4 sdx, BinGeometry g) {
  const int64_t HW = g.H * g.W, total = B * C * HW;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * 256) {
    const int64_t bc = e / HW, i = e % HW, h = i / g.W, w = i % g.W;
    const int64_t k = g.row_group[h] * g.gw + g.col_group[w];
    dx[(bc / C) * sdx.b + (bc % C) * sdx.c + h * sdx.h + w * sdx.w] = from_acc<T>(cell_grad(dy, bc, k, g));
  }
}

template <typename T>
cudaError_t bwd_typed(const void* dyv, void* dxv, int64_t B, int64_t C, Strides4 sdx, const BinGeometry& g,
                      cudaStream_t stream) {
  using A = acc<T>;
  const A* dy = static_cast<const A*>(dyv);
  T* dx = static_cast<T*>(dxv);
  const int64_t HW = g.H * g.W, cells = g.gh * g.gw, A_ = sizeof(A);
  if (B * C * HW == 0) return cudaSuccess;
  if (plane_contiguous(sdx, g.H, g.W) && cells * A_ <= kSmemBytes && B * C <= kMaxGridX) {
    int64_t R = lmax(1, ceil_div(4096, g.W));   // >= 4096 positions per block
    const int64_t S = lmin(ceil_div(g.H, R), kMaxGridYZ);
    bwd_plane_kernel<T><<<dim3(static_cast<unsigned>(B * C), static_cast<unsigned>(S)), kBwdThreads,
                          static_cast<size_t>(cells * A_), stream>>>(dy, dx, C, sdx.b, sdx.c, g, R);
    return cudaGetLastError();
  }
  const int64_t n_cblk = ceil_div(C, 32);
  if (channels_contiguous(sdx, C) && cells * 32 * A_ <= kSmemBytes && B * n_cblk <= kMaxGridX) {
    const int64_t want = ceil_div(static_cast<int64_t>(sm_count()) * 8, B * n_cblk);
    int64_t S = lmax(1, std::min({want, ceil_div(HW, 64), kMaxGridYZ}));
    const int64_t seg = ceil_div(HW, S);
    S = ceil_div(HW, seg);
    bwd_channels_kernel<T><<<dim3(static_cast<unsigned>(B * n_cblk), static_cast<unsigned>(S)), kBwdThreads,
                             static_cast<size_t>(cells * 32 * A_), stream>>>(dy, dx, C, n_cblk, sdx, g, seg);
    return cudaGetLastError();
  }
  const int64_t blocks = lmin(ceil_div(B * C * HW, 256), int64_t(1) << 20);
  bwd_generic_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(dy, dx, B, C, sdx, g);
  return cudaGetLastError();
}

}  // namespace

#define FA_TYPES(M) \
  M(Float32, float) M(Float64, double) M(Float16, __half) M(BFloat16, __nv_bfloat16)

cudaError_t bin_mean_forward_cuda(const void* x, void* out, DType dtype, int64_t B, int64_t C, Strides4 sx,
                                  const BinGeometry& g, cudaStream_t stream) {
  switch (dtype) {
#define FA_CASE(TAG, T) \
  case DType::TAG: return fwd_typed<T>(x, out, B, C, sx, g, stream);
    FA_TYPES(FA_CASE)
#undef FA_CASE
  }
  return cudaErrorInvalidValue;
}

cudaError_t bin_mean_backward_cuda(const void* dy, void* dx, DType dtype, int64_t B, int64_t C, Strides4 sdx,
                                   const BinGeometry& g, cudaStream_t stream) {
  switch (dtype) {
#define FA_CASE(TAG, T) \
  case DType::TAG: return bwd_typed<T>(dy, dx, B, C, sdx, g, stream);
    FA_TYPES(FA_CASE)
#undef FA_CASE
  }
  return cudaErrorInvalidValue;
}

#undef FA_TYPES

}  // namespace fastattn
