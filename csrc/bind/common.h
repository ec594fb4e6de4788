// Argument checks and dtype tags shared by the torch-facing files of csrc/bind/.
// Kernels (csrc/cpu/, csrc/cuda/) never include this: they see pointers, sizes and strides only.
#pragma once

#include <torch/extension.h>

#include <cstdlib>
#include <cstring>
#ifdef __linux__
#include <sys/mman.h>
#endif

#include "../cpu/common.h"

namespace fastattn {

inline DType dtype_tag(const at::Tensor& t, const char* op, const char* arg) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, "fastattn::", op, ": argument '", arg,
                       "' must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline void check_feature_map(const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 4, "fastattn::", op, ": argument 'x' must be 4-D (B, C, H, W), got ",
                    x.dim(), "-D tensor of shape ", x.sizes());
}

// The whole-module CPU kernels walk NCHW planes: t must be NCHW-contiguous.
inline void check_nchw_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "fastattn::", op, ": argument '", name,
                    "' must be NCHW-contiguous, got strides ", t.strides());
}

// The element strides of a 4-D tensor, as the kernels take them.
inline Strides4 strides4(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// The accumulation dtype of the small per-(b, c) tensors: float64 for float64 maps, else float32.
inline at::ScalarType acc_scalar_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// new_output_like(x): a new output of x's sizes and memory format (as torch.empty_like); it and
// with_huge_page_advice(t) (for a freshly allocated, untouched t) advise the kernel to back CPU
// outputs by transparent huge pages when it spans 2 MiB pages (Linux, THP mode "madvise" or "always").
// glibc serves blocks over 32 MiB from fresh mmaps, so each such output is page-faulted in on its
// first write: with 4 KiB pages that costs more than the kernel itself (25 ms against 6 ms for a
// 103 MB fp32 map on the 2-core dev machine). torch does the same for all its CPU tensors under
// THP_MEM_ALLOC_ENABLE=1. FASTATTN_HUGEPAGES=0 turns the advice off. Only for outputs of 32 MiB
// or more (glibc's largest mmap threshold: mostly fresh mappings, though a large enough free heap
// top can still serve one): on smaller ones, which glibc often serves from its heap, the advice made a SimAM training step at 32x1024x14x14 (25.7 MB
// outputs) take 29 ms instead of 4.7 ms in 2 of 4 bench runs on the dev VM (0 of 4 without it).
inline at::Tensor with_huge_page_advice(at::Tensor t) {
#ifdef __linux__
  static const bool enabled = [] {
    const char* v = std::getenv("FASTATTN_HUGEPAGES");
    return !(v && std::strcmp(v, "0") == 0);
  }();
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const int64_t bytes = t.storage().nbytes();
  if (enabled && t.device().is_cpu() && bytes >= int64_t(32) << 20) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.storage().data());
    const uintptr_t start = (p + kHuge - 1) & ~(kHuge - 1), end = (p + bytes) & ~(kHuge - 1);
    if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);  // advice: errors ignored
  }
#endif
  return t;
}

inline at::Tensor new_output_like(const at::Tensor& x) { return with_huge_page_advice(at::empty_like(x)); }

}  // namespace fastattn
