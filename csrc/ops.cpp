// The extension module fastattn._C: the root of the private op namespace and build_info.
// Each op family registers its schemas and implementations in csrc/bind/<stem>.cpp (CPU) and
// csrc/bind/<stem>_cuda.cpp (CUDA, built only with a CUDA torch) as fragments of this library;
// the public `fastattn::` ops (fastattn/ops/) call them and add fake impls and autograd.
#include <torch/extension.h>

#include <torch/version.h>

#include <string>

#include "bind/malloc_tuning.h"
#include "bind/output_cache.h"
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
  const fastattn::LlcInfo& llc = fastattn::llc_info();
  d["llc_bytes"] = llc.bytes;   // fp32 outputs of half this or more are written with streaming stores
  d["llc_reported_bytes"] = llc.reported;
  d["llc_shared_cpus"] = llc.shared_cpus;
  d["llc_source"] = std::string(llc.source);
  d["torch"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
               std::to_string(TORCH_VERSION_PATCH);
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#endif
  d["output_cache_limit_bytes"] = fastattn::OutputCache::get().limit();   // FASTATTN_CPU_CACHE_BYTES
  d["malloc_tuned"] = fastattn::malloc_tuned();                            // FASTATTN_MALLOPT
  return d;
}

pybind11::dict output_cache_stats() {
  const auto st = fastattn::OutputCache::get().stats();
  pybind11::dict d;
  d["kept_bytes"] = st.kept_bytes;
  d["limit_bytes"] = st.limit_bytes;
  d["hits"] = st.hits;
  d["misses"] = st.misses;
  return d;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastattn compiled kernels; the ops are registered under torch.ops.fastattn_C";
  fastattn::malloc_tuned() = fastattn::tune_malloc();
  if (fastattn::llc_bytes_from_env() < 0)
    throw std::invalid_argument(std::string("fastattn: FASTATTN_LLC_BYTES must be a positive integer (bytes of "
                                            "last-level cache), got '") + std::getenv("FASTATTN_LLC_BYTES") + "'");
  m.def("build_info", &build_info, "How this extension was built");
  m.def("output_cache_stats", &output_cache_stats,
        "The CPU output cache (outputs of 8 MiB or more): bytes of freed blocks kept, the limit, hits, misses");
  m.def("empty_output_cache", [] { fastattn::OutputCache::get().empty(); },
        "Free the blocks the CPU output cache keeps (outputs in use are not affected)");
}
