// SGE gate on CUDA: launchers free of torch headers (pointers, sizes, strides, a workspace, a stream).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "../cpu/common.h"

namespace fastattn {

// Bytes of device workspace sge_forward_cuda needs for this shape (0 when one block per (b, g)
// does everything). The workspace needs no initialisation.
size_t sge_forward_workspace_cuda(DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, int64_t G);

// The forward of fastattn/ops/group.py (same contract as sge_forward_cpu in csrc/cpu/group.h): y from
// x, and the statistics m (B, C), mu, sd (B, G), contiguous in the accumulation type (float; double
// for Float64); weight, bias: contiguous (G,) of the accumulation type. Requires C % G == 0 and
// H * W >= 2. Deterministic (block reductions in a fixed order, no atomics).
cudaError_t sge_forward_cuda(const void* x, const void* weight, const void* bias, void* y, void* m, void* mu,
                             void* sd, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, int64_t G,
                             double eps, Strides4 sx, Strides4 sy, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream);

size_t sge_backward_workspace_cuda(DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, int64_t G);

// (dx, dweight, dbias) from dy, x, the parameters and the forward's m, mu, sd; dweight and dbias:
// contiguous (G,) of the accumulation type, summed over the batch in order.
cudaError_t sge_backward_cuda(const void* dy, const void* x, const void* weight, const void* bias, const void* m,
                              const void* mu, const void* sd, void* dx, void* dweight, void* dbias, DType dtype,
                              int64_t B, int64_t C, int64_t H, int64_t W, int64_t G, double eps, Strides4 sdy,
                              Strides4 sx, Strides4 sdx, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream);

}  // namespace fastattn
