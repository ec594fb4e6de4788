// The extension module fastattn._C: the root of the private op namespace and build_info.
// Each op family registers its schemas and implementations in csrc/bind/<stem>.cpp (CPU) and
// csrc/bind/<stem>_cuda.cpp (CUDA, built only with a CUDA torch) as fragments of this library;
// the public `fastattn::` ops (fastattn/ops/) call them and add fake impls and autograd.
#include <torch/extension.h>

#include <torch/version.h>

#include <string>

#include "cpu/stream.h"

TORCH_LIBRARY(fastattn_C, m) {}

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
  d["llc_bytes"] = fastattn::llc_bytes();     // outputs of 2x this are written with streaming stores
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
