// torch.ops.fastattn_C SGE ops: schemas and CPU registrations (kernels in csrc/cpu/group.cpp).
#include "../cpu/group.h"
#include "common.h"

namespace fastattn {
namespace {

// A small contiguous CPU tensor of the accumulation dtype with the given shape.
void check_small(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape, const char* hint,
                 at::ScalarType acc) {
  TORCH_CHECK_VALUE(t.sizes() == shape, "fastattn::", op, ": argument '", name, "' must have shape ", hint, " = ",
                    shape, ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == acc, "fastattn::", op, ": argument '", name, "' must be ", acc,
                   " (the accumulation dtype of 'x'), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), "fastattn::", op, ": argument '", name, "' must be contiguous");
  TORCH_CHECK(t.device().is_cpu(), "fastattn::", op, ": argument '", name, "' must be a CPU tensor, got ",
              t.device());
}

// Checks shared by the forward and the backward; returns x's dtype tag.
DType check_sge_args(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                     int64_t groups, double eps) {
  check_feature_map(x, op);
  TORCH_CHECK(x.device().is_cpu(), "fastattn::", op, ": this kernel runs on CPU tensors, got 'x' on ", x.device());
  const DType dt = dtype_tag(x, op, "x");
  TORCH_CHECK_VALUE(groups >= 1, "fastattn::", op, ": argument 'groups' must be a positive int, got ", groups);
  TORCH_CHECK_VALUE(x.size(1) % groups == 0, "fastattn::", op, ": argument 'x' must have channels divisible by groups=",
                    groups, ", got ", x.size(1));
  TORCH_CHECK_VALUE(x.size(2) * x.size(3) >= 2, "fastattn::", op,
                    ": argument 'x' must have at least 2 spatial positions (H*W >= 2, for the unbiased std), got H=",
                    x.size(2), ", W=", x.size(3));
  TORCH_CHECK_VALUE(eps >= 0, "fastattn::", op, ": argument 'eps' must be a non-negative float, got ", eps);
  const at::ScalarType acc = acc_scalar_type(x);
  check_small(op, "weight", weight, {groups}, "(groups,)", acc);
  check_small(op, "bias", bias, {groups}, "(groups,)", acc);
  return dt;
}

// (y, m, mu, sd): y like torch.empty_like(x); m (B, C), mu and sd (B, G) in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sge_gate(const at::Tensor& x, const at::Tensor& weight,
                                                                    const at::Tensor& bias, int64_t groups,
                                                                    double eps) {
  const DType dt = check_sge_args("sge_gate", x, weight, bias, groups, eps);
  const int64_t B = x.size(0), C = x.size(1);
  const auto opts = x.options().dtype(acc_scalar_type(x));
  at::Tensor y = new_output_like(x);
  at::Tensor m = at::zeros({B, C}, opts);
  at::Tensor mu = at::zeros({B, groups}, opts);
  at::Tensor sd = at::zeros({B, groups}, opts);
  if (x.numel() == 0) return {y, m, mu, sd};
  sge_forward_cpu(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(), m.data_ptr(), mu.data_ptr(),
                  sd.data_ptr(), dt, B, C, x.size(2), x.size(3), groups, eps, strides4(x), strides4(y));
  return {y, m, mu, sd};
}

// (dx, dweight, dbias): dx like torch.empty_like(x); dweight and dbias (G,) in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sge_gate_backward(const at::Tensor& dy, const at::Tensor& x,
                                                                 const at::Tensor& weight, const at::Tensor& bias,
                                                                 const at::Tensor& m, const at::Tensor& mu,
                                                                 const at::Tensor& sd, int64_t groups, double eps) {
  const char* op = "sge_gate_backward";
  const DType dt = check_sge_args(op, x, weight, bias, groups, eps);
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), "fastattn::", op, ": argument 'dy' must have the shape of 'x' ",
                    x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK_TYPE(dy.scalar_type() == x.scalar_type(), "fastattn::", op,
                   ": argument 'dy' must have the dtype of 'x' (", x.scalar_type(), "), got ", dy.scalar_type());
  TORCH_CHECK(dy.device().is_cpu(), "fastattn::", op, ": argument 'dy' must be a CPU tensor, got ", dy.device());
  const int64_t B = x.size(0), C = x.size(1);
  const at::ScalarType acc = acc_scalar_type(x);
  check_small(op, "m", m, {B, C}, "(B, C)", acc);
  check_small(op, "mu", mu, {B, groups}, "(B, groups)", acc);
  check_small(op, "sd", sd, {B, groups}, "(B, groups)", acc);
  at::Tensor dx = new_output_like(x);
  at::Tensor dweight = at::zeros({groups}, weight.options());
  at::Tensor dbias = at::zeros({groups}, bias.options());
  if (x.numel() == 0) return {dx, dweight, dbias};
  sge_backward_cpu(dy.data_ptr(), x.data_ptr(), weight.data_ptr(), bias.data_ptr(), m.data_ptr(), mu.data_ptr(),
                   sd.data_ptr(), dx.data_ptr(), dweight.data_ptr(), dbias.data_ptr(), dt, B, C, x.size(2),
                   x.size(3), groups, eps, strides4(dy), strides4(x), strides4(dx));
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_FRAGMENT(fastattn_C, m) {
  m.def("sge_gate(Tensor x, Tensor weight, Tensor bias, int groups, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("sge_gate_backward(Tensor dy, Tensor x, Tensor weight, Tensor bias, Tensor m, Tensor mu, Tensor sd, "
        "int groups, float eps) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("sge_gate", &fastattn::sge_gate);
  m.impl("sge_gate_backward", &fastattn::sge_gate_backward);
}
