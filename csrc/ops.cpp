// The torch-facing side of the CPU kernels: schemas, argument checks, CPU registrations.
// Kernels live in csrc/cpu/ and see only pointers, sizes and strides.
#include <torch/extension.h>

#include <torch/version.h>

#include <limits>
#include <string>

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

}  // namespace
}  // namespace fastattn

// Raw kernels under their own namespace: the public `fastattn::` ops (fastattn/ops/) call these
// and add the fake implementation and the autograd formula.
TORCH_LIBRARY(fastattn_C, m) {
  m.def("channel_mean(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("channel_mean", &fastattn::channel_mean);
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
