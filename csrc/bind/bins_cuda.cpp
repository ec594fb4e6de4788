// CUDA registrations of the bin mean ops (torch.ops.fastattn_C.*), built only with a CUDA torch.
// The bin geometry table is built on the host (csrc/cpu/bins.cpp) and copied to the device once
// per (device, H, W, mode, levels): a cache that is never freed, so a table stays valid for
// kernels on any stream.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <map>
#include <mutex>

#include "../cuda/bins.h"
#include "common.h"
#include "pool_args.h"

namespace fastattn {
namespace {

constexpr auto kCUDA = c10::DeviceType::CUDA;
constexpr size_t kMaxCached = 4096;

// The device copy of a packed geometry table. Beyond kMaxCached distinct geometries a fresh copy
// per call (freed after the call, in stream order: safe).
at::Tensor device_table(const std::vector<int64_t>& table, at::IntArrayRef levels, c10::string_view mode,
                        const at::Device& dev) {
  static std::mutex mu;
  static auto* cache = new std::map<std::vector<int64_t>, at::Tensor>();  // leaked: no teardown at exit
  std::vector<int64_t> key = {dev.index(), table[0], table[1], mode == "tiles" ? 1 : 0};
  key.insert(key.end(), levels.begin(), levels.end());
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  const at::Tensor host = at::from_blob(const_cast<int64_t*>(table.data()), {static_cast<int64_t>(table.size())},
                                        at::TensorOptions().dtype(at::kLong));
  // a copy (always: host views the caller's vector), synchronous: complete on return
  at::Tensor d = host.to(dev, at::kLong, /*non_blocking=*/false, /*copy=*/true);
  if (cache->size() < kMaxCached) cache->emplace(std::move(key), d);
  return d;
}

void check_launch(cudaError_t err, const char* op, const at::Tensor& t) {
  TORCH_CHECK(err == cudaSuccess, "fastattn::", op, ": CUDA launch failed for a tensor of shape ", t.sizes(), ": ",
              cudaGetErrorString(err));
}

at::Tensor bin_mean_cuda_op(const at::Tensor& x, at::IntArrayRef levels, c10::string_view mode) {
  const char* op = "bin_mean";
  check_feature_map(x, op);
  pool_args::check_device(x, op, "x", kCUDA);
  const DType dt = dtype_tag(x, op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const std::vector<int64_t> table = pool_args::bin_table(x.size(2), x.size(3), levels, mode, op);
  at::Tensor out = at::empty({x.size(0), x.size(1), table[4]}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor d = device_table(table, levels, mode, x.device());
  const BinGeometry g = bin_geometry_view(table.data(), d.data_ptr<int64_t>());
  check_launch(bin_mean_forward_cuda(x.data_ptr(), out.data_ptr(), dt, x.size(0), x.size(1), strides4(x), g,
                                     c10::cuda::getCurrentCUDAStream()),
               op, x);
  return out;
}

at::Tensor bin_mean_backward_cuda_op(const at::Tensor& dy, at::IntArrayRef size, at::IntArrayRef levels,
                                     c10::string_view mode, bool channels_last) {
  const char* op = "bin_mean_backward";
  const std::vector<int64_t> sz = pool_args::check_size(size, op);
  pool_args::check_device(dy, op, "dy", kCUDA);
  const DType dt = dtype_tag(dy, op, "dy");
  const c10::cuda::CUDAGuard guard(dy.device());
  const std::vector<int64_t> table = pool_args::bin_table(sz[2], sz[3], levels, mode, op);
  const int64_t N = table[4];
  TORCH_CHECK_VALUE(dy.dim() == 3 && dy.size(0) == sz[0] && dy.size(1) == sz[1] && dy.size(2) == N, "fastattn::", op,
                    ": argument 'dy' must have shape (B, C, N) = (", sz[0], ", ", sz[1], ", ", N, "), got ",
                    dy.sizes());
  at::Tensor dx = at::empty(sz, dy.options().memory_format(pool_args::format(channels_last)));
  if (dx.numel() == 0) return dx;
  const at::Tensor d = device_table(table, levels, mode, dy.device());
  const BinGeometry g = bin_geometry_view(table.data(), d.data_ptr<int64_t>());
  const at::Tensor gy = dy.to(acc_scalar_type(dy)).contiguous();
  check_launch(bin_mean_backward_cuda(gy.data_ptr(), dx.data_ptr(), dt, sz[0], sz[1], strides4(dx), g,
                                      c10::cuda::getCurrentCUDAStream()),
               op, dx);
  return dx;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CUDA, m) {
  m.impl("bin_mean", &fastattn::bin_mean_cuda_op);
  m.impl("bin_mean_backward", &fastattn::bin_mean_backward_cuda_op);
}
