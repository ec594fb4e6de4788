// torch.ops.fastattn_C.se_forward / eca_forward / srm_forward / cbam_forward: squeeze-excite, ECA,
// SRM and CBAM inference in one read of x (CPU; kernels in csrc/cpu/se.cpp). No backward: the
// fastattn modules use them only where no gradient is recorded.
// channel_dot / channel_scale_affine_backward: the two passes of the backward of those modules'
// training path (fastattn/modules/channel.py, _PooledGate), and pooled_gate_train_forward / _backward its
// one-read variants (SqueezeExcite, ECA, GatherExcite, MultiSpectralAttention); cbam_backward_*: the three passes of
// CBAM's (fastattn/modules/hybrid.py, _CBAMTrain).
#include "../cpu/se.h"
#include "common.h"

namespace fastattn {
namespace {

// A float32 contiguous CPU weight of shape (rows, cols), or (rows,) when cols is 0.
void check_weight(const at::Tensor& t, const char* op, const char* name, int64_t rows, int64_t cols) {
  const bool shape_ok =
      cols ? (t.dim() == 2 && t.size(0) == rows && t.size(1) == cols) : (t.dim() == 1 && t.size(0) == rows);
  TORCH_CHECK_VALUE(shape_ok, "fastattn::", op, ": argument '", name, "' must have shape (", rows,
                    cols ? ", " + std::to_string(cols) : std::string(""), "), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "fastattn::", op, ": argument '", name, "' must be float32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), "fastattn::", op, ": argument '", name, "' must be contiguous");
  TORCH_CHECK(t.device().is_cpu(), "fastattn::", op, ": argument '", name, "' must be a CPU tensor, got ", t.device());
}

// x: a 16/32-bit CPU feature map (the kernels compute in fp32 and refuse float64).
DType check_input(const at::Tensor& x, const char* op) {
  check_feature_map(x, op);
  TORCH_CHECK(x.device().is_cpu(), "fastattn::", op, ": this kernel runs on CPU tensors, got 'x' on ", x.device());
  const DType dt = dtype_tag(x, op, "x");
  TORCH_CHECK_TYPE(dt != DType::Float64, "fastattn::", op, ": argument 'x' must be float32, float16 or bfloat16, got ",
                   x.scalar_type());
  return dt;
}

// y = x * sigmoid(w2 relu(w1 mean_hw(x) + b1) + b2) (+ residual); y like torch.empty_like(x).
at::Tensor se_forward(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                      const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                      const std::optional<at::Tensor>& residual) {
  const DType dt = check_input(x, "se_forward");
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(w1.dim() == 2, "fastattn::se_forward: argument 'w1' must be 2-D (hidden, C), got ", w1.sizes());
  const int64_t hidden = w1.size(0);
  check_weight(w1, "se_forward", "w1", hidden, C);
  check_weight(w2, "se_forward", "w2", C, hidden);
  if (b1) check_weight(*b1, "se_forward", "b1", hidden, 0);
  if (b2) check_weight(*b2, "se_forward", "b2", C, 0);
  const at::Tensor* r = residual.has_value() ? &*residual : nullptr;
  if (r) {
    TORCH_CHECK_VALUE(r->sizes() == x.sizes(), "fastattn::se_forward: argument 'residual' must have the shape of 'x' ",
                      x.sizes(), ", got ", r->sizes());
    TORCH_CHECK_TYPE(r->scalar_type() == x.scalar_type(), "fastattn::se_forward: argument 'residual' must have the "
                     "dtype of 'x' (", x.scalar_type(), "), got ", r->scalar_type());
    TORCH_CHECK(r->device().is_cpu(), "fastattn::se_forward: argument 'residual' must be a CPU tensor, got ",
                r->device());
  }
  at::Tensor y = new_output_like(x);
  if (y.numel() == 0) return y;
  TORCH_CHECK_VALUE(x.size(2) * x.size(3) > 0, "fastattn::se_forward: argument 'x' must have H * W >= 1");
  se_forward_cpu(x.data_ptr(), r ? r->data_ptr() : nullptr, y.data_ptr(), dt, x.size(0), C, x.size(2), x.size(3),
                 strides4(x), r ? strides4(*r) : Strides4{0, 0, 0, 0}, strides4(y), w1.data_ptr<float>(),
                 b1 ? b1->data_ptr<float>() : nullptr, w2.data_ptr<float>(), b2 ? b2->data_ptr<float>() : nullptr,
                 hidden);
  return y;
}

// y = x * sigmoid(conv1d over the channels of mean_hw(x)); weight (k,) float32, k odd.
at::Tensor eca_forward(const at::Tensor& x, const at::Tensor& weight) {
  const DType dt = check_input(x, "eca_forward");
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) % 2 == 1, "fastattn::eca_forward: argument 'weight' must be "
                    "1-D with an odd number of taps, got shape ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat, "fastattn::eca_forward: argument 'weight' must be float32, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.is_contiguous() && weight.device().is_cpu(),
                    "fastattn::eca_forward: argument 'weight' must be a contiguous CPU tensor");
  at::Tensor y = new_output_like(x);
  if (y.numel() == 0) return y;
  eca_forward_cpu(x.data_ptr(), y.data_ptr(), dt, x.size(0), x.size(1), x.size(2), x.size(3), strides4(x),
                  strides4(y), weight.data_ptr<float>(), weight.size(0));
  return y;
}

// scSE's weights (float32, contiguous): w1 (hidden, C), b1, w2 (C, hidden), b2, conv_w (C,).
ScseWeights scse_weights(const char* op, int64_t C, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                         const at::Tensor& b2, const at::Tensor& conv_w, double conv_b, c10::string_view combine) {
  TORCH_CHECK_VALUE(w1.dim() == 2, "fastattn::", op, ": argument 'w1' must be 2-D (hidden, C), got ", w1.sizes());
  const int64_t hidden = w1.size(0);
  check_weight(w1, op, "w1", hidden, C);
  check_weight(b1, op, "b1", hidden, 0);
  check_weight(w2, op, "w2", C, hidden);
  check_weight(b2, op, "b2", C, 0);
  check_weight(conv_w, op, "conv_w", C, 0);
  TORCH_CHECK_VALUE(combine == "max" || combine == "add", "fastattn::", op, ": argument 'combine' must be 'max' or "
                    "'add', got '", std::string(combine), "'");
  return ScseWeights{w1.data_ptr<float>(), b1.data_ptr<float>(),    w2.data_ptr<float>(),
                     b2.data_ptr<float>(), hidden,                   conv_w.data_ptr<float>(),
                     static_cast<float>(conv_b), combine == "max"};
}

// scSE: y = max(x g, x s) (combine "max") or x g + x s ("add"); g the cSE gate (w1 (hidden, C),
// b1, w2 (C, hidden), b2), s = sigmoid(conv_w . x + conv_b) the sSE gate (conv_w (C,)), float32.
at::Tensor scse_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                        const at::Tensor& b2, const at::Tensor& conv_w, double conv_b, c10::string_view combine) {
  const char* op = "scse_forward";
  const DType dt = check_input(x, op);
  const int64_t C = x.size(1);
  const ScseWeights weights = scse_weights(op, C, w1, b1, w2, b2, conv_w, conv_b, combine);
  at::Tensor y = new_output_like(x);
  if (y.numel() == 0) return y;
  scse_forward_cpu(x.data_ptr(), y.data_ptr(), dt, x.size(0), C, x.size(2), x.size(3), strides4(x), strides4(y),
                   weights);
  return y;
}

// FcaNet: y = x * sigmoid(w2 relu(w1 d)), d = sum over H x W of x * filter (C, H, W) float32.
at::Tensor fca_forward(const at::Tensor& x, const at::Tensor& filter, const at::Tensor& w1, const at::Tensor& w2) {
  const char* op = "fca_forward";
  const DType dt = check_input(x, op);
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK_VALUE(filter.dim() == 3 && filter.size(0) == C && filter.size(1) == H && filter.size(2) == W,
                    "fastattn::", op, ": argument 'filter' must have shape (C, H, W) = (", C, ", ", H, ", ", W,
                    "), got ", filter.sizes());
  TORCH_CHECK_VALUE(filter.is_contiguous(), "fastattn::", op, ": argument 'filter' must be contiguous");
  check_weight(filter.view({C, H * W}), op, "filter", C, H * W);
  TORCH_CHECK_VALUE(w1.dim() == 2, "fastattn::", op, ": argument 'w1' must be 2-D (hidden, C), got ", w1.sizes());
  const int64_t hidden = w1.size(0);
  check_weight(w1, op, "w1", hidden, C);
  check_weight(w2, op, "w2", C, hidden);
  at::Tensor y = new_output_like(x);
  if (y.numel() == 0) return y;
  fca_forward_cpu(x.data_ptr(), y.data_ptr(), dt, x.size(0), C, H, W, strides4(x), strides4(y),
                  filter.data_ptr<float>(), w1.data_ptr<float>(), w2.data_ptr<float>(), hidden);
  return y;
}

// SRM: y = x * sigmoid(a_mean * mean + a_std * sqrt(unbiased var + eps) + bias), per channel
// over H x W; a_mean, a_std, bias (C,) float32 (the module's cfc and eval BatchNorm folded).
at::Tensor srm_forward(const at::Tensor& x, const at::Tensor& a_mean, const at::Tensor& a_std,
                       const at::Tensor& bias, double eps) {
  const DType dt = check_input(x, "srm_forward");
  const int64_t C = x.size(1);
  check_weight(a_mean, "srm_forward", "a_mean", C, 0);
  check_weight(a_std, "srm_forward", "a_std", C, 0);
  check_weight(bias, "srm_forward", "bias", C, 0);
  TORCH_CHECK_VALUE(x.numel() == 0 || x.size(2) * x.size(3) >= 2, "fastattn::srm_forward: argument 'x' must have "
                    "H * W >= 2 (unbiased variance), got ", x.size(2), " x ", x.size(3));
  at::Tensor y = new_output_like(x);
  if (y.numel() == 0) return y;
  srm_forward_cpu(x.data_ptr(), y.data_ptr(), dt, x.size(0), C, x.size(2), x.size(3), strides4(x), strides4(y),
                  a_mean.data_ptr<float>(), a_std.data_ptr<float>(), bias.data_ptr<float>(), static_cast<float>(eps));
  return y;
}

// CBAM: y = x * Mc * Ms (see cbam_forward_cpu in csrc/cpu/se.h). w1 (hidden, C), b1 (hidden),
// w2 (C, hidden), b2 (C) float32; use_mean / use_max pick the channel pools (at least one);
// conv_weight (2, k, k) float32, k odd, or None for no spatial gate; conv_bias its bias.
at::Tensor cbam_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                        const at::Tensor& b2, bool use_mean, bool use_max, const std::optional<at::Tensor>& conv_weight,
                        double conv_bias) {
  const DType dt = check_input(x, "cbam_forward");
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(w1.dim() == 2, "fastattn::cbam_forward: argument 'w1' must be 2-D (hidden, C), got ", w1.sizes());
  const int64_t hidden = w1.size(0);
  check_weight(w1, "cbam_forward", "w1", hidden, C);
  check_weight(b1, "cbam_forward", "b1", hidden, 0);
  check_weight(w2, "cbam_forward", "w2", C, hidden);
  check_weight(b2, "cbam_forward", "b2", C, 0);
  TORCH_CHECK_VALUE(use_mean || use_max, "fastattn::cbam_forward: at least one of 'use_mean' and 'use_max' must be "
                    "true");
  int64_t k = 0;
  if (conv_weight) {
    const at::Tensor& cw = *conv_weight;
    TORCH_CHECK_VALUE(cw.dim() == 3 && cw.size(0) == 2 && cw.size(1) == cw.size(2) && cw.size(1) % 2 == 1,
                      "fastattn::cbam_forward: argument 'conv_weight' must have shape (2, k, k) with k odd, got ",
                      cw.sizes());
    k = cw.size(1);
    TORCH_CHECK_VALUE(cw.is_contiguous(), "fastattn::cbam_forward: argument 'conv_weight' must be contiguous");
    check_weight(cw.view({2, k * k}), "cbam_forward", "conv_weight", 2, k * k);
  }
  at::Tensor y = new_output_like(x);
  if (y.numel() == 0) return y;
  const CbamWeights weights{w1.data_ptr<float>(), b1.data_ptr<float>(), w2.data_ptr<float>(), b2.data_ptr<float>(),
                            hidden, use_mean, use_max, conv_weight ? conv_weight->data_ptr<float>() : nullptr,
                            static_cast<float>(conv_bias), k};
  cbam_forward_cpu(x.data_ptr(), y.data_ptr(), dt, x.size(0), C, x.size(2), x.size(3), strides4(x), strides4(y),
                   weights);
  return y;
}

// dy and x: CPU feature maps of one shape and dtype (any of the four float dtypes).
DType check_grad_pair(const char* op, const at::Tensor& dy, const at::Tensor& x) {
  check_feature_map(x, op);
  TORCH_CHECK(x.device().is_cpu(), "fastattn::", op, ": this kernel runs on CPU tensors, got 'x' on ", x.device());
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), "fastattn::", op, ": argument 'dy' must have the shape of 'x' ",
                    x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK_TYPE(dy.scalar_type() == x.scalar_type(), "fastattn::", op, ": argument 'dy' must have the dtype of "
                   "'x' (", x.scalar_type(), "), got ", dy.scalar_type());
  TORCH_CHECK(dy.device().is_cpu(), "fastattn::", op, ": argument 'dy' must be a CPU tensor, got ", dy.device());
  return dtype_tag(x, op, "x");
}

// A contiguous CPU tensor of shape (rows, cols) and dtype `want`.
void check_table(const char* op, const at::Tensor& t, const char* name, int64_t rows, int64_t cols,
                 at::ScalarType want) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "fastattn::", op, ": argument '", name,
                    "' must have shape (", rows, ", ", cols, "), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == want, "fastattn::", op, ": argument '", name, "' must be ", want, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous() && t.device().is_cpu(), "fastattn::", op, ": argument '", name,
                    "' must be a contiguous CPU tensor");
}

// (B, C) in x's accumulation dtype: sum over H x W of dy * x.
at::Tensor channel_dot(const at::Tensor& dy, const at::Tensor& x) {
  const DType dt = check_grad_pair("channel_dot", dy, x);
  at::Tensor out = at::zeros({x.size(0), x.size(1)}, x.options().dtype(acc_scalar_type(x)));
  if (x.numel() == 0) return out;
  channel_dot_cpu(dy.data_ptr(), x.data_ptr(), out.data_ptr(), dt, x.size(0), x.size(1), x.size(2), x.size(3),
                  strides4(dy), strides4(x));
  return out;
}

// dx = dy * g + k * x + a (+ e * filter); g, k, a, e (B, C) and filter (C, H, W) contiguous in
// x's accumulation dtype (filter and e both or neither; k None: zero, and x is not read, only its
// shape and strides used); dx like torch.empty_like(x).
at::Tensor channel_scale_affine_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& g,
                                         const std::optional<at::Tensor>& k, const at::Tensor& a,
                                         const std::optional<at::Tensor>& filter, const std::optional<at::Tensor>& e) {
  const char* op = "channel_scale_affine_backward";
  const DType dt = check_grad_pair(op, dy, x);
  const at::ScalarType acc = acc_scalar_type(x);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  TORCH_CHECK_VALUE(filter.has_value() == e.has_value(), "fastattn::", op, ": arguments 'filter' and 'e' must be "
                    "given together");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{g, "g"}, {a, "a"}})
    check_table(op, t, name, B, C, acc);
  if (k) check_table(op, *k, "k", B, C, acc);
  if (filter) {
    check_table(op, *e, "e", B, C, acc);
    TORCH_CHECK_VALUE(filter->dim() == 3 && filter->size(0) == C && filter->size(1) == x.size(2) &&
                          filter->size(2) == x.size(3),
                      "fastattn::", op, ": argument 'filter' must have shape (C, H, W) = (", C, ", ", x.size(2), ", ",
                      x.size(3), "), got ", filter->sizes());
    TORCH_CHECK_VALUE(filter->is_contiguous(), "fastattn::", op, ": argument 'filter' must be contiguous");
    check_table(op, filter->view({C, HW}), "filter", C, HW, acc);
  }
  at::Tensor dx = new_output_like(x);
  if (dx.numel() == 0) return dx;
  channel_scale_affine_backward_cpu(dy.data_ptr(), x.data_ptr(), g.data_ptr(), k ? k->data_ptr() : nullptr, a.data_ptr(),
                                    filter ? filter->data_ptr() : nullptr, e ? e->data_ptr() : nullptr, dx.data_ptr(),
                                    dt, B, C, x.size(2), x.size(3), strides4(dy), strides4(x), strides4(dx));
  return dx;
}

// CBAM's backward passes take NCHW-contiguous x and dy (the module makes dy contiguous).
DType check_nchw(const char* op, const at::Tensor& x, const char* name) {
  check_feature_map(x, op);
  TORCH_CHECK(x.device().is_cpu(), "fastattn::", op, ": this kernel runs on CPU tensors, got '", name, "' on ",
              x.device());
  TORCH_CHECK_VALUE(x.is_contiguous(), "fastattn::", op, ": argument '", name, "' must be NCHW-contiguous, got "
                    "strides ", x.strides());
  return dtype_tag(x, op, name);
}

// Pass 1: (da (B, C), ds (B, H * W)) = (sum_p dy x s, sum_c dy x a), in x's accumulation dtype.
std::tuple<at::Tensor, at::Tensor> cbam_backward_sums(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& a,
                                                      const at::Tensor& s) {
  const char* op = "cbam_backward_sums";
  const DType dt = check_nchw(op, x, "x");
  check_grad_pair(op, dy, x);
  TORCH_CHECK_VALUE(dy.is_contiguous(), "fastattn::", op, ": argument 'dy' must be NCHW-contiguous");
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const at::ScalarType acc = acc_scalar_type(x);
  check_table(op, a, "a", B, C, acc);
  check_table(op, s, "s", B, HW, acc);
  at::Tensor da = at::zeros({B, C}, a.options()), ds = at::zeros({B, HW}, s.options());
  if (x.numel() == 0) return {da, ds};
  cbam_backward_sums_cpu(dy.data_ptr(), x.data_ptr(), a.data_ptr(), s.data_ptr(), da.data_ptr(), ds.data_ptr(), dt, B,
                         C, HW);
  return {da, ds};
}

// Pass 2: da (B, C) = sum_p x (dpmean / C + [idx_c == c] dpmax).
at::Tensor cbam_backward_pool_grad(const at::Tensor& x, const at::Tensor& dpmax, const at::Tensor& dpmean,
                                   const at::Tensor& idx_c) {
  const char* op = "cbam_backward_pool_grad";
  const DType dt = check_nchw(op, x, "x");
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const at::ScalarType acc = acc_scalar_type(x);
  check_table(op, dpmax, "dpmax", B, HW, acc);
  check_table(op, dpmean, "dpmean", B, HW, acc);
  check_table(op, idx_c, "idx_c", B, HW, at::kInt);
  at::Tensor da = at::zeros({B, C}, dpmax.options());
  if (x.numel() == 0) return da;
  cbam_backward_pool_grad_cpu(x.data_ptr(), dpmax.data_ptr(), dpmean.data_ptr(), idx_c.data_ptr<int32_t>(),
                              da.data_ptr(), dt, B, C, HW);
  return da;
}

// Pass 3: dx = dy a s + a dpmean / C + [idx_c == c] a dpmax + dmean / HW + [p == idx_p] dmax.
at::Tensor cbam_backward_dx(const at::Tensor& dy, const at::Tensor& a, const at::Tensor& s, const at::Tensor& dpmax,
                            const at::Tensor& dpmean, const at::Tensor& idx_c, const at::Tensor& dmean,
                            const at::Tensor& dmax, const at::Tensor& idx_p) {
  const char* op = "cbam_backward_dx";
  const DType dt = check_nchw(op, dy, "dy");
  const int64_t B = dy.size(0), C = dy.size(1), HW = dy.size(2) * dy.size(3);
  const at::ScalarType acc = acc_scalar_type(dy);
  check_table(op, a, "a", B, C, acc);
  check_table(op, s, "s", B, HW, acc);
  check_table(op, dpmax, "dpmax", B, HW, acc);
  check_table(op, dpmean, "dpmean", B, HW, acc);
  check_table(op, idx_c, "idx_c", B, HW, at::kInt);
  check_table(op, dmean, "dmean", B, C, acc);
  check_table(op, dmax, "dmax", B, C, acc);
  check_table(op, idx_p, "idx_p", B, C, at::kLong);
  if (idx_p.numel() > 0) {
    const auto range = at::aminmax(idx_p);
    TORCH_CHECK_VALUE(std::get<0>(range).item<int64_t>() >= 0 && std::get<1>(range).item<int64_t>() < HW,
                      "fastattn::", op, ": argument 'idx_p' must hold positions in [0, H * W = ", HW, ")");
  }
  at::Tensor dx = new_output_like(dy);
  if (dx.numel() == 0) return dx;
  cbam_backward_dx_cpu(dy.data_ptr(), a.data_ptr(), s.data_ptr(), dpmax.data_ptr(), dpmean.data_ptr(),
                       idx_c.data_ptr<int32_t>(), dmean.data_ptr(), dmax.data_ptr(), idx_p.data_ptr<int64_t>(),
                       dx.data_ptr(), dt, B, C, HW);
  return dx;
}

// The pooled gate's weights for the training kernels (see PooledGateWeights), checked: either
// the MLP (w1 (hidden, C), w2 (C, hidden), optional biases) or ECA's conv_w (k odd taps); filter
// (C, H, W) for the DCT pool, else the mean. float32, contiguous, CPU.
PooledGateWeights gate_weights(const char* op, int64_t C, int64_t H, int64_t W, const std::optional<at::Tensor>& filter,
                               const std::optional<at::Tensor>& w1, const std::optional<at::Tensor>& b1,
                               const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
                               const std::optional<at::Tensor>& conv_w) {
  PooledGateWeights w{};
  if (filter) {
    TORCH_CHECK_VALUE(filter->dim() == 3 && filter->size(0) == C && filter->size(1) == H && filter->size(2) == W,
                      "fastattn::", op, ": argument 'filter' must have shape (C, H, W) = (", C, ", ", H, ", ", W,
                      "), got ", filter->sizes());
    TORCH_CHECK_VALUE(filter->is_contiguous(), "fastattn::", op, ": argument 'filter' must be contiguous");
    check_weight(filter->view({C, H * W}), op, "filter", C, H * W);
    w.filter = filter->data_ptr<float>();
  }
  TORCH_CHECK_VALUE(conv_w.has_value() != (w1.has_value() || w2.has_value()), "fastattn::", op,
                    ": pass either 'conv_w' (ECA) or 'w1' and 'w2' (an MLP), got ",
                    conv_w ? "both" : "neither");
  if (conv_w) {
    TORCH_CHECK_VALUE(conv_w->dim() == 1 && conv_w->size(0) % 2 == 1, "fastattn::", op,
                      ": argument 'conv_w' must be 1-D with an odd number of taps, got shape ", conv_w->sizes());
    check_weight(*conv_w, op, "conv_w", conv_w->size(0), 0);
    TORCH_CHECK_VALUE(!b1 && !b2, "fastattn::", op, ": ECA's gate ('conv_w') takes no biases");
    w.conv_w = conv_w->data_ptr<float>();
    w.k = conv_w->size(0);
    return w;
  }
  TORCH_CHECK_VALUE(w1 && w2, "fastattn::", op, ": the MLP gate needs both 'w1' and 'w2'");
  TORCH_CHECK_VALUE(w1->dim() == 2, "fastattn::", op, ": argument 'w1' must be 2-D (hidden, C), got ", w1->sizes());
  w.hidden = w1->size(0);
  check_weight(*w1, op, "w1", w.hidden, C);
  check_weight(*w2, op, "w2", C, w.hidden);
  if (b1) check_weight(*b1, op, "b1", w.hidden, 0);
  if (b2) check_weight(*b2, op, "b2", C, 0);
  w.w1 = w1->data_ptr<float>();
  w.w2 = w2->data_ptr<float>();
  w.b1 = b1 ? b1->data_ptr<float>() : nullptr;
  w.b2 = b2 ? b2->data_ptr<float>() : nullptr;
  return w;
}

// The (dy, x) pair of a one-read training backward: NCHW-contiguous CPU x (16/32-bit), dy of its
// shape, dtype and layout, H * W >= 1.
DType check_train_pair(const char* op, const at::Tensor& dy, const at::Tensor& x) {
  check_input(x, op);
  const DType dt = check_nchw(op, x, "x");
  check_grad_pair(op, dy, x);
  TORCH_CHECK_VALUE(dy.is_contiguous(), "fastattn::", op, ": argument 'dy' must be NCHW-contiguous, got strides ",
                    dy.strides());
  TORCH_CHECK_VALUE(x.size(2) * x.size(3) > 0, "fastattn::", op, ": argument 'x' must have H * W >= 1");
  return dt;
}

// scSE training forward in one read of NCHW x: (y, mean (B, C), g (B, C), s (B, H W)), the last
// three float32 (see scse_train_forward_cpu).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scse_train_forward(
    const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
    const at::Tensor& conv_w, double conv_b, c10::string_view combine) {
  const char* op = "scse_train_forward";
  check_input(x, op);
  const DType dt = check_nchw(op, x, "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK_VALUE(H * W > 0, "fastattn::", op, ": argument 'x' must have H * W >= 1");
  const ScseWeights w = scse_weights(op, C, w1, b1, w2, b2, conv_w, conv_b, combine);
  at::Tensor y = new_output_like(x);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({B, C}, f32), g = at::empty({B, C}, f32), s = at::empty({B, H * W}, f32);
  if (y.numel() == 0) return {y, mean, g, s};
  scse_train_forward_cpu(x.data_ptr(), y.data_ptr(), mean.data_ptr<float>(), g.data_ptr<float>(),
                         s.data_ptr<float>(), dt, B, C, H, W, w);
  return {y, mean, g, s};
}

// Its backward in one read of NCHW dy and x: (dx, dg (B, C), dconv_w (B, C), dconv_b (B,)), the
// last three float32 (see scse_train_backward_cpu).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scse_train_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& g, const at::Tensor& s,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& conv_w,
    c10::string_view combine) {
  const char* op = "scse_train_backward";
  const DType dt = check_train_pair(op, dy, x);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  check_table(op, mean, "mean", B, C, at::kFloat);
  check_table(op, g, "g", B, C, at::kFloat);
  check_table(op, s, "s", B, H * W, at::kFloat);
  const ScseWeights w = scse_weights(op, C, w1, b1, w2, b2, conv_w, 0.0, combine);
  at::Tensor dx = new_output_like(x);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dg = at::empty({B, C}, f32), dconv_w = at::empty({B, C}, f32), dconv_b = at::empty({B}, f32);
  if (dx.numel() == 0) return {dx, dg.zero_(), dconv_w.zero_(), dconv_b.zero_()};
  scse_train_backward_cpu(dy.data_ptr(), x.data_ptr(), mean.data_ptr<float>(), g.data_ptr<float>(),
                          s.data_ptr<float>(), dx.data_ptr(), dg.data_ptr<float>(), dconv_w.data_ptr<float>(),
                          dconv_b.data_ptr<float>(), dt, B, C, H, W, w);
  return {dx, dg, dconv_w, dconv_b};
}

// Training forward of y = x * gate(stats(x)) in one read of x: (y, stats (B, C), g (B, C)), the
// statistics and gate float32 (see pooled_gate_train_forward_cpu).
std::tuple<at::Tensor, at::Tensor, at::Tensor> pooled_gate_train_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& filter, const std::optional<at::Tensor>& w1,
    const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
    const std::optional<at::Tensor>& conv_w) {
  const char* op = "pooled_gate_train_forward";
  check_input(x, op);
  const DType dt = check_nchw(op, x, "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK_VALUE(H * W > 0, "fastattn::", op, ": argument 'x' must have H * W >= 1");
  const PooledGateWeights w = gate_weights(op, C, H, W, filter, w1, b1, w2, b2, conv_w);
  at::Tensor y = new_output_like(x);
  at::Tensor stats = at::empty({B, C}, x.options().dtype(at::kFloat));
  at::Tensor g = at::empty({B, C}, x.options().dtype(at::kFloat));
  if (y.numel() == 0) return {y, stats, g};
  pooled_gate_train_forward_cpu(x.data_ptr(), y.data_ptr(), stats.data_ptr<float>(), g.data_ptr<float>(), dt, B, C,
                                H, W, w);
  return {y, stats, g};
}

// Its backward in one read of dy and x: (dx, dg (B, C) float32), from the forward's stats and g
// (see pooled_gate_train_backward_cpu).
std::tuple<at::Tensor, at::Tensor> pooled_gate_train_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& stats, const at::Tensor& g,
    const std::optional<at::Tensor>& filter, const std::optional<at::Tensor>& w1, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2, const std::optional<at::Tensor>& conv_w) {
  const char* op = "pooled_gate_train_backward";
  const DType dt = check_train_pair(op, dy, x);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  check_table(op, stats, "stats", B, C, at::kFloat);
  check_table(op, g, "g", B, C, at::kFloat);
  const PooledGateWeights w = gate_weights(op, C, H, W, filter, w1, b1, w2, b2, conv_w);
  at::Tensor dx = new_output_like(x);
  at::Tensor dg = at::empty({B, C}, x.options().dtype(at::kFloat));
  if (dx.numel() == 0) return {dx, dg};
  pooled_gate_train_backward_cpu(dy.data_ptr(), x.data_ptr(), stats.data_ptr<float>(), g.data_ptr<float>(),
                                 dx.data_ptr(), dg.data_ptr<float>(), dt, B, C, H, W, w);
  return {dx, dg};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_FRAGMENT(fastattn_C, m) {
  m.def("se_forward(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor? residual) -> Tensor");
  m.def("eca_forward(Tensor x, Tensor weight) -> Tensor");
  m.def("scse_forward(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor conv_w, float conv_b, "
        "str combine) -> Tensor");
  m.def("fca_forward(Tensor x, Tensor filter, Tensor w1, Tensor w2) -> Tensor");
  m.def("srm_forward(Tensor x, Tensor a_mean, Tensor a_std, Tensor bias, float eps) -> Tensor");
  m.def("cbam_forward(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, bool use_mean, bool use_max, "
        "Tensor? conv_weight, float conv_bias) -> Tensor");
  m.def("pooled_gate_train_forward(Tensor x, Tensor? filter, Tensor? w1, Tensor? b1, Tensor? w2, Tensor? b2, "
        "Tensor? conv_w) -> (Tensor, Tensor, Tensor)");
  m.def("pooled_gate_train_backward(Tensor dy, Tensor x, Tensor stats, Tensor g, Tensor? filter, Tensor? w1, "
        "Tensor? b1, Tensor? w2, Tensor? b2, Tensor? conv_w) -> (Tensor, Tensor)");
  m.def("scse_train_forward(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor conv_w, float conv_b, "
        "str combine) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("scse_train_backward(Tensor dy, Tensor x, Tensor mean, Tensor g, Tensor s, Tensor w1, Tensor b1, Tensor w2, "
        "Tensor b2, Tensor conv_w, str combine) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("channel_dot(Tensor dy, Tensor x) -> Tensor");
  m.def("channel_scale_affine_backward(Tensor dy, Tensor x, Tensor g, Tensor? k, Tensor a, Tensor? filter, "
        "Tensor? e) -> Tensor");
  m.def("cbam_backward_sums(Tensor dy, Tensor x, Tensor a, Tensor s) -> (Tensor, Tensor)");
  m.def("cbam_backward_pool_grad(Tensor x, Tensor dpmax, Tensor dpmean, Tensor idx_c) -> Tensor");
  m.def("cbam_backward_dx(Tensor dy, Tensor a, Tensor s, Tensor dpmax, Tensor dpmean, Tensor idx_c, Tensor dmean, "
        "Tensor dmax, Tensor idx_p) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("se_forward", &fastattn::se_forward);
  m.impl("eca_forward", &fastattn::eca_forward);
  m.impl("scse_forward", &fastattn::scse_forward);
  m.impl("fca_forward", &fastattn::fca_forward);
  m.impl("srm_forward", &fastattn::srm_forward);
  m.impl("cbam_forward", &fastattn::cbam_forward);
  m.impl("pooled_gate_train_forward", &fastattn::pooled_gate_train_forward);
  m.impl("pooled_gate_train_backward", &fastattn::pooled_gate_train_backward);
  m.impl("scse_train_forward", &fastattn::scse_train_forward);
  m.impl("scse_train_backward", &fastattn::scse_train_backward);
  m.impl("channel_dot", &fastattn::channel_dot);
  m.impl("channel_scale_affine_backward", &fastattn::channel_scale_affine_backward);
  m.impl("cbam_backward_sums", &fastattn::cbam_backward_sums);
  m.impl("cbam_backward_pool_grad", &fastattn::cbam_backward_pool_grad);
  m.impl("cbam_backward_dx", &fastattn::cbam_backward_dx);
}
