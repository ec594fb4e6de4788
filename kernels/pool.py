"""Channel pooling: per (b, c) statistics over the H x W plane, and their backward.

- `channel_pool_forward`: mean, max (with its flat argmax) and unbiased standard deviation of
  every plane, any subset of them, in one read of x.
- `channel_pool_backward`: dx = dmean / HW + [p == argmax] * dmax + k * (x - mean), where the
  caller folds the std gradient into k = dstd / ((HW - 1) * std).
- `dct_pool_forward` / `dct_pool_backward`: y[b, c] = sum_p x[b, c, p] * w[c, p] (FcaNet's
  multi-spectral pool) with dx = dy * w and dw = sum_b dy * x.

Accumulation is in fp32 (fp64 for fp64 inputs). Reductions that a single program cannot finish
write per-program partial rows that are combined on the host in a fixed order (no atomics), so
every result is deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import flat_strides, num_programs_hint, plane_tile_sizes


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _tl_acc(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _hw_splits(t: torch.Tensor, HW: int, n_rows: int, BLOCK_HW: int) -> tuple[int, int]:
    """(splits, hw_per_split): split the plane when n_rows programs alone would leave the device idle.
    hw_per_split is a multiple of BLOCK_HW, so every tile but a split's last one is full."""
    splits = max(1, min(triton.cdiv(HW, BLOCK_HW), num_programs_hint(t) // max(1, n_rows)))
    hw_per_split = triton.cdiv(triton.cdiv(HW, splits), BLOCK_HW) * BLOCK_HW
    return triton.cdiv(HW, hw_per_split), hw_per_split


# ------------------------------------------------------------------------------------------------
# channel_pool: mean / max / std
# ------------------------------------------------------------------------------------------------


@triton.jit
def _channel_pool_fwd(
    x_ptr,        # (B, C, HW) input, strides sxb, sxc, sxhw
    sum_ptr,      # (SPLITS, B, C) ACC partial sums of x, one row per HW split
    m2_ptr,       # (SPLITS, B, C) ACC partial sums of squared deviations from the split's mean (HAS_STD)
    max_ptr,      # (SPLITS, B, C) ACC partial maxima (HAS_MAX)
    idx_ptr,      # (SPLITS, B, C) int64 flat index h * W + w of each partial maximum (HAS_MAX)
    B, C, HW,
    sxb, sxc, sxhw,
    n_c_blocks, hw_per_split,
    HAS_MAX: tl.constexpr, HAS_STD: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr,
):
    """Per program: (b, a block of channels, one split of HW), looping over the split's tiles.

    Sum: plain ACC accumulation. Squared deviations (Chan et al.'s pairwise update): each tile t of
    n_t positions gives its mean m_t and M2_t = sum (x - m_t)^2; merged into the running (n, S, M2)
    as M2 += M2_t + (m_t - S / n)^2 * n * n_t / (n + n_t). Deviations are taken from a tile mean,
    never from 0, so a plane of mean 100 and std 1 keeps its precision in fp32 (no E[x^2] - E[x]^2).
    Max: NaN wins (as in torch), then the larger value, then the lower index; argmax is the flat
    h * W + w index whatever the memory layout.
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
    s = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    mx = tl.full([BLOCK_C], float("-inf"), dtype=ACC)
    ix = tl.full([BLOCK_C], -1, dtype=tl.int64)
    for start in range(hw_start, hw_end, BLOCK_HW):
        hw64 = (start + tl.arange(0, BLOCK_HW)).to(tl.int64)
        mask = c_ok[:, None] & (hw64 < hw_end)[None, :]
        x = tl.load(x_ptr + b * sxb + c64[:, None] * sxc + hw64[None, :] * sxhw, mask=mask, other=0.0)
        x = x.to(ACC)
        ts = tl.sum(x, axis=1)
        if HAS_STD:
            n = (start - hw_start).to(ACC)                         # positions merged so far (full tiles)
            nt = tl.minimum(hw_end - start, BLOCK_HW).to(ACC)      # valid positions in this tile
            tm = ts / nt
            d = tl.where(mask, x - tm[:, None], 0.0)
            delta = tm - s / tl.maximum(n, 1.0)
            m2 += tl.sum(d * d, axis=1) + delta * delta * (n * nt / (n + nt))
        s += ts
        if HAS_MAX:
            isnan = x != x
            v = tl.where(mask, tl.where(isnan, float("inf"), x), float("-inf"))
            tmax = tl.max(v, axis=1)
            tnan = tl.max(tl.where(mask & isnan, 1, 0), axis=1) > 0
            cand = tl.where(tnan[:, None], mask & isnan, mask & (v == tmax[:, None]))
            tidx = tl.min(tl.where(cand, hw64[None, :], hw_end), axis=1)
            tmax = tl.where(tnan, float("nan"), tmax)
            upd = (ix < 0) | (tmax > mx) | ((tmax != tmax) & (mx == mx))
            mx = tl.where(upd, tmax, mx)
            ix = tl.where(upd, tidx, ix)
    out = (split * B + b) * C + c64
    tl.store(sum_ptr + out, s, mask=c_ok)
    if HAS_STD:
        tl.store(m2_ptr + out, m2, mask=c_ok)
    if HAS_MAX:
        tl.store(max_ptr + out, mx, mask=c_ok)
        tl.store(idx_ptr + out, ix, mask=c_ok)


@triton.jit
def _channel_pool_bwd(
    x_ptr,        # (B, C, HW) forward input (read when HAS_STD), strides sxb, sxc, sxhw
    a_ptr,        # (B, C) ACC dmean / HW (read when HAS_MEAN), contiguous
    dmax_ptr,     # (B, C) ACC gradient of the max (read when HAS_MAX), contiguous
    idx_ptr,      # (B, C) int64 flat argmax h * W + w (read when HAS_MAX), contiguous
    k_ptr,        # (B, C) ACC dstd / ((HW - 1) * std) (read when HAS_STD), contiguous
    mean_ptr,     # (B, C) ACC forward mean (read when HAS_STD), contiguous
    dx_ptr,       # (B, C, HW) output dx, strides sob, soc, sohw
    C, HW,
    sxb, sxc, sxhw, sob, soc, sohw,
    n_c_blocks, n_hw_blocks,
    HAS_MEAN: tl.constexpr, HAS_MAX: tl.constexpr, HAS_STD: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr,
):
    """dx[b, c, p] = dmean[b, c] / HW                                   (mean)
                   + (p == argmax[b, c]) * dmax[b, c]                    (max)
                   + dstd[b, c] * (x[b, c, p] - mean[b, c]) / ((HW - 1) * std[b, c])   (std)

    with std = sqrt(var_unbiased + eps), so d std / d x[p] = (x[p] - mean) / ((HW - 1) * std).
    Elementwise over (b, c, p): one write of dx, one read of x only when std is pooled.
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // (n_c_blocks * n_hw_blocks)
    rest = pid % (n_c_blocks * n_hw_blocks)
    c = (rest // n_hw_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = (rest % n_hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_ok = c < C
    mask = c_ok[:, None] & (hw < HW)[None, :]
    c64, hw64 = c.to(tl.int64), hw.to(tl.int64)
    bc = b * C + c64
    dx = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    if HAS_MEAN:
        a = tl.load(a_ptr + bc, mask=c_ok, other=0.0)
        dx += a[:, None]
    if HAS_MAX:
        g = tl.load(dmax_ptr + bc, mask=c_ok, other=0.0)
        idx = tl.load(idx_ptr + bc, mask=c_ok, other=-1)
        dx += tl.where(hw64[None, :] == idx[:, None], g[:, None], 0.0)
    if HAS_STD:
        k = tl.load(k_ptr + bc, mask=c_ok, other=0.0)
        mean = tl.load(mean_ptr + bc, mask=c_ok, other=0.0)
        x = tl.load(x_ptr + b * sxb + c64[:, None] * sxc + hw64[None, :] * sxhw, mask=mask, other=0.0)
        dx += k[:, None] * (x.to(ACC) - mean[:, None])
    tl.store(dx_ptr + b * sob + c64[:, None] * soc + hw64[None, :] * sohw, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def channel_pool_forward(x: torch.Tensor, with_max: bool, with_std: bool, eps: float):
    """One read of x (B, C, H, W) (flattenable H x W) -> (mean, max, argmax, std), each (B, C):
    mean and std in the accumulation dtype (fp32, fp64 for fp64 x), max in that dtype too (exact),
    argmax int64 flat h * W + w. max/argmax are None unless with_max, std None unless with_std.
    std = sqrt(unbiased variance + eps)."""
    B, C, H, W = x.shape
    HW = H * W
    acc = _acc_dtype(x)
    BLOCK_C, BLOCK_HW = plane_tile_sizes(x)
    n_c = triton.cdiv(C, BLOCK_C)
    splits, hw_per_split = _hw_splits(x, HW, B * n_c, BLOCK_HW) if HW > 0 else (1, BLOCK_HW)
    part_sum = torch.zeros(splits, B, C, device=x.device, dtype=acc)
    part_m2 = torch.zeros_like(part_sum) if with_std else part_sum
    part_max = torch.full_like(part_sum, float("-inf")) if with_max else part_sum
    part_idx = torch.zeros(splits, B, C, device=x.device, dtype=torch.int64) if with_max else part_sum
    if x.numel() > 0:
        _channel_pool_fwd[(B * n_c * splits,)](
            x, part_sum, part_m2, part_max, part_idx, B, C, HW, *flat_strides(x), n_c, hw_per_split,
            HAS_MAX=with_max, HAS_STD=with_std, BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW, ACC=_tl_acc(x),
        )
    mean = part_sum.sum(0) / HW
    std = vmax = argmax = None
    if with_std:
        if splits == 1:
            m2 = part_m2[0]
        else:
            # merge the splits around the global mean (exact decomposition of the sum of squares)
            n = torch.full((splits, 1, 1), float(hw_per_split), device=x.device, dtype=acc)
            n[-1] = HW - (splits - 1) * hw_per_split
            m2 = (part_m2 + n * (part_sum / n - mean) ** 2).sum(0)
        std = torch.sqrt(m2 / (HW - 1) + eps)
    if with_max:
        if splits == 1:
            vmax, argmax = part_max[0], part_idx[0]
        else:
            # torch.max over dim 0: NaN first, then the largest, ties to the lowest split
            vmax, which = part_max.max(0)
            argmax = part_idx.gather(0, which[None]).squeeze(0)
    return mean, vmax, argmax, std


def channel_pool_backward(dx: torch.Tensor, a: torch.Tensor | None, dmax: torch.Tensor | None,
                          argmax: torch.Tensor | None, k: torch.Tensor | None, mean: torch.Tensor | None,
                          x: torch.Tensor | None) -> torch.Tensor:
    """Fill dx (B, C, H, W), flattenable, with dx = a + [p == argmax] * dmax + k * (x - mean).
    a, dmax, k, mean: (B, C) contiguous in the accumulation dtype; argmax (B, C) int64; each group
    (a), (dmax, argmax), (k, mean, x) is None when its statistic has no gradient. Returns dx."""
    B, C, H, W = dx.shape
    if dx.numel() == 0:
        return dx
    BLOCK_C, BLOCK_HW = plane_tile_sizes(dx)
    n_c, n_hw = triton.cdiv(C, BLOCK_C), triton.cdiv(H * W, BLOCK_HW)
    has_mean, has_max, has_std = a is not None, dmax is not None, k is not None
    dummy = next(t for t in (a, dmax, k) if t is not None)
    xs = x if has_std else dx
    _channel_pool_bwd[(B * n_c * n_hw,)](
        xs, a if has_mean else dummy, dmax if has_max else dummy, argmax if has_max else dummy,
        k if has_std else dummy, mean if has_std else dummy, dx,
        C, H * W, *flat_strides(xs), *flat_strides(dx), n_c, n_hw,
        HAS_MEAN=has_mean, HAS_MAX=has_max, HAS_STD=has_std, BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW,
        ACC=tl.float64 if dummy.dtype == torch.float64 else tl.float32,
    )
    return dx


# ------------------------------------------------------------------------------------------------
# dct_pool: y[b, c] = sum_p x[b, c, p] * w[c, p]
# ------------------------------------------------------------------------------------------------


@triton.jit
def _dct_pool_fwd(
    x_ptr,        # (B, C, HW) input, strides sxb, sxc, sxhw
    w_ptr,        # (C, HW) weight, strides swc, swhw
    part_ptr,     # (SPLITS, B, C) ACC partial sums of x * w, one row per HW split
    B, C, HW,
    sxb, sxc, sxhw, swc, swhw,
    n_c_blocks, hw_per_split,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_splits = tl.cdiv(HW, hw_per_split)
    b = pid // (n_c_blocks * n_splits)
    rest = pid % (n_c_blocks * n_splits)
    c = (rest // n_splits) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = rest % n_splits
    c_ok = c < C
    c64 = c.to(tl.int64)
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    hw_start = split * hw_per_split
    hw_end = tl.minimum(hw_start + hw_per_split, HW)
    for start in range(hw_start, hw_end, BLOCK_HW):
        hw64 = (start + tl.arange(0, BLOCK_HW)).to(tl.int64)
        mask = c_ok[:, None] & (hw64 < hw_end)[None, :]
        x = tl.load(x_ptr + b * sxb + c64[:, None] * sxc + hw64[None, :] * sxhw, mask=mask, other=0.0)
        w = tl.load(w_ptr + c64[:, None] * swc + hw64[None, :] * swhw, mask=mask, other=0.0)
        acc += x.to(ACC) * w.to(ACC)
    tl.store(part_ptr + (split * B + b) * C + c64, tl.sum(acc, axis=1), mask=c_ok)


@triton.jit
def _dct_pool_bwd(
    dy_ptr,       # (B, C) ACC upstream gradient, contiguous
    w_ptr,        # (C, HW) weight (read when NEED_DX), strides swc, swhw
    x_ptr,        # (B, C, HW) forward input (read when NEED_DW), strides sxb, sxc, sxhw
    dx_ptr,       # (B, C, HW) output dx (written when NEED_DX), strides sob, soc, sohw
    part_ptr,     # (SPLITS, C, HW) ACC partial dw, one slab per batch split (NEED_DW), strides spn, spc, sphw
    B, C, HW,
    swc, swhw, sxb, sxc, sxhw, sob, soc, sohw, spn, spc, sphw,
    n_c_blocks, n_hw_blocks, b_per_split,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr,
):
    """dx[b, c, p] = dy[b, c] * w[c, p];   dw[c, p] = sum_b dy[b, c] * x[b, c, p].

    Each program owns (one split of the batch, a block of channels, a block of positions): it
    loads its weight tile once and walks its samples, writing dx and accumulating dw. The dw
    partial of each batch split goes to its own slab of part_ptr; the slabs are added in a fixed
    order on the host, so dw is deterministic (no atomics).
    """
    pid = tl.program_id(0).to(tl.int64)
    split = pid // (n_c_blocks * n_hw_blocks)
    rest = pid % (n_c_blocks * n_hw_blocks)
    c = (rest // n_hw_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = (rest % n_hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_ok = c < C
    mask = c_ok[:, None] & (hw < HW)[None, :]
    c64, hw64 = c.to(tl.int64), hw.to(tl.int64)
    if NEED_DX:
        w = tl.load(w_ptr + c64[:, None] * swc + hw64[None, :] * swhw, mask=mask, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    b_start = split * b_per_split
    b_end = tl.minimum(b_start + b_per_split, B)
    for b in range(b_start, b_end):
        dy = tl.load(dy_ptr + b * C + c64, mask=c_ok, other=0.0)
        if NEED_DX:
            dx = dy[:, None] * w
            tl.store(dx_ptr + b * sob + c64[:, None] * soc + hw64[None, :] * sohw, dx.to(dx_ptr.dtype.element_ty),
                     mask=mask)
        if NEED_DW:
            x = tl.load(x_ptr + b * sxb + c64[:, None] * sxc + hw64[None, :] * sxhw, mask=mask, other=0.0)
            acc += dy[:, None] * x.to(ACC)
    if NEED_DW:
        tl.store(part_ptr + split * spn + c64[:, None] * spc + hw64[None, :] * sphw, acc, mask=mask)


def _flat_weight(w: torch.Tensor) -> tuple[int, int]:
    """(swc, swhw) of a (C, H, W) weight whose H x W flattens."""
    _, swc, swhw = flat_strides(w.unsqueeze(0))
    return swc, swhw


def dct_pool_forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y (B, C) in the accumulation dtype = sum over H x W of x * w. x: (B, C, H, W), w: (C, H, W),
    both with flattenable H x W."""
    B, C, H, W = x.shape
    HW = H * W
    BLOCK_C, BLOCK_HW = plane_tile_sizes(x)
    n_c = triton.cdiv(C, BLOCK_C)
    if x.numel() == 0:
        return torch.zeros(B, C, device=x.device, dtype=_acc_dtype(x))
    splits, hw_per_split = _hw_splits(x, HW, B * n_c, BLOCK_HW)
    part = torch.empty(splits, B, C, device=x.device, dtype=_acc_dtype(x))
    _dct_pool_fwd[(B * n_c * splits,)](
        x, w, part, B, C, HW, *flat_strides(x), *_flat_weight(w), n_c, hw_per_split,
        BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW, ACC=_tl_acc(x),
    )
    return part.sum(0)


def dct_pool_backward(dy: torch.Tensor, w: torch.Tensor, x: torch.Tensor | None,
                      dx: torch.Tensor | None) -> torch.Tensor | None:
    """Fill dx (B, C, H, W) with dy[b, c] * w[c] when dx is given; return dw = sum_b dy * x (C, H, W)
    in the accumulation dtype when x is given (else None). dy: (B, C) contiguous in the accumulation
    dtype; w: (C, H, W); x, dx: (B, C, H, W); all with flattenable H x W."""
    like = dx if dx is not None else x
    B, C, H, W = like.shape
    HW = H * W
    need_dx, need_dw = dx is not None, x is not None
    acc = dy.dtype
    if need_dw and (B == 0 or x.numel() == 0):
        dw = torch.zeros(C, H, W, device=dy.device, dtype=acc)
        need_dw = False
    if like.numel() == 0 or not (need_dx or need_dw):
        return dw if x is not None else None
    BLOCK_C, BLOCK_HW = plane_tile_sizes(like)
    n_c, n_hw = triton.cdiv(C, BLOCK_C), triton.cdiv(HW, BLOCK_HW)
    # split the batch when the (c, hw) tiles alone would leave the device idle
    splits = max(1, min(B, num_programs_hint(like) // (n_c * n_hw)))
    b_per_split = triton.cdiv(B, splits)
    splits = triton.cdiv(B, b_per_split)
    part = None
    if need_dw:
        # the partial slabs take x's layout, so channels_last tiles write contiguous rows
        fmt = torch.channels_last if x.stride(1) == 1 and x.stride(3) != 1 else torch.contiguous_format
        part = torch.empty(splits, C, H, W, device=dy.device, dtype=acc, memory_format=fmt)
    xs = x if need_dw else like
    ds = dx if need_dx else like
    ps = part if need_dw else like
    _dct_pool_bwd[(splits * n_c * n_hw,)](
        dy, w, xs, ds, ps, B, C, HW, *_flat_weight(w), *flat_strides(xs), *flat_strides(ds), *flat_strides(ps),
        n_c, n_hw, b_per_split,
        NEED_DX=need_dx, NEED_DW=need_dw, BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
    )
    if x is None:
        return None
    return part.sum(0) if need_dw else dw
