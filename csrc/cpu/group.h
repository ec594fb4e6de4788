// Spatial Group-wise Enhance (SGE) gate on the CPU: forward and backward of everything after the
// module's parameters (math in kernels/group.py and fastattn/ops/group.py).
#pragma once

#include <cstdint>

#include "common.h"

namespace fastattn {

// Per sample b and group g of Cg = C / G channels, over the N = H * W positions p:
//   m[c] = mean_p x[c, p];  xn[p] = sum_c x[c, p] m[c];  mu = mean_p xn;  sd = std_p(xn) (unbiased)
//   y[c, p] = x[c, p] * sigmoid(weight[g] * (xn[p] - mu) / (sd + eps) + bias[g])
// x and y share `dtype` and sizes (B, C, H, W), each with its own strides; requires C % G == 0 and
// N >= 2. weight, bias: contiguous (G,) of the accumulation type (float; double for Float64).
// Outputs m (B, C), mu and sd (B, G): contiguous, accumulation type. Deterministic: every sum runs in
// an order fixed by the shape alone.
void sge_forward_cpu(const void* x, const void* weight, const void* bias, void* y, void* m, void* mu, void* sd,
                     DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, int64_t G, double eps, Strides4 sx,
                     Strides4 sy);

// (dx, dweight, dbias) of the forward above from dy, x, the parameters and the forward's m, mu, sd
// (formulas in kernels/group.py::_sge_fused_bwd). dy, x, dx share `dtype`, each with its own
// strides; dweight and dbias: contiguous (G,) of the accumulation type, summed over the batch.
void sge_backward_cpu(const void* dy, const void* x, const void* weight, const void* bias, const void* m,
                      const void* mu, const void* sd, void* dx, void* dweight, void* dbias, DType dtype, int64_t B,
                      int64_t C, int64_t H, int64_t W, int64_t G, double eps, Strides4 sdy, Strides4 sx,
                      Strides4 sdx);

}  // namespace fastattn
