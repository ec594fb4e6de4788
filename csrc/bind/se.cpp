// torch.ops.fastattn_C.se_forward / eca_forward: squeeze-excite and ECA inference in one read of x
// (CPU; kernels in csrc/cpu/se.cpp). No backward: fastattn.SqueezeExcite and fastattn.ECA use them
// only where no gradient is recorded.
#include "../cpu/se.h"
#include "common.h"

namespace fastattn {
namespace {

void check_weight(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  const bool shape_ok = cols ? (t.dim() == 2 && t.size(0) == rows && t.size(1) == cols) : (t.dim() == 1 && t.size(0) == rows);
  TORCH_CHECK_VALUE(shape_ok, "fastattn::se_forward: argument '", name, "' must have shape (", rows,
                    cols ? ", " + std::to_string(cols) : std::string(""), "), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "fastattn::se_forward: argument '", name,
                   "' must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), "fastattn::se_forward: argument '", name, "' must be contiguous");
  TORCH_CHECK(t.device().is_cpu(), "fastattn::se_forward: argument '", name, "' must be a CPU tensor, got ",
              t.device());
}

// y = x * sigmoid(w2 relu(w1 mean_hw(x) + b1) + b2) (+ residual); y like torch.empty_like(x).
at::Tensor se_forward(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                      const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                      const std::optional<at::Tensor>& residual) {
  check_feature_map(x, "se_forward");
  TORCH_CHECK(x.device().is_cpu(), "fastattn::se_forward: this kernel runs on CPU tensors, got 'x' on ", x.device());
  const DType dt = dtype_tag(x, "se_forward", "x");
  TORCH_CHECK_TYPE(dt != DType::Float64, "fastattn::se_forward: argument 'x' must be float32, float16 or bfloat16, got ",
                   x.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(w1.dim() == 2, "fastattn::se_forward: argument 'w1' must be 2-D (hidden, C), got ", w1.sizes());
  const int64_t hidden = w1.size(0);
  check_weight(w1, "w1", hidden, C);
  check_weight(w2, "w2", C, hidden);
  if (b1) check_weight(*b1, "b1", hidden, 0);
  if (b2) check_weight(*b2, "b2", C, 0);
  const at::Tensor* r = residual.has_value() ? &*residual : nullptr;
  if (r) {
    TORCH_CHECK_VALUE(r->sizes() == x.sizes(), "fastattn::se_forward: argument 'residual' must have the shape of 'x' ",
                      x.sizes(), ", got ", r->sizes());
    TORCH_CHECK_TYPE(r->scalar_type() == x.scalar_type(), "fastattn::se_forward: argument 'residual' must have the "
                     "dtype of 'x' (", x.scalar_type(), "), got ", r->scalar_type());
    TORCH_CHECK(r->device().is_cpu(), "fastattn::se_forward: argument 'residual' must be a CPU tensor, got ",
                r->device());
  }
  at::Tensor y = new_output_like(x);
  if (y.numel() == 0) return y;
  TORCH_CHECK_VALUE(x.size(2) * x.size(3) > 0, "fastattn::se_forward: argument 'x' must have H * W >= 1");
  se_forward_cpu(x.data_ptr(), r ? r->data_ptr() : nullptr, y.data_ptr(), dt, x.size(0), C, x.size(2), x.size(3),
                 strides4(x), r ? strides4(*r) : Strides4{0, 0, 0, 0}, strides4(y), w1.data_ptr<float>(),
                 b1 ? b1->data_ptr<float>() : nullptr, w2.data_ptr<float>(), b2 ? b2->data_ptr<float>() : nullptr,
                 hidden);
  return y;
}

// y = x * sigmoid(conv1d over the channels of mean_hw(x)); weight (k,) float32, k odd.
at::Tensor eca_forward(const at::Tensor& x, const at::Tensor& weight) {
  check_feature_map(x, "eca_forward");
  TORCH_CHECK(x.device().is_cpu(), "fastattn::eca_forward: this kernel runs on CPU tensors, got 'x' on ", x.device());
  const DType dt = dtype_tag(x, "eca_forward", "x");
  TORCH_CHECK_TYPE(dt != DType::Float64, "fastattn::eca_forward: argument 'x' must be float32, float16 or bfloat16, "
                   "got ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) % 2 == 1, "fastattn::eca_forward: argument 'weight' must be "
                    "1-D with an odd number of taps, got shape ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat, "fastattn::eca_forward: argument 'weight' must be float32, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.is_contiguous() && weight.device().is_cpu(),
                    "fastattn::eca_forward: argument 'weight' must be a contiguous CPU tensor");
  at::Tensor y = new_output_like(x);
  if (y.numel() == 0) return y;
  eca_forward_cpu(x.data_ptr(), y.data_ptr(), dt, x.size(0), x.size(1), x.size(2), x.size(3), strides4(x),
                  strides4(y), weight.data_ptr<float>(), weight.size(0));
  return y;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_FRAGMENT(fastattn_C, m) {
  m.def("se_forward(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor? residual) -> Tensor");
  m.def("eca_forward(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("se_forward", &fastattn::se_forward);
  m.impl("eca_forward", &fastattn::eca_forward);
}
