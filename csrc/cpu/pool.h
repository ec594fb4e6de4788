// Channel pooling on the CPU: per (b, c) statistics over the H x W plane (mean, max, std, a
// weighted sum) and their backward. Torch-free: pointers, sizes and element strides only.
#pragma once

#include <cstdint>

#include "common.h"

namespace fastattn {

// out[b * C + c] = mean over (h, w) of x[b*sb + c*sc + h*sh + w*sw], accumulated in fp32 (fp64 for fp64).
// `out` is a contiguous (B, C) buffer of the same dtype as x. Strides are in elements. H * W >= 1.
void channel_mean_cpu(const void* x, void* out, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                      int64_t sb, int64_t sc, int64_t sh, int64_t sw);

// Where channel_pool writes: contiguous (B, C) buffers, each null when not wanted. mean / max / std
// are in x's dtype; argmax is the flat index h * W + w of the first maximum (NaN beats any number);
// mean_acc and std_acc are the same statistics in the accumulation type (float; double for fp64).
struct PoolOutputs {
  void* mean = nullptr;
  void* max = nullptr;
  void* std = nullptr;
  int64_t* argmax = nullptr;
  void* mean_acc = nullptr;
  void* std_acc = nullptr;
};

// Mean, max (with argmax) and std = sqrt(unbiased variance + eps) of every (b, c) plane of x, in
// one read of x. The max / std work is skipped when their outputs are all null. H * W >= 1, and
// >= 2 when std is wanted. Deterministic: the summation order depends on the shape alone.
void channel_pool_forward_cpu(const void* x, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                              double eps, const PoolOutputs& out);

// The (B, C) inputs of channel_pool's backward, contiguous, in the accumulation type (argmax int64);
// a group is null when its statistic has no gradient: dmean; (dmax, argmax); (dstd, mean, std) + x.
struct PoolGrads {
  const void* dmean = nullptr;
  const void* dmax = nullptr;
  const int64_t* argmax = nullptr;
  const void* dstd = nullptr;
  const void* mean = nullptr;
  const void* std = nullptr;
};

// dx = dmean / HW + [p == argmax] * dmax + dstd * (x - mean) / ((HW - 1) * std), one write of dx and
// one read of x (only when dstd is given). dx and x share `dtype`, each with its own strides. An
// argmax outside [0, H * W) adds nothing (the caller validates).
void channel_pool_backward_cpu(const void* x, void* dx, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                               Strides4 sx, Strides4 sdx, const PoolGrads& g);

// y[b, c] = sum over (h, w) of x[b, c, h, w] * w[c, h, w]: y a contiguous (B, C) buffer of x's dtype,
// `w` in the accumulation type with strides sw (sw.b unused). Fast when w has x's layout.
void dct_pool_forward_cpu(const void* x, const void* w, void* y, DType dtype, int64_t B, int64_t C, int64_t H,
                          int64_t W, Strides4 sx, Strides4 sw);

// dx = dy[b, c] * w[c]  (when dx is not null) and  dw = sum over b of dy[b, c] * x[b, c]  (when x is
// not null), in one pass over x and dx. dy: contiguous (B, C) in the accumulation type; w and dw in
// the accumulation type with strides sw / sdw (their .b unused); x and dx share `dtype`. dw is
// summed over b in order 0..B-1 within fixed batch splits added in order: deterministic.
void dct_pool_backward_cpu(const void* dy, const void* w, const void* x, void* dx, void* dw, DType dtype, int64_t B,
                           int64_t C, int64_t H, int64_t W, Strides4 sw, Strides4 sx, Strides4 sdx, Strides4 sdw);

}  // namespace fastattn
