// CUDA registrations of the pooling ops (torch.ops.fastattn_C.*), built only with a CUDA torch.
// Device guard, current stream and workspaces (from torch's caching allocator) here; the kernels
// in csrc/cuda/ see pointers and a stream only. Arguments are checked by the same code as on the
// CPU (pool_args.h).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "../cuda/pool.h"
#include "common.h"
#include "pool_args.h"

namespace fastattn {
namespace {

constexpr auto kCUDA = c10::DeviceType::CUDA;

void check_launch(cudaError_t err, const char* op, const at::Tensor& x) {
  TORCH_CHECK(err == cudaSuccess, "fastattn::", op, ": CUDA launch failed for a tensor of shape ", x.sizes(), ": ",
              cudaGetErrorString(err));
}

// A device buffer of `bytes` (none for 0), 16-byte aligned by the caching allocator.
at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  if (bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte).memory_format(at::MemoryFormat::Contiguous));
}

void* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

at::Tensor channel_mean_cuda_op(const at::Tensor& x) {
  check_feature_map(x, "channel_mean");
  TORCH_CHECK(x.is_cuda(), "fastattn::channel_mean: this kernel runs on CUDA tensors, got a tensor on ", x.device());
  const DType dt = dtype_tag(x, "channel_mean", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({B, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (B * C == 0) return out;
  if (H * W == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());
  PoolOutputs o;
  o.mean = out.data_ptr();
  const Strides4 sx = strides4(x);
  const size_t bytes = channel_pool_workspace_bytes(dt, B, C, H, W, sx, false, false);
  const at::Tensor ws = workspace(bytes, x);
  check_launch(channel_pool_forward_cuda(x.data_ptr(), dt, B, C, H, W, sx, 0.0, o, ptr(ws), bytes,
                                         c10::cuda::getCurrentCUDAStream()),
               "channel_mean", x);
  return out;
}

std::vector<at::Tensor> channel_pool_cuda_op(const at::Tensor& x, std::vector<std::string> kinds, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  pool_args::PoolPlan p = pool_args::plan_channel_pool(x, kinds, eps, kCUDA);
  if (p.B * p.C == 0) return p.outs;
  if (p.H * p.W == 0) {                       // only "mean" gets here: NaN, as torch
    for (at::Tensor& t : p.outs) t.fill_(std::numeric_limits<double>::quiet_NaN());
    return p.outs;
  }
  const Strides4 sx = strides4(x);
  const size_t bytes = channel_pool_workspace_bytes(p.dt, p.B, p.C, p.H, p.W, sx, p.o.max != nullptr,
                                                    p.o.std_acc != nullptr);
  const at::Tensor ws = workspace(bytes, x);
  check_launch(channel_pool_forward_cuda(x.data_ptr(), p.dt, p.B, p.C, p.H, p.W, sx, eps, p.o, ptr(ws), bytes,
                                         c10::cuda::getCurrentCUDAStream()),
               "channel_pool", x);
  return p.outs;
}

at::Tensor channel_pool_backward_cuda_op(const std::optional<at::Tensor>& dmean, const std::optional<at::Tensor>& dmax,
                                         const std::optional<at::Tensor>& dstd, const std::optional<at::Tensor>& argmax,
                                         const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& mean,
                                         const std::optional<at::Tensor>& std_, at::IntArrayRef size,
                                         bool channels_last) {
  // (the plan allocates on the gradients' device whatever the current one; the launch needs it current)
  pool_args::PoolGradPlan p =
      pool_args::plan_channel_pool_backward(dmean, dmax, dstd, argmax, x, mean, std_, size, channels_last, kCUDA);
  const c10::cuda::CUDAGuard guard(p.dx.device());
  if (p.dx.numel() == 0) return p.dx;
  const Strides4 sx = p.x.defined() ? strides4(p.x) : Strides4{0, 0, 0, 0};
  check_launch(channel_pool_backward_cuda(ptr(p.x), p.dx.data_ptr(), p.dt, p.B, p.C, p.H, p.W, sx, strides4(p.dx),
                                          p.g, c10::cuda::getCurrentCUDAStream()),
               "channel_pool_backward", p.dx);
  return p.dx;
}

at::Tensor dct_pool_cuda_op(const at::Tensor& x, const at::Tensor& weight) {
  const c10::cuda::CUDAGuard guard(x.device());
  pool_args::DctPlan p = pool_args::plan_dct_pool(x, weight, kCUDA);
  if (p.y.numel() == 0) return p.y;
  if (p.H * p.W == 0) return p.y.zero_();     // an empty plane sums to zero
  const Strides4 sx = strides4(x), sw = pool_args::strides3(p.w);
  const size_t bytes = dct_pool_forward_workspace_bytes(p.dt, p.B, p.C, p.H, p.W, sx, sw);
  const at::Tensor ws = workspace(bytes, x);
  check_launch(dct_pool_forward_cuda(x.data_ptr(), p.w.data_ptr(), p.y.data_ptr(), p.dt, p.B, p.C, p.H, p.W, sx, sw,
                                     ptr(ws), bytes, c10::cuda::getCurrentCUDAStream()),
               "dct_pool", x);
  return p.y;
}

std::vector<at::Tensor> dct_pool_backward_cuda_op(const at::Tensor& dy, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& x, at::IntArrayRef size,
                                                  bool channels_last, bool need_dx) {
  const c10::cuda::CUDAGuard guard(dy.device());
  pool_args::DctGradPlan p =
      pool_args::plan_dct_pool_backward(dy, weight, x, size, channels_last, need_dx, kCUDA);
  if ((p.need_dx || p.need_dw) && p.B * p.C * p.H * p.W > 0) {
    const size_t bytes = dct_pool_backward_workspace_bytes(p.dt, p.B, p.C, p.H, p.W, p.sw, p.sx, p.sdx, p.sdw,
                                                           p.need_dx, p.need_dw);
    const at::Tensor ws = workspace(bytes, dy);
    check_launch(dct_pool_backward_cuda(p.g.data_ptr(), p.w.data_ptr(), ptr(p.x), ptr(p.dx), ptr(p.dw_acc), p.dt,
                                        p.B, p.C, p.H, p.W, p.sw, p.sx, p.sdx, p.sdw, ptr(ws), bytes,
                                        c10::cuda::getCurrentCUDAStream()),
                 "dct_pool_backward", dy);
  }
  return pool_args::dct_grads(p);
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CUDA, m) {
  m.impl("channel_mean", &fastattn::channel_mean_cuda_op);
  m.impl("channel_pool", &fastattn::channel_pool_cuda_op);
  m.impl("channel_pool_backward", &fastattn::channel_pool_backward_cuda_op);
  m.impl("dct_pool", &fastattn::dct_pool_cuda_op);
  m.impl("dct_pool_backward", &fastattn::dct_pool_backward_cuda_op);
}
