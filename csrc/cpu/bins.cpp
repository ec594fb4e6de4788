// Bin means on the CPU. One read of x sums it over the elementary cells of the bins (see bins.h),
// row by row: NCHW rows are added into a row accumulator (unit stride) and cut into column
// groups when their row group ends; channels_last pixels are added into per-cell channel vectors
// (unit stride over channels). fp32 runs are folded into double every kChunk values per
// accumulator; bin sums come from the cell sums in double. NCHW planes of rows of at most 16
// (14 x 14 at the late ResNet stages) take narrow paths instead (fwd_narrow, bwd_narrow: a 16-lane
// step per row, fp32 throughout). The backward writes each cell's gradient (the sum of dy / area
// over the bins holding it) into every position of the cell. The bins' values are placed in their
// buffer as a BinLayout says ((B, C, N), or SpatialPyramidAttention's pooled vector). Work splits
// (rows of a plane) depend on the shape alone and are merged in order: deterministic.
#include "bins.h"
#include "pool_convert.h"

#include <omp.h>

#include <algorithm>
#include <map>
#include <type_traits>
#include <utility>

namespace fastattn {

// ---------------------------------------------------------------------------------------------
// geometry
// ---------------------------------------------------------------------------------------------

namespace {

using Span = std::pair<int64_t, int64_t>;  // [start, end)

std::vector<Span> axis_bins(int64_t size, int64_t level, bool tiles) {
  std::vector<Span> bins;
  if (tiles) {  // ceil-mode tiles of `level`, the last one clipped
    for (int64_t s = 0; s < size; s += level) bins.emplace_back(s, std::min(size, s + level));
  } else {      // adaptive: [floor(i * size / n), ceil((i + 1) * size / n))
    for (int64_t i = 0; i < level; ++i) bins.emplace_back(i * size / level, ((i + 1) * size + level - 1) / level);
  }
  return bins;
}

// Sorted distinct edges of all bins along one axis, and the group of each position.
void axis_groups(int64_t size, const std::vector<std::vector<Span>>& bins, std::vector<int64_t>* edge,
                 std::vector<int64_t>* group) {
  edge->assign({0, size});
  for (const auto& level : bins)
    for (const Span& s : level) edge->push_back(s.first), edge->push_back(s.second);
  std::sort(edge->begin(), edge->end());
  edge->erase(std::unique(edge->begin(), edge->end()), edge->end());
  group->assign(static_cast<size_t>(size), 0);
  for (size_t g = 0; g + 1 < edge->size(); ++g)
    for (int64_t p = (*edge)[g]; p < (*edge)[g + 1]; ++p) (*group)[p] = static_cast<int64_t>(g);
}

}  // namespace

std::vector<int64_t> bin_geometry_table(int64_t H, int64_t W, const int64_t* levels, int64_t n_levels, bool tiles) {
  std::vector<std::vector<Span>> rows, cols;
  for (int64_t l = 0; l < n_levels; ++l) {
    rows.push_back(axis_bins(H, levels[l], tiles));
    cols.push_back(axis_bins(W, levels[l], tiles));
  }
  std::vector<int64_t> row_edge, col_edge, row_group, col_group;
  axis_groups(H, rows, &row_edge, &row_group);
  axis_groups(W, cols, &col_edge, &col_group);
  const int64_t gh = static_cast<int64_t>(row_edge.size()) - 1, gw = static_cast<int64_t>(col_edge.size()) - 1;
  std::vector<int64_t> bin_cells;
  for (int64_t l = 0; l < n_levels; ++l)
    for (const Span& r : rows[l])
      for (const Span& c : cols[l])
        bin_cells.insert(bin_cells.end(), {row_group[r.first], row_group[r.second - 1] + 1, col_group[c.first],
                                           col_group[c.second - 1] + 1});
  const int64_t N = static_cast<int64_t>(bin_cells.size()) / 4, cells = gh * gw;
  std::vector<int64_t> cell_ptr(static_cast<size_t>(cells + 1), 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t r = bin_cells[4 * n]; r < bin_cells[4 * n + 1]; ++r)
      for (int64_t c = bin_cells[4 * n + 2]; c < bin_cells[4 * n + 3]; ++c) ++cell_ptr[r * gw + c + 1];
  for (int64_t i = 0; i < cells; ++i) cell_ptr[i + 1] += cell_ptr[i];
  const int64_t M = cell_ptr[cells];
  std::vector<int64_t> cell_bins(static_cast<size_t>(M)), fill(cell_ptr.begin(), cell_ptr.end() - 1);
  for (int64_t n = 0; n < N; ++n)   // bins in increasing order: each cell's list comes out sorted
    for (int64_t r = bin_cells[4 * n]; r < bin_cells[4 * n + 1]; ++r)
      for (int64_t c = bin_cells[4 * n + 2]; c < bin_cells[4 * n + 3]; ++c) cell_bins[fill[r * gw + c]++] = n;
  std::vector<int64_t> t = {H, W, gh, gw, N, M};
  for (const auto* v : {&row_edge, &col_edge, &row_group, &col_group, &bin_cells, &cell_ptr, &cell_bins})
    t.insert(t.end(), v->begin(), v->end());
  return t;
}

namespace {

// Split the work when B * C (or B * channel blocks) alone gives fewer jobs than this.
constexpr int64_t kMinJobs = 64;
constexpr int64_t kMinSeg = 4 * kChunk;   // NCHW: positions per row split at least
constexpr int64_t kMinPixels = 64;        // channels_last: pixels per row split at least
constexpr int64_t kMaxBlock = 1024;       // channels_last: channels per job at most
constexpr int64_t kCellBudget = 1 << 15;  // channels_last: cells x channels of one job's accumulators

using pool_cvt::ld;
using pool_cvt::put;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t area(const BinGeometry& g, int64_t n) {
  const int64_t* bc = g.bin_cells + 4 * n;
  return (g.row_edge[bc[1]] - g.row_edge[bc[0]]) * (g.col_edge[bc[3]] - g.col_edge[bc[2]]);
}

// Rows per split of a plane: enough jobs when `jobs` alone is small, at least min_len positions
// per split. Returns the rows of one split (the last may be shorter).
inline int64_t split_rows(int64_t jobs, int64_t H, int64_t W, int64_t min_len) {
  int64_t s = std::max<int64_t>(1, ceil_div(kMinJobs, std::max<int64_t>(jobs, 1)));
  s = std::max<int64_t>(1, std::min({s, (H * W) / min_len, H}));
  return ceil_div(H, s);
}

// channels_last channel blocks: equal widths (multiples of 16) such that the job's per-cell
// double accumulators stay within kCellBudget (at least 16 channels).
inline int64_t cell_block_width(int64_t C, int64_t cells, int64_t* n_blocks) {
  const int64_t cap = std::max<int64_t>(16, std::min(kMaxBlock, kCellBudget / std::max<int64_t>(cells, 1) / 16 * 16));
  const int64_t n = std::max<int64_t>(1, ceil_div(C, cap));
  *n_blocks = n;
  return std::max<int64_t>(16, ceil_div(ceil_div(C, n), 16) * 16);
}

// Rows of fp32 accumulation before folding into double: about kChunk values per accumulator.
inline int64_t fold_rows(int64_t W) { return std::max<int64_t>(1, kChunk / std::max<int64_t>(W, 1)); }

// Runs body(o, i, buf) for every pair (o < outer, i < inner), with a per-thread buffer of `buf_len`
// values of A. Each thread walks its contiguous share of the pairs with a carry instead of a
// 64-bit division per job (tile_mean at 32x1024x14x14, k 7: 1.71 -> 1.61 ms, one run).
template <typename A, typename Body>
void for_job_pairs(int64_t outer, int64_t inner, int64_t buf_len, const Body& body) {
  const int64_t jobs = outer * inner;
  if (jobs == 0) return;
#pragma omp parallel
  {
    std::vector<A> buf(static_cast<size_t>(std::max<int64_t>(buf_len, 1)));
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t begin = jobs / threads * t + std::min(t, jobs % threads);
    const int64_t end = begin + jobs / threads + (t < jobs % threads ? 1 : 0);
    int64_t o = begin / inner, i = begin % inner;
    for (int64_t job = begin; job < end; ++job) {
      body(o, i, buf.data());
      if (++i == inner) i = 0, ++o;
    }
  }
}

// Rows this narrow are summed in one fixed 16-lane step (the tile gates and the bin means of NCHW
// planes), and scaled a tile row at a time.
constexpr int64_t kNarrow = 16;

// Bin n of plane (b, c) in a buffer laid out as L.
inline int64_t bin_index(const BinLayout& L, int64_t b, int64_t c, int64_t n) {
  return b * L.sample + L.base[n] + c * L.step[n];
}

// The N bin values of plane (b, c) in src (laid out as L), gathered into d.
template <typename A>
inline const A* plane_bins(const A* src, const BinLayout& L, int64_t b, int64_t c, int64_t N, A* d) {
  for (int64_t n = 0; n < N; ++n) d[n] = src[bin_index(L, b, c, n)];
  return d;
}

// bins of plane (b, c) from its cell sums (double), stored as T into out laid out as L
template <typename T>
void cells_to_bins(const double* cs, T* out, int64_t b, int64_t c, const BinGeometry& g, const BinLayout& L) {
  for (int64_t n = 0; n < g.N; ++n) {
    const int64_t* bc = g.bin_cells + 4 * n;
    double s = 0;
    for (int64_t r = bc[0]; r < bc[1]; ++r)
      for (int64_t c = bc[2]; c < bc[3]; ++c) s += cs[r * g.gw + c];
    out[bin_index(L, b, c, n)] = from_double<T>(s / static_cast<double>(area(g, n)));
  }
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

// NCHW: jobs of (plane, row split).
template <typename T>
void fwd_plane(const T* x, T* out, int64_t B, int64_t C, Strides4 sx, const BinGeometry& g, const BinLayout& L) {
  using A = acc_t<T>;
  const int64_t H = g.H, W = g.W, BC = B * C, cells = g.gh * g.gw;
  const int64_t R = split_rows(BC, H, W, kMinSeg);
  const int64_t S = ceil_div(H, R);
  const int64_t F = fold_rows(W);
  std::vector<double> partial(S > 1 ? static_cast<size_t>(BC * S * cells) : 0);
#pragma omp parallel
  {
    std::vector<A> vrow(static_cast<size_t>(W));
    std::vector<double> vcs(static_cast<size_t>(cells));
#pragma omp for schedule(static)
    for (int64_t job = 0; job < BC * S; ++job) {
      const int64_t bc = job / S, s = job % S;
      const T* p = x + (bc / C) * sx.b + (bc % C) * sx.c;
      const int64_t r0 = s * R, r1 = std::min(H, r0 + R);
      A* __restrict__ row = vrow.data();
      double* cs = S == 1 ? vcs.data() : partial.data() + job * cells;
      std::fill(cs, cs + cells, 0.0);
      auto flush = [&](int64_t grp) {
        double* cg = cs + grp * g.gw;
        for (int64_t j = 0; j < g.gw; ++j) {
          double t = 0;
          for (int64_t w = g.col_edge[j]; w < g.col_edge[j + 1]; ++w) t += static_cast<double>(row[w]);
          cg[j] += t;
        }
        std::fill(row, row + W, A(0));
      };
      for (int64_t h = r0; h < r1;) {
        const int64_t grp = g.row_group[h], gend = std::min(r1, g.row_edge[grp + 1]);
        std::fill(row, row + W, A(0));
        int64_t n = 0;
        for (; h < gend; ++h) {
          const T* __restrict__ px = p + h * W;   // plane contiguous: (h, w) at h * W + w
#pragma omp simd
          for (int64_t w = 0; w < W; ++w) row[w] += ld(px[w]);
          if (++n == F) n = 0, flush(grp);
        }
        if (n) flush(grp);
      }
      if (S == 1) cells_to_bins(cs, out, bc / C, bc % C, g, L);
    }
  }
  if (S > 1) {
#pragma omp parallel
    {
      std::vector<double> vcs(static_cast<size_t>(cells));
#pragma omp for schedule(static)
      for (int64_t bc = 0; bc < BC; ++bc) {
        double* cs = vcs.data();
        std::fill(cs, cs + cells, 0.0);
        for (int64_t s = 0; s < S; ++s) {
          const double* ps = partial.data() + (bc * S + s) * cells;
          for (int64_t i = 0; i < cells; ++i) cs[i] += ps[i];
        }
        cells_to_bins(cs, out, bc / C, bc % C, g, L);
      }
    }
  }
}

// 16 lanes of A as one value (a GCC / Clang vector extension): held in registers across a loop,
// where the adds into an array of 16 went through memory, a store-to-load chain per step (the
// narrow backward's gradient lanes: 67 -> 34 ns per 14 x 14 plane in a microbenchmark).
template <typename A>
struct Vec16Of {
  typedef A type __attribute__((vector_size(kNarrow * sizeof(A))));
};
template <typename A>
using vec16 = typename Vec16Of<A>::type;
template <typename A>
using mask16 = vec16<std::conditional_t<sizeof(A) == 8, int64_t, int32_t>>;   // lanes of -1 (on) or 0

// The n <= 16 elements at p (n = 16: all of them) as 16 lanes, lanes >= n zero; nothing past
// p + n is read (a part row goes through a copy of n elements).
template <typename T>
inline vec16<acc_t<T>> load16(const T* __restrict__ p, int64_t n = kNarrow) {
  using A = acc_t<T>;
  vec16<A> v;
  if (n == kNarrow && std::is_same_v<T, A>) {
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  T s[kNarrow] = {};
  std::memcpy(s, p, static_cast<size_t>(n) * sizeof(T));
  A t[kNarrow];
#pragma omp simd
  for (int64_t w = 0; w < kNarrow; ++w) t[w] = ld(s[w]);
  std::memcpy(&v, t, sizeof v);
  return v;
}

// The bins of a plane of narrow rows (W <= kNarrow), by the distinct row-group ranges [lo, hi) of
// the bins: each bin's columns, its lanes as a mask; the bins of each range listed together
// (range_bins[range_ptr[q] .. range_ptr[q + 1])), and the ranges holding each row group.
template <typename A>
struct NarrowBins {
  std::vector<int64_t> range_lo, range_hi, range_ptr, range_bins, group_ptr, group_ranges;
  std::vector<int64_t> range, col_lo, col_hi;    // per bin
  std::vector<A> inv_area;                       // per bin
  std::vector<mask16<A>> lane_mask;              // per bin, in range_bins' order
  explicit NarrowBins(const BinGeometry& g) {
    std::map<std::pair<int64_t, int64_t>, int64_t> index;   // (lo, hi) -> range: O(N log N) for many bins
    for (int64_t n = 0; n < g.N; ++n) {
      const int64_t* bc = g.bin_cells + 4 * n;
      const auto found = index.emplace(std::make_pair(bc[0], bc[1]), ranges());
      if (found.second) range_lo.push_back(bc[0]), range_hi.push_back(bc[1]);
      range.push_back(found.first->second);
      col_lo.push_back(g.col_edge[bc[2]]);
      col_hi.push_back(g.col_edge[bc[3]]);
      inv_area.push_back(static_cast<A>(1.0 / static_cast<double>(area(g, n))));
    }
    range_ptr.assign(static_cast<size_t>(ranges() + 1), 0);   // the bins of each range, in bin order
    for (int64_t n = 0; n < g.N; ++n) ++range_ptr[range[n] + 1];
    for (int64_t q = 0; q < ranges(); ++q) range_ptr[q + 1] += range_ptr[q];
    range_bins.resize(static_cast<size_t>(g.N));
    std::vector<int64_t> fill(range_ptr.begin(), range_ptr.end() - 1);
    for (int64_t n = 0; n < g.N; ++n) range_bins[fill[range[n]]++] = n;
    for (int64_t n : range_bins) {
      mask16<A> m;
      for (int64_t w = 0; w < kNarrow; ++w) m[w] = w >= col_lo[n] && w < col_hi[n] ? -1 : 0;
      lane_mask.push_back(m);
    }
    group_ptr.assign(static_cast<size_t>(g.gh + 1), 0);       // the ranges holding each row group
    for (int64_t q = 0; q < ranges(); ++q)
      for (int64_t r = range_lo[q]; r < range_hi[q]; ++r) ++group_ptr[r + 1];
    for (int64_t r = 0; r < g.gh; ++r) group_ptr[r + 1] += group_ptr[r];
    group_ranges.resize(static_cast<size_t>(group_ptr[g.gh]));
    fill.assign(group_ptr.begin(), group_ptr.end() - 1);
    for (int64_t q = 0; q < ranges(); ++q)
      for (int64_t r = range_lo[q]; r < range_hi[q]; ++r) group_ranges[fill[r]++] = q;
  }
  int64_t ranges() const { return static_cast<int64_t>(range_lo.size()); }
};

// NCHW planes of narrow rows (W <= kNarrow) and at most kChunk elements, one plane per job, fp32
// sums throughout (fp64 for fp64), in three steps:
//  1. each row group's rows summed in one 16-lane step per row (lanes >= W hold the next row's
//     start and are never read; the plane's last rows load only what is left of it);
//  2. the lanes summed over each distinct row range of the bins;
//  3. each bin the sum of its row range's lanes over its columns, times its reciprocal area.
// fwd_plane's per-row vector tails, double folds and division per bin made bin_mean compute-bound
// on 14 x 14 planes: 5.2 ms against 1.2 ms for x.sum() at 32x1024x14x14 on the Xeon VM; bins
// summed from cells took twice step 3's time in a microbenchmark (nested loops of 1-6 trips).
template <typename T>
void fwd_narrow(const T* x, T* out, int64_t B, int64_t C, Strides4 sx, const BinGeometry& g, const BinLayout& L) {
  using A = acc_t<T>;
  using V = vec16<A>;
  const int64_t H = g.H, W = g.W, HW = H * W;
  const NarrowBins<A> nb(g);
  for_job_pairs<A>(B, C, (g.gh + nb.ranges()) * kNarrow, [&](int64_t b, int64_t c, A* buf) {
    const T* p = x + b * sx.b + c * sx.c;
    prefetch_ahead(p, HW);
    A* __restrict__ group_lanes = buf;
    A* __restrict__ range_lanes = buf + g.gh * kNarrow;
    int64_t h = 0;
    for (int64_t grp = 0; grp < g.gh; ++grp) {
      V sum = {};
      for (const int64_t h1 = g.row_edge[grp + 1]; h < h1; ++h) sum += load16(p + h * W, std::min(kNarrow, HW - h * W));
      std::memcpy(group_lanes + grp * kNarrow, &sum, sizeof sum);
    }
    for (int64_t q = 0; q < nb.ranges(); ++q) {
      V sum = {};
      for (int64_t r = nb.range_lo[q]; r < nb.range_hi[q]; ++r) sum += load16(group_lanes + r * kNarrow);
      std::memcpy(range_lanes + q * kNarrow, &sum, sizeof sum);
    }
    T* o = out + b * L.sample;
    for (int64_t n = 0; n < g.N; ++n) {
      const A* v = range_lanes + nb.range[n] * kNarrow;
      A s0 = 0, s1 = 0;   // two chains: a bin may span all W columns
      int64_t w = nb.col_lo[n];
      for (const int64_t e = nb.col_hi[n]; w + 1 < e; w += 2) s0 += v[w], s1 += v[w + 1];
      if (w < nb.col_hi[n]) s0 += v[w];
      o[L.base[n] + c * L.step[n]] = store<T>((s0 + s1) * nb.inv_area[n]);
    }
  });
}

// channels_last: bins of channels [c0, c0 + n) of sample s from their (cells x block) double sums.
template <typename T>
void cells_to_bins_block(const double* ct, int64_t kB, int64_t n, T* out, int64_t s, int64_t c0, const BinGeometry& g,
                         const BinLayout& L, double* tmp) {
  for (int64_t b = 0; b < g.N; ++b) {
    const int64_t* bc = g.bin_cells + 4 * b;
    std::fill(tmp, tmp + n, 0.0);
    for (int64_t r = bc[0]; r < bc[1]; ++r)
      for (int64_t c = bc[2]; c < bc[3]; ++c) {
        const double* src = ct + (r * g.gw + c) * kB;
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) tmp[k] += src[k];
      }
    const double a = static_cast<double>(area(g, b));
    for (int64_t k = 0; k < n; ++k) out[bin_index(L, s, c0 + k, b)] = from_double<T>(tmp[k] / a);
  }
}

// channels_last: jobs of (sample, channel block, row split); each pixel's channel vector is added
// to its cell's accumulator (the cells of the current row group), folded into double per group.
template <typename T>
void fwd_channels(const T* x, T* out, int64_t B, int64_t C, Strides4 sx, const BinGeometry& g, const BinLayout& L) {
  using A = acc_t<T>;
  const int64_t H = g.H, W = g.W, cells = g.gh * g.gw;
  int64_t nC;
  const int64_t kB = cell_block_width(C, cells, &nC);
  const int64_t R = split_rows(B * nC, H, W, kMinPixels);
  const int64_t S = ceil_div(H, R);
  const int64_t F = fold_rows(W);
  std::vector<double> partial(S > 1 ? static_cast<size_t>(B * S * cells * C) : 0);
#pragma omp parallel
  {
    std::vector<A> vacc(static_cast<size_t>(g.gw * kB));
    std::vector<double> vtot(static_cast<size_t>(cells * kB)), vtmp(static_cast<size_t>(kB));
#pragma omp for schedule(static)
    for (int64_t job = 0; job < B * nC * S; ++job) {
      const int64_t s = job % S, bcb = job / S;
      const int64_t b = bcb / nC, c0 = (bcb % nC) * kB;
      const int64_t n = std::min(kB, C - c0);
      const int64_t r0 = s * R, r1 = std::min(H, r0 + R);
      A* __restrict__ acc = vacc.data();
      double* __restrict__ tot = vtot.data();
      std::fill(tot, tot + cells * kB, 0.0);
      auto flush = [&](int64_t grp) {
        for (int64_t j = 0; j < g.gw; ++j) {
          double* dst = tot + (grp * g.gw + j) * kB;
          A* src = acc + j * kB;
#pragma omp simd
          for (int64_t k = 0; k < n; ++k) dst[k] += static_cast<double>(src[k]);
        }
        std::fill(acc, acc + g.gw * kB, A(0));
      };
      const T* xb = x + b * sx.b + c0;
      for (int64_t h = r0; h < r1;) {
        const int64_t grp = g.row_group[h], gend = std::min(r1, g.row_edge[grp + 1]);
        std::fill(acc, acc + g.gw * kB, A(0));
        int64_t nr = 0;
        for (; h < gend; ++h) {
          for (int64_t w = 0; w < W; ++w) {
            const T* __restrict__ px = xb + h * sx.h + w * sx.w;
            A* __restrict__ a = acc + g.col_group[w] * kB;
#pragma omp simd
            for (int64_t k = 0; k < n; ++k) a[k] += ld(px[k]);
          }
          if (++nr == F) nr = 0, flush(grp);
        }
        if (nr) flush(grp);
      }
      if (S == 1) {
        cells_to_bins_block(tot, kB, n, out, b, c0, g, L, vtmp.data());
      } else {
        for (int64_t i = 0; i < cells; ++i)
          std::copy(tot + i * kB, tot + i * kB + n, partial.data() + ((b * S + s) * cells + i) * C + c0);
      }
    }
  }
  if (S > 1) {
#pragma omp parallel
    {
      std::vector<double> vtot(static_cast<size_t>(cells * kB)), vtmp(static_cast<size_t>(kB));
#pragma omp for schedule(static)
      for (int64_t bcb = 0; bcb < B * nC; ++bcb) {
        const int64_t b = bcb / nC, c0 = (bcb % nC) * kB;
        const int64_t n = std::min(kB, C - c0);
        double* tot = vtot.data();
        std::fill(tot, tot + cells * kB, 0.0);
        for (int64_t s = 0; s < S; ++s)
          for (int64_t i = 0; i < cells; ++i) {
            const double* src = partial.data() + ((b * S + s) * cells + i) * C + c0;
            for (int64_t k = 0; k < n; ++k) tot[i * kB + k] += src[k];
          }
        cells_to_bins_block(tot, kB, n, out, b, c0, g, L, vtmp.data());
      }
    }
  }
}

// Any other strides: one plane per job, double sums per cell.
template <typename T>
void fwd_generic(const T* x, T* out, int64_t B, int64_t C, Strides4 sx, const BinGeometry& g, const BinLayout& L) {
  const int64_t cells = g.gh * g.gw;
#pragma omp parallel
  {
    std::vector<double> vcs(static_cast<size_t>(cells));
#pragma omp for schedule(static)
    for (int64_t bc = 0; bc < B * C; ++bc) {
      const T* p = x + (bc / C) * sx.b + (bc % C) * sx.c;
      double* cs = vcs.data();
      std::fill(cs, cs + cells, 0.0);
      for (int64_t h = 0; h < g.H; ++h) {
        double* row = cs + g.row_group[h] * g.gw;
        for (int64_t w = 0; w < g.W; ++w) row[g.col_group[w]] += static_cast<double>(ld(p[h * sx.h + w * sx.w]));
      }
      cells_to_bins(cs, out, bc / C, bc % C, g, L);
    }
  }
}

template <typename T>
void fwd_typed(const T* x, T* out, int64_t B, int64_t C, Strides4 sx, const BinGeometry& g, const BinLayout& L) {
  if (B * C == 0 || g.N == 0) return;
  if (plane_contiguous(sx, g.H, g.W)) {
    if (g.W <= kNarrow && g.H * g.W <= kChunk) return fwd_narrow(x, out, B, C, sx, g, L);
    return fwd_plane(x, out, B, C, sx, g, L);
  }
  if (channels_contiguous(sx, C)) return fwd_channels(x, out, B, C, sx, g, L);
  fwd_generic(x, out, B, C, sx, g, L);
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

// The gradient of every cell of one plane: sum over the bins holding it of dy / area, summed in
// increasing bin order (double), stored as O (x's dtype, or the accumulation type for the gated
// backward).
template <typename O>
void cell_grads(const acc_t<O>* dy, O* out, double* tmp, const BinGeometry& g) {
  const int64_t cells = g.gh * g.gw;
  std::fill(tmp, tmp + cells, 0.0);
  for (int64_t n = 0; n < g.N; ++n) {
    const int64_t* bc = g.bin_cells + 4 * n;
    const double v = static_cast<double>(dy[n]) / static_cast<double>(area(g, n));
    for (int64_t r = bc[0]; r < bc[1]; ++r)
      for (int64_t c = bc[2]; c < bc[3]; ++c) tmp[r * g.gw + c] += v;
  }
  for (int64_t i = 0; i < cells; ++i) out[i] = from_double<O>(tmp[i]);
}

// NCHW: jobs of (plane, row split): one row pattern per row group, copied into each of its rows.
// kGated: dx = dmap * gate[plane] + the pattern (dmap strided like dx; SPA's input gradient).
template <bool kGated, typename T>
void bwd_plane(const acc_t<T>* dy, T* dx, int64_t B, int64_t C, Strides4 sdx, const BinGeometry& g,
               const BinLayout& L, const T* dmap, const acc_t<T>* gate) {
  using Cell = std::conditional_t<kGated, acc_t<T>, T>;
  const int64_t H = g.H, W = g.W, BC = B * C, cells = g.gh * g.gw;
  const int64_t R = split_rows(BC, H, W, kMinSeg);
  const int64_t S = ceil_div(H, R);
#pragma omp parallel
  {
    std::vector<Cell> vcell(static_cast<size_t>(cells)), vrow(static_cast<size_t>(W));
    std::vector<double> vtmp(static_cast<size_t>(cells));
    std::vector<acc_t<T>> vdy(static_cast<size_t>(g.N));
#pragma omp for schedule(static)
    for (int64_t job = 0; job < BC * S; ++job) {
      const int64_t bc = job / S, s = job % S;
      const int64_t offset = (bc / C) * sdx.b + (bc % C) * sdx.c;
      T* p = dx + offset;
      const int64_t r0 = s * R, r1 = std::min(H, r0 + R);
      Cell* cell = vcell.data();
      Cell* __restrict__ row = vrow.data();
      cell_grads<Cell>(plane_bins(dy, L, bc / C, bc % C, g.N, vdy.data()), cell, vtmp.data(), g);
      for (int64_t h = r0; h < r1;) {
        const int64_t grp = g.row_group[h], gend = std::min(r1, g.row_edge[grp + 1]);
        const Cell* cg = cell + grp * g.gw;
        for (int64_t w = 0; w < W; ++w) row[w] = cg[g.col_group[w]];
        for (; h < gend; ++h) {
          if constexpr (kGated) {
            const T* __restrict__ m = dmap + offset + h * W;
            T* __restrict__ o = p + h * W;
            const acc_t<T> gv = gate[bc];
#pragma omp simd
            for (int64_t w = 0; w < W; ++w) o[w] = put<T>(ld(m[w]) * gv + row[w]);
          } else {
            std::copy(row, row + W, p + h * W);
          }
        }
      }
    }
  }
}

// NCHW planes of narrow rows (W <= kNarrow), one plane per job, in fp32 (fp64 for fp64): the lanes
// of each row range of the bins, the sum of its bins' dy / area over their columns (masked); each
// row group's lanes, the sum of the ranges holding it, stored for each of its rows into a buffer
// of the plane (each 16-lane store overrunning into the next row, which the next store rewrites);
// then the plane written in one contiguous run from the buffer (kGated: dx = dmap * gate + it, as
// bwd_plane). Per 14-wide row, bwd_plane's copy ran as a vector tail: 3.7 ms at 32x1024x14x14 on
// the Xeon VM, where a write of x takes about 1.2.
template <bool kGated, typename T>
void bwd_narrow(const acc_t<T>* dy, T* dx, int64_t B, int64_t C, Strides4 sdx, const BinGeometry& g,
                const BinLayout& L, const T* dmap, const acc_t<T>* gate) {
  using A = acc_t<T>;
  using V = vec16<A>;
  const int64_t H = g.H, W = g.W, HW = H * W;
  const NarrowBins<A> nb(g);
  // per bin in range_bins' order: where its dy lies (L.base, L.step), 1 / its area
  std::vector<int64_t> base, step;
  std::vector<A> scale;
  for (int64_t n : nb.range_bins) base.push_back(L.base[n]), step.push_back(L.step[n]), scale.push_back(nb.inv_area[n]);
  const int64_t ranges = nb.ranges() * kNarrow, pattern = HW + kNarrow;
  for_job_pairs<A>(B, C, ranges + pattern + g.N, [&](int64_t b, int64_t c, A* buf) {
    const int64_t bc = b * C + c, offset = b * sdx.b + c * sdx.c;
    A* range_lanes = buf;
    A* __restrict__ grad = buf + ranges;
    A* __restrict__ v = buf + ranges + pattern;   // dy / area, in range_bins' order
    const A* dyb = dy + b * L.sample;
    for (int64_t k = 0; k < g.N; ++k) v[k] = dyb[base[k] + c * step[k]] * scale[k];
    for (int64_t q = 0; q < nb.ranges(); ++q) {
      V sum = {};
      for (int64_t k = nb.range_ptr[q]; k < nb.range_ptr[q + 1]; ++k) sum += nb.lane_mask[k] ? V{} + v[k] : V{};
      std::memcpy(range_lanes + q * kNarrow, &sum, sizeof sum);
    }
    // the plane's gradient, row after row, each 16-lane store overrunning into the next row
    int64_t h = 0;
    for (int64_t grp = 0; grp < g.gh; ++grp) {
      V lanes = {};
      for (int64_t t = nb.group_ptr[grp]; t < nb.group_ptr[grp + 1]; ++t)
        lanes += load16(range_lanes + nb.group_ranges[t] * kNarrow);
      for (const int64_t h1 = g.row_edge[grp + 1]; h < h1; ++h) std::memcpy(grad + h * W, &lanes, sizeof lanes);
    }
    if constexpr (kGated) {
      prefetch_ahead(dmap + offset, HW);
      const T* __restrict__ m = dmap + offset;
      T* __restrict__ o = dx + offset;
      const A gv = gate[bc];
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) o[i] = put<T>(ld(m[i]) * gv + grad[i]);
    } else {
      T* __restrict__ o = dx + offset;
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) o[i] = put<T>(grad[i]);
    }
  });
}

// channels_last: jobs of (sample, channel block, row split): each pixel gets its cell's vector.
template <typename T>
void bwd_channels(const acc_t<T>* dy, T* dx, int64_t B, int64_t C, Strides4 sdx, const BinGeometry& g,
                  const BinLayout& L) {
  const int64_t H = g.H, W = g.W, cells = g.gh * g.gw;
  int64_t nC;
  const int64_t kB = cell_block_width(C, cells, &nC);
  const int64_t R = split_rows(B * nC, H, W, kMinPixels);
  const int64_t S = ceil_div(H, R);
#pragma omp parallel
  {
    std::vector<T> vcell(static_cast<size_t>(cells * kB)), vone(static_cast<size_t>(cells));
    std::vector<double> vtmp(static_cast<size_t>(cells));
    std::vector<acc_t<T>> vdy(static_cast<size_t>(g.N));
#pragma omp for schedule(static)
    for (int64_t job = 0; job < B * nC * S; ++job) {
      const int64_t s = job % S, bcb = job / S;
      const int64_t b = bcb / nC, c0 = (bcb % nC) * kB;
      const int64_t n = std::min(kB, C - c0);
      const int64_t r0 = s * R, r1 = std::min(H, r0 + R);
      T* cell = vcell.data();
      for (int64_t k = 0; k < n; ++k) {     // (cells x block) table, channel-minor
        cell_grads(plane_bins(dy, L, b, c0 + k, g.N, vdy.data()), vone.data(), vtmp.data(), g);
        for (int64_t i = 0; i < cells; ++i) cell[i * kB + k] = vone[i];
      }
      T* xb = dx + b * sdx.b + c0;
      for (int64_t h = r0; h < r1; ++h) {
        const T* cg = cell + g.row_group[h] * g.gw * kB;
        for (int64_t w = 0; w < W; ++w) {
          const T* src = cg + g.col_group[w] * kB;
          std::copy(src, src + n, xb + h * sdx.h + w * sdx.w);
        }
      }
    }
  }
}

template <typename T>
void bwd_generic(const acc_t<T>* dy, T* dx, int64_t B, int64_t C, Strides4 sdx, const BinGeometry& g,
                 const BinLayout& L) {
  const int64_t cells = g.gh * g.gw;
#pragma omp parallel
  {
    std::vector<T> vcell(static_cast<size_t>(cells));
    std::vector<double> vtmp(static_cast<size_t>(cells));
    std::vector<acc_t<T>> vdy(static_cast<size_t>(g.N));
#pragma omp for schedule(static)
    for (int64_t bc = 0; bc < B * C; ++bc) {
      T* p = dx + (bc / C) * sdx.b + (bc % C) * sdx.c;
      cell_grads(plane_bins(dy, L, bc / C, bc % C, g.N, vdy.data()), vcell.data(), vtmp.data(), g);
      for (int64_t h = 0; h < g.H; ++h) {
        const T* cg = vcell.data() + g.row_group[h] * g.gw;
        for (int64_t w = 0; w < g.W; ++w) p[h * sdx.h + w * sdx.w] = cg[g.col_group[w]];
      }
    }
  }
}

template <typename T>
void bwd_typed(const acc_t<T>* dy, T* dx, int64_t B, int64_t C, Strides4 sdx, const BinGeometry& g,
               const BinLayout& L) {
  if (B * C * g.H * g.W == 0) return;
  if (plane_contiguous(sdx, g.H, g.W)) {
    if (g.W <= kNarrow) return bwd_narrow<false>(dy, dx, B, C, sdx, g, L, static_cast<const T*>(nullptr), dy);
    return bwd_plane<false>(dy, dx, B, C, sdx, g, L, static_cast<const T*>(nullptr), dy);
  }
  if (channels_contiguous(sdx, C)) return bwd_channels(dy, dx, B, C, sdx, g, L);
  bwd_generic(dy, dx, B, C, sdx, g, L);
}

// ---------------------------------------------------------------------------------------------
// tile gates
// ---------------------------------------------------------------------------------------------

// A tile row is a few hundred bytes (14-wide rows) to a few KiB of work, between which the
// hardware prefetcher alone fell behind: each job prefetches its span (prefetch_ahead). On the
// Xeon VM, tile_mean 1.36 -> 0.96 ms at 32x1024x14x14 (k 7) and 1.78 -> 1.51 ms at 8x256x56x56;
// tile_scale, tile_dot and tile_scale_backward_dx 24-26% at 8x256x56x56 (single runs).

// Runs body(bc, i, buf) for every tile row i of every plane bc = b * C + c, one job each, with a
// per-thread buffer of 2 (min(k, H) W + kNarrow) accumulators (for rows widened from per-tile
// values: the inner loops then run over whole rows, or whole tile rows, at unit stride).
template <typename A, typename Body>
void for_tile_rows(int64_t B, int64_t C, int64_t H, int64_t W, int64_t k, const Body& body) {
  for_job_pairs<A>(B * C, (H + k - 1) / k, 2 * (std::min(k, H) * W + kNarrow), body);
}

// dst[w] = src[w / k] for w < W.
template <typename A>
void widen(const A* src, A* dst, int64_t W, int64_t k) {
  for (int64_t w0 = 0, j = 0; w0 < W; w0 += k, ++j)
    for (int64_t w = w0; w < std::min(W, w0 + k); ++w) dst[w] = src[j];
}

// Row kernels of the tile gates, for w < n: y[w] = x[w] * g[w] (+ a[w] when kAdd), and
// acc[w] += x[w] (* dy[w] when kDot). (Masked AVX-512 steps for the 14-wide rows of the late
// ResNet stages measured 2-3x slower than these compiled loops on the dev machine's EPYC.)
template <bool kAdd, typename T, typename A>
inline void row_scale(const T* __restrict__ x, const A* __restrict__ g, const A* __restrict__ a, T* __restrict__ y,
                      int64_t n) {
#pragma omp simd
  for (int64_t w = 0; w < n; ++w) {
    A r = pool_cvt::ld(x[w]) * g[w];
    if constexpr (kAdd) r += a[w];
    y[w] = pool_cvt::put<T>(r);
  }
}

template <bool kDot, typename T, typename A>
inline void row_accumulate(const T* __restrict__ dy, const T* __restrict__ x, A* __restrict__ acc, int64_t n) {
#pragma omp simd
  for (int64_t w = 0; w < n; ++w) {
    if constexpr (kDot) acc[w] += pool_cvt::ld(dy[w]) * pool_cvt::ld(x[w]);
    else acc[w] += pool_cvt::ld(x[w]);
  }
}

// Narrow rows (W <= kNarrow) widen a tile row's gates once into 16 lanes, lanes[w] = gate of
// column w (lanes >= W repeat the last column's), through lane_tile[w] = min(w, W - 1) / k.
struct NarrowTiles {
  int64_t lane_tile[kNarrow];
  explicit NarrowTiles(int64_t W, int64_t k) {
    for (int64_t w = 0; w < kNarrow; ++w) lane_tile[w] = std::min(w, W - 1) / k;
  }
  template <typename A>
  void widen16(const A* __restrict__ src, A* __restrict__ lanes) const {
    for (int64_t w = 0; w < kNarrow; ++w) lanes[w] = src[lane_tile[w]];
  }
};

// dst[0, rows W): the tile row's gates repeated per row, from their 16 widened lanes: one
// 16-lane store per row, each overrunning into the next row's start, which the next store
// overwrites (dst holds rows W + kNarrow).
template <typename A>
void repeat_rows(const A* __restrict__ lanes, A* __restrict__ dst, int64_t W, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t w = 0; w < kNarrow; ++w) dst[r * W + w] = lanes[w];
  }
}

// A tile row's rows are contiguous (NCHW planes): narrow rows are scaled as one run of
// rows * W elements against the gates repeated per row. Row by row, a 14-wide row ran mostly as
// a vector tail: tile_scale at 32x1024x14x14 (k 7) took 2.1 ms against 1.4 ms for x * 2 on the
// 2-vCPU Xeon VM; building the repeated gates with scalar widening and a copy per row cost
// another 0.5 ms there (16-lane stores: see repeat_rows).
template <typename T>
void tile_scale_typed(const T* x, const acc_t<T>* g, T* y, int64_t B, int64_t C, int64_t H, int64_t W, int64_t k) {
  using A = acc_t<T>;
  const int64_t nh = (H + k - 1) / k, nw = (W + k - 1) / k;
  const NarrowTiles narrow(W, k);
  for_tile_rows<A>(B, C, H, W, k, [&](int64_t bc, int64_t i, A* buf) {
    const int64_t h0 = i * k, rows = std::min(H, h0 + k) - h0;
    const int64_t base = (bc * H + h0) * W;
    prefetch_ahead(x + base, rows * W);
    if (W <= kNarrow) {
      A lanes[kNarrow];
      narrow.widen16(g + (bc * nh + i) * nw, lanes);
      repeat_rows(lanes, buf, W, rows);
      row_scale<false>(x + base, buf, static_cast<const A*>(nullptr), y + base, rows * W);
      return;
    }
    widen(g + (bc * nh + i) * nw, buf, W, k);
    for (int64_t r = 0; r < rows; ++r)
      row_scale<false>(x + base + r * W, buf, static_cast<const A*>(nullptr), y + base + r * W, W);
  });
}

// Tile sums of dy * x (kDot) or of x: fp32 down the tile's rows, then across its columns;
// out[tile] = sum (times 1 / the tile's size for the means) stored as O (the accumulation type,
// or x's for the means). The columns were summed in double with a division per tile: half of
// tile_mean's time at 32x1024x14x14, k 7, on the Xeon VM.
template <bool kDot, typename T, typename O>
void tile_sums_typed(const T* dy, const T* x, O* out, int64_t B, int64_t C, int64_t H, int64_t W, int64_t k,
                     bool mean) {
  using A = acc_t<T>;
  const int64_t nh = (H + k - 1) / k, nw = (W + k - 1) / k;
  const int64_t total = B * C * H * W;
  // The scale per tile column: [0, nw) for tile rows of min(k, H) rows, [nw, 2 nw) for the last
  // tile row (H % k rows, when that is not 0).
  std::vector<A> scale(static_cast<size_t>(2 * nw), A(1));
  if (mean)
    for (int64_t j = 0; j < nw; ++j) {
      const int64_t cols = std::min(W, (j + 1) * k) - j * k;
      scale[j] = static_cast<A>(1.0 / static_cast<double>(std::min(k, H) * cols));
      scale[nw + j] = static_cast<A>(1.0 / static_cast<double>((H - (nh - 1) * k) * cols));
    }
  for_tile_rows<A>(B, C, H, W, k, [&](int64_t bc, int64_t i, A* acc) {
    const int64_t h0 = i * k, h1 = std::min(H, h0 + k);
    O* o = out + (bc * nh + i) * nw;
    prefetch_ahead(x + (bc * H + h0) * W, (h1 - h0) * W);
    if constexpr (kDot) prefetch_ahead(dy + (bc * H + h0) * W, (h1 - h0) * W);
    A lanes[kNarrow] = {};
    const A* sums = W <= kNarrow ? lanes : acc;   // the tile row's column sums
    if (W <= kNarrow) {
      // Rows of at most 16 (14 wide at the late ResNet stages; the compiled row loop ran most of
      // them as a scalar tail): one fixed 16-lane step per row, reading on into the next rows
      // (lanes >= W are left out below); rows within 16 elements of the tensor's end go through
      // a padded copy.
      for (int64_t h = h0; h < h1; ++h) {
        const int64_t r = bc * H + h;
        const T* px = x + r * W;
        const T* pdy = kDot ? dy + r * W : nullptr;
        T xpad[kNarrow], dypad[kNarrow];
        if (r * W + kNarrow > total) {
          for (int64_t w = 0; w < kNarrow; ++w) {
            xpad[w] = w < W ? px[w] : T{};
            if constexpr (kDot) dypad[w] = w < W ? pdy[w] : T{};
          }
          px = xpad;
          pdy = dypad;
        }
        row_accumulate<kDot>(pdy, px, lanes, kNarrow);
      }
    } else {
      for (int64_t w = 0; w < W; ++w) acc[w] = A(0);
      for (int64_t h = h0; h < h1; ++h)
        row_accumulate<kDot>(kDot ? dy + (bc * H + h) * W : nullptr, x + (bc * H + h) * W, acc, W);
    }
    const A* sc = scale.data() + (h1 - h0 < k ? nw : 0);
    for (int64_t w0 = 0, j = 0; w0 < W; w0 += k, ++j) {
      const int64_t w1 = std::min(W, w0 + k);
      A t = 0;
      for (int64_t w = w0; w < w1; ++w) t += sums[w];
      if constexpr (std::is_same_v<O, T>) o[j] = store<T>(t * sc[j]);
      else o[j] = static_cast<O>(t * sc[j]);
    }
  });
}

template <typename T>
void tile_dx_typed(const T* dy, const acc_t<T>* g, const acc_t<T>* a, T* dx, int64_t B, int64_t C, int64_t H,
                   int64_t W, int64_t k) {
  using A = acc_t<T>;
  const int64_t nh = (H + k - 1) / k, nw = (W + k - 1) / k;
  const int64_t span = std::min(k, H) * W + kNarrow;
  const NarrowTiles narrow(W, k);
  for_tile_rows<A>(B, C, H, W, k, [&](int64_t bc, int64_t i, A* buf) {
    const int64_t h0 = i * k, rows = std::min(H, h0 + k) - h0;
    const int64_t base = (bc * H + h0) * W;
    A* __restrict__ grow = buf;
    A* __restrict__ arow = buf + span;
    prefetch_ahead(dy + base, rows * W);
    if (W <= kNarrow) {       // one run per tile row, as tile_scale_typed
      A glanes[kNarrow], alanes[kNarrow];
      narrow.widen16(g + (bc * nh + i) * nw, glanes);
      narrow.widen16(a + (bc * nh + i) * nw, alanes);
      repeat_rows(glanes, grow, W, rows);
      repeat_rows(alanes, arow, W, rows);
      row_scale<true>(dy + base, grow, arow, dx + base, rows * W);
      return;
    }
    widen(g + (bc * nh + i) * nw, grow, W, k);
    widen(a + (bc * nh + i) * nw, arow, W, k);
    for (int64_t r = 0; r < rows; ++r) row_scale<true>(dy + base + r * W, grow, arow, dx + base + r * W, W);
  });
}

}  // namespace

void tile_scale_forward_cpu(const void* x, const void* g, void* y, DType dtype, int64_t B, int64_t C, int64_t H,
                            int64_t W, int64_t k) {
  for_every_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    tile_scale_typed(static_cast<const T*>(x), static_cast<const acc_t<T>*>(g), static_cast<T*>(y), B, C, H, W, k);
  });
}

void tile_dot_cpu(const void* dy, const void* x, void* dg, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                  int64_t k) {
  for_every_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    tile_sums_typed<true>(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<acc_t<T>*>(dg), B, C, H, W,
                          k, false);
  });
}

void tile_mean_cpu(const void* x, void* out, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, int64_t k) {
  for_every_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    tile_sums_typed<false>(static_cast<const T*>(nullptr), static_cast<const T*>(x), static_cast<T*>(out), B, C, H, W,
                           k, true);
  });
}

void tile_scale_backward_dx_cpu(const void* dy, const void* g, const void* a, void* dx, DType dtype, int64_t B,
                                int64_t C, int64_t H, int64_t W, int64_t k) {
  for_every_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    tile_dx_typed(static_cast<const T*>(dy), static_cast<const acc_t<T>*>(g), static_cast<const acc_t<T>*>(a),
                  static_cast<T*>(dx), B, C, H, W, k);
  });
}

#define FA_TYPES(M) M(Float32, float) M(Float64, double) M(Float16, fp16_t) M(BFloat16, bf16_t)

void bin_mean_forward_cpu(const void* x, void* out, DType dtype, int64_t B, int64_t C, Strides4 sx,
                          const BinGeometry& g, const BinLayout& layout) {
  switch (dtype) {
#define FA_CASE(TAG, T) \
  case DType::TAG: return fwd_typed(static_cast<const T*>(x), static_cast<T*>(out), B, C, sx, g, layout);
    FA_TYPES(FA_CASE)
#undef FA_CASE
  }
}

void bin_mean_backward_cpu(const void* dy, void* dx, DType dtype, int64_t B, int64_t C, Strides4 sdx,
                           const BinGeometry& g, const BinLayout& layout) {
  switch (dtype) {
#define FA_CASE(TAG, T) \
  case DType::TAG: return bwd_typed(static_cast<const acc_t<T>*>(dy), static_cast<T*>(dx), B, C, sdx, g, layout);
    FA_TYPES(FA_CASE)
#undef FA_CASE
  }
}

void bin_scale_backward_dx_cpu(const void* dmap, const void* gate, const void* dy, void* dx, DType dtype, int64_t B,
                               int64_t C, Strides4 s, const BinGeometry& g, const BinLayout& layout) {
  if (B * C * g.H * g.W == 0) return;
  switch (dtype) {
#define FA_CASE(TAG, T)                                                                                        \
  case DType::TAG: {                                                                                           \
    using A = acc_t<T>;                                                                                        \
    if (g.W <= kNarrow)                                                                                        \
      return bwd_narrow<true>(static_cast<const A*>(dy), static_cast<T*>(dx), B, C, s, g, layout,            \
                              static_cast<const T*>(dmap), static_cast<const A*>(gate));                       \
    return bwd_plane<true>(static_cast<const A*>(dy), static_cast<T*>(dx), B, C, s, g, layout,               \
                           static_cast<const T*>(dmap), static_cast<const A*>(gate));                          \
  }
    FA_TYPES(FA_CASE)
#undef FA_CASE
  }
}

#undef FA_TYPES

}  // namespace fastattn
