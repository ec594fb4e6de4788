// Softmax across branches, then the weighted sum (SKNet) or the weighted branches concatenated on
// channels (EPSANet), on the CPU: forward and backward (math in fastattn/ops/branch.py).
#pragma once

#include <cstdint>

#include "common.h"

namespace fastattn {

// Element strides of the (B, K, C, H, W) branch features.
struct BranchFeatStrides {
  int64_t b, k, c, h, w;
};

// How the K weighted branches reach the output: summed into (B, C, H, W), or concatenated on channels
// into (B, K * C, H, W) with branch k at channels j * C .. j * C + C - 1, j = k or j = K - 1 - k.
enum class BranchMode : int { Sum = 0, Concat = 1, ConcatReversed = 2 };

// a = softmax over k of logits (B, K, C); y = sum_k a[:, k, :, None, None] * feats[:, k] (Sum) or the
// concatenation. feats and y share `dtype`, each with its own strides; logits: contiguous (B, K, C)
// of the accumulation type (float; double for Float64).
void branch_forward_cpu(const void* feats, const void* logits, void* y, DType dtype, int64_t B, int64_t K,
                        int64_t C, int64_t H, int64_t W, BranchFeatStrides sf, Strides4 sy, BranchMode mode);

// dfeats[:, k] = dy_k * a[:, k, :, None, None] and dlogits = a * (s - sum_k a * s) with
// s[b, k, c] = sum over H x W of dy_k * feats[:, k], dy_k = dy (Sum) or branch k's channels of dy.
// dy, feats, dfeats share `dtype`, each with its own strides; dlogits: contiguous (B, K, C) of the
// accumulation type. Deterministic: s is summed in an order fixed by the shape alone.
void branch_backward_cpu(const void* dy, const void* feats, const void* logits, void* dfeats, void* dlogits,
                         DType dtype, int64_t B, int64_t K, int64_t C, int64_t H, int64_t W, Strides4 sdy,
                         BranchFeatStrides sf, BranchFeatStrides sdf, BranchMode mode);

}  // namespace fastattn
