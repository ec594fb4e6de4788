// Channel mean pool: one read of x, fp32 accumulation, OpenMP across the independent reductions.
#include "pool.h"

#include <algorithm>
#include <vector>

namespace fastattn {
namespace {

// H x W plane contiguous (NCHW, or a channel slice of it): one reduction per (b, c), each a
// unit-stride loop the compiler vectorises.
template <typename T>
void mean_plane_contiguous(const T* x, T* out, int64_t B, int64_t C, int64_t HW, int64_t sb, int64_t sc) {
  using A = acc_t<T>;
  const double inv = 1.0 / static_cast<double>(HW);
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    const T* p = x + b * sb + c * sc;
    double total = 0;
    for (int64_t i0 = 0; i0 < HW; i0 += kChunk) {
      const int64_t i1 = std::min(HW, i0 + kChunk);
      A acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = i0; i < i1; ++i) acc += static_cast<A>(to_float(p[i]));
      total += static_cast<double>(acc);
    }
    out[bc] = from_double<T>(total * inv);
  }
}

// Channels contiguous (channels_last): a running sum of C-vectors per sample. Channel blocks
// give the threads work when the batch is small; each block's inner loop is unit-stride.
template <typename T>
void mean_channels_contiguous(const T* x, T* out, int64_t B, int64_t C, int64_t H, int64_t W,
                              int64_t sb, int64_t sh, int64_t sw) {
  using A = acc_t<T>;
  constexpr int64_t kBlock = 256;
  const int64_t nblk = (C + kBlock - 1) / kBlock;
  const int64_t HW = H * W;
  const double inv = 1.0 / static_cast<double>(HW);
#pragma omp parallel
  {
    std::vector<A> acc(kBlock);
    std::vector<double> total(kBlock);
#pragma omp for schedule(static)
    for (int64_t job = 0; job < B * nblk; ++job) {
      const int64_t b = job / nblk, c0 = (job % nblk) * kBlock;
      const int64_t n = std::min(kBlock, C - c0);
      std::fill(total.begin(), total.begin() + n, 0.0);
      A* a = acc.data();
      for (int64_t i0 = 0; i0 < HW; i0 += kChunk) {
        const int64_t i1 = std::min(HW, i0 + kChunk);
        std::fill(acc.begin(), acc.begin() + n, A(0));
        for (int64_t i = i0; i < i1; ++i) {
          const T* p = x + b * sb + (i / W) * sh + (i % W) * sw + c0;
#pragma omp simd
          for (int64_t c = 0; c < n; ++c) a[c] += static_cast<A>(to_float(p[c]));
        }
        for (int64_t c = 0; c < n; ++c) total[c] += static_cast<double>(a[c]);
      }
      for (int64_t c = 0; c < n; ++c) out[b * C + c0 + c] = from_double<T>(total[c] * inv);
    }
  }
}

// Any other strides (a permuted or sliced view): correct, not fast.
template <typename T>
void mean_strided(const T* x, T* out, int64_t B, int64_t C, int64_t H, int64_t W,
                  int64_t sb, int64_t sc, int64_t sh, int64_t sw) {
  const double inv = 1.0 / static_cast<double>(H * W);
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    const T* p = x + b * sb + c * sc;
    double acc = 0;  // the slow path: plain double accumulation
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) acc += static_cast<double>(to_float(p[h * sh + w * sw]));
    out[bc] = from_double<T>(acc * inv);
  }
}

template <typename T>
void channel_mean_typed(const T* x, T* out, int64_t B, int64_t C, int64_t H, int64_t W,
                        int64_t sb, int64_t sc, int64_t sh, int64_t sw) {
  if ((sw == 1 || W == 1) && (sh == W || H == 1)) {
    mean_plane_contiguous(x, out, B, C, H * W, sb, sc);
  } else if (sc == 1 || C == 1) {
    mean_channels_contiguous(x, out, B, C, H, W, sb, sh, sw);
  } else {
    mean_strided(x, out, B, C, H, W, sb, sc, sh, sw);
  }
}

}  // namespace

void channel_mean_cpu(const void* x, void* out, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                      int64_t sb, int64_t sc, int64_t sh, int64_t sw) {
  switch (dtype) {
    case DType::Float32:
      return channel_mean_typed(static_cast<const float*>(x), static_cast<float*>(out), B, C, H, W, sb, sc, sh, sw);
    case DType::Float64:
      return channel_mean_typed(static_cast<const double*>(x), static_cast<double*>(out), B, C, H, W, sb, sc, sh, sw);
    case DType::Float16:
      return channel_mean_typed(static_cast<const fp16_t*>(x), static_cast<fp16_t*>(out), B, C, H, W, sb, sc, sh, sw);
    case DType::BFloat16:
      return channel_mean_typed(static_cast<const bf16_t*>(x), static_cast<bf16_t*>(out), B, C, H, W, sb, sc, sh, sw);
  }
}

}  // namespace fastattn
