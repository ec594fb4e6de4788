// The channel gates on the CPU: channel scale y = x * a[b, c] (+ residual) (gate.cpp), the channel x
// spatial gates of scSE / BAM and the channel affine gate of NAM / SA-Net (gate_fused.cpp).
#pragma once

#include <cstdint>

#include "common.h"

namespace fastattn {

// y = x * a[b, c] (+ r), math in fp32 (fp64 for fp64). x, r, y share `dtype` and the sizes
// (B, C, H, W) but each has its own strides; r may be null. `a` is a contiguous (B, C) buffer of
// the accumulation type: float (double when dtype is Float64).
void channel_scale_forward_cpu(const void* x, const void* a, const void* r, void* y, DType dtype, int64_t B,
                               int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sr, Strides4 sy);

// Backward of y = x * a:  dx = dy * a;  da[b, c] = sum over (h, w) of dy * x.
// dy, x, dx share `dtype`; `a` and `da` are contiguous (B, C) buffers of the accumulation type
// (float; double for Float64). da is deterministic: every (b, c) is summed in an order that
// depends on the shape alone (fp32 partial sums over chunks, folded into double).
void channel_scale_backward_cpu(const void* dy, const void* x, const void* a, void* dx, void* da, DType dtype,
                                int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sdy, Strides4 sx,
                                Strides4 sdx);

// How a channel gate a[b, c] and a spatial gate s[b, h, w] combine (the numbers of kernels/gate.py MODES).
enum class CombineMode : int {
  Max = 1,     // max(x * a, x * s)          scSE (official)
  Add = 2,     // x * a + x * s              scSE (paper)
  Bam = 3,     // x * (1 + sigmoid(a * s))   BAM (official)
  BamSum = 4,  // x * (1 + sigmoid(a + s))   BAM (paper)
};

// y = x * f(a[b, c], s[b, h, w]) per `mode`, in one pass. x and y share `dtype` and the sizes
// (B, C, H, W), each with its own strides. `a` is a contiguous (B, C) buffer and `s` a contiguous
// (B, H * W) buffer of the accumulation type (float; double for Float64).
void channel_spatial_gate_forward_cpu(const void* x, const void* a, const void* s, void* y, CombineMode mode,
                                      DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                                      Strides4 sy);

// Backward of channel_spatial_gate_forward_cpu, in one pass over dy and x: dx (like x, its own
// strides), da (B, C) = the sum over (h, w) and ds (B, H * W) = the sum over c of the gate
// gradients, both contiguous in the accumulation type. Deterministic: every sum runs in an order
// fixed by the shape (fp32 partial sums over blocks, folded in double in a fixed order).
void channel_spatial_gate_backward_cpu(const void* dy, const void* x, const void* a, const void* s, void* dx,
                                       void* da, void* ds, CombineMode mode, DType dtype, int64_t B, int64_t C,
                                       int64_t H, int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx);

// y = x * sigmoid(alpha[b, c] * x + beta[b, c]), one pass; alpha and beta contiguous (B, C) in the
// accumulation type.
void channel_affine_gate_forward_cpu(const void* x, const void* alpha, const void* beta, void* y, DType dtype,
                                     int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sy);

// Backward, one pass: with g = sigmoid(alpha x + beta) and u = dy x g (1 - g):
// dx = dy g + u alpha, dalpha[b, c] = sum over (h, w) of u x, dbeta[b, c] = sum of u (contiguous
// (B, C), accumulation type, deterministic as above).
void channel_affine_gate_backward_cpu(const void* dy, const void* x, const void* alpha, const void* beta, void* dx,
                                      void* dalpha, void* dbeta, DType dtype, int64_t B, int64_t C, int64_t H,
                                      int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx);

// ShuffleAttention's gate on NCHW-contiguous maps: y = shuffle(x * sigmoid(alpha x + beta)),
// channel c = j n + k of x (n = C / groups) written to channel k groups + j of y; one pass, the
// planes in y's order.
void shuffle_gate_forward_cpu(const void* x, const void* alpha, const void* beta, void* y, DType dtype, int64_t B,
                              int64_t C, int64_t H, int64_t W, int64_t groups);

// Its backward in training, one read of dy and x (dy NCHW-contiguous, read through the shuffle;
// dx NCHW-contiguous): per plane, with g = sigmoid(alpha x + beta), u = dy x g (1 - g),
// dalpha = sum of u x and dbeta = sum of u over the plane, and
// dx = dy g + u alpha + k (x - mean) + a, k = coef[0] dalpha + coef[1] dbeta,
// a = coef[2] dalpha + coef[3] dbeta (coef (B, C, 4) contiguous: the per-plane linear map from the
// gate parameters' gradients to x's gradient through the plane's statistics that alpha and beta
// were made from; mean (B, C) the planes' means, subtracted first so that planes far from zero
// keep their digits). The plane's first sweep keeps dy g + u alpha in a per-thread buffer; the
// second adds the statistics' term from cache. dalpha, dbeta (B, C) contiguous, accumulation
// type; fp32 sums in chunks folded into double.
void shuffle_gate_train_backward_cpu(const void* dy, const void* x, const void* alpha, const void* beta,
                                     const void* mean, const void* coef, void* dx, void* dalpha, void* dbeta,
                                     DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, int64_t groups);

// NAM in training: y = x * sigmoid(w[c] * z), z = gamma[c] (x - mean[c]) / sqrt(var[c] + eps) +
// bias[c] the training BatchNorm over (B, H, W) (population variance), x NCHW-contiguous 16/32-bit,
// gamma, bias, w float (C). Channel by channel, one per thread at a time: the channel's B planes are
// read from memory once (the variance's and the gate's passes find them in that core's cache);
// mean and var (C floats) out, for the backward and the running statistics.
void bn_affine_gate_train_forward_cpu(const void* x, const float* gamma, const float* bias, const float* w, float eps,
                                      void* y, float* mean, float* var, DType dtype, int64_t B, int64_t C, int64_t HW);

// Its backward (w a constant, as NAM detaches it), channel by channel in one read of dy and x:
// dgamma, dbias (C floats) and, unless dx is null, dx (like dy, NCHW-contiguous) from the cache.
void bn_affine_gate_train_backward_cpu(const void* dy, const void* x, const float* gamma, const float* bias,
                                       const float* w, float eps, const float* mean, const float* var, void* dx,
                                       float* dgamma, float* dbias, DType dtype, int64_t B, int64_t C, int64_t HW);

// SRM in training: y = x * g, g[b, c] = sigmoid(gamma[c] (z - zmean[c]) / sqrt(zvar[c] + bn_eps) +
// beta[c]), z = cfc[c, 0] mean[b, c] + cfc[c, 1] std[b, c], the plane statistics over H x W
// (std = sqrt(unbiased variance + std_eps), H * W >= 2), zmean, zvar the batch's (population)
// statistics of z per channel; x NCHW-contiguous 16/32-bit, cfc (C, 2), gamma, beta (C) floats.
// Channel blocks as NAM's: x read from memory once. Out: mean, stdv, g (B x C), zmean, zvar (C).
void srm_train_forward_cpu(const void* x, const float* cfc, const float* gamma, const float* beta, float bn_eps,
                           float std_eps, void* y, float* mean, float* stdv, float* g, float* zmean, float* zvar,
                           DType dtype, int64_t B, int64_t C, int64_t HW);

// Its backward from the forward's outputs, dy and x read from memory once: dcfc (C, 2), dgamma,
// dbeta (C) and, unless dx is null, dx (like dy, NCHW-contiguous).
void srm_train_backward_cpu(const void* dy, const void* x, const float* cfc, const float* gamma, float bn_eps,
                            const float* mean, const float* stdv, const float* g, const float* zmean,
                            const float* zvar, void* dx, float* dcfc, float* dgamma, float* dbeta, DType dtype,
                            int64_t B, int64_t C, int64_t HW);

}  // namespace fastattn
