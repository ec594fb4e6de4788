// The torch-facing side of the CPU kernels: schemas, argument checks, CPU registrations.
// Kernels live in csrc/cpu/ and see only pointers, sizes and strides.
#include <torch/extension.h>

#include <torch/version.h>

#include <limits>
#include <string>

#include "cpu/gate.h"
#include "cpu/pool.h"
#include "ops_common.h"

namespace fastattn {
namespace {

// (B, C, H, W) -> (B, C): mean over H x W, fp32 accumulation.
at::Tensor channel_mean(const at::Tensor& x) {
  check_feature_map(x, "channel_mean");
  TORCH_CHECK(x.device().is_cpu(), "fastattn::channel_mean: this kernel runs on CPU tensors, got a tensor on ",
              x.device());
  const DType dt = dtype_tag(x, "channel_mean", "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({B, C}, x.options());
  if (B * C == 0) return out;
  if (H * W == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());  // mean of nothing, as torch
  channel_mean_cpu(x.data_ptr(), out.data_ptr(), dt, B, C, H, W, x.stride(0), x.stride(1), x.stride(2),
                   x.stride(3));
  return out;
}

Strides4 strides4(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Checks shared by channel_scale and its backward: x a CPU feature map, `other` (residual or dy)
// like x, a a contiguous (B, C) tensor in x's accumulation dtype (float32; float64 for float64 x).
DType check_scale_args(const char* op, const at::Tensor& x, const at::Tensor& a, const at::Tensor* other,
                       const char* other_name) {
  check_feature_map(x, op);
  TORCH_CHECK(x.device().is_cpu(), "fastattn::", op, ": this kernel runs on CPU tensors, got 'x' on ", x.device());
  const DType dt = dtype_tag(x, op, "x");
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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
  at::Tensor y = at::empty_like(x);
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
  at::Tensor dx = at::empty_like(x);
  at::Tensor da = at::zeros({x.size(0), x.size(1)}, a.options());
  if (dx.numel() == 0) return {dx, da};          // an empty plane sums to zero
  channel_scale_backward_cpu(dy.data_ptr(), x.data_ptr(), a.data_ptr(), dx.data_ptr(), da.data_ptr(), dt, x.size(0),
                             x.size(1), x.size(2), x.size(3), strides4(dy), strides4(x), strides4(dx));
  return {dx, da};
}

}  // namespace
}  // namespace fastattn

// Raw kernels under their own namespace: the public `fastattn::` ops (fastattn/ops/) call these
// and add the fake implementation and the autograd formula.
TORCH_LIBRARY(fastattn_C, m) {
  m.def("channel_mean(Tensor x) -> Tensor");
  m.def("channel_scale(Tensor x, Tensor a, Tensor? residual) -> Tensor");
  m.def("channel_scale_backward(Tensor dy, Tensor x, Tensor a) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("channel_mean", &fastattn::channel_mean);
  m.impl("channel_scale", &fastattn::channel_scale);
  m.impl("channel_scale_backward", &fastattn::channel_scale_backward);
}

namespace {
pybind11::dict build_info() {
  pybind11::dict d;
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
#ifdef FASTATTN_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  d["torch"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
               std::to_string(TORCH_VERSION_PATCH);
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#endif
  return d;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastattn compiled kernels; the ops are registered under torch.ops.fastattn_C";
  m.def("build_info", &build_info, "How this extension was built");
}
