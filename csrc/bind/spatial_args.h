// Argument checks, views and output allocation of the spatial ops, shared by the CPU glue
// (spatial.cpp) and the CUDA glue (spatial_cuda.cpp): both register the same raw ops.
#pragma once

#include <array>
#include <limits>
#include <optional>

#include "common.h"

namespace fastattn {
namespace spatial_args {

// A (B, C, H, W) tensor seen as (B, N, P1, P2), N the pooled dimension: dim 1 -> (B, C, H, W);
// dim 2 -> (B, H, C, W) (Triplet's permute(0, 2, 1, 3)); dim 3 -> (B, W, H, C) (permute(0, 3, 2, 1)).
struct View {
  int64_t B, N, P1, P2;
  Strides4 s;
};

inline std::array<int64_t, 4> view_dims(int64_t dim) {
  if (dim == 2) return {0, 2, 1, 3};
  if (dim == 3) return {0, 3, 2, 1};
  return {0, 1, 2, 3};
}

inline View view_of(const at::Tensor& t, int64_t dim) {
  const auto d = view_dims(dim);
  return {t.size(d[0]), t.size(d[1]), t.size(d[2]), t.size(d[3]),
          {t.stride(d[0]), t.stride(d[1]), t.stride(d[2]), t.stride(d[3])}};
}

// A channels_last tensor that is not also plain contiguous (as fastattn's is_channels_last).
inline bool is_channels_last(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

inline DType check_x(const char* op, const at::Tensor& x, c10::DeviceType dev) {
  check_feature_map(x, op);
  TORCH_CHECK(x.device().type() == dev, "fastattn::", op, ": this kernel runs on ", c10::DeviceTypeName(dev),
              " tensors, got 'x' on ", x.device());
  return dtype_tag(x, op, "x");
}

inline void check_same_device(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "fastattn::", op, ": argument '", arg, "' must be on the device of 'x' (",
              x.device(), "), got ", t.device());
}

// a: contiguous (B, C) in x's accumulation dtype, on x's device.
inline void check_a(const char* op, const at::Tensor& a, const at::Tensor& x) {
  TORCH_CHECK_VALUE(a.dim() == 2 && a.size(0) == x.size(0) && a.size(1) == x.size(1), "fastattn::", op,
                    ": argument 'a' must have shape (B, C) = (", x.size(0), ", ", x.size(1), "), got ", a.sizes());
  const at::ScalarType acc = acc_scalar_type(x);
  TORCH_CHECK_TYPE(a.scalar_type() == acc, "fastattn::", op, ": argument 'a' must be ", acc, " for 'x' of dtype ",
                   x.scalar_type(), ", got ", a.scalar_type());
  TORCH_CHECK_VALUE(a.is_contiguous(), "fastattn::", op, ": argument 'a' must be contiguous");
  check_same_device(op, "a", a, x);
}

// dy (or any operand) of x's dtype.
inline void check_like_dtype(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "fastattn::", op, ": argument '", arg,
                   "' must have the dtype of 'x' (", x.scalar_type(), "), got ", t.scalar_type());
  check_same_device(op, arg, t, x);
}

// ---- pool ------------------------------------------------------------------------------------

inline void check_pool_dim(const char* op, int64_t dim, const std::optional<at::Tensor>& a) {
  TORCH_CHECK_VALUE(dim >= 1 && dim <= 3, "fastattn::", op,
                    ": argument 'dim' must be 1, 2 or 3 (the C, H or W dimension of x), got ", dim);
  TORCH_CHECK_VALUE(!a.has_value() || dim == 1, "fastattn::", op,
                    ": argument 'a' (a channel scale) must be None when pooling over dim ", dim, " != 1");
}

struct PoolForward {
  DType dt;
  View vx;
  at::Tensor y, idx;   // y (B, 2, P1, P2): x's memory format for dim 1, contiguous otherwise; idx (B, P1 * P2) int32
};

inline PoolForward pool_forward_setup(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& a,
                                      int64_t dim, c10::DeviceType dev) {
  const DType dt = check_x(op, x, dev);
  check_pool_dim(op, dim, a);
  if (a.has_value()) check_a(op, *a, x);
  const View v = view_of(x, dim);
  const auto fmt = dim == 1 && is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor y = at::empty({v.B, 2, v.P1, v.P2}, x.options().memory_format(fmt));
  at::Tensor idx = at::empty({v.B, v.P1 * v.P2}, x.options().dtype(at::kInt));
  TORCH_CHECK_VALUE(y.numel() == 0 || v.N > 0, "fastattn::", op, ": argument 'x' must have a non-empty dimension ",
                    dim, " to pool over, got shape ", x.sizes());
  TORCH_CHECK_VALUE(v.N <= std::numeric_limits<int32_t>::max(), "fastattn::", op, ": dimension ", dim,
                    " of 'x' must be below 2^31 (the argmax is int32), got ", v.N);
  return {dt, v, y, idx};
}

struct PoolBackward {
  DType dt;
  View vx, vdx;
  at::Tensor dx, da;   // dx like torch.empty_like(x); da (B, C) zeros in the accumulation dtype, or (0,)
};

inline PoolBackward pool_backward_setup(const char* op, const at::Tensor& dy, const at::Tensor& x,
                                        const std::optional<at::Tensor>& a, const at::Tensor& idx, int64_t dim,
                                        c10::DeviceType dev) {
  const DType dt = check_x(op, x, dev);
  check_pool_dim(op, dim, a);
  if (a.has_value()) check_a(op, *a, x);
  const View v = view_of(x, dim);
  TORCH_CHECK_VALUE(dy.dim() == 4 && dy.size(0) == v.B && dy.size(1) == 2 && dy.size(2) == v.P1 &&
                        dy.size(3) == v.P2,
                    "fastattn::", op, ": argument 'dy' must have shape (B, 2, ", v.P1, ", ", v.P2, ") = (", v.B,
                    ", 2, ", v.P1, ", ", v.P2, "), got ", dy.sizes());
  check_like_dtype(op, "dy", dy, x);
  TORCH_CHECK_VALUE(idx.dim() == 2 && idx.size(0) == v.B && idx.size(1) == v.P1 * v.P2, "fastattn::", op,
                    ": argument 'idx' must have shape (B, P) = (", v.B, ", ", v.P1 * v.P2, "), got ", idx.sizes());
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kInt, "fastattn::", op, ": argument 'idx' must be int32, got ",
                   idx.scalar_type());
  TORCH_CHECK_VALUE(idx.is_contiguous(), "fastattn::", op, ": argument 'idx' must be contiguous");
  check_same_device(op, "idx", idx, x);
  TORCH_CHECK_VALUE(v.N <= std::numeric_limits<int32_t>::max(), "fastattn::", op, ": dimension ", dim,
                    " of 'x' must be below 2^31, got ", v.N);
  at::Tensor dx = new_output_like(x);
  at::Tensor da = a.has_value() ? at::zeros({v.B, v.N}, a->options())
                                : at::empty({0}, x.options().dtype(acc_scalar_type(x)));
  return {dt, v, view_of(dx, dim), dx, da};
}

// ---- scale -----------------------------------------------------------------------------------

// s: contiguous (B, 1, H, W) in x's accumulation dtype, on x's device.
inline void check_s(const char* op, const at::Tensor& s, const at::Tensor& x) {
  TORCH_CHECK_VALUE(s.dim() == 4 && s.size(0) == x.size(0) && s.size(1) == 1 && s.size(2) == x.size(2) &&
                        s.size(3) == x.size(3),
                    "fastattn::", op, ": argument 's' must have shape (B, 1, H, W) = (", x.size(0), ", 1, ",
                    x.size(2), ", ", x.size(3), "), got ", s.sizes());
  const at::ScalarType acc = acc_scalar_type(x);
  TORCH_CHECK_TYPE(s.scalar_type() == acc, "fastattn::", op, ": argument 's' must be ", acc, " for 'x' of dtype ",
                   x.scalar_type(), ", got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.is_contiguous(), "fastattn::", op, ": argument 's' must be contiguous");
  check_same_device(op, "s", s, x);
}

inline DType scale_setup(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& a,
                         const at::Tensor& s, c10::DeviceType dev) {
  const DType dt = check_x(op, x, dev);
  if (a.has_value()) check_a(op, *a, x);
  check_s(op, s, x);
  return dt;
}

struct ScaleBackward {
  DType dt;
  at::Tensor dx, da, ds;   // dx like torch.empty_like(x); da (B, C) or (0,); ds (B, 1, H, W) contiguous
};

inline ScaleBackward scale_backward_setup(const char* op, const at::Tensor& dy, const at::Tensor& x,
                                          const std::optional<at::Tensor>& a, const at::Tensor& s,
                                          c10::DeviceType dev) {
  const DType dt = scale_setup(op, x, a, s, dev);
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), "fastattn::", op, ": argument 'dy' must have the shape of 'x' ",
                    x.sizes(), ", got ", dy.sizes());
  check_like_dtype(op, "dy", dy, x);
  const auto acc = x.options().dtype(acc_scalar_type(x));
  const bool empty = x.numel() == 0;   // sums over nothing are zero
  at::Tensor dx = new_output_like(x);
  at::Tensor da = !a.has_value() ? at::empty({0}, acc)
                  : empty        ? at::zeros({x.size(0), x.size(1)}, acc)
                                 : at::empty({x.size(0), x.size(1)}, acc);
  at::Tensor ds = empty ? at::zeros({x.size(0), 1, x.size(2), x.size(3)}, acc)
                        : at::empty({x.size(0), 1, x.size(2), x.size(3)}, acc);
  return {dt, dx, da, ds};
}

}  // namespace spatial_args
}  // namespace fastattn
