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
from ._common import acc_dtype, flat, like

OP = "channel_scale"


def _checks(*raw_ops: str) -> dict:
    """The backends of an op whose C++ kernels (CPU and CUDA) are torch.ops.fastattn_C.<raw_ops>."""
    return {"triton": _dispatch.triton_reason, "cuda": _dispatch.cuda_kernel(*raw_ops),
            "cpu": _dispatch.cpu_kernel(*raw_ops)}


CHECKS = _checks("channel_scale", "channel_scale_backward")       # channel_scale's backends



@_dispatch.custom_op("fastattn::channel_scale", mutates_args=())
def _channel_scale(x: Tensor, a: Tensor, residual: Tensor | None, backend: str) -> Tensor:
    if backend == "triton":
        from fastattn.kernels.gate import channel_scale_forward

        r = flat(residual) if residual is not None else None
        return like(channel_scale_forward(flat(x), a.float().contiguous(), r), x)
    acc = acc_dtype(x)
    if backend in ("cpu", "cuda"):     # the C++ kernels: any strides, y like torch.empty_like(x)
        r = residual.to(x.dtype) if residual is not None else None
        return torch.ops.fastattn_C.channel_scale(x, a.to(acc).contiguous(), r)
    y = x.to(acc) * a.to(acc)[:, :, None, None]
    if residual is not None:
        y = y + residual.to(acc)
    return like(y.to(x.dtype), x)


@_channel_scale.register_fake
def _(x, a, residual, backend):
    return torch.empty_like(x)


@torch.library.custom_op("fastattn::channel_scale_backward", mutates_args=())
def _channel_scale_backward(dy: Tensor, x: Tensor, a: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        from fastattn.kernels.gate import channel_scale_backward

        dx, da = channel_scale_backward(flat(dy), flat(x), a.float().contiguous())
        return like(dx, x), da.to(a.dtype)
    acc = acc_dtype(x)
    if backend in ("cpu", "cuda"):     # the C++ kernels: dx like torch.empty_like(x), da in acc
        dx, da = torch.ops.fastattn_C.channel_scale_backward(dy.to(x.dtype), x, a.to(acc).contiguous())
        return dx, da.to(a.dtype)
    dy_acc = dy.to(acc)
    dx = like((dy_acc * a.to(acc)[:, :, None, None]).to(x.dtype), x)
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
    backend: None (the process default, see fastattn.set_backend), "auto", "triton", "cuda"
    (the CUDA C++ kernels of fastattn._C), "cpu" (its OpenMP C++ kernels, CPU tensors), "torch".
    """
    from ..reference._checks import check_feature_map, check_same_shape, check_tensor

    check_feature_map(OP, x)
    check_tensor(OP, "a", a, dim=2, shape_hint="(B, C)")
    if a.shape != x.shape[:2]:
        raise ValueError(f"{OP}: argument 'a' must have shape (B, C) = {tuple(x.shape[:2])}, got {tuple(a.shape)}")
    if residual is not None:
        check_tensor(OP, "residual", residual, dim=4)
        check_same_shape(OP, "residual", residual, "x", x)
    return _dispatch.run(_channel_scale, x, a, residual, _dispatch.resolve(OP, x, backend, CHECKS))


# ---------------------------------------------------------------------------------------------
# channel_spatial_gate: y = x * f(a[b, c], s[b, 0, h, w]) in one pass (scSE, BAM; CBAM's x * a * s is spatial_scale)
# ---------------------------------------------------------------------------------------------

CS_OP = "channel_spatial_gate"
CS_MODES = ("max", "add", "bam", "bam_sum")   # x * a * s (CBAM) is fastattn.ops.spatial_scale
CS_CHECKS = _checks("channel_spatial_gate", "channel_spatial_gate_backward")


def _combine_torch(x: Tensor, a: Tensor, s: Tensor, mode: str) -> Tensor:
    """The reference math of every mode on (B, C, 1, 1) a and (B, 1, H, W) s."""
    if mode == "max":
        return torch.maximum(x * a, x * s)
    if mode == "add":
        return x * a + x * s
    t = a * s if mode == "bam" else a + s
    return x * (1 + torch.sigmoid(t))


@_dispatch.custom_op("fastattn::channel_spatial_gate", mutates_args=())
def _channel_spatial_gate(x: Tensor, a: Tensor, s: Tensor, mode: str, backend: str) -> Tensor:
    if backend == "triton":
        from fastattn.kernels.gate import channel_spatial_forward

        B, _, H, W = x.shape
        y = channel_spatial_forward(flat(x), a.float().contiguous(), s.float().reshape(B, H * W).contiguous(), mode)
        return like(y, x)
    acc = acc_dtype(x)
    if backend in ("cpu", "cuda"):     # the C++ kernels: any strides, y like torch.empty_like(x)
        return torch.ops.fastattn_C.channel_spatial_gate(x, a.to(acc).contiguous(), s.to(acc).contiguous(), mode)
    return like(_combine_torch(x.to(acc), a.to(acc)[:, :, None, None], s.to(acc), mode).to(x.dtype), x)


@_channel_spatial_gate.register_fake
def _(x, a, s, mode, backend):
    return torch.empty_like(x)


@torch.library.custom_op("fastattn::channel_spatial_gate_backward", mutates_args=())
def _channel_spatial_gate_backward(dy: Tensor, x: Tensor, a: Tensor, s: Tensor, mode: str,
                                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        from fastattn.kernels.gate import channel_spatial_backward

        B, _, H, W = x.shape
        dx, da, ds = channel_spatial_backward(flat(dy), flat(x), a.float().contiguous(),
                                              s.float().reshape(B, H * W).contiguous(), mode)
        return like(dx, x), da.to(a.dtype), ds.reshape(s.shape).to(s.dtype)
    acc = acc_dtype(x)
    if backend in ("cpu", "cuda"):     # one pass: dx like torch.empty_like(x), da (B, C), ds (B, 1, H, W)
        dx, da, ds = torch.ops.fastattn_C.channel_spatial_gate_backward(
            dy.to(x.dtype), x, a.to(acc).contiguous(), s.to(acc).contiguous(), mode)
        return dx, da.to(a.dtype), ds.to(s.dtype)
    dx, da4, ds = _combine_grads_torch(dy.to(acc), x.to(acc), a.to(acc)[:, :, None, None], s.to(acc), mode)
    return like(dx.to(x.dtype), x), da4.sum(dim=(2, 3)).to(a.dtype), ds.sum(dim=1, keepdim=True).to(s.dtype)


def _combine_grads_torch(dy: Tensor, x: Tensor, a: Tensor, s: Tensor, mode: str):
    """(dx, da, ds) of every mode, da and ds not yet reduced (shape of x); see the Triton
    backward kernel's docstring for the formulas."""
    if mode == "max":   # torch.maximum's gradient: half to each side on a tie, all to both on a NaN
        xa, xs = x * a, x * s
        half, zero, one = (torch.tensor(v, dtype=x.dtype, device=x.device) for v in (0.5, 0.0, 1.0))
        wa = torch.where(xa == xs, half, torch.where(xa < xs, zero, one))
        ws = torch.where(xa == xs, half, torch.where(xa > xs, zero, one))
        return dy * (wa * a + ws * s), wa * dy * x, ws * dy * x
    if mode == "add":
        return dy * (a + s), dy * x, dy * x
    sg = torch.sigmoid(a * s if mode == "bam" else a + s)
    dt = dy * x * sg * (1 - sg)
    if mode == "bam":
        return dy * (1 + sg), dt * s, dt * a
    return dy * (1 + sg), dt, dt


@_channel_spatial_gate_backward.register_fake
def _(dy, x, a, s, mode, backend):
    return torch.empty_like(x), a.new_empty(a.shape), s.new_empty(s.shape)


def _cs_setup_context(ctx, inputs, output):
    x, a, s, mode, backend = inputs
    ctx.save_for_backward(x, a, s)
    ctx.mode, ctx.backend = mode, backend


def _cs_backward(ctx, dy):
    x, a, s = ctx.saved_tensors
    dx, da, ds = torch.ops.fastattn.channel_spatial_gate_backward(dy, x, a, s, ctx.mode, ctx.backend)
    return dx, da, ds, None, None


_channel_spatial_gate.register_autograd(_cs_backward, setup_context=_cs_setup_context)


def channel_spatial_gate(x: Tensor, a: Tensor, s: Tensor, mode: str = "max", *,
                         backend: str | None = None) -> Tensor:
    """y = x * f(a, s) in one pass over x, with a channel gate a and a spatial gate s.

    x: (B, C, H, W), NCHW or channels_last; a: (B, C); s: (B, 1, H, W). Modes:
      "max"      max(x * a, x * s)              (scSE, official)
      "add"      x * a + x * s                  (scSE, paper)
      "bam"      x * (1 + sigmoid(a * s))       (BAM, official; a, s pre-activation)
      "bam_sum"  x * (1 + sigmoid(a + s))       (BAM, paper)
    Returns (B, C, H, W) in x's dtype and memory format. Saved for backward: x, a, s.
    backend: None (the process default), "auto", "triton", "cuda", "cpu", "torch" (see channel_scale).
    """
    from ..reference._checks import check_feature_map, check_tensor

    check_feature_map(CS_OP, x)
    check_tensor(CS_OP, "a", a, dim=2, shape_hint="(B, C)")
    check_tensor(CS_OP, "s", s, dim=4, shape_hint="(B, 1, H, W)")
    B, C, H, W = x.shape
    if a.shape != (B, C):
        raise ValueError(f"{CS_OP}: argument 'a' must have shape (B, C) = {(B, C)}, got {tuple(a.shape)}")
    if s.shape != (B, 1, H, W):
        raise ValueError(f"{CS_OP}: argument 's' must have shape (B, 1, H, W) = {(B, 1, H, W)}, got {tuple(s.shape)}")
    if mode not in CS_MODES:
        raise ValueError(f"{CS_OP}: argument 'mode' must be one of {CS_MODES}, got {mode!r}")
    return _dispatch.run(_channel_spatial_gate, x, a, s, mode, _dispatch.resolve(CS_OP, x, backend, CS_CHECKS))


# ---------------------------------------------------------------------------------------------
# channel_affine_gate: y = x * sigmoid(alpha[b, c] * x + beta[b, c])  (NAM, SA-Net)
# ---------------------------------------------------------------------------------------------

AG_OP = "channel_affine_gate"
AG_CHECKS = _checks("channel_affine_gate", "channel_affine_gate_backward")


@_dispatch.custom_op("fastattn::channel_affine_gate", mutates_args=())
def _channel_affine_gate(x: Tensor, alpha: Tensor, beta: Tensor, backend: str) -> Tensor:
    if backend == "triton":
        from fastattn.kernels.gate import affine_gate_forward

        return like(affine_gate_forward(flat(x), alpha.float().contiguous(), beta.float().contiguous()), x)
    acc = acc_dtype(x)
    if backend in ("cpu", "cuda"):     # the C++ kernels: any strides, y like torch.empty_like(x)
        return torch.ops.fastattn_C.channel_affine_gate(x, alpha.to(acc).contiguous(), beta.to(acc).contiguous())
    xa = x.to(acc)
    y = xa * torch.sigmoid(alpha.to(acc)[:, :, None, None] * xa + beta.to(acc)[:, :, None, None])
    return like(y.to(x.dtype), x)


@_channel_affine_gate.register_fake
def _(x, alpha, beta, backend):
    return torch.empty_like(x)


@torch.library.custom_op("fastattn::channel_affine_gate_backward", mutates_args=())
def _channel_affine_gate_backward(dy: Tensor, x: Tensor, alpha: Tensor, beta: Tensor,
                                  backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        from fastattn.kernels.gate import affine_gate_backward

        dx, dal, dbe = affine_gate_backward(flat(dy), flat(x), alpha.float().contiguous(), beta.float().contiguous())
        return like(dx, x), dal.to(alpha.dtype), dbe.to(beta.dtype)
    acc = acc_dtype(x)
    if backend in ("cpu", "cuda"):     # one pass: dx like torch.empty_like(x), dalpha and dbeta (B, C)
        dx, dal, dbe = torch.ops.fastattn_C.channel_affine_gate_backward(
            dy.to(x.dtype), x, alpha.to(acc).contiguous(), beta.to(acc).contiguous())
        return dx, dal.to(alpha.dtype), dbe.to(beta.dtype)
    xa, dya = x.to(acc), dy.to(acc)
    al, be = alpha.to(acc)[:, :, None, None], beta.to(acc)[:, :, None, None]
    s = torch.sigmoid(al * xa + be)
    u = dya * xa * s * (1 - s)
    dx = like((dya * s + u * al).to(x.dtype), x)
    return dx, (u * xa).sum(dim=(2, 3)).to(alpha.dtype), u.sum(dim=(2, 3)).to(beta.dtype)


@_channel_affine_gate_backward.register_fake
def _(dy, x, alpha, beta, backend):
    return torch.empty_like(x), alpha.new_empty(alpha.shape), beta.new_empty(beta.shape)


def _ag_setup_context(ctx, inputs, output):
    x, alpha, beta, backend = inputs
    ctx.save_for_backward(x, alpha, beta)
    ctx.backend = backend


def _ag_backward(ctx, dy):
    x, alpha, beta = ctx.saved_tensors
    dx, dal, dbe = torch.ops.fastattn.channel_affine_gate_backward(dy, x, alpha, beta, ctx.backend)
    return dx, dal, dbe, None


_channel_affine_gate.register_autograd(_ag_backward, setup_context=_ag_setup_context)


def channel_affine_gate(x: Tensor, alpha: Tensor, beta: Tensor, *, backend: str | None = None) -> Tensor:
    """y = x * sigmoid(alpha[b, c] * x + beta[b, c]) in one pass over x.

    A per-channel affine map inside the sigmoid: NAM (a BatchNorm folded into alpha, beta) and
    SA-Net's spatial branch (a GroupNorm with one channel per group); alpha = 0 gives a plain
    channel gate x * sigmoid(beta). x: (B, C, H, W), NCHW or channels_last; alpha, beta: (B, C).
    Returns (B, C, H, W) in x's dtype and memory format. Saved for backward: x, alpha, beta.
    backend: None (the process default), "auto", "triton", "cuda", "cpu", "torch" (see channel_scale).
    """
    from ..reference._checks import check_feature_map, check_tensor

    check_feature_map(AG_OP, x)
    for name, t in (("alpha", alpha), ("beta", beta)):
        check_tensor(AG_OP, name, t, dim=2, shape_hint="(B, C)")
        if t.shape != x.shape[:2]:
            raise ValueError(f"{AG_OP}: argument '{name}' must have shape (B, C) = {tuple(x.shape[:2])}, "
                             f"got {tuple(t.shape)}")
    return _dispatch.run(_channel_affine_gate, x, alpha, beta, _dispatch.resolve(AG_OP, x, backend, AG_CHECKS))
