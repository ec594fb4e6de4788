// CUDA registrations of the branch ops (torch.ops.fastattn_C.branch_softmax_*), built only with a
// CUDA torch. Device guard, current stream and the workspace here; the kernels in
// csrc/cuda/branch.cu see pointers, sizes and strides only.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../cuda/branch.h"
#include "common.h"

namespace fastattn {
namespace {

BranchFeatStrides feat_strides(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

DType check_branch_args(const char* op, const at::Tensor& feats, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(feats.dim() == 5, "fastattn::", op, ": argument 'feats' must be 5-D (B, K, C, H, W), got ",
                    feats.dim(), "-D tensor of shape ", feats.sizes());
  TORCH_CHECK(feats.is_cuda(), "fastattn::", op, ": this kernel runs on CUDA tensors, got 'feats' on ",
              feats.device());
  const DType dt = dtype_tag(feats, op, "feats");
  TORCH_CHECK_VALUE(feats.size(1) >= 1, "fastattn::", op, ": argument 'feats' must have at least one branch (dim 1), "
                    "got shape ", feats.sizes());
  const at::ScalarType acc = acc_scalar_type(feats);
  const std::vector<int64_t> want{feats.size(0), feats.size(1), feats.size(2)};
  TORCH_CHECK_VALUE(logits.sizes() == at::IntArrayRef(want), "fastattn::", op,
                    ": argument 'logits' must have shape (B, K, C) = ", at::IntArrayRef(want), ", got ",
                    logits.sizes());
  TORCH_CHECK_TYPE(logits.scalar_type() == acc, "fastattn::", op, ": argument 'logits' must be ", acc,
                   " (the accumulation dtype of 'feats'), got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.is_contiguous(), "fastattn::", op, ": argument 'logits' must be contiguous");
  TORCH_CHECK(logits.device() == feats.device(), "fastattn::", op, ": argument 'logits' must be on feats' device ",
              feats.device(), ", got ", logits.device());
  return dt;
}

// As fastattn/ops/branch.py::_new_out: channels_last when feats.stride(2) == 1, else NCHW.
at::Tensor new_out(const at::Tensor& feats, int64_t channels) {
  const int64_t H = feats.size(3), W = feats.size(4);
  const bool cl = feats.stride(2) == 1 && channels > 1 && H * W > 1;
  return at::empty({feats.size(0), channels, H, W},
                   feats.options().memory_format(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
}

void check_launch(cudaError_t err, const char* op, const at::Tensor& feats) {
  TORCH_CHECK(err == cudaSuccess, "fastattn::", op, ": CUDA launch failed for feats of shape ", feats.sizes(), ": ",
              cudaGetErrorString(err));
}

at::Tensor forward(const char* op, const at::Tensor& feats, const at::Tensor& logits, BranchMode mode) {
  const DType dt = check_branch_args(op, feats, logits);
  const c10::cuda::CUDAGuard guard(feats.device());
  const int64_t B = feats.size(0), K = feats.size(1), C = feats.size(2), H = feats.size(3), W = feats.size(4);
  at::Tensor y = new_out(feats, mode == BranchMode::Sum ? C : K * C);
  if (y.numel() == 0) return y;
  const size_t ws_bytes = branch_workspace_cuda(dt, B, K, C, H, W, false);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, feats.options().dtype(at::kByte));
  check_launch(branch_forward_cuda(feats.data_ptr(), logits.data_ptr(), y.data_ptr(), dt, B, K, C, H, W,
                                   feat_strides(feats), strides4(y), mode, ws.data_ptr(), ws_bytes,
                                   c10::cuda::getCurrentCUDAStream()),
               op, feats);
  return y;
}

std::tuple<at::Tensor, at::Tensor> backward(const char* op, const at::Tensor& dy, const at::Tensor& feats,
                                            const at::Tensor& logits, BranchMode mode) {
  const DType dt = check_branch_args(op, feats, logits);
  const int64_t B = feats.size(0), K = feats.size(1), C = feats.size(2), H = feats.size(3), W = feats.size(4);
  const std::vector<int64_t> want{B, mode == BranchMode::Sum ? C : K * C, H, W};
  TORCH_CHECK_VALUE(dy.sizes() == at::IntArrayRef(want), "fastattn::", op, ": argument 'dy' must have shape ",
                    at::IntArrayRef(want), " (the output's), got ", dy.sizes());
  TORCH_CHECK_TYPE(dy.scalar_type() == feats.scalar_type(), "fastattn::", op,
                   ": argument 'dy' must have the dtype of 'feats' (", feats.scalar_type(), "), got ",
                   dy.scalar_type());
  TORCH_CHECK(dy.device() == feats.device(), "fastattn::", op, ": argument 'dy' must be on feats' device ",
              feats.device(), ", got ", dy.device());
  const c10::cuda::CUDAGuard guard(feats.device());
  at::Tensor dfeats = at::empty_like(feats);
  if (feats.numel() == 0) return {dfeats, at::zeros_like(logits)};   // an empty map sums to zero
  at::Tensor dlogits = at::empty_like(logits);                         // every entry written by the kernels
  const size_t ws_bytes = branch_workspace_cuda(dt, B, K, C, H, W, true);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, feats.options().dtype(at::kByte));
  check_launch(branch_backward_cuda(dy.data_ptr(), feats.data_ptr(), logits.data_ptr(), dfeats.data_ptr(),
                                    dlogits.data_ptr(), dt, B, K, C, H, W, strides4(dy), feat_strides(feats),
                                    feat_strides(dfeats), mode, ws.data_ptr(), ws_bytes,
                                    c10::cuda::getCurrentCUDAStream()),
               op, feats);
  return {dfeats, dlogits};
}

BranchMode concat_mode(bool reverse) { return reverse ? BranchMode::ConcatReversed : BranchMode::Concat; }

at::Tensor branch_softmax_sum_cuda(const at::Tensor& feats, const at::Tensor& logits) {
  return forward("branch_softmax_sum", feats, logits, BranchMode::Sum);
}

std::tuple<at::Tensor, at::Tensor> branch_softmax_sum_backward_cuda(const at::Tensor& dy, const at::Tensor& feats,
                                                                    const at::Tensor& logits) {
  return backward("branch_softmax_sum_backward", dy, feats, logits, BranchMode::Sum);
}

at::Tensor branch_softmax_scale_cuda(const at::Tensor& feats, const at::Tensor& logits, bool reverse) {
  return forward("branch_softmax_scale", feats, logits, concat_mode(reverse));
}

std::tuple<at::Tensor, at::Tensor> branch_softmax_scale_backward_cuda(const at::Tensor& dy, const at::Tensor& feats,
                                                                      const at::Tensor& logits, bool reverse) {
  return backward("branch_softmax_scale_backward", dy, feats, logits, concat_mode(reverse));
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CUDA, m) {
  m.impl("branch_softmax_sum", &fastattn::branch_softmax_sum_cuda);
  m.impl("branch_softmax_sum_backward", &fastattn::branch_softmax_sum_backward_cuda);
  m.impl("branch_softmax_scale", &fastattn::branch_softmax_scale_cuda);
  m.impl("branch_softmax_scale_backward", &fastattn::branch_softmax_scale_backward_cuda);
}
