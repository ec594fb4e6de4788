// CUDA registrations of the coordinate-attention ops (schemas in coord.cpp), built only with a
// CUDA torch. Device guard, current stream, output and workspace allocation here; the kernels in
// csrc/cuda/coord.cu see pointers, sizes, strides and a stream only.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "../cuda/coord.h"
#include "common.h"

namespace fastattn {
namespace {

void check_on(const at::Tensor& t, const at::Device& dev, const char* op, const char* arg) {
  TORCH_CHECK(t.is_cuda() && t.device() == dev, "fastattn::", op, ": argument '", arg,
              "' must be a CUDA tensor on ", dev, ", got a tensor on ", t.device());
}

void check_launch(cudaError_t err, const char* op, const at::Tensor& x) {
  TORCH_CHECK(err == cudaSuccess, "fastattn::", op, ": CUDA launch failed for 'x' of shape ", x.sizes(), ": ",
              cudaGetErrorString(err));
}

// A gate or gradient row tensor: shape (B, C, L), dtype `dtype`, on x's device.
void check_rows(const at::Tensor& t, const char* op, const char* arg, int64_t B, int64_t C, int64_t L,
                const char* axis, at::ScalarType dtype, const at::Device& dev) {
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == B && t.size(1) == C && t.size(2) == L, "fastattn::", op,
                    ": argument '", arg, "' must have shape (B, C, ", axis, ") = (", B, ", ", C, ", ", L, "), got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "fastattn::", op, ": argument '", arg, "' must be ", dtype, ", got ",
                   t.scalar_type());
  check_on(t, dev, op, arg);
}

Strides3 strides3(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Whether the kernels walk a map of these strides along its channels (channels_last): then they
// read the (B, C, L) rows across channels, and get them as transposed storage (channel stride 1).
bool walks_channels(const at::Tensor& t) {
  const bool unit_w = t.stride(3) == 1 && t.size(3) > 1;
  return !unit_w && (t.stride(1) == 1 || t.size(1) == 1);
}

// (B, C, L) rows laid out for the walk: contiguous, or (B, L, C) storage seen as (B, C, L).
at::Tensor rows_for(const at::Tensor& g, bool channels) {
  return channels ? g.transpose(1, 2).contiguous().transpose(1, 2) : g.contiguous();
}

// The partial-sum workspace of the reductions (none for most shapes).
at::Tensor workspace(const at::Tensor& x, DType dt) {
  const int64_t n = coord_reduce_workspace_cuda(dt, x.size(0), x.size(1), x.size(2), x.size(3));
  return n > 0 ? at::empty({n}, x.options().dtype(acc_scalar_type(x))) : at::Tensor();
}

void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

std::tuple<at::Tensor, at::Tensor> coord_pool_cuda_op(const at::Tensor& x) {
  const char* op = "coord_pool";
  check_feature_map(x, op);
  TORCH_CHECK(x.is_cuda(), "fastattn::", op, ": this kernel runs on CUDA tensors, got 'x' on ", x.device());
  const DType dt = dtype_tag(x, op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor xh = at::empty({B, C, H}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor xw = at::empty({B, C, W}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) {                      // a mean over nothing is NaN, as in torch
    xh.fill_(std::numeric_limits<double>::quiet_NaN());
    xw.fill_(std::numeric_limits<double>::quiet_NaN());
    return {xh, xw};
  }
  const at::Tensor ws = workspace(x, dt);
  check_launch(coord_pool_forward_cuda(x.data_ptr(), xh.data_ptr(), xw.data_ptr(), ptr_or_null(ws), dt, B, C, H, W,
                                       strides4(x), c10::cuda::getCurrentCUDAStream()),
               op, x);
  return {xh, xw};
}

at::Tensor coord_pool_backward_cuda_op(const at::Tensor& dxh, const at::Tensor& dxw, bool channels_last) {
  const char* op = "coord_pool_backward";
  TORCH_CHECK_VALUE(dxh.dim() == 3, "fastattn::", op, ": argument 'dxh' must be 3-D (B, C, H), got ", dxh.dim(),
                    "-D tensor of shape ", dxh.sizes());
  TORCH_CHECK(dxh.is_cuda(), "fastattn::", op, ": this kernel runs on CUDA tensors, got 'dxh' on ", dxh.device());
  const DType dt = dtype_tag(dxh, op, "dxh");
  const int64_t B = dxh.size(0), C = dxh.size(1), H = dxh.size(2);
  TORCH_CHECK_VALUE(dxw.dim() == 3, "fastattn::", op, ": argument 'dxw' must be 3-D (B, C, W), got ", dxw.dim(),
                    "-D tensor of shape ", dxw.sizes());
  const int64_t W = dxw.size(2);
  check_rows(dxw, op, "dxw", B, C, W, "W", dxh.scalar_type(), dxh.device());
  const c10::cuda::CUDAGuard guard(dxh.device());
  at::Tensor dx = at::empty({B, C, H, W}, dxh.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                                     : at::MemoryFormat::Contiguous));
  if (dx.numel() == 0) return dx;
  const bool channels = walks_channels(dx);
  const at::Tensor gh = rows_for(dxh, channels), gw = rows_for(dxw, channels);
  check_launch(coord_pool_backward_cuda(gh.data_ptr(), strides3(gh), gw.data_ptr(), strides3(gw), dx.data_ptr(), dt,
                                        B, C, H, W, strides4(dx), c10::cuda::getCurrentCUDAStream()),
               op, dx);
  return dx;
}

DType check_scale_args(const char* op, const at::Tensor& x, const at::Tensor& a_h, const at::Tensor& a_w) {
  check_feature_map(x, op);
  TORCH_CHECK(x.is_cuda(), "fastattn::", op, ": this kernel runs on CUDA tensors, got 'x' on ", x.device());
  const DType dt = dtype_tag(x, op, "x");
  const at::ScalarType acc = acc_scalar_type(x);
  check_rows(a_h, op, "a_h", x.size(0), x.size(1), x.size(2), "H", acc, x.device());
  check_rows(a_w, op, "a_w", x.size(0), x.size(1), x.size(3), "W", acc, x.device());
  TORCH_CHECK_VALUE(a_h.is_contiguous(), "fastattn::", op, ": argument 'a_h' must be contiguous");
  TORCH_CHECK_VALUE(a_w.is_contiguous(), "fastattn::", op, ": argument 'a_w' must be contiguous");
  return dt;
}

at::Tensor coord_scale_cuda_op(const at::Tensor& x, const at::Tensor& a_h, const at::Tensor& a_w) {
  const char* op = "coord_scale";
  const DType dt = check_scale_args(op, x, a_h, a_w);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (y.numel() == 0) return y;
  const bool channels = walks_channels(x);
  const at::Tensor ah = rows_for(a_h, channels), aw = rows_for(a_w, channels);
  check_launch(coord_scale_forward_cuda(x.data_ptr(), ah.data_ptr(), strides3(ah), aw.data_ptr(), strides3(aw),
                                        y.data_ptr(), dt, x.size(0), x.size(1), x.size(2), x.size(3), strides4(x),
                                        strides4(y), c10::cuda::getCurrentCUDAStream()),
               op, x);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> coord_scale_backward_cuda_op(const at::Tensor& dy, const at::Tensor& x,
                                                                            const at::Tensor& a_h,
                                                                            const at::Tensor& a_w) {
  const char* op = "coord_scale_backward";
  const DType dt = check_scale_args(op, x, a_h, a_w);
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), "fastattn::", op, ": argument 'dy' must have the shape of 'x' ",
                    x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK_TYPE(dy.scalar_type() == x.scalar_type(), "fastattn::", op,
                   ": argument 'dy' must have the dtype of 'x' (", x.scalar_type(), "), got ", dy.scalar_type());
  check_on(dy, x.device(), op, "dy");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  const auto acc_opts = a_h.options().memory_format(at::MemoryFormat::Contiguous);
  if (x.numel() == 0)                           // an empty sum is zero
    return {dx, at::zeros(a_h.sizes(), acc_opts), at::zeros(a_w.sizes(), acc_opts)};
  at::Tensor dah = at::empty(a_h.sizes(), acc_opts), daw = at::empty(a_w.sizes(), acc_opts);
  const bool channels = walks_channels(x);
  const at::Tensor ah = rows_for(a_h, channels), aw = rows_for(a_w, channels);
  const at::Tensor ws = workspace(x, dt);
  check_launch(coord_scale_backward_cuda(dy.data_ptr(), x.data_ptr(), ah.data_ptr(), strides3(ah), aw.data_ptr(),
                                         strides3(aw), dx.data_ptr(), dah.data_ptr(), daw.data_ptr(), ptr_or_null(ws),
                                         dt, x.size(0), x.size(1), x.size(2), x.size(3), strides4(dy), strides4(x),
                                         strides4(dx), c10::cuda::getCurrentCUDAStream()),
               op, x);
  return {dx, dah, daw};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CUDA, m) {
  m.impl("coord_pool", &fastattn::coord_pool_cuda_op);
  m.impl("coord_pool_backward", &fastattn::coord_pool_backward_cuda_op);
  m.impl("coord_scale", &fastattn::coord_scale_cuda_op);
  m.impl("coord_scale_backward", &fastattn::coord_scale_backward_cuda_op);
}
