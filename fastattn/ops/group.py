"""Group statistics gate of Spatial Group-wise Enhance (SGE): everything after the module's parameters.

Per sample and group g of C / G channels: m[c] = mean over H x W of x[c]; xn = sum_c x[c] * m[c];
t = (xn - mean(xn)) / (std(xn, unbiased) + eps) * weight[g] + bias[g]; y = x * sigmoid(t).

Backward (derived in kernels/group.py, _sge_fused_bwd): dx through the gate, xn's statistics and
the channel means, dweight and dbias; deterministic. Saved for backward: x, weight, bias and the
small statistics of the forward, m (B, C), mean and std of xn (B, G), returned by the forward op as
extra non-differentiable outputs (nothing of the size of x is created for backward).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _dispatch
from ._common import acc_dtype

__all__ = ["sge_gate"]

OP = "sge_gate"
CHECKS = {"triton": _dispatch.triton_reason,
          "cuda": _dispatch.cuda_kernel("sge_gate", "sge_gate_backward"),
          "cpu": _dispatch.cpu_kernel("sge_gate", "sge_gate_backward")}



def _param(p: Tensor, acc: torch.dtype) -> Tensor:
    """(1, G, 1, 1) parameter -> (G,) contiguous in the accumulation dtype."""
    return p.to(acc).reshape(-1).contiguous()


def _sge_torch(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float):
    """The reference math in float32 (float64 for float64 x): (y in x's dtype and format, m, mu, sd)."""
    B, C, H, W = x.shape
    acc = acc_dtype(x)
    if x.numel() == 0:
        zeros = x.new_zeros((B, groups), dtype=acc)
        return torch.empty_like(x), x.new_zeros((B, C), dtype=acc), zeros, zeros.clone()
    xf = x.to(acc).reshape(B, groups, C // groups, H * W)
    m = xf.mean(3)
    xn = (xf * m[..., None]).sum(2)
    mu = xn.mean(2)
    sd = xn.std(2)
    t = (xn - mu[..., None]) / (sd[..., None] + eps) * _param(weight, acc)[:, None] + _param(bias, acc)[:, None]
    y = torch.empty_like(x)
    y.copy_((xf * torch.sigmoid(t)[:, :, None]).reshape(B, C, H, W))
    return y, m.reshape(B, C), mu, sd


def _sge_torch_backward(dy, x, weight, bias, m, mu, sd, groups: int, eps: float):
    """(dx, dweight, dbias): the formulas of kernels/group.py::_sge_fused_bwd in PyTorch."""
    B, C, H, W = x.shape
    G, N = groups, H * W
    acc = acc_dtype(x)
    xf = x.to(acc).reshape(B, G, C // G, N)
    dyf = dy.to(acc).reshape(B, G, C // G, N)
    w, b = _param(weight, acc)[:, None], _param(bias, acc)[:, None]
    m = m.view(B, G, C // G, 1)
    d = (xf * m).sum(2) - mu[..., None]                                 # (B, G, N)
    r = 1.0 / (sd[..., None] + eps)
    t0 = d / (sd[..., None] + eps)
    s = torch.sigmoid(w * t0 + b)
    dt = (dyf * xf).sum(2) * s * (1 - s)
    dt0 = w * dt
    k = torch.where(sd > 0, (dt0 * d).sum(2) / ((N - 1) * torch.where(sd > 0, sd, 1.0)), 0.0)[..., None] * r * r
    dxn = r * (dt0 - dt0.mean(2, keepdim=True)) - k * d
    dm = (dxn[:, :, None] * xf).sum(3, keepdim=True)
    dx = torch.empty_like(x)
    dx.copy_((dyf * s[:, :, None] + dxn[:, :, None] * m + dm / N).reshape(B, C, H, W))
    return dx, (dt * t0).sum((0, 2)), dt.sum((0, 2))


@_dispatch.custom_op("fastattn::sge_gate", mutates_args=())
def _sge_gate(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if backend == "triton":
        from fastattn.kernels.group import sge_forward

        acc = acc_dtype(x)
        return sge_forward(x, _param(weight, acc), _param(bias, acc), groups, eps)
    if backend in ("cpu", "cuda"):     # the C++ / CUDA kernels of fastattn._C: any strides, y like empty_like(x)
        acc = acc_dtype(x)
        return torch.ops.fastattn_C.sge_gate(x, _param(weight, acc), _param(bias, acc), groups, eps)
    return _sge_torch(x, weight, bias, groups, eps)


@_sge_gate.register_fake
def _(x, weight, bias, groups, eps, backend):
    B, C = x.shape[:2]
    acc = acc_dtype(x)
    return (torch.empty_like(x), x.new_empty((B, C), dtype=acc), x.new_empty((B, groups), dtype=acc),
            x.new_empty((B, groups), dtype=acc))


@torch.library.custom_op("fastattn::sge_gate_backward", mutates_args=())
def _sge_gate_backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, m: Tensor, mu: Tensor, sd: Tensor,
                       groups: int, eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        from fastattn.kernels.group import sge_backward

        acc = acc_dtype(x)
        dx, dw, db = sge_backward(dy, x, _param(weight, acc), _param(bias, acc), m.contiguous(), mu.contiguous(),
                                  sd.contiguous(), groups, eps)
    elif backend in ("cpu", "cuda"):
        acc = acc_dtype(x)
        dx, dw, db = torch.ops.fastattn_C.sge_gate_backward(
            dy.to(x.dtype), x, _param(weight, acc), _param(bias, acc), m.to(acc).contiguous(), mu.to(acc).contiguous(),
            sd.to(acc).contiguous(), groups, eps)
    else:
        dx, dw, db = _sge_torch_backward(dy, x, weight, bias, m, mu, sd, groups, eps)
    return dx, dw.to(weight.dtype).reshape(weight.shape), db.to(bias.dtype).reshape(bias.shape)


@_sge_gate_backward.register_fake
def _(dy, x, weight, bias, m, mu, sd, groups, eps, backend):
    return torch.empty_like(x), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, groups, eps, backend = inputs
    _, m, mu, sd = output
    ctx.mark_non_differentiable(m, mu, sd)
    ctx.save_for_backward(x, weight, bias, m, mu, sd)
    ctx.groups, ctx.eps, ctx.backend = groups, eps, backend


def _backward(ctx, dy, _dm, _dmu, _dsd):
    x, weight, bias, m, mu, sd = ctx.saved_tensors
    dx, dw, db = torch.ops.fastattn.sge_gate_backward(dy, x, weight, bias, m, mu, sd, ctx.groups, ctx.eps,
                                                      ctx.backend)
    return dx, dw, db, None, None, None


_sge_gate.register_autograd(_backward, setup_context=_setup_context)


def sge_gate(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float = 1e-5, *,
             backend: str | None = None) -> Tensor:
    """The Spatial Group-wise Enhance gate (SpatialGroupEnhance.forward after its parameters).

    x: (B, C, H, W) float, NCHW or channels_last, C % groups == 0, H * W >= 2 (unbiased std);
    weight, bias: (1, groups, 1, 1), the module's parameters (any float dtype; math in float32, or
    float64 for float64 x). Per sample and group of C / groups channels c:
    m[c] = mean_hw x[c]; xn = sum_c x[c] * m[c]; t = (xn - mean_hw xn) / (std_hw(xn) + eps);
    y[c] = x[c] * sigmoid(t * weight[g] + bias[g]).
    Returns (B, C, H, W) in x's dtype and memory format. Differentiable in x, weight and bias.
    backend: None (the process default, see fastattn.set_backend), "auto", "triton", "cuda" (the CUDA C++
    kernels of fastattn._C), "cpu" (its OpenMP C++ kernels, CPU tensors), "torch".
    """
    from ..reference._checks import check_feature_map, check_tensor

    check_feature_map(OP, x)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{OP}: argument 'groups' must be a positive int, got {groups!r}")
    B, C, H, W = x.shape
    if C % groups:
        raise ValueError(f"{OP}: argument 'x' must have channels divisible by groups={groups}, got {C}")
    if H * W < 2:
        raise ValueError(f"{OP}: argument 'x' must have at least 2 spatial positions (H*W >= 2, for the unbiased "
                         f"std), got H={H}, W={W}")
    for name, p in (("weight", weight), ("bias", bias)):
        check_tensor(OP, name, p, dim=4, shape_hint="(1, groups, 1, 1)")
        if tuple(p.shape) != (1, groups, 1, 1):
            raise ValueError(f"{OP}: argument '{name}' must have shape (1, groups, 1, 1) = (1, {groups}, 1, 1), "
                             f"got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"{OP}: argument '{name}' must be on x's device {x.device}, got {p.device}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"{OP}: argument 'eps' must be a non-negative float, got {eps!r}")
    return _dispatch.run(_sge_gate, x, weight, bias, groups, float(eps), _dispatch.resolve(OP, x, backend, CHECKS))[0]
