// 1x1 convolutions of NCHW fp32 maps as register-tiled products (see pointwise.h).
//
// NCHW keeps each channel's pixels contiguous, so a tile of kV vectors of pixels and kO output
// rows lives in registers while the loop runs over the channels: per channel, kV loads of x, kO
// broadcasts of weights, kO * kV fused multiply-adds. The pixels that do not fill a vector go
// through a zero-padded copy (one vector wide), so every inner loop is whole vectors.
// Jobs: (sample, range of pixel tiles) for the forward and dx, groups of channel blocks for dw.
#include "pointwise.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "stream.h"

namespace fastattn {
namespace {

// Lanes of the vector type (1 in a build without AVX: the same code, one lane at a time).
constexpr int64_t L = kVecWidth > 0 ? kVecWidth : 1;
// Register tiles: kO rows (outputs, or channels for dx) x kV vectors of pixels, kO * kV
// accumulators (24 of the 32 AVX-512 registers; 8 of the 16 AVX ones).
constexpr int kO = L == 16 ? 8 : 4;
constexpr int kV = L == 16 ? 3 : (L == 8 ? 2 : 1);
// dw tiles: kWo outputs x kWc channels, one vector each.
constexpr int kWo = L == 16 ? 4 : 2;
constexpr int kWc = L == 16 ? 6 : 4;
// dw's pixel chunk (floats): its kWc rows of x stay in L1 while the output blocks pass.
constexpr int64_t kChunkP = 512;
// bytes of dz that one step of dw walks for each channel block (L2-resident)
constexpr int64_t kDzBytes = 256 << 10;

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Copy of the last P % L pixels of `rows` rows (row stride `stride`) into a zeroed rows x L buffer.
void pad_tail(const float* src, int64_t stride, int64_t rows, int64_t p0, int64_t n, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memset(dst + r * L, 0, L * sizeof(float));
    std::memcpy(dst + r * L, src + r * stride + p0, n * sizeof(float));
  }
}

// z rows o0 .. o0 + kO - 1 over NV vectors of pixels: bias + sum over c of wt[c, o] x[c, :].
// wt: (C, Opad) transposed weights, zero beyond O. Sum: also add the x vectors into lanes[c].
// next (or null): the next tile's pixels, prefetched row by row so that its first pass does not
// wait on memory (the tile's rows are C strided streams, more than the hardware prefetcher follows).
template <int NV, bool Sum>
void reduce_rows(const float* x, int64_t xs, int64_t C, const float* wt, int64_t Opad, const float* bias, int64_t O,
                 int64_t o0, float* z, int64_t zs, float* lanes, const float* next) {
  vfloat acc[kO][NV];
#pragma GCC unroll 8
  for (int i = 0; i < kO; ++i) {
    const vfloat b = vbroadcast(bias != nullptr && o0 + i < O ? bias[o0 + i] : 0.0f);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = b;
  }
  const float* wr = wt + o0;
  for (int64_t c = 0; c < C; ++c, x += xs, wr += Opad) {
    vfloat xv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) xv[v] = vload(x + v * L);
    if (next != nullptr) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) __builtin_prefetch(next + c * xs + v * L);
    }
    if constexpr (Sum) {
      vfloat s = xv[0];
#pragma GCC unroll 4
      for (int v = 1; v < NV; ++v) s = vadd(s, xv[v]);
      vstore(lanes + c * L, vadd(vload(lanes + c * L), s));
    }
#pragma GCC unroll 8
    for (int i = 0; i < kO; ++i) {
      const vfloat wv = vbroadcast(wr[i]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = vfma(wv, xv[v], acc[i][v]);
    }
  }
  const int n = static_cast<int>(std::min<int64_t>(kO, O - o0));
  for (int i = 0; i < n; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vstore(z + (o0 + i) * zs + v * L, acc[i][v]);
}

// next: the next tile's pixels (same row stride) to prefetch during the last pass, or null.
template <int NV>
void reduce_tile(const float* x, int64_t xs, int64_t C, const float* wt, int64_t Opad, const float* bias, int64_t O,
                 float* z, int64_t zs, float* lanes, const float* next) {
  // x from memory: sum it on the way
  reduce_rows<NV, true>(x, xs, C, wt, Opad, bias, O, 0, z, zs, lanes, O <= kO ? next : nullptr);
  for (int64_t o0 = kO; o0 < O; o0 += kO)
    reduce_rows<NV, false>(x, xs, C, wt, Opad, bias, O, o0, z, zs, lanes, o0 + kO >= O ? next : nullptr);
}

// Pixel tiles of a plane of P pixels: kV-vector tiles over the whole vectors, then one padded
// tile for the last P % L pixels.
struct Tiles {
  int64_t full, tail, count;
  explicit Tiles(int64_t P) : full(P / L), tail(P % L), count((P / L + kV - 1) / kV + (P % L ? 1 : 0)) {}
  int64_t vectors(int64_t t) const { return std::min<int64_t>(kV, full - t * kV); }  // <= 0: the padded tile
};

// Jobs of (sample, range of tiles): at least kMinJobs in all when the batch is small. A function
// of the shape alone, so that the means (summed per job, then across jobs) do not depend on the
// number of threads.
constexpr int64_t kMinJobs = 16;
int64_t chunks_per_sample(int64_t B, int64_t tiles) {
  return std::max<int64_t>(1, std::min(tiles, (kMinJobs + B - 1) / B));
}

// f(std::integral_constant<int, nv>) for nv in 1 .. kV.
template <typename F>
void with_vectors(int64_t nv, F&& f) {
  if constexpr (kV >= 3) {
    if (nv == 3) return f(std::integral_constant<int, 3>());
  }
  if constexpr (kV >= 2) {
    if (nv == 2) return f(std::integral_constant<int, 2>());
  }
  f(std::integral_constant<int, 1>());
}

}  // namespace

void pointwise_reduce_mean_cpu(const float* x, const float* w, const float* bias, float* z, float* mean, int64_t B,
                               int64_t C, int64_t P, int64_t O) {
  const int64_t Opad = round_up(O, kO);
  std::vector<float> wt(static_cast<size_t>(C * Opad), 0.0f);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t c = 0; c < C; ++c) wt[c * Opad + o] = w[o * C + c];
  const Tiles tiles(P);
  const int64_t chunks = chunks_per_sample(B, tiles.count);
  std::vector<double> partial(static_cast<size_t>(B * chunks * C));
#pragma omp parallel
  {
    std::vector<float> lanes(static_cast<size_t>(C * L));
    std::vector<float> xpad(tiles.tail ? static_cast<size_t>(C * L) : 0), zpad(static_cast<size_t>(O * L));
#pragma omp for schedule(static)
    for (int64_t job = 0; job < B * chunks; ++job) {
      const int64_t b = job / chunks, k = job % chunks;
      const float* xb = x + b * C * P;
      float* zb = z + b * O * P;
      std::fill(lanes.begin(), lanes.end(), 0.0f);
      for (int64_t t = k * tiles.count / chunks; t < (k + 1) * tiles.count / chunks; ++t) {
        const int64_t nv = tiles.vectors(t), p0 = t * kV * L;
        if (nv > 0) {
          const bool more = t + 1 < (k + 1) * tiles.count / chunks && tiles.vectors(t + 1) > 0;
          with_vectors(nv, [&](auto NV) {
            reduce_tile<decltype(NV)::value>(xb + p0, P, C, wt.data(), Opad, bias, O, zb + p0, P, lanes.data(),
                                             more ? xb + p0 + kV * L : nullptr);
          });
        } else {
          const int64_t q0 = tiles.full * L;
          pad_tail(xb, P, C, q0, tiles.tail, xpad.data());
          reduce_tile<1>(xpad.data(), L, C, wt.data(), Opad, bias, O, zpad.data(), L, lanes.data(), nullptr);
          for (int64_t o = 0; o < O; ++o) std::memcpy(zb + o * P + q0, zpad.data() + o * L, tiles.tail * sizeof(float));
        }
      }
      double* part = partial.data() + job * C;
      for (int64_t c = 0; c < C; ++c) {
        double s = 0;
        for (int64_t j = 0; j < L; ++j) s += lanes[c * L + j];
        part[c] = s;
      }
    }
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      double s = 0;
      for (int64_t k = 0; k < chunks; ++k) s += partial[(b * chunks + k) * C + c];
      mean[b * C + c] = static_cast<float>(s / static_cast<double>(P));
    }
}

namespace {

// dx rows c0 .. c0 + kO - 1 over NV vectors: g + dm[c] + sum over o of wp[o, c] dz[o, :].
// wp: (O, Cpad) weights, zero beyond C; g may be null.
template <int NV>
void dx_rows(const float* dz, int64_t dzs, int64_t O, const float* wp, int64_t Cpad, const float* g, int64_t gs,
             const float* dm, int64_t C, int64_t c0, float* dx, int64_t dxs) {
  const int n = static_cast<int>(std::min<int64_t>(kO, C - c0));
  vfloat acc[kO][NV];
#pragma GCC unroll 8
  for (int i = 0; i < kO; ++i) {
    const vfloat d = vbroadcast(i < n ? dm[c0 + i] : 0.0f);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = (g != nullptr && i < n) ? vadd(d, vload(g + (c0 + i) * gs + v * L)) : d;
  }
  const float* wr = wp + c0;
  for (int64_t o = 0; o < O; ++o, dz += dzs, wr += Cpad) {
    vfloat dv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) dv[v] = vload(dz + v * L);
#pragma GCC unroll 8
    for (int i = 0; i < kO; ++i) {
      const vfloat wv = vbroadcast(wr[i]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = vfma(wv, dv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < n; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vstore(dx + (c0 + i) * dxs + v * L, acc[i][v]);
}

}  // namespace

void pointwise_reduce_dx_cpu(const float* dz, const float* w, const float* g, const float* dmean, float* dx, int64_t B,
                             int64_t C, int64_t P, int64_t O) {
  const int64_t Cpad = round_up(C, kO);
  std::vector<float> wp(static_cast<size_t>(O * Cpad), 0.0f);
  for (int64_t o = 0; o < O; ++o) std::memcpy(wp.data() + o * Cpad, w + o * C, C * sizeof(float));
  std::vector<float> dm(static_cast<size_t>(B * C), 0.0f);  // dmean / P
  if (dmean != nullptr)
    for (int64_t i = 0; i < B * C; ++i) dm[i] = static_cast<float>(dmean[i] / static_cast<double>(P));
  const Tiles tiles(P);
  const int64_t chunks = chunks_per_sample(B, tiles.count);
#pragma omp parallel
  {
    std::vector<float> dzpad(tiles.tail ? static_cast<size_t>(O * L) : 0);
    std::vector<float> gpad(tiles.tail && g ? static_cast<size_t>(C * L) : 0), dxpad(static_cast<size_t>(C * L));
#pragma omp for schedule(static)
    for (int64_t job = 0; job < B * chunks; ++job) {
      const int64_t b = job / chunks, k = job % chunks;
      const float* dzb = dz + b * O * P;
      const float* gb = g ? g + b * C * P : nullptr;
      const float* dmb = dm.data() + b * C;
      float* dxb = dx + b * C * P;
      for (int64_t t = k * tiles.count / chunks; t < (k + 1) * tiles.count / chunks; ++t) {
        const int64_t nv = tiles.vectors(t), p0 = t * kV * L;
        if (nv > 0) {
          with_vectors(nv, [&](auto NV) {
            for (int64_t c0 = 0; c0 < C; c0 += kO)
              dx_rows<decltype(NV)::value>(dzb + p0, P, O, wp.data(), Cpad, gb ? gb + p0 : nullptr, P, dmb, C, c0,
                                           dxb + p0, P);
          });
        } else {
          const int64_t q0 = tiles.full * L;
          pad_tail(dzb, P, O, q0, tiles.tail, dzpad.data());
          if (gb) pad_tail(gb, P, C, q0, tiles.tail, gpad.data());
          for (int64_t c0 = 0; c0 < C; c0 += kO)
            dx_rows<1>(dzpad.data(), L, O, wp.data(), Cpad, gb ? gpad.data() : nullptr, L, dmb, C, c0, dxpad.data(), L);
          for (int64_t c = 0; c < C; ++c) std::memcpy(dxb + c * P + q0, dxpad.data() + c * L, tiles.tail * sizeof(float));
        }
      }
    }
  }
}

namespace {

// Keeps v in a register: without it GCC 12 folds each x load into every FMA that uses it (4 loads
// of each x vector instead of 1), and dw was load-bound.
inline void in_register(vfloat& v) {
#if defined(__GNUC__) && (defined(__AVX512F__) || defined(__AVX__))
  asm volatile("" : "+v"(v));
#else
  (void)v;
#endif
}

// lanes[i][j] += the lane-wise products dz[o0 + i, :] x[j, :] over nvec vectors of pixels in each of
// nb samples, for kWo rows of dz (from o0; rows past O repeat the last one) and kWc rows of x (nc
// valid ones; likewise). Sample b's rows start at dz + b * dzb and x + b * xb, row strides dzs, xs.
// lanes: the block's kWo x kWc vectors of lane sums, in memory between calls; they are summed
// across once at the end.
void dw_block(const float* dz, int64_t dzb, int64_t dzs, int64_t O, int64_t o0, const float* x, int64_t xb, int64_t xs,
              int64_t nc, int64_t nb, int64_t nvec, float* lanes) {
  vfloat acc[kWo][kWc];
#pragma GCC unroll 8
  for (int i = 0; i < kWo; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < kWc; ++j) acc[i][j] = vload(lanes + (i * kWc + j) * L);
  int64_t drow[kWo], xrow[kWc];
  for (int i = 0; i < kWo; ++i) drow[i] = std::min<int64_t>(o0 + i, O - 1) * dzs;
  for (int j = 0; j < kWc; ++j) xrow[j] = std::min<int64_t>(j, nc - 1) * xs;
  for (int64_t b = 0; b < nb; ++b, dz += dzb, x += xb) {
    for (int64_t q = 0; q < nvec * L; q += L) {
      vfloat xv[kWc];
#pragma GCC unroll 8
      for (int j = 0; j < kWc; ++j) {
        xv[j] = vload(x + xrow[j] + q);
        in_register(xv[j]);
      }
#pragma GCC unroll 8
      for (int i = 0; i < kWo; ++i) {
        const vfloat d = vload(dz + drow[i] + q);
#pragma GCC unroll 8
        for (int j = 0; j < kWc; ++j) acc[i][j] = vfma(d, xv[j], acc[i][j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < kWo; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < kWc; ++j) vstore(lanes + (i * kWc + j) * L, acc[i][j]);
}

}  // namespace

// Jobs own groups of channel blocks (so each dw entry is written by one job, in a fixed order);
// a job walks steps of (samples, pixel chunk) through all its blocks.
void pointwise_reduce_dw_cpu(const float* dz, const float* x, float* dw, int64_t B, int64_t C, int64_t P, int64_t O) {
  const int64_t blocks = (C + kWc - 1) / kWc, full = P / L, tail = P % L;
  const int64_t threads = omp_get_max_threads();
  const int64_t group = std::max<int64_t>(1, std::min<int64_t>(4, blocks / (4 * threads)));
  const int64_t jobs = (blocks + group - 1) / group, Opad = round_up(O, kWo);
  // Samples per step: whole planes of up to kChunkP pixels are taken kDzBytes of dz at a time (dz
  // would otherwise come from L3 again for every channel block: dw took 5.7 ms at 32x1024x14x14).
  const int64_t nbc = full * L > kChunkP ? 1 : std::clamp<int64_t>(kDzBytes / std::max<int64_t>(1, O * P * 4), 1, B);
  // the last P % L pixels of every dz row, zero-padded to one vector
  std::vector<float> dztail(tail ? static_cast<size_t>(B * O * L) : 0);
  for (int64_t b = 0; b < B && tail; ++b) pad_tail(dz + b * O * P, P, O, full * L, tail, dztail.data() + b * O * L);
#pragma omp parallel
  {
    std::vector<float> lanes(static_cast<size_t>(group * Opad * kWc * L));
    std::vector<float> xtail(tail ? static_cast<size_t>(B * kWc * L) : 0);
#pragma omp for schedule(static)
    for (int64_t job = 0; job < jobs; ++job) {
      const int64_t k0 = job * group, k1 = std::min(blocks, k0 + group);
      std::fill(lanes.begin(), lanes.end(), 0.0f);
      auto lanes_of = [&](int64_t k, int64_t o0) { return lanes.data() + ((k - k0) * Opad + o0) * kWc * L; };
      for (int64_t b0 = 0; b0 < B; b0 += nbc) {
        const int64_t nb = std::min(nbc, B - b0);
        for (int64_t q0 = 0; q0 < full * L; q0 += kChunkP) {
          const int64_t nvec = std::min<int64_t>(kChunkP, full * L - q0) / L;
          for (int64_t k = k0; k < k1; ++k) {
            const int64_t nc = std::min<int64_t>(kWc, C - k * kWc);
            const float* xk = x + (b0 * C + k * kWc) * P + q0;
            for (int64_t o0 = 0; o0 < O; o0 += kWo)
              dw_block(dz + b0 * O * P + q0, O * P, P, O, o0, xk, C * P, P, nc, nb, nvec, lanes_of(k, o0));
          }
        }
      }
      for (int64_t k = k0; k < k1 && tail; ++k) {
        const int64_t nc = std::min<int64_t>(kWc, C - k * kWc);
        for (int64_t b = 0; b < B; ++b)
          pad_tail(x + (b * C + k * kWc) * P, P, nc, full * L, tail, xtail.data() + b * kWc * L);
        for (int64_t o0 = 0; o0 < O; o0 += kWo)
          dw_block(dztail.data(), O * L, L, O, o0, xtail.data(), kWc * L, L, nc, B, 1, lanes_of(k, o0));
      }
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t nc = std::min<int64_t>(kWc, C - k * kWc);
        for (int64_t o = 0; o < O; ++o)
          for (int64_t j = 0; j < nc; ++j)
            dw[o * C + k * kWc + j] = vsum(vload(lanes_of(k, o - o % kWo) + ((o % kWo) * kWc + j) * L));
      }
    }
  }
}

}  // namespace fastattn
