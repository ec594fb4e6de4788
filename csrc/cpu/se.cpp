// Squeeze-excite-like inference (SE, ECA, SRM, CBAM), one sample per thread: the sample's plane
// statistics (read from memory), its gate, then its scale, which re-reads the sample from that
// core's cache.
#include "se.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "stream.h"

namespace fastattn {
namespace {

// Sum of 16 lanes as a tree (four vector steps): the sequential sum was a 16-add dependency
// chain, a large share of the time on 7 x 7 planes.
inline float lane_sum(float* l) {
  for (int w = 8; w > 0; w >>= 1) {
#pragma omp simd
    for (int j = 0; j < w; ++j) l[j] += l[j + w];
  }
  return l[0];
}

// Sum of n products p[i] q[i] (r[i]) (r null: without it), in 16 explicit lanes of the math type A
// (an `omp simd reduction` stayed scalar under GCC 12 here), fp32 chunks of kChunk folded in
// double. The dot products of the DCT pool, the MLPs and the training passes.
template <typename A, typename P, typename Q>
double lane_dot(const P* p, const Q* q, const A* r, int64_t n) {
  double total = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t m = std::min(n - i0, kChunk);
    A lanes[16] = {};
    int64_t i = 0;
    for (; i + 16 <= m; i += 16) {
#pragma omp simd
      for (int j = 0; j < 16; ++j) {
        const int64_t k = i0 + i + j;
        lanes[j] += static_cast<A>(to_float(p[k])) * static_cast<A>(to_float(q[k])) * (r ? r[k] : A(1));
      }
    }
    A acc = 0;
    for (; i < m; ++i) {
      const int64_t k = i0 + i;
      acc += static_cast<A>(to_float(p[k])) * static_cast<A>(to_float(q[k])) * (r ? r[k] : A(1));
    }
    for (int w = 8; w > 0; w >>= 1)
      for (int j = 0; j < w; ++j) lanes[j] += lanes[j + w];
    total += static_cast<double>(acc + lanes[0]);
  }
  return total;
}

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
      total += acc + lane_sum(lanes);
    }
  } else {
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) total += to_float(p[h * s.h + w * s.w]);
  }
  return static_cast<float>(total / static_cast<double>(HW));
}

// sum over one H x W plane of x * f (f: H x W contiguous floats; FcaNet's DCT pool).
template <typename T>
float plane_filter_dot(const T* p, const float* f, int64_t H, int64_t W, Strides4 s) {
  if (plane_contiguous(s, H, W)) return static_cast<float>(lane_dot(p, f, static_cast<const float*>(nullptr), H * W));
  double total = 0;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; ++w) total += static_cast<double>(to_float(p[h * s.h + w * s.w])) * f[h * W + w];
  return static_cast<float>(total);
}

// Per channel, the first row of the run of bitwise-equal consecutive rows of filter (C, HW) that
// channel's row belongs to. FcaNet repeats each frequency's row over C / n_freq channels, so the
// kernels then keep n_freq rows in cache instead of C: at 1024 x 14 x 14 the whole filter
// (800 KB) is as large as a sample and competed with it for L2 (fca_forward at 32 x 1024 x 14 x 14
// 3.27 -> 2.97 ms on the 2-vCPU Xeon VM). Equal bits give equal products: results do not change.
template <typename F>
std::vector<const F*> shared_filter_rows(const F* filter, int64_t C, int64_t HW) {
  std::vector<const F*> rows(static_cast<size_t>(C));
  const F* first = filter;
  for (int64_t c = 0; c < C; ++c) {
    const F* row = filter + c * HW;
    if (std::memcmp(row, first, static_cast<size_t>(HW) * sizeof(F)) != 0) first = row;
    rows[c] = first;
  }
  return rows;
}

// y = x * g (+ r) over one H x W plane; `stream`: fp32 streaming stores (outputs far larger
// than the cache, see stream.h).
template <typename T>
void plane_scale(const T* x, const T* r, T* y, float g, int64_t H, int64_t W, Strides4 sx, Strides4 sr,
                 Strides4 sy, bool stream) {
  const int64_t HW = H * W;
  if (plane_contiguous(sx, H, W) && plane_contiguous(sy, H, W) && (!r || plane_contiguous(sr, H, W))) {
    if constexpr (std::is_same<T, float>::value) {
      if (stream) {
        const vfloat vg = vbroadcast(g);
        if (r)
          stream_row_f32(y, HW, [&](int64_t i) { return vfma(vload(x + i), vg, vload(r + i)); },
                         [&](int64_t i) { return x[i] * g + r[i]; });
        else
          stream_row_f32(y, HW, [&](int64_t i) { return vmul(vload(x + i), vg); }, [&](int64_t i) { return x[i] * g; });
        return;
      }
    }
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

// Whether the one-read kernels write this output (B x C x H x W of T) with streaming stores.
template <typename T>
bool stream_stores(int64_t B, int64_t C, int64_t H, int64_t W) {
  return std::is_same<T, float>::value && stream_output(B * C * H * W * static_cast<int64_t>(sizeof(T)));
}

// NaN-propagating max, as torch.amax (a NaN wins; once m is NaN it stays NaN).
inline float nan_max(float m, float v) { return (v > m || v != v) ? v : m; }

// Mean and max of one H x W plane in one read (the max as torch.amax, NaN propagating).
template <typename T>
void plane_mean_max(const T* p, int64_t H, int64_t W, Strides4 s, float* mean, float* max) {
  const int64_t HW = H * W;
  double total = 0;
  float m = -INFINITY;
  if (plane_contiguous(s, H, W)) {
    float mlanes[16];
    for (int j = 0; j < 16; ++j) mlanes[j] = -INFINITY;
    for (int64_t i0 = 0; i0 < HW; i0 += kChunk) {
      const int64_t n = std::min(HW - i0, kChunk);
      const T* q = p + i0;
      float lanes[16] = {};
      int64_t i = 0;
      for (; i + 16 <= n; i += 16) {
#pragma omp simd
        for (int j = 0; j < 16; ++j) {
          const float v = to_float(q[i + j]);
          lanes[j] += v;
          mlanes[j] = nan_max(mlanes[j], v);
        }
      }
      float acc = 0;
      for (; i < n; ++i) {
        const float v = to_float(q[i]);
        acc += v;
        m = nan_max(m, v);
      }
      total += acc + lane_sum(lanes);
    }
    for (int w = 8; w > 0; w >>= 1) {  // a tree, as lane_sum (the scalar chain was a fifth of CBAM's time)
#pragma omp simd
      for (int j = 0; j < w; ++j) mlanes[j] = nan_max(mlanes[j], mlanes[j + w]);
    }
    m = nan_max(m, mlanes[0]);
  } else {
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const float v = to_float(p[h * s.h + w * s.w]);
        total += v;
        m = nan_max(m, v);
      }
  }
  *mean = static_cast<float>(total / static_cast<double>(HW));
  *max = m;
}

// Mean and sqrt(unbiased variance + eps) of one H x W plane: the mean from memory, the squared
// deviations from the plane's second read, which hits the core's cache (two-pass variance).
template <typename T>
void plane_mean_std(const T* p, int64_t H, int64_t W, Strides4 s, float eps, float* mean, float* std_out) {
  const int64_t HW = H * W;
  const float mu = plane_mean(p, H, W, s);
  double total = 0;
  if (plane_contiguous(s, H, W)) {
    for (int64_t i0 = 0; i0 < HW; i0 += kChunk) {
      const int64_t n = std::min(HW - i0, kChunk);
      const T* q = p + i0;
      float lanes[16] = {};
      int64_t i = 0;
      for (; i + 16 <= n; i += 16) {
#pragma omp simd
        for (int j = 0; j < 16; ++j) {
          const float d = to_float(q[i + j]) - mu;
          lanes[j] += d * d;
        }
      }
      float acc = 0;
      for (; i < n; ++i) {
        const float d = to_float(q[i]) - mu;
        acc += d * d;
      }
      total += acc + lane_sum(lanes);
    }
  } else {
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const double d = to_float(p[h * s.h + w * s.w]) - mu;
        total += d * d;
      }
  }
  *mean = mu;
  *std_out = std::sqrt(static_cast<float>(total / static_cast<double>(HW - 1)) + eps);
}

inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

// hid += relu(w1 v + b1) for one sample's pooled vector v (C); w1 (hidden, C).
void mlp_hidden_add(const float* v, int64_t C, const float* w1, const float* b1, int64_t hidden, float* hid) {
  for (int64_t j = 0; j < hidden; ++j) {
    const float acc =
        static_cast<float>(lane_dot(w1 + j * C, v, static_cast<const float*>(nullptr), C)) + (b1 ? b1[j] : 0.0f);
    hid[j] += acc < 0.0f ? 0.0f : acc;  // NaN passes, as torch.relu
  }
}

// out = w2 hid + n_bias * b2 (C). w2t is w2 transposed (hidden, C), so that this is `hidden`
// contiguous vector updates rather than C short dot products (a horizontal sum each). CBAM sums
// its MLP over two pools: the second layer is linear, so it runs once on the summed hidden
// activations (n_bias = 2).
void mlp_output(const float* hid, int64_t C, const float* w2t, const float* b2, float n_bias, int64_t hidden,
                float* out) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) out[c] = b2 ? n_bias * b2[c] : 0.0f;
  for (int64_t j = 0; j < hidden; ++j) {
    const float* row = w2t + j * C;
    const float h = hid[j];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] += row[c] * h;
  }
}

// SE's gate for one sample: g = sigmoid(w2 relu(w1 v + b1) + b2) (biases may be null); `hid` is
// scratch of `hidden` floats.
void se_gate(const float* v, int64_t C, const float* w1, const float* b1, const float* w2t, const float* b2,
             int64_t hidden, float* hid, float* g) {
  std::fill(hid, hid + hidden, 0.0f);
  mlp_hidden_add(v, C, w1, b1, hidden, hid);
  mlp_output(hid, C, w2t, b2, 1.0f, hidden, g);
  for (int64_t c = 0; c < C; ++c) g[c] = sigmoid(g[c]);
}

// w (rows, cols) row-major, transposed into a new (cols, rows) buffer.
// In 16 x 16 tiles: column by column, a 2 MB matrix (scSE's at C = 1024) read one float per cache line.
std::vector<float> transposed(const float* w, int64_t rows, int64_t cols) {
  std::vector<float> t(static_cast<size_t>(rows * cols));
  constexpr int64_t kTile = 16;
#pragma omp parallel for schedule(static) if (rows * cols >= 16384)
  for (int64_t c0 = 0; c0 < cols; c0 += kTile)
    for (int64_t r0 = 0; r0 < rows; r0 += kTile)
      for (int64_t c = c0; c < std::min(cols, c0 + kTile); ++c)
        for (int64_t r = r0; r < std::min(rows, r0 + kTile); ++r) t[c * rows + r] = w[r * cols + c];
  return t;
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
    g[c] = sigmoid(acc);
  }
}

// A run of samples per thread: each plane's statistics (pool(plane, c, stats + nstats * c)), the
// sample's gate (excite(stats, g, scratch)), its scale, while the sample is in that core's cache.
// stats_out, g_out (B x nstats * C, B x C; may be null): the statistics and gates, for training.
template <typename T, typename Pool, typename Excite>
void one_read(const T* x, const T* r, T* y, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sr,
              Strides4 sy, int64_t nstats, const Pool& pool, int64_t scratch, const Excite& excite,
              float* stats_out = nullptr, float* g_out = nullptr) {
  const bool stream = stream_stores<T>(B, C, H, W);
#pragma omp parallel
  {
    std::vector<float> stats(static_cast<size_t>(nstats * C)), next_stats(static_cast<size_t>(nstats * C)),
        g(static_cast<size_t>(C)), tmp(static_cast<size_t>(scratch));
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t b0 = B * t / nt, b1 = B * (t + 1) / nt;   // this thread's samples
    // Staggered: sample b's scale (x from the cache) alternates plane by plane with sample b + 1's
    // statistics (x from memory), so memory stays busy, when two samples per thread fit twice over
    // in the last-level cache (6-8% faster at 32 x 1024 x 14 x 14); else one sample after another.
    const bool stagger = 4 * nt * C * H * W * static_cast<int64_t>(sizeof(T)) <= llc_bytes();
    auto stats_of = [&](int64_t b, float* out) {
      for (int64_t c = 0; c < C; ++c) pool(x + b * sx.b + c * sx.c, c, out + nstats * c);
    };
    if (b0 < b1 && stagger) stats_of(b0, stats.data());
    for (int64_t b = b0; b < b1; ++b) {
      if (!stagger) stats_of(b, stats.data());
      excite(stats.data(), g.data(), tmp.data());
      if (stats_out) std::copy(stats.begin(), stats.end(), stats_out + b * nstats * C);
      if (g_out) std::copy(g.begin(), g.end(), g_out + b * C);
      const bool next = stagger && b + 1 < b1;
      for (int64_t c = 0; c < C; ++c) {
        plane_scale(x + b * sx.b + c * sx.c, r ? r + b * sr.b + c * sr.c : nullptr, y + b * sy.b + c * sy.c, g[c],
                    H, W, sx, sr, sy, stream);
        if (next) pool(x + (b + 1) * sx.b + c * sx.c, c, next_stats.data() + nstats * c);
      }
      std::swap(stats, next_stats);
    }
    if (stream) stream_fence();
  }
}

// Channels_last (channels unit-stride in x, y and r): one sample per thread, its channel means
// summed pixel by pixel into C lanes (fp32 runs of kMeanRun pixels folded into double), its gate
// (excite(mean, g, scratch)), then y[p, :] = x[p, :] g (+ r[p, :]) from the core's cache.
constexpr int64_t kMeanRun = 256;

template <typename T, typename Excite>
void one_read_channels_last(const T* x, const T* r, T* y, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                            Strides4 sr, Strides4 sy, int64_t scratch, const Excite& excite) {
  const bool stream = stream_stores<T>(B, C, H, W) && C % 16 == 0;
  const int64_t HW = H * W;
#pragma omp parallel
  {
    std::vector<float> run(static_cast<size_t>(C)), g(static_cast<size_t>(C)), tmp(static_cast<size_t>(scratch));
    std::vector<double> total(static_cast<size_t>(C));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t p0 = 0; p0 < HW; p0 += kMeanRun) {
        std::fill(run.begin(), run.end(), 0.0f);
        float* acc = run.data();
        for (int64_t p = p0; p < std::min(HW, p0 + kMeanRun); ++p) {
          const T* row = x + b * sx.b + (p / W) * sx.h + (p % W) * sx.w;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) acc[c] += to_float(row[c]);
        }
        for (int64_t c = 0; c < C; ++c) total[c] += acc[c];
      }
      for (int64_t c = 0; c < C; ++c) run[c] = static_cast<float>(total[c] / static_cast<double>(HW));
      excite(run.data(), g.data(), tmp.data());
      const float* gp = g.data();
      for (int64_t p = 0; p < HW; ++p) {
        const int64_t h = p / W, w = p % W;
        const T* xr = x + b * sx.b + h * sx.h + w * sx.w;
        const T* rr = r ? r + b * sr.b + h * sr.h + w * sr.w : nullptr;
        T* yr = y + b * sy.b + h * sy.h + w * sy.w;
        if constexpr (std::is_same<T, float>::value) {
          if (stream) {
            if (rr)
              stream_row_f32(yr, C, [&](int64_t c) { return vfma(vload(xr + c), vload(gp + c), vload(rr + c)); },
                             [&](int64_t c) { return xr[c] * gp[c] + rr[c]; });
            else
              stream_row_f32(yr, C, [&](int64_t c) { return vmul(vload(xr + c), vload(gp + c)); },
                             [&](int64_t c) { return xr[c] * gp[c]; });
            continue;
          }
        }
        if (rr) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) yr[c] = store<T>(to_float(xr[c]) * gp[c] + to_float(rr[c]));
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) yr[c] = store<T>(to_float(xr[c]) * gp[c]);
        }
      }
    }
    if (stream) stream_fence();
  }
}

// Whether the one-read mean kernels take the channels_last loop: channels unit-stride in every
// operand and the planes not (an NCHW map with C or H * W of 1 keeps the plane loop).
inline bool channels_last_operands(int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sy, const void* r,
                                   Strides4 sr) {
  return C > 1 && sx.c == 1 && sy.c == 1 && (!r || sr.c == 1) && !plane_contiguous(sx, H, W);
}

// CBAM's spatial stage for one sample whose channel gate g is known: [max, mean] over the
// channels of x * g (map: 2 x H x W), the k x k conv (weights 2 x k x k, BN folded into them and
// `bias`), its sigmoid (s: H x W), and y = x * g * s.
template <typename T>
void cbam_spatial(const T* x, T* y, int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sy, const float* g,
                  const float* cw, float bias, int64_t k, float* map, float* s, bool stream) {
  const int64_t HW = H * W;
  float* mx = map;
  float* sm = map + HW;
  std::fill(mx, mx + HW, -INFINITY);
  std::fill(sm, sm + HW, 0.0f);
  const bool contiguous = plane_contiguous(sx, H, W) && plane_contiguous(sy, H, W);
  for (int64_t c = 0; c < C; ++c) {
    const T* q = x + c * sx.c;
    const float gc = g[c];
    if (contiguous) {
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) {
        const float v = to_float(q[i]) * gc;
        mx[i] = nan_max(mx[i], v);
        sm[i] += v;
      }
    } else {
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
          const float v = to_float(q[h * sx.h + w * sx.w]) * gc;
          mx[h * W + w] = nan_max(mx[h * W + w], v);
          sm[h * W + w] += v;
        }
    }
  }
  const float inv_c = 1.0f / static_cast<float>(C);
  for (int64_t i = 0; i < HW; ++i) sm[i] *= inv_c;
  // The conv, zero padded, one tap at a time over whole rows (vectorised along W).
  const int64_t pad = (k - 1) / 2;
  std::fill(s, s + HW, bias);
  for (int64_t ch = 0; ch < 2; ++ch)
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) {
        const float wt = cw[(ch * k + i) * k + j];
        const int64_t dh = i - pad, dw = j - pad;
        const int64_t h0 = std::max<int64_t>(0, -dh), h1 = std::min<int64_t>(H, H - dh);
        const int64_t w0 = std::max<int64_t>(0, -dw), w1 = std::min<int64_t>(W, W - dw);
        for (int64_t h = h0; h < h1; ++h) {
          float* out = s + h * W;
          const float* in = map + ch * HW + (h + dh) * W + dw;
#pragma omp simd
          for (int64_t w = w0; w < w1; ++w) out[w] += wt * in[w];
        }
      }
  for (int64_t i = 0; i < HW; ++i) s[i] = sigmoid(s[i]);
  for (int64_t c = 0; c < C; ++c) {
    const T* q = x + c * sx.c;
    T* o = y + c * sy.c;
    const float gc = g[c];
    if constexpr (std::is_same<T, float>::value) {
      if (contiguous && stream) {
        const vfloat vg = vbroadcast(gc);
        stream_row_f32(o, HW, [&](int64_t i) { return vmul(vmul(vload(q + i), vg), vload(s + i)); },
                       [&](int64_t i) { return q[i] * gc * s[i]; });
        continue;
      }
    }
    if (contiguous) {
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) o[i] = store<T>(to_float(q[i]) * gc * s[i]);
    } else {
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w)
          o[h * sy.h + w * sy.w] = store<T>(to_float(q[h * sx.h + w * sx.w]) * gc * s[h * W + w]);
    }
  }
}

// CBAM inference, one sample per thread: the channel pools (mean and max in one read), the
// shared MLP, then (with a conv) the spatial stage from the core's cache, else y = x * g.
template <typename T>
void cbam_one_read(const T* x, T* y, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sy,
                   const CbamWeights& p) {
  const int64_t HW = H * W;
  const std::vector<float> w2t_buffer = transposed(p.w2, C, p.hidden);
  const float* w2t = w2t_buffer.data();
  const bool stream = stream_stores<T>(B, C, H, W);
#pragma omp parallel
  {
    std::vector<float> mean(static_cast<size_t>(C)), max(static_cast<size_t>(C)), g(static_cast<size_t>(C)),
        hid(static_cast<size_t>(p.hidden)), map(p.conv_weight ? static_cast<size_t>(2 * HW) : 0),
        s(p.conv_weight ? static_cast<size_t>(HW) : 0);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const T* xb = x + b * sx.b;
      T* yb = y + b * sy.b;
      for (int64_t c = 0; c < C; ++c) plane_mean_max(xb + c * sx.c, H, W, sx, &mean[c], &max[c]);
      std::fill(hid.begin(), hid.end(), 0.0f);
      if (p.use_mean) mlp_hidden_add(mean.data(), C, p.w1, p.b1, p.hidden, hid.data());
      if (p.use_max) mlp_hidden_add(max.data(), C, p.w1, p.b1, p.hidden, hid.data());
      mlp_output(hid.data(), C, w2t, p.b2, static_cast<float>(p.use_mean + p.use_max), p.hidden, g.data());
      for (int64_t c = 0; c < C; ++c) g[c] = sigmoid(g[c]);
      if (p.conv_weight) {
        cbam_spatial(xb, yb, C, H, W, sx, sy, g.data(), p.conv_weight, p.conv_bias, p.kernel_size, map.data(),
                     s.data(), stream);
      } else {
        for (int64_t c = 0; c < C; ++c)
          plane_scale(xb + c * sx.c, static_cast<const T*>(nullptr), yb + c * sy.c, g[c], H, W, sx, sx, sy, stream);
      }
    }
    if (stream) stream_fence();
  }
}

// Samples per group of the scSE kernels: the cSE MLP runs on a group's vectors at once, reading
// each weight row once for all of them. scSE's default reduction 2 gives large weights (4 MB at
// C = 1024: more than a 14 x 14 sample, and beyond L2), which one sample at a time reads whole per
// sample (the forward kernel at 32 x 1024 x 14 x 14 spent half its time there). A group, `bytes`
// per sample, must stay in the last-level cache between the two passes; at most 8, and at most
// the samples per thread (every thread busy).
int64_t scse_group(int64_t B, int64_t bytes) {
  const int64_t nt = omp_get_max_threads();
  const int64_t fit = llc_bytes() / std::max<int64_t>(1, 2 * nt * bytes);
  return std::max<int64_t>(1, std::min({fit, int64_t(8), (B + nt - 1) / nt}));
}

// out[r] = sum_i w[r * ld + i] v[i] (i < n) for the `rows` (<= 4) rows of w: one sweep of v, an
// accumulator per row. Cached matrix-vector products are bound by the latency of their adds: one
// accumulator per dot product (lane_dot) ran the scSE MLP at a quarter of this speed. fp32 sums
// (n is a channel count, far below the chunks where the pooled sums fold into double).
inline void row_dots(const float* w, int64_t ld, int64_t rows, const float* v, int64_t n, float* out) {
  const float* r[4];
  for (int64_t q = 0; q < 4; ++q) r[q] = w + std::min(q, rows - 1) * ld;   // short blocks repeat a row
  float s[4] = {0, 0, 0, 0};
  int64_t i = 0;
  if constexpr (kVecWidth > 0) {
    vfloat a0 = vbroadcast(0.0f), a1 = a0, a2 = a0, a3 = a0;
    for (; i + kVecWidth <= n; i += kVecWidth) {
      const vfloat x = vload(v + i);
      a0 = vfma(vload(r[0] + i), x, a0);
      a1 = vfma(vload(r[1] + i), x, a1);
      a2 = vfma(vload(r[2] + i), x, a2);
      a3 = vfma(vload(r[3] + i), x, a3);
    }
    s[0] = vsum(a0), s[1] = vsum(a1), s[2] = vsum(a2), s[3] = vsum(a3);
  }
  for (; i < n; ++i)
    for (int64_t q = 0; q < 4; ++q) s[q] += r[q][i] * v[i];
  for (int64_t q = 0; q < rows; ++q) out[q] = s[q];
}

// SE's gate for n samples at once (see se_gate): v, g are n x C, hid n x hidden scratch. Each row of
// w1 and w2 (C, hidden) is read from memory once for the n samples. Both layers as dot products of
// weight rows (row_dots): the second as updates of g along rows of w2 transposed (mlp_output's
// form) was bound by its loads and stores of g.
void se_gate_group(const float* v, int64_t n, int64_t C, const float* w1, const float* b1, const float* w2,
                   const float* b2, int64_t hidden, float* hid, float* g) {
  for (int64_t j = 0; j < hidden; j += 4) {
    const int64_t rows = std::min<int64_t>(4, hidden - j);
    for (int64_t k = 0; k < n; ++k) {
      float acc[4];
      row_dots(w1 + j * C, C, rows, v + k * C, C, acc);
      for (int64_t q = 0; q < rows; ++q) {
        const float a = acc[q] + (b1 ? b1[j + q] : 0.0f);
        hid[k * hidden + j + q] = a < 0.0f ? 0.0f : a;   // NaN passes, as torch.relu
      }
    }
  }
  for (int64_t c = 0; c < C; c += 4) {
    const int64_t rows = std::min<int64_t>(4, C - c);
    for (int64_t k = 0; k < n; ++k) {
      float acc[4];
      row_dots(w2 + c * hidden, hidden, rows, hid + k * hidden, hidden, acc);
      for (int64_t q = 0; q < rows; ++q) g[k * C + c + q] = sigmoid(acc[q] + (b2 ? b2[c + q] : 0.0f));
    }
  }
}

// scSE inference, a group of samples (scse_group) per step, each thread its own groups. Pass 1
// (from memory): each plane's mean and its share of the spatial squeeze s[p] += conv_w[c] x[c, p];
// then the cSE MLP of the group (g) and s = sigmoid(s + bias); pass 2 (from the core's cache):
// y = max(x g, x s) (NaN-propagating, as torch.maximum) or x g + x s. mean_out, g_out (B x C) and
// s_out (B x H W), when set: each sample's channel means, cSE gate and sSE gate, for training.
template <typename T>
void scse_one_read(const T* x, T* y, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx, Strides4 sy,
                   const ScseWeights& p, float* mean_out = nullptr, float* g_out = nullptr, float* s_out = nullptr) {
  const int64_t HW = H * W;
  const bool contiguous = plane_contiguous(sx, H, W) && plane_contiguous(sy, H, W);
  const bool stream = contiguous && stream_stores<T>(B, C, H, W);
  const int64_t G = scse_group(B, C * HW * static_cast<int64_t>(sizeof(T)));
  // Planes of at most 4 KiB are prefetched ahead (32x1024x14x14: forward 4.55 -> 4.19 ms,
  // training 18.4 -> 17.0 ms on the Xeon VM; no gain on 56 x 56 planes)
  const bool small_planes = HW * static_cast<int64_t>(sizeof(T)) <= kAheadBytes;
#pragma omp parallel
  {
    std::vector<float> mean(static_cast<size_t>(G * C)), g(static_cast<size_t>(G * C)),
        hid(static_cast<size_t>(G * p.hidden)), sp(static_cast<size_t>(G * HW));
#pragma omp for schedule(static)
    for (int64_t b0 = 0; b0 < B; b0 += G) {
      const int64_t n = std::min(G, B - b0);
      std::fill(sp.begin(), sp.end(), 0.0f);
      for (int64_t k = 0; k < n; ++k) {
        const int64_t b = b0 + k;
        float* s = sp.data() + k * HW;
        for (int64_t c = 0; c < C; ++c) {
          const T* q = x + b * sx.b + c * sx.c;
          const float wc = p.conv_w[c];
          if (contiguous && small_planes) prefetch_ahead(q, HW);
          mean[k * C + c] = plane_mean(q, H, W, sx);   // the plane is in L1 for the conv's read below
          if (contiguous) {
#pragma omp simd
            for (int64_t i = 0; i < HW; ++i) s[i] += wc * to_float(q[i]);
          } else {
            for (int64_t h = 0; h < H; ++h)
              for (int64_t w = 0; w < W; ++w) s[h * W + w] += wc * to_float(q[h * sx.h + w * sx.w]);
          }
        }
      }
      se_gate_group(mean.data(), n, C, p.w1, p.b1, p.w2, p.b2, p.hidden, hid.data(), g.data());
      for (int64_t i = 0; i < n * HW; ++i) sp[i] = sigmoid(sp[i] + p.conv_b);
      if (mean_out) {
        std::copy(mean.begin(), mean.begin() + n * C, mean_out + b0 * C);
        std::copy(g.begin(), g.begin() + n * C, g_out + b0 * C);
        std::copy(sp.begin(), sp.begin() + n * HW, s_out + b0 * HW);
      }
      for (int64_t k = 0; k < n; ++k) {
        const int64_t b = b0 + k;
        const float* s = sp.data() + k * HW;
        for (int64_t c = 0; c < C; ++c) {
          const T* q = x + b * sx.b + c * sx.c;
          T* o = y + b * sy.b + c * sy.c;
          const float gc = g[k * C + c];
          if constexpr (std::is_same<T, float>::value) {
            if (stream && p.combine_max) {
              stream_row_f32(o, HW, [&](int64_t i) {
                               const vfloat v = vload(q + i);
                               return vnan_max(vmul(v, vbroadcast(gc)), vmul(v, vload(s + i)));
                             },
                             [&](int64_t i) { return nan_max(q[i] * gc, q[i] * s[i]); });
              continue;
            }
            if (stream) {
              stream_row_f32(o, HW, [&](int64_t i) {
                               const vfloat v = vload(q + i);
                               return vfma(v, vbroadcast(gc), vmul(v, vload(s + i)));
                             },
                             [&](int64_t i) { return q[i] * gc + q[i] * s[i]; });
              continue;
            }
          }
          if (contiguous && p.combine_max) {
#pragma omp simd
            for (int64_t i = 0; i < HW; ++i) {
              const float v = to_float(q[i]);
              o[i] = store<T>(nan_max(v * gc, v * s[i]));
            }
          } else if (contiguous) {
#pragma omp simd
            for (int64_t i = 0; i < HW; ++i) {
              const float v = to_float(q[i]);
              o[i] = store<T>(v * gc + v * s[i]);
            }
          } else {
            for (int64_t h = 0; h < H; ++h)
              for (int64_t w = 0; w < W; ++w) {
                const float v = to_float(q[h * sx.h + w * sx.w]);
                const float a = v * gc, z = v * s[h * W + w];
                o[h * sy.h + w * sy.w] = store<T>(p.combine_max ? nan_max(a, z) : a + z);
              }
          }
        }
      }
    }
    if (stream) stream_fence();
  }
}

}  // namespace

void se_forward_cpu(const void* x, const void* r, void* y, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                    Strides4 sx, Strides4 sr, Strides4 sy, const float* w1, const float* b1, const float* w2,
                    const float* b2, int64_t hidden) {
  const std::vector<float> w2t_buffer = transposed(w2, C, hidden);
  const float* w2t = w2t_buffer.data();
  for_dtype_16_32(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto pool = [=](const T* p, int64_t, float* st) { st[0] = plane_mean(p, H, W, sx); };
    const auto mlp = [=](const float* mean, float* g, float* hid) {
      se_gate(mean, C, w1, b1, w2t, b2, hidden, hid, g);
    };
    if (channels_last_operands(C, H, W, sx, sy, r, sr))
      return one_read_channels_last(static_cast<const T*>(x), static_cast<const T*>(r), static_cast<T*>(y), B, C, H,
                                    W, sx, sr, sy, hidden, mlp);
    one_read(static_cast<const T*>(x), static_cast<const T*>(r), static_cast<T*>(y), B, C, H, W, sx, sr, sy, 1,
             pool, hidden, mlp);
  });
}

void eca_forward_cpu(const void* x, void* y, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                     Strides4 sy, const float* w, int64_t k) {
  for_dtype_16_32(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto pool = [=](const T* p, int64_t, float* st) { st[0] = plane_mean(p, H, W, sx); };
    const auto conv = [=](const float* mean, float* g, float*) { eca_excite(mean, C, w, k, g); };
    if (channels_last_operands(C, H, W, sx, sy, nullptr, Strides4{0, 0, 0, 0}))
      return one_read_channels_last(static_cast<const T*>(x), static_cast<const T*>(nullptr), static_cast<T*>(y), B,
                                    C, H, W, sx, Strides4{0, 0, 0, 0}, sy, 0, conv);
    one_read(static_cast<const T*>(x), static_cast<const T*>(nullptr), static_cast<T*>(y), B, C, H, W, sx,
             Strides4{0, 0, 0, 0}, sy, 1, pool, 0, conv);
  });
}

void scse_forward_cpu(const void* x, void* y, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                      Strides4 sy, const ScseWeights& weights) {
  for_dtype_16_32(dtype, [&](auto tag) {
    using T = decltype(tag);
    scse_one_read(static_cast<const T*>(x), static_cast<T*>(y), B, C, H, W, sx, sy, weights);
  });
}

void fca_forward_cpu(const void* x, void* y, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                     Strides4 sy, const float* filter, const float* w1, const float* w2, int64_t hidden) {
  const std::vector<float> w2t_buffer = transposed(w2, C, hidden);
  const float* w2t = w2t_buffer.data();
  const std::vector<const float*> rows_buffer = shared_filter_rows(filter, C, H * W);
  const float* const* rows = rows_buffer.data();
  for_dtype_16_32(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto pool = [=](const T* p, int64_t c, float* st) { st[0] = plane_filter_dot(p, rows[c], H, W, sx); };
    const auto mlp = [=](const float* d, float* g, float* hid) {
      se_gate(d, C, w1, nullptr, w2t, nullptr, hidden, hid, g);
    };
    one_read(static_cast<const T*>(x), static_cast<const T*>(nullptr), static_cast<T*>(y), B, C, H, W, sx,
             Strides4{0, 0, 0, 0}, sy, 1, pool, hidden, mlp);
  });
}

void srm_forward_cpu(const void* x, void* y, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                     Strides4 sy, const float* a_mean, const float* a_std, const float* bias, float eps) {
  for_dtype_16_32(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto pool = [=](const T* p, int64_t, float* st) { plane_mean_std(p, H, W, sx, eps, st, st + 1); };
    const auto gate = [=](const float* st, float* g, float*) {
      for (int64_t c = 0; c < C; ++c) g[c] = sigmoid(a_mean[c] * st[2 * c] + a_std[c] * st[2 * c + 1] + bias[c]);
    };
    one_read(static_cast<const T*>(x), static_cast<const T*>(nullptr), static_cast<T*>(y), B, C, H, W, sx,
             Strides4{0, 0, 0, 0}, sy, 2, pool, 0, gate);
  });
}

void cbam_forward_cpu(const void* x, void* y, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, Strides4 sx,
                      Strides4 sy, const CbamWeights& weights) {
  for_dtype_16_32(dtype, [&](auto tag) {
    using T = decltype(tag);
    cbam_one_read(static_cast<const T*>(x), static_cast<T*>(y), B, C, H, W, sx, sy, weights);
  });
}

}  // namespace fastattn

// ---------------------------------------------------------------------------------------------
// Training: the two passes of the pooled-gate modules' backward (see se.h)
// ---------------------------------------------------------------------------------------------

namespace fastattn {
namespace {

template <typename T>
void channel_dot_typed(const T* dy, const T* x, acc_t<T>* out, int64_t B, int64_t C, int64_t H, int64_t W,
                       Strides4 sdy, Strides4 sx) {
  using A = acc_t<T>;
  const int64_t HW = H * W;
  const bool contiguous = plane_contiguous(sdy, H, W) && plane_contiguous(sx, H, W);
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    const T* pdy = dy + b * sdy.b + c * sdy.c;
    const T* px = x + b * sx.b + c * sx.c;
    double total = 0;
    if (contiguous) {
      total = lane_dot(pdy, px, static_cast<const A*>(nullptr), HW);
    } else {
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w)
          total += static_cast<double>(to_float(pdy[h * sdy.h + w * sdy.w])) * to_float(px[h * sx.h + w * sx.w]);
    }
    out[bc] = static_cast<A>(total);
  }
}

// dx = dy gg + kk x + aa (+ ee fc[i]: fc null, no filter term) over one H x W plane; kX: with
// the k * x term (else x is never read); `stream`: fp32 streaming stores (contiguous planes).
template <bool kX, typename T>
void affine_backward_plane(const T* pdy, const T* px, const acc_t<T>* fc, acc_t<T> gg, acc_t<T> kk, acc_t<T> aa,
                           acc_t<T> ee, T* pdx, int64_t H, int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx,
                           bool contiguous, bool stream) {
  using A = acc_t<T>;
  const int64_t HW = H * W;
  // k x + the rest, element i / lanes i..
  auto xterm = [&](int64_t i, A rest) { return kX ? static_cast<A>(to_float(px[i])) * kk + rest : rest; };
  if constexpr (std::is_same<T, float>::value) {
    const vfloat vg = vbroadcast(gg), vk = vbroadcast(kk), va = vbroadcast(aa), ve = vbroadcast(ee);
    auto vxterm = [&](int64_t i, vfloat rest) { return kX ? vfma(vload(px + i), vk, rest) : rest; };
    if (stream && fc) {
      stream_row_f32(
          pdx, HW, [&](int64_t i) { return vfma(vload(pdy + i), vg, vxterm(i, vfma(vload(fc + i), ve, va))); },
          [&](int64_t i) { return pdy[i] * gg + xterm(i, fc[i] * ee + aa); });
      return;
    }
    if (stream) {
      stream_row_f32(pdx, HW, [&](int64_t i) { return vfma(vload(pdy + i), vg, vxterm(i, va)); },
                     [&](int64_t i) { return pdy[i] * gg + xterm(i, aa); });
      return;
    }
  }
  if (contiguous && fc) {
#pragma omp simd
    for (int64_t i = 0; i < HW; ++i)
      pdx[i] = store<T>(static_cast<A>(to_float(pdy[i])) * gg + xterm(i, fc[i] * ee + aa));
  } else if (contiguous) {
#pragma omp simd
    for (int64_t i = 0; i < HW; ++i) pdx[i] = store<T>(static_cast<A>(to_float(pdy[i])) * gg + xterm(i, aa));
  } else {
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const A rest = (fc ? fc[h * W + w] * ee : A(0)) + aa;
        pdx[h * sdx.h + w * sdx.w] =
            store<T>(static_cast<A>(to_float(pdy[h * sdy.h + w * sdy.w])) * gg +
                     (kX ? static_cast<A>(to_float(px[h * sx.h + w * sx.w])) * kk + rest : rest));
      }
  }
}

// kX: with the k * x term (else x is never read).
template <bool kX, typename T>
void scale_affine_backward_typed(const T* dy, const T* x, const acc_t<T>* g, const acc_t<T>* k, const acc_t<T>* a,
                                 const acc_t<T>* filter, const acc_t<T>* e, T* dx, int64_t B, int64_t C, int64_t H,
                                 int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx) {
  using A = acc_t<T>;
  const int64_t HW = H * W;
  const bool contiguous = plane_contiguous(sdy, H, W) && plane_contiguous(sx, H, W) && plane_contiguous(sdx, H, W);
  const bool stream = contiguous && stream_stores<T>(B, C, H, W);
  const std::vector<const A*> rows = filter ? shared_filter_rows(filter, C, HW) : std::vector<const A*>();
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t bc = 0; bc < B * C; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      // the filter term (a DCT pool's gradient e * filter[c]) only with a filter
      affine_backward_plane<kX>(dy + b * sdy.b + c * sdy.c, x + b * sx.b + c * sx.c, filter ? rows[c] : nullptr,
                                g[bc], kX ? k[bc] : A(0), a[bc], filter ? e[bc] : A(0), dx + b * sdx.b + c * sdx.c, H,
                                W, sdy, sx, sdx, contiguous, stream);
    }
    if (stream) stream_fence();
  }
}

// The statistics' gradient ds (C) of one sample: the vector-Jacobian product of the pooled
// gate (see PooledGateWeights) with dg, from the sample's statistics s and gate g (recomputing the
// MLP's hidden pre-activations, as the forward computes them, for the ReLU's mask). w2t is w2
// transposed (hidden, C); dz (C) and dh (hidden) are scratch.
void gate_vjp(const PooledGateWeights& w, const float* w2t, const float* s, const float* g, const float* dg,
              int64_t C, float* ds, float* dz, float* dh) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) dz[c] = dg[c] * g[c] * (1.0f - g[c]);   // through the sigmoid
  if (w.conv_w) {   // z[c] = sum_t w[t] s[c - pad + t], so ds[i] = sum_t w[t] dz[i + pad - t]
    const int64_t pad = (w.k - 1) / 2;
    for (int64_t i = 0; i < C; ++i) {
      float acc = 0;
      for (int64_t t = 0; t < w.k; ++t) {
        const int64_t c = i + pad - t;
        if (c >= 0 && c < C) acc += w.conv_w[t] * dz[c];
      }
      ds[i] = acc;
    }
    return;
  }
  const int64_t hidden = w.hidden;
  for (int64_t j = 0; j < hidden; ++j) {
    const float z1 = static_cast<float>(lane_dot(w.w1 + j * C, s, static_cast<const float*>(nullptr), C)) +
                     (w.b1 ? w.b1[j] : 0.0f);
    const float d = static_cast<float>(lane_dot(w2t + j * C, dz, static_cast<const float*>(nullptr), C));
    dh[j] = z1 > 0.0f ? d : 0.0f;   // torch.relu's gradient: where the output is positive
  }
  std::fill(ds, ds + C, 0.0f);
  for (int64_t j = 0; j < hidden; ++j) {
    const float* row = w.w1 + j * C;
    const float d = dh[j];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) ds[c] += row[c] * d;
  }
}

// The pooled gate's training backward, a run of samples per thread (see se.h). Sample b's dx
// needs its dg summed over every plane first, so dy is read twice; the second read comes from the
// cache. To keep memory busy while it does, the passes are staggered plane by plane where the
// cache holds it: sample b's dx planes (dy from the cache) alternate with sample b + 1's dy * x
// sums (from memory).
template <typename T>
void pooled_gate_backward_typed(const T* dy, const T* x, const float* stats, const float* g, T* dx, float* dg,
                                int64_t B, int64_t C, int64_t H, int64_t W, const PooledGateWeights& w,
                                const float* w2t, const float* const* filter_rows) {
  const int64_t HW = H * W;
  const Strides4 s{C * HW, HW, W, 1};
  const bool stream = stream_stores<T>(B, C, H, W);
  const float inv_hw = 1.0f / static_cast<float>(HW);
  auto plane_dot = [&](int64_t b, int64_t c) {
    const int64_t o = (b * C + c) * HW;
    dg[b * C + c] = static_cast<float>(lane_dot(dy + o, x + o, static_cast<const float*>(nullptr), HW));
  };
#pragma omp parallel
  {
    std::vector<float> ds(static_cast<size_t>(C)), dz(static_cast<size_t>(C)),
        dh(static_cast<size_t>(std::max<int64_t>(w.hidden, 1)));
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t b0 = B * t / nt, b1 = B * (t + 1) / nt;   // this thread's samples
    // staggered when three samples (dy of b; dy, x of b + 1) per thread fit twice over in the
    // last-level cache (7% faster at 32 x 1024 x 14 x 14), else one sample after another
    const bool stagger = 6 * nt * C * HW * static_cast<int64_t>(sizeof(T)) <= llc_bytes();
    if (b0 < b1 && stagger)
      for (int64_t c = 0; c < C; ++c) plane_dot(b0, c);
    for (int64_t b = b0; b < b1; ++b) {
      if (!stagger)
        for (int64_t c = 0; c < C; ++c) plane_dot(b, c);
      gate_vjp(w, w2t, stats + b * C, g + b * C, dg + b * C, C, ds.data(), dz.data(), dh.data());
      for (int64_t c = 0; c < C; ++c) {
        const int64_t o = (b * C + c) * HW;
        const float* fc = filter_rows ? filter_rows[c] : nullptr;   // the DCT pool: d sum(x f) / dx = f
        affine_backward_plane<false>(dy + o, x + o, fc, g[b * C + c], 0.0f, fc ? 0.0f : ds[c] * inv_hw,
                                     fc ? ds[c] : 0.0f, dx + o, H, W, s, s, s, true, stream);
        if (stagger && b + 1 < b1) plane_dot(b + 1, c);
      }
    }
    if (stream) stream_fence();
  }
}

}  // namespace

void channel_dot_cpu(const void* dy, const void* x, void* out, DType dtype, int64_t B, int64_t C, int64_t H,
                     int64_t W, Strides4 sdy, Strides4 sx) {
  for_every_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    channel_dot_typed(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<acc_t<T>*>(out), B, C, H, W,
                      sdy, sx);
  });
}

void channel_scale_affine_backward_cpu(const void* dy, const void* x, const void* g, const void* k, const void* a,
                                       const void* filter, const void* e, void* dx, DType dtype, int64_t B, int64_t C,
                                       int64_t H, int64_t W, Strides4 sdy, Strides4 sx, Strides4 sdx) {
  for_every_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    auto run = [&](auto with_x) {
      scale_affine_backward_typed<decltype(with_x)::value>(
          static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const A*>(g), static_cast<const A*>(k),
          static_cast<const A*>(a), static_cast<const A*>(filter), static_cast<const A*>(e), static_cast<T*>(dx), B, C,
          H, W, sdy, sx, sdx);
    };
    if (k != nullptr) run(std::true_type());
    else run(std::false_type());
  });
}

void pooled_gate_train_forward_cpu(const void* x, void* y, float* stats, float* g, DType dtype, int64_t B, int64_t C,
                                   int64_t H, int64_t W, const PooledGateWeights& w) {
  const int64_t HW = H * W;
  const Strides4 s{C * HW, HW, W, 1};
  const std::vector<float> w2t_buffer = w.conv_w ? std::vector<float>() : transposed(w.w2, C, w.hidden);
  const float* w2t = w2t_buffer.data();
  const std::vector<const float*> rows_buffer =
      w.filter ? shared_filter_rows(w.filter, C, HW) : std::vector<const float*>();
  const float* const* rows = w.filter ? rows_buffer.data() : nullptr;
  for_dtype_16_32(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto pool = [=](const T* p, int64_t c, float* st) {
      st[0] = rows ? plane_filter_dot(p, rows[c], H, W, s) : plane_mean(p, H, W, s);
    };
    const auto excite = [=](const float* st, float* gate, float* hid) {
      if (w.conv_w) eca_excite(st, C, w.conv_w, w.k, gate);
      else se_gate(st, C, w.w1, w.b1, w2t, w.b2, w.hidden, hid, gate);
    };
    one_read(static_cast<const T*>(x), static_cast<const T*>(nullptr), static_cast<T*>(y), B, C, H, W, s,
             Strides4{0, 0, 0, 0}, s, 1, pool, w.conv_w ? 0 : w.hidden, excite, stats, g);
  });
}

void pooled_gate_train_backward_cpu(const void* dy, const void* x, const float* stats, const float* g, void* dx,
                                    float* dg, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                                    const PooledGateWeights& w) {
  const std::vector<float> w2t_buffer = w.conv_w ? std::vector<float>() : transposed(w.w2, C, w.hidden);
  const std::vector<const float*> rows =
      w.filter ? shared_filter_rows(w.filter, C, H * W) : std::vector<const float*>();
  for_dtype_16_32(dtype, [&](auto tag) {
    using T = decltype(tag);
    pooled_gate_backward_typed(static_cast<const T*>(dy), static_cast<const T*>(x), stats, g, static_cast<T*>(dx), dg,
                               B, C, H, W, w, w2t_buffer.data(), w.filter ? rows.data() : nullptr);
  });
}

namespace {

// The cSE MLP's vector-Jacobian product for n samples at once (gate_vjp's MLP branch; each weight
// row read from memory once for the n samples), as dot products of rows of w1, w2t (w2 transposed,
// (hidden, C)) and w1t (w1 transposed, (C, hidden)): s, g, dg, ds, dz are n x C, dh n x hidden.
void mlp_vjp_group(const ScseWeights& w, const float* w2t, const float* w1t, const float* s, const float* g,
                   const float* dg, int64_t n, int64_t C, float* ds, float* dz, float* dh) {
  const int64_t hidden = w.hidden;
#pragma omp simd
  for (int64_t i = 0; i < n * C; ++i) dz[i] = dg[i] * g[i] * (1.0f - g[i]);   // through the sigmoid
  for (int64_t j = 0; j < hidden; j += 4) {
    const int64_t rows = std::min<int64_t>(4, hidden - j);
    for (int64_t k = 0; k < n; ++k) {
      float z1[4], d[4];
      row_dots(w.w1 + j * C, C, rows, s + k * C, C, z1);
      row_dots(w2t + j * C, C, rows, dz + k * C, C, d);
      for (int64_t q = 0; q < rows; ++q)   // torch.relu's gradient: where the output is positive
        dh[k * hidden + j + q] = z1[q] + (w.b1 ? w.b1[j + q] : 0.0f) > 0.0f ? d[q] : 0.0f;
    }
  }
  for (int64_t c = 0; c < C; c += 4) {
    const int64_t rows = std::min<int64_t>(4, C - c);
    for (int64_t k = 0; k < n; ++k) row_dots(w1t + c * hidden, hidden, rows, dh + k * hidden, hidden, ds + k * C + c);
  }
}

// scSE's training backward, a group of samples (scse_group) per step (see se.h).
template <typename T>
void scse_backward_typed(const T* dy, const T* x, const float* mean, const float* g, const float* s, T* dx,
                         float* dg, float* dconv_w, float* dconv_b, int64_t B, int64_t C, int64_t H, int64_t W,
                         const ScseWeights& p, const float* w2t, const float* w1t) {
  const int64_t HW = H * W;
  const bool stream = stream_stores<T>(B, C, H, W);
  const float inv_hw = 1.0f / static_cast<float>(HW);
  const int64_t G = scse_group(B, 2 * C * HW * static_cast<int64_t>(sizeof(T)));   // dy and x
  const bool small_planes = HW * static_cast<int64_t>(sizeof(T)) <= kAheadBytes;     // as the forward
#pragma omp parallel
  {
    std::vector<float> ds(static_cast<size_t>(G * HW)), dq(static_cast<size_t>(G * HW)),
        dmean(static_cast<size_t>(G * C)), dz(static_cast<size_t>(G * C)),
        dh(static_cast<size_t>(G * std::max<int64_t>(p.hidden, 1)));
#pragma omp for schedule(static)
    for (int64_t b0 = 0; b0 < B; b0 += G) {
      const int64_t n = std::min(G, B - b0);
      // pass 1 (from memory): dg[c] = sum_p wa dy x, ds[p] = sum_c ws dy x (fp32 chunks of a plane
      // folded in double; ds in fp32 over the channels)
      std::fill(ds.begin(), ds.end(), 0.0f);
      for (int64_t k = 0; k < n; ++k) {
        const int64_t b = b0 + k;
        const float* sb = s + b * HW;
        float* dsb = ds.data() + k * HW;
        for (int64_t c = 0; c < C; ++c) {
          const T* pdy = dy + (b * C + c) * HW;
          const T* px = x + (b * C + c) * HW;
          if (small_planes) {
            prefetch_ahead(pdy, HW);
            prefetch_ahead(px, HW);
          }
          const float gc = g[b * C + c];
          double total = 0;
          for (int64_t i0 = 0; i0 < HW; i0 += kChunk) {
            const int64_t i1 = std::min(HW, i0 + kChunk);
            float acc = 0;
            int64_t i = i0;
            if constexpr (std::is_same<T, float>::value && kVecWidth > 0) {
              // explicit vectors: GCC's 256-bit code for these loops was bound by its instruction count
              const vfloat vg = vbroadcast(gc);
              vfloat va = vbroadcast(0.0f);
              for (; i + kVecWidth <= i1; i += kVecWidth) {
                const vfloat v = vload(px + i), t = vmul(vload(pdy + i), v);
                if (p.combine_max) {
                  vfloat wa, ws;
                  vmax_grad_weights(vmul(v, vg), vmul(v, vload(sb + i)), wa, ws);
                  va = vfma(wa, t, va);
                  vstore(dsb + i, vfma(ws, t, vload(dsb + i)));
                } else {
                  va = vadd(va, t);
                  vstore(dsb + i, vadd(t, vload(dsb + i)));
                }
              }
              acc = vsum(va);
            }
            if (p.combine_max) {
#pragma omp simd reduction(+ : acc)
              for (int64_t j = i; j < i1; ++j) {
                const float v = to_float(px[j]), t = to_float(pdy[j]) * v;
                float wa, ws;
                max_grad_weights(v * gc, v * sb[j], wa, ws);
                acc += wa * t;
                dsb[j] += ws * t;
              }
            } else {
#pragma omp simd reduction(+ : acc)
              for (int64_t j = i; j < i1; ++j) {
                const float t = to_float(pdy[j]) * to_float(px[j]);
                acc += t;
                dsb[j] += t;
              }
            }
            total += acc;
          }
          dg[b * C + c] = static_cast<float>(total);
        }
      }
      // the cSE MLP's vector-Jacobian product to the means; the sSE pre-activation's gradient
      mlp_vjp_group(p, w2t, w1t, mean + b0 * C, g + b0 * C, dg + b0 * C, n, C, dmean.data(), dz.data(), dh.data());
      for (int64_t k = 0; k < n; ++k) {
        const float* sb = s + (b0 + k) * HW;
        double qsum = 0;
        for (int64_t i = 0; i < HW; ++i) {
          dq[k * HW + i] = ds[k * HW + i] * sb[i] * (1.0f - sb[i]);
          qsum += dq[k * HW + i];
        }
        dconv_b[b0 + k] = static_cast<float>(qsum);
      }
      // pass 2 (dy, x from this core's cache): dx = dy k + dmean / HW + conv_w[c] dq, and the
      // conv's gradient sum_p x dq
      for (int64_t k = 0; k < n; ++k) {
        const int64_t b = b0 + k;
        const float* sb = s + b * HW;
        const float* q = dq.data() + k * HW;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t o = (b * C + c) * HW;
          const T* pdy = dy + o;
          const T* px = x + o;
          T* pdx = dx + o;
          const float gc = g[b * C + c], ac = dmean[k * C + c] * inv_hw, wc = p.conv_w[c];
          if constexpr (std::is_same<T, float>::value) {
            const vfloat vg = vbroadcast(gc), va = vbroadcast(ac), vw = vbroadcast(wc);
            if (p.combine_max)
              store_row_f32(pdx, HW, stream, [&](int64_t i) {
                              const vfloat kk = vmax_grad_coef(vload(px + i), vg, vload(sb + i));
                              return vfma(vload(pdy + i), kk, vfma(vload(q + i), vw, va));
                            },
                            [&](int64_t i) {
                              float wa, ws;
                              max_grad_weights(px[i] * gc, px[i] * sb[i], wa, ws);
                              return pdy[i] * (wa * gc + ws * sb[i]) + (q[i] * wc + ac);
                            });
            else
              store_row_f32(pdx, HW, stream, [&](int64_t i) {
                              return vfma(vload(pdy + i), vadd(vg, vload(sb + i)), vfma(vload(q + i), vw, va));
                            },
                            [&](int64_t i) { return pdy[i] * (gc + sb[i]) + (q[i] * wc + ac); });
          } else if (p.combine_max) {
#pragma omp simd
            for (int64_t i = 0; i < HW; ++i) {
              const float v = to_float(px[i]);
              float wa, ws;
              max_grad_weights(v * gc, v * sb[i], wa, ws);
              pdx[i] = store<T>(to_float(pdy[i]) * (wa * gc + ws * sb[i]) + (q[i] * wc + ac));
            }
          } else {
#pragma omp simd
            for (int64_t i = 0; i < HW; ++i)
              pdx[i] = store<T>(to_float(pdy[i]) * (gc + sb[i]) + (q[i] * wc + ac));
          }
          dconv_w[b * C + c] = static_cast<float>(lane_dot(px, q, static_cast<const float*>(nullptr), HW));
        }
      }
    }
    if (stream) stream_fence();
  }
}

}  // namespace

void scse_train_forward_cpu(const void* x, void* y, float* mean, float* g, float* s, DType dtype, int64_t B,
                            int64_t C, int64_t H, int64_t W, const ScseWeights& weights) {
  const Strides4 st{C * H * W, H * W, W, 1};
  for_dtype_16_32(dtype, [&](auto tag) {
    using T = decltype(tag);
    scse_one_read(static_cast<const T*>(x), static_cast<T*>(y), B, C, H, W, st, st, weights, mean, g, s);
  });
}

void scse_train_backward_cpu(const void* dy, const void* x, const float* mean, const float* g, const float* s,
                             void* dx, float* dg, float* dconv_w, float* dconv_b, DType dtype, int64_t B, int64_t C,
                             int64_t H, int64_t W, const ScseWeights& weights) {
  const std::vector<float> w2t = transposed(weights.w2, C, weights.hidden);
  const std::vector<float> w1t = transposed(weights.w1, weights.hidden, C);
  for_dtype_16_32(dtype, [&](auto tag) {
    using T = decltype(tag);
    scse_backward_typed(static_cast<const T*>(dy), static_cast<const T*>(x), mean, g, s, static_cast<T*>(dx), dg,
                        dconv_w, dconv_b, B, C, H, W, weights, w2t.data(), w1t.data());
  });
}

}  // namespace fastattn

// ---------------------------------------------------------------------------------------------
// Training: CBAM's backward in three passes (see se.h)
// ---------------------------------------------------------------------------------------------

namespace fastattn {
namespace {

template <typename T>
void cbam_sums_typed(const T* dy, const T* x, const acc_t<T>* a, const acc_t<T>* s, acc_t<T>* da, acc_t<T>* ds,
                     int64_t B, int64_t C, int64_t HW) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    A* dsb = ds + b * HW;
    const A* sb = s + b * HW;
    std::fill(dsb, dsb + HW, A(0));
    for (int64_t c = 0; c < C; ++c) {
      const T* pdy = dy + (b * C + c) * HW;
      const T* px = x + (b * C + c) * HW;
      const A ac = a[b * C + c];
      da[b * C + c] = static_cast<A>(lane_dot(pdy, px, sb, HW));
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i)
        dsb[i] += static_cast<A>(to_float(pdy[i])) * static_cast<A>(to_float(px[i])) * ac;
    }
  }
}

template <typename T>
void cbam_pool_grad_typed(const T* x, const acc_t<T>* dpmax, const acc_t<T>* dpmean, const int32_t* idx_c,
                          acc_t<T>* da, int64_t B, int64_t C, int64_t HW) {
  using A = acc_t<T>;
#pragma omp parallel
  {
    std::vector<A> w(static_cast<size_t>(HW));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const A inv_c = A(1) / static_cast<A>(C);
      const A* pm = dpmax + b * HW;
      const A* pa = dpmean + b * HW;
      const int32_t* ib = idx_c + b * HW;
      for (int64_t i = 0; i < HW; ++i) w[i] = pa[i] * inv_c;
      for (int64_t c = 0; c < C; ++c) {
        const T* px = x + (b * C + c) * HW;
        double total = 0;
        A lanes[16] = {};
        int64_t i = 0;
        for (; i + 16 <= HW; i += 16) {
#pragma omp simd
          for (int j = 0; j < 16; ++j) {
            const int64_t k = i + j;
            lanes[j] += static_cast<A>(to_float(px[k])) * (w[k] + (ib[k] == c ? pm[k] : A(0)));
          }
          if ((i & (kChunk - 1)) == kChunk - 16) {  // fold into double every kChunk elements
            for (int j = 0; j < 16; ++j) {
              total += static_cast<double>(lanes[j]);
              lanes[j] = 0;
            }
          }
        }
        for (; i < HW; ++i) total += static_cast<double>(to_float(px[i])) * (w[i] + (ib[i] == c ? pm[i] : A(0)));
        for (int j = 0; j < 16; ++j) total += static_cast<double>(lanes[j]);
        da[b * C + c] = static_cast<A>(total);
      }
    }
  }
}

template <typename T>
void cbam_dx_typed(const T* dy, const acc_t<T>* a, const acc_t<T>* s, const acc_t<T>* dpmax, const acc_t<T>* dpmean,
                   const int32_t* idx_c, const acc_t<T>* dmean, const acc_t<T>* dmax, const int64_t* idx_p, T* dx,
                   int64_t B, int64_t C, int64_t HW) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    const A inv_c = A(1) / static_cast<A>(C), inv_hw = A(1) / static_cast<A>(HW);
    const A* sb = s + b * HW;
    const A* pm = dpmax + b * HW;
    const A* pa = dpmean + b * HW;
    const int32_t* ib = idx_c + b * HW;
    for (int64_t c = 0; c < C; ++c) {
      const T* pdy = dy + (b * C + c) * HW;
      T* pdx = dx + (b * C + c) * HW;
      const A ac = a[b * C + c], am = ac * inv_c, m = dmean[b * C + c] * inv_hw;
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i)
        pdx[i] = store<T>(static_cast<A>(to_float(pdy[i])) * ac * sb[i] + am * pa[i] + m +
                          (ib[i] == c ? ac * pm[i] : A(0)));
      const int64_t k = idx_p[b * C + c];  // the channel max's position
      pdx[k] = store<T>(static_cast<A>(to_float(pdx[k])) + dmax[b * C + c]);
    }
  }
}

}  // namespace

void cbam_backward_sums_cpu(const void* dy, const void* x, const void* a, const void* s, void* da, void* ds,
                            DType dtype, int64_t B, int64_t C, int64_t HW) {
  for_every_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    cbam_sums_typed(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const A*>(a),
                    static_cast<const A*>(s), static_cast<A*>(da), static_cast<A*>(ds), B, C, HW);
  });
}

void cbam_backward_pool_grad_cpu(const void* x, const void* dpmax, const void* dpmean, const int32_t* idx_c,
                                 void* da, DType dtype, int64_t B, int64_t C, int64_t HW) {
  for_every_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    cbam_pool_grad_typed(static_cast<const T*>(x), static_cast<const A*>(dpmax), static_cast<const A*>(dpmean),
                         idx_c, static_cast<A*>(da), B, C, HW);
  });
}

void cbam_backward_dx_cpu(const void* dy, const void* a, const void* s, const void* dpmax, const void* dpmean,
                          const int32_t* idx_c, const void* dmean, const void* dmax, const int64_t* idx_p, void* dx,
                          DType dtype, int64_t B, int64_t C, int64_t HW) {
  for_every_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    cbam_dx_typed(static_cast<const T*>(dy), static_cast<const A*>(a), static_cast<const A*>(s),
                  static_cast<const A*>(dpmax), static_cast<const A*>(dpmean), idx_c, static_cast<const A*>(dmean),
                  static_cast<const A*>(dmax), idx_p, static_cast<T*>(dx), B, C, HW);
  });
}

}  // namespace fastattn
