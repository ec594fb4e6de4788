// torch.ops.fastattn_C gate ops: schemas and CPU registrations (kernels in csrc/cpu/gate.cpp).
#include "../cpu/gate.h"
#include "common.h"

namespace fastattn {
namespace {

// Checks shared by channel_scale and its backward: x a CPU feature map, `other` (residual or dy)
// like x, a a contiguous (B, C) tensor in x's accumulation dtype (float32; float64 for float64 x).
DType check_scale_args(const char* op, const at::Tensor& x, const at::Tensor& a, const at::Tensor* other,
                       const char* other_name) {
  check_feature_map(x, op);
  TORCH_CHECK(x.device().is_cpu(), "fastattn::", op, ": this kernel runs on CPU tensors, got 'x' on ", x.device());
  const DType dt = dtype_tag(x, op, "x");
  const at::ScalarType acc = acc_scalar_type(x);
  TORCH_CHECK_VALUE(a.dim() == 2 && a.size(0) == x.size(0) && a.size(1) == x.size(1), "fastattn::", op,
                    ": argument 'a' must have shape (B, C) = (", x.size(0), ", ", x.size(1), "), got ", a.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == acc, "fastattn::", op, ": argument 'a' must be ", acc, " for 'x' of dtype ",
                   x.scalar_type(), ", got ", a.scalar_type());
  TORCH_CHECK_VALUE(a.is_contiguous(), "fastattn::", op, ": argument 'a' must be contiguous");
  TORCH_CHECK(a.device().is_cpu(), "fastattn::", op, ": argument 'a' must be a CPU tensor, got ", a.device());
  if (other) {
    TORCH_CHECK_VALUE(other->sizes() == x.sizes(), "fastattn::", op, ": argument '", other_name,
                      "' must have the shape of 'x' ", x.sizes(), ", got ", other->sizes());
    TORCH_CHECK_TYPE(other->scalar_type() == x.scalar_type(), "fastattn::", op, ": argument '", other_name,
                     "' must have the dtype of 'x' (", x.scalar_type(), "), got ", other->scalar_type());
    TORCH_CHECK(other->device().is_cpu(), "fastattn::", op, ": argument '", other_name,
                "' must be a CPU tensor, got ", other->device());
  }
  return dt;
}

// y = x * a[:, :, None, None] (+ residual); y has the strides of torch.empty_like(x).
at::Tensor channel_scale(const at::Tensor& x, const at::Tensor& a, const std::optional<at::Tensor>& residual) {
  const at::Tensor* r = residual.has_value() ? &*residual : nullptr;
  const DType dt = check_scale_args("channel_scale", x, a, r, "residual");
  at::Tensor y = new_output_like(x);
  if (y.numel() == 0) return y;
  const Strides4 sr = r ? strides4(*r) : Strides4{0, 0, 0, 0};
  channel_scale_forward_cpu(x.data_ptr(), a.data_ptr(), r ? r->data_ptr() : nullptr, y.data_ptr(), dt, x.size(0),
                            x.size(1), x.size(2), x.size(3), strides4(x), sr, strides4(y));
  return y;
}

// (dx, da) = (dy * a, sum over H x W of dy * x); dx like torch.empty_like(x), da (B, C) in a's dtype.
std::tuple<at::Tensor, at::Tensor> channel_scale_backward(const at::Tensor& dy, const at::Tensor& x,
                                                          const at::Tensor& a) {
  const DType dt = check_scale_args("channel_scale_backward", x, a, &dy, "dy");
  at::Tensor dx = new_output_like(x);
  at::Tensor da = at::zeros({x.size(0), x.size(1)}, a.options());
  if (dx.numel() == 0) return {dx, da};          // an empty plane sums to zero
  channel_scale_backward_cpu(dy.data_ptr(), x.data_ptr(), a.data_ptr(), dx.data_ptr(), da.data_ptr(), dt, x.size(0),
                             x.size(1), x.size(2), x.size(3), strides4(dy), strides4(x), strides4(dx));
  return {dx, da};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_FRAGMENT(fastattn_C, m) {
  m.def("channel_scale(Tensor x, Tensor a, Tensor? residual) -> Tensor");
  m.def("channel_scale_backward(Tensor dy, Tensor x, Tensor a) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("channel_scale", &fastattn::channel_scale);
  m.impl("channel_scale_backward", &fastattn::channel_scale_backward);
}
