"""Channel scale: y = x * a[b, c] (+ residual), and its backward dx = dy * a, da = sum_hw(dy * x).

The activation that makes `a` from gate logits runs on the (B, C) tensor in PyTorch (it moves
B*C elements); these kernels do the two passes over the (B, C, H, W) map.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import flat_strides, num_programs_hint, tile_sizes


@triton.jit
def _channel_scale_fwd(
    x_ptr,        # (B, C, HW) input, strides sxb, sxc, sxhw
    a_ptr,        # (B, C) float32 scale, contiguous
    r_ptr,        # (B, C, HW) residual (read only when HAS_RESIDUAL), strides srb, src, srhw
    y_ptr,        # (B, C, HW) output, strides syb, syc, syhw
    C, HW,
    sxb, sxc, sxhw, srb, src, srhw, syb, syc, syhw,
    n_c_blocks, n_hw_blocks,
    HAS_RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // (n_c_blocks * n_hw_blocks)
    rest = pid % (n_c_blocks * n_hw_blocks)
    c = (rest // n_hw_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = (rest % n_hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_ok = c < C
    mask = c_ok[:, None] & (hw < HW)[None, :]
    c64, hw64 = c.to(tl.int64), hw.to(tl.int64)
    a = tl.load(a_ptr + b * C + c64, mask=c_ok, other=0.0)
    x = tl.load(x_ptr + b * sxb + c64[:, None] * sxc + hw64[None, :] * sxhw, mask=mask, other=0.0)
    y = x.to(tl.float32) * a[:, None]
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + b * srb + c64[:, None] * src + hw64[None, :] * srhw, mask=mask, other=0.0)
        y += r.to(tl.float32)
    tl.store(y_ptr + b * syb + c64[:, None] * syc + hw64[None, :] * syhw, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channel_scale_bwd(
    dy_ptr,       # (B, C, HW) upstream gradient, strides sdb, sdc, sdhw
    x_ptr,        # (B, C, HW) forward input, strides sxb, sxc, sxhw
    a_ptr,        # (B, C) float32 scale
    dx_ptr,       # (B, C, HW) output dx, strides sob, soc, sohw
    part_ptr,     # (SPLITS, B, C) float32 partial sums of dy * x, one row per HW split
    B, C, HW,
    sdb, sdc, sdhw, sxb, sxc, sxhw, sob, soc, sohw,
    n_c_blocks, hw_per_split,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """dx[b, c, p] = dy[b, c, p] * a[b, c];  da[b, c] = sum_p dy[b, c, p] * x[b, c, p].

    Each program owns (b, a block of channels, one split of HW) and loops over its positions;
    the partial sums go to their own row of part_ptr and are added in a fixed order on the host
    side, so da is deterministic (no atomics).
    """
    pid = tl.program_id(0).to(tl.int64)
    n_splits = tl.cdiv(HW, hw_per_split)
    b = pid // (n_c_blocks * n_splits)
    rest = pid % (n_c_blocks * n_splits)
    c = (rest // n_splits) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = rest % n_splits
    c_ok = c < C
    c64 = c.to(tl.int64)
    a = tl.load(a_ptr + b * C + c64, mask=c_ok, other=0.0)
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    hw_start = split * hw_per_split
    hw_end = tl.minimum(hw_start + hw_per_split, HW)
    for start in range(hw_start, hw_end, BLOCK_HW):
        hw64 = (start + tl.arange(0, BLOCK_HW)).to(tl.int64)
        mask = c_ok[:, None] & (hw64 < hw_end)[None, :]
        dy = tl.load(dy_ptr + b * sdb + c64[:, None] * sdc + hw64[None, :] * sdhw, mask=mask, other=0.0)
        x = tl.load(x_ptr + b * sxb + c64[:, None] * sxc + hw64[None, :] * sxhw, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        acc += dy * x.to(tl.float32)
        dx = dy * a[:, None]
        tl.store(dx_ptr + b * sob + c64[:, None] * soc + hw64[None, :] * sohw, dx.to(dx_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(part_ptr + (split * B + b) * C + c64, tl.sum(acc, axis=1), mask=c_ok)


def channel_scale_forward(x: torch.Tensor, a: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """y = x * a[:, :, None, None] (+ residual). x, residual: (B, C, H, W) with flattenable H x W;
    a: (B, C) float32 contiguous. Returns y in x's dtype and memory format."""
    B, C, H, W = x.shape
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    BLOCK_C, BLOCK_HW = tile_sizes(x)
    n_c, n_hw = triton.cdiv(C, BLOCK_C), triton.cdiv(H * W, BLOCK_HW)
    r = residual if residual is not None else x
    _channel_scale_fwd[(B * n_c * n_hw,)](
        x, a, r, y, C, H * W, *flat_strides(x), *flat_strides(r), *flat_strides(y), n_c, n_hw,
        HAS_RESIDUAL=residual is not None, BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW,
    )
    return y


def channel_scale_backward(dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, da): dx like x, da (B, C) float32 = sum over H x W of dy * x."""
    B, C, H, W = x.shape
    HW = H * W
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx, torch.zeros(B, C, device=x.device, dtype=torch.float32)
    BLOCK_C, BLOCK_HW = tile_sizes(x)
    n_c = triton.cdiv(C, BLOCK_C)
    hw_per_split = _hw_splits(x, B, n_c, HW, BLOCK_HW)
    splits = triton.cdiv(HW, hw_per_split)
    part = torch.empty(splits, B, C, device=x.device, dtype=torch.float32)
    _channel_scale_bwd[(B * n_c * splits,)](
        dy, x, a, dx, part, B, C, HW, *flat_strides(dy), *flat_strides(x), *flat_strides(dx), n_c, hw_per_split,
        BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW,
    )
    return dx, part.sum(0)


# ---------------------------------------------------------------------------------------------
# Channel x spatial gates: y = x * f(a[b, c], s[b, hw]) for the parallel / serial attentions.
# ---------------------------------------------------------------------------------------------

# Modes (constexpr ints): how the channel gate a and the spatial gate s combine.
MODES = {"max": 1, "add": 2, "bam": 3, "bam_sum": 4}   # x * a * s is spatial.py's spatial_scale


@triton.jit
def _combine(x, a, s, MODE: tl.constexpr):
    if MODE == 1:                                   # scSE (official): max(x * a, x * s)
        y = tl.maximum(x * a, x * s, propagate_nan=tl.PropagateNan.ALL)   # NaN wins, as torch.maximum
    elif MODE == 2:                                 # scSE (paper): x * a + x * s
        y = x * (a + s)
    elif MODE == 3:                                 # BAM: x * (1 + sigmoid(a * s))
        y = x * (1.0 + tl.sigmoid(a * s))
    else:                                           # BAM (paper): x * (1 + sigmoid(a + s))
        y = x * (1.0 + tl.sigmoid(a + s))
    return y


@triton.jit
def _channel_spatial_fwd(
    x_ptr,        # (B, C, HW) input, strides sxb, sxc, sxhw
    a_ptr,        # (B, C) float32 channel gate, contiguous
    s_ptr,        # (B, HW) float32 spatial gate, contiguous
    y_ptr,        # (B, C, HW) output, strides syb, syc, syhw
    C, HW,
    sxb, sxc, sxhw, syb, syc, syhw,
    n_c_blocks, n_hw_blocks,
    MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // (n_c_blocks * n_hw_blocks)
    rest = pid % (n_c_blocks * n_hw_blocks)
    c = ((rest // n_hw_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    hw = ((rest % n_hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)).to(tl.int64)
    c_ok, hw_ok = c < C, hw < HW
    mask = c_ok[:, None] & hw_ok[None, :]
    a = tl.load(a_ptr + b * C + c, mask=c_ok, other=0.0)[:, None]
    s = tl.load(s_ptr + b * HW + hw, mask=hw_ok, other=0.0)[None, :]
    x = tl.load(x_ptr + b * sxb + c[:, None] * sxc + hw[None, :] * sxhw, mask=mask, other=0.0).to(tl.float32)
    y = _combine(x, a, s, MODE)
    tl.store(y_ptr + b * syb + c[:, None] * syc + hw[None, :] * syhw, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channel_spatial_bwd(
    dy_ptr,       # (B, C, HW) upstream gradient, strides sdb, sdc, sdhw
    x_ptr,        # (B, C, HW) forward input, strides sxb, sxc, sxhw
    a_ptr,        # (B, C) float32 channel gate
    s_ptr,        # (B, HW) float32 spatial gate
    dx_ptr,       # (B, C, HW) output dx, strides sob, soc, sohw
    pa_ptr,       # (n_hw_blocks, B, C) float32 partial da, one row per HW block
    ps_ptr,       # (n_c_blocks, B, HW) float32 partial ds, one row per C block
    B, C, HW,
    sdb, sdc, sdhw, sxb, sxc, sxhw, sob, soc, sohw,
    n_c_blocks, n_hw_blocks,
    MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Gradients of y = x * f(a, s), per mode (t the pre-activation of the BAM modes, sg = sigmoid(t)):
        max:     the larger of x a, x s takes it: dx = dy a, da += dy x (a side) or dx = dy s, ds += dy x
        add:     dx = dy (a + s);           da = sum_hw dy x;             ds = sum_c dy x
        bam:     dx = dy (1 + sg);  dt = dy x sg (1 - sg);  da = sum_hw dt s;  ds = sum_c dt a
        bam_sum: dx = dy (1 + sg);  dt as above;            da = sum_hw dt;    ds = sum_c dt
    Each program owns one [BLOCK_C, BLOCK_HW] tile and writes its two partial sums to its own rows
    of pa and ps; the host adds the rows in a fixed order (deterministic, no atomics).
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // (n_c_blocks * n_hw_blocks)
    rest = pid % (n_c_blocks * n_hw_blocks)
    cb, hb = rest // n_hw_blocks, rest % n_hw_blocks
    c = (cb * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    hw = (hb * BLOCK_HW + tl.arange(0, BLOCK_HW)).to(tl.int64)
    c_ok, hw_ok = c < C, hw < HW
    mask = c_ok[:, None] & hw_ok[None, :]
    a = tl.load(a_ptr + b * C + c, mask=c_ok, other=0.0)[:, None]
    s = tl.load(s_ptr + b * HW + hw, mask=hw_ok, other=0.0)[None, :]
    x = tl.load(x_ptr + b * sxb + c[:, None] * sxc + hw[None, :] * sxhw, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + b * sdb + c[:, None] * sdc + hw[None, :] * sdhw, mask=mask, other=0.0).to(tl.float32)
    if MODE == 1:
        # torch.maximum's gradient: half to each side on a tie (x = 0 ties), all to both on a NaN
        xa = x * a
        xs = x * s
        wa = tl.where(xa == xs, 0.5, tl.where(xa < xs, 0.0, 1.0))
        ws = tl.where(xa == xs, 0.5, tl.where(xa > xs, 0.0, 1.0))
        dx = dy * (wa * a + ws * s)
        ga = wa * (dy * x)
        gs = ws * (dy * x)
    elif MODE == 2:
        dx = dy * (a + s)
        ga = dy * x
        gs = dy * x
    elif MODE == 3:
        sg = tl.sigmoid(a * s)
        dx = dy * (1.0 + sg)
        dt = dy * x * sg * (1.0 - sg)
        ga = dt * s
        gs = dt * a
    else:
        sg = tl.sigmoid(a + s)
        dx = dy * (1.0 + sg)
        dt = dy * x * sg * (1.0 - sg)
        ga = dt
        gs = dt
    ga = tl.where(mask, ga, 0.0)
    gs = tl.where(mask, gs, 0.0)
    tl.store(dx_ptr + b * sob + c[:, None] * soc + hw[None, :] * sohw, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(pa_ptr + (hb * B + b) * C + c, tl.sum(ga, axis=1), mask=c_ok)
    tl.store(ps_ptr + (cb * B + b) * HW + hw, tl.sum(gs, axis=0), mask=hw_ok)


def _combine_tiles(x: torch.Tensor) -> tuple[int, int]:
    """Tiles for the channel x spatial gates: both reductions need several channels and several
    positions per program, so that the partial sums stay a small fraction of x."""
    _, sc, shw = flat_strides(x)
    if sc == 1 and shw != 1:
        return 64, 16       # channels_last
    return 16, 128          # NCHW


def channel_spatial_forward(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, mode: str) -> torch.Tensor:
    """y = x * f(a, s) (see MODES). x (B, C, H, W) flattenable; a (B, C), s (B, H*W) float32 contiguous."""
    B, C, H, W = x.shape
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    BLOCK_C, BLOCK_HW = _combine_tiles(x)
    n_c, n_hw = triton.cdiv(C, BLOCK_C), triton.cdiv(H * W, BLOCK_HW)
    _channel_spatial_fwd[(B * n_c * n_hw,)](
        x, a, s, y, C, H * W, *flat_strides(x), *flat_strides(y), n_c, n_hw,
        MODE=MODES[mode], BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW,
    )
    return y


def channel_spatial_backward(dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, mode: str):
    """(dx, da, ds): dx like x; da (B, C) and ds (B, H*W) float32."""
    B, C, H, W = x.shape
    HW = H * W
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx, torch.zeros(B, C, device=x.device), torch.zeros(B, HW, device=x.device)
    BLOCK_C, BLOCK_HW = _combine_tiles(x)
    n_c, n_hw = triton.cdiv(C, BLOCK_C), triton.cdiv(HW, BLOCK_HW)
    pa = torch.empty(n_hw, B, C, device=x.device, dtype=torch.float32)
    ps = torch.empty(n_c, B, HW, device=x.device, dtype=torch.float32)
    _channel_spatial_bwd[(B * n_c * n_hw,)](
        dy, x, a, s, dx, pa, ps, B, C, HW, *flat_strides(dy), *flat_strides(x), *flat_strides(dx), n_c, n_hw,
        MODE=MODES[mode], BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW,
    )
    return dx, pa.sum(0), ps.sum(0)


# ---------------------------------------------------------------------------------------------
# Channel affine gate: y = x * sigmoid(alpha[b, c] * x + beta[b, c])  (NAM, SA-Net)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _affine_gate_fwd(
    x_ptr,        # (B, C, HW) input, strides sxb, sxc, sxhw
    al_ptr,       # (B, C) float32 slope, contiguous
    be_ptr,       # (B, C) float32 offset, contiguous
    y_ptr,        # (B, C, HW) output, strides syb, syc, syhw
    C, HW,
    sxb, sxc, sxhw, syb, syc, syhw,
    n_c_blocks, n_hw_blocks,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // (n_c_blocks * n_hw_blocks)
    rest = pid % (n_c_blocks * n_hw_blocks)
    c = ((rest // n_hw_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    hw = ((rest % n_hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)).to(tl.int64)
    c_ok = c < C
    mask = c_ok[:, None] & (hw < HW)[None, :]
    al = tl.load(al_ptr + b * C + c, mask=c_ok, other=0.0)[:, None]
    be = tl.load(be_ptr + b * C + c, mask=c_ok, other=0.0)[:, None]
    x = tl.load(x_ptr + b * sxb + c[:, None] * sxc + hw[None, :] * sxhw, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.sigmoid(al * x + be)
    tl.store(y_ptr + b * syb + c[:, None] * syc + hw[None, :] * syhw, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _affine_gate_bwd(
    dy_ptr,       # (B, C, HW) upstream gradient, strides sdb, sdc, sdhw
    x_ptr,        # (B, C, HW) forward input, strides sxb, sxc, sxhw
    al_ptr,       # (B, C) float32 slope
    be_ptr,       # (B, C) float32 offset
    dx_ptr,       # (B, C, HW) output dx, strides sob, soc, sohw
    pal_ptr,      # (SPLITS, B, C) float32 partial d alpha, one row per HW split
    pbe_ptr,      # (SPLITS, B, C) float32 partial d beta
    B, C, HW,
    sdb, sdc, sdhw, sxb, sxc, sxhw, sob, soc, sohw,
    n_c_blocks, hw_per_split,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """With s = sigmoid(alpha x + beta) and u = dy x s (1 - s):
        dx = dy s + u alpha;   d alpha = sum_hw u x;   d beta = sum_hw u.
    Partial sums per (HW split) row, added on the host (deterministic)."""
    pid = tl.program_id(0).to(tl.int64)
    n_splits = tl.cdiv(HW, hw_per_split)
    b = pid // (n_c_blocks * n_splits)
    rest = pid % (n_c_blocks * n_splits)
    c = ((rest // n_splits) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    split = rest % n_splits
    c_ok = c < C
    al = tl.load(al_ptr + b * C + c, mask=c_ok, other=0.0)[:, None]
    be = tl.load(be_ptr + b * C + c, mask=c_ok, other=0.0)[:, None]
    acc_al = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    acc_be = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    hw_start = split * hw_per_split
    hw_end = tl.minimum(hw_start + hw_per_split, HW)
    for start in range(hw_start, hw_end, BLOCK_HW):
        hw = (start + tl.arange(0, BLOCK_HW)).to(tl.int64)
        mask = c_ok[:, None] & (hw < hw_end)[None, :]
        dy = tl.load(dy_ptr + b * sdb + c[:, None] * sdc + hw[None, :] * sdhw, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + b * sxb + c[:, None] * sxc + hw[None, :] * sxhw, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(al * x + be)
        u = dy * x * s * (1.0 - s)
        acc_al += u * x
        acc_be += u
        tl.store(dx_ptr + b * sob + c[:, None] * soc + hw[None, :] * sohw, (dy * s + u * al).to(dx_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(pal_ptr + (split * B + b) * C + c, tl.sum(acc_al, axis=1), mask=c_ok)
    tl.store(pbe_ptr + (split * B + b) * C + c, tl.sum(acc_be, axis=1), mask=c_ok)


def affine_gate_forward(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """y = x * sigmoid(alpha x + beta); x (B, C, H, W) flattenable, alpha/beta (B, C) float32 contiguous."""
    B, C, H, W = x.shape
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    BLOCK_C, BLOCK_HW = tile_sizes(x)
    n_c, n_hw = triton.cdiv(C, BLOCK_C), triton.cdiv(H * W, BLOCK_HW)
    _affine_gate_fwd[(B * n_c * n_hw,)](
        x, alpha, beta, y, C, H * W, *flat_strides(x), *flat_strides(y), n_c, n_hw,
        BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW,
    )
    return y


def _hw_splits(x: torch.Tensor, B: int, n_c: int, HW: int, BLOCK_HW: int) -> int:
    """Positions per program for the per-(b, c) reductions: split HW when (b, c-block) alone
    would leave the device idle."""
    splits = max(1, min(triton.cdiv(HW, BLOCK_HW), num_programs_hint(x) // max(1, B * n_c)))
    return triton.cdiv(triton.cdiv(HW, splits), BLOCK_HW) * BLOCK_HW


def affine_gate_backward(dy: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor):
    """(dx, dalpha, dbeta): dx like x, dalpha and dbeta (B, C) float32."""
    B, C, H, W = x.shape
    HW = H * W
    dx = torch.empty_like(x)
    if x.numel() == 0:
        z = torch.zeros(B, C, device=x.device)
        return dx, z, z.clone()
    BLOCK_C, BLOCK_HW = tile_sizes(x)
    n_c = triton.cdiv(C, BLOCK_C)
    hw_per_split = _hw_splits(x, B, n_c, HW, BLOCK_HW)
    splits = triton.cdiv(HW, hw_per_split)
    pal = torch.empty(splits, B, C, device=x.device, dtype=torch.float32)
    pbe = torch.empty_like(pal)
    _affine_gate_bwd[(B * n_c * splits,)](
        dy, x, alpha, beta, dx, pal, pbe, B, C, HW, *flat_strides(dy), *flat_strides(x), *flat_strides(dx),
        n_c, hw_per_split, BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW,
    )
    return dx, pal.sum(0), pbe.sum(0)
