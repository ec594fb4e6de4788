"""SimAM, the whole module fused: per (b, c) plane of n = H * W positions,

    mu = mean(x),  d = (x - mu)^2,  v = sum(d) / (n - 1),  r = 1 / (4 (v + lambda)),
    y = x * sigmoid(d * r + 0.5).

Each program owns whole planes (b, a block of channels), so the statistics need no second
launch and no atomics. A plane that fits in one tile is read once (forward and backward);
a larger one is walked twice forward (statistics, then the gate: the second read of a plane the
program has just read comes mostly from L2) and three times backward. The statistics of a
walked plane combine per-tile means and squared deviations (Chan et al.), so the variance does
not suffer the cancellation of sum(x^2) - n mu^2 when |mu| >> std.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import flat_strides, num_programs_hint

_ONE_TILE_MAX = 4096      # largest [BLOCK_C, BLOCK_HW] tile kept whole in registers


@triton.jit
def _plane_stats(x_base, sxhw, c_ok, HW, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """(mu, sum_d) per channel of the planes at x_base ([BLOCK_C] pointers), by walking HW."""
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    seen = tl.zeros([BLOCK_C], dtype=ACC)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        hw_ok = hw < HW
        mask = c_ok[:, None] & hw_ok[None, :]
        x = tl.load(x_base[:, None] + hw.to(tl.int64)[None, :] * sxhw, mask=mask, other=0.0).to(ACC)
        cnt = tl.sum(hw_ok.to(ACC), axis=0)                      # valid positions in this tile (>= 1)
        t_mean = tl.sum(x, axis=1) / cnt
        t_dev = tl.where(mask, x - t_mean[:, None], 0.0)
        t_m2 = tl.sum(t_dev * t_dev, axis=1)
        total = seen + cnt
        delta = t_mean - mean
        mean += delta * (cnt / total)
        m2 += t_m2 + delta * delta * (seen * cnt / total)
        seen = total
    return mean, m2


@triton.jit
def _simam_fwd(
    x_ptr,        # (B, C, HW) input, strides sxb, sxc, sxhw
    y_ptr,        # (B, C, HW) output, strides syb, syc, syhw
    C, HW,
    sxb, sxc, sxhw, syb, syc, syhw,
    n_c_blocks, lam_hi, lam_lo,
    ACC: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    e_lambda = tl.zeros([BLOCK_C], dtype=ACC) + lam_hi + lam_lo     # lambda to ~48 bits in float64
    b = pid // n_c_blocks
    c = (pid % n_c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c64 = c.to(tl.int64)
    x_base = x_ptr + b * sxb + c64 * sxc
    y_base = y_ptr + b * syb + c64 * syc
    if ONE_TILE:
        hw64 = tl.arange(0, BLOCK_HW).to(tl.int64)
        mask = c_ok[:, None] & (hw64 < HW)[None, :]
        x = tl.load(x_base[:, None] + hw64[None, :] * sxhw, mask=mask, other=0.0).to(ACC)
        mu = tl.sum(x, axis=1) / HW
        xc = tl.where(mask, x - mu[:, None], 0.0)
        d = xc * xc
        r = 1.0 / (4.0 * (tl.sum(d, axis=1) / (HW - 1) + e_lambda))
        y = x * tl.sigmoid(d * r[:, None] + 0.5)
        tl.store(y_base[:, None] + hw64[None, :] * syhw, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        mu, sum_d = _plane_stats(x_base, sxhw, c_ok, HW, ACC, BLOCK_C, BLOCK_HW)
        r = 1.0 / (4.0 * (sum_d / (HW - 1) + e_lambda))
        for start in range(0, HW, BLOCK_HW):
            hw64 = (start + tl.arange(0, BLOCK_HW)).to(tl.int64)
            mask = c_ok[:, None] & (hw64 < HW)[None, :]
            x = tl.load(x_base[:, None] + hw64[None, :] * sxhw, mask=mask, other=0.0).to(ACC)
            xc = x - mu[:, None]
            y = x * tl.sigmoid(xc * xc * r[:, None] + 0.5)
            tl.store(y_base[:, None] + hw64[None, :] * syhw, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _simam_bwd(
    dy_ptr,       # (B, C, HW) upstream gradient, strides sdb, sdc, sdhw (stride 0 allowed)
    x_ptr,        # (B, C, HW) forward input, strides sxb, sxc, sxhw
    dx_ptr,       # (B, C, HW) output dx, strides sob, soc, sohw
    C, HW,
    sdb, sdc, sdhw, sxb, sxc, sxhw, sob, soc, sohw,
    n_c_blocks, lam_hi, lam_lo,
    ACC: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Gradient of out = x * s, s = sigmoid(d r + 1/2), per plane of n = HW positions, N = n - 1:

        mu = sum(x) / n,  xc = x - mu,  d = xc^2,  v = sum(d) / N,  r = 1 / (4 (v + lambda)).

    With g = dout, the direct term is g s; through the gate, e = dL/d(d r + 1/2) = g x s (1 - s).
    r depends on v: dr/dv = -4 r^2, so dL/dv = -4 r^2 B with B = sum(e d), and since
    v = sum(d) / N every d_i also receives dS = dL/dv / N = -4 r^2 B / N. Hence
    dL/dd_i = q_i = e_i r + dS. Finally d_i = (x_i - mu)^2 with dmu/dx_j = 1 / n gives
    dL/dx_j (through d) = 2 xc_j q_j - (2 / n) sum_i q_i xc_i, and sum_i xc_i = 0, so with
    A = sum(e xc):

        dx = g s + 2 xc (e r + dS) - 2 r A / n,    dS = -4 r^2 B / N.

    Only x is saved: mu and r are recomputed (one read of the plane), then A and B (one read of
    x and g), then dx (one more); a plane that fits in one tile is read once.
    """
    pid = tl.program_id(0).to(tl.int64)
    e_lambda = tl.zeros([BLOCK_C], dtype=ACC) + lam_hi + lam_lo     # lambda to ~48 bits in float64
    b = pid // n_c_blocks
    c = (pid % n_c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c64 = c.to(tl.int64)
    x_base = x_ptr + b * sxb + c64 * sxc
    dy_base = dy_ptr + b * sdb + c64 * sdc
    dx_base = dx_ptr + b * sob + c64 * soc
    if ONE_TILE:
        hw64 = tl.arange(0, BLOCK_HW).to(tl.int64)
        mask = c_ok[:, None] & (hw64 < HW)[None, :]
        x = tl.load(x_base[:, None] + hw64[None, :] * sxhw, mask=mask, other=0.0).to(ACC)
        g = tl.load(dy_base[:, None] + hw64[None, :] * sdhw, mask=mask, other=0.0).to(ACC)
        mu = tl.sum(x, axis=1) / HW
        xc = tl.where(mask, x - mu[:, None], 0.0)
        d = xc * xc
        r = 1.0 / (4.0 * (tl.sum(d, axis=1) / (HW - 1) + e_lambda))
        s = tl.sigmoid(d * r[:, None] + 0.5)
        e = g * x * s * (1.0 - s)                                   # zero on masked lanes (g = 0)
        A = tl.sum(e * xc, axis=1)
        dS = -4.0 * r * r * tl.sum(e * d, axis=1) / (HW - 1)
        dx = g * s + 2.0 * xc * (e * r[:, None] + dS[:, None]) - (2.0 * r * A / HW)[:, None]
        tl.store(dx_base[:, None] + hw64[None, :] * sohw, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        mu, sum_d = _plane_stats(x_base, sxhw, c_ok, HW, ACC, BLOCK_C, BLOCK_HW)
        r = 1.0 / (4.0 * (sum_d / (HW - 1) + e_lambda))
        A = tl.zeros([BLOCK_C], dtype=ACC)
        Bsum = tl.zeros([BLOCK_C], dtype=ACC)
        for start in range(0, HW, BLOCK_HW):
            hw64 = (start + tl.arange(0, BLOCK_HW)).to(tl.int64)
            mask = c_ok[:, None] & (hw64 < HW)[None, :]
            x = tl.load(x_base[:, None] + hw64[None, :] * sxhw, mask=mask, other=0.0).to(ACC)
            g = tl.load(dy_base[:, None] + hw64[None, :] * sdhw, mask=mask, other=0.0).to(ACC)
            xc = x - mu[:, None]
            d = xc * xc
            s = tl.sigmoid(d * r[:, None] + 0.5)
            e = g * x * s * (1.0 - s)
            A += tl.sum(e * xc, axis=1)
            Bsum += tl.sum(e * d, axis=1)
        dS = -4.0 * r * r * Bsum / (HW - 1)
        shift = 2.0 * r * A / HW
        for start in range(0, HW, BLOCK_HW):
            hw64 = (start + tl.arange(0, BLOCK_HW)).to(tl.int64)
            mask = c_ok[:, None] & (hw64 < HW)[None, :]
            x = tl.load(x_base[:, None] + hw64[None, :] * sxhw, mask=mask, other=0.0).to(ACC)
            g = tl.load(dy_base[:, None] + hw64[None, :] * sdhw, mask=mask, other=0.0).to(ACC)
            xc = x - mu[:, None]
            d = xc * xc
            s = tl.sigmoid(d * r[:, None] + 0.5)
            e = g * x * s * (1.0 - s)
            dx = g * s + 2.0 * xc * (e * r[:, None] + dS[:, None]) - shift[:, None]
            tl.store(dx_base[:, None] + hw64[None, :] * sohw, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _tiling(x: torch.Tensor, one_tile_max: int = _ONE_TILE_MAX) -> tuple[int, int, bool]:
    """(BLOCK_C, BLOCK_HW, ONE_TILE) for x (B, C, HW) with flattenable H x W."""
    B, C, H, W = x.shape
    HW = H * W
    _, sc, shw = flat_strides(x)
    hw_pow2 = triton.next_power_of_2(HW)
    c_pow2 = triton.next_power_of_2(C)
    if sc == 1 and shw != 1:                    # channels_last: rows of channels are contiguous
        # The widest channel block (64, down to 16: 32-byte rows in 16-bit types) that still gives
        # the device enough programs; a whole-plane tile when one fits.
        block_c = min(64, c_pow2)
        while block_c > 16 and B * triton.cdiv(C, block_c) < num_programs_hint(x):
            block_c //= 2
        one = block_c
        while one > 16 and one * hw_pow2 > one_tile_max:
            one //= 2
        if one * hw_pow2 <= one_tile_max:
            return one, hw_pow2, True
        return block_c, max(16, 1024 // block_c), False
    if hw_pow2 > one_tile_max:                  # NCHW, a large plane: walk it
        return 1, 1024, False
    # NCHW, the plane fits: small planes share a tile of up to 1024 elements (a 7 x 7 plane:
    # 16 channels x 64 positions), as many channels as still leave the device enough programs.
    block_hw = max(16, hw_pow2)
    block_c = min(c_pow2, max(1, min(1024, one_tile_max) // block_hw))
    while block_c > 1 and B * triton.cdiv(C, block_c) < num_programs_hint(x):
        block_c //= 2
    return block_c, block_hw, True


def _split(value: float) -> tuple[float, float]:
    """value as hi + lo, two float32-representable numbers: Triton passes Python floats as fp32."""
    hi = float(torch.tensor(value, dtype=torch.float32))
    return hi, float(torch.tensor(value - hi, dtype=torch.float32))


def _launch_args(x: torch.Tensor, one_tile_max: int):
    B, C, H, W = x.shape
    BLOCK_C, BLOCK_HW, one_tile = _tiling(x, one_tile_max)
    n_c = triton.cdiv(C, BLOCK_C)
    meta = dict(
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, ONE_TILE=one_tile,
        # about 8 elements per thread: ~64 registers for the one-tile backward (sm_90, bf16)
        BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW, num_warps=max(4, min(16, BLOCK_C * BLOCK_HW // 256)),
    )
    return (B * n_c,), n_c, meta


def simam_forward(x: torch.Tensor, e_lambda: float, *, one_tile_max: int = _ONE_TILE_MAX) -> torch.Tensor:
    """SimAM forward. x: (B, C, H, W) with flattenable H x W and H * W >= 2. Returns y in x's
    dtype and memory format. one_tile_max: largest tile kept whole (tests lower it to walk planes)."""
    B, C, H, W = x.shape
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    grid, n_c, meta = _launch_args(x, one_tile_max)
    _simam_fwd[grid](x, y, C, H * W, *flat_strides(x), *flat_strides(y), n_c, *_split(e_lambda), **meta)
    return y


def simam_backward(dy: torch.Tensor, x: torch.Tensor, e_lambda: float, *,
                   one_tile_max: int = _ONE_TILE_MAX) -> torch.Tensor:
    """dx like x, from dy and x (B, C, H, W) with flattenable H x W (statistics recomputed)."""
    B, C, H, W = x.shape
    dx = torch.empty_like(x)
    if dx.numel() == 0:
        return dx
    grid, n_c, meta = _launch_args(x, one_tile_max)
    _simam_bwd[grid](dy, x, dx, C, H * W, *flat_strides(dy), *flat_strides(x), *flat_strides(dx), n_c,
                     *_split(e_lambda), **meta)
    return dx
