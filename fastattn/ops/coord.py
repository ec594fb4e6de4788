"""Coordinate attention ops: the two directional pools and the two-axis scale.

    coord_pool(x)             -> (x_h, x_w): x_h[b, c, h] = mean_w x,  x_w[b, c, w] = mean_h x
    coord_scale(x, a_h, a_w)  -> y = x * a_w[b, c, w] * a_h[b, c, h]

Between them, CoordinateAttention runs its 1x1 convolutions, batch norm and activations on the
small (B, C, H + W) tensors in PyTorch. Saved for backward: nothing for coord_pool (its adjoint
needs only the shapes), x, a_h and a_w for coord_scale (nothing of the size of x is created).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _dispatch
from ._common import acc_dtype, flat, like

# Both ops share their backends: the C++ kernels of fastattn._C (CPU and CUDA) and Triton.
_RAW = ("coord_pool", "coord_pool_backward", "coord_scale", "coord_scale_backward")
CHECKS = {"triton": _dispatch.triton_reason,
          "cuda": _dispatch.cuda_kernel(*_RAW),
          "cpu": _dispatch.cpu_kernel(*_RAW)}


# --------------------------------------------------------------------------- coord_pool

@_dispatch.custom_op("fastattn::coord_pool", mutates_args=())
def _coord_pool(x: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        from fastattn.kernels.coord import coord_pool_forward

        return coord_pool_forward(x)          # any strides: the kernel walks x with its four strides
    if backend in ("cpu", "cuda"):           # the C++ kernels: any strides, contiguous means in x's dtype
        return torch.ops.fastattn_C.coord_pool(x)
    acc = acc_dtype(x.dtype)
    # contiguous outputs whatever x's layout (a channels_last x gives permuted means)
    return x.mean(dim=3, dtype=acc).to(x.dtype).contiguous(), x.mean(dim=2, dtype=acc).to(x.dtype).contiguous()


@_coord_pool.register_fake
def _(x, backend):
    B, C, H, W = x.shape
    return x.new_empty((B, C, H)), x.new_empty((B, C, W))


@torch.library.custom_op("fastattn::coord_pool_backward", mutates_args=())
def _coord_pool_backward(dxh: Tensor, dxw: Tensor, channels_last: bool, backend: str) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if backend == "triton":
        from fastattn.kernels.coord import coord_pool_backward

        return coord_pool_backward(dxh, dxw, fmt)
    if backend in ("cpu", "cuda"):
        return torch.ops.fastattn_C.coord_pool_backward(dxh, dxw.to(dxh.dtype), channels_last)
    B, C, H = dxh.shape
    W = dxw.shape[2]
    acc = acc_dtype(dxh.dtype)
    dx = dxh.to(acc)[:, :, :, None] / W + dxw.to(acc)[:, :, None, :] / H
    return dx.to(dxh.dtype, memory_format=fmt)


@_coord_pool_backward.register_fake
def _(dxh, dxw, channels_last, backend):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    B, C, H = dxh.shape
    return torch.empty((B, C, H, dxw.shape[2]), dtype=dxh.dtype, device=dxh.device, memory_format=fmt)


def _pool_setup_context(ctx, inputs, output):
    from ..reference._checks import is_channels_last

    x, backend = inputs
    # Only shapes (carried by the gradients) and the layout of dx are needed: nothing is saved.
    ctx.channels_last = is_channels_last(x)
    ctx.backend = backend


def _pool_backward(ctx, dxh, dxw):
    dx = torch.ops.fastattn.coord_pool_backward(dxh, dxw, ctx.channels_last, ctx.backend)
    return dx, None


_coord_pool.register_autograd(_pool_backward, setup_context=_pool_setup_context)


def coord_pool(x: Tensor, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Directional average pools of coordinate attention, from one read of x.

    x: (B, C, H, W) float, any layout. Returns (x_h, x_w): x_h (B, C, H) = mean over W,
    x_w (B, C, W) = mean over H, contiguous, in x's dtype (accumulated in fp32, fp64 for fp64).
    Backward: dx[b, c, h, w] = dx_h[b, c, h] / W + dx_w[b, c, w] / H, in x's memory format.
    backend: None (the process default, see fastattn.set_backend), "auto", "triton", "cuda"
    (the CUDA C++ kernels), "cpu" (the OpenMP C++ kernels, CPU tensors), "torch".
    """
    from ..reference._checks import check_feature_map

    check_feature_map("coord_pool", x)
    return _dispatch.run(_coord_pool, x, _dispatch.resolve("coord_pool", x, backend, CHECKS))


# --------------------------------------------------------------------------- coord_scale

@_dispatch.custom_op("fastattn::coord_scale", mutates_args=())
def _coord_scale(x: Tensor, a_h: Tensor, a_w: Tensor, backend: str) -> Tensor:
    if backend == "triton":
        from fastattn.kernels.coord import coord_scale_forward

        return like(coord_scale_forward(flat(x), a_h, a_w), x)    # a copy only for a copied exotic view
    acc = acc_dtype(x.dtype)
    if backend in ("cpu", "cuda"):           # the C++ kernels: any strides, y like torch.empty_like(x)
        return torch.ops.fastattn_C.coord_scale(x, a_h.to(acc).contiguous(), a_w.to(acc).contiguous())
    y = x.to(acc) * a_w.to(acc)[:, :, None, :] * a_h.to(acc)[:, :, :, None]
    return like(y, x)


@_coord_scale.register_fake
def _(x, a_h, a_w, backend):
    return torch.empty_like(x)


@torch.library.custom_op("fastattn::coord_scale_backward", mutates_args=())
def _coord_scale_backward(dy: Tensor, x: Tensor, a_h: Tensor, a_w: Tensor,
                          backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        from fastattn.kernels.coord import coord_scale_backward

        return coord_scale_backward(dy, x, a_h, a_w)     # any strides: walked with four strides
    acc = acc_dtype(x.dtype)
    if backend in ("cpu", "cuda"):           # the C++ kernels: dx like torch.empty_like(x), gates' grads in acc
        dx, dah, daw = torch.ops.fastattn_C.coord_scale_backward(
            dy.to(x.dtype), x, a_h.to(acc).contiguous(), a_w.to(acc).contiguous())
        return dx, dah.to(a_h.dtype), daw.to(a_w.dtype)
    g = dy.to(acc)
    ah, aw = a_h.to(acc)[:, :, :, None], a_w.to(acc)[:, :, None, :]
    dx = like(g * aw * ah, x)
    gx = g * x.to(acc)
    dah = (gx * aw).sum(dim=3).to(a_h.dtype).contiguous()
    daw = (gx * ah).sum(dim=2).to(a_w.dtype).contiguous()
    return dx, dah, daw


@_coord_scale_backward.register_fake
def _(dy, x, a_h, a_w, backend):
    return torch.empty_like(x), a_h.new_empty(a_h.shape), a_w.new_empty(a_w.shape)


def _scale_setup_context(ctx, inputs, output):
    x, a_h, a_w, backend = inputs
    ctx.save_for_backward(x, a_h, a_w)
    ctx.backend = backend


def _scale_backward(ctx, dy):
    x, a_h, a_w = ctx.saved_tensors
    dx, dah, daw = torch.ops.fastattn.coord_scale_backward(dy, x, a_h, a_w, ctx.backend)
    return dx, dah, daw, None


_coord_scale.register_autograd(_scale_backward, setup_context=_scale_setup_context)


def coord_scale(x: Tensor, a_h: Tensor, a_w: Tensor, *, backend: str | None = None) -> Tensor:
    """y = x * a_h[:, :, :, None] * a_w[:, :, None, :], the gate of coordinate attention, in one pass.

    x: (B, C, H, W) float, NCHW or channels_last (other views: the Triton backend copies them, the
    C++ kernels walk them with their strides); a_h: (B, C, H) and
    a_w: (B, C, W), already activated, any float dtype. Returns (B, C, H, W) in x's dtype and
    memory format, computed in fp32 (fp64 for fp64 x). Backward: dx = dy * a_h * a_w,
    da_h = sum_w dy * x * a_w, da_w = sum_h dy * x * a_h (deterministic); saves x, a_h, a_w.
    backend: None (the process default, see fastattn.set_backend), "auto", "triton", "cuda"
    (the CUDA C++ kernels), "cpu" (the OpenMP C++ kernels, CPU tensors), "torch".
    """
    from ..reference._checks import check_feature_map, check_tensor

    op = "coord_scale"
    check_feature_map(op, x)
    B, C, H, W = x.shape
    for name, a, n, axis in (("a_h", a_h, H, "H"), ("a_w", a_w, W, "W")):
        check_tensor(op, name, a, dim=3, shape_hint=f"(B, C, {axis})")
        if a.shape != (B, C, n):
            raise ValueError(f"{op}: argument '{name}' must have shape (B, C, {axis}) = {(B, C, n)}, "
                             f"got {tuple(a.shape)}")
        if a.device != x.device:
            raise ValueError(f"{op}: argument '{name}' must be on x's device {x.device}, got {a.device}")
    return _dispatch.run(_coord_scale, x, a_h, a_w, _dispatch.resolve(op, x, backend, CHECKS))
