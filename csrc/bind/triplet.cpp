// torch.ops.fastattn_C.triplet_*: triplet attention's passes over x on the CPU (kernels in
// csrc/cpu/triplet.cpp), and gate_conv / gate_conv_backward, its gates' 2 -> 1 channel k x k
// convolution. Used by fastattn.TripletAttention's CPU path (fastattn/modules/hybrid.py,
// _TripletCPU), which adds the autograd.
#include "../cpu/triplet.h"
#include "common.h"

namespace fastattn {
namespace {

// x: an NCHW-contiguous CPU feature map with no empty dimension.
DType check_map(const char* op, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 4, "fastattn::", op, ": argument '", name, "' must be 4-D (B, C, H, W), got ", x.dim(),
                    "-D tensor of shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "fastattn::", op, ": this kernel runs on CPU tensors, got '", name, "' on ",
              x.device());
  check_nchw_contiguous(op, name, x);
  TORCH_CHECK_VALUE(x.numel() > 0, "fastattn::", op, ": argument '", name, "' must not be empty, got shape ",
                    x.sizes());
  return dtype_tag(x, op, name);
}

// t: a contiguous CPU tensor of the given shape and dtype.
void check_array(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef sizes, at::ScalarType want) {
  TORCH_CHECK_VALUE(t.sizes() == sizes, "fastattn::", op, ": argument '", name, "' must have shape ", sizes, ", got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == want, "fastattn::", op, ": argument '", name, "' must be ", want, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous() && t.device().is_cpu(), "fastattn::", op, ": argument '", name,
                    "' must be a contiguous CPU tensor");
}

// The three gates (B, C, W), (B, H, C) and optionally (B, H, W), in x's accumulation dtype.
void check_gates(const char* op, const at::Tensor& x, const at::Tensor& g_cw, const at::Tensor& g_hc,
                 const std::optional<at::Tensor>& g_hw) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const at::ScalarType acc = acc_scalar_type(x);
  check_array(op, g_cw, "g_cw", {B, C, W}, acc);
  check_array(op, g_hc, "g_hc", {B, H, C}, acc);
  if (g_hw) check_array(op, *g_hw, "g_hw", {B, H, W}, acc);
}

// The Z-pools: (map_cw (B, 2, C, W), idx_cw (B, C, W), map_hc (B, 2, H, C), idx_hc (B, H, C),
// map_hw (B, 2, H, W), idx_hw (B, H, W)); the hw pair is empty (shape (0,)) unless `spatial`.
// Maps in x's accumulation dtype ([max, mean] on dim 1), indices int32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> triplet_pools(const at::Tensor& x,
                                                                                               bool spatial) {
  const char* op = "triplet_pools";
  const DType dt = check_map(op, x, "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto acc = x.options().dtype(acc_scalar_type(x));
  const auto idx = x.options().dtype(at::kInt);
  at::Tensor map_cw = at::empty({B, 2, C, W}, acc), idx_cw = at::empty({B, C, W}, idx);
  at::Tensor map_hc = at::empty({B, 2, H, C}, acc), idx_hc = at::empty({B, H, C}, idx);
  at::Tensor map_hw = spatial ? at::empty({B, 2, H, W}, acc) : at::empty({0}, acc);
  at::Tensor idx_hw = spatial ? at::empty({B, H, W}, idx) : at::empty({0}, idx);
  triplet_pools_cpu(x.data_ptr(), dt, B, C, H, W, map_cw.data_ptr(), idx_cw.data_ptr<int32_t>(), map_hc.data_ptr(),
                    idx_hc.data_ptr<int32_t>(), spatial ? map_hw.data_ptr() : nullptr,
                    spatial ? idx_hw.data_ptr<int32_t>() : nullptr);
  return {map_cw, idx_cw, map_hc, idx_hc, map_hw, idx_hw};
}

// y = x * (g_cw[b, c, w] + g_hc[b, h, c] (+ g_hw[b, h, w])) * scale; y NCHW like x.
at::Tensor triplet_scale(const at::Tensor& x, const at::Tensor& g_cw, const at::Tensor& g_hc,
                         const std::optional<at::Tensor>& g_hw, double scale) {
  const char* op = "triplet_scale";
  const DType dt = check_map(op, x, "x");
  check_gates(op, x, g_cw, g_hc, g_hw);
  at::Tensor y = new_output_like(x);
  triplet_scale_cpu(x.data_ptr(), g_cw.data_ptr(), g_hc.data_ptr(), g_hw ? g_hw->data_ptr() : nullptr, scale,
                    y.data_ptr(), dt, x.size(0), x.size(1), x.size(2), x.size(3));
  return y;
}

// dy and x: NCHW-contiguous of one shape and dtype.
DType check_grad_pair(const char* op, const at::Tensor& dy, const at::Tensor& x) {
  const DType dt = check_map(op, x, "x");
  check_map(op, dy, "dy");
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), "fastattn::", op, ": argument 'dy' must have the shape of 'x' ",
                    x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK_TYPE(dy.scalar_type() == x.scalar_type(), "fastattn::", op, ": argument 'dy' must have the dtype of "
                   "'x' (", x.scalar_type(), "), got ", dy.scalar_type());
  return dt;
}

// The gates' gradients (d_cw (B, C, W), d_hc (B, H, C), d_hw (B, H, W) or empty unless `spatial`):
// sums of dy * x * scale over H, W and C.
std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_backward_sums(const at::Tensor& dy, const at::Tensor& x,
                                                                     double scale, bool spatial) {
  const char* op = "triplet_backward_sums";
  const DType dt = check_grad_pair(op, dy, x);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto acc = x.options().dtype(acc_scalar_type(x));
  at::Tensor d_cw = at::empty({B, C, W}, acc), d_hc = at::empty({B, H, C}, acc);
  at::Tensor d_hw = spatial ? at::empty({B, H, W}, acc) : at::empty({0}, acc);
  triplet_backward_sums_cpu(dy.data_ptr(), x.data_ptr(), scale, d_cw.data_ptr(), d_hc.data_ptr(),
                            spatial ? d_hw.data_ptr() : nullptr, dt, B, C, H, W);
  return {d_cw, d_hc, d_hw};
}

// int32 indices `idx` must lie in [0, n): the kernel writes at them.
void check_positions(const char* op, const at::Tensor& idx, const char* name, int64_t n, const char* what) {
  const auto range = at::aminmax(idx);
  TORCH_CHECK_VALUE(std::get<0>(range).item<int32_t>() >= 0 && std::get<1>(range).item<int32_t>() < n, "fastattn::",
                    op, ": argument '", name, "' must hold positions in [0, ", what, " = ", n, ")");
}

// dx = dy (g_cw + g_hc + g_hw) scale + the Z-pools' gradients from the maps' gradients dm_* (laid
// out as the maps of triplet_pools) and their argmax indices idx_*.
at::Tensor triplet_backward_dx(const at::Tensor& dy, const at::Tensor& g_cw, const at::Tensor& g_hc,
                               const std::optional<at::Tensor>& g_hw, double scale, const at::Tensor& dm_cw,
                               const at::Tensor& idx_cw, const at::Tensor& dm_hc, const at::Tensor& idx_hc,
                               const std::optional<at::Tensor>& dm_hw, const std::optional<at::Tensor>& idx_hw) {
  const char* op = "triplet_backward_dx";
  const DType dt = check_map(op, dy, "dy");
  const int64_t B = dy.size(0), C = dy.size(1), H = dy.size(2), W = dy.size(3);
  const at::ScalarType acc = acc_scalar_type(dy);
  check_gates(op, dy, g_cw, g_hc, g_hw);
  TORCH_CHECK_VALUE(g_hw.has_value() == dm_hw.has_value() && g_hw.has_value() == idx_hw.has_value(), "fastattn::", op,
                    ": arguments 'g_hw', 'dm_hw' and 'idx_hw' must be given together or not at all");
  check_array(op, dm_cw, "dm_cw", {B, 2, C, W}, acc);
  check_array(op, idx_cw, "idx_cw", {B, C, W}, at::kInt);
  check_array(op, dm_hc, "dm_hc", {B, 2, H, C}, acc);
  check_array(op, idx_hc, "idx_hc", {B, H, C}, at::kInt);
  check_positions(op, idx_hc, "idx_hc", W, "W");
  if (dm_hw) {
    check_array(op, *dm_hw, "dm_hw", {B, 2, H, W}, acc);
    check_array(op, *idx_hw, "idx_hw", {B, H, W}, at::kInt);
  }
  at::Tensor dx = new_output_like(dy);
  triplet_backward_dx_cpu(dy.data_ptr(), g_cw.data_ptr(), g_hc.data_ptr(), g_hw ? g_hw->data_ptr() : nullptr, scale,
                          dm_cw.data_ptr(), idx_cw.data_ptr<int32_t>(), dm_hc.data_ptr(), idx_hc.data_ptr<int32_t>(),
                          dm_hw ? dm_hw->data_ptr() : nullptr, idx_hw ? idx_hw->data_ptr<int32_t>() : nullptr,
                          dx.data_ptr(), dt, B, C, H, W);
  return dx;
}

// input (B, cin, R, S) and weight (1, cin, k, k), k odd: float32 or float64 alike, contiguous.
DType check_conv(const char* op, const at::Tensor& input, const at::Tensor& weight) {
  const DType dt = check_map(op, input, "input");
  TORCH_CHECK_TYPE(dt == DType::Float32 || dt == DType::Float64, "fastattn::", op,
                   ": argument 'input' must be float32 or float64, got ", input.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == 1 && weight.size(1) == input.size(1) &&
                        weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
                    "fastattn::", op, ": argument 'weight' must have shape (1, ", input.size(1),
                    ", k, k) with k odd, got ", weight.sizes());
  check_array(op, weight, "weight", weight.sizes(), input.scalar_type());
  return dt;
}

// out (B, 1, R, S) = conv2d(input, weight, padding=(k - 1) / 2), no bias.
at::Tensor gate_conv(const at::Tensor& input, const at::Tensor& weight) {
  const DType dt = check_conv("gate_conv", input, weight);
  const int64_t B = input.size(0), R = input.size(2), S = input.size(3);
  at::Tensor out = at::empty({B, 1, R, S}, input.options());
  gate_conv_cpu(input.data_ptr(), weight.data_ptr(), out.data_ptr(), dt, B, input.size(1), R, S, weight.size(2));
  return out;
}

// (d_input (B, cin, R, S) or empty unless input_grad, d_weight (1, cin, k, k) or empty unless
// weight_grad) from d_out (B, 1, R, S).
std::tuple<at::Tensor, at::Tensor> gate_conv_backward(const at::Tensor& d_out, const at::Tensor& input,
                                                      const at::Tensor& weight, bool input_grad, bool weight_grad) {
  const char* op = "gate_conv_backward";
  const DType dt = check_conv(op, input, weight);
  const int64_t B = input.size(0), R = input.size(2), S = input.size(3);
  check_array(op, d_out, "d_out", {B, 1, R, S}, input.scalar_type());
  at::Tensor d_in = input_grad ? at::empty_like(input) : at::empty({0}, input.options());
  at::Tensor d_w = weight_grad ? at::empty_like(weight) : at::empty({0}, weight.options());
  gate_conv_backward_cpu(d_out.data_ptr(), input.data_ptr(), weight.data_ptr(), input_grad ? d_in.data_ptr() : nullptr,
                         weight_grad ? d_w.data_ptr() : nullptr, dt, B, input.size(1), R, S, weight.size(2));
  return {d_in, d_w};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_FRAGMENT(fastattn_C, m) {
  m.def("triplet_pools(Tensor x, bool spatial) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("triplet_scale(Tensor x, Tensor g_cw, Tensor g_hc, Tensor? g_hw, float scale) -> Tensor");
  m.def("triplet_backward_sums(Tensor dy, Tensor x, float scale, bool spatial) -> (Tensor, Tensor, Tensor)");
  m.def("triplet_backward_dx(Tensor dy, Tensor g_cw, Tensor g_hc, Tensor? g_hw, float scale, Tensor dm_cw, "
        "Tensor idx_cw, Tensor dm_hc, Tensor idx_hc, Tensor? dm_hw, Tensor? idx_hw) -> Tensor");
  m.def("gate_conv(Tensor input, Tensor weight) -> Tensor");
  m.def("gate_conv_backward(Tensor d_out, Tensor input, Tensor weight, bool input_grad, bool weight_grad) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("triplet_pools", &fastattn::triplet_pools);
  m.impl("triplet_scale", &fastattn::triplet_scale);
  m.impl("triplet_backward_sums", &fastattn::triplet_backward_sums);
  m.impl("triplet_backward_dx", &fastattn::triplet_backward_dx);
  m.impl("gate_conv", &fastattn::gate_conv);
  m.impl("gate_conv_backward", &fastattn::gate_conv_backward);
}
