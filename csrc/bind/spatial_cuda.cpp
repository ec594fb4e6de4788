// CUDA registrations of the spatial ops (torch.ops.fastattn_C.spatial_*), built only with a CUDA
// torch. Same schemas and checks as the CPU side (spatial.cpp, spatial_args.h); here: the device
// guard, the current stream, and the workspace of the partial sums (a byte tensor from torch's
// caching allocator). The kernels in csrc/cuda/spatial.cu see pointers and a stream only.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cuda/spatial.h"
#include "spatial_args.h"

namespace fastattn {
namespace {

using namespace spatial_args;

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

void check_launch(cudaError_t err, const char* op, const at::Tensor& x) {
  TORCH_CHECK(err == cudaSuccess, "fastattn::", op, ": CUDA launch failed for x of shape ", x.sizes(), " and strides ",
              x.strides(), ": ", cudaGetErrorString(err));
}

// A device buffer of `bytes` (none for 0) on x's device, from torch's caching allocator.
at::Tensor workspace(size_t bytes, const at::Tensor& x) {
  return at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> spatial_pool_cuda(const at::Tensor& x, const std::optional<at::Tensor>& a,
                                                     int64_t dim) {
  const char* op = "spatial_pool";
  PoolForward f = pool_forward_setup(op, x, a, dim, c10::DeviceType::CUDA);
  if (f.y.numel() == 0) return {f.y, f.idx};
  const c10::cuda::CUDAGuard guard(x.device());
  const View& v = f.vx;
  const Strides4 sy = strides4(f.y);
  const size_t bytes = spatial_pool_forward_cuda_workspace(x.data_ptr(), ptr_or_null(a), f.y.data_ptr(),
                                                           f.idx.data_ptr<int32_t>(), f.dt, v.B, v.N, v.P1, v.P2, v.s,
                                                           sy);
  at::Tensor ws = workspace(bytes, x);
  check_launch(spatial_pool_forward_cuda(x.data_ptr(), ptr_or_null(a), f.y.data_ptr(), f.idx.data_ptr<int32_t>(),
                                         f.dt, v.B, v.N, v.P1, v.P2, v.s, sy, bytes ? ws.data_ptr() : nullptr, bytes,
                                         c10::cuda::getCurrentCUDAStream()),
               op, x);
  return {f.y, f.idx};
}

std::tuple<at::Tensor, at::Tensor> spatial_pool_backward_cuda_op(const at::Tensor& dy, const at::Tensor& x,
                                                                 const std::optional<at::Tensor>& a,
                                                                 const at::Tensor& idx, int64_t dim) {
  const char* op = "spatial_pool_backward";
  PoolBackward g = pool_backward_setup(op, dy, x, a, idx, dim, c10::DeviceType::CUDA);
  if (g.dx.numel() == 0) return {g.dx, g.da};
  const c10::cuda::CUDAGuard guard(x.device());
  const View& v = g.vx;
  void* da = a.has_value() ? g.da.data_ptr() : nullptr;
  const size_t bytes = spatial_pool_backward_cuda_workspace(dy.data_ptr(), x.data_ptr(), ptr_or_null(a),
                                                            idx.data_ptr<int32_t>(), g.dx.data_ptr(), da, g.dt, v.B,
                                                            v.N, v.P1, v.P2, strides4(dy), v.s, g.vdx.s);
  at::Tensor ws = workspace(bytes, x);
  check_launch(spatial_pool_backward_cuda(dy.data_ptr(), x.data_ptr(), ptr_or_null(a), idx.data_ptr<int32_t>(),
                                          g.dx.data_ptr(), da, g.dt, v.B, v.N, v.P1, v.P2, strides4(dy), v.s, g.vdx.s,
                                          bytes ? ws.data_ptr() : nullptr, bytes, c10::cuda::getCurrentCUDAStream()),
               op, x);
  return {g.dx, g.da};
}

at::Tensor spatial_scale_cuda(const at::Tensor& x, const std::optional<at::Tensor>& a, const at::Tensor& s) {
  const char* op = "spatial_scale";
  const DType dt = scale_setup(op, x, a, s, c10::DeviceType::CUDA);
  at::Tensor y = at::empty_like(x);
  if (y.numel() == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(spatial_scale_forward_cuda(x.data_ptr(), ptr_or_null(a), s.data_ptr(), y.data_ptr(), dt, x.size(0),
                                          x.size(1), x.size(2), x.size(3), strides4(x), strides4(y),
                                          c10::cuda::getCurrentCUDAStream()),
               op, x);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_scale_backward_cuda_op(const at::Tensor& dy,
                                                                              const at::Tensor& x,
                                                                              const std::optional<at::Tensor>& a,
                                                                              const at::Tensor& s) {
  const char* op = "spatial_scale_backward";
  ScaleBackward g = scale_backward_setup(op, dy, x, a, s, c10::DeviceType::CUDA);
  if (x.numel() == 0) return {g.dx, g.da, g.ds};
  const c10::cuda::CUDAGuard guard(x.device());
  void* da = a.has_value() ? g.da.data_ptr() : nullptr;
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const size_t bytes = spatial_scale_backward_cuda_workspace(dy.data_ptr(), x.data_ptr(), ptr_or_null(a),
                                                             s.data_ptr(), g.dx.data_ptr(), da, g.ds.data_ptr(), g.dt,
                                                             B, C, H, W, strides4(dy), strides4(x), strides4(g.dx));
  at::Tensor ws = workspace(bytes, x);
  check_launch(spatial_scale_backward_cuda(dy.data_ptr(), x.data_ptr(), ptr_or_null(a), s.data_ptr(),
                                           g.dx.data_ptr(), da, g.ds.data_ptr(), g.dt, B, C, H, W, strides4(dy),
                                           strides4(x), strides4(g.dx), bytes ? ws.data_ptr() : nullptr, bytes,
                                           c10::cuda::getCurrentCUDAStream()),
               op, x);
  return {g.dx, g.da, g.ds};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CUDA, m) {
  m.impl("spatial_pool", &fastattn::spatial_pool_cuda);
  m.impl("spatial_pool_backward", &fastattn::spatial_pool_backward_cuda_op);
  m.impl("spatial_scale", &fastattn::spatial_scale_cuda);
  m.impl("spatial_scale_backward", &fastattn::spatial_scale_backward_cuda_op);
}
