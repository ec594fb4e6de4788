// CUDA registrations of the SGE ops (torch.ops.fastattn_C.sge_gate*), built only with a CUDA torch.
// Device guard, current stream and the workspace here; the kernels in csrc/cuda/group.cu see
// pointers, sizes and strides only.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../cuda/group.h"
#include "common.h"

namespace fastattn {
namespace {

// A small contiguous tensor of the accumulation dtype on x's device, with the given shape.
void check_small(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape,
                 const char* hint) {
  const at::ScalarType acc = acc_scalar_type(x);
  TORCH_CHECK_VALUE(t.sizes() == shape, "fastattn::", op, ": argument '", name, "' must have shape ", hint, " = ",
                    shape, ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == acc, "fastattn::", op, ": argument '", name, "' must be ", acc,
                   " (the accumulation dtype of 'x'), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), "fastattn::", op, ": argument '", name, "' must be contiguous");
  TORCH_CHECK(t.device() == x.device(), "fastattn::", op, ": argument '", name, "' must be on x's device ",
              x.device(), ", got ", t.device());
}

DType check_sge_args(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                     int64_t groups, double eps) {
  check_feature_map(x, op);
  TORCH_CHECK(x.is_cuda(), "fastattn::", op, ": this kernel runs on CUDA tensors, got 'x' on ", x.device());
  const DType dt = dtype_tag(x, op, "x");
  TORCH_CHECK_VALUE(groups >= 1, "fastattn::", op, ": argument 'groups' must be a positive int, got ", groups);
  TORCH_CHECK_VALUE(x.size(1) % groups == 0, "fastattn::", op, ": argument 'x' must have channels divisible by groups=",
                    groups, ", got ", x.size(1));
  TORCH_CHECK_VALUE(x.size(2) * x.size(3) >= 2, "fastattn::", op,
                    ": argument 'x' must have at least 2 spatial positions (H*W >= 2, for the unbiased std), got H=",
                    x.size(2), ", W=", x.size(3));
  TORCH_CHECK_VALUE(eps >= 0, "fastattn::", op, ": argument 'eps' must be a non-negative float, got ", eps);
  check_small(op, "weight", weight, x, {groups}, "(groups,)");
  check_small(op, "bias", bias, x, {groups}, "(groups,)");
  return dt;
}

void check_launch(cudaError_t err, const char* op, const at::Tensor& x) {
  TORCH_CHECK(err == cudaSuccess, "fastattn::", op, ": CUDA launch failed for x of shape ", x.sizes(), ": ",
              cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sge_gate_cuda_op(const at::Tensor& x,
                                                                            const at::Tensor& weight,
                                                                            const at::Tensor& bias, int64_t groups,
                                                                            double eps) {
  const char* op = "sge_gate";
  const DType dt = check_sge_args(op, x, weight, bias, groups, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto opts = x.options().dtype(acc_scalar_type(x));
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0)
    return {y, at::zeros({B, C}, opts), at::zeros({B, groups}, opts), at::zeros({B, groups}, opts)};
  at::Tensor m = at::empty({B, C}, opts);           // every entry written by the kernels
  at::Tensor mu = at::empty({B, groups}, opts);
  at::Tensor sd = at::empty({B, groups}, opts);
  const size_t ws_bytes = sge_forward_workspace_cuda(dt, B, C, H, W, groups);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  check_launch(sge_forward_cuda(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(), m.data_ptr(),
                                mu.data_ptr(), sd.data_ptr(), dt, B, C, H, W, groups, eps, strides4(x), strides4(y),
                                ws_bytes ? ws.data_ptr() : nullptr, ws_bytes, c10::cuda::getCurrentCUDAStream()),
               op, x);
  return {y, m, mu, sd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sge_gate_backward_cuda_op(const at::Tensor& dy, const at::Tensor& x,
                                                                         const at::Tensor& weight,
                                                                         const at::Tensor& bias, const at::Tensor& m,
                                                                         const at::Tensor& mu, const at::Tensor& sd,
                                                                         int64_t groups, double eps) {
  const char* op = "sge_gate_backward";
  const DType dt = check_sge_args(op, x, weight, bias, groups, eps);
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), "fastattn::", op, ": argument 'dy' must have the shape of 'x' ",
                    x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK_TYPE(dy.scalar_type() == x.scalar_type(), "fastattn::", op,
                   ": argument 'dy' must have the dtype of 'x' (", x.scalar_type(), "), got ", dy.scalar_type());
  TORCH_CHECK(dy.device() == x.device(), "fastattn::", op, ": argument 'dy' must be on x's device ", x.device(),
              ", got ", dy.device());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  check_small(op, "m", m, x, {B, C}, "(B, C)");
  check_small(op, "mu", mu, x, {B, groups}, "(B, groups)");
  check_small(op, "sd", sd, x, {B, groups}, "(B, groups)");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return {dx, at::zeros({groups}, weight.options()), at::zeros({groups}, bias.options())};
  at::Tensor dweight = at::empty({groups}, weight.options());   // written by the kernels
  at::Tensor dbias = at::empty({groups}, bias.options());
  const size_t ws_bytes = sge_backward_workspace_cuda(dt, B, C, H, W, groups);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  check_launch(sge_backward_cuda(dy.data_ptr(), x.data_ptr(), weight.data_ptr(), bias.data_ptr(), m.data_ptr(),
                                 mu.data_ptr(), sd.data_ptr(), dx.data_ptr(), dweight.data_ptr(), dbias.data_ptr(), dt,
                                 B, C, H, W, groups, eps, strides4(dy), strides4(x), strides4(dx), ws.data_ptr(),
                                 ws_bytes, c10::cuda::getCurrentCUDAStream()),
               op, x);
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CUDA, m) {
  m.impl("sge_gate", &fastattn::sge_gate_cuda_op);
  m.impl("sge_gate_backward", &fastattn::sge_gate_backward_cuda_op);
}
