"""Spatial attention kernels: per-pixel pooling over the channels, and the per-pixel gate.

- pool:  y[b, :, h, w] = [max_c v, mean_c v] with v = x[b, c, h, w] * a[b, c] (a optional), the
  argmax channel kept as int32 for backward; x * a is never written to memory.
- scale: y = x * a[b, c] * s[b, 0, h, w] (a optional).

Addressing: every (B, C, H, W) operand is read through its four strides. When the H x W plane of
every operand flattens (NCHW, channels_last, channel slices) pixel p sits at p * sw (FLAT, which
lets Triton vectorise); otherwise p = h * W + w is split back into (h, w) in the kernel, so the
permuted views of the Triplet attention Z-pool (pooling over H or W instead of C) also run
without a copy. Tiles are [BLOCK_C, BLOCK_P] (channels x pixels), wide along whichever of the
two axes is contiguous in memory.

Reductions are deterministic: programs write partial rows (one per pixel block, or per channel
split) that are summed in a fixed order on the host; there are no float atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import num_programs_hint

_TILE = 2048          # elements per [BLOCK_C, BLOCK_P] tile


def _acc_dtype(x: torch.Tensor) -> tuple[torch.dtype, tl.dtype]:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise (fp32/fp16/bf16)."""
    return (torch.float64, tl.float64) if x.dtype == torch.float64 else (torch.float32, tl.float32)


def _tiles(x: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P) for a (B, C, H, W) operand: wide along the contiguous axis, ~_TILE elements,
    no wider than the axis itself (7x7 maps do not waste 80% of a 256-wide block)."""
    _, C, H, W = x.shape
    _, sc, _, sw = x.stride()
    c_max, p_max = triton.next_power_of_2(max(C, 1)), triton.next_power_of_2(max(H * W, 1))
    if sc == 1 and sw != 1:                  # channels contiguous (channels_last, or a Z-pool over W)
        block_c = min(64, c_max)
        return block_c, min(_TILE // block_c, p_max)
    block_p = min(256, p_max)                # pixels contiguous (NCHW) or generic strides
    return min(_TILE // block_p, c_max), block_p


def _channel_splits(B: int, C: int, n_p: int, block_c: int, x: torch.Tensor) -> tuple[int, int]:
    """(splits, channels per split) for the kernels that reduce over C: split C only when
    (b, pixel block) alone would leave the device idle (small maps, e.g. 7x7 at batch 32)."""
    n_cb = triton.cdiv(C, block_c)
    splits = max(1, min(n_cb, num_programs_hint(x) // max(1, B * n_p)))
    c_per_split = triton.cdiv(n_cb, splits) * block_c
    return triton.cdiv(C, c_per_split), c_per_split


def _pixel_strides(*ts: torch.Tensor) -> tuple[bool, list[int]]:
    """(FLAT, [sh, sw of each operand]): FLAT when the H x W of every operand flattens into one
    strided axis (NCHW, channels_last, channel slices, broadcast gradients), so that the kernels
    address pixel p as p * sw, which lets Triton vectorise NCHW loads; for W == 1, sw is set to sh.
    Otherwise (the permuted views of the Z-pool, transposed planes) p is split into (h, w)."""
    flat = all(t.shape[2] == 1 or t.shape[3] == 1 or t.stride(2) == t.shape[3] * t.stride(3) for t in ts)
    out = []
    for t in ts:
        sh, sw = t.stride(2), t.stride(3)
        out += [sh, sh if (flat and t.shape[3] == 1) else sw]
    return flat, out


@triton.jit
def _pixel_offset(p, W, sh, sw, FLAT: tl.constexpr):
    """Offset of pixel p = h * W + w of a plane with strides (sh, sw); p * sw when the plane flattens."""
    if FLAT:
        off = p * sw
    else:
        off = (p // W) * sh + (p % W) * sw
    return off


# --------------------------------------------------------------------------------------
# pool: [max, mean] over the channels of x * a
# --------------------------------------------------------------------------------------


@triton.jit
def _spatial_pool_fwd(
    x_ptr,        # (B, C, H, W) input, strides sxb, sxc, sxh, sxw (any)
    a_ptr,        # (B, C) ACC channel scale, contiguous (read only when HAS_A)
    y_ptr,        # (B, 2, H, W) output [max, mean] in x's dtype, strides syb, sy2, syh, syw (written when FINAL)
    idx_ptr,      # (B, H * W) int32 argmax channel, contiguous (written when FINAL)
    pmax_ptr,     # (SPLITS, B, H * W) ACC partial max per channel split (written when not FINAL)
    psum_ptr,     # (SPLITS, B, H * W) ACC partial sum per channel split (written when not FINAL)
    pidx_ptr,     # (SPLITS, B, H * W) int32 partial argmax per channel split (written when not FINAL)
    B, C, HW, W,  # HW = H * W is passed (not H) so that its divisibility by 16 reaches the masks: vector loads
    sxb, sxc, sxh, sxw, syb, sy2, syh, syw,
    n_p_blocks, c_per_split,
    HAS_A: tl.constexpr, FINAL: tl.constexpr, FLAT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Each program owns (b, one split of the channels, a block of pixels) and loops over its
    channels BLOCK_C at a time, keeping a running max, argmax and sum per pixel.

    argmax is the FIRST channel reaching the max (ties go to the lowest index, as torch.argmax).
    A NaN makes the max NaN (its channel becomes the argmax), as torch.amax.
    """
    pid = tl.program_id(0).to(tl.int64)
    n_splits = tl.cdiv(C, c_per_split)
    b = pid // (n_splits * n_p_blocks)
    rest = pid % (n_splits * n_p_blocks)
    split = rest // n_p_blocks
    p = (rest % n_p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HW
    x_pix = x_ptr + b * sxb + _pixel_offset(p, W, sxh, sxw, FLAT)     # [BLOCK_P] pointers to channel 0
    c_start = split * c_per_split
    c_end = tl.minimum(c_start + c_per_split, C)
    run_max = tl.zeros([BLOCK_P], dtype=ACC) - float("inf")
    run_sum = tl.zeros([BLOCK_P], dtype=ACC)
    run_idx = tl.zeros([BLOCK_P], dtype=tl.int32) + c_start.to(tl.int32)
    n_nan = tl.zeros([BLOCK_P], dtype=tl.int32)
    for start in range(c_start, c_end, BLOCK_C):
        c = tl.multiple_of(start, BLOCK_C) + tl.arange(0, BLOCK_C).to(tl.int64)
        c_ok = c < c_end
        mask = c_ok[:, None] & p_ok[None, :]
        v = tl.load(x_pix[None, :] + c[:, None] * sxc, mask=mask, other=0.0).to(ACC)
        if HAS_A:
            a = tl.load(a_ptr + b * C + c, mask=c_ok, other=0.0)
            v = v * a[:, None]
        run_sum += tl.sum(v, axis=0)                        # masked lanes hold 0
        is_nan = v != v
        n_nan += tl.sum(is_nan.to(tl.int32), axis=0)
        key = tl.where(is_nan, float("inf"), v)              # a NaN wins the argmax
        key = tl.where(mask, key, -float("inf"))
        blk_max = tl.max(key, axis=0)
        blk_idx = tl.min(tl.where(key == blk_max[None, :], c[:, None].to(tl.int32), 2147483647), axis=0)
        better = blk_max > run_max                          # strict: earlier channels win ties
        run_max = tl.where(better, blk_max, run_max)
        run_idx = tl.where(better, blk_idx, run_idx)
    run_max = tl.where(n_nan > 0, float("nan"), run_max)
    if FINAL:
        y_pix = y_ptr + b * syb + _pixel_offset(p, W, syh, syw, FLAT)
        tl.store(y_pix, run_max.to(y_ptr.dtype.element_ty), mask=p_ok)
        tl.store(y_pix + sy2, (run_sum / C).to(y_ptr.dtype.element_ty), mask=p_ok)
        tl.store(idx_ptr + b * HW + p, run_idx, mask=p_ok)
    else:
        row = (split * B + b) * HW + p
        tl.store(pmax_ptr + row, run_max, mask=p_ok)
        tl.store(psum_ptr + row, run_sum, mask=p_ok)
        tl.store(pidx_ptr + row, run_idx, mask=p_ok)


@triton.jit
def _spatial_pool_bwd(
    dy_ptr,       # (B, 2, H, W) upstream gradient [d max, d mean], strides sdb, sd2, sdh, sdw (any, 0 included)
    x_ptr,        # (B, C, H, W) forward input, strides sxb, sxc, sxh, sxw (read only when HAS_A)
    a_ptr,        # (B, C) ACC channel scale, contiguous (read only when HAS_A)
    idx_ptr,      # (B, H * W) int32 argmax channel saved by the forward
    dx_ptr,       # (B, C, H, W) output dx, strides sob, soc, soh, sow
    part_ptr,     # (P_BLOCKS, B, C) ACC partial sums of da, one row per pixel block (written when HAS_A)
    B, C, HW, W,
    sdb, sd2, sdh, sdw, sxb, sxc, sxh, sxw, sob, soc, soh, sow,
    n_c_blocks, n_p_blocks,
    HAS_A: tl.constexpr, FLAT: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """With v = x * a, y_max = max_c v (argmax i[b, p]) and y_mean = mean_c v:

        g[b, c, p]  = dy_mean[b, p] / C + (c == i[b, p]) * dy_max[b, p]     (d loss / d v)
        dx[b, c, p] = g[b, c, p] * a[b, c]                                  (g when a is None)
        da[b, c]    = sum_p g[b, c, p] * x[b, c, p]

    The whole max gradient goes to the saved argmax channel (the first of tied channels).
    Each program owns (b, a block of channels, a block of pixels); its da partial goes to row
    (pixel block, b) of part_ptr and the rows are summed in a fixed order on the host.
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // (n_c_blocks * n_p_blocks)
    rest = pid % (n_c_blocks * n_p_blocks)
    pb = rest % n_p_blocks
    c = (rest // n_p_blocks) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    c_ok = c < C
    p_ok = p < HW
    mask = c_ok[:, None] & p_ok[None, :]
    dy_pix = dy_ptr + b * sdb + _pixel_offset(p, W, sdh, sdw, FLAT)
    d_max = tl.load(dy_pix, mask=p_ok, other=0.0).to(ACC)
    d_mean = tl.load(dy_pix + sd2, mask=p_ok, other=0.0).to(ACC) / C
    i = tl.load(idx_ptr + b * HW + p, mask=p_ok, other=-1)
    g = d_mean[None, :] + tl.where(c[:, None] == i[None, :], d_max[None, :], 0.0)
    if HAS_A:
        a = tl.load(a_ptr + b * C + c, mask=c_ok, other=0.0)
        x_pix = x_ptr + b * sxb + _pixel_offset(p, W, sxh, sxw, FLAT)
        x = tl.load(x_pix[None, :] + c[:, None] * sxc, mask=mask, other=0.0)
        tl.store(part_ptr + (pb * B + b) * C + c, tl.sum(g * x.to(ACC), axis=1), mask=c_ok)
        dx = g * a[:, None]
    else:
        dx = g
    dx_pix = dx_ptr + b * sob + _pixel_offset(p, W, soh, sow, FLAT)
    tl.store(dx_pix[None, :] + c[:, None] * soc, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def spatial_pool_forward(x: torch.Tensor, a: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """Write [max, mean] over dim 1 of x * a[:, :, None, None] into y; return the argmax channel.

    x: (B, C, H, W), any strides (a permuted view pools another axis); a: (B, C) or None;
    y: (B, 2, H, W) preallocated output in x's dtype, any strides.
    Returns idx: (B, H * W) int32 contiguous, the first channel reaching the max.
    """
    B, C, H, W = x.shape
    HW = H * W
    idx = torch.empty(B, HW, device=x.device, dtype=torch.int32)
    if y.numel() == 0:
        return idx
    acc, ACC = _acc_dtype(x)
    a = a.to(acc).contiguous() if a is not None else None
    BLOCK_C, BLOCK_P = _tiles(x)
    n_p = triton.cdiv(HW, BLOCK_P)
    splits, c_per_split = _channel_splits(B, C, n_p, BLOCK_C, x)
    final = splits == 1
    if final:
        pmax = psum = pidx = idx                          # unused
    else:
        pmax = torch.empty(splits, B, HW, device=x.device, dtype=acc)
        psum = torch.empty_like(pmax)
        pidx = torch.empty(splits, B, HW, device=x.device, dtype=torch.int32)
    flat, (sxh, sxw, syh, syw) = _pixel_strides(x, y)
    _spatial_pool_fwd[(B * splits * n_p,)](
        x, a if a is not None else x, y, idx, pmax, psum, pidx,
        B, C, HW, W, x.stride(0), x.stride(1), sxh, sxw, y.stride(0), y.stride(1), syh, syw, n_p, c_per_split,
        HAS_A=a is not None, FINAL=final, FLAT=flat, ACC=ACC, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P,
    )
    if not final:
        # Combine the channel splits in split order: the first split holding the max wins ties.
        best = pmax.argmax(0, keepdim=True)
        y[:, 0].copy_(pmax.gather(0, best).view(B, H, W))
        y[:, 1].copy_((psum.sum(0) / C).view(B, H, W))
        idx.copy_(pidx.gather(0, best).squeeze(0))
    return idx


def spatial_pool_backward(dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor | None, idx: torch.Tensor,
                          dx: torch.Tensor) -> torch.Tensor | None:
    """Write dx (preallocated, like x, any strides); return da: (B, C) in the accumulation dtype
    (float32, float64 for float64 x), or None when a is None.

    dy: (B, 2, H, W) any strides; x: (B, C, H, W); idx: (B, H * W) int32 from the forward.
    """
    B, C, H, W = x.shape
    HW = H * W
    acc, ACC = _acc_dtype(x)
    if x.numel() == 0:
        return None if a is None else torch.zeros(B, C, device=x.device, dtype=acc)
    a = a.to(acc).contiguous() if a is not None else None
    BLOCK_C, BLOCK_P = _tiles(x)
    n_c, n_p = triton.cdiv(C, BLOCK_C), triton.cdiv(HW, BLOCK_P)
    part = torch.empty(n_p, B, C, device=x.device, dtype=acc) if a is not None else idx  # idx: unused
    flat, (sdh, sdw, sxh, sxw, soh, sow) = _pixel_strides(dy, x, dx)
    _spatial_pool_bwd[(B * n_c * n_p,)](
        dy, x, a if a is not None else x, idx, dx, part,
        B, C, HW, W, dy.stride(0), dy.stride(1), sdh, sdw, x.stride(0), x.stride(1), sxh, sxw,
        dx.stride(0), dx.stride(1), soh, sow, n_c, n_p,
        HAS_A=a is not None, FLAT=flat, ACC=ACC, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P,
    )
    return part.sum(0) if a is not None else None


# --------------------------------------------------------------------------------------
# scale: x * a[b, c] * s[b, 0, h, w]
# --------------------------------------------------------------------------------------


@triton.jit
def _spatial_scale_fwd(
    x_ptr,        # (B, C, H, W) input, strides sxb, sxc, sxh, sxw (any)
    a_ptr,        # (B, C) ACC channel scale, contiguous (read only when HAS_A)
    s_ptr,        # (B, 1, H, W) spatial scale, strides ssb, ssh, ssw (any)
    y_ptr,        # (B, C, H, W) output, strides syb, syc, syh, syw
    C, HW, W,
    sxb, sxc, sxh, sxw, ssb, ssh, ssw, syb, syc, syh, syw,
    n_c_blocks, n_p_blocks,
    HAS_A: tl.constexpr, FLAT: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // (n_c_blocks * n_p_blocks)
    rest = pid % (n_c_blocks * n_p_blocks)
    c = (rest // n_p_blocks) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    p = (rest % n_p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    c_ok = c < C
    p_ok = p < HW
    mask = c_ok[:, None] & p_ok[None, :]
    s = tl.load(s_ptr + b * ssb + _pixel_offset(p, W, ssh, ssw, FLAT), mask=p_ok, other=0.0).to(ACC)
    x_pix = x_ptr + b * sxb + _pixel_offset(p, W, sxh, sxw, FLAT)
    x = tl.load(x_pix[None, :] + c[:, None] * sxc, mask=mask, other=0.0).to(ACC)
    if HAS_A:
        a = tl.load(a_ptr + b * C + c, mask=c_ok, other=0.0)
        x = x * a[:, None]
    y = x * s[None, :]
    y_pix = y_ptr + b * syb + _pixel_offset(p, W, syh, syw, FLAT)
    tl.store(y_pix[None, :] + c[:, None] * syc, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _spatial_scale_bwd(
    dy_ptr,       # (B, C, H, W) upstream gradient, strides sdb, sdc, sdh, sdw (any, 0 included)
    x_ptr,        # (B, C, H, W) forward input, strides sxb, sxc, sxh, sxw
    a_ptr,        # (B, C) ACC channel scale, contiguous (read only when HAS_A)
    s_ptr,        # (B, 1, H, W) spatial scale, strides ssb, ssh, ssw
    dx_ptr,       # (B, C, H, W) output dx, strides sob, soc, soh, sow
    da_part_ptr,  # (P_BLOCKS, B, C) ACC partial da, one row per pixel block (written when HAS_A)
    ds_part_ptr,  # (SPLITS, B, H * W) ACC partial ds, one row per channel split
    B, C, HW, W,
    sdb, sdc, sdh, sdw, sxb, sxc, sxh, sxw, ssb, ssh, ssw, sob, soc, soh, sow,
    n_p_blocks, c_per_split,
    HAS_A: tl.constexpr, FLAT: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """y = x * a[b, c] * s[b, p]  =>

        dx[b, c, p] = dy * a[b, c] * s[b, p]
        da[b, c]    = sum_p dy * x * s[b, p]        (reduction over pixels)
        ds[b, p]    = sum_c dy * x * a[b, c]        (reduction over channels)

    One pass over dy and x. Each program owns (b, one split of the channels, a block of pixels)
    and loops over its channels: ds accumulates in registers and is written once to row
    (split, b) of ds_part; each [BLOCK_C] chunk of da is complete for this pixel block and goes
    to row (pixel block, b) of da_part. Both partial tensors are summed in a fixed order on the
    host: deterministic, no atomics.
    """
    pid = tl.program_id(0).to(tl.int64)
    n_splits = tl.cdiv(C, c_per_split)
    b = pid // (n_splits * n_p_blocks)
    rest = pid % (n_splits * n_p_blocks)
    split = rest // n_p_blocks
    pb = rest % n_p_blocks
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HW
    s = tl.load(s_ptr + b * ssb + _pixel_offset(p, W, ssh, ssw, FLAT), mask=p_ok, other=0.0).to(ACC)
    dy_pix = dy_ptr + b * sdb + _pixel_offset(p, W, sdh, sdw, FLAT)
    x_pix = x_ptr + b * sxb + _pixel_offset(p, W, sxh, sxw, FLAT)
    dx_pix = dx_ptr + b * sob + _pixel_offset(p, W, soh, sow, FLAT)
    c_start = split * c_per_split
    c_end = tl.minimum(c_start + c_per_split, C)
    ds_acc = tl.zeros([BLOCK_P], dtype=ACC)
    for start in range(c_start, c_end, BLOCK_C):
        c = tl.multiple_of(start, BLOCK_C) + tl.arange(0, BLOCK_C).to(tl.int64)
        c_ok = c < c_end
        mask = c_ok[:, None] & p_ok[None, :]
        dy = tl.load(dy_pix[None, :] + c[:, None] * sdc, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_pix[None, :] + c[:, None] * sxc, mask=mask, other=0.0).to(ACC)
        t = dy * x
        if HAS_A:
            a = tl.load(a_ptr + b * C + c, mask=c_ok, other=0.0)
            ds_acc += tl.sum(t * a[:, None], axis=0)
            tl.store(da_part_ptr + (pb * B + b) * C + c, tl.sum(t * s[None, :], axis=1), mask=c_ok)
            dx = dy * a[:, None] * s[None, :]
        else:
            ds_acc += tl.sum(t, axis=0)
            dx = dy * s[None, :]
        tl.store(dx_pix[None, :] + c[:, None] * soc, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(ds_part_ptr + (split * B + b) * HW + p, ds_acc, mask=p_ok)


def spatial_scale_forward(x: torch.Tensor, a: torch.Tensor | None, s: torch.Tensor) -> torch.Tensor:
    """y = x * a[:, :, None, None] * s. x: (B, C, H, W) any strides; a: (B, C) or None;
    s: (B, 1, H, W) any strides. Returns y like x (torch.empty_like: channels_last stays so)."""
    B, C, H, W = x.shape
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    acc, ACC = _acc_dtype(x)
    a = a.to(acc).contiguous() if a is not None else None
    BLOCK_C, BLOCK_P = _tiles(x)
    n_c, n_p = triton.cdiv(C, BLOCK_C), triton.cdiv(H * W, BLOCK_P)
    flat, (sxh, sxw, ssh, ssw, syh, syw) = _pixel_strides(x, s, y)
    _spatial_scale_fwd[(B * n_c * n_p,)](
        x, a if a is not None else x, s, y, C, H * W, W,
        x.stride(0), x.stride(1), sxh, sxw, s.stride(0), ssh, ssw, y.stride(0), y.stride(1), syh, syw, n_c, n_p,
        HAS_A=a is not None, FLAT=flat, ACC=ACC, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P,
    )
    return y


def spatial_scale_backward(dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor | None, s: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(dx, da, ds): dx like x; da (B, C) or None when a is None; ds (B, 1, H, W) contiguous.
    da and ds are in the accumulation dtype (float32, float64 for float64 x)."""
    B, C, H, W = x.shape
    HW = H * W
    acc, ACC = _acc_dtype(x)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        da = torch.zeros(B, C, device=x.device, dtype=acc) if a is not None else None
        return dx, da, torch.zeros(B, 1, H, W, device=x.device, dtype=acc)
    a = a.to(acc).contiguous() if a is not None else None
    BLOCK_C, BLOCK_P = _tiles(x)
    n_p = triton.cdiv(HW, BLOCK_P)
    splits, c_per_split = _channel_splits(B, C, n_p, BLOCK_C, x)
    da_part = torch.empty(n_p, B, C, device=x.device, dtype=acc) if a is not None else None
    ds_part = torch.empty(splits, B, HW, device=x.device, dtype=acc)
    flat, (sdh, sdw, sxh, sxw, ssh, ssw, soh, sow) = _pixel_strides(dy, x, s, dx)
    _spatial_scale_bwd[(B * splits * n_p,)](
        dy, x, a if a is not None else x, s, dx, da_part if a is not None else ds_part, ds_part,
        B, C, HW, W, dy.stride(0), dy.stride(1), sdh, sdw, x.stride(0), x.stride(1), sxh, sxw,
        s.stride(0), ssh, ssw, dx.stride(0), dx.stride(1), soh, sow, n_p, c_per_split,
        HAS_A=a is not None, FLAT=flat, ACC=ACC, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P,
    )
    da = da_part.sum(0) if a is not None else None
    return dx, da, ds_part.sum(0).view(B, 1, H, W)
