// The channel gates on CUDA: launchers free of torch headers (pointers, sizes, strides, a stream).
//   channel_scale         y = x * a[b, c] (+ r)
//   channel_spatial_gate  y = x * f(a[b, c], s[b, h, w])  (CombineMode, as on the CPU)
//   channel_affine_gate   y = x * sigmoid(alpha[b, c] x + beta[b, c])
// x, y, r, dy, dx share `dtype` and the sizes (B, C, H, W), each with its own element strides (any;
// NCHW and channels_last, with unit-stride pixels resp. channels, are the fast ones). The small
// tensors (a, alpha, beta: (B, C); s: (B, H * W); and their gradients) are contiguous buffers of
// the accumulation type: float, double for Float64. Every reduction is deterministic (fixed
// summation order, no atomics). The backward launchers need a device workspace of the size their
// *_workspace function returns for the same arguments (0: none; pass any pointer). Each launcher
// returns the first launch error, if any; nothing is launched for an empty x.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "../cpu/gate.h"

namespace fastattn {

cudaError_t channel_scale_forward_cuda(const void* x, const void* a, const void* r, void* y, DType dtype, int64_t B,
                                       int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sr, Strides4 sy,
                                       cudaStream_t stream);

// dx = dy * a;  da[b, c] = sum over (h, w) of dy * x.
size_t channel_scale_backward_cuda_workspace(DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy,
                                             Strides4 sx, Strides4 sdx);
cudaError_t channel_scale_backward_cuda(const void* dy, const void* x, const void* a, void* dx, void* da,
                                        void* workspace, size_t workspace_bytes, DType dtype, int64_t B, int64_t C,
                                        int64_t H, int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx,
                                        cudaStream_t stream);

cudaError_t channel_spatial_gate_forward_cuda(const void* x, const void* a, const void* s, void* y, CombineMode mode,
                                              DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                                              Strides4 sy, cudaStream_t stream);

// dx, da (B, C) = the sum over (h, w) and ds (B, H * W) = the sum over c of the gate gradients.
size_t channel_spatial_gate_backward_cuda_workspace(DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                                                    Strides4 sdy, Strides4 sx, Strides4 sdx);
cudaError_t channel_spatial_gate_backward_cuda(const void* dy, const void* x, const void* a, const void* s, void* dx,
                                               void* da, void* ds, void* workspace, size_t workspace_bytes,
                                               CombineMode mode, DType dtype, int64_t B, int64_t C, int64_t H,
                                               int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx,
                                               cudaStream_t stream);

cudaError_t channel_affine_gate_forward_cuda(const void* x, const void* alpha, const void* beta, void* y, DType dtype,
                                             int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sy,
                                             cudaStream_t stream);

// With g = sigmoid(alpha x + beta), u = dy x g (1 - g): dx = dy g + u alpha, dalpha = sum_hw u x,
// dbeta = sum_hw u.
size_t channel_affine_gate_backward_cuda_workspace(DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                                                   Strides4 sdy, Strides4 sx, Strides4 sdx);
cudaError_t channel_affine_gate_backward_cuda(const void* dy, const void* x, const void* alpha, const void* beta,
                                              void* dx, void* dalpha, void* dbeta, void* workspace,
                                              size_t workspace_bytes, DType dtype, int64_t B, int64_t C, int64_t H,
                                              int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx,
                                              cudaStream_t stream);

}  // namespace fastattn
