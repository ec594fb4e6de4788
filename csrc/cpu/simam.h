// SimAM on the CPU, the whole module fused. Per (b, c) plane of n = H * W >= 2 positions:
//   mu = mean(x), d = (x - mu)^2, v = sum(d) / (n - 1), r = 1 / (4 (v + e_lambda)),
//   y = x * sigmoid(d r + 1/2).
// Torch-free: pointers, sizes, element strides.
#pragma once

#include <cstdint>

#include "common.h"

namespace fastattn {

// y = SimAM(x). x and y share `dtype` and sizes, each has its own strides. fp32 math for 16/32-bit
// types, fp64 for Float64; the statistics accumulate in double across chunks. save: null, or B * C * 2
// doubles that receive each plane's (mu, r), plane b C + c at save[2 (b C + c)], for simam_backward_cpu.
void simam_forward_cpu(const void* x, void* y, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                       double e_lambda, Strides4 sx, Strides4 sy, double* save = nullptr);

// dx from dy and x (the statistics are recomputed from x, or taken from `saved`: the forward's `save` of
// this x; then e_lambda is unused, and dx is the same: bit for bit where the forward and the backward cut the
// planes alike (NCHW), else within rounding of the moments' merge order). With s the gate, xc = x - mu,
// e = dy x s (1 - s), A = sum(e xc), Bs = sum(e d):
//   dx = dy s + 2 xc (e r + dS) - 2 r A / n,  dS = -4 r^2 Bs / (n - 1).
void simam_backward_cpu(const void* dy, const void* x, void* dx, DType dtype, int64_t B, int64_t C, int64_t H,
                        int64_t W, double e_lambda, Strides4 sdy, Strides4 sx, Strides4 sdx,
                        const double* saved = nullptr);

}  // namespace fastattn
