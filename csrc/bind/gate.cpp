// torch.ops.fastattn_C gate ops: schemas and CPU registrations (kernels in csrc/cpu/gate.cpp and
// csrc/cpu/gate_fused.cpp; the CUDA registrations are in gate_cuda.cpp).
#include <type_traits>

#include "../cpu/gate.h"
#include "common.h"
#include "gate_checks.h"

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

// y = x * f(a, s) per mode; y like torch.empty_like(x). a (B, C) and s (B, 1, H, W) contiguous in
// x's accumulation dtype.
at::Tensor channel_spatial_gate(const at::Tensor& x, const at::Tensor& a, const at::Tensor& s,
                                c10::string_view mode) {
  using namespace gate_checks;
  const char* op = "channel_spatial_gate";
  const DType dt = check_x(op, x, c10::DeviceType::CPU);
  check_channel_param(op, "a", a, x);
  check_pixel_param(op, "s", s, x);
  const CombineMode m = parse_mode(op, mode);
  at::Tensor y = new_output_like(x);
  if (y.numel() == 0) return y;
  channel_spatial_gate_forward_cpu(x.data_ptr(), a.data_ptr(), s.data_ptr(), y.data_ptr(), m, dt, x.size(0),
                                   x.size(1), x.size(2), x.size(3), strides4(x), strides4(y));
  return y;
}

// (dx, da, ds): dx like torch.empty_like(x), da (B, C) and ds (B, 1, H, W) in a's and s's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_spatial_gate_backward(const at::Tensor& dy, const at::Tensor& x,
                                                                             const at::Tensor& a, const at::Tensor& s,
                                                                             c10::string_view mode) {
  using namespace gate_checks;
  const char* op = "channel_spatial_gate_backward";
  const DType dt = check_x(op, x, c10::DeviceType::CPU);
  check_like_x(op, "dy", dy, x);
  check_channel_param(op, "a", a, x);
  check_pixel_param(op, "s", s, x);
  const CombineMode m = parse_mode(op, mode);
  at::Tensor dx = new_output_like(x), da = channel_grad(x, a), ds = pixel_grad(x, s);
  if (x.numel() == 0) return {dx, da, ds};
  channel_spatial_gate_backward_cpu(dy.data_ptr(), x.data_ptr(), a.data_ptr(), s.data_ptr(), dx.data_ptr(),
                                    da.data_ptr(), ds.data_ptr(), m, dt, x.size(0), x.size(1), x.size(2), x.size(3),
                                    strides4(dy), strides4(x), strides4(dx));
  return {dx, da, ds};
}

// y = x * sigmoid(alpha x + beta); alpha, beta (B, C) contiguous in x's accumulation dtype.
at::Tensor channel_affine_gate(const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& beta) {
  using namespace gate_checks;
  const char* op = "channel_affine_gate";
  const DType dt = check_x(op, x, c10::DeviceType::CPU);
  check_channel_param(op, "alpha", alpha, x);
  check_channel_param(op, "beta", beta, x);
  at::Tensor y = new_output_like(x);
  if (y.numel() == 0) return y;
  channel_affine_gate_forward_cpu(x.data_ptr(), alpha.data_ptr(), beta.data_ptr(), y.data_ptr(), dt, x.size(0),
                                  x.size(1), x.size(2), x.size(3), strides4(x), strides4(y));
  return y;
}

// (dx, dalpha, dbeta): dx like torch.empty_like(x), dalpha and dbeta (B, C) in alpha's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_affine_gate_backward(const at::Tensor& dy, const at::Tensor& x,
                                                                            const at::Tensor& alpha,
                                                                            const at::Tensor& beta) {
  using namespace gate_checks;
  const char* op = "channel_affine_gate_backward";
  const DType dt = check_x(op, x, c10::DeviceType::CPU);
  check_like_x(op, "dy", dy, x);
  check_channel_param(op, "alpha", alpha, x);
  check_channel_param(op, "beta", beta, x);
  at::Tensor dx = new_output_like(x), dal = channel_grad(x, alpha), dbe = channel_grad(x, beta);
  if (x.numel() == 0) return {dx, dal, dbe};
  channel_affine_gate_backward_cpu(dy.data_ptr(), x.data_ptr(), alpha.data_ptr(), beta.data_ptr(), dx.data_ptr(),
                                   dal.data_ptr(), dbe.data_ptr(), dt, x.size(0), x.size(1), x.size(2), x.size(3),
                                   strides4(dy), strides4(x), strides4(dx));
  return {dx, dal, dbe};
}

// NAM's training gate (see bn_affine_gate_train_forward_cpu): x NCHW-contiguous 16/32-bit CPU,
// the per-channel vectors float32 (C,) contiguous.
DType check_nam_args(const char* op, const at::Tensor& x,
                     std::initializer_list<std::pair<const char*, const at::Tensor*>> vecs) {
  using namespace gate_checks;
  const DType dt = check_x(op, x, c10::DeviceType::CPU);
  check_nchw_contiguous(op, "x", x);
  TORCH_CHECK_TYPE(dt != DType::Float64, "fastattn::", op, ": argument 'x' must be float32, float16 or bfloat16, got ",
                   x.scalar_type());
  for (const auto& [name, t] : vecs) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == x.size(1), "fastattn::", op, ": argument '", name,
                      "' must have shape (C) = (", x.size(1), "), got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "fastattn::", op, ": argument '", name, "' must be float32, got ",
                     t->scalar_type());
    TORCH_CHECK_VALUE(t->is_contiguous() && t->device().is_cpu(), "fastattn::", op, ": argument '", name,
                      "' must be a contiguous CPU tensor");
  }
  return dt;
}

// (y, mean, var): y = x * sigmoid(w * batchnorm(x)) with the batch statistics (population
// variance), mean and var (C) float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> nam_train_forward(const at::Tensor& x, const at::Tensor& gamma,
                                                                 const at::Tensor& bias, const at::Tensor& w,
                                                                 double eps) {
  const char* op = "nam_train_forward";
  const DType dt = check_nam_args(op, x, {{"gamma", &gamma}, {"bias", &bias}, {"w", &w}});
  TORCH_CHECK_VALUE(x.size(0) * x.size(2) * x.size(3) > 0, "fastattn::", op,
                    ": argument 'x' must have B * H * W >= 1 (a batch to normalise over), got ", x.sizes());
  at::Tensor y = new_output_like(x);
  at::Tensor mean = at::empty({x.size(1)}, gamma.options()), var = at::empty({x.size(1)}, gamma.options());
  if (y.numel() == 0) return {y, mean, var};
  bn_affine_gate_train_forward_cpu(x.data_ptr(), gamma.data_ptr<float>(), bias.data_ptr<float>(), w.data_ptr<float>(),
                                   static_cast<float>(eps), y.data_ptr(), mean.data_ptr<float>(), var.data_ptr<float>(),
                                   dt, x.size(0), x.size(1), x.size(2) * x.size(3));
  return {y, mean, var};
}

// (dx, dgamma, dbias) of nam_train_forward from its mean and var; dx is an empty tensor unless
// need_dx.
std::tuple<at::Tensor, at::Tensor, at::Tensor> nam_train_backward(const at::Tensor& dy, const at::Tensor& x,
                                                                  const at::Tensor& gamma, const at::Tensor& bias,
                                                                  const at::Tensor& w, double eps,
                                                                  const at::Tensor& mean, const at::Tensor& var,
                                                                  bool need_dx) {
  const char* op = "nam_train_backward";
  const DType dt = check_nam_args(op, x, {{"gamma", &gamma}, {"bias", &bias}, {"w", &w}, {"mean", &mean},
                                          {"var", &var}});
  gate_checks::check_like_x(op, "dy", dy, x);
  check_nchw_contiguous(op, "dy", dy);
  at::Tensor dx = need_dx ? new_output_like(x) : at::empty({0}, x.options());
  at::Tensor dgamma = at::zeros({x.size(1)}, gamma.options()), dbias = at::zeros({x.size(1)}, gamma.options());
  if (x.numel() == 0) return {dx, dgamma, dbias};
  bn_affine_gate_train_backward_cpu(dy.data_ptr(), x.data_ptr(), gamma.data_ptr<float>(), bias.data_ptr<float>(),
                                    w.data_ptr<float>(), static_cast<float>(eps), mean.data_ptr<float>(),
                                    var.data_ptr<float>(), need_dx ? dx.data_ptr() : nullptr, dgamma.data_ptr<float>(),
                                    dbias.data_ptr<float>(), dt, x.size(0), x.size(1), x.size(2) * x.size(3));
  return {dx, dgamma, dbias};
}

// A (rows, cols) float32 contiguous CPU table (SRM's cfc, its per-plane statistics).
void check_f32_table(const char* op, const char* name, const at::Tensor& t, int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "fastattn::", op, ": argument '", name,
                    "' must have shape (", rows, ", ", cols, "), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "fastattn::", op, ": argument '", name, "' must be float32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous() && t.device().is_cpu(), "fastattn::", op, ": argument '", name,
                    "' must be a contiguous CPU tensor");
}

// SRM's training gate (see srm_train_forward_cpu): (y, mean, std, g, zmean, zvar).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> srm_train_forward(
    const at::Tensor& x, const at::Tensor& cfc, const at::Tensor& gamma, const at::Tensor& beta, double bn_eps,
    double std_eps) {
  const char* op = "srm_train_forward";
  const DType dt = check_nam_args(op, x, {{"gamma", &gamma}, {"beta", &beta}});
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  check_f32_table(op, "cfc", cfc, C, 2);
  TORCH_CHECK_VALUE(HW >= 2, "fastattn::", op, ": argument 'x' must have H * W >= 2 (unbiased variance), got ",
                    x.sizes());
  at::Tensor y = new_output_like(x);
  const auto f32 = gamma.options();
  at::Tensor mean = at::empty({B, C}, f32), stdv = at::empty({B, C}, f32), g = at::empty({B, C}, f32);
  at::Tensor zmean = at::empty({C}, f32), zvar = at::empty({C}, f32);
  if (y.numel() > 0)
    srm_train_forward_cpu(x.data_ptr(), cfc.data_ptr<float>(), gamma.data_ptr<float>(), beta.data_ptr<float>(),
                          static_cast<float>(bn_eps), static_cast<float>(std_eps), y.data_ptr(), mean.data_ptr<float>(),
                          stdv.data_ptr<float>(), g.data_ptr<float>(), zmean.data_ptr<float>(), zvar.data_ptr<float>(),
                          dt, B, C, HW);
  return {y, mean, stdv, g, zmean, zvar};
}

// (dx, dcfc, dgamma, dbeta) of srm_train_forward from its outputs; dx is an empty tensor unless
// need_dx.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> srm_train_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& cfc, const at::Tensor& gamma, double bn_eps,
    const at::Tensor& mean, const at::Tensor& stdv, const at::Tensor& g, const at::Tensor& zmean,
    const at::Tensor& zvar, bool need_dx) {
  const char* op = "srm_train_backward";
  const DType dt = check_nam_args(op, x, {{"gamma", &gamma}, {"zmean", &zmean}, {"zvar", &zvar}});
  gate_checks::check_like_x(op, "dy", dy, x);
  check_nchw_contiguous(op, "dy", dy);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  check_f32_table(op, "cfc", cfc, C, 2);
  check_f32_table(op, "mean", mean, B, C);
  check_f32_table(op, "std", stdv, B, C);
  check_f32_table(op, "g", g, B, C);
  TORCH_CHECK_VALUE(HW >= 2, "fastattn::", op, ": argument 'x' must have H * W >= 2, got ", x.sizes());
  at::Tensor dx = need_dx ? new_output_like(x) : at::empty({0}, x.options());
  at::Tensor dcfc = at::zeros({C, 2}, gamma.options());
  at::Tensor dgamma = at::zeros({C}, gamma.options()), dbeta = at::zeros({C}, gamma.options());
  if (x.numel() > 0)
    srm_train_backward_cpu(dy.data_ptr(), x.data_ptr(), cfc.data_ptr<float>(), gamma.data_ptr<float>(),
                           static_cast<float>(bn_eps), mean.data_ptr<float>(), stdv.data_ptr<float>(),
                           g.data_ptr<float>(), zmean.data_ptr<float>(), zvar.data_ptr<float>(),
                           need_dx ? dx.data_ptr() : nullptr, dcfc.data_ptr<float>(), dgamma.data_ptr<float>(),
                           dbeta.data_ptr<float>(), dt, B, C, HW);
  return {dx, dcfc, dgamma, dbeta};
}

// ShuffleAttention's gate and channel shuffle in one pass: channel c = j * (C / groups) + k of
// x * sigmoid(alpha x + beta) is written to output channel k * groups + j (the reference's
// channel_shuffle). x NCHW-contiguous.
void check_shuffle_args(const char* op, const at::Tensor& x, int64_t groups) {
  check_nchw_contiguous(op, "x", x);
  TORCH_CHECK_VALUE(groups >= 1 && x.size(1) % groups == 0, "fastattn::", op,
                    ": argument 'groups' must be a positive divisor of C = ", x.size(1), ", got ", groups);
}

// y = shuffle(x * sigmoid(alpha x + beta), groups): x NCHW-contiguous, y NCHW; one pass.
at::Tensor shuffle_affine_gate(const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& beta, int64_t groups) {
  using namespace gate_checks;
  const char* op = "shuffle_affine_gate";
  const DType dt = check_x(op, x, c10::DeviceType::CPU);
  check_channel_param(op, "alpha", alpha, x);
  check_channel_param(op, "beta", beta, x);
  check_shuffle_args(op, x, groups);
  at::Tensor y = new_output_like(x);
  if (y.numel() > 0)
    shuffle_gate_forward_cpu(x.const_data_ptr(), alpha.const_data_ptr(), beta.const_data_ptr(), y.data_ptr(), dt,
                             x.size(0), x.size(1), x.size(2), x.size(3), groups);
  return y;
}

// The training backward of shuffle_affine_gate with alpha and beta made from per-plane statistics
// of x (see shuffle_gate_train_backward_cpu): (dx, dalpha, dbeta) in one read of dy and x, both
// NCHW-contiguous; mean (B, C) and coef (B, C, 4) in x's accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> shuffle_gate_train_backward(const at::Tensor& dy, const at::Tensor& x,
                                                                           const at::Tensor& alpha,
                                                                           const at::Tensor& beta,
                                                                           const at::Tensor& mean,
                                                                           const at::Tensor& coef, int64_t groups) {
  using namespace gate_checks;
  const char* op = "shuffle_gate_train_backward";
  const DType dt = check_x(op, x, c10::DeviceType::CPU);
  check_like_x(op, "dy", dy, x);
  check_nchw_contiguous(op, "dy", dy);
  check_channel_param(op, "alpha", alpha, x);
  check_channel_param(op, "beta", beta, x);
  check_channel_param(op, "mean", mean, x);
  check_param(op, "coef", coef, x, {x.size(0), x.size(1), 4}, "(B, C, 4)");
  check_shuffle_args(op, x, groups);
  at::Tensor dx = new_output_like(x), dal = channel_grad(x, alpha), dbe = channel_grad(x, beta);
  if (x.numel() > 0)
    shuffle_gate_train_backward_cpu(dy.const_data_ptr(), x.const_data_ptr(), alpha.const_data_ptr(),
                                    beta.const_data_ptr(), mean.const_data_ptr(), coef.const_data_ptr(), dx.data_ptr(),
                                    dal.data_ptr(), dbe.data_ptr(), dt, x.size(0), x.size(1), x.size(2), x.size(3),
                                    groups);
  return {dx, dal, dbe};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_FRAGMENT(fastattn_C, m) {
  m.def("channel_scale(Tensor x, Tensor a, Tensor? residual) -> Tensor");
  m.def("channel_scale_backward(Tensor dy, Tensor x, Tensor a) -> (Tensor, Tensor)");
  m.def("channel_spatial_gate(Tensor x, Tensor a, Tensor s, str mode) -> Tensor");
  m.def("channel_spatial_gate_backward(Tensor dy, Tensor x, Tensor a, Tensor s, str mode) -> (Tensor, Tensor, Tensor)");
  m.def("channel_affine_gate(Tensor x, Tensor alpha, Tensor beta) -> Tensor");
  m.def("channel_affine_gate_backward(Tensor dy, Tensor x, Tensor alpha, Tensor beta) -> (Tensor, Tensor, Tensor)");
  m.def("nam_train_forward(Tensor x, Tensor gamma, Tensor bias, Tensor w, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("nam_train_backward(Tensor dy, Tensor x, Tensor gamma, Tensor bias, Tensor w, float eps, Tensor mean, "
        "Tensor var, bool need_dx) -> (Tensor, Tensor, Tensor)");
  m.def("srm_train_forward(Tensor x, Tensor cfc, Tensor gamma, Tensor beta, float bn_eps, float std_eps) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("srm_train_backward(Tensor dy, Tensor x, Tensor cfc, Tensor gamma, float bn_eps, Tensor mean, Tensor std, "
        "Tensor g, Tensor zmean, Tensor zvar, bool need_dx) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("shuffle_affine_gate(Tensor x, Tensor alpha, Tensor beta, int groups) -> Tensor");
  m.def("shuffle_gate_train_backward(Tensor dy, Tensor x, Tensor alpha, Tensor beta, Tensor mean, Tensor coef, "
        "int groups) -> "
        "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("srm_train_forward", &fastattn::srm_train_forward);
  m.impl("srm_train_backward", &fastattn::srm_train_backward);
  m.impl("nam_train_forward", &fastattn::nam_train_forward);
  m.impl("nam_train_backward", &fastattn::nam_train_backward);
  m.impl("channel_scale", &fastattn::channel_scale);
  m.impl("channel_scale_backward", &fastattn::channel_scale_backward);
  m.impl("channel_spatial_gate", &fastattn::channel_spatial_gate);
  m.impl("channel_spatial_gate_backward", &fastattn::channel_spatial_gate_backward);
  m.impl("channel_affine_gate", &fastattn::channel_affine_gate);
  m.impl("channel_affine_gate_backward", &fastattn::channel_affine_gate_backward);
  m.impl("shuffle_affine_gate", &fastattn::shuffle_affine_gate);
  m.impl("shuffle_gate_train_backward", &fastattn::shuffle_gate_train_backward);
}
