// Channel scale on the CPU: y = x * a[b, c] (+ residual) and its backward.
#pragma once

#include <cstdint>

#include "common.h"

namespace fastattn {

// y = x * a[b, c] (+ r), math in fp32 (fp64 for fp64). x, r, y share `dtype` and the sizes
// (B, C, H, W) but each has its own strides; r may be null. `a` is a contiguous (B, C) buffer of
// the accumulation type: float (double when dtype is Float64).
void channel_scale_forward_cpu(const void* x, const void* a, const void* r, void* y, DType dtype, int64_t B,
                               int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sr, Strides4 sy);

// Backward of y = x * a:  dx = dy * a;  da[b, c] = sum over (h, w) of dy * x.
// dy, x, dx share `dtype`; `a` and `da` are contiguous (B, C) buffers of the accumulation type
// (float; double for Float64). da is deterministic: every (b, c) is summed in an order that
// depends on the shape alone (fp32 partial sums over chunks, folded into double).
void channel_scale_backward_cpu(const void* dy, const void* x, const void* a, void* dx, void* da, DType dtype,
                                int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sx,
                                Strides4 sdx);

}  // namespace fastattn
