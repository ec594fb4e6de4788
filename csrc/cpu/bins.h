// Bin means on the CPU: averages of x over the rectangular bins of several grids on the H x W plane
// (adaptive-pool pyramids, ceil-mode tiles) in one read of x, and their backward. Torch-free.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace fastattn {

// The bins of all grids, as rectangles of elementary cells: the distinct bin edges along H cut the
// rows into gh row groups, those along W the columns into gw column groups, and every bin is a
// range of whole groups on both axes. Sums over the gh x gw cells take one read of x (each
// position falls in exactly one cell), and every bin sum is a sum of cells; in the backward, all
// positions of a cell receive the same gradient.
//
// The geometry lives in one packed int64 table (so that it can be copied to a device as is):
//   [H, W, gh, gw, N, M, row_edge[gh + 1], col_edge[gw + 1], row_group[H], col_group[W],
//    bin_cells[4 N], cell_ptr[gh gw + 1], cell_bins[M]]
// row_edge: first row of each group, then H; row_group: the group of each row (columns alike);
// bin_cells: [r0, r1, c0, c1) group ranges of each bin, grid after grid, each grid row-major;
// cell_ptr / cell_bins: the bins holding each cell (row-major cells), in increasing order.
struct BinGeometry {
  int64_t H, W, gh, gw, N, M;
  const int64_t* row_edge;
  const int64_t* col_edge;
  const int64_t* row_group;
  const int64_t* col_group;
  const int64_t* bin_cells;
  const int64_t* cell_ptr;
  const int64_t* cell_bins;
};

constexpr int64_t kBinHeader = 6;

// The packed table of the bins of `levels` on an H x W plane (H, W >= 1, levels >= 1). tiles=false:
// the bins of adaptive_avg_pool2d(x, n) for each n; tiles=true: one level k, the tiles of
// avg_pool2d(x, k, k, ceil_mode=True) (border tiles clipped).
std::vector<int64_t> bin_geometry_table(int64_t H, int64_t W, const int64_t* levels, int64_t n_levels, bool tiles);

// A view of a packed table whose header is `header` (the host copy) and whose arrays start at
// `data` (the same table, possibly a device copy).
inline BinGeometry bin_geometry_view(const int64_t* header, const int64_t* data) {
  BinGeometry g;
  g.H = header[0], g.W = header[1], g.gh = header[2], g.gw = header[3], g.N = header[4], g.M = header[5];
  const int64_t* p = data + kBinHeader;
  g.row_edge = p, p += g.gh + 1;
  g.col_edge = p, p += g.gw + 1;
  g.row_group = p, p += g.H;
  g.col_group = p, p += g.W;
  g.bin_cells = p, p += 4 * g.N;
  g.cell_ptr = p, p += g.gh * g.gw + 1;
  g.cell_bins = p;
  return g;
}

// Where the bins of plane (b, c) lie in the forward's output (and in the backward's gradient of
// it): bin n at b * sample + base[n] + c * step[n].
struct BinLayout {
  int64_t sample;
  std::vector<int64_t> base, step;

  // (B, C, N) contiguous
  static BinLayout per_plane(int64_t C, int64_t N) {
    BinLayout l{C * N, {}, std::vector<int64_t>(static_cast<size_t>(N), N)};
    for (int64_t n = 0; n < N; ++n) l.base.push_back(n);
    return l;
  }
  // (B, C * sum of n^2): for each adaptive level n, its n x n bins flattened channel-major, the
  // levels concatenated (torch.cat([adaptive_avg_pool2d(x, n).flatten(1) for n in levels], 1):
  // SpatialPyramidAttention's pooled vector)
  static BinLayout level_major(int64_t C, const int64_t* levels, int64_t n_levels) {
    BinLayout l{0, {}, {}};
    for (int64_t i = 0; i < n_levels; ++i) {
      const int64_t size = levels[i] * levels[i];
      for (int64_t j = 0; j < size; ++j) l.base.push_back(l.sample + j), l.step.push_back(size);
      l.sample += C * size;
    }
    return l;
  }
};

// The mean of x[b, c] over bin n, stored in `out` (x's dtype) as `layout` places it; sums in fp32
// folded into double per cell (fp32 throughout on planes of narrow rows of at most kChunk
// elements; fp64 for fp64). Deterministic.
void bin_mean_forward_cpu(const void* x, void* out, DType dtype, int64_t B, int64_t C, Strides4 sx,
                          const BinGeometry& g, const BinLayout& layout);

// dx[b, c, h, w] = sum over the bins n holding (h, w) of dy[b, c, n] / area(n): dy the accumulation
// type (float; double for fp64), placed as `layout`, dx of `dtype` with its strides. One write of
// dx, nothing of x read.
void bin_mean_backward_cpu(const void* dy, void* dx, DType dtype, int64_t B, int64_t C, Strides4 sdx,
                           const BinGeometry& g, const BinLayout& layout);

// dx = dmap * gate[b, c] + bin_mean_backward(dy) in one write (SpatialPyramidAttention's input
// gradient: its gate's plus its bins'): dmap and dx of `dtype`, both with strides s, each H x W
// plane contiguous; gate a contiguous (B, C) buffer of the accumulation type, dy as in
// bin_mean_backward_cpu.
void bin_scale_backward_dx_cpu(const void* dmap, const void* gate, const void* dy, void* dx, DType dtype, int64_t B,
                               int64_t C, Strides4 s, const BinGeometry& g, const BinLayout& layout);

// Tile gates (TiledSqueezeExcite's gate and its backward) on NCHW-contiguous (B, C, H, W) maps cut
// into k x k tiles from the top-left corner (border tiles clipped: the tiles of bin_mean's "tiles"
// mode); g, a and dg are contiguous (B, C, nh, nw) buffers of the accumulation type (float; double
// for fp64), nh = ceil(H / k), nw = ceil(W / k). Each is one pass, a (sample, channel, tile row)
// per job; sums in fp32 (fp64 for fp64), over the tile's rows, then its columns times the reciprocal
// of its size. Deterministic.
// out[tile] = mean of x over the tile, a contiguous (B, C, nh, nw) buffer of x's dtype (the tiles
// of bin_mean_forward_cpu in "tiles" mode, for planes too small for its cells to pay off)
void tile_mean_cpu(const void* x, void* out, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, int64_t k);
// y = x * g[tile]
void tile_scale_forward_cpu(const void* x, const void* g, void* y, DType dtype, int64_t B, int64_t C, int64_t H,
                            int64_t W, int64_t k);
// dg[tile] = sum over the tile of dy * x
void tile_dot_cpu(const void* dy, const void* x, void* dg, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                  int64_t k);
// dx = dy * g[tile] + a[tile]
void tile_scale_backward_dx_cpu(const void* dy, const void* g, const void* a, void* dx, DType dtype, int64_t B,
                                int64_t C, int64_t H, int64_t W, int64_t k);

}  // namespace fastattn
