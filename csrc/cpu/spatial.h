// Spatial attention ops on the CPU: [max, mean] pooling over one axis (CBAM's pool over the
// channels, Triplet attention's Z-pool) and the per-pixel gate y = x * a[b, c] * s[b, h, w].
#pragma once

#include <cstdint>

#include "common.h"

namespace fastattn {

// Pooling over axis N of a (B, N, P1, P2) view: spatial_pool is (B, C, H, W) itself, the Z-pool
// over H or W a permuted view of x. Strides are in elements, in view order: sx over (b, n, p1, p2)
// of x, sy over (b, k, p1, p2) of the (B, 2, P1, P2) output y (k = 0 the max, 1 the mean); both
// carried in a Strides4 as {b, c = n or k, h = p1, w = p2}.
//   y[b, 0, p] = max_n v, y[b, 1, p] = mean_n v, v = x[b, n, p] * a[b, n] (a null: v = x);
//   idx[b, p]  = the first n reaching the max (a NaN wins: the first NaN, as torch.argmax).
// a: contiguous (B, N) of the accumulation type (float; double for Float64) or null.
// idx: contiguous (B, P1 * P2) int32, pixel p = p1 * P2 + p2. Requires N >= 1, N < 2^31.
void spatial_pool_forward_cpu(const void* x, const void* a, void* y, int32_t* idx, DType dtype, int64_t B, int64_t N,
                              int64_t P1, int64_t P2, Strides4 sx, Strides4 sy);

// Backward of the pool, with g[b, n, p] = dy[b, 1, p] / N + (n == idx[b, p]) * dy[b, 0, p]:
//   dx[b, n, p] = g * a[b, n] (g when a is null);  da[b, n] = sum_p g * x[b, n, p] (when a is given).
// dy (B, 2, P1, P2) with strides sdy, x (read only when a is given; may be null otherwise) and dx
// (B, N, P1, P2) with strides sx, sdx, all of `dtype`; idx as written by the forward (entries
// outside [0, N) send the max gradient nowhere); da contiguous (B, N) of the accumulation type.
// da is deterministic: summed in an order that depends on the shape only.
void spatial_pool_backward_cpu(const void* dy, const void* x, const void* a, const int32_t* idx, void* dx, void* da,
                               DType dtype, int64_t B, int64_t N, int64_t P1, int64_t P2, Strides4 sdy, Strides4 sx,
                               Strides4 sdx);

// y = x * a[b, c] * s[b, h, w], computed as (x * a) * s in fp32 (fp64 for Float64). x and y of
// `dtype` with strides sx, sy; a contiguous (B, C) of the accumulation type or null (a = 1);
// s contiguous (B, H * W) of the accumulation type.
void spatial_scale_forward_cpu(const void* x, const void* a, const void* s, void* y, DType dtype, int64_t B,
                               int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sy);

// Backward of y = x * a * s in one pass over dy and x:
//   dx = dy * a * s;  da[b, c] = sum_hw dy * x * s;  ds[b, h, w] = sum_c dy * x * a.
// da (B, C) (written only when a is given) and ds (B, H * W): contiguous, accumulation type,
// deterministic (fixed summation order for a given shape, whatever the thread count).
void spatial_scale_backward_cpu(const void* dy, const void* x, const void* a, const void* s, void* dx, void* da,
                                void* ds, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy,
                                Strides4 sx, Strides4 sdx);

}  // namespace fastattn
