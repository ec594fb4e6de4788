// torch.ops.fastattn_C pooling ops: schemas and CPU registrations (kernels in csrc/cpu/pool.cpp).
#include <limits>

#include "../cpu/pool.h"
#include "common.h"
#include "pool_args.h"

namespace fastattn {
namespace {

constexpr auto kCPU = c10::DeviceType::CPU;

// (B, C, H, W) -> (B, C): mean over H x W, fp32 accumulation.
at::Tensor channel_mean(const at::Tensor& x) {
  check_feature_map(x, "channel_mean");
  TORCH_CHECK(x.device().is_cpu(), "fastattn::channel_mean: this kernel runs on CPU tensors, got a tensor on ",
              x.device());
  const DType dt = dtype_tag(x, "channel_mean", "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({B, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (B * C == 0) return out;
  if (H * W == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());  // mean of nothing, as torch
  channel_mean_cpu(x.data_ptr(), out.data_ptr(), dt, B, C, H, W, x.stride(0), x.stride(1), x.stride(2),
                   x.stride(3));
  return out;
}

// The pooled (B, C) statistics in the order of kinds (x's dtype), then the int64 argmax if "max"
// is pooled, then the mean and std in the accumulation dtype if "std" is.
std::vector<at::Tensor> channel_pool(const at::Tensor& x, std::vector<std::string> kinds, double eps) {
  pool_args::PoolPlan p = pool_args::plan_channel_pool(x, kinds, eps, kCPU);
  if (p.B * p.C > 0) channel_pool_forward_cpu(x.data_ptr(), p.dt, p.B, p.C, p.H, p.W, strides4(x), eps, p.o);
  return p.outs;
}

// dx (size, the gradients' dtype, NCHW or channels_last) from the gradients of the pooled stats.
at::Tensor channel_pool_backward(const std::optional<at::Tensor>& dmean, const std::optional<at::Tensor>& dmax,
                                 const std::optional<at::Tensor>& dstd, const std::optional<at::Tensor>& argmax,
                                 const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& mean,
                                 const std::optional<at::Tensor>& std_, at::IntArrayRef size, bool channels_last) {
  pool_args::PoolGradPlan p =
      pool_args::plan_channel_pool_backward(dmean, dmax, dstd, argmax, x, mean, std_, size, channels_last, kCPU);
  if (p.dx.numel() == 0) return p.dx;
  const Strides4 sx = p.x.defined() ? strides4(p.x) : Strides4{0, 0, 0, 0};
  channel_pool_backward_cpu(p.x.defined() ? p.x.data_ptr() : nullptr, p.dx.data_ptr(), p.dt, p.B, p.C, p.H, p.W, sx,
                            strides4(p.dx), p.g);
  return p.dx;
}

// y[b, c] = sum_hw x * weight[c] in x's dtype.
at::Tensor dct_pool(const at::Tensor& x, const at::Tensor& weight) {
  const char* op = "dct_pool";
  check_feature_map(x, op);
  pool_args::check_device(x, op, "x", kCPU);
  const DType dt = dtype_tag(x, op, "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  pool_args::check_weight(weight, op, C, H, W, x);
  const Strides4 sx = strides4(x);
  const at::Tensor w = pool_args::weight_like(weight, acc_scalar_type(x), plane_contiguous(sx, H, W),
                                              channels_contiguous(sx, C));
  at::Tensor y = at::empty({B, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() > 0)
    dct_pool_forward_cpu(x.data_ptr(), w.data_ptr(), y.data_ptr(), dt, B, C, H, W, sx, pool_args::strides3(w));
  return y;
}

// [dx] if need_dx (size, dy's dtype, NCHW or channels_last), then [dweight] if x is given
// (weight's shape, dtype and strides): dx = dy[b, c] * weight[c], dweight = sum_b dy[b, c] * x[b, c].
std::vector<at::Tensor> dct_pool_backward(const at::Tensor& dy, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& x, at::IntArrayRef size,
                                          bool channels_last, bool need_dx) {
  const char* op = "dct_pool_backward";
  const std::vector<int64_t> sz = pool_args::check_size(size, op);
  const int64_t B = sz[0], C = sz[1], H = sz[2], W = sz[3];
  pool_args::check_device(dy, op, "dy", kCPU);
  const DType dt = dtype_tag(dy, op, "dy");
  pool_args::check_bc(dy, op, "dy", B, C, dy);
  pool_args::check_weight(weight, op, C, H, W, dy);
  if (x) {
    TORCH_CHECK_VALUE(x->sizes() == at::IntArrayRef(sz), "fastattn::", op, ": argument 'x' must have shape ", size,
                      ", got ", x->sizes());
    TORCH_CHECK_TYPE(x->scalar_type() == dy.scalar_type(), "fastattn::", op, ": argument 'x' must have the dtype of ",
                     "'dy' (", dy.scalar_type(), "), got ", x->scalar_type());
    pool_args::check_device(*x, op, "x", kCPU);
  }
  at::Tensor dx = need_dx ? at::empty(sz, dy.options().memory_format(pool_args::format(channels_last))) : at::Tensor();
  // the layout the kernels walk: x's when dweight is wanted, else dx's
  const Strides4 sref = x ? strides4(*x) : need_dx ? strides4(dx) : Strides4{0, H * W, W, 1};
  const at::ScalarType acc = acc_scalar_type(dy);
  const at::Tensor w = pool_args::weight_like(weight, acc, plane_contiguous(sref, H, W), channels_contiguous(sref, C));
  const at::Tensor g = dy.to(acc).contiguous();
  at::Tensor dw_acc, dw;
  if (x) {
    dw_acc = at::empty_like(w);
    dw = w.is_same(weight) ? dw_acc : at::empty_like(weight);
  }
  if (need_dx || x)   // (empty sizes: the kernel writes nothing, or a zero dweight for B == 0)
    dct_pool_backward_cpu(g.data_ptr(), w.data_ptr(), x ? x->data_ptr() : nullptr, need_dx ? dx.data_ptr() : nullptr,
                          x ? dw_acc.data_ptr() : nullptr, dt, B, C, H, W, pool_args::strides3(w),
                          x ? strides4(*x) : Strides4{0, 0, 0, 0}, need_dx ? strides4(dx) : Strides4{0, 0, 0, 0},
                          x ? pool_args::strides3(dw_acc) : Strides4{0, 0, 0, 0});
  std::vector<at::Tensor> outs;
  if (need_dx) outs.push_back(dx);
  if (x) {
    if (!dw.is_same(dw_acc)) dw.copy_(dw_acc);
    outs.push_back(dw);
  }
  return outs;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_FRAGMENT(fastattn_C, m) {
  m.def("channel_mean(Tensor x) -> Tensor");
  m.def("channel_pool(Tensor x, str[] kinds, float eps) -> Tensor[]");
  m.def("channel_pool_backward(Tensor? dmean, Tensor? dmax, Tensor? dstd, Tensor? argmax, Tensor? x, Tensor? mean, "
        "Tensor? std, int[] size, bool channels_last) -> Tensor");
  m.def("dct_pool(Tensor x, Tensor weight) -> Tensor");
  m.def("dct_pool_backward(Tensor dy, Tensor weight, Tensor? x, int[] size, bool channels_last, bool need_dx) "
        "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("channel_mean", &fastattn::channel_mean);
  m.impl("channel_pool", &fastattn::channel_pool);
  m.impl("channel_pool_backward", &fastattn::channel_pool_backward);
  m.impl("dct_pool", &fastattn::dct_pool);
  m.impl("dct_pool_backward", &fastattn::dct_pool_backward);
}
