// Channel pooling on CUDA: launchers free of torch headers (pointers, sizes, strides, a stream).
// Every launcher returns the launch error, if any; empty inputs launch nothing. The reductions are
// deterministic: warps and blocks merge in fixed shuffle / shared-memory orders, and splits of a
// plane (when B * C alone cannot fill the device) are merged in split order by a second kernel.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "../cpu/common.h"
#include "../cpu/pool.h"  // PoolOutputs, PoolGrads: plain structs of pointers

namespace fastattn {

// Bytes of device workspace channel_pool_forward_cuda needs for these arguments on the current
// device (0: none; the segments of a plane need one). Pass a buffer at least this large (16-byte
// aligned), or null when 0. channel_mean is channel_pool with only PoolOutputs::mean set.
size_t channel_pool_workspace_bytes(DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                                    bool with_max, bool with_std);

// Mean, max (+ argmax: the first flat h * W + w, NaN beating any number) and std =
// sqrt(unbiased variance + eps) of every (b, c) plane in one read of x; see PoolOutputs (device
// pointers). H * W >= 1 (>= 2 with std); fp32 math for 16/32-bit x (Welford / Chan merges), fp64
// for fp64.
cudaError_t channel_pool_forward_cuda(const void* x, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                                      Strides4 sx, double eps, const PoolOutputs& out, void* workspace,
                                      size_t workspace_bytes, cudaStream_t stream);

// dx = dmean / HW + [p == argmax] * dmax + dstd * (x - mean) / ((HW - 1) * std) elementwise (see
// PoolGrads, device pointers); x is read only when dstd is given. Argmax values outside [0, H * W)
// add nothing.
cudaError_t channel_pool_backward_cuda(const void* x, void* dx, DType dtype, int64_t B, int64_t C, int64_t H,
                                       int64_t W, Strides4 sx, Strides4 sdx, const PoolGrads& g, cudaStream_t stream);

// y[b, c] = sum over (h, w) of x * w[c, h, w]: y contiguous (B, C) in x's dtype, w in the
// accumulation type with strides sw (.b unused). Workspace as for channel_pool.
size_t dct_pool_forward_workspace_bytes(DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                                        Strides4 sw);
cudaError_t dct_pool_forward_cuda(const void* x, const void* w, void* y, DType dtype, int64_t B, int64_t C, int64_t H,
                                  int64_t W, Strides4 sx, Strides4 sw, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream);

// dx = dy[b, c] * w[c] (dx not null) and dw = sum over b of dy[b, c] * x[b, c] (x not null; dw in
// the accumulation type with strides sdw), in one pass over x and dx; dy contiguous (B, C) in the
// accumulation type. dw is summed over b in order within batch splits added in order.
size_t dct_pool_backward_workspace_bytes(DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sw,
                                         Strides4 sx, Strides4 sdx, Strides4 sdw, bool need_dx, bool need_dw);
cudaError_t dct_pool_backward_cuda(const void* dy, const void* w, const void* x, void* dx, void* dw, DType dtype,
                                   int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sw, Strides4 sx, Strides4 sdx,
                                   Strides4 sdw, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace fastattn
