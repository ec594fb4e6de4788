// Coordinate attention on the CPU: the two directional means (coord_pool) and the two-axis scale
// (coord_scale), forward and backward. Torch-free: pointers, sizes, element strides.
#pragma once

#include <cstdint>

#include "common.h"

namespace fastattn {

// xh[b, c, h] = mean over w of x, xw[b, c, w] = mean over h of x, from one read of x (any strides).
// xh (B, C, H) and xw (B, C, W) are contiguous buffers of x's dtype; H, W >= 1.
void coord_pool_forward_cpu(const void* x, void* xh, void* xw, DType dtype, int64_t B, int64_t C, int64_t H,
                            int64_t W, Strides4 sx);

// dx[b, c, h, w] = gh[b, c, h] / W + gw[b, c, w] / H. gh (B, C, H) and gw (B, C, W) are contiguous
// buffers of dx's dtype; dx has any strides (the glue gives NCHW or channels_last).
void coord_pool_backward_cpu(const void* gh, const void* gw, void* dx, DType dtype, int64_t B, int64_t C,
                             int64_t H, int64_t W, Strides4 sdx);

// CoordinateAttention's whole input gradient in one pass (its CPU training step):
// dx = dy * aw * ah + gh / W + gw / H, with gh (B, C, H) and gw (B, C, W) contiguous buffers of dx's
// dtype (the pooled means' gradients), ah and aw contiguous in the accumulation type.
void coord_backward_dx_cpu(const void* dy, const void* ah, const void* aw, const void* gh, const void* gw, void* dx,
                           DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sdx);

// y = x * aw[b, c, w] * ah[b, c, h] (in that order, as the reference module). ah (B, C, H) and
// aw (B, C, W) are contiguous buffers of the accumulation type (float; double for Float64).
void coord_scale_forward_cpu(const void* x, const void* ah, const void* aw, void* y, DType dtype, int64_t B,
                             int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sy);

// With g = dy * x:  dx = dy * aw * ah,  dah[b, c, h] = sum_w g * aw,  daw[b, c, w] = sum_h g * ah,
// all three from one pass over dy and x. ah, aw, dah, daw are contiguous buffers of the
// accumulation type. dah and daw are deterministic: the summation order depends on the shape only.
// dx null: dah and daw only (sdx ignored).
void coord_scale_backward_cpu(const void* dy, const void* x, const void* ah, const void* aw, void* dx, void* dah,
                              void* daw, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy,
                              Strides4 sx, Strides4 sdx);

}  // namespace fastattn
