// torch.ops.fastattn_C pointwise (1x1 conv C -> O) ops of BAM's CPU path: schemas and CPU
// registrations (kernels in csrc/cpu/pointwise.cpp). fp32, NCHW-contiguous maps only; not public
// fastattn:: ops (no fake or CUDA implementation): the module calls them in eager mode.
#include "../cpu/pointwise.h"
#include "common.h"

namespace fastattn {
namespace {

// t: a CPU float32 tensor of `dim` dimensions, NCHW-contiguous.
void check_f32(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, "fastattn::", op, ": argument '", name, "' must be ", dim, "-D, got ", t.dim(),
                    "-D tensor of shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "fastattn::", op, ": this kernel runs on CPU tensors, got '", name, "' on ",
              t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "fastattn::", op, ": argument '", name, "' must be float32, got ",
                   t.scalar_type());
  check_nchw_contiguous(op, name, t);
}

// weight (O, C) or (O, C, 1, 1) -> (O, C) for a map of C channels
at::Tensor weight_matrix(const char* op, const at::Tensor& weight, int64_t C) {
  const bool conv = weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1;
  TORCH_CHECK_VALUE((weight.dim() == 2 || conv) && weight.size(1) == C, "fastattn::", op,
                    ": argument 'weight' must have shape (O, C) or (O, C, 1, 1) with C = ", C, ", got ",
                    weight.sizes());
  const at::Tensor w = weight.reshape({weight.size(0), C});
  check_f32(op, "weight", w, 2);
  return w;
}

// (z, mean): z (B, O, H, W) = conv1x1(x, weight, bias), mean (B, C) = x.mean((2, 3)), in one read of x.
std::tuple<at::Tensor, at::Tensor> pointwise_reduce_mean(const at::Tensor& x, const at::Tensor& weight,
                                                         const c10::optional<at::Tensor>& bias) {
  const char* op = "pointwise_reduce_mean";
  check_f32(op, "x", x, 4);
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const at::Tensor w = weight_matrix(op, weight, C);
  const int64_t O = w.size(0);
  if (bias.has_value()) {
    check_f32(op, "bias", *bias, 1);
    TORCH_CHECK_VALUE(bias->size(0) == O, "fastattn::", op, ": argument 'bias' must have shape (", O, "), got ",
                      bias->sizes());
  }
  at::Tensor z = at::empty({B, O, x.size(2), x.size(3)}, x.options());
  at::Tensor mean = at::empty({B, C}, x.options());
  if (z.numel() > 0 && C > 0) {
    pointwise_reduce_mean_cpu(x.data_ptr<float>(), w.data_ptr<float>(),
                              bias.has_value() ? bias->data_ptr<float>() : nullptr, z.data_ptr<float>(),
                              mean.data_ptr<float>(), B, C, P, O);
  } else if (z.numel() > 0) {  // no input channels: the bias alone
    z.copy_(bias.has_value() ? bias->view({1, O, 1, 1}).expand_as(z) : at::zeros_like(z));
  } else if (mean.numel() > 0) {
    mean.copy_(x.mean({2, 3}));
  }
  return {z, mean};
}

// dx (B, C, H, W) = g + dmean[b, c] / (H W) + conv1x1 transposed: sum over o of weight[o, c] dz[b, o]
at::Tensor pointwise_reduce_dx(const at::Tensor& dz, const at::Tensor& weight, const c10::optional<at::Tensor>& g,
                               const c10::optional<at::Tensor>& dmean) {
  const char* op = "pointwise_reduce_dx";
  check_f32(op, "dz", dz, 4);
  TORCH_CHECK_VALUE(weight.dim() >= 2, "fastattn::", op, ": argument 'weight' must have shape (O, C) or (O, C, 1, 1), got ",
                    weight.sizes());
  const int64_t B = dz.size(0), O = dz.size(1), C = weight.size(1), H = dz.size(2), W = dz.size(3);
  const at::Tensor w = weight_matrix(op, weight, C);
  TORCH_CHECK_VALUE(w.size(0) == O, "fastattn::", op, ": argument 'dz' must have ", w.size(0),
                    " channels (weight's O), got ", O);
  const std::vector<int64_t> shape{B, C, H, W};
  if (g.has_value()) {
    check_f32(op, "g", *g, 4);
    TORCH_CHECK_VALUE(g->sizes() == at::IntArrayRef(shape), "fastattn::", op, ": argument 'g' must have shape ",
                      at::IntArrayRef(shape), ", got ", g->sizes());
  }
  if (dmean.has_value()) {
    check_f32(op, "dmean", *dmean, 2);
    TORCH_CHECK_VALUE(dmean->size(0) == B && dmean->size(1) == C, "fastattn::", op,
                      ": argument 'dmean' must have shape (", B, ", ", C, "), got ", dmean->sizes());
  }
  at::Tensor dx = new_output(shape, dz.options());
  if (dx.numel() > 0)
    pointwise_reduce_dx_cpu(dz.data_ptr<float>(), w.data_ptr<float>(), g.has_value() ? g->data_ptr<float>() : nullptr,
                            dmean.has_value() ? dmean->data_ptr<float>() : nullptr, dx.data_ptr<float>(), B, C, H * W,
                            O);
  return dx;
}

// dweight (O, C) = sum over samples and pixels of dz[b, o] x[b, c]
at::Tensor pointwise_reduce_dw(const at::Tensor& dz, const at::Tensor& x) {
  const char* op = "pointwise_reduce_dw";
  check_f32(op, "dz", dz, 4);
  check_f32(op, "x", x, 4);
  TORCH_CHECK_VALUE(dz.size(0) == x.size(0) && dz.size(2) == x.size(2) && dz.size(3) == x.size(3), "fastattn::", op,
                    ": argument 'dz' must have the batch and spatial sizes of 'x' ", x.sizes(), ", got ", dz.sizes());
  const int64_t B = x.size(0), C = x.size(1), O = dz.size(1), P = x.size(2) * x.size(3);
  at::Tensor dw = at::zeros({O, C}, x.options());
  if (dw.numel() > 0 && B * P > 0)
    pointwise_reduce_dw_cpu(dz.data_ptr<float>(), x.data_ptr<float>(), dw.data_ptr<float>(), B, C, P, O);
  return dw;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_FRAGMENT(fastattn_C, m) {
  m.def("pointwise_reduce_mean(Tensor x, Tensor weight, Tensor? bias) -> (Tensor, Tensor)");
  m.def("pointwise_reduce_dx(Tensor dz, Tensor weight, Tensor? g, Tensor? dmean) -> Tensor");
  m.def("pointwise_reduce_dw(Tensor dz, Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("pointwise_reduce_mean", &fastattn::pointwise_reduce_mean);
  m.impl("pointwise_reduce_dx", &fastattn::pointwise_reduce_dx);
  m.impl("pointwise_reduce_dw", &fastattn::pointwise_reduce_dw);
}
