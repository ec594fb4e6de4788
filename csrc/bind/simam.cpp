// torch.ops.fastattn_C SimAM ops: schemas and CPU registrations (kernels in csrc/cpu/simam.cpp).
// The CUDA registrations of the same schemas are in simam_cuda.cpp.
#include <cmath>

#include "../cpu/simam.h"
#include "common.h"

namespace fastattn {
namespace {

DType check_simam_x(const char* op, const at::Tensor& x, double e_lambda) {
  check_feature_map(x, op);
  TORCH_CHECK(x.device().is_cpu(), "fastattn::", op, ": this kernel runs on CPU tensors, got 'x' on ", x.device());
  const DType dt = dtype_tag(x, op, "x");
  TORCH_CHECK_VALUE(x.numel() == 0 || x.size(2) * x.size(3) >= 2, "fastattn::", op,
                    ": argument 'x' must have at least 2 spatial positions (H*W >= 2), got H=", x.size(2),
                    ", W=", x.size(3));
  TORCH_CHECK_VALUE(std::isfinite(e_lambda) && e_lambda > 0, "fastattn::", op,
                    ": argument 'e_lambda' must be a positive float, got ", e_lambda);
  return dt;
}

// y = SimAM(x), with the strides of torch.empty_like(x).
at::Tensor simam(const at::Tensor& x, double e_lambda) {
  const DType dt = check_simam_x("simam", x, e_lambda);
  at::Tensor y = new_output_like(x);
  if (y.numel() == 0) return y;
  simam_forward_cpu(x.data_ptr(), y.data_ptr(), dt, x.size(0), x.size(1), x.size(2), x.size(3), e_lambda,
                    strides4(x), strides4(y));
  return y;
}

// dy in the layout of x when x is NCHW or channels_last and dy is not (the broadcast gradient of
// y.sum(), a gradient in the other memory format): the plane and channel sweeps read dy as they read
// x, and anything else would take the generic path (7x slower at 8x256x56x56 than this copy + the
// fast path).
at::Tensor dy_in_layout_of(const at::Tensor& dy, const at::Tensor& x) {
  if (x.is_contiguous() && !dy.is_contiguous()) return dy.contiguous();
  const auto cl = at::MemoryFormat::ChannelsLast;
  if (!x.is_contiguous() && x.is_contiguous(cl) && !dy.is_contiguous(cl)) return dy.contiguous(cl);
  return dy;
}

// dx (like torch.empty_like(x)) from dy and x; the statistics are recomputed from x.
at::Tensor simam_backward(const at::Tensor& dy, const at::Tensor& x, double e_lambda) {
  const char* op = "simam_backward";
  const DType dt = check_simam_x(op, x, e_lambda);
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), "fastattn::", op, ": argument 'dy' must have the shape of 'x' ",
                    x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK_TYPE(dy.scalar_type() == x.scalar_type(), "fastattn::", op,
                   ": argument 'dy' must have the dtype of 'x' (", x.scalar_type(), "), got ", dy.scalar_type());
  TORCH_CHECK(dy.device().is_cpu(), "fastattn::", op, ": this kernel runs on CPU tensors, got 'dy' on ", dy.device());
  at::Tensor dx = new_output_like(x);
  if (dx.numel() == 0) return dx;
  const at::Tensor dy_read = dy_in_layout_of(dy, x);
  simam_backward_cpu(dy_read.data_ptr(), x.data_ptr(), dx.data_ptr(), dt, x.size(0), x.size(1), x.size(2), x.size(3),
                     e_lambda, strides4(dy_read), strides4(x), strides4(dx));
  return dx;
}

// SimAM's training forward: (y, stats), stats (B, C, 2) float64 holding each plane's (mu, r) for
// simam_train_backward, which then skips the statistics' passes.
std::tuple<at::Tensor, at::Tensor> simam_train_forward(const at::Tensor& x, double e_lambda) {
  const DType dt = check_simam_x("simam_train_forward", x, e_lambda);
  at::Tensor y = new_output_like(x);
  at::Tensor stats = at::empty({x.size(0), x.size(1), 2}, x.options().dtype(at::kDouble));
  if (y.numel() == 0) return {y, stats};
  simam_forward_cpu(x.data_ptr(), y.data_ptr(), dt, x.size(0), x.size(1), x.size(2), x.size(3), e_lambda,
                    strides4(x), strides4(y), stats.data_ptr<double>());
  return {y, stats};
}

// dx from dy, x and the stats of simam_train_forward(x): simam_backward's dx (see simam_backward_cpu).
at::Tensor simam_train_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& stats) {
  const char* op = "simam_train_backward";
  const DType dt = check_simam_x(op, x, 1.0);
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), "fastattn::", op, ": argument 'dy' must have the shape of 'x' ",
                    x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK_TYPE(dy.scalar_type() == x.scalar_type(), "fastattn::", op,
                   ": argument 'dy' must have the dtype of 'x' (", x.scalar_type(), "), got ", dy.scalar_type());
  TORCH_CHECK(dy.device().is_cpu() && stats.device().is_cpu(), "fastattn::", op,
              ": this kernel runs on CPU tensors, got 'dy' on ", dy.device(), " and 'stats' on ", stats.device());
  TORCH_CHECK_VALUE(stats.scalar_type() == at::kDouble && stats.is_contiguous() &&
                        stats.sizes() == at::IntArrayRef({x.size(0), x.size(1), 2}),
                    "fastattn::", op, ": argument 'stats' must be a contiguous float64 tensor of shape (",
                    x.size(0), ", ", x.size(1), ", 2) from simam_train_forward, got ", stats.scalar_type(), " ",
                    stats.sizes(), stats.is_contiguous() ? "" : " (not contiguous)");
  at::Tensor dx = new_output_like(x);
  if (dx.numel() == 0) return dx;
  const at::Tensor dy_read = dy_in_layout_of(dy, x);
  simam_backward_cpu(dy_read.data_ptr(), x.data_ptr(), dx.data_ptr(), dt, x.size(0), x.size(1), x.size(2), x.size(3),
                     1.0, strides4(dy_read), strides4(x), strides4(dx), stats.data_ptr<double>());
  return dx;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_FRAGMENT(fastattn_C, m) {
  m.def("simam(Tensor x, float e_lambda) -> Tensor");
  m.def("simam_backward(Tensor dy, Tensor x, float e_lambda) -> Tensor");
  m.def("simam_train_forward(Tensor x, float e_lambda) -> (Tensor, Tensor)");
  m.def("simam_train_backward(Tensor dy, Tensor x, Tensor stats) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("simam", &fastattn::simam);
  m.impl("simam_backward", &fastattn::simam_backward);
  m.impl("simam_train_forward", &fastattn::simam_train_forward);
  m.impl("simam_train_backward", &fastattn::simam_train_backward);
}
