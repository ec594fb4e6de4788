// Argument checks and dtype tags shared by the torch-facing files of csrc/bind/.
// Kernels (csrc/cpu/, csrc/cuda/) never include this: they see pointers, sizes and strides only.
#pragma once

#include <c10/util/strides.h>
#include <torch/extension.h>

#include <cstdlib>
#include <cstring>

#include "../cpu/common.h"
#include "output_cache.h"

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

// A new output of `sizes` in the memory format of `options` (contiguous when it names none); large
// CPU outputs come from the output cache (output_cache.h).
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const auto fmt = options.memory_format_opt().value_or(at::MemoryFormat::Contiguous);
  const c10::DimVector strides = fmt == at::MemoryFormat::ChannelsLast && sizes.size() == 4
                                     ? c10::DimVector(c10::get_channels_last_strides_2d(sizes))
                                     : c10::contiguous_strides(sizes);
  return new_output(sizes, strides, options.memory_format(std::nullopt));
}

// A new output of x's sizes and layout, as torch.empty_like(x): x's strides when x is dense, else
// contiguous in x's suggested memory format.
inline at::Tensor new_output_like(const at::Tensor& x) {
  if (x.is_non_overlapping_and_dense()) return new_output(x.sizes(), x.strides(), x.options());
  return new_output(x.sizes(), x.options().memory_format(x.suggest_memory_format()));
}

}  // namespace fastattn
