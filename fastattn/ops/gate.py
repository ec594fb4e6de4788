"""Channel scale op: y = x * a[b, c] (+ residual), the gate of every channel attention.

`a` is the activated gate (sigmoid, hard-sigmoid, 1 + sigmoid, ...), computed by the caller on
the small (B, C) tensor; the op does the passes over the feature map. Backward: dx = dy * a,
da = sum over H x W of dy * x, d(residual) = dy. Saved for backward: x and a (nothing of the
size of x is created for it).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _dispatch

OP = "channel_scale"
CHECKS = {"triton": _dispatch.triton_reason}


def _acc_dtype(t: Tensor) -> torch.dtype:
    """fp32 accumulation for 16/32-bit inputs, fp64 for fp64 (gradcheck)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _flat(t: Tensor) -> Tensor:
    from fastattn.kernels._layout import flattenable

    return flattenable(t)


@torch.library.custom_op("fastattn::channel_scale", mutates_args=())
def _channel_scale(x: Tensor, a: Tensor, residual: Tensor | None, backend: str) -> Tensor:
    if backend == "triton":
        from fastattn.kernels.gate import channel_scale_forward

        r = _flat(residual) if residual is not None else None
        return channel_scale_forward(_flat(x), a.float().contiguous(), r)
    acc = _acc_dtype(x)
    y = x.to(acc) * a.to(acc)[:, :, None, None]
    if residual is not None:
        y = y + residual.to(acc)
    return y.to(x.dtype)


@_channel_scale.register_fake
def _(x, a, residual, backend):
    return torch.empty_like(x)


@torch.library.custom_op("fastattn::channel_scale_backward", mutates_args=())
def _channel_scale_backward(dy: Tensor, x: Tensor, a: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        from fastattn.kernels.gate import channel_scale_backward

        dx, da = channel_scale_backward(_flat(dy), _flat(x), a.float().contiguous())
        return dx, da.to(a.dtype)
    acc = _acc_dtype(x)
    dy_acc = dy.to(acc)
    dx = (dy_acc * a.to(acc)[:, :, None, None]).to(x.dtype)
    da = (dy_acc * x.to(acc)).sum(dim=(2, 3)).to(a.dtype)
    return dx, da


@_channel_scale_backward.register_fake
def _(dy, x, a, backend):
    return torch.empty_like(x), a.new_empty(a.shape)


def _setup_context(ctx, inputs, output):
    x, a, residual, backend = inputs
    ctx.save_for_backward(x, a)
    ctx.backend = backend
    ctx.has_residual = residual is not None


def _backward(ctx, dy):
    x, a = ctx.saved_tensors
    dx, da = torch.ops.fastattn.channel_scale_backward(dy, x, a, ctx.backend)
    return dx, da, (dy if ctx.has_residual else None), None


_channel_scale.register_autograd(_backward, setup_context=_setup_context)


def channel_scale(x: Tensor, a: Tensor, residual: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """y = x * a[:, :, None, None] (+ residual), in one pass over x.

    x: (B, C, H, W) float, NCHW or channels_last; a: (B, C) scale (already activated);
    residual: None or like x. Returns (B, C, H, W) in x's dtype and memory format.
    backend: None (the process default, see fastattn.set_backend), "auto", "triton", "torch".
    """
    from ..reference._checks import check_feature_map, check_same_shape, check_tensor

    check_feature_map(OP, x)
    check_tensor(OP, "a", a, dim=2, shape_hint="(B, C)")
    if a.shape != x.shape[:2]:
        raise ValueError(f"{OP}: argument 'a' must have shape (B, C) = {tuple(x.shape[:2])}, got {tuple(a.shape)}")
    if residual is not None:
        check_tensor(OP, "residual", residual, dim=4)
        check_same_shape(OP, "residual", residual, "x", x)
    return _channel_scale(x, a, residual, _dispatch.resolve(OP, x, backend, CHECKS))
