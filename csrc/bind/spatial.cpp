// torch.ops.fastattn_C spatial ops: schemas and CPU registrations (kernels in csrc/cpu/spatial.cpp).
// The CUDA registrations of the same ops are in spatial_cuda.cpp.
#include "../cpu/spatial.h"
#include "spatial_args.h"

namespace fastattn {
namespace {

using namespace spatial_args;

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// [max, mean] over dimension `dim` of x (times a[b, c] for dim 1): y (B, 2, P1, P2), idx (B, P1 * P2).
std::tuple<at::Tensor, at::Tensor> spatial_pool(const at::Tensor& x, const std::optional<at::Tensor>& a, int64_t dim) {
  PoolForward f = pool_forward_setup("spatial_pool", x, a, dim, c10::DeviceType::CPU);
  if (f.y.numel() == 0) return {f.y, f.idx};
  const View& v = f.vx;
  spatial_pool_forward_cpu(x.data_ptr(), ptr_or_null(a), f.y.data_ptr(), f.idx.data_ptr<int32_t>(), f.dt, v.B, v.N,
                           v.P1, v.P2, v.s, strides4(f.y));
  return {f.y, f.idx};
}

// (dx, da): dx like torch.empty_like(x); da (B, C) in a's dtype, or an empty (0,) tensor without a.
std::tuple<at::Tensor, at::Tensor> spatial_pool_backward(const at::Tensor& dy, const at::Tensor& x,
                                                         const std::optional<at::Tensor>& a, const at::Tensor& idx,
                                                         int64_t dim) {
  PoolBackward g = pool_backward_setup("spatial_pool_backward", dy, x, a, idx, dim, c10::DeviceType::CPU);
  if (g.dx.numel() == 0) return {g.dx, g.da};
  const View& v = g.vx;
  spatial_pool_backward_cpu(dy.data_ptr(), x.data_ptr(), ptr_or_null(a), idx.data_ptr<int32_t>(), g.dx.data_ptr(),
                            a.has_value() ? g.da.data_ptr() : nullptr, g.dt, v.B, v.N, v.P1, v.P2, strides4(dy), v.s,
                            g.vdx.s);
  return {g.dx, g.da};
}

// y = x * a[b, c] * s[b, 0, h, w]; y like torch.empty_like(x).
at::Tensor spatial_scale(const at::Tensor& x, const std::optional<at::Tensor>& a, const at::Tensor& s) {
  const DType dt = scale_setup("spatial_scale", x, a, s, c10::DeviceType::CPU);
  at::Tensor y = new_output_like(x);
  if (y.numel() == 0) return y;
  spatial_scale_forward_cpu(x.data_ptr(), ptr_or_null(a), s.data_ptr(), y.data_ptr(), dt, x.size(0), x.size(1),
                            x.size(2), x.size(3), strides4(x), strides4(y));
  return y;
}

// (dx, da, ds): dx like torch.empty_like(x); da (B, C) (or (0,) without a) and ds (B, 1, H, W)
// contiguous, both in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_scale_backward(const at::Tensor& dy, const at::Tensor& x,
                                                                      const std::optional<at::Tensor>& a,
                                                                      const at::Tensor& s) {
  ScaleBackward g = scale_backward_setup("spatial_scale_backward", dy, x, a, s, c10::DeviceType::CPU);
  if (x.numel() == 0) return {g.dx, g.da, g.ds};
  spatial_scale_backward_cpu(dy.data_ptr(), x.data_ptr(), ptr_or_null(a), s.data_ptr(), g.dx.data_ptr(),
                             a.has_value() ? g.da.data_ptr() : nullptr, g.ds.data_ptr(), g.dt, x.size(0), x.size(1),
                             x.size(2), x.size(3), strides4(dy), strides4(x), strides4(g.dx));
  return {g.dx, g.da, g.ds};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_FRAGMENT(fastattn_C, m) {
  m.def("spatial_pool(Tensor x, Tensor? a, int dim) -> (Tensor, Tensor)");
  m.def("spatial_pool_backward(Tensor dy, Tensor x, Tensor? a, Tensor idx, int dim) -> (Tensor, Tensor)");
  m.def("spatial_scale(Tensor x, Tensor? a, Tensor s) -> Tensor");
  m.def("spatial_scale_backward(Tensor dy, Tensor x, Tensor? a, Tensor s) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("spatial_pool", &fastattn::spatial_pool);
  m.impl("spatial_pool_backward", &fastattn::spatial_pool_backward);
  m.impl("spatial_scale", &fastattn::spatial_scale);
  m.impl("spatial_scale_backward", &fastattn::spatial_scale_backward);
}
