"""Spatial attention ops: channel pooling per pixel, and the per-pixel gate.

- `spatial_pool(x, a)`: [max, mean] over the channels of `x * a[b, c]` without writing x * a
  (CBAM's spatial pool of the channel-gated map; Triplet attention's hw branch with a=None).
- `spatial_scale(x, a, s)`: `x * a[b, c] * s[b, 0, h, w]` in one pass (CBAM, scSE, BAM gates).
- `zpool(x, dim)`: Triplet attention's Z-pool over dim 1, 2 or 3, in the layout the official
  code pools after its permutes (no permuted copy of x is made).

Backends: "triton" (kernels/spatial.py), "cpu" and "cuda" (the C++ / CUDA kernels of fastattn._C:
csrc/cpu/spatial.cpp, csrc/cuda/spatial.cu, one pass over x per op and direction), "torch".

Max ties (measure zero on random inputs): the forward keeps the FIRST channel reaching the
max (as torch.argmax) and the backward sends the whole max gradient to it, where torch.amax's
own backward would split it evenly among the tied channels.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _dispatch
from ._common import acc_dtype

# One set of raw kernels serves the family (zpool is the pool over another dim): every op needs all four.
_RAW = ("spatial_pool", "spatial_pool_backward", "spatial_scale", "spatial_scale_backward")
CHECKS = {"triton": _dispatch.triton_reason,
          "cpu": _dispatch.cpu_kernel(*_RAW),
          "cuda": _dispatch.cuda_kernel(*_RAW)}
_NATIVE = ("cpu", "cuda")      # the C++ / CUDA kernels of fastattn._C (torch.ops.fastattn_C)


def _acc(t: Tensor | None, x: Tensor) -> Tensor | None:
    """A small operand (a, s) as the native kernels take it: x's accumulation dtype, contiguous."""
    return None if t is None else t.to(acc_dtype(x)).contiguous()


def _pool_format(x: Tensor) -> torch.memory_format:
    """spatial_pool's output keeps x's memory format (channels_last in, channels_last out)."""
    from ..reference._checks import is_channels_last

    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def _zview(x: Tensor, dim: int) -> Tensor:
    """A view of x whose dim 1 is the pooled axis and dims 2, 3 the layout of the pooled map:
    dim 1 -> (B, C, H, W); dim 2 -> (B, H, C, W) (the official permute(0, 2, 1, 3) of the cw
    branch); dim 3 -> (B, W, H, C) (the official permute(0, 3, 2, 1) of the hc branch)."""
    return x if dim == 1 else x.permute(0, 2, 1, 3) if dim == 2 else x.permute(0, 3, 2, 1)


def _pool_out(xv: Tensor, memory_format: torch.memory_format) -> Tensor:
    B, _, H, W = xv.shape
    return torch.empty((B, 2, H, W), device=xv.device, dtype=xv.dtype, memory_format=memory_format)


def _pool_torch(xv: Tensor, a: Tensor | None, y: Tensor) -> Tensor:
    """Reference math of the pool (in fp32, fp64 for fp64): fills y, returns the int32 argmax (B, H * W)."""
    v = xv.to(acc_dtype(xv))
    if a is not None:
        v = v * a.to(v.dtype)[:, :, None, None]
    y[:, 0].copy_(v.amax(1))
    y[:, 1].copy_(v.mean(1))
    return v.argmax(1).to(torch.int32).flatten(1)       # first maximal channel, as the Triton kernel


def _pool_backward_torch(dy: Tensor, xv: Tensor, a: Tensor | None, idx: Tensor, dxv: Tensor) -> Tensor | None:
    """Fills dxv, returns da (B, C) in the accumulation dtype (None when a is None)."""
    B, C, H, W = xv.shape
    dy = dy.to(acc_dtype(xv))
    g = torch.zeros(B, C, H, W, device=xv.device, dtype=dy.dtype)
    g.scatter_(1, idx.view(B, 1, H, W).long(), dy[:, :1])
    g = g + dy[:, 1:2] / C
    if a is None:
        dxv.copy_(g)
        return None
    dxv.copy_(g * a.to(g.dtype)[:, :, None, None])
    return (g * xv.to(g.dtype)).sum((2, 3))


# --------------------------------------------------------------------------------------
# spatial_pool
# --------------------------------------------------------------------------------------


@_dispatch.custom_op("fastattn::spatial_pool", mutates_args=())
def _spatial_pool(x: Tensor, a: Tensor | None, backend: str) -> tuple[Tensor, Tensor]:
    if backend in _NATIVE:
        return torch.ops.fastattn_C.spatial_pool(x, _acc(a, x), 1)
    y = _pool_out(x, _pool_format(x))
    if backend == "triton":
        from fastattn.kernels.spatial import spatial_pool_forward

        return y, spatial_pool_forward(x, a, y)
    return y, _pool_torch(x, a, y)


@_spatial_pool.register_fake
def _(x, a, backend):
    B, _, H, W = x.shape
    return _pool_out(x, _pool_format(x)), x.new_empty((B, H * W), dtype=torch.int32)


@torch.library.custom_op("fastattn::spatial_pool_backward", mutates_args=())
def _spatial_pool_backward(dy: Tensor, x: Tensor, a: Tensor | None, idx: Tensor, backend: str
                           ) -> tuple[Tensor, Tensor]:
    if backend in _NATIVE:
        dx, da = torch.ops.fastattn_C.spatial_pool_backward(dy.to(x.dtype), x, _acc(a, x), idx.contiguous(), 1)
        return dx, (da.to(a.dtype) if a is not None else x.new_empty(0))
    dx = torch.empty_like(x)
    if backend == "triton":
        from fastattn.kernels.spatial import spatial_pool_backward

        da = spatial_pool_backward(dy, x, a, idx, dx)
    else:
        da = _pool_backward_torch(dy, x, a, idx, dx)
    return dx, (da.to(a.dtype) if a is not None else x.new_empty(0))


@_spatial_pool_backward.register_fake
def _(dy, x, a, idx, backend):
    return torch.empty_like(x), (a.new_empty(a.shape) if a is not None else x.new_empty(0))


def _pool_setup_context(ctx, inputs, output):
    x, a, backend = inputs
    _, idx = output
    # x and a are the op's inputs (no new memory); idx is B*H*W int32. x * a is never stored.
    ctx.save_for_backward(x, a, idx)
    ctx.backend = backend


def _pool_backward(ctx, dy, _didx):
    x, a, idx = ctx.saved_tensors
    dx, da = torch.ops.fastattn.spatial_pool_backward(dy, x, a, idx, ctx.backend)
    return dx, (da if a is not None else None), None


_spatial_pool.register_autograd(_pool_backward, setup_context=_pool_setup_context)


def spatial_pool(x: Tensor, a: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """[max, mean] over the channels of x * a[:, :, None, None], without materialising x * a.

    x: (B, C, H, W) float, C >= 1, any layout (NCHW, channels_last, strided views: no copy);
    a: (B, C) channel scale (e.g. CBAM's sigmoid channel gate) or None (a = 1).
    Returns (B, 2, H, W) in x's dtype and memory format: channel 0 the max, channel 1 the mean
    (the official CBAM order).

    Backward: dx = a * g and da = sum_hw x * g with g = dy_mean / C + dy_max at the argmax
    channel. Autograd saves x, a (the inputs) and the argmax channel per pixel (int32, B*H*W);
    ties: the first channel reaching the max gets the whole max gradient.
    backend: None (the process default, see fastattn.set_backend), "auto", "triton", "cpu" (the
    OpenMP C++ kernels of fastattn._C, CPU tensors), "cuda" (its CUDA C++ kernels), "torch".
    """
    op = "spatial_pool"
    _check_x(op, x, 1)
    if a is not None:
        _check_a(op, a, x)
    y, _ = _dispatch.run(_spatial_pool, x, a, _dispatch.resolve(op, x, backend, CHECKS))
    return y


# --------------------------------------------------------------------------------------
# zpool
# --------------------------------------------------------------------------------------


def _zpool_format(x: Tensor, dim: int) -> torch.memory_format:
    return _pool_format(x) if dim == 1 else torch.contiguous_format


@_dispatch.custom_op("fastattn::zpool", mutates_args=())
def _zpool(x: Tensor, dim: int, backend: str) -> tuple[Tensor, Tensor]:
    if backend in _NATIVE:
        return torch.ops.fastattn_C.spatial_pool(x, None, dim)
    xv = _zview(x, dim)
    y = _pool_out(xv, _zpool_format(x, dim))
    if backend == "triton":
        from fastattn.kernels.spatial import spatial_pool_forward

        return y, spatial_pool_forward(xv, None, y)
    return y, _pool_torch(xv, None, y)


@_zpool.register_fake
def _(x, dim, backend):
    xv = _zview(x, dim)
    B, _, H, W = xv.shape
    return _pool_out(xv, _zpool_format(x, dim)), x.new_empty((B, H * W), dtype=torch.int32)


@torch.library.custom_op("fastattn::zpool_backward", mutates_args=())
def _zpool_backward(dy: Tensor, x: Tensor, idx: Tensor, dim: int, backend: str) -> Tensor:
    if backend in _NATIVE:
        return torch.ops.fastattn_C.spatial_pool_backward(dy.to(x.dtype), x, None, idx.contiguous(), dim)[0]
    dx = torch.empty_like(x)
    if backend == "triton":
        from fastattn.kernels.spatial import spatial_pool_backward

        spatial_pool_backward(dy, _zview(x, dim), None, idx, _zview(dx, dim))
    else:
        _pool_backward_torch(dy, _zview(x, dim), None, idx, _zview(dx, dim))
    return dx


@_zpool_backward.register_fake
def _(dy, x, idx, dim, backend):
    return torch.empty_like(x)


def _zpool_setup_context(ctx, inputs, output):
    x, dim, backend = inputs
    # x is saved for its shape, dtype and strides only (it is the op's input: no new memory).
    ctx.save_for_backward(x, output[1])
    ctx.dim, ctx.backend = dim, backend


def _zpool_backward_fn(ctx, dy, _didx):
    x, idx = ctx.saved_tensors
    return torch.ops.fastattn.zpool_backward(dy, x, idx, ctx.dim, ctx.backend), None, None


_zpool.register_autograd(_zpool_backward_fn, setup_context=_zpool_setup_context)


def zpool(x: Tensor, dim: int, *, backend: str | None = None) -> Tensor:
    """Triplet attention's Z-pool: [max, mean] over dimension `dim` of x, stacked on a new dim 1,
    in the layout of the maps the official TripletAttention convolves:

    - dim=1 (hw branch): (B, 2, H, W), x's memory format (= spatial_pool(x));
    - dim=2 (cw branch, official permute(0, 2, 1, 3) then pool): (B, 2, C, W), contiguous;
    - dim=3 (hc branch, official permute(0, 3, 2, 1) then pool): (B, 2, H, C), contiguous.

    x: (B, C, H, W) float, any layout; x.shape[dim] >= 1. No permuted copy of x is made: the
    kernels read x through the permuted strides. Backward: dx = dy_mean / n + dy_max at the
    argmax (n = x.shape[dim]); autograd saves x (the input) and the argmax (int32) per output
    pixel; ties: the first index reaching the max gets the whole max gradient.
    backend: None (the process default), "auto", "triton", "cpu", "cuda", "torch".
    """
    op = "zpool"
    if isinstance(dim, bool) or not isinstance(dim, int) or dim not in (1, 2, 3):
        raise ValueError(f"{op}: argument 'dim' must be 1, 2 or 3 (the C, H or W dimension of x), got {dim!r}")
    _check_x(op, x, dim)
    y, _ = _dispatch.run(_zpool, x, dim, _dispatch.resolve(op, x, backend, CHECKS))
    return y


# --------------------------------------------------------------------------------------
# spatial_scale
# --------------------------------------------------------------------------------------


@_dispatch.custom_op("fastattn::spatial_scale", mutates_args=())
def _spatial_scale(x: Tensor, a: Tensor | None, s: Tensor, backend: str) -> Tensor:
    if backend in _NATIVE:
        return torch.ops.fastattn_C.spatial_scale(x, _acc(a, x), _acc(s, x))
    if backend == "triton":
        from fastattn.kernels.spatial import spatial_scale_forward

        return spatial_scale_forward(x, a, s)
    v = x.to(acc_dtype(x))
    if a is not None:
        v = v * a.to(v.dtype)[:, :, None, None]
    return torch.empty_like(x).copy_(v * s.to(v.dtype))


@_spatial_scale.register_fake
def _(x, a, s, backend):
    return torch.empty_like(x)


@torch.library.custom_op("fastattn::spatial_scale_backward", mutates_args=())
def _spatial_scale_backward(dy: Tensor, x: Tensor, a: Tensor | None, s: Tensor, backend: str
                            ) -> tuple[Tensor, Tensor, Tensor]:
    if backend in _NATIVE:
        dx, da, ds = torch.ops.fastattn_C.spatial_scale_backward(dy.to(x.dtype), x, _acc(a, x), _acc(s, x))
        return dx, (da.to(a.dtype) if a is not None else x.new_empty(0)), ds.to(s.dtype)
    if backend == "triton":
        from fastattn.kernels.spatial import spatial_scale_backward

        dx, da, ds = spatial_scale_backward(dy, x, a, s)
    else:
        acc = acc_dtype(x)
        dy32, x32, s32 = dy.to(acc), x.to(acc), s.to(acc)
        t = dy32 * x32
        if a is not None:
            a32 = a.to(acc)[:, :, None, None]
            dx = torch.empty_like(x).copy_(dy32 * a32 * s32)
            da = (t * s32).sum((2, 3))
            ds = (t * a32).sum(1, keepdim=True)
        else:
            dx, da = torch.empty_like(x).copy_(dy32 * s32), None
            ds = t.sum(1, keepdim=True)
        ds = ds.contiguous()
    da = da.to(a.dtype) if a is not None else x.new_empty(0)
    return dx, da, ds.to(s.dtype)


@_spatial_scale_backward.register_fake
def _(dy, x, a, s, backend):
    B, _, H, W = x.shape
    da = a.new_empty(a.shape) if a is not None else x.new_empty(0)
    return torch.empty_like(x), da, s.new_empty((B, 1, H, W))


def _scale_setup_context(ctx, inputs, output):
    x, a, s, backend = inputs
    ctx.save_for_backward(x, a, s)       # the inputs only: nothing of x's size is created for backward
    ctx.backend = backend


def _scale_backward(ctx, dy):
    x, a, s = ctx.saved_tensors
    dx, da, ds = torch.ops.fastattn.spatial_scale_backward(dy, x, a, s, ctx.backend)
    return dx, (da if a is not None else None), ds, None


_spatial_scale.register_autograd(_scale_backward, setup_context=_scale_setup_context)


def spatial_scale(x: Tensor, a: Tensor | None, s: Tensor, *, backend: str | None = None) -> Tensor:
    """y = x * a[:, :, None, None] * s, in one pass over x.

    x: (B, C, H, W) float, any layout; a: (B, C) channel scale or None (a = 1); s: (B, 1, H, W)
    spatial scale, already activated (e.g. sigmoid(bn(conv(spatial_pool(x, a))))).
    Returns (B, C, H, W) in x's dtype and memory format.

    Backward: dx = dy * a * s, da[b, c] = sum_hw dy * x * s, ds[b, 0, h, w] = sum_c dy * x * a.
    The Triton backward reads dy and x once: each program owns (sample, channel split, pixel
    block), writes dx, and writes partial rows of da (one per pixel block) and of ds (one per
    channel split), summed on the host in a fixed order: deterministic, no atomics. ds comes back
    contiguous. Autograd saves x, a and s (the inputs; nothing new).
    backend: None (the process default, see fastattn.set_backend), "auto", "triton", "cpu" (the
    OpenMP C++ kernels of fastattn._C, CPU tensors), "cuda" (its CUDA C++ kernels), "torch".
    """
    op = "spatial_scale"
    _check_x(op, x, None)
    if a is not None:
        _check_a(op, a, x)
    from ..reference._checks import check_tensor

    check_tensor(op, "s", s, dim=4, shape_hint="(B, 1, H, W)")
    want = (x.shape[0], 1, x.shape[2], x.shape[3])
    if tuple(s.shape) != want:
        raise ValueError(f"{op}: argument 's' must have shape (B, 1, H, W) = {want}, got {tuple(s.shape)}")
    _check_device(op, "s", s, x)
    return _dispatch.run(_spatial_scale, x, a, s, _dispatch.resolve(op, x, backend, CHECKS))


# --------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------


def _check_x(op: str, x, pooled_dim: int | None) -> None:
    from ..reference._checks import check_feature_map

    check_feature_map(op, x)
    # Pooling over an empty dimension is undefined (torch.amax raises); an empty output is fine.
    if pooled_dim is not None and x.shape[pooled_dim] == 0 and all(
            n > 0 for i, n in enumerate(x.shape) if i != pooled_dim):
        raise ValueError(f"{op}: argument 'x' must have a non-empty dimension {pooled_dim} to pool over, "
                         f"got shape {tuple(x.shape)}")


def _check_a(op: str, a, x: Tensor) -> None:
    from ..reference._checks import check_tensor

    check_tensor(op, "a", a, dim=2, shape_hint="(B, C)")
    if a.shape != x.shape[:2]:
        raise ValueError(f"{op}: argument 'a' must have shape (B, C) = {tuple(x.shape[:2])}, got {tuple(a.shape)}")
    _check_device(op, "a", a, x)


def _check_device(op: str, name: str, t: Tensor, x: Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{op}: argument '{name}' must be on x's device {x.device}, got {t.device}")
