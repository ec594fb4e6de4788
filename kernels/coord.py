"""Coordinate attention: the two directional pools and the two-axis scale, forward and backward.

    coord_pool:   x_h[b, c, h] = mean_w x[b, c, h, w],   x_w[b, c, w] = mean_h x[b, c, h, w]
    coord_scale:  y[b, c, h, w] = x[b, c, h, w] * a_w[b, c, w] * a_h[b, c, h]

The 1x1 convolutions, batch norm and activations between them run in PyTorch on the small
(B, C, H + W) tensors; these kernels do the passes over the (B, C, H, W) map.

Two kinds of kernel:
- plane walkers (pool forward, scale backward): reduce along both H and W, so they index x with
  its four strides (any layout, no copy) and tile [BLOCK_C, BLOCK_H, BLOCK_W]; each program owns
  (b, a block of channels, a block of W, a split of H) and walks its rows. The sums along H are
  complete inside a program unless H is split, the sums along W unless W is: split sums go to
  their own rows of a float32 buffer that the host adds in a fixed order (no atomics).
- element-wise kernels (pool backward, scale forward): address the map as (B, C, HW) through
  `_layout` and recover h = p // W, w = p % W per column (32-bit: one plane has < 2**31 elements).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import flat_strides, num_programs_hint, plane_tile_sizes

_MAX_PLANE = 2**31 - 2**16       # positions per plane addressable with 32-bit h, w arithmetic


def _acc_type(dtype: torch.dtype):
    """Accumulation type: float64 for float64 inputs, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_plane(H: int, W: int) -> None:
    if H * W >= _MAX_PLANE:
        raise ValueError(f"coord kernels: argument 'x' must have H*W < {_MAX_PLANE}, got H={H}, W={W}")


@triton.jit
def _coord_pool_fwd(
    x_ptr,        # (B, C, H, W) input, strides sxb, sxc, sxh, sxw (any layout)
    xh_ptr,       # (W_BLOCKS, B, C, H) contiguous: mean over W (x's dtype when W_BLOCKS == 1, else float32/64 partials)
    xw_ptr,       # (H_SPLITS, B, C, W) contiguous: mean over H (x's dtype when H_SPLITS == 1, else partials)
    B, C, H, W,
    sxb, sxc, sxh, sxw,
    n_c_blocks, n_w_blocks, n_h_splits, h_per_split,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    per_b = n_c_blocks * n_h_splits * n_w_blocks
    b = pid // per_b
    rest = pid % per_b
    c = (rest // (n_h_splits * n_w_blocks)) * BLOCK_C + tl.arange(0, BLOCK_C)
    rest = rest % (n_h_splits * n_w_blocks)
    hs = rest // n_w_blocks
    wb = rest % n_w_blocks
    w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    c_ok, w_ok = c < C, w < W
    c64, w64 = c.to(tl.int64), w.to(tl.int64)
    x_base = x_ptr + b * sxb + c64[:, None, None] * sxc + w64[None, None, :] * sxw
    acc_w = tl.zeros([BLOCK_C, BLOCK_W], dtype=ACC)
    h_start = hs * h_per_split
    h_end = tl.minimum(h_start + h_per_split, H)
    for start in range(h_start, h_end, BLOCK_H):
        h64 = (start + tl.arange(0, BLOCK_H)).to(tl.int64)
        h_ok = h64 < h_end
        mask = c_ok[:, None, None] & h_ok[None, :, None] & w_ok[None, None, :]
        x = tl.load(x_base + h64[None, :, None] * sxh, mask=mask, other=0.0).to(ACC)
        acc_w += tl.sum(x, axis=1)
        row = tl.sum(x, axis=2) / W                        # [BLOCK_C, BLOCK_H]: this W block's share of x_h
        tl.store(xh_ptr + ((wb * B + b) * C + c64[:, None]) * H + h64[None, :],
                 row.to(xh_ptr.dtype.element_ty), mask=c_ok[:, None] & h_ok[None, :])
    tl.store(xw_ptr + ((hs * B + b) * C + c64[:, None]) * W + w64[None, :],
             (acc_w / H).to(xw_ptr.dtype.element_ty), mask=c_ok[:, None] & w_ok[None, :])


@triton.jit
def _coord_pool_bwd(
    gh_ptr,       # (B, C, H) contiguous: gradient of x_h
    gw_ptr,       # (B, C, W) contiguous: gradient of x_w
    dx_ptr,       # (B, C, HW) output dx, strides sdb, sdc, sdhw
    C, H, W,
    sdb, sdc, sdhw,
    n_c_blocks, n_hw_blocks,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """dx[b, c, h, w] = gh[b, c, h] / W + gw[b, c, w] / H  (the adjoint of the two means)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // (n_c_blocks * n_hw_blocks)
    rest = pid % (n_c_blocks * n_hw_blocks)
    c = (rest // n_hw_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = (rest % n_hw_blocks).to(tl.int32) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_ok = c < C
    mask = c_ok[:, None] & (hw < H * W)[None, :]
    c64 = c.to(tl.int64)
    h64, w64, hw64 = (hw // W).to(tl.int64), (hw % W).to(tl.int64), hw.to(tl.int64)
    row = (b * C + c64[:, None])
    gh = tl.load(gh_ptr + row * H + h64[None, :], mask=mask, other=0.0).to(ACC)
    gw = tl.load(gw_ptr + row * W + w64[None, :], mask=mask, other=0.0).to(ACC)
    dx = gh / W + gw / H
    tl.store(dx_ptr + b * sdb + c64[:, None] * sdc + hw64[None, :] * sdhw, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _coord_scale_fwd(
    x_ptr,        # (B, C, HW) input, strides sxb, sxc, sxhw
    ah_ptr,       # (B, C, H) contiguous: gate along H
    aw_ptr,       # (B, C, W) contiguous: gate along W
    y_ptr,        # (B, C, HW) output, strides syb, syc, syhw
    C, H, W,
    sxb, sxc, sxhw, syb, syc, syhw,
    n_c_blocks, n_hw_blocks,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // (n_c_blocks * n_hw_blocks)
    rest = pid % (n_c_blocks * n_hw_blocks)
    c = (rest // n_hw_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = (rest % n_hw_blocks).to(tl.int32) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_ok = c < C
    mask = c_ok[:, None] & (hw < H * W)[None, :]
    c64 = c.to(tl.int64)
    h64, w64, hw64 = (hw // W).to(tl.int64), (hw % W).to(tl.int64), hw.to(tl.int64)
    row = (b * C + c64[:, None])
    ah = tl.load(ah_ptr + row * H + h64[None, :], mask=mask, other=0.0).to(ACC)
    aw = tl.load(aw_ptr + row * W + w64[None, :], mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + b * sxb + c64[:, None] * sxc + hw64[None, :] * sxhw, mask=mask, other=0.0).to(ACC)
    y = x * aw * ah                                           # the reference module's order
    tl.store(y_ptr + b * syb + c64[:, None] * syc + hw64[None, :] * syhw, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _coord_scale_bwd(
    dy_ptr,       # (B, C, H, W) upstream gradient, strides sdb, sdc, sdh, sdw (any layout, stride 0 allowed)
    x_ptr,        # (B, C, H, W) forward input, strides sxb, sxc, sxh, sxw
    ah_ptr,       # (B, C, H) contiguous: gate along H
    aw_ptr,       # (B, C, W) contiguous: gate along W
    dx_ptr,       # (B, C, H, W) output dx, strides sob, soc, soh, sow
    dah_ptr,      # (W_BLOCKS, B, C, H) contiguous: d a_h (a_h's dtype when W_BLOCKS == 1, else float32/64 partials)
    daw_ptr,      # (H_SPLITS, B, C, W) contiguous: d a_w (a_w's dtype when H_SPLITS == 1, else partials)
    B, C, H, W,
    sdb, sdc, sdh, sdw, sxb, sxc, sxh, sxw, sob, soc, soh, sow,
    n_c_blocks, n_w_blocks, n_h_splits, h_per_split,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """With y = x * a_w[w] * a_h[h] per (b, c) plane and g = dy * x:

        dx[h, w]  = dy[h, w] * a_w[w] * a_h[h]
        da_h[h]   = sum_w g[h, w] * a_w[w]
        da_w[w]   = sum_h g[h, w] * a_h[h]

    A program owns (b, a block of channels, a block of W, a split of H): its da_w sums are
    complete over its split of H and its da_h sums over its block of W; with more than one
    split/block the host adds the partial rows in a fixed order, so both are deterministic.
    """
    pid = tl.program_id(0).to(tl.int64)
    per_b = n_c_blocks * n_h_splits * n_w_blocks
    b = pid // per_b
    rest = pid % per_b
    c = (rest // (n_h_splits * n_w_blocks)) * BLOCK_C + tl.arange(0, BLOCK_C)
    rest = rest % (n_h_splits * n_w_blocks)
    hs = rest // n_w_blocks
    wb = rest % n_w_blocks
    w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    c_ok, w_ok = c < C, w < W
    c64, w64 = c.to(tl.int64), w.to(tl.int64)
    row = b * C + c64
    aw = tl.load(aw_ptr + row[:, None] * W + w64[None, :], mask=c_ok[:, None] & w_ok[None, :], other=0.0).to(ACC)
    dy_base = dy_ptr + b * sdb + c64[:, None, None] * sdc + w64[None, None, :] * sdw
    x_base = x_ptr + b * sxb + c64[:, None, None] * sxc + w64[None, None, :] * sxw
    dx_base = dx_ptr + b * sob + c64[:, None, None] * soc + w64[None, None, :] * sow
    acc_w = tl.zeros([BLOCK_C, BLOCK_W], dtype=ACC)
    h_start = hs * h_per_split
    h_end = tl.minimum(h_start + h_per_split, H)
    for start in range(h_start, h_end, BLOCK_H):
        h64 = (start + tl.arange(0, BLOCK_H)).to(tl.int64)
        h_ok = h64 < h_end
        mask_ch = c_ok[:, None] & h_ok[None, :]
        mask = mask_ch[:, :, None] & w_ok[None, None, :]
        ah = tl.load(ah_ptr + row[:, None] * H + h64[None, :], mask=mask_ch, other=0.0).to(ACC)
        dy = tl.load(dy_base + h64[None, :, None] * sdh, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_base + h64[None, :, None] * sxh, mask=mask, other=0.0).to(ACC)
        dx = dy * aw[:, None, :] * ah[:, :, None]
        tl.store(dx_base + h64[None, :, None] * soh, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        g = dy * x
        acc_w += tl.sum(g * ah[:, :, None], axis=1)
        dah = tl.sum(g * aw[:, None, :], axis=2)            # [BLOCK_C, BLOCK_H]: this W block's share of da_h
        tl.store(dah_ptr + (wb * B * C + row[:, None]) * H + h64[None, :], dah.to(dah_ptr.dtype.element_ty),
                 mask=mask_ch)
    tl.store(daw_ptr + (hs * B * C + row[:, None]) * W + w64[None, :], acc_w.to(daw_ptr.dtype.element_ty),
             mask=c_ok[:, None] & w_ok[None, :])


def _plane_tiling(x: torch.Tensor) -> tuple[int, int, int, int, int, int, int]:
    """Tiling of the plane walkers for x (B, C, H, W) with any strides:
    (BLOCK_C, BLOCK_H, BLOCK_W, n_c_blocks, n_w_blocks, n_h_splits, h_per_split)."""
    B, C, H, W = x.shape
    _, sc, _, sw = x.stride()
    if (sc == 1 and sw != 1) or H == W == 1:     # channels_last: rows of channels are contiguous
        BLOCK_C = min(64, triton.next_power_of_2(C))
        BLOCK_W = min(triton.next_power_of_2(W), max(1, 1024 // BLOCK_C))
        BLOCK_H = min(triton.next_power_of_2(H), max(1, 1024 // (BLOCK_C * BLOCK_W)))
    else:                                         # NCHW (or another layout): rows of W are contiguous
        BLOCK_W = min(triton.next_power_of_2(W), 256)
        BLOCK_H = min(triton.next_power_of_2(H), max(1, 1024 // BLOCK_W))
        # small planes: several channels per 1024-element tile (a 7 x 7 plane: 16 x 8 x 8)
        BLOCK_C = min(triton.next_power_of_2(C), max(1, 1024 // (BLOCK_H * BLOCK_W)))
        while BLOCK_C > 1 and B * triton.cdiv(C, BLOCK_C) * triton.cdiv(W, BLOCK_W) < num_programs_hint(x):
            BLOCK_C //= 2
    n_c, n_w = triton.cdiv(C, BLOCK_C), triton.cdiv(W, BLOCK_W)
    # Split H when (b, c block, w block) alone would leave the device idle.
    splits = max(1, min(triton.cdiv(H, BLOCK_H), num_programs_hint(x) // max(1, B * n_c * n_w)))
    h_per_split = triton.cdiv(triton.cdiv(H, splits), BLOCK_H) * BLOCK_H
    return BLOCK_C, BLOCK_H, BLOCK_W, n_c, n_w, triton.cdiv(H, h_per_split), h_per_split


def _reduced(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row 0 when there is one (already in `dtype`), else the sum of the partial rows, cast."""
    return parts[0] if parts.shape[0] == 1 else parts.sum(0).to(dtype)


def _parts(n: int, shape: tuple, dtype: torch.dtype, device, acc: torch.dtype) -> torch.Tensor:
    return torch.empty((n, *shape), device=device, dtype=dtype if n == 1 else acc)


def coord_pool_forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_h, x_w): x (B, C, H, W), any strides -> means over W (B, C, H) and over H (B, C, W),
    contiguous, in x's dtype, from one read of x."""
    B, C, H, W = x.shape
    if x.numel() == 0:       # nothing to read (a zero-size H or W gives NaN means, as torch does)
        return x.mean(3).contiguous(), x.mean(2).contiguous()
    _check_plane(H, W)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    BLOCK_C, BLOCK_H, BLOCK_W, n_c, n_w, n_h, h_per_split = _plane_tiling(x)
    xh = _parts(n_w, (B, C, H), x.dtype, x.device, acc)
    xw = _parts(n_h, (B, C, W), x.dtype, x.device, acc)
    _coord_pool_fwd[(B * n_c * n_h * n_w,)](
        x, xh, xw, B, C, H, W, *x.stride(), n_c, n_w, n_h, h_per_split,
        ACC=_acc_type(x.dtype), BLOCK_C=BLOCK_C, BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W,
    )
    return _reduced(xh, x.dtype), _reduced(xw, x.dtype)


def coord_pool_backward(gh: torch.Tensor, gw: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """dx (B, C, H, W) in gh's dtype and the given memory format, from gh (B, C, H) and gw (B, C, W)."""
    B, C, H = gh.shape
    W = gw.shape[2]
    dx = torch.empty((B, C, H, W), device=gh.device, dtype=gh.dtype, memory_format=memory_format)
    if dx.numel() == 0:
        return dx
    _check_plane(H, W)
    gh, gw = gh.contiguous(), gw.contiguous()        # (B, C, H) and (B, C, W): small
    BLOCK_C, BLOCK_HW = plane_tile_sizes(dx)      # several channels per tile for small planes
    n_c, n_hw = triton.cdiv(C, BLOCK_C), triton.cdiv(H * W, BLOCK_HW)
    _coord_pool_bwd[(B * n_c * n_hw,)](
        gh, gw, dx, C, H, W, *flat_strides(dx), n_c, n_hw,
        ACC=_acc_type(dx.dtype), BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW,
    )
    return dx


def coord_scale_forward(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """y = x * a_w[:, :, None, :] * a_h[:, :, :, None]. x: (B, C, H, W) with flattenable H x W;
    a_h: (B, C, H), a_w: (B, C, W), any float dtype. Returns y in x's dtype and memory format."""
    B, C, H, W = x.shape
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    _check_plane(H, W)
    BLOCK_C, BLOCK_HW = plane_tile_sizes(x)       # several channels per tile for small planes
    n_c, n_hw = triton.cdiv(C, BLOCK_C), triton.cdiv(H * W, BLOCK_HW)
    _coord_scale_fwd[(B * n_c * n_hw,)](
        x, a_h.contiguous(), a_w.contiguous(), y, C, H, W, *flat_strides(x), *flat_strides(y), n_c, n_hw,
        ACC=_acc_type(x.dtype), BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW,
    )
    return y


def coord_scale_backward(dy: torch.Tensor, x: torch.Tensor, a_h: torch.Tensor,
                         a_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, da_h, da_w): dx like x (x's dtype), da_h (B, C, H) in a_h's dtype, da_w (B, C, W) in
    a_w's dtype. dy and x: (B, C, H, W), any strides."""
    B, C, H, W = x.shape
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx, a_h.new_zeros(a_h.shape), a_w.new_zeros(a_w.shape)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    BLOCK_C, BLOCK_H, BLOCK_W, n_c, n_w, n_h, h_per_split = _plane_tiling(x)
    dah = _parts(n_w, (B, C, H), a_h.dtype, x.device, acc)
    daw = _parts(n_h, (B, C, W), a_w.dtype, x.device, acc)
    _coord_scale_bwd[(B * n_c * n_h * n_w,)](
        dy, x, a_h.contiguous(), a_w.contiguous(), dx, dah, daw, B, C, H, W,
        *dy.stride(), *x.stride(), *dx.stride(), n_c, n_w, n_h, h_per_split,
        ACC=_acc_type(x.dtype), BLOCK_C=BLOCK_C, BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W,
        num_warps=8,     # 4 warps need ~190 registers for the channels_last tile (sm_90), 8 about 100
    )
    return dx, _reduced(dah, a_h.dtype), _reduced(daw, a_w.dtype)
