// Branch softmax and weighted sum / concatenation on CUDA: launchers free of torch headers.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "../cpu/branch.h"
#include "../cpu/common.h"

namespace fastattn {

// Bytes of device workspace branch_forward_cuda / branch_backward_cuda need (no initialisation).
size_t branch_workspace_cuda(DType dtype, int64_t B, int64_t K, int64_t C, int64_t H, int64_t W, bool backward);

// The forward of fastattn/ops/branch.py (contract of branch_forward_cpu in csrc/cpu/branch.h): the
// softmax over K of logits (contiguous (B, K, C), accumulation type), then the weighted sum or the
// concatenation of feats' branches into y. Returns the launch error, if any.
cudaError_t branch_forward_cuda(const void* feats, const void* logits, void* y, DType dtype, int64_t B, int64_t K,
                                int64_t C, int64_t H, int64_t W, BranchFeatStrides sf, Strides4 sy, BranchMode mode,
                                void* workspace, size_t workspace_bytes, cudaStream_t stream);

// dfeats and dlogits (contiguous (B, K, C), accumulation type) from dy; deterministic (fixed-order
// reductions, no atomics).
cudaError_t branch_backward_cuda(const void* dy, const void* feats, const void* logits, void* dfeats, void* dlogits,
                                 DType dtype, int64_t B, int64_t K, int64_t C, int64_t H, int64_t W, Strides4 sdy,
                                 BranchFeatStrides sf, BranchFeatStrides sdf, BranchMode mode, void* workspace,
                                 size_t workspace_bytes, cudaStream_t stream);

}  // namespace fastattn
