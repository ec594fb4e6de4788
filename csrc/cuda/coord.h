// Coordinate attention on CUDA: launchers free of torch headers (pointers, sizes, strides, a stream).
//
// The (B, C, L) gate / gradient rows (L = H or W) are passed with their own element strides
// (gb, gc, gl), so that the glue can hand a channels_last map transposed rows ((B, L, C) storage,
// gc == 1: read with unit stride across the channels a warp covers).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../cpu/common.h"

namespace fastattn {

// Element strides of a (B, C, L) row tensor.
struct Strides3 {
  int64_t b, c, l;
};

// Elements of the accumulation type (float; double for Float64) that coord_pool_forward_cuda and
// coord_scale_backward_cuda need as workspace for maps of these sizes, whatever their strides
// (partial column sums when H is split across blocks); 0 when none.
int64_t coord_reduce_workspace_cuda(DType dtype, int64_t B, int64_t C, int64_t H, int64_t W);

// xh[b, c, h] = mean over w of x, xw[b, c, w] = mean over h of x, from one read of x (any strides).
// xh (B, C, H) and xw (B, C, W) contiguous in x's dtype; `ws` the workspace above (or null when 0).
cudaError_t coord_pool_forward_cuda(const void* x, void* xh, void* xw, void* ws, DType dtype, int64_t B, int64_t C,
                                    int64_t H, int64_t W, Strides4 sx, cudaStream_t stream);

// dx[b, c, h, w] = gh[b, c, h] / W + gw[b, c, w] / H; gh, gw, dx of one dtype; dx any strides.
cudaError_t coord_pool_backward_cuda(const void* gh, Strides3 sgh, const void* gw, Strides3 sgw, void* dx,
                                     DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdx,
                                     cudaStream_t stream);

// y = x * aw[b, c, w] * ah[b, c, h]; ah, aw of the accumulation type.
cudaError_t coord_scale_forward_cuda(const void* x, const void* ah, Strides3 sah, const void* aw, Strides3 saw,
                                     void* y, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                                     Strides4 sy, cudaStream_t stream);

// dx = dy * aw * ah, dah[b, c, h] = sum_w dy x aw, daw[b, c, w] = sum_h dy x ah, from one pass over
// dy and x; dah (B, C, H) and daw (B, C, W) contiguous of the accumulation type; deterministic
// (block reductions in a fixed order, no atomics). `ws` as for coord_pool_forward_cuda.
cudaError_t coord_scale_backward_cuda(const void* dy, const void* x, const void* ah, Strides3 sah, const void* aw,
                                      Strides3 saw, void* dx, void* dah, void* daw, void* ws, DType dtype, int64_t B,
                                      int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx,
                                      cudaStream_t stream);

}  // namespace fastattn
