// Channel pooling on CUDA: launchers free of torch headers (pointers, sizes, strides, a stream).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../cpu/common.h"

namespace fastattn {

// out[b * C + c] = mean over (h, w) of x[b*sb + c*sc + h*sh + w*sw]; fp32 accumulation (fp64 for
// fp64). `out` is a contiguous (B, C) buffer of x's dtype. Returns the launch error, if any.
cudaError_t channel_mean_cuda(const void* x, void* out, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                              int64_t sb, int64_t sc, int64_t sh, int64_t sw, cudaStream_t stream);

}  // namespace fastattn
