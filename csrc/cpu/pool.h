// Channel pooling on the CPU: per (b, c) statistics over the H x W plane.
#pragma once

#include <cstdint>

#include "common.h"

namespace fastattn {

// out[b * C + c] = mean over (h, w) of x[b*sb + c*sc + h*sh + w*sw], accumulated in fp32 (fp64 for fp64).
// `out` is a contiguous (B, C) buffer of the same dtype as x. Strides are in elements.
void channel_mean_cpu(const void* x, void* out, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                      int64_t sb, int64_t sc, int64_t sh, int64_t sw);

}  // namespace fastattn
