// torch.ops.fastattn_C branch ops: schemas and CPU registrations (kernels in csrc/cpu/branch.cpp).
#include "../cpu/branch.h"
#include "common.h"

namespace fastattn {
namespace {

BranchFeatStrides feat_strides(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

// feats a CPU (B, K, C, H, W) float tensor with K >= 1, logits a contiguous (B, K, C) tensor of its
// accumulation dtype; returns feats' dtype tag.
DType check_branch_args(const char* op, const at::Tensor& feats, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(feats.dim() == 5, "fastattn::", op, ": argument 'feats' must be 5-D (B, K, C, H, W), got ",
                    feats.dim(), "-D tensor of shape ", feats.sizes());
  TORCH_CHECK(feats.device().is_cpu(), "fastattn::", op, ": this kernel runs on CPU tensors, got 'feats' on ",
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
  TORCH_CHECK(logits.device().is_cpu(), "fastattn::", op, ": argument 'logits' must be a CPU tensor, got ",
              logits.device());
  return dt;
}

// The (B, channels, H, W) output: channels_last when the branches' channels are contiguous
// (feats.stride(2) == 1, a stack of channels_last maps), else NCHW (fastattn/ops/branch.py::_new_out).
at::Tensor new_out(const at::Tensor& feats, int64_t channels) {
  const int64_t H = feats.size(3), W = feats.size(4);
  const bool cl = feats.stride(2) == 1 && channels > 1 && H * W > 1;
  return new_output(
      {feats.size(0), channels, H, W},
      feats.options().memory_format(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
}

at::Tensor forward(const char* op, const at::Tensor& feats, const at::Tensor& logits, BranchMode mode) {
  const DType dt = check_branch_args(op, feats, logits);
  const int64_t B = feats.size(0), K = feats.size(1), C = feats.size(2);
  at::Tensor y = new_out(feats, mode == BranchMode::Sum ? C : K * C);
  if (y.numel() == 0) return y;
  branch_forward_cpu(feats.data_ptr(), logits.data_ptr(), y.data_ptr(), dt, B, K, C, feats.size(3), feats.size(4),
                     feat_strides(feats), strides4(y), mode);
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
  TORCH_CHECK(dy.device().is_cpu(), "fastattn::", op, ": argument 'dy' must be a CPU tensor, got ", dy.device());
  at::Tensor dfeats = new_output_like(feats);
  at::Tensor dlogits = at::zeros_like(logits);
  if (feats.numel() == 0) return {dfeats, dlogits};   // an empty map sums to zero
  branch_backward_cpu(dy.data_ptr(), feats.data_ptr(), logits.data_ptr(), dfeats.data_ptr(), dlogits.data_ptr(), dt,
                      B, K, C, H, W, strides4(dy), feat_strides(feats), feat_strides(dfeats), mode);
  return {dfeats, dlogits};
}

BranchMode concat_mode(bool reverse) { return reverse ? BranchMode::ConcatReversed : BranchMode::Concat; }

at::Tensor branch_softmax_sum(const at::Tensor& feats, const at::Tensor& logits) {
  return forward("branch_softmax_sum", feats, logits, BranchMode::Sum);
}

std::tuple<at::Tensor, at::Tensor> branch_softmax_sum_backward(const at::Tensor& dy, const at::Tensor& feats,
                                                               const at::Tensor& logits) {
  return backward("branch_softmax_sum_backward", dy, feats, logits, BranchMode::Sum);
}

at::Tensor branch_softmax_scale(const at::Tensor& feats, const at::Tensor& logits, bool reverse) {
  return forward("branch_softmax_scale", feats, logits, concat_mode(reverse));
}

std::tuple<at::Tensor, at::Tensor> branch_softmax_scale_backward(const at::Tensor& dy, const at::Tensor& feats,
                                                                 const at::Tensor& logits, bool reverse) {
  return backward("branch_softmax_scale_backward", dy, feats, logits, concat_mode(reverse));
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_FRAGMENT(fastattn_C, m) {
  m.def("branch_softmax_sum(Tensor feats, Tensor logits) -> Tensor");
  m.def("branch_softmax_sum_backward(Tensor dy, Tensor feats, Tensor logits) -> (Tensor, Tensor)");
  m.def("branch_softmax_scale(Tensor feats, Tensor logits, bool reverse) -> Tensor");
  m.def("branch_softmax_scale_backward(Tensor dy, Tensor feats, Tensor logits, bool reverse) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("branch_softmax_sum", &fastattn::branch_softmax_sum);
  m.impl("branch_softmax_sum_backward", &fastattn::branch_softmax_sum_backward);
  m.impl("branch_softmax_scale", &fastattn::branch_softmax_scale);
  m.impl("branch_softmax_scale_backward", &fastattn::branch_softmax_scale_backward);
}
