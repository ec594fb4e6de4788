"""Bin means: average pools over rectangular bins of the H x W plane, several grids in one read of x.

- `bin_mean` (`fastattn::bin_mean`): (B, C, H, W) -> (B, C, N), the means of x over the bins of
  every grid, grid after grid, each grid's bins row-major. mode "adaptive" gives the bins of
  `F.adaptive_avg_pool2d(x, n)` for each size n in levels (SpatialPyramidAttention's pyramid);
  mode "tiles" gives those of `F.avg_pool2d(x, k, k, ceil_mode=True)` (TiledSqueezeExcite).
  Backends "triton", "cuda" (CUDA C++), "cpu" (OpenMP C++) and "torch" (the PyTorch pools, concatenated).

Its backward is a separate custom op (`fastattn::bin_mean_backward`) so that torch.compile and
torch.export see the whole training step; the Triton kernels live in fastattn.kernels.bins and are
imported only when that backend runs.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference._checks import check_feature_map, is_channels_last
from . import _dispatch

__all__ = ["bin_mean", "bin_grid"]

BIN_MEAN = "bin_mean"
MODES = ("adaptive", "tiles")
CHECKS = {"triton": _dispatch.triton_reason,
          "cuda": _dispatch.cuda_kernel("bin_mean", "bin_mean_backward"),
          "cpu": _dispatch.cpu_kernel("bin_mean", "bin_mean_backward")}


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flat(t: Tensor) -> Tensor:
    from fastattn.kernels._layout import flattenable

    return flattenable(t)


def _format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


# ------------------------------------------------------------------------------------------------
# bin geometry (host side, cached)
# ------------------------------------------------------------------------------------------------


def _axis_bins(size: int, level: int, mode: str) -> tuple[tuple[int, int], ...]:
    """Half-open [start, end) of the bins along one axis of length size."""
    if mode == "adaptive":      # bin i: [floor(i * size / n), ceil((i + 1) * size / n)), may overlap
        return tuple((i * size // level, -(-(i + 1) * size // level)) for i in range(level))
    k = level                   # ceil-mode tiles of k, the last one clipped to the border
    return tuple((i * k, min((i + 1) * k, size)) for i in range(-(-size // k)))


@functools.lru_cache(maxsize=256)
def _bins(H: int, W: int, levels: tuple[int, ...], mode: str):
    """(rows, cols) per level: the [start, end) bins along H and along W of each grid."""
    return tuple((_axis_bins(H, n, mode), _axis_bins(W, n, mode)) for n in levels)


def bin_grid(H: int, W: int, levels: Sequence[int], mode: str) -> list[tuple[int, int]]:
    """The (nh, nw) grid of each level: out[:, :, o:o + nh * nw].reshape(B, C, nh, nw) is its pool,
    with o the sum of the earlier grids' nh * nw. adaptive: (n, n); tiles: (ceil(H / k), ceil(W / k))."""
    if mode == "adaptive":
        return [(n, n) for n in levels]
    # plain arithmetic (no cache lookup), so that the fake implementation works on symbolic sizes
    return [((H + k - 1) // k, (W + k - 1) // k) for k in levels]


@functools.lru_cache(maxsize=256)
def _table_rows(H: int, W: int, levels: tuple[int, ...], mode: str):
    """(h0, h1, w0, w1, area) lists over all N bins, level by level, each level row-major."""
    h0, h1, w0, w1, area = [], [], [], [], []
    for rows, cols in _bins(H, W, levels, mode):
        for r0, r1 in rows:
            for c0, c1 in cols:
                h0.append(r0), h1.append(r1), w0.append(c0), w1.append(c1)
                area.append((r1 - r0) * (c1 - c0))
    return h0, h1, w0, w1, area


_device_tables: dict = {}


def _table(H: int, W: int, levels: tuple[int, ...], mode: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """((4, N) int32 bounds, (N,) float64 areas) on device, cached per (H, W, levels, mode, device)."""
    key = (H, W, levels, mode, str(device))
    hit = _device_tables.get(key)
    if hit is None:
        h0, h1, w0, w1, area = _table_rows(H, W, levels, mode)
        hit = (torch.tensor([h0, h1, w0, w1], dtype=torch.int32).to(device),
               torch.tensor(area, dtype=torch.float64).to(device))
        if len(_device_tables) > 256:
            _device_tables.clear()
        _device_tables[key] = hit
    return hit


def _membership(size: int, bins, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(n_bins, size) 0/1 matrix: row i marks the positions of bin i along one axis."""
    pos = torch.arange(size, device=device)
    starts = torch.tensor([s for s, _ in bins], device=device)
    ends = torch.tensor([e for _, e in bins], device=device)
    return ((pos >= starts[:, None]) & (pos < ends[:, None])).to(dtype)


# ------------------------------------------------------------------------------------------------
# bin_mean
# ------------------------------------------------------------------------------------------------


def _pool_torch(x: Tensor, level: int, mode: str) -> Tensor:
    if mode == "adaptive":
        return F.adaptive_avg_pool2d(x, level)
    return F.avg_pool2d(x, level, level, ceil_mode=True)


@_dispatch.custom_op("fastattn::bin_mean", mutates_args=(),
                         schema="(Tensor x, int[] levels, str mode, str backend) -> Tensor")
def _bin_mean(x: Tensor, levels: list[int], mode: str, backend: str) -> Tensor:
    if backend in ("cpu", "cuda"):     # the bin geometry is built (and cached on CUDA) in C++
        return torch.ops.fastattn_C.bin_mean(x, list(levels), mode)
    B, C, H, W = x.shape
    levels = tuple(levels)
    acc = _acc(x.dtype)
    if backend == "triton":
        from fastattn.kernels.bins import bin_sum_forward

        table, area = _table(H, W, levels, mode, x.device)
        return (bin_sum_forward(_flat(x), table) / area.to(acc)).to(x.dtype)
    if x.numel() == 0:          # (the PyTorch pools refuse C == 0)
        return x.new_zeros(B, C, sum(nh * nw for nh, nw in bin_grid(H, W, levels, mode)))
    xa = x.to(acc)
    pools = [_pool_torch(xa, n, mode).flatten(2) for n in levels]
    return torch.cat(pools, 2).to(x.dtype)


@_bin_mean.register_fake
def _(x, levels, mode, backend):
    B, C, H, W = x.shape
    N = sum(nh * nw for nh, nw in bin_grid(H, W, levels, mode))
    return x.new_empty(B, C, N)


@torch.library.custom_op("fastattn::bin_mean_backward", mutates_args=(),
                         schema="(Tensor dy, int[] size, int[] levels, str mode, bool channels_last, str backend) "
                                "-> Tensor")
def _bin_mean_backward(dy: Tensor, size: list[int], levels: list[int], mode: str, channels_last: bool,
                       backend: str) -> Tensor:
    # dx (size, dy's dtype, channels_last or NCHW): dx[b, c, h, w] = sum over the bins n holding
    # (h, w) of dy[b, c, n] / area(n).
    if backend in ("cpu", "cuda"):
        return torch.ops.fastattn_C.bin_mean_backward(dy, list(size), list(levels), mode, channels_last)
    B, C, H, W = size
    levels = tuple(levels)
    acc = _acc(dy.dtype)
    dx = torch.empty(size, dtype=dy.dtype, device=dy.device, memory_format=_format(channels_last))
    table, area = _table(H, W, levels, mode, dy.device)
    g = (dy.to(acc) / area.to(acc)).contiguous()
    if backend == "triton":
        from fastattn.kernels.bins import bin_sum_backward

        return bin_sum_backward(dx, g, table)
    # the reference math: per grid, dx += A_h^T g A_w with the 0/1 bin membership matrices
    d = torch.zeros(B, C, H, W, dtype=acc, device=dy.device)
    offset = 0
    for rows, cols in _bins(H, W, levels, mode):
        n = len(rows) * len(cols)
        gl = g[:, :, offset:offset + n].reshape(B, C, len(rows), len(cols))
        d += torch.einsum("bcij,ih,jw->bchw", gl, _membership(H, rows, acc, dy.device),
                          _membership(W, cols, acc, dy.device))
        offset += n
    return dx.copy_(d)


@_bin_mean_backward.register_fake
def _(dy, size, levels, mode, channels_last, backend):
    return torch.empty(size, dtype=dy.dtype, device=dy.device, memory_format=_format(channels_last))


def _bin_mean_setup(ctx, inputs, output):
    x, levels, mode, backend = inputs
    # only shapes: the backward needs no value of x
    ctx.size, ctx.channels_last = list(x.shape), is_channels_last(x)
    ctx.levels, ctx.mode, ctx.backend = list(levels), mode, backend


def _bin_mean_bwd(ctx, dy):
    dx = torch.ops.fastattn.bin_mean_backward(dy, ctx.size, ctx.levels, ctx.mode, ctx.channels_last, ctx.backend)
    return dx, None, None, None


_bin_mean.register_autograd(_bin_mean_bwd, setup_context=_bin_mean_setup)


def _bin_mean_backward_setup(ctx, inputs, output):
    dy, size, levels, mode, channels_last, backend = inputs
    ctx.levels, ctx.mode, ctx.backend = list(levels), mode, backend


def _bin_mean_backward_bwd(ctx, ddx):
    # the backward is linear in dy and its adjoint is the forward: d(dy) = bin_mean(ddx)
    return _bin_mean(ddx, ctx.levels, ctx.mode, ctx.backend), None, None, None, None, None


_bin_mean_backward.register_autograd(_bin_mean_backward_bwd, setup_context=_bin_mean_backward_setup)


def _check_levels(levels, mode: str) -> tuple[int, ...]:
    what = ("a non-empty sequence of positive ints (output sizes), e.g. (1, 2, 4)" if mode == "adaptive"
            else "a sequence of one positive int (the tile size k), e.g. (4,)")
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise TypeError(f"{BIN_MEAN}: argument 'levels' must be {what}, got {levels!r}")
    ok = all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in levels)
    if not ok or not levels or (mode == "tiles" and len(levels) != 1):
        raise ValueError(f"{BIN_MEAN}: argument 'levels' must be {what} for mode={mode!r}, got {levels!r}")
    return tuple(int(n) for n in levels)


def bin_mean(x: Tensor, levels: Sequence[int], *, mode: str, backend: str | None = None) -> Tensor:
    """Means of x over the bins of several grids on the H x W plane, all in one read of x.

    x: (B, C, H, W) float, NCHW, channels_last or any strided view, H, W >= 1. Returns (B, C, N) in
    x's dtype (accumulated in fp32, fp64 for fp64 x), N = the total number of bins, grid after grid
    in the order of levels, each grid's bins row-major; `bin_grid(H, W, levels, mode)` gives the
    (nh, nw) of each grid, and out[:, :, o:o + nh * nw].reshape(B, C, nh, nw) equals:
      - mode="adaptive", levels (n1, n2, ...): F.adaptive_avg_pool2d(x, n) (bin i along H spans
        [floor(i * H / n), ceil((i + 1) * H / n)), overlapping when H % n != 0; the same along W);
      - mode="tiles", levels (k,): F.avg_pool2d(x, k, k, ceil_mode=True), (ceil(H / k), ceil(W / k))
        tiles, the border ones clipped and averaged over their clipped area.
    Differentiable in x: dx[b, c, h, w] = sum over the bins holding (h, w) of dy[b, c, bin] / area(bin).
    Autograd saves nothing of x (only its shape and layout).
    backend: None (the process default, see fastattn.set_backend), "auto", "triton", "cuda" (CUDA C++
    kernels), "cpu" (OpenMP C++ kernels), "torch".
    """
    check_feature_map(BIN_MEAN, x)
    if mode not in MODES:
        raise ValueError(f"{BIN_MEAN}: argument 'mode' must be one of {MODES}, got {mode!r}")
    levels = _check_levels(levels, mode)
    H, W = x.shape[2], x.shape[3]
    if H < 1 or W < 1:
        raise ValueError(f"{BIN_MEAN}: argument 'x' must have H >= 1 and W >= 1 (every bin non-empty), "
                         f"got H x W = {H} x {W}")
    return _dispatch.run(_bin_mean, x, list(levels), mode, _dispatch.resolve(BIN_MEAN, x, backend, CHECKS))
