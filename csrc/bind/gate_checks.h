// Argument checks of the gate ops, shared by the CPU glue (gate.cpp) and the CUDA glue
// (gate_cuda.cpp): every message names the op, the argument, what was expected and what was given.
#pragma once

#include <string>

#include "../cpu/gate.h"
#include "common.h"

namespace fastattn {
namespace gate_checks {

// x: a 4-D float feature map on a device of type `dev`; returns its dtype tag.
inline DType check_x(const char* op, const at::Tensor& x, c10::DeviceType dev) {
  check_feature_map(x, op);
  TORCH_CHECK(x.device().type() == dev, "fastattn::", op, ": this kernel runs on ", c10::DeviceTypeName(dev),
              " tensors, got 'x' on ", x.device());
  return dtype_tag(x, op, "x");
}

// A per-(b, c) or per-(b, h, w) parameter: the given shape, x's accumulation dtype (float32; float64
// for float64 x), contiguous, on x's device.
inline void check_param(const char* op, const char* name, const at::Tensor& p, const at::Tensor& x,
                        at::IntArrayRef shape, const char* shape_name) {
  TORCH_CHECK_VALUE(p.sizes() == shape, "fastattn::", op, ": argument '", name, "' must have shape ", shape_name,
                    " = ", shape, ", got ", p.sizes());
  const at::ScalarType acc = acc_scalar_type(x);
  TORCH_CHECK_TYPE(p.scalar_type() == acc, "fastattn::", op, ": argument '", name, "' must be ", acc,
                   " for 'x' of dtype ", x.scalar_type(), ", got ", p.scalar_type());
  TORCH_CHECK_VALUE(p.is_contiguous(), "fastattn::", op, ": argument '", name, "' must be contiguous");
  TORCH_CHECK(p.device() == x.device(), "fastattn::", op, ": argument '", name, "' must be on the device of 'x' (",
              x.device(), "), got ", p.device());
}

inline void check_channel_param(const char* op, const char* name, const at::Tensor& p, const at::Tensor& x) {
  check_param(op, name, p, x, {x.size(0), x.size(1)}, "(B, C)");
}

inline void check_pixel_param(const char* op, const char* name, const at::Tensor& p, const at::Tensor& x) {
  check_param(op, name, p, x, {x.size(0), 1, x.size(2), x.size(3)}, "(B, 1, H, W)");
}

// dy or residual: x's shape, dtype and device (any strides).
inline void check_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), "fastattn::", op, ": argument '", name, "' must have the shape of 'x' ",
                    x.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "fastattn::", op, ": argument '", name,
                   "' must have the dtype of 'x' (", x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fastattn::", op, ": argument '", name, "' must be on the device of 'x' (",
              x.device(), "), got ", t.device());
}

inline CombineMode parse_mode(const char* op, c10::string_view mode) {
  if (mode == "max") return CombineMode::Max;
  if (mode == "add") return CombineMode::Add;
  if (mode == "bam") return CombineMode::Bam;
  if (mode == "bam_sum") return CombineMode::BamSum;
  TORCH_CHECK_VALUE(false, "fastattn::", op, ": argument 'mode' must be one of 'max', 'add', 'bam', 'bam_sum', got '",
                    std::string(mode.data(), mode.size()), "'");
}

// The (B, C) gradient of a channel parameter and the (B, 1, H, W) one of a pixel parameter; zeros
// when x is empty (a sum over nothing), else left for the kernel to fill.
inline at::Tensor channel_grad(const at::Tensor& x, const at::Tensor& p) {
  return x.numel() == 0 ? at::zeros({x.size(0), x.size(1)}, p.options()) : at::empty({x.size(0), x.size(1)}, p.options());
}
inline at::Tensor pixel_grad(const at::Tensor& x, const at::Tensor& p) {
  const std::vector<int64_t> shape{x.size(0), 1, x.size(2), x.size(3)};
  return x.numel() == 0 ? at::zeros(shape, p.options()) : at::empty(shape, p.options());
}

}  // namespace gate_checks
}  // namespace fastattn
