"""Softmax across K branches, then their weighted sum (Selective Kernel's selection) or the weighted
branches concatenated on channels (EPSANet's PyramidSplitAttention, in reversed branch order).

    sum:   y[b, c, p] = sum_k a[b, k, c] * feats[b, k, c, p],   a = softmax over k of the (B, K, C) logits
    scale: y[b, j * C + c, p] = a[b, k, c] * feats[b, k, c, p],  j = K - 1 - k (reverse) or k

The softmax runs on the small (B, K, C) tensor in PyTorch; these kernels do the passes over the
(B, K, C, H, W) branch features. feats is addressed as (B, K, C, HW) with strides (sb, sk, sc, shw),
so both ways the branches are usually stacked read in place: torch.stack of NCHW maps (hw
contiguous) and torch.stack of channels_last maps (c contiguous; each position holds K rows of C).
A program loads a [BLOCK_K, BLOCK_C, BLOCK_HW] tile (every branch of a block of channels and
positions), so feats is read once and nothing is accumulated across launches.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import flat_strides, flattenable, num_programs_hint

# Elements of the [BLOCK_K, BLOCK_C, BLOCK_HW] feature tile, forward and backward (the backward keeps
# dy and a [BLOCK_K, BLOCK_C] accumulator as well); module globals so tests can shrink them.
TILE = 4096
TILE_BWD = 2048


@triton.jit
def _branch_sum_fwd(
    f_ptr,        # (B, K, C, HW) branch features, strides sfb, sfk, sfc, sfhw
    a_ptr,        # (B, K, C) ACC softmax weights, contiguous
    y_ptr,        # (B, C, HW) output, strides syb, syc, syhw
    K, C, HW,
    sfb, sfk, sfc, sfhw, syb, syc, syhw,
    n_c_blocks, n_hw_blocks,
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)      # = (b * n_c_blocks + c block) * n_hw_blocks + hw block
    b = pid // (n_c_blocks * n_hw_blocks)
    rest = pid % (n_c_blocks * n_hw_blocks)
    k64 = tl.arange(0, BLOCK_K).to(tl.int64)
    c64 = (rest // n_hw_blocks) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    hw64 = (rest % n_hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW).to(tl.int64)
    k_ok, c_ok, p_ok = k64 < K, c64 < C, hw64 < HW
    a = tl.load(a_ptr + (b * K + k64[:, None]) * C + c64[None, :], mask=k_ok[:, None] & c_ok[None, :], other=0.0)
    mask3 = k_ok[:, None, None] & c_ok[None, :, None] & p_ok[None, None, :]
    f = tl.load(f_ptr + b * sfb + k64[:, None, None] * sfk + c64[None, :, None] * sfc + hw64[None, None, :] * sfhw,
                mask=mask3, other=0.0)
    y = tl.sum(a[:, :, None] * f.to(ACC), axis=0)
    tl.store(y_ptr + b * syb + c64[:, None] * syc + hw64[None, :] * syhw, y.to(y_ptr.dtype.element_ty),
             mask=c_ok[:, None] & p_ok[None, :])


@triton.jit
def _branch_sum_bwd(
    dy_ptr,       # (B, C, HW) upstream gradient, strides sdb, sdc, sdhw
    f_ptr,        # (B, K, C, HW) branch features, strides sfb, sfk, sfc, sfhw
    a_ptr,        # (B, K, C) ACC softmax weights, contiguous
    df_ptr,       # (B, K, C, HW) output d(feats), strides sob, sok, soc, sohw
    part_ptr,     # (SPLITS, B, K, C) ACC partial sums over each split of HW of dy * feats
    B, K, C, HW,
    sdb, sdc, sdhw, sfb, sfk, sfc, sfhw, sob, sok, soc, sohw,
    n_c_blocks, hw_per_split,
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """dfeats[b, k, c, p] = dy[b, c, p] * a[b, k, c];  s[b, k, c] = sum_p dy[b, c, p] * feats[b, k, c, p].

    The host finishes dlogits = a * (s - sum_k a * s) (the softmax Jacobian) on the (B, K, C) tensor.
    Each program owns (b, a block of channels, one split of HW) and loops over its positions; its
    partial sums go to their own row of part_ptr, added in a fixed order on the host (deterministic).
    """
    pid = tl.program_id(0).to(tl.int64)      # = (b * n_c_blocks + c block) * n_splits + split
    n_splits = tl.cdiv(HW, hw_per_split)
    b = pid // (n_c_blocks * n_splits)
    rest = pid % (n_c_blocks * n_splits)
    split = rest % n_splits
    k64 = tl.arange(0, BLOCK_K).to(tl.int64)
    c64 = (rest // n_splits) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    k_ok, c_ok = k64 < K, c64 < C
    kc_ok = k_ok[:, None] & c_ok[None, :]
    a = tl.load(a_ptr + (b * K + k64[:, None]) * C + c64[None, :], mask=kc_ok, other=0.0)
    acc = tl.zeros([BLOCK_K, BLOCK_C], dtype=ACC)
    hw_start = split * hw_per_split
    hw_end = tl.minimum(hw_start + hw_per_split, HW)
    for start in range(hw_start, hw_end, BLOCK_HW):
        hw64 = (start + tl.arange(0, BLOCK_HW)).to(tl.int64)
        p_ok = hw64 < hw_end
        dy = tl.load(dy_ptr + b * sdb + c64[:, None] * sdc + hw64[None, :] * sdhw,
                     mask=c_ok[:, None] & p_ok[None, :], other=0.0).to(ACC)
        mask3 = kc_ok[:, :, None] & p_ok[None, None, :]
        f = tl.load(f_ptr + b * sfb + k64[:, None, None] * sfk + c64[None, :, None] * sfc + hw64[None, None, :] * sfhw,
                    mask=mask3, other=0.0)
        acc += tl.sum(f.to(ACC) * dy[None, :, :], axis=2)
        df = a[:, :, None] * dy[None, :, :]
        tl.store(df_ptr + b * sob + k64[:, None, None] * sok + c64[None, :, None] * soc + hw64[None, None, :] * sohw,
                 df.to(df_ptr.dtype.element_ty), mask=mask3)
    tl.store(part_ptr + ((split * B + b) * K + k64[:, None]) * C + c64[None, :], acc, mask=kc_ok)


@triton.jit
def _branch_scale_fwd(
    f_ptr,        # (B, K, C, HW) branch features, strides sfb, sfk, sfc, sfhw
    a_ptr,        # (B, K, C) ACC softmax weights, contiguous
    y_ptr,        # (B, K * C, HW) output, strides syb, syc, syhw; branch k at channels j*C.., j = K-1-k if REVERSE
    K, C, HW,
    sfb, sfk, sfc, sfhw, syb, syc, syhw,
    n_c_blocks, n_hw_blocks,
    REVERSE: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)      # = (b * n_c_blocks + c block) * n_hw_blocks + hw block
    b = pid // (n_c_blocks * n_hw_blocks)
    rest = pid % (n_c_blocks * n_hw_blocks)
    k64 = tl.arange(0, BLOCK_K).to(tl.int64)
    c64 = (rest // n_hw_blocks) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    hw64 = (rest % n_hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW).to(tl.int64)
    k_ok, c_ok, p_ok = k64 < K, c64 < C, hw64 < HW
    a = tl.load(a_ptr + (b * K + k64[:, None]) * C + c64[None, :], mask=k_ok[:, None] & c_ok[None, :], other=0.0)
    mask3 = k_ok[:, None, None] & c_ok[None, :, None] & p_ok[None, None, :]
    f = tl.load(f_ptr + b * sfb + k64[:, None, None] * sfk + c64[None, :, None] * sfc + hw64[None, None, :] * sfhw,
                mask=mask3, other=0.0)
    y = a[:, :, None] * f.to(ACC)
    if REVERSE:
        j64 = K - 1 - k64
    else:
        j64 = k64
    yc = j64[:, None] * C + c64[None, :]
    tl.store(y_ptr + b * syb + yc[:, :, None] * syc + hw64[None, None, :] * syhw, y.to(y_ptr.dtype.element_ty),
             mask=mask3)


@triton.jit
def _branch_scale_bwd(
    dy_ptr,       # (B, K * C, HW) upstream gradient (branch order as in the forward), strides sdb, sdc, sdhw
    f_ptr,        # (B, K, C, HW) branch features, strides sfb, sfk, sfc, sfhw
    a_ptr,        # (B, K, C) ACC softmax weights, contiguous
    df_ptr,       # (B, K, C, HW) output d(feats), strides sob, sok, soc, sohw
    part_ptr,     # (SPLITS, B, K, C) ACC partial sums over each split of HW of dy_k * feats_k
    B, K, C, HW,
    sdb, sdc, sdhw, sfb, sfk, sfc, sfhw, sob, sok, soc, sohw,
    n_c_blocks, hw_per_split,
    REVERSE: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """With dy_k the upstream gradient of branch k's channels:
    dfeats[b, k, c, p] = dy_k[b, c, p] * a[b, k, c];  s[b, k, c] = sum_p dy_k[b, c, p] * feats[b, k, c, p],
    and dlogits = a * (s - sum_k a * s) on the host. Partial sums per HW split, as _branch_sum_bwd.
    """
    pid = tl.program_id(0).to(tl.int64)      # = (b * n_c_blocks + c block) * n_splits + split
    n_splits = tl.cdiv(HW, hw_per_split)
    b = pid // (n_c_blocks * n_splits)
    rest = pid % (n_c_blocks * n_splits)
    split = rest % n_splits
    k64 = tl.arange(0, BLOCK_K).to(tl.int64)
    c64 = (rest // n_splits) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    k_ok, c_ok = k64 < K, c64 < C
    kc_ok = k_ok[:, None] & c_ok[None, :]
    a = tl.load(a_ptr + (b * K + k64[:, None]) * C + c64[None, :], mask=kc_ok, other=0.0)
    if REVERSE:
        j64 = K - 1 - k64
    else:
        j64 = k64
    yc = j64[:, None] * C + c64[None, :]
    acc = tl.zeros([BLOCK_K, BLOCK_C], dtype=ACC)
    hw_start = split * hw_per_split
    hw_end = tl.minimum(hw_start + hw_per_split, HW)
    for start in range(hw_start, hw_end, BLOCK_HW):
        hw64 = (start + tl.arange(0, BLOCK_HW)).to(tl.int64)
        mask3 = kc_ok[:, :, None] & (hw64 < hw_end)[None, None, :]
        dy = tl.load(dy_ptr + b * sdb + yc[:, :, None] * sdc + hw64[None, None, :] * sdhw, mask=mask3, other=0.0)
        dy = dy.to(ACC)
        f = tl.load(f_ptr + b * sfb + k64[:, None, None] * sfk + c64[None, :, None] * sfc + hw64[None, None, :] * sfhw,
                    mask=mask3, other=0.0)
        acc += tl.sum(f.to(ACC) * dy, axis=2)
        df = a[:, :, None] * dy
        tl.store(df_ptr + b * sob + k64[:, None, None] * sok + c64[None, :, None] * soc + hw64[None, None, :] * sohw,
                 df.to(df_ptr.dtype.element_ty), mask=mask3)
    tl.store(part_ptr + ((split * B + b) * K + k64[:, None]) * C + c64[None, :], acc, mask=kc_ok)


def flat_strides5(t: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(sb, sk, sc, shw) of a (B, K, C, H, W) tensor whose H and W flatten into one strided axis, else None."""
    _, _, _, H, W = t.shape
    sb, sk, sc, sh, sw = t.stride()
    if H == 1:
        return sb, sk, sc, sw
    if W == 1:
        return sb, sk, sc, sh
    if sh == W * sw:
        return sb, sk, sc, sw
    return None


def _blocks(strides: tuple[int, int, int, int], K: int, C: int, HW: int, tile: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_C, BLOCK_HW): all branches; wide along whichever of c or hw is contiguous."""
    _, _, sc, shw = strides
    block_k = triton.next_power_of_2(K)
    per_k = max(1, tile // block_k)
    if sc == 1 and shw != 1:                     # channels_last branches: rows of channels are contiguous
        block_c = min(triton.next_power_of_2(C), 64, per_k)
        block_hw = min(triton.next_power_of_2(HW), max(1, per_k // block_c))
    else:                                        # NCHW branches: planes are contiguous
        block_hw = min(triton.next_power_of_2(HW), 1024, per_k)
        block_c = min(triton.next_power_of_2(C), max(1, per_k // block_hw))
    return block_k, block_c, block_hw


def _warps(block: int) -> int:
    """Warps per program for a tile of `block` feature elements (about 110 registers per thread for the
    backward kernels on sm_90 at 2048 elements)."""
    return 8 if block >= 2048 else 4


def _acc(t: torch.Tensor) -> tuple[torch.dtype, object]:
    return (torch.float64, tl.float64) if t.dtype == torch.float64 else (torch.float32, tl.float32)


def _forward(feats: torch.Tensor, a: torch.Tensor, y: torch.Tensor, reverse: bool | None) -> torch.Tensor:
    B, K, C, H, W = feats.shape
    HW = H * W
    if y.numel() == 0:
        return y
    if flat_strides5(feats) is None:
        feats = feats.contiguous()
    fs = flat_strides5(feats)
    block_k, block_c, block_hw = _blocks(fs, K, C, HW, TILE)
    n_c, n_hw = triton.cdiv(C, block_c), triton.cdiv(HW, block_hw)
    kernel, extra = (_branch_sum_fwd, {}) if reverse is None else (_branch_scale_fwd, {"REVERSE": reverse})
    kernel[(B * n_c * n_hw,)](
        feats, a, y, K, C, HW, *fs, *flat_strides(y), n_c, n_hw,
        ACC=_acc(feats)[1], BLOCK_K=block_k, BLOCK_C=block_c, BLOCK_HW=block_hw,
        num_warps=_warps(block_k * block_c * block_hw), **extra,
    )
    return y


def _backward(dy: torch.Tensor, feats: torch.Tensor, a: torch.Tensor,
              reverse: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    B, K, C, H, W = feats.shape
    HW = H * W
    df = torch.empty_like(feats)
    acc_dtype, ACC = _acc(feats)
    if df.numel() == 0:
        return df, torch.zeros(B, K, C, device=feats.device, dtype=acc_dtype)
    fk = feats if flat_strides5(feats) is not None else feats.contiguous()
    dfk = df if flat_strides5(df) is not None else torch.empty_like(fk)
    dy = flattenable(dy)
    fs = flat_strides5(fk)
    block_k, block_c, block_hw = _blocks(fs, K, C, HW, TILE_BWD)
    n_c = triton.cdiv(C, block_c)
    # Split HW when (b, c-block) alone would leave the device idle.
    splits = max(1, min(triton.cdiv(HW, block_hw), num_programs_hint(feats) // max(1, B * n_c)))
    hw_per_split = triton.cdiv(triton.cdiv(HW, splits), block_hw) * block_hw
    splits = triton.cdiv(HW, hw_per_split)
    part = torch.empty(splits, B, K, C, device=feats.device, dtype=acc_dtype)
    kernel, extra = (_branch_sum_bwd, {}) if reverse is None else (_branch_scale_bwd, {"REVERSE": reverse})
    kernel[(B * n_c * splits,)](
        dy, fk, a, dfk, part, B, K, C, HW, *flat_strides(dy), *fs, *flat_strides5(dfk), n_c, hw_per_split,
        ACC=ACC, BLOCK_K=block_k, BLOCK_C=block_c, BLOCK_HW=block_hw,
        num_warps=_warps(block_k * block_c * block_hw), **extra,
    )
    if dfk is not df:
        df.copy_(dfk)
    return df, part.sum(0)


def branch_sum_forward(feats: torch.Tensor, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y = sum_k a[:, k, :, None, None] * feats[:, k], written into y and returned. feats: (B, K, C, H, W)
    any strides (copied only when H x W does not flatten); a: (B, K, C) contiguous in the accumulation
    dtype (float32, float64 for float64 feats); y: (B, C, H, W) NCHW or channels_last, feats' dtype."""
    return _forward(feats, a, y, None)


def branch_sum_backward(dy: torch.Tensor, feats: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dfeats like torch.empty_like(feats), s (B, K, C) = sum over H x W of dy * feats[:, k], in the
    accumulation dtype). dy: (B, C, H, W), any strides."""
    return _backward(dy, feats, a, None)


def branch_scale_forward(feats: torch.Tensor, a: torch.Tensor, y: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The weighted branches concatenated on channels, written into y (B, K * C, H, W) (NCHW or
    channels_last) and returned: y[:, j*C:(j+1)*C] = a[:, k, :, None, None] * feats[:, k] with
    j = K - 1 - k when reverse (PyramidSplitAttention's order), else j = k."""
    return _forward(feats, a, y, bool(reverse))


def branch_scale_backward(dy: torch.Tensor, feats: torch.Tensor, a: torch.Tensor,
                          reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dfeats like torch.empty_like(feats), s (B, K, C) = sum over H x W of dy_k * feats[:, k]), dy_k the
    channels of dy (B, K * C, H, W) that branch k was written to."""
    return _backward(dy, feats, a, bool(reverse))
