// CUDA registrations of the gate ops (torch.ops.fastattn_C.*; schemas in gate.cpp), built only with
// a CUDA torch. Checks, outputs, device guard, current stream and the backward workspace here; the
// kernels in csrc/cuda/gate.cu see pointers and a stream only.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cuda/gate.h"
#include "common.h"
#include "gate_checks.h"

namespace fastattn {
namespace {

using gate_checks::channel_grad;
using gate_checks::check_channel_param;
using gate_checks::check_like_x;
using gate_checks::check_pixel_param;
using gate_checks::check_x;
using gate_checks::parse_mode;
using gate_checks::pixel_grad;

constexpr c10::DeviceType kCUDA = c10::DeviceType::CUDA;

void check_launch(cudaError_t err, const char* op, const at::Tensor& x) {
  TORCH_CHECK(err == cudaSuccess, "fastattn::", op, ": CUDA launch failed for x of shape ", x.sizes(), " and strides ",
              x.strides(), ": ", cudaGetErrorString(err));
}

// The backward workspace: uninitialised bytes from the caching allocator (no memset), at least
// 256-byte aligned.
at::Tensor workspace(size_t bytes, const at::Tensor& x) {
  return at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
}

at::Tensor channel_scale_cuda(const at::Tensor& x, const at::Tensor& a, const std::optional<at::Tensor>& residual) {
  const char* op = "channel_scale";
  const DType dt = check_x(op, x, kCUDA);
  check_channel_param(op, "a", a, x);
  const at::Tensor* r = residual.has_value() ? &*residual : nullptr;
  if (r) check_like_x(op, "residual", *r, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (y.numel() == 0) return y;
  const Strides4 sr = r ? strides4(*r) : Strides4{0, 0, 0, 0};
  check_launch(channel_scale_forward_cuda(x.data_ptr(), a.data_ptr(), r ? r->data_ptr() : nullptr, y.data_ptr(), dt,
                                          x.size(0), x.size(1), x.size(2), x.size(3), strides4(x), sr, strides4(y),
                                          c10::cuda::getCurrentCUDAStream()),
               op, x);
  return y;
}

std::tuple<at::Tensor, at::Tensor> channel_scale_backward_cuda_op(const at::Tensor& dy, const at::Tensor& x,
                                                                  const at::Tensor& a) {
  const char* op = "channel_scale_backward";
  const DType dt = check_x(op, x, kCUDA);
  check_like_x(op, "dy", dy, x);
  check_channel_param(op, "a", a, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x), da = channel_grad(x, a);
  if (x.numel() == 0) return {dx, da};
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const size_t bytes = channel_scale_backward_cuda_workspace(dt, B, C, H, W, strides4(dy), strides4(x), strides4(dx));
  at::Tensor ws = workspace(bytes, x);
  check_launch(channel_scale_backward_cuda(dy.data_ptr(), x.data_ptr(), a.data_ptr(), dx.data_ptr(), da.data_ptr(),
                                           ws.data_ptr(), bytes, dt, B, C, H, W, strides4(dy), strides4(x),
                                           strides4(dx), c10::cuda::getCurrentCUDAStream()),
               op, x);
  return {dx, da};
}

at::Tensor channel_spatial_gate_cuda(const at::Tensor& x, const at::Tensor& a, const at::Tensor& s,
                                     c10::string_view mode) {
  const char* op = "channel_spatial_gate";
  const DType dt = check_x(op, x, kCUDA);
  check_channel_param(op, "a", a, x);
  check_pixel_param(op, "s", s, x);
  const CombineMode m = parse_mode(op, mode);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (y.numel() == 0) return y;
  check_launch(channel_spatial_gate_forward_cuda(x.data_ptr(), a.data_ptr(), s.data_ptr(), y.data_ptr(), m, dt,
                                                 x.size(0), x.size(1), x.size(2), x.size(3), strides4(x), strides4(y),
                                                 c10::cuda::getCurrentCUDAStream()),
               op, x);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_spatial_gate_backward_cuda_op(const at::Tensor& dy,
                                                                                     const at::Tensor& x,
                                                                                     const at::Tensor& a,
                                                                                     const at::Tensor& s,
                                                                                     c10::string_view mode) {
  const char* op = "channel_spatial_gate_backward";
  const DType dt = check_x(op, x, kCUDA);
  check_like_x(op, "dy", dy, x);
  check_channel_param(op, "a", a, x);
  check_pixel_param(op, "s", s, x);
  const CombineMode m = parse_mode(op, mode);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x), da = channel_grad(x, a), ds = pixel_grad(x, s);
  if (x.numel() == 0) return {dx, da, ds};
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const size_t bytes =
      channel_spatial_gate_backward_cuda_workspace(dt, B, C, H, W, strides4(dy), strides4(x), strides4(dx));
  at::Tensor ws = workspace(bytes, x);
  check_launch(channel_spatial_gate_backward_cuda(dy.data_ptr(), x.data_ptr(), a.data_ptr(), s.data_ptr(),
                                                  dx.data_ptr(), da.data_ptr(), ds.data_ptr(), ws.data_ptr(), bytes, m,
                                                  dt, B, C, H, W, strides4(dy), strides4(x), strides4(dx),
                                                  c10::cuda::getCurrentCUDAStream()),
               op, x);
  return {dx, da, ds};
}

at::Tensor channel_affine_gate_cuda(const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& beta) {
  const char* op = "channel_affine_gate";
  const DType dt = check_x(op, x, kCUDA);
  check_channel_param(op, "alpha", alpha, x);
  check_channel_param(op, "beta", beta, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (y.numel() == 0) return y;
  check_launch(channel_affine_gate_forward_cuda(x.data_ptr(), alpha.data_ptr(), beta.data_ptr(), y.data_ptr(), dt,
                                                x.size(0), x.size(1), x.size(2), x.size(3), strides4(x), strides4(y),
                                                c10::cuda::getCurrentCUDAStream()),
               op, x);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_affine_gate_backward_cuda_op(const at::Tensor& dy,
                                                                                    const at::Tensor& x,
                                                                                    const at::Tensor& alpha,
                                                                                    const at::Tensor& beta) {
  const char* op = "channel_affine_gate_backward";
  const DType dt = check_x(op, x, kCUDA);
  check_like_x(op, "dy", dy, x);
  check_channel_param(op, "alpha", alpha, x);
  check_channel_param(op, "beta", beta, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x), dal = channel_grad(x, alpha), dbe = channel_grad(x, beta);
  if (x.numel() == 0) return {dx, dal, dbe};
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const size_t bytes =
      channel_affine_gate_backward_cuda_workspace(dt, B, C, H, W, strides4(dy), strides4(x), strides4(dx));
  at::Tensor ws = workspace(bytes, x);
  check_launch(channel_affine_gate_backward_cuda(dy.data_ptr(), x.data_ptr(), alpha.data_ptr(), beta.data_ptr(),
                                                 dx.data_ptr(), dal.data_ptr(), dbe.data_ptr(), ws.data_ptr(), bytes,
                                                 dt, B, C, H, W, strides4(dy), strides4(x), strides4(dx),
                                                 c10::cuda::getCurrentCUDAStream()),
               op, x);
  return {dx, dal, dbe};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CUDA, m) {
  m.impl("channel_scale", &fastattn::channel_scale_cuda);
  m.impl("channel_scale_backward", &fastattn::channel_scale_backward_cuda_op);
  m.impl("channel_spatial_gate", &fastattn::channel_spatial_gate_cuda);
  m.impl("channel_spatial_gate_backward", &fastattn::channel_spatial_gate_backward_cuda_op);
  m.impl("channel_affine_gate", &fastattn::channel_affine_gate_cuda);
  m.impl("channel_affine_gate_backward", &fastattn::channel_affine_gate_backward_cuda_op);
}
