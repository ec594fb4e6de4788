// torch.ops.fastattn_C pooling ops: schemas and CPU registrations (kernels in csrc/cpu/pool.cpp).
#include <limits>

#include "../cpu/pool.h"
#include "common.h"

namespace fastattn {
namespace {

// (B, C, H, W) -> (B, C): mean over H x W, fp32 accumulation.
at::Tensor channel_mean(const at::Tensor& x) {
  check_feature_map(x, "channel_mean");
  TORCH_CHECK(x.device().is_cpu(), "fastattn::channel_mean: this kernel runs on CPU tensors, got a tensor on ",
              x.device());
  const DType dt = dtype_tag(x, "channel_mean", "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({B, C}, x.options());
  if (B * C == 0) return out;
  if (H * W == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());  // mean of nothing, as torch
  channel_mean_cpu(x.data_ptr(), out.data_ptr(), dt, B, C, H, W, x.stride(0), x.stride(1), x.stride(2),
                   x.stride(3));
  return out;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_FRAGMENT(fastattn_C, m) {
  m.def("channel_mean(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("channel_mean", &fastattn::channel_mean);
}
