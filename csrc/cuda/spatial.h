// Spatial attention ops on CUDA: launchers free of torch headers (pointers, sizes, strides, a
// stream). The semantics are those of csrc/cpu/spatial.h; see there for the operands.
//
// Workspace: the launchers that may sum partial results in a second kernel (deterministic, no
// atomics) take a device `workspace` of `workspace_bytes` (256-byte aligned; null when 0). Its size
// is what the matching *_workspace function returns for the same arguments (it launches nothing;
// the plan depends on the shapes, strides and pointer alignment, not on the device).
// Every launcher returns the first launch error (cudaSuccess when all launches went through;
// cudaErrorInvalidValue for a workspace too small, cudaErrorInvalidConfiguration for a grid
// beyond 2^31 - 1 blocks).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "../cpu/common.h"

namespace fastattn {

// [max, mean] over N of a (B, N, P1, P2) view (x strides sx, y strides sy; a (B, N) contiguous in
// the accumulation type or null); idx contiguous (B, P1 * P2) int32, the first maximal n.
size_t spatial_pool_forward_cuda_workspace(const void* x, const void* a, void* y, int32_t* idx, DType dtype,
                                           int64_t B, int64_t N, int64_t P1, int64_t P2, Strides4 sx, Strides4 sy);
cudaError_t spatial_pool_forward_cuda(const void* x, const void* a, void* y, int32_t* idx, DType dtype, int64_t B,
                                      int64_t N, int64_t P1, int64_t P2, Strides4 sx, Strides4 sy, void* workspace,
                                      size_t workspace_bytes, cudaStream_t stream);

// dx = g * a (g without a), da = sum_p g * x (only with a), g = dy_mean / N + (n == idx) * dy_max.
size_t spatial_pool_backward_cuda_workspace(const void* dy, const void* x, const void* a, const int32_t* idx,
                                            void* dx, void* da, DType dtype, int64_t B, int64_t N, int64_t P1,
                                            int64_t P2, Strides4 sdy, Strides4 sx, Strides4 sdx);
cudaError_t spatial_pool_backward_cuda(const void* dy, const void* x, const void* a, const int32_t* idx, void* dx,
                                       void* da, DType dtype, int64_t B, int64_t N, int64_t P1, int64_t P2,
                                       Strides4 sdy, Strides4 sx, Strides4 sdx, void* workspace,
                                       size_t workspace_bytes, cudaStream_t stream);

// y = (x * a[b, c]) * s[b, h, w]; s contiguous (B, H * W) in the accumulation type. No workspace.
cudaError_t spatial_scale_forward_cuda(const void* x, const void* a, const void* s, void* y, DType dtype, int64_t B,
                                       int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sy,
                                       cudaStream_t stream);

// dx = dy * a * s, da[b, c] = sum_hw dy * x * s (only with a), ds[b, hw] = sum_c dy * x * a.
size_t spatial_scale_backward_cuda_workspace(const void* dy, const void* x, const void* a, const void* s, void* dx,
                                             void* da, void* ds, DType dtype, int64_t B, int64_t C, int64_t H,
                                             int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx);
cudaError_t spatial_scale_backward_cuda(const void* dy, const void* x, const void* a, const void* s, void* dx,
                                        void* da, void* ds, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                                        Strides4 sdy, Strides4 sx, Strides4 sdx, void* workspace,
                                        size_t workspace_bytes, cudaStream_t stream);

}  // namespace fastattn
