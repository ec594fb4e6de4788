"""Bin means: averages of x over N rectangular bins of the H x W plane, and their backward.

A bin n covers rows [h0[n], h1[n]) and columns [w0[n], w1[n]); the caller builds the int32 table
(4, N) of those bounds (adaptive-pool bins of several grids, or the tiles of a ceil-mode average
pool) and divides the sums by the bin areas. One read of x gives every bin of every grid:

- `bin_sum_forward`: s[b, c, n] = sum over the bin n of x[b, c], accumulated in fp32 (fp64 for fp64
  x). Each program walks (b, a block of channels, one split of HW) tile by tile; every tile is
  compared against all N bins at once (a [BLOCK_C, N_POW2, BLOCK_HW] masked sum), so the work is
  O(HW * N) per channel and x is read once. Splits write partial rows, added on the host in a
  fixed order: deterministic, no atomics.
- `bin_sum_backward`: dx[b, c, h, w] = sum over the bins n holding (h, w) of g[b, c, n], where the
  caller passes g = dy / area. Elementwise over x, one write of dx, nothing of x read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import flat_strides, num_programs_hint, plane_tile_sizes

# Elements of the [BLOCK_C, N_POW2, BLOCK_HW] masked product a program holds at once.
_PRODUCT_BUDGET = 8192


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _bin_tiles(t: torch.Tensor, n_pow2: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW): plane_tile_sizes(t), shrunk so that BLOCK_C * BLOCK_HW * n_pow2 stays within
    the budget; the contiguous axis (C in channels_last, HW in NCHW) keeps its width longest."""
    BLOCK_C, BLOCK_HW = plane_tile_sizes(t)
    elems = max(16, _PRODUCT_BUDGET // n_pow2)
    _, sc, shw = flat_strides(t)
    if sc == 1 and shw != 1:                        # channels_last: rows of channels are contiguous
        BLOCK_C = min(BLOCK_C, elems)
        BLOCK_HW = max(1, min(BLOCK_HW, elems // BLOCK_C))
    else:
        BLOCK_HW = min(BLOCK_HW, elems)
        BLOCK_C = max(1, min(BLOCK_C, elems // BLOCK_HW))
    return BLOCK_C, BLOCK_HW


@triton.jit
def _inside(hw64, W, tab_ptr, N, N_POW2: tl.constexpr):
    """[N_POW2, BLOCK_HW] mask: flat position hw = h * W + w lies in bin n (bins n >= N are empty)."""
    n = tl.arange(0, N_POW2)
    n_ok = n < N
    h0 = tl.load(tab_ptr + n, mask=n_ok, other=0)
    h1 = tl.load(tab_ptr + N + n, mask=n_ok, other=0)
    w0 = tl.load(tab_ptr + 2 * N + n, mask=n_ok, other=0)
    w1 = tl.load(tab_ptr + 3 * N + n, mask=n_ok, other=0)
    h = (hw64 // W).to(tl.int32)
    w = (hw64 % W).to(tl.int32)
    in_h = (h[None, :] >= h0[:, None]) & (h[None, :] < h1[:, None])
    in_w = (w[None, :] >= w0[:, None]) & (w[None, :] < w1[:, None])
    return in_h & in_w


@triton.jit
def _bin_sum_fwd(
    x_ptr,        # (B, C, HW) input, strides sxb, sxc, sxhw
    tab_ptr,      # (4, N) int32 bin bounds h0, h1, w0, w1 (half-open), contiguous
    part_ptr,     # (SPLITS, B, C, N) ACC partial bin sums, one (B, C, N) slab per HW split, contiguous
    B, C, HW, W, N,
    sxb, sxc, sxhw,
    n_c_blocks, hw_per_split,
    N_POW2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr,
):
    """part[split, b, c, n] = sum over the positions p of the split that lie in bin n of x[b, c, p].

    Per program: (b, a block of channels, one split of HW), looping over the split's tiles; each tile
    adds its masked sums to every bin of a [BLOCK_C, N_POW2] accumulator (one read of x for all bins).
    """
    pid = tl.program_id(0).to(tl.int64)
    n_splits = tl.cdiv(HW, hw_per_split)
    b = pid // (n_c_blocks * n_splits)
    rest = pid % (n_c_blocks * n_splits)
    c = (rest // n_splits) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = rest % n_splits
    c_ok = c < C
    c64 = c.to(tl.int64)
    hw_start = split * hw_per_split
    hw_end = tl.minimum(hw_start + hw_per_split, HW)
    acc = tl.zeros([BLOCK_C, N_POW2], dtype=ACC)
    for start in range(hw_start, hw_end, BLOCK_HW):
        hw64 = (start + tl.arange(0, BLOCK_HW)).to(tl.int64)
        hw_ok = hw64 < hw_end
        mask = c_ok[:, None] & hw_ok[None, :]
        x = tl.load(x_ptr + b * sxb + c64[:, None] * sxc + hw64[None, :] * sxhw, mask=mask, other=0.0).to(ACC)
        inside = _inside(hw64, W, tab_ptr, N, N_POW2) & hw_ok[None, :]
        acc += tl.sum(tl.where(inside[None, :, :], x[:, None, :], 0.0), axis=2)
    n = tl.arange(0, N_POW2).to(tl.int64)
    rows = (split * B + b) * C + c64
    tl.store(part_ptr + rows[:, None] * N + n[None, :], acc, mask=c_ok[:, None] & (n < N)[None, :])


@triton.jit
def _bin_sum_bwd(
    g_ptr,        # (B, C, N) ACC gradient of each bin's sum (dy / area), contiguous
    tab_ptr,      # (4, N) int32 bin bounds h0, h1, w0, w1 (half-open), contiguous
    dx_ptr,       # (B, C, HW) output dx, strides sob, soc, sohw
    C, HW, W, N,
    sob, soc, sohw,
    n_c_blocks, n_hw_blocks,
    N_POW2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr,
):
    """dx[b, c, p] = sum over the bins n with p in bin n of g[b, c, n], where g = dy / area(n) for
    the mean of bin n: the derivative of a bin mean is 1 / area on each of its positions, and the
    bins of a grid may overlap (adaptive pooling with H % n != 0), and grids stack, so a position
    gathers from every bin holding it. Elementwise over (b, c, p): one [BLOCK_C, BLOCK_HW] tile
    of dx per program, no read of x."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // (n_c_blocks * n_hw_blocks)
    rest = pid % (n_c_blocks * n_hw_blocks)
    c = (rest // n_hw_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw64 = ((rest % n_hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)).to(tl.int64)
    c_ok = c < C
    hw_ok = hw64 < HW
    c64 = c.to(tl.int64)
    n = tl.arange(0, N_POW2).to(tl.int64)
    g = tl.load(g_ptr + (b * C + c64)[:, None] * N + n[None, :], mask=c_ok[:, None] & (n < N)[None, :], other=0.0)
    inside = _inside(hw64, W, tab_ptr, N, N_POW2)
    dx = tl.sum(tl.where(inside[None, :, :], g.to(ACC)[:, :, None], 0.0), axis=1)
    tl.store(dx_ptr + b * sob + c64[:, None] * soc + hw64[None, :] * sohw, dx.to(dx_ptr.dtype.element_ty),
             mask=c_ok[:, None] & hw_ok[None, :])


def _n_pow2(N: int) -> int:
    return max(1, triton.next_power_of_2(N))


def bin_sum_forward(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """s (B, C, N) in the accumulation dtype (fp32; fp64 for fp64 x): the sum of x over each bin.
    x: (B, C, H, W) with flattenable H x W; table: (4, N) int32 contiguous bounds on x's device."""
    B, C, H, W = x.shape
    HW, N = H * W, table.shape[1]
    acc = _acc_dtype(x)
    if x.numel() == 0 or N == 0:
        return torch.zeros(B, C, N, device=x.device, dtype=acc)
    n_pow2 = _n_pow2(N)
    BLOCK_C, BLOCK_HW = _bin_tiles(x, n_pow2)
    n_c = triton.cdiv(C, BLOCK_C)
    # split the plane when the (b, c-block) programs alone would leave the device idle; every split
    # but the last covers a multiple of BLOCK_HW positions
    splits = max(1, min(triton.cdiv(HW, BLOCK_HW), num_programs_hint(x) // max(1, B * n_c)))
    hw_per_split = triton.cdiv(triton.cdiv(HW, splits), BLOCK_HW) * BLOCK_HW
    splits = triton.cdiv(HW, hw_per_split)
    part = torch.empty(splits, B, C, N, device=x.device, dtype=acc)
    _bin_sum_fwd[(B * n_c * splits,)](
        x, table, part, B, C, HW, W, N, *flat_strides(x), n_c, hw_per_split,
        N_POW2=n_pow2, BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW, ACC=_tl_acc(acc),
    )
    return part[0] if splits == 1 else part.sum(0)


def bin_sum_backward(dx: torch.Tensor, g: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Fill dx (B, C, H, W), flattenable, with the sum over the bins holding each position of
    g (B, C, N) (contiguous, accumulation dtype: dy / area). table: (4, N) int32. Returns dx."""
    B, C, H, W = dx.shape
    HW, N = H * W, table.shape[1]
    if dx.numel() == 0:
        return dx
    n_pow2 = _n_pow2(N)
    BLOCK_C, BLOCK_HW = _bin_tiles(dx, n_pow2)
    n_c, n_hw = triton.cdiv(C, BLOCK_C), triton.cdiv(HW, BLOCK_HW)
    _bin_sum_bwd[(B * n_c * n_hw,)](
        g, table, dx, C, HW, W, N, *flat_strides(dx), n_c, n_hw,
        N_POW2=n_pow2, BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW, ACC=_tl_acc(g.dtype),
    )
    return dx
