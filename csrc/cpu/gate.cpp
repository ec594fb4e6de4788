// Channel scale: y = x * a[b, c] (+ residual) in one pass; backward dx = dy * a and
// da = sum_hw dy * x in one pass. OpenMP across independent work; fp32 math for 16/32-bit
// inputs, fp64 for fp64; three layouts: H x W plane contiguous (NCHW and its channel slices),
// channels contiguous (channels_last), anything else (generic, correct, not fast).
#include "gate.h"
#include "stream.h"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace fastattn {
namespace {

// Elements of one work item of the channels-contiguous paths (pixels x C).
constexpr int64_t kPixelWork = 16384;

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

template <typename T, bool kRes>
void fwd_plane(const T* x, const acc_t<T>* a, const T* r, T* y, int64_t B, int64_t C, int64_t HW,
               Strides4 sx, Strides4 sr, Strides4 sy) {
  using A = acc_t<T>;
  // fp32 outputs far larger than the cache: streaming stores (no read of y before its write)
  const bool stream = std::is_same<T, float>::value && stream_output(B * C * HW * int64_t(sizeof(T)));
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t bc = 0; bc < B * C; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      const T* px = x + b * sx.b + c * sx.c;
      T* py = y + b * sy.b + c * sy.c;
      const T* pr = kRes ? r + b * sr.b + c * sr.c : nullptr;
      const A s = a[bc];
      if constexpr (std::is_same<T, float>::value) {
        if (stream) {
          const vfloat vs = vbroadcast(s);
          if constexpr (kRes)
            stream_row_f32(py, HW, [&](int64_t i) { return vfma(vload(px + i), vs, vload(pr + i)); },
                           [&](int64_t i) { return px[i] * s + pr[i]; });
          else
            stream_row_f32(py, HW, [&](int64_t i) { return vmul(vload(px + i), vs); },
                           [&](int64_t i) { return px[i] * s; });
          continue;
        }
      }
      if (kRes) {
#pragma omp simd
        for (int64_t i = 0; i < HW; ++i)
          py[i] = store<T>(static_cast<A>(to_float(px[i])) * s + static_cast<A>(to_float(pr[i])));
      } else {
#pragma omp simd
        for (int64_t i = 0; i < HW; ++i) py[i] = store<T>(static_cast<A>(to_float(px[i])) * s);
      }
    }
    if (stream) stream_fence();
  }
}

template <typename T, bool kRes>
void fwd_channels(const T* x, const acc_t<T>* a, const T* r, T* y, int64_t B, int64_t C, int64_t H, int64_t W,
                  Strides4 sx, Strides4 sr, Strides4 sy) {
  using A = acc_t<T>;
  const int64_t HW = H * W;
  const int64_t P = std::max<int64_t>(1, kPixelWork / std::max<int64_t>(C, 1));  // pixels per job
  const int64_t nblk = (HW + P - 1) / P;
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < B * nblk; ++job) {
    const int64_t b = job / nblk, i0 = (job % nblk) * P, i1 = std::min(HW, i0 + P);
    const A* ab = a + b * C;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t h = i / W, w = i % W;
      const T* px = x + b * sx.b + h * sx.h + w * sx.w;
      T* py = y + b * sy.b + h * sy.h + w * sy.w;
      if (kRes) {
        const T* pr = r + b * sr.b + h * sr.h + w * sr.w;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)
          py[c] = store<T>(static_cast<A>(to_float(px[c])) * ab[c] + static_cast<A>(to_float(pr[c])));
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) py[c] = store<T>(static_cast<A>(to_float(px[c])) * ab[c]);
      }
    }
  }
}

template <typename T>
void fwd_generic(const T* x, const acc_t<T>* a, const T* r, T* y, int64_t B, int64_t C, int64_t H, int64_t W,
                 Strides4 sx, Strides4 sr, Strides4 sy) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    const A s = a[bc];
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        A v = static_cast<A>(to_float(x[b * sx.b + c * sx.c + h * sx.h + w * sx.w])) * s;
        if (r) v += static_cast<A>(to_float(r[b * sr.b + c * sr.c + h * sr.h + w * sr.w]));
        y[b * sy.b + c * sy.c + h * sy.h + w * sy.w] = store<T>(v);
      }
  }
}

template <typename T>
void forward_typed(const T* x, const acc_t<T>* a, const T* r, T* y, int64_t B, int64_t C, int64_t H, int64_t W,
                   Strides4 sx, Strides4 sr, Strides4 sy) {
  const bool res = r != nullptr;
  if (plane_contiguous(sx, H, W) && plane_contiguous(sy, H, W) && (!res || plane_contiguous(sr, H, W))) {
    if (res) return fwd_plane<T, true>(x, a, r, y, B, C, H * W, sx, sr, sy);
    return fwd_plane<T, false>(x, a, r, y, B, C, H * W, sx, sr, sy);
  }
  if (channels_contiguous(sx, C) && channels_contiguous(sy, C) && (!res || channels_contiguous(sr, C))) {
    if (res) return fwd_channels<T, true>(x, a, r, y, B, C, H, W, sx, sr, sy);
    return fwd_channels<T, false>(x, a, r, y, B, C, H, W, sx, sr, sy);
  }
  fwd_generic(x, a, r, y, B, C, H, W, sx, sr, sy);
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

// One (b, c) plane per iteration, by one thread: dx written and da summed in the same pass.
template <typename T>
void bwd_plane(const T* dy, const T* x, const acc_t<T>* a, T* dx, acc_t<T>* da, int64_t B, int64_t C, int64_t HW,
               Strides4 sdy, Strides4 sx, Strides4 sdx) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    const T* pdy = dy + b * sdy.b + c * sdy.c;
    const T* px = x + b * sx.b + c * sx.c;
    T* pdx = dx + b * sdx.b + c * sdx.c;
    const A s = a[bc];
    double total = 0;
    for (int64_t i0 = 0; i0 < HW; i0 += kChunk) {
      const int64_t i1 = std::min(HW, i0 + kChunk);
      A acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = i0; i < i1; ++i) {
        const A g = static_cast<A>(to_float(pdy[i]));
        pdx[i] = store<T>(g * s);
        acc += g * static_cast<A>(to_float(px[i]));
      }
      total += static_cast<double>(acc);
    }
    da[bc] = static_cast<A>(total);
  }
}

// Channels contiguous (x and dx; dy too when kUnitDy, else dy read with its channel stride, e.g.
// an NCHW dy against a channels_last x: each of its cache lines serves the next pixels from L1).
// A job is (sample, block of channels, segment of pixels); its inner loop runs over the channel
// block. The number of pixel segments depends on the shape only (enough jobs for the threads
// when B * channel blocks is small), and the segments' partial sums are added in segment order,
// so da does not depend on the thread count.
template <typename T, bool kUnitDy>
void bwd_channels(const T* dy, const T* x, const acc_t<T>* a, T* dx, acc_t<T>* da, int64_t B, int64_t C, int64_t H,
                  int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx) {
  using A = acc_t<T>;
  // Channel blocks of equal width, at most kMaxBlock: whole pixel rows when C <= kMaxBlock (reading
  // part of a row per pixel measured 3x slower at C = 512 than whole rows).
  constexpr int64_t kMaxBlock = 1024;
  constexpr int64_t kMinJobs = 64;
  const int64_t HW = H * W;
  const int64_t nC = (C + kMaxBlock - 1) / kMaxBlock;
  const int64_t kBlock = (((C + nC - 1) / nC) + 15) / 16 * 16;
  const int64_t minSeg = 64;  // pixels: segments no shorter than this
  int64_t S = std::max<int64_t>(1, (kMinJobs + B * nC - 1) / (B * nC));
  S = std::max<int64_t>(1, std::min(S, HW / minSeg));
  const int64_t seg = (HW + S - 1) / S;
  const int64_t dyc = kUnitDy ? 1 : sdy.c;
  std::vector<double> partial(S > 1 ? static_cast<size_t>(B * S * C) : 0);
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < B * nC * S; ++job) {
    A acc[kMaxBlock];
    double total[kMaxBlock];
    const int64_t s = job % S, bcb = job / S;
    const int64_t b = bcb / nC, c0 = (bcb % nC) * kBlock;
    const int64_t n = std::min(kBlock, C - c0);
    const int64_t p0 = s * seg, p1 = std::min(HW, p0 + seg);
    const A* __restrict__ ab = a + b * C + c0;
    for (int64_t c = 0; c < n; ++c) total[c] = 0.0;
    for (int64_t i0 = p0; i0 < p1; i0 += kChunk) {
      const int64_t i1 = std::min(p1, i0 + kChunk);
      for (int64_t c = 0; c < n; ++c) acc[c] = A(0);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t h = i / W, w = i % W;
        const T* __restrict__ pdy = dy + b * sdy.b + h * sdy.h + w * sdy.w + c0 * dyc;
        const T* __restrict__ px = x + b * sx.b + h * sx.h + w * sx.w + c0;
        T* __restrict__ pdx = dx + b * sdx.b + h * sdx.h + w * sdx.w + c0;
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) {
          const A g = static_cast<A>(to_float(pdy[c * dyc]));
          pdx[c] = store<T>(g * ab[c]);
          acc[c] += g * static_cast<A>(to_float(px[c]));
        }
      }
      for (int64_t c = 0; c < n; ++c) total[c] += static_cast<double>(acc[c]);
    }
    if (S == 1) {
      for (int64_t c = 0; c < n; ++c) da[b * C + c0 + c] = static_cast<A>(total[c]);
    } else {
      double* pp = partial.data() + (b * S + s) * C + c0;
      for (int64_t c = 0; c < n; ++c) pp[c] = total[c];
    }
  }
  if (S > 1) {
#pragma omp parallel for schedule(static)
    for (int64_t bc = 0; bc < B * C; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      double t = 0;
      for (int64_t s = 0; s < S; ++s) t += partial[(b * S + s) * C + c];
      da[bc] = static_cast<A>(t);
    }
  }
}

template <typename T>
void bwd_generic(const T* dy, const T* x, const acc_t<T>* a, T* dx, acc_t<T>* da, int64_t B, int64_t C, int64_t H,
                 int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    const A s = a[bc];
    double acc = 0;  // the slow path: plain double accumulation
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const A g = static_cast<A>(to_float(dy[b * sdy.b + c * sdy.c + h * sdy.h + w * sdy.w]));
        dx[b * sdx.b + c * sdx.c + h * sdx.h + w * sdx.w] = store<T>(g * s);
        acc += static_cast<double>(g) * static_cast<double>(to_float(x[b * sx.b + c * sx.c + h * sx.h + w * sx.w]));
      }
    da[bc] = static_cast<A>(acc);
  }
}

template <typename T>
void backward_typed(const T* dy, const T* x, const acc_t<T>* a, T* dx, acc_t<T>* da, int64_t B, int64_t C,
                    int64_t H, int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx) {
  if (plane_contiguous(sdy, H, W) && plane_contiguous(sx, H, W) && plane_contiguous(sdx, H, W))
    return bwd_plane(dy, x, a, dx, da, B, C, H * W, sdy, sx, sdx);
  if (channels_contiguous(sx, C) && channels_contiguous(sdx, C)) {
    if (channels_contiguous(sdy, C)) return bwd_channels<T, true>(dy, x, a, dx, da, B, C, H, W, sdy, sx, sdx);
    return bwd_channels<T, false>(dy, x, a, dx, da, B, C, H, W, sdy, sx, sdx);
  }
  bwd_generic(dy, x, a, dx, da, B, C, H, W, sdy, sx, sdx);
}

}  // namespace

void channel_scale_forward_cpu(const void* x, const void* a, const void* r, void* y, DType dtype, int64_t B,
                               int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sr, Strides4 sy) {
  switch (dtype) {
#define FA_CASE(TAG, T)                                                                                         \
  case DType::TAG:                                                                                              \
    return forward_typed(static_cast<const T*>(x), static_cast<const acc_t<T>*>(a), static_cast<const T*>(r), \
                         static_cast<T*>(y), B, C, H, W, sx, sr, sy);
    FA_CASE(Float32, float)
    FA_CASE(Float64, double)
    FA_CASE(Float16, fp16_t)
    FA_CASE(BFloat16, bf16_t)
#undef FA_CASE
  }
}

void channel_scale_backward_cpu(const void* dy, const void* x, const void* a, void* dx, void* da, DType dtype,
                                int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sx,
                                Strides4 sdx) {
  switch (dtype) {
#define FA_CASE(TAG, T)                                                                                         \
  case DType::TAG:                                                                                              \
    return backward_typed(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const acc_t<T>*>(a), \
                          static_cast<T*>(dx), static_cast<acc_t<T>*>(da), B, C, H, W, sdy, sx, sdx);
    FA_CASE(Float32, float)
    FA_CASE(Float64, double)
    FA_CASE(Float16, fp16_t)
    FA_CASE(BFloat16, bf16_t)
#undef FA_CASE
  }
}

}  // namespace fastattn
