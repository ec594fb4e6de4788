// Argument checks and output allocation of the pooling ops (channel_pool, dct_pool, bin_mean),
// shared by their CPU glue (pool.cpp, bins.cpp) and CUDA glue (pool_cuda.cpp, bins_cuda.cpp) so
// that both devices accept and refuse exactly the same inputs with the same messages.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "../cpu/bins.h"
#include "../cpu/pool.h"
#include "common.h"

namespace fastattn {
namespace pool_args {

inline void check_device(const at::Tensor& t, const char* op, const char* arg, c10::DeviceType dev) {
  TORCH_CHECK(t.device().type() == dev, "fastattn::", op, ": argument '", arg, "' must be a ",
              c10::DeviceTypeName(dev, /*lower_case=*/true), " tensor for this kernel, got a tensor on ", t.device());
}

// (B, C) tensor of a floating dtype on `like`'s device.
inline void check_bc(const at::Tensor& t, const char* op, const char* arg, int64_t B, int64_t C,
                     const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == B && t.size(1) == C, "fastattn::", op, ": argument '", arg,
                    "' must have shape (B, C) = (", B, ", ", C, "), got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), "fastattn::", op, ": argument '", arg, "' must be on ", like.device(),
              ", got ", t.device());
}

inline void check_float(const at::Tensor& t, const char* op, const char* arg) { (void)dtype_tag(t, op, arg); }

inline std::vector<int64_t> check_size(at::IntArrayRef size, const char* op) {
  TORCH_CHECK_VALUE(size.size() == 4, "fastattn::", op, ": argument 'size' must be 4 sizes (B, C, H, W), got ", size);
  for (int64_t s : size)
    TORCH_CHECK_VALUE(s >= 0, "fastattn::", op, ": argument 'size' must hold sizes >= 0, got ", size);
  return size.vec();
}

inline at::MemoryFormat format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// ---------------------------------------------------------------------------------------------
// channel_pool
// ---------------------------------------------------------------------------------------------

// The outputs of channel_pool, as the public op returns them: one (B, C) tensor per kind in x's
// dtype, then the int64 argmax when "max" is pooled, then the mean and std in the accumulation
// dtype when "std" is. `o` points the kernel at them.
struct PoolPlan {
  DType dt;
  int64_t B, C, H, W;
  std::vector<at::Tensor> outs;
  PoolOutputs o;
};

inline PoolPlan plan_channel_pool(const at::Tensor& x, const std::vector<std::string>& kinds, double eps,
                                  c10::DeviceType dev) {
  const char* op = "channel_pool";
  check_feature_map(x, op);
  check_device(x, op, "x", dev);
  PoolPlan p;
  p.dt = dtype_tag(x, op, "x");
  p.B = x.size(0), p.C = x.size(1), p.H = x.size(2), p.W = x.size(3);
  bool seen[3] = {false, false, false};
  TORCH_CHECK_VALUE(!kinds.empty(), "fastattn::", op, ": argument 'kinds' must name at least one of mean, max, std");
  for (const std::string& k : kinds) {
    const int i = k == "mean" ? 0 : k == "max" ? 1 : k == "std" ? 2 : -1;
    TORCH_CHECK_VALUE(i >= 0, "fastattn::", op, ": argument 'kinds' must hold names from (mean, max, std), got '", k,
                      "'");
    TORCH_CHECK_VALUE(!seen[i], "fastattn::", op, ": argument 'kinds' must hold distinct names, got '", k,
                      "' twice");
    seen[i] = true;
  }
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "fastattn::", op,
                    ": argument 'eps' must be a finite number >= 0, got ", eps);
  const int64_t HW = p.H * p.W;
  TORCH_CHECK_VALUE(!seen[1] || HW >= 1, "fastattn::", op, ": argument 'x' must have H * W >= 1 for kind 'max', ",
                    "got H x W = ", p.H, " x ", p.W);
  TORCH_CHECK_VALUE(!seen[2] || HW >= 2, "fastattn::", op,
                    ": argument 'x' must have H * W >= 2 for kind 'std' (unbiased variance), got H x W = ", p.H,
                    " x ", p.W);
  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  const auto acc = opts.dtype(acc_scalar_type(x));
  for (const std::string& k : kinds) {
    at::Tensor t = at::empty({p.B, p.C}, opts);
    (k == "mean" ? p.o.mean : k == "max" ? p.o.max : p.o.std) = t.data_ptr();
    p.outs.push_back(t);
  }
  if (seen[1]) {
    at::Tensor t = at::empty({p.B, p.C}, opts.dtype(at::kLong));
    p.o.argmax = t.data_ptr<int64_t>();
    p.outs.push_back(t);
  }
  if (seen[2]) {
    at::Tensor m = at::empty({p.B, p.C}, acc), s = at::empty({p.B, p.C}, acc);
    p.o.mean_acc = m.data_ptr();
    p.o.std_acc = s.data_ptr();
    p.outs.push_back(m);
    p.outs.push_back(s);
  }
  return p;
}

// The backward's (B, C) inputs, converted to the accumulation dtype and made contiguous (small
// tensors), kept alive here while the kernel reads them; dx allocated in the requested format.
struct PoolGradPlan {
  DType dt;
  int64_t B, C, H, W;
  at::Tensor dmean, dmax, argmax, dstd, mean, std, x, dx;
  PoolGrads g;
};

inline PoolGradPlan plan_channel_pool_backward(const std::optional<at::Tensor>& dmean,
                                               const std::optional<at::Tensor>& dmax,
                                               const std::optional<at::Tensor>& dstd,
                                               const std::optional<at::Tensor>& argmax,
                                               const std::optional<at::Tensor>& x,
                                               const std::optional<at::Tensor>& mean,
                                               const std::optional<at::Tensor>& std_,
                                               at::IntArrayRef size, bool channels_last, c10::DeviceType dev) {
  const char* op = "channel_pool_backward";
  PoolGradPlan p;
  const std::vector<int64_t> sz = check_size(size, op);
  p.B = sz[0], p.C = sz[1], p.H = sz[2], p.W = sz[3];
  const at::Tensor* first = dmean ? &*dmean : dmax ? &*dmax : dstd ? &*dstd : nullptr;
  TORCH_CHECK_VALUE(first != nullptr, "fastattn::", op, ": at least one of 'dmean', 'dmax', 'dstd' must be given");
  check_device(*first, op, dmean ? "dmean" : dmax ? "dmax" : "dstd", dev);
  p.dt = dtype_tag(*first, op, dmean ? "dmean" : dmax ? "dmax" : "dstd");
  const at::ScalarType acc = acc_scalar_type(*first);
  auto grad = [&](const std::optional<at::Tensor>& t, const char* name) {
    check_bc(*t, op, name, p.B, p.C, *first);
    TORCH_CHECK_TYPE(t->scalar_type() == first->scalar_type(), "fastattn::", op, ": argument '", name,
                     "' must have the dtype of the other gradients (", first->scalar_type(), "), got ",
                     t->scalar_type());
    return t->to(acc).contiguous();
  };
  const int64_t HW = p.H * p.W;
  if (dmean) {
    p.dmean = grad(dmean, "dmean");
    p.g.dmean = p.dmean.data_ptr();
  }
  if (dmax) {
    p.dmax = grad(dmax, "dmax");
    TORCH_CHECK_VALUE(argmax.has_value(), "fastattn::", op, ": argument 'argmax' must be given with 'dmax'");
    check_bc(*argmax, op, "argmax", p.B, p.C, *first);
    TORCH_CHECK_TYPE(argmax->scalar_type() == at::kLong || argmax->scalar_type() == at::kInt, "fastattn::", op,
                     ": argument 'argmax' must be int64 or int32, got ", argmax->scalar_type());
    p.argmax = argmax->to(at::kLong).contiguous();
    if (dev == c10::DeviceType::CPU && p.argmax.numel() > 0) {   // on CUDA the kernel skips bad indices
      const bool bad = (p.argmax.lt(0) | p.argmax.ge(HW)).any().item<bool>();
      TORCH_CHECK_VALUE(!bad, "fastattn::", op, ": argument 'argmax' must hold flat indices in [0, H * W = ", HW,
                        ")");
    }
    p.g.dmax = p.dmax.data_ptr();
    p.g.argmax = p.argmax.data_ptr<int64_t>();
  }
  if (dstd) {
    p.dstd = grad(dstd, "dstd");
    TORCH_CHECK_VALUE(x.has_value() && mean.has_value() && std_.has_value(), "fastattn::", op,
                      ": arguments 'x', 'mean' and 'std' must be given with 'dstd'");
    TORCH_CHECK_VALUE(HW >= 2, "fastattn::", op, ": argument 'size' must have H * W >= 2 with 'dstd', got ", size);
    TORCH_CHECK_VALUE(x->sizes() == at::IntArrayRef(sz), "fastattn::", op, ": argument 'x' must have shape ", size,
                      ", got ", x->sizes());
    TORCH_CHECK_TYPE(x->scalar_type() == first->scalar_type(), "fastattn::", op,
                     ": argument 'x' must have the dtype of the gradients (", first->scalar_type(), "), got ",
                     x->scalar_type());
    TORCH_CHECK(x->device() == first->device(), "fastattn::", op, ": argument 'x' must be on ", first->device(),
                ", got ", x->device());
    check_bc(*mean, op, "mean", p.B, p.C, *first);
    check_bc(*std_, op, "std", p.B, p.C, *first);
    check_float(*mean, op, "mean");
    check_float(*std_, op, "std");
    p.x = *x;
    p.mean = mean->to(acc).contiguous();
    p.std = std_->to(acc).contiguous();
    p.g.dstd = p.dstd.data_ptr();
    p.g.mean = p.mean.data_ptr();
    p.g.std = p.std.data_ptr();
  }
  p.dx = new_output(sz, first->options().memory_format(format(channels_last)));
  return p;
}

// ---------------------------------------------------------------------------------------------
// dct_pool
// ---------------------------------------------------------------------------------------------

// w (C, H, W) in the accumulation dtype, laid out as `like` (B, C, H, W) (H x W planes contiguous,
// or channels contiguous) so that the kernels read it with unit stride alongside x: w itself when
// it already is, else one copy of C * H * W elements (a B-th of x).
inline at::Tensor weight_like(const at::Tensor& w, at::ScalarType acc, bool plane_layout, bool channel_layout) {
  at::Tensor wa = w.to(acc);
  const int64_t C = w.size(0), H = w.size(1), W = w.size(2);
  const Strides4 s{0, wa.stride(0), wa.stride(1), wa.stride(2)};
  if (plane_layout && !plane_contiguous(s, H, W)) return wa.contiguous();
  if (channel_layout && !channels_contiguous(s, C)) return wa.permute({1, 2, 0}).contiguous().permute({2, 0, 1});
  return wa;
}

inline Strides4 strides3(const at::Tensor& w) { return {0, w.stride(0), w.stride(1), w.stride(2)}; }

inline void check_weight(const at::Tensor& w, const char* op, int64_t C, int64_t H, int64_t W, const at::Tensor& like) {
  TORCH_CHECK_VALUE(w.dim() == 3 && w.size(0) == C && w.size(1) == H && w.size(2) == W, "fastattn::", op,
                    ": argument 'weight' must have shape (C, H, W) = (", C, ", ", H, ", ", W, "), got ", w.sizes());
  check_float(w, op, "weight");
  TORCH_CHECK(w.device() == like.device(), "fastattn::", op, ": argument 'weight' must be on ", like.device(),
              ", got ", w.device());
}

struct DctPlan {
  DType dt;
  int64_t B, C, H, W;
  at::Tensor w, y;                    // w: the weight in the accumulation dtype, laid out like x
};

inline DctPlan plan_dct_pool(const at::Tensor& x, const at::Tensor& weight, c10::DeviceType dev) {
  const char* op = "dct_pool";
  check_feature_map(x, op);
  check_device(x, op, "x", dev);
  DctPlan p;
  p.dt = dtype_tag(x, op, "x");
  p.B = x.size(0), p.C = x.size(1), p.H = x.size(2), p.W = x.size(3);
  check_weight(weight, op, p.C, p.H, p.W, x);
  const Strides4 sx = strides4(x);
  p.w = weight_like(weight, acc_scalar_type(x), plane_contiguous(sx, p.H, p.W), channels_contiguous(sx, p.C));
  p.y = at::empty({p.B, p.C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  return p;
}

struct DctGradPlan {
  DType dt;
  int64_t B, C, H, W;
  bool need_dx, need_dw;
  at::Tensor g, w, x, dx, dw_acc, dw;  // dw_acc: the kernel's dweight (w's layout); dw: weight's
  Strides4 sw, sx, sdx, sdw;
};

inline DctGradPlan plan_dct_pool_backward(const at::Tensor& dy, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& x, at::IntArrayRef size, bool channels_last,
                                          bool need_dx, c10::DeviceType dev) {
  const char* op = "dct_pool_backward";
  DctGradPlan p;
  const std::vector<int64_t> sz = check_size(size, op);
  p.B = sz[0], p.C = sz[1], p.H = sz[2], p.W = sz[3];
  check_device(dy, op, "dy", dev);
  p.dt = dtype_tag(dy, op, "dy");
  check_bc(dy, op, "dy", p.B, p.C, dy);
  check_weight(weight, op, p.C, p.H, p.W, dy);
  if (x) {
    TORCH_CHECK_VALUE(x->sizes() == at::IntArrayRef(sz), "fastattn::", op, ": argument 'x' must have shape ", size,
                      ", got ", x->sizes());
    TORCH_CHECK_TYPE(x->scalar_type() == dy.scalar_type(), "fastattn::", op, ": argument 'x' must have the dtype of ",
                     "'dy' (", dy.scalar_type(), "), got ", x->scalar_type());
    TORCH_CHECK(x->device() == dy.device(), "fastattn::", op, ": argument 'x' must be on ", dy.device(), ", got ",
                x->device());
    p.x = *x;
  }
  p.need_dx = need_dx;
  p.need_dw = x.has_value();
  if (need_dx) p.dx = new_output(sz, dy.options().memory_format(format(channels_last)));
  // the layout the kernels walk: x's when dweight is wanted, else dx's
  const Strides4 sref = p.need_dw ? strides4(p.x) : need_dx ? strides4(p.dx) : Strides4{0, p.H * p.W, p.W, 1};
  const at::ScalarType acc = acc_scalar_type(dy);
  p.w = weight_like(weight, acc, plane_contiguous(sref, p.H, p.W), channels_contiguous(sref, p.C));
  p.g = dy.to(acc).contiguous();
  if (p.need_dw) {
    p.dw_acc = at::empty_like(p.w);
    p.dw = p.w.is_same(weight) ? p.dw_acc : at::empty_like(weight);
  }
  const Strides4 none{0, 0, 0, 0};
  p.sw = strides3(p.w);
  p.sx = p.need_dw ? strides4(p.x) : none;
  p.sdx = need_dx ? strides4(p.dx) : none;
  p.sdw = p.need_dw ? strides3(p.dw_acc) : none;
  return p;
}

// [dx] if wanted, then [dweight] (in weight's dtype and strides) if x was given.
inline std::vector<at::Tensor> dct_grads(DctGradPlan& p) {
  std::vector<at::Tensor> outs;
  if (p.need_dx) outs.push_back(p.dx);
  if (p.need_dw) {
    if (p.B == 0) p.dw_acc.zero_();       // an empty batch sums to zero
    if (!p.dw.is_same(p.dw_acc)) p.dw.copy_(p.dw_acc);
    outs.push_back(p.dw);
  }
  return outs;
}

// ---------------------------------------------------------------------------------------------
// bin_mean
// ---------------------------------------------------------------------------------------------

inline bool check_bin_mode(c10::string_view mode, const char* op) {
  TORCH_CHECK_VALUE(mode == "adaptive" || mode == "tiles", "fastattn::", op,
                    ": argument 'mode' must be 'adaptive' or 'tiles', got '", std::string(mode), "'");
  return mode == "tiles";
}

inline std::vector<int64_t> bin_table(int64_t H, int64_t W, at::IntArrayRef levels, c10::string_view mode,
                                      const char* op, const char* arg = "x") {
  const bool tiles = check_bin_mode(mode, op);
  TORCH_CHECK_VALUE(!levels.empty() && (!tiles || levels.size() == 1), "fastattn::", op, ": argument 'levels' must be ",
                    tiles ? "one tile size k" : "a non-empty list of output sizes", " for mode '", std::string(mode),
                    "', got ", levels);
  for (int64_t n : levels)
    TORCH_CHECK_VALUE(n >= 1, "fastattn::", op, ": argument 'levels' must hold positive sizes, got ", levels);
  TORCH_CHECK_VALUE(H >= 1 && W >= 1, "fastattn::", op,
                    ": argument '", arg, "' must have H >= 1 and W >= 1 (every bin non-empty), got H x W = ", H, " x ", W);
  return bin_geometry_table(H, W, levels.data(), static_cast<int64_t>(levels.size()), tiles);
}

}  // namespace pool_args
}  // namespace fastattn
