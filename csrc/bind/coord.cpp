// torch.ops.fastattn_C coordinate-attention ops: schemas and CPU registrations (kernels in
// csrc/cpu/coord.cpp). The CUDA registrations of the same schemas are in coord_cuda.cpp.
#include <limits>

#include "../cpu/coord.h"
#include "common.h"

namespace fastattn {
namespace {

void check_cpu(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.device().is_cpu(), "fastattn::", op, ": this kernel runs on CPU tensors, got '", arg, "' on ",
              t.device());
}

// A gate or gradient row tensor: shape (B, C, L), dtype `dtype`.
void check_rows(const at::Tensor& t, const char* op, const char* arg, int64_t B, int64_t C, int64_t L,
                const char* axis, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == B && t.size(1) == C && t.size(2) == L, "fastattn::", op,
                    ": argument '", arg, "' must have shape (B, C, ", axis, ") = (", B, ", ", C, ", ", L, "), got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "fastattn::", op, ": argument '", arg, "' must be ", dtype, ", got ",
                   t.scalar_type());
  check_cpu(t, op, arg);
}

// (x_h, x_w): means over W (B, C, H) and over H (B, C, W), contiguous, in x's dtype.
std::tuple<at::Tensor, at::Tensor> coord_pool(const at::Tensor& x) {
  const char* op = "coord_pool";
  check_feature_map(x, op);
  check_cpu(x, op, "x");
  const DType dt = dtype_tag(x, op, "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor xh = at::empty({B, C, H}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor xw = at::empty({B, C, W}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) {                      // a mean over nothing is NaN, as in torch
    xh.fill_(std::numeric_limits<double>::quiet_NaN());
    xw.fill_(std::numeric_limits<double>::quiet_NaN());
    return {xh, xw};
  }
  coord_pool_forward_cpu(x.data_ptr(), xh.data_ptr(), xw.data_ptr(), dt, B, C, H, W, strides4(x));
  return {xh, xw};
}

// dx = dxh[..., None] / W + dxw[..., None, :] / H, NCHW or channels_last, in dxh's dtype.
at::Tensor coord_pool_backward(const at::Tensor& dxh, const at::Tensor& dxw, bool channels_last) {
  const char* op = "coord_pool_backward";
  TORCH_CHECK_VALUE(dxh.dim() == 3, "fastattn::", op, ": argument 'dxh' must be 3-D (B, C, H), got ", dxh.dim(),
                    "-D tensor of shape ", dxh.sizes());
  const DType dt = dtype_tag(dxh, op, "dxh");
  check_cpu(dxh, op, "dxh");
  const int64_t B = dxh.size(0), C = dxh.size(1), H = dxh.size(2);
  TORCH_CHECK_VALUE(dxw.dim() == 3, "fastattn::", op, ": argument 'dxw' must be 3-D (B, C, W), got ", dxw.dim(),
                    "-D tensor of shape ", dxw.sizes());
  const int64_t W = dxw.size(2);
  check_rows(dxw, op, "dxw", B, C, W, "W", dxh.scalar_type());
  at::Tensor dx = at::empty({B, C, H, W}, dxh.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                                     : at::MemoryFormat::Contiguous));
  if (dx.numel() == 0) return dx;
  const at::Tensor gh = dxh.contiguous(), gw = dxw.contiguous();   // (B, C, H) and (B, C, W): small
  coord_pool_backward_cpu(gh.data_ptr(), gw.data_ptr(), dx.data_ptr(), dt, B, C, H, W, strides4(dx));
  return dx;
}

// Checks shared by coord_scale and its backwards: x (named `x_name`) a 4-D CPU map, a_h (B, C, H)
// and a_w (B, C, W) contiguous in x's accumulation dtype (float32; float64 for float64 x).
DType check_scale_args(const char* op, const at::Tensor& x, const at::Tensor& a_h, const at::Tensor& a_w,
                       const char* x_name = "x") {
  TORCH_CHECK_VALUE(x.dim() == 4, "fastattn::", op, ": argument '", x_name, "' must be 4-D (B, C, H, W), got ",
                    x.dim(), "-D tensor of shape ", x.sizes());
  check_cpu(x, op, x_name);
  const DType dt = dtype_tag(x, op, x_name);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const at::ScalarType acc = acc_scalar_type(x);
  check_rows(a_h, op, "a_h", B, C, H, "H", acc);
  check_rows(a_w, op, "a_w", B, C, W, "W", acc);
  TORCH_CHECK_VALUE(a_h.is_contiguous(), "fastattn::", op, ": argument 'a_h' must be contiguous");
  TORCH_CHECK_VALUE(a_w.is_contiguous(), "fastattn::", op, ": argument 'a_w' must be contiguous");
  return dt;
}

// dy: x's shape and dtype, on the CPU.
void check_dy(const char* op, const at::Tensor& dy, const at::Tensor& x) {
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), "fastattn::", op, ": argument 'dy' must have the shape of 'x' ",
                    x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK_TYPE(dy.scalar_type() == x.scalar_type(), "fastattn::", op,
                   ": argument 'dy' must have the dtype of 'x' (", x.scalar_type(), "), got ", dy.scalar_type());
  check_cpu(dy, op, "dy");
}

// y = x * a_w[:, :, None, :] * a_h[:, :, :, None], with the strides of torch.empty_like(x).
at::Tensor coord_scale(const at::Tensor& x, const at::Tensor& a_h, const at::Tensor& a_w) {
  const DType dt = check_scale_args("coord_scale", x, a_h, a_w);
  at::Tensor y = new_output_like(x);
  if (y.numel() == 0) return y;
  coord_scale_forward_cpu(x.data_ptr(), a_h.data_ptr(), a_w.data_ptr(), y.data_ptr(), dt, x.size(0), x.size(1),
                          x.size(2), x.size(3), strides4(x), strides4(y));
  return y;
}

// (dx, da_h, da_w): dx like torch.empty_like(x); da_h, da_w in the gates' (accumulation) dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> coord_scale_backward(const at::Tensor& dy, const at::Tensor& x,
                                                                    const at::Tensor& a_h, const at::Tensor& a_w) {
  const char* op = "coord_scale_backward";
  const DType dt = check_scale_args(op, x, a_h, a_w);
  check_dy(op, dy, x);
  at::Tensor dx = new_output_like(x);
  if (x.numel() == 0)                           // an empty sum is zero
    return {dx, at::zeros_like(a_h), at::zeros_like(a_w)};
  at::Tensor dah = at::empty_like(a_h), daw = at::empty_like(a_w);
  coord_scale_backward_cpu(dy.data_ptr(), x.data_ptr(), a_h.data_ptr(), a_w.data_ptr(), dx.data_ptr(), dah.data_ptr(),
                           daw.data_ptr(), dt, x.size(0), x.size(1), x.size(2), x.size(3), strides4(dy), strides4(x),
                           strides4(dx));
  return {dx, dah, daw};
}

// (da_h, da_w) of coord_scale_backward without dx: CoordinateAttention's CPU training step reads
// dy and x once for them, and writes its whole dx afterwards (coord_backward_dx).
std::tuple<at::Tensor, at::Tensor> coord_scale_grads(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& a_h,
                                                     const at::Tensor& a_w) {
  const char* op = "coord_scale_grads";
  const DType dt = check_scale_args(op, x, a_h, a_w);
  check_dy(op, dy, x);
  if (x.numel() == 0) return {at::zeros_like(a_h), at::zeros_like(a_w)};
  at::Tensor dah = at::empty_like(a_h), daw = at::empty_like(a_w);
  coord_scale_backward_cpu(dy.data_ptr(), x.data_ptr(), a_h.data_ptr(), a_w.data_ptr(), nullptr, dah.data_ptr(),
                           daw.data_ptr(), dt, x.size(0), x.size(1), x.size(2), x.size(3), strides4(dy), strides4(x),
                           strides4(x));
  return {dah, daw};
}

// dx = dy * a_w[:, :, None, :] * a_h[:, :, :, None] + dxh[..., None] / W + dxw[..., None, :] / H in one
// pass (coord_scale's and coord_pool's gradients of x, summed), with the strides of
// torch.empty_like(dy); dxh, dxw in dy's dtype, a_h, a_w in its accumulation dtype.
at::Tensor coord_backward_dx(const at::Tensor& dy, const at::Tensor& a_h, const at::Tensor& a_w, const at::Tensor& dxh,
                             const at::Tensor& dxw) {
  const char* op = "coord_backward_dx";
  const DType dt = check_scale_args(op, dy, a_h, a_w, "dy");
  const int64_t B = dy.size(0), C = dy.size(1), H = dy.size(2), W = dy.size(3);
  check_rows(dxh, op, "dxh", B, C, H, "H", dy.scalar_type());
  check_rows(dxw, op, "dxw", B, C, W, "W", dy.scalar_type());
  at::Tensor dx = new_output_like(dy);
  if (dx.numel() == 0) return dx;
  const at::Tensor gh = dxh.contiguous(), gw = dxw.contiguous();   // (B, C, H) and (B, C, W): small
  coord_backward_dx_cpu(dy.data_ptr(), a_h.data_ptr(), a_w.data_ptr(), gh.data_ptr(), gw.data_ptr(), dx.data_ptr(), dt,
                        B, C, H, W, strides4(dy), strides4(dx));
  return dx;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_FRAGMENT(fastattn_C, m) {
  m.def("coord_pool(Tensor x) -> (Tensor, Tensor)");
  m.def("coord_pool_backward(Tensor dxh, Tensor dxw, bool channels_last) -> Tensor");
  m.def("coord_scale(Tensor x, Tensor a_h, Tensor a_w) -> Tensor");
  m.def("coord_scale_backward(Tensor dy, Tensor x, Tensor a_h, Tensor a_w) -> (Tensor, Tensor, Tensor)");
  m.def("coord_scale_grads(Tensor dy, Tensor x, Tensor a_h, Tensor a_w) -> (Tensor, Tensor)");
  m.def("coord_backward_dx(Tensor dy, Tensor a_h, Tensor a_w, Tensor dxh, Tensor dxw) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("coord_pool", &fastattn::coord_pool);
  m.impl("coord_pool_backward", &fastattn::coord_pool_backward);
  m.impl("coord_scale", &fastattn::coord_scale);
  m.impl("coord_scale_backward", &fastattn::coord_scale_backward);
  m.impl("coord_scale_grads", &fastattn::coord_scale_grads);
  m.impl("coord_backward_dx", &fastattn::coord_backward_dx);
}
