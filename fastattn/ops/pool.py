"""Channel pooling ops: per (b, c) statistics over the H x W plane.

- `channel_mean` (`fastattn::channel_mean`): global average pool, C++ CPU / CUDA C++ kernels.
- `channel_pool` (`fastattn::channel_pool`): any of mean, max, std (SRM's style pooling) of every
  plane in one read of x; backends "triton", "cuda" (CUDA C++), "cpu" (OpenMP C++), "torch".
- `dct_pool` (`fastattn::dct_pool`): y[b, c] = sum_{h, w} x[b, c, h, w] * weight[c, h, w], FcaNet's
  multi-spectral pool, differentiable in x and weight; backends "triton", "cuda", "cpu", "torch".

Each has its backward as a separate custom op (`fastattn::<name>_backward`) so that torch.compile
and torch.export see the whole training step; the Triton kernels live in fastattn.kernels.pool and
are imported only when that backend runs.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _ext
from ..reference._checks import check_feature_map, check_tensor, is_channels_last
from . import _dispatch
from ._common import acc_dtype, flat


def channel_mean_reference(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C) mean over H x W, fp32 accumulation for 16-bit inputs (pure PyTorch)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.mean(dim=(2, 3), dtype=acc).to(x.dtype)


def channel_mean_backend(x: Tensor) -> str:
    """Which implementation `fastattn::channel_mean` runs for x: 'cpu' (C++), 'cuda' (CUDA C++) or 'torch'."""
    if x.device.type == "cpu" and _ext.available():
        return "cpu"
    if x.device.type == "cuda" and _ext.has_cuda_kernels():
        return "cuda"
    return "torch"


@_dispatch.custom_op("fastattn::channel_mean", mutates_args=())
def _channel_mean(x: Tensor) -> Tensor:
    if channel_mean_backend(x) != "torch":
        return torch.ops.fastattn_C.channel_mean(x)
    return channel_mean_reference(x)


@_channel_mean.register_fake
def _(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[:2])


def _setup_context(ctx, inputs, output):
    (x,) = inputs
    # Only the shape is needed: nothing of x is saved.
    ctx.x_shape = x.shape


def _backward(ctx, grad):
    # dx[b, c, h, w] = dy[b, c] / (H * W): a broadcast view, as torch's own mean backward returns.
    B, C, H, W = ctx.x_shape
    return (grad / (H * W)).reshape(B, C, 1, 1).expand(B, C, H, W)


_channel_mean.register_autograd(_backward, setup_context=_setup_context)


def channel_mean(x: Tensor) -> Tensor:
    """Global average pool: (B, C, H, W) -> (B, C), in x's dtype, accumulated in fp32.

    Runs the OpenMP C++ kernel on CPU tensors and the CUDA C++ kernel on CUDA tensors when
    fastattn._C has them (NCHW and channels_last read in place), else PyTorch. Differentiable; torch.compile sees one opaque op.
    """
    check_feature_map("channel_mean", x)
    return (_channel_mean.plain if _dispatch.direct(channel_mean_backend(x), x) else _channel_mean)(x)


# ------------------------------------------------------------------------------------------------
# channel_pool: mean / max / std of every (b, c) plane in one read of x
# ------------------------------------------------------------------------------------------------

POOL_KINDS = ("mean", "max", "std")
CHANNEL_POOL = "channel_pool"
DCT_POOL = "dct_pool"
# channel_pool's backends (CHECKS, the name bench/ reads) and dct_pool's.
CHECKS = {"triton": _dispatch.triton_reason,
          "cuda": _dispatch.cuda_kernel("channel_pool", "channel_pool_backward"),
          "cpu": _dispatch.cpu_kernel("channel_pool", "channel_pool_backward")}
DCT_CHECKS = {"triton": _dispatch.triton_reason,
              "cuda": _dispatch.cuda_kernel("dct_pool", "dct_pool_backward"),
              "cpu": _dispatch.cpu_kernel("dct_pool", "dct_pool_backward")}




def _flat_weight(w: Tensor) -> Tensor:
    """A (C, H, W) weight whose H x W flattens (itself, or a contiguous copy)."""
    return flat(w.unsqueeze(0)).squeeze(0)


def _format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


@_dispatch.custom_op("fastattn::channel_pool", mutates_args=(),
                         schema="(Tensor x, str[] kinds, float eps, str backend) -> Tensor[]")
def _channel_pool(x: Tensor, kinds: list[str], eps: float, backend: str) -> list[Tensor]:
    # Returns the pooled (B, C) tensors in the order of kinds, in x's dtype, then what the
    # backward needs: the int64 argmax when "max" is pooled, the mean and std in the accumulation
    # dtype (fp32; fp64 for fp64 x) when "std" is. channel_pool() hands back the first len(kinds).
    if backend in ("cpu", "cuda"):     # the C++ / CUDA C++ kernels return exactly these outputs
        return list(torch.ops.fastattn_C.channel_pool(x, list(kinds), eps))
    with_max, with_std = "max" in kinds, "std" in kinds
    if backend == "triton":
        from fastattn.kernels.pool import channel_pool_forward

        mean, vmax, argmax, std = channel_pool_forward(flat(x), with_max, with_std, eps)
    else:
        planes = x.flatten(2)
        x_acc = planes.to(acc_dtype(x.dtype))
        mean = x_acc.mean(2)
        std = None
        if with_std:    # (an empty x has no degrees of freedom to warn about)
            var = x_acc.var(2, correction=1) if x.numel() else x_acc.new_full(x.shape[:2], math.nan)
            std = (var + eps).sqrt()
        vmax, argmax = planes.max(2) if with_max else (None, None)
    pooled = {"mean": mean, "max": vmax, "std": std}
    outs = [pooled[k].to(x.dtype, copy=True) for k in kinds]    # never aliases of the aux
    if with_max:
        outs.append(argmax)
    if with_std:
        outs += [mean, std]
    return outs


@_channel_pool.register_fake
def _(x, kinds, eps, backend):
    B, C = x.shape[:2]
    outs = [x.new_empty(B, C) for _ in kinds]
    if "max" in kinds:
        outs.append(x.new_empty(B, C, dtype=torch.int64))
    if "std" in kinds:
        outs += [x.new_empty(B, C, dtype=acc_dtype(x.dtype)) for _ in range(2)]
    return outs


@torch.library.custom_op("fastattn::channel_pool_backward", mutates_args=())
def _channel_pool_backward(dmean: Tensor | None, dmax: Tensor | None, dstd: Tensor | None,
                           argmax: Tensor | None, x: Tensor | None, mean: Tensor | None, std: Tensor | None,
                           size: Sequence[int], channels_last: bool, backend: str) -> Tensor:
    # dx (size, in the dtype of the given gradients, channels_last or NCHW) from the gradients of
    # the pooled (B, C) statistics; a None gradient is a statistic not pooled (or without gradient).
    # dmax needs argmax; dstd needs x and the forward mean and std (accumulation dtype).
    if backend in ("cpu", "cuda"):     # a, k and the argmax gradient folded in the kernel
        return torch.ops.fastattn_C.channel_pool_backward(dmean, dmax, dstd, argmax, x, mean, std, list(size),
                                                          channels_last)
    grads = [g for g in (dmean, dmax, dstd) if g is not None]
    B, C, H, W = size
    HW = H * W
    dtype, device = grads[0].dtype, grads[0].device
    acc = acc_dtype(dtype)
    dx = torch.empty(size, dtype=dtype, device=device, memory_format=_format(channels_last))
    a = dmean.to(acc).div(HW).contiguous() if dmean is not None else None
    k = (dstd.to(acc) / ((HW - 1) * std.to(acc))).contiguous() if dstd is not None else None
    if backend == "triton":
        from fastattn.kernels.pool import channel_pool_backward

        return channel_pool_backward(
            dx, a, dmax.to(acc).contiguous() if dmax is not None else None,
            argmax.contiguous() if dmax is not None else None,
            k, mean.to(acc).contiguous() if k is not None else None, flat(x) if k is not None else None,
        )
    d = torch.zeros(B, C, HW, dtype=acc, device=device)
    if a is not None:
        d += a[:, :, None]
    if k is not None:
        d += k[:, :, None] * (x.flatten(2).to(acc) - mean.to(acc)[:, :, None])
    if dmax is not None:
        d.scatter_add_(2, argmax[:, :, None], dmax.to(acc)[:, :, None])
    return dx.copy_(d.view(B, C, H, W))


@_channel_pool_backward.register_fake
def _(dmean, dmax, dstd, argmax, x, mean, std, size, channels_last, backend):
    g = next(t for t in (dmean, dmax, dstd) if t is not None)
    return torch.empty(size, dtype=g.dtype, device=g.device, memory_format=_format(channels_last))


def _channel_pool_setup(ctx, inputs, output):
    x, kinds, eps, backend = inputs
    ctx.kinds, ctx.backend = list(kinds), backend
    ctx.size, ctx.channels_last = tuple(x.shape), is_channels_last(x)
    n = len(kinds)
    saved = [None, None, None, None]                 # argmax, x, mean, std: only what backward reads
    if "max" in kinds:
        # kept as int32 (half the bytes) when every flat index fits; widened again in backward
        HW = x.shape[2] * x.shape[3]
        saved[0] = output[n].to(torch.int32) if HW <= torch.iinfo(torch.int32).max else output[n]
    if "std" in kinds:
        saved[1:] = [x, output[-2], output[-1]]
    ctx.save_for_backward(*saved)


def _channel_pool_bwd(ctx, grads):
    argmax, x, mean, std = ctx.saved_tensors
    if argmax is not None and ctx.backend not in ("cpu", "cuda"):     # the kernels read int32 as well
        argmax = argmax.to(torch.int64)
    g = dict(zip(ctx.kinds, grads))                  # grads of the pooled outputs (the rest are aux)
    dmean, dmax, dstd = g.get("mean"), g.get("max"), g.get("std")
    if dmean is None and dmax is None and dstd is None:
        return None, None, None, None
    if dmax is None and dstd is None:
        # mean alone: dx = dy / HW broadcast, a view (as torch's own mean backward)
        B, C, H, W = ctx.size
        return (dmean / (H * W)).reshape(B, C, 1, 1).expand(B, C, H, W), None, None, None
    dx = torch.ops.fastattn.channel_pool_backward(
        dmean, dmax, dstd, argmax if dmax is not None else None, x if dstd is not None else None,
        mean if dstd is not None else None, std if dstd is not None else None,
        list(ctx.size), ctx.channels_last, ctx.backend,
    )
    return dx, None, None, None


_channel_pool.register_autograd(_channel_pool_bwd, setup_context=_channel_pool_setup)


def channel_pool(x: Tensor, kinds: Sequence[str], eps: float = 1e-5, *,
                 backend: str | None = None) -> tuple[Tensor, ...]:
    """Per-channel statistics of x over H x W, all in one read of x.

    x: (B, C, H, W) float, NCHW, channels_last or any strided view. kinds: a non-empty sequence of
    distinct names from ("mean", "max", "std"), in any order. Returns one (B, C) tensor per kind,
    in that order, in x's dtype (accumulated in fp32, fp64 for fp64 x):
      - "mean": mean over H x W;
      - "max":  max over H x W (NaN propagates); its gradient goes to the first position holding it;
      - "std":  sqrt(unbiased variance over H x W + eps), as SRM's style pooling (needs H * W >= 2).
    Differentiable in x. Autograd saves the argmax (B, C) for "max" (int32 when H * W < 2**31), and x with the fp32
    mean and std (B, C) for "std"; nothing for "mean".
    backend: None (the process default, see fastattn.set_backend), "auto", "triton", "cuda" (CUDA C++
    kernels), "cpu" (OpenMP C++ kernels), "torch".
    """
    check_feature_map(CHANNEL_POOL, x)
    if isinstance(kinds, str) or not isinstance(kinds, Sequence):
        raise TypeError(f"{CHANNEL_POOL}: argument 'kinds' must be a sequence of names from {POOL_KINDS}, "
                        f"e.g. ('mean', 'max'), got {kinds!r}")
    kinds = list(kinds)
    if not kinds or any(k not in POOL_KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"{CHANNEL_POOL}: argument 'kinds' must be a non-empty sequence of distinct names from "
                         f"{POOL_KINDS}, got {kinds!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{CHANNEL_POOL}: argument 'eps' must be a finite number >= 0, got {eps!r}")
    HW = x.shape[2] * x.shape[3]
    if "max" in kinds and HW < 1:
        raise ValueError(f"{CHANNEL_POOL}: argument 'x' must have H * W >= 1 for kind 'max', "
                         f"got H x W = {x.shape[2]} x {x.shape[3]}")
    if "std" in kinds and HW < 2:
        raise ValueError(f"{CHANNEL_POOL}: argument 'x' must have H * W >= 2 for kind 'std' (unbiased variance), "
                         f"got H x W = {x.shape[2]} x {x.shape[3]}")
    outs = _dispatch.run(_channel_pool, x, kinds, float(eps), _dispatch.resolve(CHANNEL_POOL, x, backend, CHECKS))
    return tuple(outs[:len(kinds)])


# ------------------------------------------------------------------------------------------------
# dct_pool: y[b, c] = sum_{h, w} x[b, c, h, w] * weight[c, h, w]
# ------------------------------------------------------------------------------------------------


@_dispatch.custom_op("fastattn::dct_pool", mutates_args=())
def _dct_pool(x: Tensor, weight: Tensor, backend: str) -> Tensor:
    if backend in ("cpu", "cuda"):
        return torch.ops.fastattn_C.dct_pool(x, weight)
    if backend == "triton":
        from fastattn.kernels.pool import dct_pool_forward

        return dct_pool_forward(flat(x), _flat_weight(weight)).to(x.dtype)
    acc = acc_dtype(x.dtype)
    return (x.to(acc) * weight.to(acc)).sum(dim=(2, 3)).to(x.dtype)


@_dct_pool.register_fake
def _(x, weight, backend):
    return x.new_empty(x.shape[:2])


@torch.library.custom_op("fastattn::dct_pool_backward", mutates_args=())
def _dct_pool_backward(dy: Tensor, weight: Tensor, x: Tensor | None, size: Sequence[int], channels_last: bool,
                       need_dx: bool, backend: str) -> list[Tensor]:
    # [dx] if need_dx (size, dy's dtype, channels_last or NCHW), then [dweight] if x is given
    # (weight's shape, dtype and strides): dx = dy[b, c] * weight[c], dweight = sum_b dy[b, c] * x[b, c].
    if backend in ("cpu", "cuda"):
        return list(torch.ops.fastattn_C.dct_pool_backward(dy, weight, x, list(size), channels_last, need_dx))
    acc = acc_dtype(dy.dtype)
    dx = torch.empty(size, dtype=dy.dtype, device=dy.device, memory_format=_format(channels_last)) if need_dx else None
    dw = torch.empty_like(weight) if x is not None else None
    dy_acc = dy.to(acc).contiguous()
    if backend == "triton":
        from fastattn.kernels.pool import dct_pool_backward

        dw_acc = dct_pool_backward(dy_acc, _flat_weight(weight), flat(x) if x is not None else None, dx)
    else:
        if dx is not None:
            dx.copy_(dy_acc[:, :, None, None] * weight.to(acc))
        dw_acc = (dy_acc[:, :, None, None] * x.to(acc)).sum(0) if x is not None else None
    outs = [dx] if need_dx else []
    if dw is not None:
        outs.append(dw.copy_(dw_acc))
    return outs


@_dct_pool_backward.register_fake
def _(dy, weight, x, size, channels_last, need_dx, backend):
    fmt = _format(channels_last)
    outs = [torch.empty(size, dtype=dy.dtype, device=dy.device, memory_format=fmt)] if need_dx else []
    if x is not None:
        outs.append(torch.empty_like(weight))
    return outs


def _dct_pool_setup(ctx, inputs, output):
    x, weight, backend = inputs
    ctx.backend, ctx.size, ctx.channels_last = backend, tuple(x.shape), is_channels_last(x)
    ctx.need_dx, ctx.need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # weight is (C, H, W), a buffer or parameter kept alive by its module anyway; x only for dweight
    ctx.save_for_backward(weight, x if ctx.need_dw else None)


def _dct_pool_bwd(ctx, dy):
    weight, x = ctx.saved_tensors
    outs = torch.ops.fastattn.dct_pool_backward(dy, weight, x, list(ctx.size), ctx.channels_last, ctx.need_dx,
                                                ctx.backend)
    dx = outs[0] if ctx.need_dx else None
    dw = outs[-1] if ctx.need_dw else None
    return dx, dw, None


_dct_pool.register_autograd(_dct_pool_bwd, setup_context=_dct_pool_setup)


def dct_pool(x: Tensor, weight: Tensor, *, backend: str | None = None) -> Tensor:
    """Weighted spatial sum per channel (FcaNet's multi-spectral DCT pool), in one read of x:
    y[b, c] = sum_{h, w} x[b, c, h, w] * weight[c, h, w].

    x: (B, C, H, W) float, NCHW, channels_last or any strided view; weight: (C, H, W) float (any
    float dtype; usually a fixed buffer). Returns (B, C) in x's dtype, accumulated in fp32 (fp64
    for fp64 x). Differentiable in x (dx = dy[b, c] * weight[c, h, w]) and in weight
    (dweight = sum_b dy[b, c] * x[b, c], deterministic). Autograd saves weight, and x only when
    weight needs a gradient.
    backend: None (the process default, see fastattn.set_backend), "auto", "triton", "cuda" (CUDA C++
    kernels), "cpu" (OpenMP C++ kernels), "torch".
    """
    check_feature_map(DCT_POOL, x)
    check_tensor(DCT_POOL, "weight", weight, dim=3, shape_hint="(C, H, W)")
    if weight.shape != x.shape[1:]:
        raise ValueError(f"{DCT_POOL}: argument 'weight' must have shape (C, H, W) = {tuple(x.shape[1:])}, "
                         f"got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"{DCT_POOL}: argument 'weight' must be on x's device {x.device}, got {weight.device}")
    return _dispatch.run(_dct_pool, x, weight, _dispatch.resolve(DCT_POOL, x, backend, DCT_CHECKS))
