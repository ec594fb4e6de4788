"""Spatial Group-wise Enhance (SGE) gate: forward and backward of everything after the parameters.

Per sample b and group g (its Cg = C / G channels c, N = H * W positions p):

    m[c]  = mean_p x[c, p]                       channel means
    xn[p] = sum_c x[c, p] * m[c]                 similarity to the group descriptor
    mu = mean_p xn,  d = xn - mu,  sd = sqrt(sum_p d^2 / (N - 1))      (unbiased, as torch.std)
    t0 = d / (sd + eps),  t = weight[g] * t0 + bias[g],  s = sigmoid(t)
    y[c, p] = x[c, p] * s[p]

Every program holds all the channels of its group (BLOCK_C = next power of two >= Cg) for a tile
of positions, so xn of a tile is one reduction over the tile's channel axis. Two ways to run:

- fused: when the whole (Cg, HW) slab of a group fits one tile (FUSED_MAX elements), one program
  per (b, g) reads it once, computes every statistic in registers and writes y (forward), or dx and
  per-sample weight/bias gradients (backward): one read of x (and dy), one write.
- split (large H x W): three launches in the forward, (1) channel sums over HW splits, (2) sums
  of d and d^2 per split, with d taken about mu0 = sum_c m[c]^2 (= mean_p xn exactly in real
  arithmetic, so the shifted sums lose nothing to cancellation), (3) the gate per (b, g, HW tile);
  two in the backward, (A) the reductions, (B) dx. Partial sums of each split go to their own
  row and are added on the host in a fixed order: deterministic, no atomics.

All arithmetic runs in ACC (float32, or float64 for float64 inputs); memory is read and written in
the tensors' own dtypes and strides (NCHW, channels_last, any view whose H x W flattens).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import flat_strides, flattenable, num_programs_hint

# Largest BLOCK_C * BLOCK_HW for the one-program-per-group kernels, and the tile of the split
# kernels (module globals so tests can force the split path on small shapes).
FUSED_MAX = 8192
TILE = 4096


@triton.jit
def _sge_fused_fwd(
    x_ptr,        # (B, C, HW) input, strides sxb, sxc, sxhw
    w_ptr,        # (G,) ACC weight
    bias_ptr,     # (G,) ACC bias
    y_ptr,        # (B, C, HW) output, strides syb, syc, syhw
    m_ptr,        # (B, C) ACC channel means (written, saved for backward)
    mu_ptr,       # (B, G) ACC mean of xn over positions (written)
    sd_ptr,       # (B, G) ACC unbiased std of xn over positions (written)
    G, CG, HW, eps,
    sxb, sxc, sxhw, syb, syc, syhw,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)      # = b * G + g
    b = pid // G
    g = pid % G
    j = tl.arange(0, BLOCK_C)
    c64 = g * CG + j.to(tl.int64)
    hw64 = tl.arange(0, BLOCK_HW).to(tl.int64)
    c_ok = j < CG
    p_ok = hw64 < HW
    mask = c_ok[:, None] & p_ok[None, :]
    x = tl.load(x_ptr + b * sxb + c64[:, None] * sxc + hw64[None, :] * sxhw, mask=mask, other=0.0).to(ACC)
    m = tl.sum(x, axis=1) / HW
    xn = tl.sum(x * m[:, None], axis=0)
    mu = tl.sum(xn, axis=0) / HW
    d = tl.where(p_ok, xn - mu, 0.0)
    sd = tl.sqrt(tl.sum(d * d, axis=0) / (HW - 1))
    t = tl.load(w_ptr + g) * (d / (sd + eps)) + tl.load(bias_ptr + g)
    s = 1.0 / (1.0 + tl.exp(-t))
    y = x * s[None, :]
    tl.store(y_ptr + b * syb + c64[:, None] * syc + hw64[None, :] * syhw, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + b * (G * CG) + c64, m, mask=c_ok)
    tl.store(mu_ptr + pid, mu)
    tl.store(sd_ptr + pid, sd)


@triton.jit
def _sge_fused_bwd(
    dy_ptr,       # (B, C, HW) upstream gradient, strides sdb, sdc, sdhw
    x_ptr,        # (B, C, HW) forward input, strides sxb, sxc, sxhw
    w_ptr,        # (G,) ACC weight
    bias_ptr,     # (G,) ACC bias
    m_ptr,        # (B, C) ACC channel means from the forward
    mu_ptr,       # (B, G) ACC mean of xn from the forward
    sd_ptr,       # (B, G) ACC unbiased std of xn from the forward
    dx_ptr,       # (B, C, HW) output dx, strides sob, soc, sohw
    dwb_ptr,      # (2, B, G) ACC per-sample d(weight) and d(bias), summed over B on the host
    B, G, CG, HW, eps,
    sdb, sdc, sdhw, sxb, sxc, sxhw, sob, soc, sohw,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Backward of the whole gate, one program per (b, g) holding the group's slab.

    With r = 1 / (sd + eps), w = weight[g] and sums over the N positions p:
        ds[p]  = sum_c dy[c, p] x[c, p]
        dt[p]  = ds[p] s[p] (1 - s[p]);   dweight[g] += sum_p dt t0,  dbias[g] += sum_p dt
        dt0[p] = w dt[p]
        dxn[p] = r (dt0[p] - mean_p dt0) - k d[p],   k = r^2 sum_p(dt0 d) / ((N - 1) sd)   (k = 0 if sd = 0,
                 as torch's std backward)
        dm[c]  = sum_p dxn[p] x[c, p]
        dx[c, p] = dy[c, p] s[p] + dxn[p] m[c] + dm[c] / N
    """
    pid = tl.program_id(0).to(tl.int64)      # = b * G + g
    b = pid // G
    g = pid % G
    j = tl.arange(0, BLOCK_C)
    c64 = g * CG + j.to(tl.int64)
    hw64 = tl.arange(0, BLOCK_HW).to(tl.int64)
    c_ok = j < CG
    p_ok = hw64 < HW
    mask = c_ok[:, None] & p_ok[None, :]
    x = tl.load(x_ptr + b * sxb + c64[:, None] * sxc + hw64[None, :] * sxhw, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + b * sdb + c64[:, None] * sdc + hw64[None, :] * sdhw, mask=mask, other=0.0).to(ACC)
    m = tl.load(m_ptr + b * (G * CG) + c64, mask=c_ok, other=0.0)
    mu = tl.load(mu_ptr + pid)
    sd = tl.load(sd_ptr + pid)
    w = tl.load(w_ptr + g)
    r = 1.0 / (sd + eps)
    xn = tl.sum(x * m[:, None], axis=0)
    d = tl.where(p_ok, xn - mu, 0.0)
    t0 = d / (sd + eps)
    s = 1.0 / (1.0 + tl.exp(-(w * t0 + tl.load(bias_ptr + g))))
    ds = tl.sum(dy * x, axis=0)
    dt = tl.where(p_ok, ds * s * (1.0 - s), 0.0)
    dt0 = w * dt
    mean_dt0 = tl.sum(dt0, axis=0) / HW
    k = tl.where(sd > 0.0, r * r * tl.sum(dt0 * d, axis=0) / ((HW - 1) * tl.where(sd > 0.0, sd, 1.0)), 0.0)
    dxn = r * (dt0 - mean_dt0) - k * d
    dm = tl.sum(dxn[None, :] * x, axis=1)
    dx = dy * s[None, :] + dxn[None, :] * m[:, None] + dm[:, None] / HW
    tl.store(dx_ptr + b * sob + c64[:, None] * soc + hw64[None, :] * sohw, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dwb_ptr + pid, tl.sum(dt * t0, axis=0))
    tl.store(dwb_ptr + B * G + pid, tl.sum(dt, axis=0))


@triton.jit
def _sge_channel_sums(
    x_ptr,        # (B, C, HW) input, strides sxb, sxc, sxhw
    part_ptr,     # (SPLITS, B, C) ACC partial sums of x over each split of HW
    B, G, CG, HW,
    sxb, sxc, sxhw,
    hw_per_split,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)      # = (b * G + g) * n_splits + split
    n_splits = tl.cdiv(HW, hw_per_split)
    bg = pid // n_splits
    split = pid % n_splits
    b = bg // G
    g = bg % G
    j = tl.arange(0, BLOCK_C)
    c64 = g * CG + j.to(tl.int64)
    c_ok = j < CG
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    hw_start = split * hw_per_split
    hw_end = tl.minimum(hw_start + hw_per_split, HW)
    for start in range(hw_start, hw_end, BLOCK_HW):
        hw64 = (start + tl.arange(0, BLOCK_HW)).to(tl.int64)
        mask = c_ok[:, None] & (hw64 < hw_end)[None, :]
        x = tl.load(x_ptr + b * sxb + c64[:, None] * sxc + hw64[None, :] * sxhw, mask=mask, other=0.0)
        acc += x.to(ACC)
    tl.store(part_ptr + (split * B + b) * (G * CG) + c64, tl.sum(acc, axis=1), mask=c_ok)


@triton.jit
def _sge_xn_sums(
    x_ptr,        # (B, C, HW) input, strides sxb, sxc, sxhw
    m_ptr,        # (B, C) ACC channel means
    mu0_ptr,      # (B, G) ACC shift: sum_c m[c]^2 of the group (= mean of xn up to rounding)
    part_ptr,     # (2, SPLITS, B, G) ACC partial sum_p d and sum_p d^2, d = xn - mu0, per split of HW
    B, G, CG, HW,
    sxb, sxc, sxhw,
    hw_per_split,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)      # = (b * G + g) * n_splits + split
    n_splits = tl.cdiv(HW, hw_per_split)
    bg = pid // n_splits
    split = pid % n_splits
    b = bg // G
    g = bg % G
    j = tl.arange(0, BLOCK_C)
    c64 = g * CG + j.to(tl.int64)
    c_ok = j < CG
    m = tl.load(m_ptr + b * (G * CG) + c64, mask=c_ok, other=0.0)
    mu0 = tl.load(mu0_ptr + bg)
    acc1 = tl.zeros([BLOCK_HW], dtype=ACC)
    acc2 = tl.zeros([BLOCK_HW], dtype=ACC)
    hw_start = split * hw_per_split
    hw_end = tl.minimum(hw_start + hw_per_split, HW)
    for start in range(hw_start, hw_end, BLOCK_HW):
        hw64 = (start + tl.arange(0, BLOCK_HW)).to(tl.int64)
        p_ok = hw64 < hw_end
        mask = c_ok[:, None] & p_ok[None, :]
        x = tl.load(x_ptr + b * sxb + c64[:, None] * sxc + hw64[None, :] * sxhw, mask=mask, other=0.0)
        d = tl.where(p_ok, tl.sum(x.to(ACC) * m[:, None], axis=0) - mu0, 0.0)
        acc1 += d
        acc2 += d * d
    tl.store(part_ptr + split * B * G + bg, tl.sum(acc1, axis=0))
    tl.store(part_ptr + (n_splits + split) * B * G + bg, tl.sum(acc2, axis=0))


@triton.jit
def _sge_gate_fwd(
    x_ptr,        # (B, C, HW) input, strides sxb, sxc, sxhw
    w_ptr,        # (G,) ACC weight
    bias_ptr,     # (G,) ACC bias
    m_ptr,        # (B, C) ACC channel means
    mu_ptr,       # (B, G) ACC mean of xn
    sd_ptr,       # (B, G) ACC unbiased std of xn
    y_ptr,        # (B, C, HW) output, strides syb, syc, syhw
    G, CG, HW, eps,
    sxb, sxc, sxhw, syb, syc, syhw,
    n_hw_blocks,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)      # = (b * G + g) * n_hw_blocks + hw block
    bg = pid // n_hw_blocks
    b = bg // G
    g = bg % G
    j = tl.arange(0, BLOCK_C)
    c64 = g * CG + j.to(tl.int64)
    hw64 = (pid % n_hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW).to(tl.int64)
    c_ok = j < CG
    p_ok = hw64 < HW
    mask = c_ok[:, None] & p_ok[None, :]
    x = tl.load(x_ptr + b * sxb + c64[:, None] * sxc + hw64[None, :] * sxhw, mask=mask, other=0.0).to(ACC)
    m = tl.load(m_ptr + b * (G * CG) + c64, mask=c_ok, other=0.0)
    xn = tl.sum(x * m[:, None], axis=0)
    d = tl.where(p_ok, xn - tl.load(mu_ptr + bg), 0.0)
    t = tl.load(w_ptr + g) * (d / (tl.load(sd_ptr + bg) + eps)) + tl.load(bias_ptr + g)
    s = 1.0 / (1.0 + tl.exp(-t))
    y = x * s[None, :]
    tl.store(y_ptr + b * syb + c64[:, None] * syc + hw64[None, :] * syhw, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sge_bwd_sums(
    dy_ptr,       # (B, C, HW) upstream gradient, strides sdb, sdc, sdhw
    x_ptr,        # (B, C, HW) forward input, strides sxb, sxc, sxhw
    w_ptr,        # (G,) ACC weight
    bias_ptr,     # (G,) ACC bias
    m_ptr,        # (B, C) ACC channel means
    mu_ptr,       # (B, G) ACC mean of xn
    sd_ptr,       # (B, G) ACC unbiased std of xn
    part_g_ptr,   # (4, SPLITS, B, G) ACC partial sums per split: dt0, dt0 * d, dt * t0, dt
    part_c_ptr,   # (2, SPLITS, B, C) ACC partial sums per split: sum_p dt0 x[c], sum_p d x[c]
    B, G, CG, HW, eps,
    sdb, sdc, sdhw, sxb, sxc, sxhw,
    hw_per_split,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Pass A of the split backward: the reductions over positions (notation of _sge_fused_bwd).

    Per split of HW: sum dt0, sum dt0 * d (-> mean_p dt0 and k), sum dt * t0 and sum dt (-> dweight,
    dbias), and per channel P[c] = sum_p dt0 x[c, p], Q[c] = sum_p d x[c, p]; then on the host
    dm[c] = r (P[c] - N mean_p(dt0) m[c]) - k Q[c], because sum_p d = 0 and sum_p x[c, p] = N m[c].
    """
    pid = tl.program_id(0).to(tl.int64)      # = (b * G + g) * n_splits + split
    n_splits = tl.cdiv(HW, hw_per_split)
    bg = pid // n_splits
    split = pid % n_splits
    b = bg // G
    g = bg % G
    j = tl.arange(0, BLOCK_C)
    c64 = g * CG + j.to(tl.int64)
    c_ok = j < CG
    m = tl.load(m_ptr + b * (G * CG) + c64, mask=c_ok, other=0.0)
    mu = tl.load(mu_ptr + bg)
    sd = tl.load(sd_ptr + bg)
    w = tl.load(w_ptr + g)
    bias = tl.load(bias_ptr + g)
    acc_dt0 = tl.zeros([BLOCK_HW], dtype=ACC)
    acc_dt0d = tl.zeros([BLOCK_HW], dtype=ACC)
    acc_dw = tl.zeros([BLOCK_HW], dtype=ACC)
    acc_db = tl.zeros([BLOCK_HW], dtype=ACC)
    acc_p = tl.zeros([BLOCK_C], dtype=ACC)
    acc_q = tl.zeros([BLOCK_C], dtype=ACC)
    hw_start = split * hw_per_split
    hw_end = tl.minimum(hw_start + hw_per_split, HW)
    for start in range(hw_start, hw_end, BLOCK_HW):
        hw64 = (start + tl.arange(0, BLOCK_HW)).to(tl.int64)
        p_ok = hw64 < hw_end
        mask = c_ok[:, None] & p_ok[None, :]
        x = tl.load(x_ptr + b * sxb + c64[:, None] * sxc + hw64[None, :] * sxhw, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + b * sdb + c64[:, None] * sdc + hw64[None, :] * sdhw, mask=mask, other=0.0).to(ACC)
        d = tl.where(p_ok, tl.sum(x * m[:, None], axis=0) - mu, 0.0)
        t0 = d / (sd + eps)
        s = 1.0 / (1.0 + tl.exp(-(w * t0 + bias)))
        dt = tl.where(p_ok, tl.sum(dy * x, axis=0) * s * (1.0 - s), 0.0)
        dt0 = w * dt
        acc_dt0 += dt0
        acc_dt0d += dt0 * d
        acc_dw += dt * t0
        acc_db += dt
        acc_p += tl.sum(dt0[None, :] * x, axis=1)
        acc_q += tl.sum(d[None, :] * x, axis=1)
    BG = B * G
    tl.store(part_g_ptr + split * BG + bg, tl.sum(acc_dt0, axis=0))
    tl.store(part_g_ptr + (n_splits + split) * BG + bg, tl.sum(acc_dt0d, axis=0))
    tl.store(part_g_ptr + (2 * n_splits + split) * BG + bg, tl.sum(acc_dw, axis=0))
    tl.store(part_g_ptr + (3 * n_splits + split) * BG + bg, tl.sum(acc_db, axis=0))
    BC = B * G * CG
    tl.store(part_c_ptr + split * BC + b * (G * CG) + c64, acc_p, mask=c_ok)
    tl.store(part_c_ptr + (n_splits + split) * BC + b * (G * CG) + c64, acc_q, mask=c_ok)


@triton.jit
def _sge_bwd_dx(
    dy_ptr,       # (B, C, HW) upstream gradient, strides sdb, sdc, sdhw
    x_ptr,        # (B, C, HW) forward input, strides sxb, sxc, sxhw
    w_ptr,        # (G,) ACC weight
    bias_ptr,     # (G,) ACC bias
    m_ptr,        # (B, C) ACC channel means
    mu_ptr,       # (B, G) ACC mean of xn
    sd_ptr,       # (B, G) ACC unbiased std of xn
    coef_ptr,     # (B, G, 2) ACC per group: mean_p dt0, k
    dm_ptr,       # (B, C) ACC dm[c] (pass A + host)
    dx_ptr,       # (B, C, HW) output dx, strides sob, soc, sohw
    G, CG, HW, eps,
    sdb, sdc, sdhw, sxb, sxc, sxhw, sob, soc, sohw,
    n_hw_blocks,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Pass B of the split backward: dx[c, p] = dy s + dxn[p] m[c] + dm[c] / N, dxn recomputed per
    tile from the statistics (notation of _sge_fused_bwd)."""
    pid = tl.program_id(0).to(tl.int64)      # = (b * G + g) * n_hw_blocks + hw block
    bg = pid // n_hw_blocks
    b = bg // G
    g = bg % G
    j = tl.arange(0, BLOCK_C)
    c64 = g * CG + j.to(tl.int64)
    hw64 = (pid % n_hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW).to(tl.int64)
    c_ok = j < CG
    p_ok = hw64 < HW
    mask = c_ok[:, None] & p_ok[None, :]
    x = tl.load(x_ptr + b * sxb + c64[:, None] * sxc + hw64[None, :] * sxhw, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + b * sdb + c64[:, None] * sdc + hw64[None, :] * sdhw, mask=mask, other=0.0).to(ACC)
    m = tl.load(m_ptr + b * (G * CG) + c64, mask=c_ok, other=0.0)
    dm = tl.load(dm_ptr + b * (G * CG) + c64, mask=c_ok, other=0.0)
    sd = tl.load(sd_ptr + bg)
    w = tl.load(w_ptr + g)
    mean_dt0 = tl.load(coef_ptr + 2 * bg)
    k = tl.load(coef_ptr + 2 * bg + 1)
    d = tl.where(p_ok, tl.sum(x * m[:, None], axis=0) - tl.load(mu_ptr + bg), 0.0)
    t0 = d / (sd + eps)
    s = 1.0 / (1.0 + tl.exp(-(w * t0 + tl.load(bias_ptr + g))))
    dt0 = w * tl.sum(dy * x, axis=0) * s * (1.0 - s)
    dxn = (dt0 - mean_dt0) / (sd + eps) - k * d
    dx = dy * s[None, :] + dxn[None, :] * m[:, None] + dm[:, None] / HW
    tl.store(dx_ptr + b * sob + c64[:, None] * soc + hw64[None, :] * sohw, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tl_acc(acc: torch.dtype):
    return tl.float64 if acc == torch.float64 else tl.float32


def _blocks(CG: int, HW: int, tile: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) of the split kernels: the whole group along c, the rest of the tile along hw."""
    block_c = triton.next_power_of_2(CG)
    return block_c, min(triton.next_power_of_2(HW), max(1, tile // block_c))


def _warps(block: int) -> int:
    """Warps per program for a tile of `block` elements (keeps the fused backward of an 8192-element
    slab near 128 registers per thread on sm_90)."""
    return 16 if block >= 8192 else 8 if block >= 4096 else 4


def _splits(x: torch.Tensor, programs: int, HW: int, block_hw: int) -> tuple[int, int]:
    """(n_splits, hw_per_split): split HW when B * G programs alone would leave the device idle."""
    splits = max(1, min(triton.cdiv(HW, block_hw), num_programs_hint(x) // max(1, programs)))
    hw_per_split = triton.cdiv(triton.cdiv(HW, splits), block_hw) * block_hw
    return triton.cdiv(HW, hw_per_split), hw_per_split


def _out_like(x: torch.Tensor, xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the result tensor, with torch.empty_like(x)'s strides; the tensor the kernel writes into)."""
    out = torch.empty_like(x)
    return out, (out if flat_strides(out) is not None else torch.empty_like(xf))


def sge_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float):
    """(y, m, mu, sd) of the SGE gate. x: (B, C, H, W) with C % groups == 0 and H * W >= 2; weight,
    bias: (G,) in the accumulation dtype (float32, float64 for float64 x). y: like torch.empty_like(x);
    m: (B, C), mu and sd: (B, G), in the accumulation dtype."""
    B, C, H, W = x.shape
    G, HW = groups, H * W
    CG = C // G
    acc = _acc_dtype(x)
    m = torch.zeros(B, C, device=x.device, dtype=acc)
    mu = torch.zeros(B, G, device=x.device, dtype=acc)
    sd = torch.zeros(B, G, device=x.device, dtype=acc)
    xf = flattenable(x)
    y, yk = _out_like(x, xf)
    if x.numel() == 0:
        return y, m, mu, sd
    ACC = _tl_acc(acc)
    block_c, block_hw = triton.next_power_of_2(CG), triton.next_power_of_2(HW)
    if block_c * block_hw <= FUSED_MAX:
        _sge_fused_fwd[(B * G,)](
            xf, weight, bias, yk, m, mu, sd, G, CG, HW, eps, *flat_strides(xf), *flat_strides(yk),
            ACC=ACC, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=_warps(block_c * block_hw),
        )
    else:
        block_c, block_hw = _blocks(CG, HW, TILE)
        warps = _warps(block_c * block_hw)
        n_splits, hw_per_split = _splits(x, B * G, HW, block_hw)
        part = torch.empty(n_splits, B, C, device=x.device, dtype=acc)
        _sge_channel_sums[(B * G * n_splits,)](
            xf, part, B, G, CG, HW, *flat_strides(xf), hw_per_split,
            ACC=ACC, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps,
        )
        m = part.sum(0) / HW
        mu0 = m.view(B, G, CG).square().sum(2)
        part = torch.empty(2, n_splits, B, G, device=x.device, dtype=acc)
        _sge_xn_sums[(B * G * n_splits,)](
            xf, m, mu0, part, B, G, CG, HW, *flat_strides(xf), hw_per_split,
            ACC=ACC, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps,
        )
        s1, s2 = part.sum(1)
        mean_d = s1 / HW
        mu = mu0 + mean_d
        sd = ((s2 - HW * mean_d * mean_d).clamp_min(0) / (HW - 1)).sqrt()
        n_hw = triton.cdiv(HW, block_hw)
        _sge_gate_fwd[(B * G * n_hw,)](
            xf, weight, bias, m, mu, sd, yk, G, CG, HW, eps, *flat_strides(xf), *flat_strides(yk), n_hw,
            ACC=ACC, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps,
        )
    if yk is not y:
        y.copy_(yk)
    return y, m, mu, sd


def sge_backward(dy, x, weight, bias, m, mu, sd, groups: int, eps: float):
    """(dx, dweight, dbias) of the SGE gate: dx like torch.empty_like(x), dweight and dbias (G,) in the
    accumulation dtype. m, mu, sd: the statistics returned by sge_forward."""
    B, C, H, W = x.shape
    G, HW = groups, H * W
    CG = C // G
    acc = _acc_dtype(x)
    xf, dyf = flattenable(x), flattenable(dy)
    dx, dxk = _out_like(x, xf)
    if x.numel() == 0:
        zero = torch.zeros(G, device=x.device, dtype=acc)
        return dx, zero, zero.clone()
    ACC = _tl_acc(acc)
    block_c, block_hw = triton.next_power_of_2(CG), triton.next_power_of_2(HW)
    if block_c * block_hw <= FUSED_MAX:
        dwb = torch.empty(2, B, G, device=x.device, dtype=acc)
        _sge_fused_bwd[(B * G,)](
            dyf, xf, weight, bias, m, mu, sd, dxk, dwb, B, G, CG, HW, eps,
            *flat_strides(dyf), *flat_strides(xf), *flat_strides(dxk),
            ACC=ACC, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=_warps(block_c * block_hw),
        )
        dw, db = dwb[0].sum(0), dwb[1].sum(0)
    else:
        block_c, block_hw = _blocks(CG, HW, TILE)
        warps = _warps(block_c * block_hw)
        n_splits, hw_per_split = _splits(x, B * G, HW, block_hw)
        part_g = torch.empty(4, n_splits, B, G, device=x.device, dtype=acc)
        part_c = torch.empty(2, n_splits, B, C, device=x.device, dtype=acc)
        _sge_bwd_sums[(B * G * n_splits,)](
            dyf, xf, weight, bias, m, mu, sd, part_g, part_c, B, G, CG, HW, eps,
            *flat_strides(dyf), *flat_strides(xf), hw_per_split,
            ACC=ACC, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps,
        )
        sum_dt0, sum_dt0d, dw, db = part_g.sum(1)
        p, q = part_c.sum(1)
        r = 1.0 / (sd + eps)
        k = torch.where(sd > 0, r * r * sum_dt0d / ((HW - 1) * torch.where(sd > 0, sd, 1.0)), 0.0)
        dm = (r[:, :, None] * (p.view(B, G, CG) - sum_dt0[:, :, None] * m.view(B, G, CG))
              - k[:, :, None] * q.view(B, G, CG)).reshape(B, C)
        coef = torch.stack([sum_dt0 / HW, k], dim=2).contiguous()
        n_hw = triton.cdiv(HW, block_hw)
        _sge_bwd_dx[(B * G * n_hw,)](
            dyf, xf, weight, bias, m, mu, sd, coef, dm, dxk, G, CG, HW, eps,
            *flat_strides(dyf), *flat_strides(xf), *flat_strides(dxk), n_hw,
            ACC=ACC, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps,
        )
        dw, db = dw.sum(0), db.sum(0)
    if dxk is not dx:
        dx.copy_(dxk)
    return dx, dw, db
