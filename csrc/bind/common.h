// Argument checks and dtype tags shared by the torch-facing files of csrc/bind/.
// Kernels (csrc/cpu/, csrc/cuda/) never include this: they see pointers, sizes and strides only.
#pragma once

#include <torch/extension.h>

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

// The element strides of a 4-D tensor, as the kernels take them.
inline Strides4 strides4(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// The accumulation dtype of the small per-(b, c) tensors: float64 for float64 maps, else float32.
inline at::ScalarType acc_scalar_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace fastattn
