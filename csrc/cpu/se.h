// Squeeze-excite-like modules on the CPU (se.cpp): inference in one read of x from memory
// (SqueezeExcite, ECA, SRM, CBAM), and the two passes of the backward of y = x * gate(stats(x))
// in training (SqueezeExcite, ECA, SRM, GatherExcite).
#pragma once

#include <cstdint>

#include "common.h"

namespace fastattn {

// y = x * sigmoid(w2 relu(w1 mean_hw(x) + b1) + b2) (+ r), one sample per thread: the sample's
// channel means, its excitation MLP and its scale run back to back while the sample is in that
// core's cache, so x is read from memory once (the two-op path reads it twice). Parallel over
// samples only: B should be at least the thread count. Fast for contiguous H x W planes (NCHW);
// other strides are correct, not fast.
// x, r, y share `dtype` (Float32, Float16, BFloat16) and the sizes (B, C, H, W), each with its
// own strides; r may be null. w1 is (hidden, C), w2 (C, hidden), b1 (hidden) and b2 (C) float,
// contiguous; b1 and b2 may be null. Math in fp32; the means are fp32 chunk sums folded in double.
void se_forward_cpu(const void* x, const void* r, void* y, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                    Strides4 sx, Strides4 sr, Strides4 sy, const float* w1, const float* b1, const float* w2,
                    const float* b2, int64_t hidden);

// ECA's y = x * sigmoid(conv1d over the channels of mean_hw(x), k taps w, zero padding
// (k - 1) / 2), in the same one-read scheme; w is k contiguous floats, k odd.
void eca_forward_cpu(const void* x, void* y, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                     Strides4 sy, const float* w, int64_t k);

// scSE's parameters for scse_forward_cpu: cSE's MLP g = sigmoid(w2 relu(w1 mean + b1) + b2),
// w1 (hidden, C), w2 (C, hidden), biases (hidden), (C); sSE's 1x1 conv s = sigmoid(conv_w . x[:, p]
// + conv_b), conv_w (C); combine_max: y = max(x g, x s), else y = x g + x s.
struct ScseWeights {
  const float* w1;
  const float* b1;
  const float* w2;
  const float* b2;
  int64_t hidden;
  const float* conv_w;
  float conv_b;
  bool combine_max;
};

// scSE inference in one read of x from memory, groups of samples per thread (the cSE MLP runs on
// a group at once: its weights are read once per group).
void scse_forward_cpu(const void* x, void* y, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                      Strides4 sy, const ScseWeights& weights);

// scSE training (NCHW-contiguous tensors, groups of samples per thread). Forward: the inference kernel's
// one read, keeping each sample's channel means and cSE gate (mean, g: B x C floats) and its sSE
// gate (s: B x H W floats). Backward, with y = max(x g, x s) (its gradient split as torch.maximum
// splits it) or x g + x s: pass 1 reads dy and x from memory for the gates' gradients dg (B x C,
// written: the MLP's parameter gradients follow from it) and ds (H W); the MLP's vector-Jacobian
// product takes dg to the means; dq = ds s (1 - s); pass 2 re-reads dy and x from that core's
// cache for dx = dy (wa g + ws s) + dmean / HW + conv_w[c] dq and the 1x1 conv's gradients
// dconv_w[b, c] = sum_p x dq, dconv_b[b] = sum_p dq (B x C, B floats; summed over b by the caller).
void scse_train_forward_cpu(const void* x, void* y, float* mean, float* g, float* s, DType dtype, int64_t B,
                            int64_t C, int64_t H, int64_t W, const ScseWeights& weights);
void scse_train_backward_cpu(const void* dy, const void* x, const float* mean, const float* g, const float* s,
                             void* dx, float* dg, float* dconv_w, float* dconv_b, DType dtype, int64_t B, int64_t C,
                             int64_t H, int64_t W, const ScseWeights& weights);

// FcaNet's (MultiSpectralAttention's) y = x * sigmoid(w2 relu(w1 d)), d[c] = sum over H x W of
// x * filter[c] (the DCT pool), w1 (hidden, C), w2 (C, hidden), no biases; filter (C, H, W)
// contiguous floats; same one-read scheme.
void fca_forward_cpu(const void* x, void* y, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                     Strides4 sy, const float* filter, const float* w1, const float* w2, int64_t hidden);

// SRM's y = x * sigmoid(a_mean * mean + a_std * std + bias), std = sqrt(unbiased variance + eps)
// over H x W (H * W >= 2), the BatchNorm folded into the three (C) coefficient vectors; same
// one-read scheme (the variance's second read of each plane hits the cache).
void srm_forward_cpu(const void* x, void* y, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                     Strides4 sy, const float* a_mean, const float* a_std, const float* bias, float eps);

// CBAM's parameters for cbam_forward_cpu. The channel gate: Mc = sigmoid(sum over the pools used
// (mean, max over H x W) of w2 relu(w1 pooled + b1) + b2), w1 (hidden, C), w2 (C, hidden). The
// spatial gate when conv_weight is set: Ms = sigmoid(conv_k([max, mean] over C of x * Mc) + bias),
// conv_weight (2, k, k), k odd, zero padding, the BatchNorm folded into weight and bias.
struct CbamWeights {
  const float* w1;
  const float* b1;
  const float* w2;
  const float* b2;
  int64_t hidden;
  bool use_mean;
  bool use_max;
  const float* conv_weight;  // null: no spatial gate (y = x * Mc)
  float conv_bias;
  int64_t kernel_size;
};

// CBAM's y = x * Mc * Ms, one sample per thread: the channel pools (one read from memory), the
// MLP, [max, mean] over the channels of x * Mc and the scale (both from that core's cache).
void cbam_forward_cpu(const void* x, void* y, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                      Strides4 sy, const CbamWeights& weights);

// Training, backward pass 1: out[b, c] = sum over H x W of dy * x (B x C of acc_t: float, or
// double for Float64), fp32 chunks folded in double. All four float dtypes, any strides.
void channel_dot_cpu(const void* dy, const void* x, void* out, DType dtype, int64_t B, int64_t C, int64_t H,
                     int64_t W, Strides4 sdy, Strides4 sx);

// Training, backward pass 2: dx = dy * g + k * x + a (+ e * filter[c]), with g, k, a (B x C of
// acc_t) the gate and the pooling's gradient terms (a mean's dmean / HW in a; a standard
// deviation's (x - mean) term in k and a; a DCT pool's gradient e with its filter (C x H x W of
// acc_t, contiguous), or null filter and e). k null: no x term, and x is not read (a mean's or
// a DCT pool's backward: one stream of memory fewer). fp32 outputs of at least LLC / 2 are streamed.
void channel_scale_affine_backward_cpu(const void* dy, const void* x, const void* g, const void* k, const void* a,
                                       const void* filter, const void* e, void* dx, DType dtype, int64_t B, int64_t C,
                                       int64_t H, int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx);

// The gate of the pooled-gate training kernels (SqueezeExcite, ECA, FcaNet), per sample, from
// the plane statistics s (C): the means, or with `filter` (C x H x W floats) FcaNet's DCT pool
// s[c] = sum over H x W of x * filter[c]. conv_w null: g = sigmoid(w2 relu(w1 s + b1) + b2)
// (w1 (hidden, C), w2 (C, hidden); b1, b2 may be null); conv_w (k odd taps) set: ECA's
// g = sigmoid(conv1d over the channels of s, zero padding (k - 1) / 2). Floats, contiguous.
struct PooledGateWeights {
  const float* filter;
  const float* w1;
  const float* b1;
  const float* w2;
  const float* b2;
  int64_t hidden;
  const float* conv_w;
  int64_t k;
};

// Training forward in one read of x from memory (the inference kernels' scheme, one sample per
// thread, NCHW-contiguous x and y): y = x * g, and each sample's statistics and gate (stats, g:
// B x C floats) for the backward.
void pooled_gate_train_forward_cpu(const void* x, void* y, float* stats, float* g, DType dtype, int64_t B, int64_t C,
                                   int64_t H, int64_t W, const PooledGateWeights& w);

// Its backward in one read of dy and x from memory, one sample per thread (NCHW-contiguous dy, x,
// dx): dg = sum over H x W of dy * x (B x C floats, written: the parameters' gradients follow
// from it), the statistics' gradient ds = the gate's vector-Jacobian product with dg (from the
// saved stats and g), then dx = dy * g + ds / HW (the mean) or + ds * filter[c] (the DCT pool),
// re-reading dy from that core's cache.
void pooled_gate_train_backward_cpu(const void* dy, const void* x, const float* stats, const float* g, void* dx,
                                    float* dg, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                                    const PooledGateWeights& w);

// CBAM training, backward in three passes over NCHW-contiguous tensors (HW = H * W; a, s, da,
// ds, dp*, dmean, dmax of acc_t, contiguous): with y = x * a[b, c] * s[b, p], the spatial pool
// [max, mean] over the channels of x * a (argmax idx_c (B, HW) int32) and the channel pools
// mean, max over H x W of x (argmax idx_p (B, C) int64):
// pass 1: da[b, c] = sum_p dy x s, ds[b, p] = sum_c dy x a (the scale's gradients; reads dy, x);
void cbam_backward_sums_cpu(const void* dy, const void* x, const void* a, const void* s, void* da, void* ds,
                            DType dtype, int64_t B, int64_t C, int64_t HW);
// pass 2: da[b, c] = sum_p x (dpmean / C + [idx_c == c] dpmax) (the spatial pool's gradient
// to a; reads x);
void cbam_backward_pool_grad_cpu(const void* x, const void* dpmax, const void* dpmean, const int32_t* idx_c,
                                 void* da, DType dtype, int64_t B, int64_t C, int64_t HW);
// pass 3: dx = dy a s + a dpmean / C + [idx_c == c] a dpmax + dmean / HW + [p == idx_p] dmax
// (every path to x at once; reads dy, writes dx).
void cbam_backward_dx_cpu(const void* dy, const void* a, const void* s, const void* dpmax, const void* dpmean,
                          const int32_t* idx_c, const void* dmean, const void* dmax, const int64_t* idx_p, void* dx,
                          DType dtype, int64_t B, int64_t C, int64_t HW);

}  // namespace fastattn
