// Squeeze-excite inference, one sample per thread: the sample's channel means (read from
// memory), its excitation MLP, then its scale, which re-reads the sample from that core's cache.
#include "se.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastattn {
namespace {

// The mean of one H x W plane (fp32 chunk sums folded in double).
template <typename T>
float plane_mean(const T* p, int64_t H, int64_t W, Strides4 s) {
  const int64_t HW = H * W;
  double total = 0;
  if (plane_contiguous(s, H, W)) {
    // 16 explicit lanes: GCC 12 left an `omp simd reduction` scalar here (inlined into the
    // parallel region), which made this kernel 2x slower than the two-op path.
    for (int64_t i0 = 0; i0 < HW; i0 += kChunk) {
      const int64_t n = std::min(HW - i0, kChunk);
      const T* q = p + i0;
      float lanes[16] = {};
      int64_t i = 0;
      for (; i + 16 <= n; i += 16) {
#pragma omp simd
        for (int j = 0; j < 16; ++j) lanes[j] += to_float(q[i + j]);
      }
      float acc = 0;
      for (; i < n; ++i) acc += to_float(q[i]);
      for (int j = 0; j < 16; ++j) acc += lanes[j];
      total += acc;
    }
  } else {
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) total += to_float(p[h * s.h + w * s.w]);
  }
  return static_cast<float>(total / static_cast<double>(HW));
}

// y = x * g (+ r) over one H x W plane.
template <typename T>
void plane_scale(const T* x, const T* r, T* y, float g, int64_t H, int64_t W, Strides4 sx, Strides4 sr,
                 Strides4 sy) {
  const int64_t HW = H * W;
  if (plane_contiguous(sx, H, W) && plane_contiguous(sy, H, W) && (!r || plane_contiguous(sr, H, W))) {
    if (r) {
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) y[i] = store<T>(to_float(x[i]) * g + to_float(r[i]));
    } else {
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) y[i] = store<T>(to_float(x[i]) * g);
    }
    return;
  }
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; ++w) {
      float v = to_float(x[h * sx.h + w * sx.w]) * g;
      if (r) v += to_float(r[h * sr.h + w * sr.w]);
      y[h * sy.h + w * sy.w] = store<T>(v);
    }
}

// g = sigmoid(w2 relu(w1 mean + b1) + b2) for one sample; `hid` is scratch of `hidden` floats.
void excite(const float* mean, int64_t C, const float* w1, const float* b1, const float* w2, const float* b2,
            int64_t hidden, float* hid, float* g) {
  for (int64_t j = 0; j < hidden; ++j) {
    const float* row = w1 + j * C;
    float acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < C; ++c) acc += row[c] * mean[c];
    acc += b1 ? b1[j] : 0.0f;
    hid[j] = acc > 0.0f ? acc : 0.0f;
  }
  for (int64_t c = 0; c < C; ++c) {
    const float* row = w2 + c * hidden;
    float acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < hidden; ++j) acc += row[j] * hid[j];
    acc += b2 ? b2[c] : 0.0f;
    g[c] = 1.0f / (1.0f + std::exp(-acc));
  }
}

// ECA: g = sigmoid(conv1d(mean, w)) along the channels, k taps, zero padding (k - 1) / 2.
void eca_excite(const float* mean, int64_t C, const float* w, int64_t k, float* g) {
  const int64_t pad = (k - 1) / 2;
  for (int64_t c = 0; c < C; ++c) {
    float acc = 0;
    for (int64_t t = 0; t < k; ++t) {
      const int64_t i = c - pad + t;
      if (i >= 0 && i < C) acc += w[t] * mean[i];
    }
    g[c] = 1.0f / (1.0f + std::exp(-acc));
  }
}

// One sample per thread: its means, its gate (excite(mean, g, scratch)), its scale, while the
// sample is in that core's cache.
template <typename T, typename Excite>
void one_read(const T* x, const T* r, T* y, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sr,
              Strides4 sy, int64_t scratch, const Excite& excite) {
#pragma omp parallel
  {
    std::vector<float> mean(static_cast<size_t>(C)), g(static_cast<size_t>(C)), tmp(static_cast<size_t>(scratch));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) mean[c] = plane_mean(x + b * sx.b + c * sx.c, H, W, sx);
      excite(mean.data(), g.data(), tmp.data());
      for (int64_t c = 0; c < C; ++c)
        plane_scale(x + b * sx.b + c * sx.c, r ? r + b * sr.b + c * sr.c : nullptr, y + b * sy.b + c * sy.c, g[c],
                    H, W, sx, sr, sy);
    }
  }
}

}  // namespace

void se_forward_cpu(const void* x, const void* r, void* y, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                    Strides4 sx, Strides4 sr, Strides4 sy, const float* w1, const float* b1, const float* w2,
                    const float* b2, int64_t hidden) {
  const auto mlp = [=](const float* mean, float* g, float* hid) { excite(mean, C, w1, b1, w2, b2, hidden, hid, g); };
  switch (dtype) {
    case DType::Float32:
      return one_read(static_cast<const float*>(x), static_cast<const float*>(r), static_cast<float*>(y), B, C, H,
                      W, sx, sr, sy, hidden, mlp);
    case DType::Float16:
      return one_read(static_cast<const fp16_t*>(x), static_cast<const fp16_t*>(r), static_cast<fp16_t*>(y), B, C,
                      H, W, sx, sr, sy, hidden, mlp);
    case DType::BFloat16:
      return one_read(static_cast<const bf16_t*>(x), static_cast<const bf16_t*>(r), static_cast<bf16_t*>(y), B, C,
                      H, W, sx, sr, sy, hidden, mlp);
    case DType::Float64:
      break;  // refused by the binding
  }
}

void eca_forward_cpu(const void* x, void* y, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                     Strides4 sy, const float* w, int64_t k) {
  const auto conv = [=](const float* mean, float* g, float*) { eca_excite(mean, C, w, k, g); };
  switch (dtype) {
    case DType::Float32:
      return one_read(static_cast<const float*>(x), static_cast<const float*>(nullptr), static_cast<float*>(y), B,
                      C, H, W, sx, Strides4{0, 0, 0, 0}, sy, 0, conv);
    case DType::Float16:
      return one_read(static_cast<const fp16_t*>(x), static_cast<const fp16_t*>(nullptr), static_cast<fp16_t*>(y),
                      B, C, H, W, sx, Strides4{0, 0, 0, 0}, sy, 0, conv);
    case DType::BFloat16:
      return one_read(static_cast<const bf16_t*>(x), static_cast<const bf16_t*>(nullptr), static_cast<bf16_t*>(y),
                      B, C, H, W, sx, Strides4{0, 0, 0, 0}, sy, 0, conv);
    case DType::Float64:
      break;  // refused by the binding
  }
}

}  // namespace fastattn
