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
  pool_args::DctPlan p = pool_args::plan_dct_pool(x, weight, kCPU);
  if (p.y.numel() > 0)   // (an empty plane sums to zero: the kernel writes zeros)
    dct_pool_forward_cpu(x.data_ptr(), p.w.data_ptr(), p.y.data_ptr(), p.dt, p.B, p.C, p.H, p.W, strides4(x),
                         pool_args::strides3(p.w));
  return p.y;
}

// [dx] if need_dx (size, dy's dtype, NCHW or channels_last), then [dweight] if x is given
// (weight's shape, dtype and strides): dx = dy[b, c] * weight[c], dweight = sum_b dy[b, c] * x[b, c].
std::vector<at::Tensor> dct_pool_backward(const at::Tensor& dy, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& x, at::IntArrayRef size,
                                          bool channels_last, bool need_dx) {
  pool_args::DctGradPlan p = pool_args::plan_dct_pool_backward(dy, weight, x, size, channels_last, need_dx, kCPU);
  if (p.need_dx || p.need_dw)
    dct_pool_backward_cpu(p.g.data_ptr(), p.w.data_ptr(), p.need_dw ? p.x.data_ptr() : nullptr,
                          p.need_dx ? p.dx.data_ptr() : nullptr, p.need_dw ? p.dw_acc.data_ptr() : nullptr, p.dt, p.B,
                          p.C, p.H, p.W, p.sw, p.sx, p.sdx, p.sdw);
  return pool_args::dct_grads(p);
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
