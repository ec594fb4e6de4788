// torch.ops.fastattn_C bin mean, pyramid and tile gate ops: schemas and CPU registrations (kernels
// in csrc/cpu/bins.cpp).
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
  if (out.numel() > 0)
    bin_mean_forward_cpu(x.data_ptr(), out.data_ptr(), dt, x.size(0), x.size(1), strides4(x), g,
                         BinLayout::per_plane(x.size(1), g.N));
  return out;
}

// Levels n >= 1 of an adaptive pyramid: (their table, the pooled vector's layout).
std::pair<std::vector<int64_t>, BinLayout> pyramid(const char* op, const char* arg, int64_t C, int64_t H, int64_t W,
                                                   at::IntArrayRef levels) {
  std::vector<int64_t> table = pool_args::bin_table(H, W, levels, "adaptive", op, arg);
  return {std::move(table), BinLayout::level_major(C, levels.data(), static_cast<int64_t>(levels.size()))};
}

// (B, C, H, W) -> (B, C * sum of n^2): SpatialPyramidAttention's pooled vector, the adaptive means
// of each level n flattened channel-major and concatenated, as
// torch.cat([adaptive_avg_pool2d(x, n).flatten(1) for n in levels], 1), in x's dtype; one read of x.
at::Tensor pyramid_mean(const at::Tensor& x, at::IntArrayRef levels) {
  const char* op = "pyramid_mean";
  check_feature_map(x, op);
  pool_args::check_device(x, op, "x", kCPU);
  const DType dt = dtype_tag(x, op, "x");
  const auto [table, layout] = pyramid(op, "x", x.size(1), x.size(2), x.size(3), levels);
  const BinGeometry g = bin_geometry_view(table.data(), table.data());
  at::Tensor out = at::empty({x.size(0), layout.sample}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() > 0)
    bin_mean_forward_cpu(x.data_ptr(), out.data_ptr(), dt, x.size(0), x.size(1), strides4(x), g, layout);
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
  at::Tensor dx = new_output(sz, dy.options().memory_format(pool_args::format(channels_last)));
  if (dx.numel() == 0) return dx;
  const at::Tensor d = dy.to(acc_scalar_type(dy)).contiguous();
  bin_mean_backward_cpu(d.data_ptr(), dx.data_ptr(), dt, sz[0], sz[1], strides4(dx), g,
                        BinLayout::per_plane(sz[1], g.N));
  return dx;
}

// dx = dy * g[b, c] + the gradient of pyramid_mean given dpooled: SpatialPyramidAttention's input
// gradient in one write. dy an NCHW-contiguous CPU map; g (B, C) and dpooled (B, C * sum of n^2)
// contiguous in dy's accumulation dtype; dx NCHW like dy.
at::Tensor pyramid_scale_backward_dx(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& dpooled,
                                     at::IntArrayRef levels) {
  const char* op = "pyramid_scale_backward_dx";
  TORCH_CHECK_VALUE(dy.dim() == 4, "fastattn::", op, ": argument 'dy' must be 4-D (B, C, H, W), got ", dy.dim(),
                    "-D tensor of shape ", dy.sizes());
  pool_args::check_device(dy, op, "dy", kCPU);
  check_nchw_contiguous(op, "dy", dy);
  const DType dt = dtype_tag(dy, op, "dy");
  const int64_t B = dy.size(0), C = dy.size(1);
  const auto [table, layout] = pyramid(op, "dy", C, dy.size(2), dy.size(3), levels);
  const BinGeometry geo = bin_geometry_view(table.data(), table.data());
  const at::ScalarType acc = acc_scalar_type(dy);
  for (const auto& [t, name, shape] :
       {std::tuple<const at::Tensor&, const char*, std::vector<int64_t>>{g, "g", {B, C}},
        {dpooled, "dpooled", {B, layout.sample}}}) {
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), "fastattn::", op, ": argument '", name, "' must have shape ",
                      at::IntArrayRef(shape), ", got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == acc, "fastattn::", op, ": argument '", name, "' must be ", acc,
                     " for 'dy' of dtype ", dy.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.is_contiguous() && t.device().is_cpu(), "fastattn::", op, ": argument '", name,
                      "' must be a contiguous CPU tensor");
  }
  at::Tensor dx = new_output_like(dy);
  if (dx.numel() > 0)
    bin_scale_backward_dx_cpu(dy.data_ptr(), g.data_ptr(), dpooled.data_ptr(), dx.data_ptr(), dt, B, C, strides4(dx),
                              geo, layout);
  return dx;
}

// Tile gates: x (and dy) NCHW-contiguous CPU maps, k >= 1, the per-tile tensors contiguous
// (B, C, ceil(H / k), ceil(W / k)) in x's accumulation dtype.
void check_tile_map(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  if (&t != &x) {
    TORCH_CHECK_VALUE(t.sizes() == x.sizes(), "fastattn::", op, ": argument '", name, "' must have the shape of 'x' ",
                      x.sizes(), ", got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "fastattn::", op, ": argument '", name,
                     "' must have the dtype of 'x' (", x.scalar_type(), "), got ", t.scalar_type());
  }
  pool_args::check_device(t, op, name, kCPU);
  check_nchw_contiguous(op, name, t);
}

// x: the map (named `map_name`: x, or dy for the dx pass) whose shape gives the tiles'.
DType check_tile_args(const char* op, const at::Tensor& x, const char* map_name, int64_t k,
                      std::initializer_list<const at::Tensor*> tiles, std::initializer_list<const char*> names) {
  TORCH_CHECK_VALUE(x.dim() == 4, "fastattn::", op, ": argument '", map_name, "' must be 4-D (B, C, H, W), got ",
                    x.dim(), "-D tensor of shape ", x.sizes());
  check_tile_map(op, map_name, x, x);
  const DType dt = dtype_tag(x, op, map_name);
  TORCH_CHECK_VALUE(k >= 1, "fastattn::", op, ": argument 'k' must be a positive int, got ", k);
  const std::vector<int64_t> shape{x.size(0), x.size(1), (x.size(2) + k - 1) / k, (x.size(3) + k - 1) / k};
  const at::ScalarType acc = acc_scalar_type(x);
  auto name = names.begin();
  for (const at::Tensor* t : tiles) {
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(shape), "fastattn::", op, ": argument '", *name,
                      "' must have shape (B, C, ceil(H / k), ceil(W / k)) = ", at::IntArrayRef(shape), ", got ",
                      t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == acc, "fastattn::", op, ": argument '", *name, "' must be ", acc,
                     " for '", map_name, "' of dtype ", x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->is_contiguous() && t->device().is_cpu(), "fastattn::", op, ": argument '", *name,
                      "' must be a contiguous CPU tensor");
    ++name;
  }
  return dt;
}

// (B, C, ceil(H / k), ceil(W / k)) tile means in x's dtype
at::Tensor tile_mean(const at::Tensor& x, int64_t k) {
  const DType dt = check_tile_args("tile_mean", x, "x", k, {}, {});
  at::Tensor out = at::zeros({x.size(0), x.size(1), (x.size(2) + k - 1) / k, (x.size(3) + k - 1) / k}, x.options());
  if (x.numel() > 0) tile_mean_cpu(x.data_ptr(), out.data_ptr(), dt, x.size(0), x.size(1), x.size(2), x.size(3), k);
  return out;
}

// y = x * g[b, c, h / k, w / k]
at::Tensor tile_scale(const at::Tensor& x, const at::Tensor& g, int64_t k) {
  const DType dt = check_tile_args("tile_scale", x, "x", k, {&g}, {"g"});
  at::Tensor y = new_output_like(x);
  if (y.numel() > 0)
    tile_scale_forward_cpu(x.data_ptr(), g.data_ptr(), y.data_ptr(), dt, x.size(0), x.size(1), x.size(2), x.size(3), k);
  return y;
}

// dg[b, c, i, j] = sum over tile (i, j) of dy * x, in x's accumulation dtype
at::Tensor tile_dot(const at::Tensor& dy, const at::Tensor& x, int64_t k) {
  const char* op = "tile_dot";
  const DType dt = check_tile_args(op, x, "x", k, {}, {});
  check_tile_map(op, "dy", dy, x);
  at::Tensor dg = at::zeros({x.size(0), x.size(1), (x.size(2) + k - 1) / k, (x.size(3) + k - 1) / k},
                            x.options().dtype(acc_scalar_type(x)));
  if (x.numel() > 0)
    tile_dot_cpu(dy.data_ptr(), x.data_ptr(), dg.data_ptr(), dt, x.size(0), x.size(1), x.size(2), x.size(3), k);
  return dg;
}

// dx = dy * g[tile] + a[tile], NCHW like dy
at::Tensor tile_scale_backward_dx(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& a, int64_t k) {
  const DType dt = check_tile_args("tile_scale_backward_dx", dy, "dy", k, {&g, &a}, {"g", "a"});
  at::Tensor dx = new_output_like(dy);
  if (dx.numel() > 0)
    tile_scale_backward_dx_cpu(dy.data_ptr(), g.data_ptr(), a.data_ptr(), dx.data_ptr(), dt, dy.size(0), dy.size(1),
                               dy.size(2), dy.size(3), k);
  return dx;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_FRAGMENT(fastattn_C, m) {
  m.def("bin_mean(Tensor x, int[] levels, str mode) -> Tensor");
  m.def("bin_mean_backward(Tensor dy, int[] size, int[] levels, str mode, bool channels_last) -> Tensor");
  m.def("pyramid_mean(Tensor x, int[] levels) -> Tensor");
  m.def("pyramid_scale_backward_dx(Tensor dy, Tensor g, Tensor dpooled, int[] levels) -> Tensor");
  m.def("tile_mean(Tensor x, int k) -> Tensor");
  m.def("tile_scale(Tensor x, Tensor g, int k) -> Tensor");
  m.def("tile_dot(Tensor dy, Tensor x, int k) -> Tensor");
  m.def("tile_scale_backward_dx(Tensor dy, Tensor g, Tensor a, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("bin_mean", &fastattn::bin_mean);
  m.impl("bin_mean_backward", &fastattn::bin_mean_backward);
  m.impl("pyramid_mean", &fastattn::pyramid_mean);
  m.impl("pyramid_scale_backward_dx", &fastattn::pyramid_scale_backward_dx);
  m.impl("tile_mean", &fastattn::tile_mean);
  m.impl("tile_scale", &fastattn::tile_scale);
  m.impl("tile_dot", &fastattn::tile_dot);
  m.impl("tile_scale_backward_dx", &fastattn::tile_scale_backward_dx);
}
