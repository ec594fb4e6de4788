// Triplet attention on the CPU (triplet.cpp): the three Z-pools in one read of x, the averaged
// three-gate product in one pass, the backward in two passes; and the gates' small convolution
// (2 -> 1 channels, k x k), forward and backward, which PyTorch runs slowly at these shapes (a
// (32, 2, 1024, 14) map: 3.7 ms forward, 90 ms forward + backward on the 2-core dev machine).
//
// x, dy and dx are NCHW-contiguous (B, C, H, W) tensors of T (float, double, fp16, bf16); every
// other array is contiguous, of A = acc_t<T> (double for double, else float), or int32 indices.
// The maps and gates of the three branches (the official code's permutations):
//   cw: pooled over H, laid out (C, W) per sample;  hc: over W, (H, C);  hw: over C, (H, W).
// Maps are [max, mean] pairs (B, 2, ., .); max as torch.amax (a NaN wins), its argmax the first
// index reaching it (the first NaN).
#pragma once

#include <cstdint>

#include "common.h"

namespace fastattn {

// The three Z-pools of x in one read, a sample per thread: map_cw (B, 2, C, W) with idx_cw
// (B, C, W) (the argmax h), map_hc (B, 2, H, C) with idx_hc (B, H, C) (argmax w), and, unless
// map_hw is null, map_hw (B, 2, H, W) with idx_hw (B, H, W) (argmax c).
void triplet_pools_cpu(const void* x, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, void* map_cw,
                       int32_t* idx_cw, void* map_hc, int32_t* idx_hc, void* map_hw, int32_t* idx_hw);

// y = x * (g_cw[b, c, w] + g_hc[b, h, c] + g_hw[b, h, w]) * scale (g_hw may be null), the gates
// (B, C, W), (B, H, C), (B, H, W). fp32 outputs of at least LLC / 2 are streamed.
void triplet_scale_cpu(const void* x, const void* g_cw, const void* g_hc, const void* g_hw, double scale, void* y,
                       DType dtype, int64_t B, int64_t C, int64_t H, int64_t W);

// Backward pass 1, the gates' gradients (a sample per thread): with p = dy * x * scale,
// d_cw (B, C, W) = sum over h of p, d_hc (B, H, C) = sum over w, d_hw (B, H, W) = sum over c
// (d_hw may be null).
void triplet_backward_sums_cpu(const void* dy, const void* x, double scale, void* d_cw, void* d_hc, void* d_hw,
                               DType dtype, int64_t B, int64_t C, int64_t H, int64_t W);

// Backward pass 2, every path to x at once: dx = dy (g_cw + g_hc + g_hw) scale + the Z-pools'
// gradients (each map's mean gradient / its pooled length, its max gradient at the argmax); dm_*
// are the maps' gradients, laid out as the maps. The hw terms are absent when g_hw is null.
void triplet_backward_dx_cpu(const void* dy, const void* g_cw, const void* g_hc, const void* g_hw, double scale,
                             const void* dm_cw, const int32_t* idx_cw, const void* dm_hc, const int32_t* idx_hc,
                             const void* dm_hw, const int32_t* idx_hw, void* dx, DType dtype, int64_t B, int64_t C,
                             int64_t H, int64_t W);

// The gates' convolution: out (B, R, S) = sum over ch < cin of in[b, ch] correlated with
// w[ch] (cin, k, k), zero padding (k - 1) / 2, stride 1, no bias (torch's conv2d to 1 channel).
// dtype Float32 or Float64 for all three. A sample per thread, vectorised along S.
void gate_conv_cpu(const void* in, const void* w, void* out, DType dtype, int64_t B, int64_t cin, int64_t R,
                   int64_t S, int64_t k);

// Its backward: d_in (B, cin, R, S) and d_w (cin, k, k) from d_out (B, R, S); either output
// may be null (not wanted).
void gate_conv_backward_cpu(const void* d_out, const void* in, const void* w, void* d_in, void* d_w, DType dtype,
                            int64_t B, int64_t cin, int64_t R, int64_t S, int64_t k);

}  // namespace fastattn
