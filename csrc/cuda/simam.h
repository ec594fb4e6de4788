// SimAM on CUDA, the whole module fused: launchers free of torch headers (pointers, sizes,
// strides, a stream). Per (b, c) plane of n = H * W >= 2 positions:
//   mu = mean(x), d = (x - mu)^2, v = sum(d) / (n - 1), r = 1 / (4 (v + e_lambda)),
//   y = x * sigmoid(d r + 1/2).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../cpu/common.h"

namespace fastattn {

// y = SimAM(x); x and y of one dtype, each with its own strides. fp32 math (fp64 for fp64).
// A block owns whole planes (NCHW) or a block of channels of one sample (channels_last), held in
// shared memory when they fit: one read of x from memory. Deterministic (no atomics).
cudaError_t simam_forward_cuda(const void* x, void* y, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                               double e_lambda, Strides4 sx, Strides4 sy, cudaStream_t stream);

// dx from dy and x (statistics recomputed from x). With s the gate, xc = x - mu,
// e = dy x s (1 - s), A = sum(e xc), Bs = sum(e d):
//   dx = dy s + 2 xc (e r + dS) - 2 r A / n,  dS = -4 r^2 Bs / (n - 1).
cudaError_t simam_backward_cuda(const void* dy, const void* x, void* dx, DType dtype, int64_t B, int64_t C, int64_t H,
                                int64_t W, double e_lambda, Strides4 sdy, Strides4 sx, Strides4 sdx,
                                cudaStream_t stream);

}  // namespace fastattn
