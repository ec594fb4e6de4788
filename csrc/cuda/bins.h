// Bin means on CUDA: launchers free of torch headers (pointers, sizes, strides, a stream).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../cpu/bins.h"  // BinGeometry: the packed geometry table (here: its device copy)
#include "../cpu/common.h"

namespace fastattn {

// out[b, c, n] = mean of x[b, c] over bin n, out contiguous (B, C, N) in x's dtype; `g` views a
// device copy of the geometry table (its sizes taken from the host copy). One read of x; fp32
// sums (fp64 for fp64) in fixed orders: deterministic. Returns the launch error, if any.
cudaError_t bin_mean_forward_cuda(const void* x, void* out, DType dtype, int64_t B, int64_t C, Strides4 sx,
                                  const BinGeometry& g, cudaStream_t stream);

// dx[b, c, h, w] = sum over the bins n holding (h, w) of dy[b, c, n] / area(n); dy contiguous
// (B, C, N) in the accumulation type (float; double for fp64), dx of `dtype` with strides sdx.
// One write of dx.
cudaError_t bin_mean_backward_cuda(const void* dy, void* dx, DType dtype, int64_t B, int64_t C, Strides4 sdx,
                                   const BinGeometry& g, cudaStream_t stream);

}  // namespace fastattn
