// torch.ops.fastattn_C bin mean ops: schemas and CPU registrations (kernels in csrc/cpu/bins.cpp).
#include "../cpu/bins.h"
#include "common.h"
#include "pool_args.h"

namespace fastattn {
namespace {

constexpr auto kCPU = c10::DeviceType::CPU;

// (B, C, H, W) -> (B, C, N): the means over the bins of every grid of levels (see bins.h).
at::Tensor bin_mean(const at::Tensor& x, at::IntArrayRef levels, c10::string_view mode) {
  const char* op = "bin_mean";
  check_feature_map(x, op);
  pool_args::check_device(x, op, "x", kCPU);
  const DType dt = dtype_tag(x, op, "x");
  const std::vector<int64_t> table = pool_args::bin_table(x.size(2), x.size(3), levels, mode, op);
  const BinGeometry g = bin_geometry_view(table.data(), table.data());
  at::Tensor out = at::empty({x.size(0), x.size(1), g.N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() > 0) bin_mean_forward_cpu(x.data_ptr(), out.data_ptr(), dt, x.size(0), x.size(1), strides4(x), g);
  return out;
}

// dx (size, dy's dtype, NCHW or channels_last): each position gets sum over its bins of dy / area.
at::Tensor bin_mean_backward(const at::Tensor& dy, at::IntArrayRef size, at::IntArrayRef levels, c10::string_view mode,
                             bool channels_last) {
  const char* op = "bin_mean_backward";
  const std::vector<int64_t> sz = pool_args::check_size(size, op);
  pool_args::check_device(dy, op, "dy", kCPU);
  const DType dt = dtype_tag(dy, op, "dy");
  const std::vector<int64_t> table = pool_args::bin_table(sz[2], sz[3], levels, mode, op);
  const BinGeometry g = bin_geometry_view(table.data(), table.data());
  TORCH_CHECK_VALUE(dy.dim() == 3 && dy.size(0) == sz[0] && dy.size(1) == sz[1] && dy.size(2) == g.N, "fastattn::", op,
                    ": argument 'dy' must have shape (B, C, N) = (", sz[0], ", ", sz[1], ", ", g.N, "), got ",
                    dy.sizes());
  at::Tensor dx = with_huge_page_advice(at::empty(sz, dy.options().memory_format(pool_args::format(channels_last))));
  if (dx.numel() == 0) return dx;
  const at::Tensor d = dy.to(acc_scalar_type(dy)).contiguous();
  bin_mean_backward_cpu(d.data_ptr(), dx.data_ptr(), dt, sz[0], sz[1], strides4(dx), g);
  return dx;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_FRAGMENT(fastattn_C, m) {
  m.def("bin_mean(Tensor x, int[] levels, str mode) -> Tensor");
  m.def("bin_mean_backward(Tensor dy, int[] size, int[] levels, str mode, bool channels_last) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("bin_mean", &fastattn::bin_mean);
  m.impl("bin_mean_backward", &fastattn::bin_mean_backward);
}
