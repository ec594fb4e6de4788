// CUDA registrations of the pooling ops (torch.ops.fastattn_C.*), built only with a CUDA torch.
// Device guard and current stream here; the kernels in csrc/cuda/ see pointers and a stream only.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "../cuda/pool.h"
#include "common.h"

namespace fastattn {
namespace {

at::Tensor channel_mean_cuda_op(const at::Tensor& x) {
  check_feature_map(x, "channel_mean");
  TORCH_CHECK(x.is_cuda(), "fastattn::channel_mean: this kernel runs on CUDA tensors, got a tensor on ", x.device());
  const DType dt = dtype_tag(x, "channel_mean", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({B, C}, x.options());
  if (B * C == 0) return out;
  if (H * W == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());
  const cudaError_t err = channel_mean_cuda(x.data_ptr(), out.data_ptr(), dt, B, C, H, W, x.stride(0), x.stride(1),
                                            x.stride(2), x.stride(3), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "fastattn::channel_mean: CUDA launch failed for x of shape ", x.sizes(), ": ",
              cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CUDA, m) {
  m.impl("channel_mean", &fastattn::channel_mean_cuda_op);
}
