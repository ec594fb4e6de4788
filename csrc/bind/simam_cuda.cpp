// CUDA registrations of the SimAM ops (schemas in simam.cpp), built only with a CUDA torch.
// Device guard, current stream and output allocation here; kernels in csrc/cuda/simam.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>

#include "../cuda/simam.h"
#include "common.h"

namespace fastattn {
namespace {

DType check_simam_x(const char* op, const at::Tensor& x, double e_lambda) {
  check_feature_map(x, op);
  TORCH_CHECK(x.is_cuda(), "fastattn::", op, ": this kernel runs on CUDA tensors, got 'x' on ", x.device());
  const DType dt = dtype_tag(x, op, "x");
  TORCH_CHECK_VALUE(x.numel() == 0 || x.size(2) * x.size(3) >= 2, "fastattn::", op,
                    ": argument 'x' must have at least 2 spatial positions (H*W >= 2), got H=", x.size(2),
                    ", W=", x.size(3));
  TORCH_CHECK_VALUE(std::isfinite(e_lambda) && e_lambda > 0, "fastattn::", op,
                    ": argument 'e_lambda' must be a positive float, got ", e_lambda);
  return dt;
}

void check_launch(cudaError_t err, const char* op, const at::Tensor& x) {
  TORCH_CHECK(err == cudaSuccess, "fastattn::", op, ": CUDA launch failed for 'x' of shape ", x.sizes(), ": ",
              cudaGetErrorString(err));
}

at::Tensor simam_cuda_op(const at::Tensor& x, double e_lambda) {
  const char* op = "simam";
  const DType dt = check_simam_x(op, x, e_lambda);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (y.numel() == 0) return y;
  check_launch(simam_forward_cuda(x.data_ptr(), y.data_ptr(), dt, x.size(0), x.size(1), x.size(2), x.size(3), e_lambda,
                                  strides4(x), strides4(y), c10::cuda::getCurrentCUDAStream()),
               op, x);
  return y;
}

at::Tensor simam_backward_cuda_op(const at::Tensor& dy, const at::Tensor& x, double e_lambda) {
  const char* op = "simam_backward";
  const DType dt = check_simam_x(op, x, e_lambda);
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), "fastattn::", op, ": argument 'dy' must have the shape of 'x' ",
                    x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK_TYPE(dy.scalar_type() == x.scalar_type(), "fastattn::", op,
                   ": argument 'dy' must have the dtype of 'x' (", x.scalar_type(), "), got ", dy.scalar_type());
  TORCH_CHECK(dy.is_cuda() && dy.device() == x.device(), "fastattn::", op, ": argument 'dy' must be a CUDA tensor on ",
              x.device(), ", got a tensor on ", dy.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  if (dx.numel() == 0) return dx;
  check_launch(simam_backward_cuda(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), dt, x.size(0), x.size(1), x.size(2),
                                   x.size(3), e_lambda, strides4(dy), strides4(x), strides4(dx),
                                   c10::cuda::getCurrentCUDAStream()),
               op, x);
  return dx;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CUDA, m) {
  m.impl("simam", &fastattn::simam_cuda_op);
  m.impl("simam_backward", &fastattn::simam_backward_cuda_op);
}
